"""Experiment tracking for rank 0 of the training loop: TensorBoard event files, optionally MLflow.

    tracker = RunTracker.create(cfg.tracking.with_default_dir(cfg.train.checkpoint_dir), run_name,
                                enabled=rank == 0)
    tracker.log_scalars(step, {"train/loss": 3.2, "train/lr": 1e-3, "train/sequences_per_s": 850.0})
    tracker.log_stage(step, "train-4", depth=4)
    tracker.flush()   # e.g. after each validation
    tracker.close()   # at the end of the stage / run (idempotent)

Event files go to ``<tracking.dir>/<run_name>/`` (TensorBoard's one-dir-per-run layout, so
``tensorboard --logdir <tracking.dir>`` shows every run). A local dir is written directly. An
``s3://`` dir cannot be appended to, so the writer works in a local temp dir and ``flush()`` /
``close()`` upload the whole event files through the project's fsspec layer
(``stackrec_dist.data.storage``): scalars-only event files stay small (~100 bytes per value), so
re-uploading them is cheap, and a crash loses at most what came after the last flush.

MLflow is an optional extra (``pip install mlflow`` or ``stackrec-dist[mlflow]``), imported only
when ``tracking.mlflow_uri`` is set; its metric names may not contain ``@`` (``valid/ndcg@5``), so
names are sanitised for it (``valid/ndcg_at_5``) while TensorBoard keeps the original tags.

A disabled tracker (other ranks, or nothing configured) accepts every call and does nothing.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from stackrec_dist.config import ConfigError, TrackingConfig

__all__ = ["RunTracker", "STAGE_TAG", "DEPTH_TAG", "mlflow_metric_name"]

STAGE_TAG = "stage"  # text: the stage name, logged at the step the stage starts
DEPTH_TAG = "model/depth"  # scalar: number of residual blocks from that step on


def mlflow_metric_name(tag: str) -> str:
    """``valid/ndcg@5`` -> ``valid/ndcg_at_5``: MLflow allows only ``[/\\w.\\- :]`` in names."""
    return re.sub(r"[^/\w.\- :]", "_", tag.replace("@", "_at_"))


def _as_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for tag, value in scalars.items():
        try:
            out[str(tag)] = float(value)  # python numbers, numpy scalars, 0-dim tensors
        except (TypeError, ValueError) as exc:
            raise TypeError(f"tracker scalar {tag!r} must be a number, got {type(value).__name__}") from exc
    return out


class _TensorBoardSink:
    """SummaryWriter into ``<dir>/<run_name>``; for a remote dir, a local temp dir mirrored on flush."""

    def __init__(self, root: str, run_name: str, storage_options: dict[str, Any]):
        from stackrec_dist.data.storage import is_local, open_fs

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's module needs the tensorboard package
            raise ConfigError("tracking.tensorboard needs the tensorboard package (pip install tensorboard), "
                              "or set tracking.tensorboard=false") from exc
        self.fs, base = open_fs(root, storage_options)
        self.remote_dir = None if is_local(self.fs) else f"{base}/{run_name}"
        if self.remote_dir is None:
            self.local_dir = Path(base) / run_name
            self._tmp = None
        else:
            self._tmp = tempfile.mkdtemp(prefix="stackrec-tb-")
            self.local_dir = Path(self._tmp)
        self.writer = SummaryWriter(log_dir=str(self.local_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def text(self, step: int, tag: str, value: str) -> None:
        self.writer.add_text(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote_dir is not None:
            self._upload()

    def _upload(self) -> None:
        from stackrec_dist.data.storage import retrying

        for path in sorted(self.local_dir.rglob("*")):
            if path.is_file():
                target = f"{self.remote_dir}/{path.relative_to(self.local_dir).as_posix()}"
                retrying(lambda p=path, t=target: self.fs.put_file(str(p), t), f"upload {target}")

    def close(self) -> None:
        self.writer.close()  # flushes
        try:
            if self.remote_dir is not None:
                self._upload()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)


class _MlflowSink:
    """One MLflow run through ``MlflowClient`` (no global ``mlflow.start_run`` state)."""

    def __init__(self, uri: str, experiment: str, run_name: str):
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(f"tracking.mlflow_uri={uri!r} needs MLflow, an optional extra: pip install mlflow "
                              "(or 'stackrec-dist[mlflow]'), or leave tracking.mlflow_uri empty") from exc
        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(mlflow_metric_name(k), v, now, step) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def text(self, step: int, tag: str, value: str) -> None:
        self.client.set_tag(self.run_id, tag, value)

    def flush(self) -> None:
        pass  # the client logs synchronously

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class RunTracker:
    """Rank 0's sink for training figures; a no-op when disabled. See the module docstring."""

    def __init__(self, sinks: list[Any]):
        self._sinks = sinks

    @classmethod
    def create(cls, cfg: TrackingConfig, run_name: str, enabled: bool) -> "RunTracker":
        """Open the configured sinks when ``enabled`` (rank 0); otherwise a no-op tracker.

        ``cfg.dir`` must be resolved (``cfg.with_default_dir(train.checkpoint_dir)``) when
        TensorBoard is on. Raises ``ConfigError`` (the CLI's "config error", exit 2) for an empty
        dir or run name, and naming the package when a configured sink's package is missing."""
        if not enabled or not cfg.enabled:
            return cls([])
        if not run_name or "/" in run_name:
            raise ConfigError(f"tracker run name must be a non-empty name without '/', got {run_name!r}")
        sinks: list[Any] = []
        try:
            if cfg.tensorboard:
                if not cfg.dir:
                    raise ConfigError("tracking.dir is empty: pass "
                                      "cfg.tracking.with_default_dir(cfg.train.checkpoint_dir)")
                sinks.append(_TensorBoardSink(cfg.dir, run_name, cfg.storage_options))
            if cfg.mlflow_uri:
                sinks.append(_MlflowSink(cfg.mlflow_uri, cfg.mlflow_experiment, run_name))
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
        return cls(sinks)

    @property
    def enabled(self) -> bool:
        return bool(self._sinks)

    @property
    def log_dir(self) -> Path | None:
        """The local directory TensorBoard writes to (a temp mirror for s3://), or None."""
        return next((s.local_dir for s in self._sinks if isinstance(s, _TensorBoardSink)), None)

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One value per tag at ``step``, e.g. ``train/loss``, ``train/lr``, ``valid/ndcg@5``,
        ``train/sequences_per_s``, ``growth/pause_s``."""
        if not self._sinks:
            return
        values = _as_floats(scalars)
        for sink in self._sinks:
            sink.scalars(int(step), values)

    def log_stage(self, step: int, name: str, depth: int) -> None:
        """A stage starts at ``step``: its name as text (``stage``) and the depth as a scalar (``model/depth``)."""
        if not self._sinks:
            return
        for sink in self._sinks:
            sink.text(int(step), STAGE_TAG, str(name))
            sink.scalars(int(step), {DEPTH_TAG: float(depth)})

    def flush(self) -> None:
        for sink in self._sinks:
            sink.flush()

    def close(self) -> None:
        sinks, self._sinks = self._sinks, []  # later calls are no-ops
        errors = []
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - close every sink, then report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
