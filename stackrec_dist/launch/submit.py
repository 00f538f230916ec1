"""Submit a ``stackrec train`` job to a running Ray cluster through Ray's job server.

``stackrec submit --config configs/X.yaml [--set a.b=c ...] [--address URL] [--wait]`` packs the
repository (minus virtual envs, run outputs and data caches) as the job's ``working_dir``, runs
``python -m stackrec_dist.cli train --config <relative path> [--set ...]`` on the cluster and, with
``--wait``, streams its logs and turns the final job status into the exit code.

Secrets: by default no credential leaves this machine; the cluster's nodes bring their own
(Kubernetes Secret via ``secretKeyRef``, instance role, node environment). ``--forward-credentials``
copies ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` from the *submitting*
shell's environment into the job's ``runtime_env.env_vars``. This module never writes them to a file
and never prints them: every repr, log line and tailed log chunk passes through :class:`Redactor`.
Ray itself, however, records a job's runtime_env *with values* in ``runtime_env_agent.log`` on each
node that builds the environment, and keeps it in the GCS job table (the jobs HTTP API returns it to
non-browser clients). Forward only to clusters whose logs you would trust with the key, preferably
with short-lived session credentials. Verified against ray 2.60 in tests/launch; see
docs/deployment.md.

Ray API used (checked against the installed ray 2.60): ``ray.job_submission.JobSubmissionClient``
with ``submit_job(entrypoint=, runtime_env=, submission_id=, metadata=, entrypoint_num_cpus=,
entrypoint_num_gpus=)``, ``get_job_status``, ``get_job_logs`` and the async ``tail_job_logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from stackrec_dist.console import RESULT_PREFIX

log = logging.getLogger("stackrec.submit")

#: Environment variables whose *values* are secret: forwarded to the job, masked everywhere.
SECRET_ENV_VARS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
#: Non-secret S3 settings forwarded alongside the credentials when set.
PLAIN_ENV_VARS: tuple[str, ...] = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
#: Paths (gitignore syntax, relative to working_dir) never uploaded with the job.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git/",
    ".venv/",
    "venv/",
    "runs/",
    "/data/",
    ".cache/",
    ".pytest_cache/",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    "build/",
    "dist/",
    "*.parquet",
    "*.pt",
    "*.ckpt",
)
MASK = "****"
_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class SubmitError(RuntimeError):
    """The job could not be built or submitted (bad path, no cluster address, ...)."""


class Redactor:
    """Replaces every known secret value in a string by ``****``."""

    def __init__(self, secrets: Sequence[str] = ()):
        # Longest first so a secret that contains another is masked whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text


@dataclass
class SubmitArgs:
    """Everything ``JobSubmissionClient.submit_job`` receives. ``repr`` masks secret env values."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    secret_keys: tuple[str, ...] = ()

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"entrypoint": self.entrypoint, "runtime_env": self.runtime_env}
        for name in ("submission_id", "entrypoint_num_cpus", "entrypoint_num_gpus"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.metadata:
            kwargs["metadata"] = dict(self.metadata)
        return kwargs

    def masked_runtime_env(self) -> dict[str, Any]:
        env = dict(self.runtime_env)
        if "env_vars" in env:
            env["env_vars"] = {
                k: (MASK if k in self.secret_keys else v) for k, v in env["env_vars"].items()
            }
        return env

    def __repr__(self) -> str:
        return (
            f"SubmitArgs(entrypoint={self.entrypoint!r}, runtime_env={self.masked_runtime_env()!r}, "
            f"submission_id={self.submission_id!r}, metadata={self.metadata!r}, "
            f"entrypoint_num_cpus={self.entrypoint_num_cpus!r}, "
            f"entrypoint_num_gpus={self.entrypoint_num_gpus!r})"
        )

    __str__ = __repr__


def train_entrypoint(config_rel: str, overrides: Sequence[str] = (), python: str = "python") -> str:
    """``python -m stackrec_dist.cli train --config <rel> [--set a.b=c ...]``, shell-quoted."""
    parts = [python, "-m", "stackrec_dist.cli", "train", "--config", config_rel]
    for text in overrides:
        if "=" not in text:
            raise SubmitError(f"override {text!r} must look like section.field=value")
        parts += ["--set", text]
    return " ".join(shlex.quote(p) for p in parts)


def build_submit_args(
    config_path: str | os.PathLike | None,
    working_dir: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    forward_credentials: bool = False,
    extra_env: Mapping[str, str] | None = None,
    extra_pip: Sequence[str] = (),
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    entrypoint: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    python: str = "python",
) -> SubmitArgs:
    """Pure: build the job (entrypoint + runtime_env) without touching the network or os.environ.

    ``config_path`` must lie inside ``working_dir``; the entrypoint names it relative to the
    working dir, which is the job's cwd on the cluster. ``entrypoint`` replaces the train command
    (then ``config_path`` may be None). ``environ`` is where credentials are read from; the caller
    passes ``os.environ`` (tests pass a dict). Only :data:`SECRET_ENV_VARS` and
    :data:`PLAIN_ENV_VARS` are forwarded, plus ``extra_env``.
    """
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise SubmitError(f"working_dir {working_dir} is not a directory")

    config_rel = None
    if config_path is not None:
        cfg = Path(config_path)
        cfg = (cfg if cfg.is_absolute() else Path.cwd() / cfg).resolve()
        if not cfg.is_file():
            # Also accept a path given relative to the working dir.
            alt = (root / Path(config_path)).resolve()
            if alt.is_file():
                cfg = alt
            else:
                raise SubmitError(f"config file {config_path} does not exist")
        try:
            config_rel = cfg.relative_to(root).as_posix()
        except ValueError:
            raise SubmitError(
                f"config {cfg} is outside working_dir {root}: the job could not read it on the cluster"
            ) from None
        top = config_rel.split("/", 1)[0] + "/"
        if top in {e.lstrip("/") for e in excludes}:
            raise SubmitError(f"config {config_rel} lies under excluded {top}: it would not be uploaded")

    if entrypoint is None:
        if config_rel is None:
            raise SubmitError("a config path is required unless an explicit entrypoint is given")
        entrypoint = train_entrypoint(config_rel, overrides, python=python)
    elif overrides:
        raise SubmitError("overrides apply to the train entrypoint; put them in the explicit entrypoint")

    env_vars: dict[str, str] = {}
    secret_keys: list[str] = []
    source = environ if environ is not None else {}
    if forward_credentials:
        for key in SECRET_ENV_VARS:
            if source.get(key):
                env_vars[key] = source[key]
                secret_keys.append(key)
        for key in PLAIN_ENV_VARS:
            if source.get(key):
                env_vars[key] = source[key]
    for key, value in (extra_env or {}).items():
        if not isinstance(value, str):
            raise SubmitError(f"env var {key} must be a string (got {type(value).__name__})")
        env_vars[key] = value
        if key in SECRET_ENV_VARS and key not in secret_keys:
            secret_keys.append(key)

    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": list(excludes)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if extra_pip:
        runtime_env["pip"] = list(extra_pip)

    metadata = {"tool": "stackrec submit"}
    if config_rel:
        metadata["config"] = config_rel
    return SubmitArgs(
        entrypoint=entrypoint,
        runtime_env=runtime_env,
        submission_id=submission_id,
        metadata=metadata,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        secret_keys=tuple(secret_keys),
    )


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Explicit address > RAY_API_SERVER_ADDRESS > RAY_ADDRESS; error when none is given.

    Accepts a dashboard URL (``http://head:8265``), a Ray Client URL (``ray://head:10001``) or a
    GCS address (``head:6379``, resolved to the dashboard by Ray).
    """
    environ = os.environ if environ is None else environ
    if address:
        return address
    for name in _ADDRESS_ENV_VARS:
        if environ.get(name):
            return environ[name]
    raise SubmitError(
        "no Ray cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS "
        "(use `stackrec train` to run on an embedded local Ray instead)"
    )


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override an explicit address; hide it while connecting."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def make_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    with _address_env_cleared():
        return JobSubmissionClient(address)


def parse_result(logs: str) -> dict[str, Any] | None:
    """The last ``STACKREC_RESULT {...}`` line of a job's logs (or a bare JSON object line)."""
    fallback = None
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                continue
        if fallback is None and line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                fallback = value
    return fallback


def _tail(client: Any, job_id: str, redact: Redactor, out, timeout_s: float | None) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(redact(chunk))
            out.flush()

    asyncio.run(asyncio.wait_for(follow(), timeout_s))


def wait_for_job(
    client: Any,
    job_id: str,
    *,
    follow_logs: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    redact: Redactor | None = None,
    out=None,
) -> str:
    """Block until the job is terminal (tailing its logs to ``out``); return the status string."""
    redact = redact or Redactor()
    out = out or sys.stdout
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    if follow_logs:
        try:
            _tail(client, job_id, redact, out, timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            pass  # the status check below reports it
        except Exception as err:  # the stream can drop; the status poll below still decides
            log.warning("log tail for %s ended early: %s", job_id, redact(str(err)))
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {status} after {timeout_s} s (it keeps running; "
                f"stop it with `ray job stop {job_id}`)"
            )
        time.sleep(poll_s)


def submit(
    config_path: str | os.PathLike | None,
    address: str | None = None,
    overrides: Sequence[str] = (),
    working_dir: str | os.PathLike | None = None,
    wait: bool = False,
    *,
    extra_pip: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    forward_credentials: bool = False,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    entrypoint: str | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    timeout_s: float | None = None,
    follow_logs: bool = True,
    validate_config: bool = True,
    out=None,
) -> str | tuple[str, str]:
    """Submit the job; return its submission id, or ``(job_id, final status)`` when ``wait``."""
    working_dir = Path(working_dir) if working_dir is not None else repo_root()
    args = build_submit_args(
        config_path,
        working_dir,
        overrides,
        environ=os.environ,
        forward_credentials=forward_credentials,
        extra_env=extra_env,
        extra_pip=extra_pip,
        excludes=excludes,
        entrypoint=entrypoint,
        submission_id=submission_id,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )
    if entrypoint is None and validate_config:
        check_config(config_path, working_dir, overrides)
    redact = Redactor([args.runtime_env.get("env_vars", {})[k] for k in args.secret_keys])
    target = resolve_address(address)
    if args.secret_keys:
        log.warning(
            "forwarding %s to the job: Ray records runtime_env values in the cluster's "
            "runtime_env_agent.log and job table", ", ".join(args.secret_keys))
    log.info("submitting to %s: %r", redact(target), args)
    try:
        client = make_client(target)
    except Exception as err:  # refused, 401 with token auth, version mismatch: Ray's message says which
        raise SubmitError(redact(f"cannot use the Ray job server at {target}: {err}")) from None
    try:
        job_id = client.submit_job(**args.client_kwargs())
    except Exception as err:  # Ray's errors may echo the request: never let a secret through
        raise SubmitError(redact(f"job submission failed: {err}")) from None
    log.info("submitted job %s", job_id)
    if not wait:
        return job_id
    status = wait_for_job(
        client, job_id, follow_logs=follow_logs, timeout_s=timeout_s, redact=redact, out=out
    )
    log.info("job %s finished: %s", job_id, status)
    return job_id, status


def repo_root() -> Path:
    """Default working_dir: the checkout this module lives in, or the cwd for an installed package."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def check_config(config_path: str | os.PathLike, working_dir: str | os.PathLike,
                 overrides: Sequence[str]) -> None:
    """Load the job config with its overrides here, so a typo fails before the cluster is used."""
    from stackrec_dist.config import ConfigError, load_config

    path = Path(config_path)
    if not path.is_absolute() and not path.exists():
        path = Path(working_dir) / path
    try:
        load_config(path, list(overrides))
    except ConfigError as err:
        raise SubmitError(f"config error: {err}") from None


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``stackrec submit`` (also used by launch/submit.py)."""
    parser.add_argument("--config", "-c", required=False, help="job YAML inside the working dir, e.g. configs/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                        help="config override passed to `stackrec train` (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray dashboard URL http://<head>:8265 (default: RAY_API_SERVER_ADDRESS / RAY_ADDRESS)")
    parser.add_argument("--working-dir", default=None, help="directory uploaded with the job (default: repo root)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="extra gitignore-style pattern left out of the upload (repeatable)")
    parser.add_argument("--pip", dest="extra_pip", action="append", default=[], metavar="REQ",
                        help="extra pip requirement installed for the job (repeatable)")
    parser.add_argument("--env", dest="extra_env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra non-secret env var for the job (repeatable)")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="copy AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN from this shell "
                             "into the job's env (Ray logs them in runtime_env_agent.log on the cluster)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None,
                        help="GPUs reserved for the driver process (default 0)")
    parser.add_argument("--submission-id", default=None, help="job id to use (default: generated by Ray)")
    parser.add_argument("--wait", action="store_true", help="tail the logs and exit non-zero unless the job succeeds")
    parser.add_argument("--timeout", type=float, default=None, help="with --wait: give up after N seconds")
    parser.add_argument("--entrypoint", default=None, help=argparse.SUPPRESS)  # tests / debugging


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {pair!r} must look like KEY=VALUE")
        if key in SECRET_ENV_VARS:
            raise SubmitError(f"--env {key}=...: put secrets in the environment, not on the command line")
        env[key] = value
    return env


def run(args: argparse.Namespace) -> int:
    """``stackrec submit``: 0 when submitted (or, with --wait, when the job SUCCEEDED)."""
    try:
        excludes = tuple(DEFAULT_EXCLUDES) + tuple(args.exclude)
        result = submit(
            args.config,
            address=args.address,
            overrides=args.overrides,
            working_dir=args.working_dir,
            wait=args.wait,
            extra_pip=args.extra_pip,
            extra_env=_parse_env(args.extra_env),
            forward_credentials=args.forward_credentials,
            excludes=excludes,
            entrypoint=args.entrypoint,
            submission_id=args.submission_id,
            entrypoint_num_gpus=args.entrypoint_num_gpus,
            timeout_s=args.timeout,
        )
    except (SubmitError, TimeoutError, ConnectionError) as err:
        print(f"stackrec submit: {err}", file=sys.stderr)
        return 2
    if not args.wait:
        print(f"submitted job {result}")
        return 0
    job_id, status = result
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stackrec submit", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
