"""Everything that touches Ray: the session, the TorchTrainer of a run or of a plan segment, the
worker entry point, the Ray checkpoint sink, and the ledger actor of in-place growth.

Ray session: ``distributed.address`` or ``$RAY_ADDRESS`` -> connect to that cluster; neither ->
start an embedded local Ray bound to 127.0.0.1. :func:`ray_session` is entered once per command
(a plan, or the quickstart's two plans) and shuts Ray down at the end only if it started it; a Ray
already initialised by the caller (tests share one cluster per session) is used as is.

Storage: ``distributed.storage_path`` is a local directory or ``s3://bucket/prefix``; for S3 the
filesystem is built by the data package's fsspec layer (from ``data.storage_options`` when the
dataset is on S3 too, else from the AWS_* environment) and handed to Ray as a pyarrow filesystem.

The driver's node: what is written to a local path of the driver (a plan's run directory, the
TensorBoard files under ``<train.checkpoint_dir>/tensorboard``) is written by actors pinned to the
driver's node, never by a worker, which may run on any node: no disk is assumed shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stackrec_dist.config import JobConfig, config_from_dict, config_to_dict
from stackrec_dist.train.checkpoint import COMPLETE_MARKER, Checkpoint, open_checkpoint
from stackrec_dist.train.device import DeviceChoice, resolve_cluster_device
from stackrec_dist.train.loop import LoopOptions, TrainLoop, World, open_tracker

log = logging.getLogger(__name__)

# Ray's own logging, set through Ray's settings: a healthy run shows our progress, not Ray internals.
_RAY_ENV = {
    "RAY_DEDUP_LOGS": "1",
    # Ray Train's controller polls the workers this often; a checkpoint report waits for the next
    # poll to be committed, so Ray's default of 2 s is paid at every validation point.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}
# An embedded Ray runs on this one machine, which no cloud preempts: Ray Train's spot-preemption
# watcher has nothing to watch (and logs a core-worker error about its restart arguments).
_EMBEDDED_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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
    plan = [dataclasses.replace(s, data_path=str(Path(s.data_path).resolve()))
            if s.data_path and not _is_uri(s.data_path) else s for s in job.plan]
    return dataclasses.replace(job, data=data, distributed=dist, train=train, plan=plan)


def for_workers(job: JobConfig) -> JobConfig:
    """The job as workers get it: absolute local paths, and progress bars only when the driver's
    console is a terminal (Ray renders the workers' bars there; in a log they are noise)."""
    job = absolutize(job)
    if job.train.progress and not sys.stdout.isatty():
        job = dataclasses.replace(job, train=dataclasses.replace(job.train, progress=False))
    return job


@contextlib.contextmanager
def ray_session(job: JobConfig) -> Iterator[None]:
    """Connect to or start Ray for the whole command; shut it down only if this call started it."""
    import ray

    if ray.is_initialized():
        yield
        return
    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    address = job.distributed.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    else:
        for key, value in _EMBEDDED_RAY_ENV.items():
            os.environ.setdefault(key, value)
        # Ray 2.60 turns token authentication on for a new local cluster (good) and announces it
        # with a WARNING at every start; the notice, not the setting, is dropped.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        num_cpus = max(2, int(job.distributed.num_workers * job.distributed.cpus_per_worker + 0.999))
        # The dashboard process serves Ray's state API, which Ray Train's controller monitor polls:
        # without it a healthy run logs "Failed to query Ray Train Controller actor state" forever.
        ray.init(num_cpus=num_cpus, object_store_memory=job.distributed.object_store_mb * 1024 * 1024,
                 include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def storage_for(job: JobConfig) -> tuple[str, Any]:
    """(storage_path for RunConfig, pyarrow filesystem or None)."""
    path = job.distributed.storage_path
    if not _is_uri(path) or path.startswith("file://"):
        local = path[len("file://"):] if path.startswith("file://") else path
        Path(local).mkdir(parents=True, exist_ok=True)
        return str(Path(local).resolve()), None
    from stackrec_dist.data.storage import arrow_fs, open_fs

    same_store = job.data.path.split("://", 1)[0] == path.split("://", 1)[0]
    fs, inside = open_fs(path, job.data.storage_options if same_store else {})
    return inside, arrow_fs(fs)


def cluster_device(job: JobConfig) -> DeviceChoice:
    import ray

    return resolve_cluster_device(job.train.device, float(ray.cluster_resources().get("GPU", 0)))


def worker_environment(job: JobConfig, choice: DeviceChoice) -> dict[str, str]:
    from stackrec_dist.growth.ledger import fault_injection_env
    from stackrec_dist.train.distributed import worker_env

    # Ray Train routes a worker's print() through its logger, which the driver's console then shows
    # twice; our lines are already one per validation, so print stays print. The crash-safety
    # tests' fault injection reaches the workers.
    return {**worker_env(job.distributed, choice.use_gpu), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
            **fault_injection_env()}


def build_trainer(job: JobConfig, loop_config: dict[str, Any], run_name: str, choice: DeviceChoice,
                  num_workers: int):
    """The TorchTrainer of one worker group (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = job.distributed
    storage_path, storage_fs = storage_for(job)
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=choice.use_gpu,
        resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": 1} if choice.use_gpu else {})},
    )
    run = RunConfig(
        name=run_name,
        storage_path=storage_path,
        storage_filesystem=storage_fs,
        failure_config=FailureConfig(max_failures=dist.max_failures),
        # Keep by recency: resume must find the latest; stage outputs are kept by the ledger.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": worker_environment(job, choice)},
        # Ray Train's own per-report INFO lines (whole metric dicts) stay in its log files.
        logging_config=LoggingConfig(log_level="WARNING"),
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config,
                        torch_config=TorchConfig(backend=choice.backend), scaling_config=scaling, run_config=run)


def _fit(trainer) -> Any:
    from stackrec_dist.errors import unwrap_worker_error

    try:
        result = trainer.fit()
    except Exception as err:  # Ray wraps what the workers raised
        raise unwrap_worker_error(err) from None
    if result.error is not None:
        raise unwrap_worker_error(result.error) from None
    return result


# -- the checkpoint sink of a Ray worker -------------------------------------------------------


# True once this worker process has reported a checkpoint. From then on ``get_checkpoint()`` is
# this process's own last report, of a stage that has already finished: a later stage of the same
# worker group never resumes from it, so it is not downloaded again at every in-place growth.
# A worker group Ray restarts runs in new processes, which restore from storage as they should.
_REPORTED_HERE = False


class RaySink:
    """Checkpoints through ``ray.train.report``: every rank writes its parts into a local directory,
    Ray merges the ranks' directories into one checkpoint in storage and keeps the latest ones."""

    def __init__(self, stage: str, wait_for_commit: bool = True):
        self.stage = stage
        # Block after each report until Ray's controller has registered it (it polls workers
        # every 2 s): a worker dying inside that window would lose the checkpoint.
        self.wait_for_commit = wait_for_commit
        self._restored: Path | None = None  # the local copy latest() made, removed by release()

    def latest(self) -> Checkpoint | None:
        import ray.train

        checkpoint = None if _REPORTED_HERE else ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self.release()
        self._restored = Path(tempfile.mkdtemp(prefix="stackrec-restore-"))
        checkpoint.to_directory(str(self._restored))
        return open_checkpoint(self._restored) if (self._restored / COMPLETE_MARKER).exists() else None

    def release(self) -> None:
        """The restored checkpoint has been loaded: its local copy goes (one per resume otherwise)."""
        if self._restored is not None:
            shutil.rmtree(self._restored, ignore_errors=True)
            self._restored = None

    def save(self, loop: TrainLoop, metrics: dict[str, Any]) -> None:
        import ray.train

        directory = Path(tempfile.mkdtemp(prefix=f"stackrec-ckpt-r{loop.world.rank}-"))
        try:
            loop.write_parts(directory)
            if loop.world.is_main:
                (directory / COMPLETE_MARKER).write_text("ok\n")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=f"checkpoint-{self.stage}-step{loop.state.step:08d}")
            global _REPORTED_HERE
            _REPORTED_HERE = True
            if self.wait_for_commit and hasattr(ray.train, "get_all_reported_checkpoints"):  # Train V2
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


class _UserErrorTraceback(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback when what the function raised is a
    :class:`~stackrec_dist.errors.StackrecError` (bad input, not a bug): the driver prints it as one
    line and keeps the traceback in its error log. Any other exception is logged in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        from stackrec_dist.errors import StackrecError

        text = record.getMessage()
        if not text.startswith("Error in training function"):
            return True
        last = text.strip().splitlines()[-1]
        names, stack = set(), [StackrecError]
        while stack:
            cls = stack.pop()
            names.add(cls.__name__)
            stack.extend(cls.__subclasses__())
        return not any(f"{name}: " in last for name in names)


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report (a whole metrics dict) at INFO through a logger named after its
    module's *file* (ray 2.60, train/v2/_internal/execution/context.py), so RunConfig's
    ``LoggingConfig(log_level=...)``, which filters ``ray.train.*`` loggers, misses it; set that
    logger's level as LoggingConfig would. And a user-input error raised in a worker is not a
    traceback for the console (see :class:`_UserErrorTraceback`)."""
    from ray.train.v2._internal import util
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger(util.__name__).addFilter(_UserErrorTraceback())


def _worker_progress():
    from ray.experimental.tqdm_ray import tqdm

    return tqdm


# -- the worker entry point --------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: ``{"job": JobConfig dict, "device": "cpu" | "cuda",
    "options": LoopOptions dict, "init_state": ObjectRef | None, "tracker": actor | None}`` for one
    run, plus ``"segment"`` (plan positions, model config, run dir, run id, ledger actor) for a
    segment of a growth plan. ``tracker`` is the driver's-node actor rank 0 tracks through (None:
    tracking is off)."""
    from stackrec_dist.train import distributed as D

    job = config_from_dict(config["job"], source="<train_loop_config>")
    options = LoopOptions.from_dict(config.get("options"))
    _quiet_ray_train_logs()
    choice = DeviceChoice(config["device"])
    init_state = config.get("init_state")
    if init_state is not None:
        import ray

        init_state = ray.get(init_state)
    ctx = D.init_worker(choice)
    world = World(choice, ctx)
    try:
        segment = config.get("segment")
        driver_tracker = config.get("tracker")
        tracker = RemoteTracker(driver_tracker) if world.is_main and driver_tracker else open_tracker(job, world.rank)
        with tracker:
            if world.is_main:
                print(f"stackrec: {job.name}: {world.world_size} worker(s), {choice.describe()}, "
                      f"ZeRO-{job.distributed.zero_stage}", flush=True)
            if segment is None:
                loop = TrainLoop(job, world, init_state, options, sink=RaySink(job.name), progress=_worker_progress(),
                                 tracker=tracker)
                try:
                    loop.fit()
                finally:
                    loop.close()
            else:
                _run_segment_in_worker(job, segment, world, options, tracker)
    finally:
        D.teardown(ctx)


def _run_segment_in_worker(job: JobConfig, segment: dict[str, Any], world: World, options, tracker) -> None:
    import ray

    from stackrec_dist.config import ModelConfig, from_dict
    from stackrec_dist.growth.segment import SegmentStart, run_segment

    ledger = segment["ledger"]
    # Ask the ledger where to start: after a worker-group restart, stages recorded since the
    # segment began are not run again (train stages are recorded before the group moves on).
    point = ray.get(ledger.resume_point.remote(segment["positions"]))
    if point is None:
        return
    start = SegmentStart(point["positions"], from_dict(ModelConfig, point["model_config"], "model"),
                         point["weights"], point["parent"], point["step_offset"], point["last_step_end_t"])
    pending: list[Any] = []

    def record(rec, weights, model_cfg, info, best, wait):
        pending.append(ledger.record.remote(dataclasses.asdict(rec), weights, config_to_dict(model_cfg), info, best))
        if wait:  # a train stage's final weights are safe before the group moves on
            ray.get(pending)
            pending.clear()

    run_segment(job, start, world, Path(segment["run_dir"]), segment["run_id"], record,
                lambda stage_job, stage: RaySink(stage), options=options, progress=_worker_progress(), tracker=tracker)
    if pending:
        ray.get(pending)


# -- actors on the driver's node: rank 0's tracker, the ledger of in-place growth ---------------


class TrackerActor:
    """Rank 0's experiment tracker, opened on the driver's node (made a Ray actor by
    :func:`_on_driver_node`): a local tracking dir, by default ``<train.checkpoint_dir>/tensorboard``,
    is the driver's, and rank 0 may run on any node. One tracker for the whole Ray run, so a worker
    group that Ray restarts goes on logging into it; the driver closes it when the run ends."""

    def __init__(self, job: dict[str, Any]):
        self.job = config_from_dict(job, source="<tracker>")
        self.tracker = None  # opened at the first call: a bad tracking config fails in rank 0

    def track(self, method: str, *args: Any) -> None:
        """``RunTracker.<method>(*args)``: log_scalars, log_stage, flush or close."""
        if self.tracker is None:
            if method == "close":
                return
            self.tracker = open_tracker(self.job, 0)
        getattr(self.tracker, method)(*args)


class RemoteTracker:
    """Rank 0's side of :class:`TrackerActor`: the RunTracker calls, sent in order; ``flush`` (after
    every validation) waits for them. Closing it only flushes: the driver closes the tracker."""

    def __init__(self, actor):
        self.actor = actor

    def log_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        self.actor.track.remote("log_scalars", step, dict(scalars))

    def log_stage(self, step: int, name: str, depth: int) -> None:
        self.actor.track.remote("log_stage", step, name, depth)

    def flush(self) -> None:
        import ray

        ray.get(self.actor.track.remote("flush"))

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> RemoteTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LedgerActor(TrackerActor):
    """The plan's ledger on the driver's node (the run directory is there): tells (re)started
    workers where to begin and records their stages. It also hosts rank 0's tracker."""

    def __init__(self, run_dir: str, job: dict[str, Any], env: dict[str, str]):
        os.environ.update(env)
        from stackrec_dist.growth.ledger import PlanLedger

        super().__init__(job)
        self.ledger = PlanLedger(run_dir, [s.name for s in self.job.plan])

    def resume_point(self, segment: list[int]) -> dict[str, Any] | None:
        from stackrec_dist.growth.segment import resume_point

        point = resume_point(self.job, self.ledger, segment)
        if point is None:
            return None
        return {"positions": point.positions, "model_config": config_to_dict(point.model_cfg),
                "weights": point.weights, "parent": point.parent, "step_offset": point.step_offset,
                "last_step_end_t": point.last_step_end_t}

    def record(self, rec: dict[str, Any], weights, model_cfg: dict[str, Any], info: dict[str, Any], best) -> str:
        from stackrec_dist.config import ModelConfig, from_dict
        from stackrec_dist.growth.ledger import StageRecord

        return self.ledger.record(StageRecord(**rec), weights, from_dict(ModelConfig, model_cfg, "model"), info, best)


def _on_driver_node(cls: type, *args: Any):
    """An actor of ``cls`` pinned to the driver's node (no CPU reserved)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_restarts=0)(cls).options(scheduling_strategy=here).remote(*args)


def _close_tracker(actor) -> None:
    import ray

    ray.get(actor.track.remote("close"))


def run_segment_on_ray(cfg: JobConfig, segment: list[int], run_dir: Path, ledger,
                       options: LoopOptions | None = None) -> None:
    """One worker group runs a plan segment, growing in place; its records reach ``ledger``'s file
    through an actor on this (the driver's) node, which also tells (re)started workers where to begin."""
    import ray

    from stackrec_dist.growth.segment import stage_workers
    from stackrec_dist.growth.ledger import fault_injection_env

    job = for_workers(cfg)
    choice = cluster_device(job)
    workers, _ = stage_workers(job, job.plan[segment[0]])
    actor = _on_driver_node(LedgerActor, str(run_dir), config_to_dict(job), fault_injection_env())
    try:
        loop_config = {
            "job": config_to_dict(job), "device": choice.kind,
            "options": dataclasses.asdict(options or LoopOptions()),
            "tracker": actor if job.tracking.enabled else None,
            "segment": {"positions": segment, "run_dir": str(run_dir), "run_id": ledger.run_id, "ledger": actor},
        }
        # One Ray run per segment, named after its first stage and the plan run: a rerun after a
        # crash finds that run's checkpoints again (Ray Train restores a run by name and storage).
        name = f"{job.name}-{job.plan[segment[0]].name}-{ledger.run_id}"
        _fit(build_trainer(job, loop_config, name, choice, workers))
        _close_tracker(actor)
    finally:
        ray.kill(actor)


# -- a single run (no plan) ----------------------------------------------------------------------


def fit_distributed(job: JobConfig, options: LoopOptions | None = None, init_state: dict | None = None):
    """Run one training job on Ray -> ``ray.train.Result`` (``.metrics`` = rank 0's metrics of the
    latest checkpoint, ``.checkpoint`` = latest checkpoint, ``.path`` = run directory in storage)."""
    import ray

    job = for_workers(job)
    with ray_session(job):
        choice = cluster_device(job)
        tracker = _on_driver_node(TrackerActor, config_to_dict(job)) if job.tracking.enabled else None
        try:
            loop_config = {"job": config_to_dict(job), "device": choice.kind,
                           "options": dataclasses.asdict(options or LoopOptions()), "tracker": tracker,
                           "init_state": ray.put(init_state) if init_state is not None else None}
            result = _fit(build_trainer(job, loop_config, job.name, choice, job.distributed.num_workers))
            if tracker is not None:
                _close_tracker(tracker)
            return result
        finally:
            if tracker is not None:
                ray.kill(tracker)


def local_checkpoint_dir(job: JobConfig, result) -> Path | None:
    """The latest checkpoint as a local directory ``<train.checkpoint_dir>/last`` (downloaded from S3)."""
    if result.checkpoint is None:
        return None
    target = Path(job.train.checkpoint_dir).resolve() / "last"
    if target.exists():
        shutil.rmtree(target)
    result.checkpoint.to_directory(str(target))
    return target
