"""The error classes a user can meet, each with its own exit code.

Every error that is the user's to fix (bad config, bad data, bad checkpoint, unreachable storage,
missing device, a run that cannot train) derives from :class:`StackrecError`. ``stackrec`` prints
such an error as one line ``stackrec: <kind> error: <message>`` and exits with the class's code;
the traceback is shown only under ``--debug``. Anything else is a bug and is shown in full.

The message names *where*: the file, row group, row or config field, so it can be acted on
without a debugger. ``docs/errors.md`` lists the classes and what to do about each.
"""

from __future__ import annotations

import os
import re
from typing import Any


class StackrecError(Exception):
    """Base of every user-facing error; ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    kind = "run"


class ConfigErrorBase(StackrecError):
    exit_code = 2
    kind = "config"


class DataErrorBase(StackrecError):
    exit_code = 3
    kind = "data"


class CheckpointError(StackrecError):
    """A checkpoint that is missing, incomplete, unsafe, or does not fit the model or dataset."""

    exit_code = 4
    kind = "checkpoint"


class StorageErrorBase(StackrecError):
    exit_code = 5
    kind = "storage"


class DeviceError(StackrecError):
    """The requested device (e.g. ``cuda``) is not available here."""

    exit_code = 6
    kind = "device"


class TrainingError(StackrecError):
    """Training cannot go on: an epoch with no batch, a non-finite loss or learning rate."""

    exit_code = 7
    kind = "training"


# -- checkpoint files ----------------------------------------------------------------------------


def safe_torch_load(path: "str | os.PathLike[str]", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; every failure is a one-line :class:`CheckpointError`.

    Missing file, a directory, a truncated or corrupt file, and a file that holds pickled code or
    objects (refused by ``weights_only``) each raise ``CheckpointError`` naming the file. Torch's
    own text for a refused pickle (which suggests ``weights_only=False``) is never shown: such a
    file is never loaded. The original exception is chained (visible under ``--debug``).
    """
    import errno
    import pickle
    import zipfile

    import torch

    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise CheckpointError(f"{shown}: checkpoint file does not exist")
    if os.path.isdir(shown):
        raise CheckpointError(f"{shown}: is a directory, a checkpoint file was expected")
    try:
        return torch.load(shown, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise CheckpointError(
                f"{shown}: refused to load: the file holds pickled Python objects ({refused.group(1)}), "
                "not plain tensors and numbers; it is not a stackrec checkpoint or was tampered with"
            ) from err
        raise CheckpointError(f"{shown}: corrupt checkpoint file ({_first_line(text, skip_torch_advice=True)})") from err
    except PermissionError as err:
        raise CheckpointError(f"{shown}: cannot read the checkpoint file: permission denied") from err
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile, OSError) as err:
        # torch's zip reader reports a file cut short as EINVAL, an OSError like real I/O failures.
        if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):
            raise CheckpointError(f"{shown}: cannot read the checkpoint file: {err.strerror or err}") from err
        size = os.path.getsize(shown)
        what = "empty" if size == 0 else "truncated or corrupt"
        raise CheckpointError(f"{shown}: {what} checkpoint file ({size} bytes): {_first_line(str(err)) or type(err).__name__}") from err


def _first_line(text: str, skip_torch_advice: bool = False) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if skip_torch_advice:
        lines = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line]
    return lines[0].rstrip(".") if lines else ""


# -- errors raised inside Ray workers ------------------------------------------------------------


def unwrap_worker_error(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers, so the CLI can print its one line.

    Looks through ``ray.exceptions.RayTaskError`` (``.cause``), Ray Train v2's
    ``WorkerGroupError`` (``.worker_failures``: rank -> exception, lowest rank first),
    ``ControllerError`` (``.controller_failure``), ``UserExceptionWithTraceback``
    (``._base_exc``) and, for Ray's own exception types only, ``__cause__``. Returns the first
    :class:`StackrecError` found; else the innermost exception of the first chain; ``exc`` itself
    when it is not a Ray wrapper. Imports nothing from Ray.
    """
    first_leaf: BaseException | None = None
    stack = [exc]
    seen: set[int] = set()
    while stack:
        cur = stack.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        inner = _ray_inner(cur)
        if inner:
            stack = inner + stack  # depth first, in rank order
            continue
        if isinstance(cur, StackrecError):
            return cur
        if first_leaf is None:
            first_leaf = cur
    return first_leaf if first_leaf is not None else exc


def _ray_inner(exc: BaseException) -> list[BaseException]:
    """The exceptions a Ray wrapper holds (empty for anything that is not one)."""
    if not type(exc).__module__.startswith("ray") and not _is_ray_dual(exc):
        return []
    found: list[Any] = []
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        found += [failures[k] for k in sorted(failures, key=lambda k: (str(type(k)), k))]
    for attr in ("controller_failure", "_base_exc", "cause"):
        value = exc.__dict__.get(attr) if hasattr(exc, "__dict__") else None
        if value is not None:
            found.append(value)
    if exc.__cause__ is not None:
        found.append(exc.__cause__)
    return [e for e in found if isinstance(e, BaseException) and e is not exc]


def _is_ray_dual(exc: BaseException) -> bool:
    # RayTaskError(X) instances are of a class made at run time inside ray.exceptions.
    return any(c.__module__.startswith("ray.") for c in type(exc).__mro__[1:] if c.__name__ == "RayTaskError")
