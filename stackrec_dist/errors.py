"""The error classes a user can meet, each with its own exit code.

Every error that is the user's to fix (bad config, bad data, bad checkpoint, unreachable storage,
missing device, a run that cannot train) derives from :class:`StackrecError`. ``stackrec`` prints
such an error as one line ``stackrec: <kind> error: <message>`` and exits with the class's code;
the traceback is shown only under ``--debug``. Anything else is a bug and is shown in full.

The message names *where*: the file, row group, row or config field, so it can be acted on
without a debugger. ``docs/errors.md`` lists the classes and what to do about each.
"""

from __future__ import annotations


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


def unwrap_worker_error(err: BaseException) -> BaseException:
    """The first :class:`StackrecError` inside Ray's wrappers (task errors, worker-group errors),
    so that an input error raised in a worker reaches the user as its own one line."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        current = stack.pop(0)
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        if isinstance(current, StackrecError):
            return current
        for attr in ("cause", "__cause__", "__context__"):
            inner = getattr(current, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        for attr in ("worker_failures", "errors"):
            inner = getattr(current, attr, None)
            if isinstance(inner, dict):
                stack.extend(v for v in inner.values() if isinstance(v, BaseException))
            elif isinstance(inner, (list, tuple)):
                stack.extend(v for v in inner if isinstance(v, BaseException))
    return err
