"""Ray Train assembly: ``run_distributed(job) -> summary dict`` / ``fit_distributed(job) -> ray.train.Result``
(a TorchTrainer running DeepSpeed workers).

Ray connection: ``distributed.address`` or ``$RAY_ADDRESS`` -> connect to that cluster; neither ->
start an embedded local Ray bound to 127.0.0.1 with a small object store (``object_store_mb``),
shut down again when the run ends. A Ray already initialised by the caller (tests share one
cluster per session) is used as is.

Storage: ``distributed.storage_path`` is a local directory or ``s3://bucket/prefix``; for S3 the
filesystem is built by the data package's fsspec layer (from ``data.storage_options`` when the
dataset is on S3 too, else from the AWS_* environment) and handed to Ray as a pyarrow filesystem.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from stackrec_dist.config import JobConfig, config_to_dict
from stackrec_dist.train.distributed import torch_backend, worker_env
from stackrec_dist.train.worker import WorkerOptions, train_loop_per_worker

log = logging.getLogger(__name__)


def _is_uri(path: str) -> bool:
    return "://" in path


def absolutize(job: JobConfig) -> JobConfig:
    """Workers do not share the driver's working directory: make local paths absolute."""
    data = job.data
    if data.path and not _is_uri(data.path):
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    dist = job.distributed
    if dist.storage_path and not _is_uri(dist.storage_path):
        dist = dataclasses.replace(dist, storage_path=str(Path(dist.storage_path).resolve()))
    train = job.train
    if train.checkpoint_dir and not _is_uri(train.checkpoint_dir):
        train = dataclasses.replace(train, checkpoint_dir=str(Path(train.checkpoint_dir).resolve()))
    return dataclasses.replace(job, data=data, distributed=dist, train=train)


def init_ray(job: JobConfig) -> bool:
    """Connect to or start Ray; True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = job.distributed.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = max(2, int(job.distributed.num_workers * job.distributed.cpus_per_worker + 0.999))
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=job.distributed.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
        )
    return True


def storage_for(job: JobConfig) -> tuple[str, Any]:
    """(storage_path for RunConfig, pyarrow filesystem or None)."""
    path = job.distributed.storage_path
    if not _is_uri(path) or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        Path(local).mkdir(parents=True, exist_ok=True)
        return str(Path(local).resolve()), None
    from stackrec_dist.data.storage import arrow_fs, open_fs

    # The dataset's storage options (endpoint, credentials) when it lives on the same kind of
    # store; otherwise the environment's (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    same_store = job.data.path.split("://", 1)[0] == path.split("://", 1)[0]
    fs, inside = open_fs(path, job.data.storage_options if same_store else {})
    return inside, arrow_fs(fs)


def build_trainer(job: JobConfig, options: WorkerOptions | None = None, resume_from: Any = None,
                  init_state: Any = None):
    """The TorchTrainer of a job (not started). ``init_state``: an ObjectRef of initial weights."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = job.distributed
    if dist.num_workers < 1:
        raise ValueError("distributed.num_workers must be >= 1 for a Ray run (0 = single-process trainer)")
    job = absolutize(job)
    storage_path, storage_fs = storage_for(job)
    options = options or WorkerOptions()
    loop_config = {"job": config_to_dict(job), "options": dataclasses.asdict(options), "init_state": init_state}
    scaling = ScalingConfig(
        num_workers=dist.num_workers,
        use_gpu=dist.use_gpu,
        resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": 1} if dist.use_gpu else {})},
    )
    run = RunConfig(
        name=job.name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=dist.max_failures),
        # Keep by recency: resume must find the latest; best weights travel inside each checkpoint.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": worker_env(dist)},
    )
    kwargs = {}
    if resume_from is not None:
        kwargs["resume_from_checkpoint"] = resume_from
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=torch_backend(dist.use_gpu)),
        scaling_config=scaling,
        run_config=run,
        **kwargs,
    )


def fit_distributed(job: JobConfig, options: WorkerOptions | None = None, resume_from: Any = None,
                    init_checkpoint: str | Path | None = None):
    """Run the job on Ray -> ``ray.train.Result`` (``.metrics`` = rank 0's metrics of the latest
    checkpoint, ``.checkpoint`` = latest checkpoint, ``.path`` = run directory in storage).

    ``init_checkpoint``: a model checkpoint (single-process ``model.pt`` directory or a DeepSpeed one
    of any stage/world size, e.g. a freshly grown model) whose weights and model config start the run;
    the weights travel to the workers through the object store (works on a remote cluster too).
    """
    started = init_ray(job)
    try:
        init_state = None
        if init_checkpoint is not None:
            import ray

            from stackrec_dist.growth.model_checkpoint import open_model_checkpoint

            ckpt = open_model_checkpoint(init_checkpoint)
            job = dataclasses.replace(job, model=ckpt.model_config)
            init_state = ray.put(ckpt.state_dict())
        trainer = build_trainer(job, options, resume_from, init_state)
        result = trainer.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    return result


def local_checkpoint_dir(job: JobConfig, result) -> Path | None:
    """The latest checkpoint as a local directory (downloaded under train.checkpoint_dir from S3)."""
    if result.checkpoint is None:
        return None
    import pyarrow.fs as pafs

    if isinstance(result.checkpoint.filesystem, pafs.LocalFileSystem):
        return Path(result.checkpoint.path)
    target = Path(job.train.checkpoint_dir).resolve() / job.name / Path(result.checkpoint.path).name
    if not target.exists():
        result.checkpoint.to_directory(str(target))
    return target


def run_distributed(job: JobConfig, options: WorkerOptions | None = None, resume_from: Any = None,
                    init_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Run the job on Ray; returns a JSON-able summary: the final metrics (``train/loss``,
    ``valid/*``, ``step``, ``epoch``, ``best_valid_ndcg@5``, ``best_step``, ...), ``checkpoint`` (local
    directory of the latest checkpoint: DeepSpeed shards + ``model_config.json`` +
    ``best-model.pt``) and ``run_path`` (the Ray run directory in storage)."""
    result = fit_distributed(job, options, resume_from, init_checkpoint)
    if result.error is not None:
        raise result.error
    checkpoint = local_checkpoint_dir(job, result)
    return {
        **(result.metrics or {}),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "run_path": result.path,
    }
