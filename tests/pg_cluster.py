"""A PostgreSQL cluster of a test's own (it may stop it: never the shared one on 5432), and the service as a
subprocess on any database with the Hub's API wherever the test says.

`own_cluster()` runs initdb from /usr/lib/postgresql/<newest>/bin into a temporary folder on a free port, as the
`postgres` user when the tests run as root (PostgreSQL refuses to run as root), with trust authentication on
127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from conftest import ROOT, clean_env, free_port, wait_for


def _bin(name: str) -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return str(versions[-1] / name)


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Cluster:
    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_owner([_bin("pg_ctl"), "-D", str(self.folder / "data"), "-w", "-t", "60", *args]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        self._ctl("-l", str(self.folder / "server.log"), "-o", f"-p {self.port} -k {self.folder} -h 127.0.0.1",
                  "start")

    def stop(self) -> None:
        """A fast shutdown: open sessions are ended, as when an administrator stops the server."""
        self._ctl("-m", "fast", "stop")

    def running(self) -> bool:
        return subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]).returncode == 0


@contextmanager
def own_cluster():
    """A fresh, running cluster on a free port; stopped and deleted on exit."""
    folder = Path(tempfile.mkdtemp(prefix="jhi_pg_"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run(
        _as_owner([_bin("initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync"]),
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    cluster = Cluster(folder, free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        if cluster.running():
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


# -- the service as a process ------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    url: str  # ending in '/'
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)  # the service must stop by itself; this only bounds the test
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"the service did not stop within {timeout}s:\n{self.output()[-3000:]}") from None


def start_service(tmp_path: Path, db_url: str, *args: str, env: dict | None = None, name: str = "svc",
                  wait: bool = True) -> ServiceProcess:
    """`python -m hub_extension serve` on a free port with `db_url`; returns once /health answers (if `wait`)."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub_extension", "serve", f"--port={port}", f"--db-url={db_url}",
         f"--InferenceService.cookie_secret_file={tmp_path / 'cookie-secret'}", *args],
        cwd=ROOT, env={**clean_env(), "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    service = ServiceProcess(proc, f"http://127.0.0.1:{port}/", log)
    if wait:
        try:
            wait_for(lambda: proc.poll() is None and requests.get(service.url + "health", timeout=2).ok, 90, 0.2,
                     "service")
        except TimeoutError:
            service.stop(signal.SIGKILL)
            raise AssertionError(service.output()[-3000:]) from None
    return service


def poll(predicate, timeout: float = 15.0, what: str = "condition"):
    """`wait_for` with a short interval, for "eventually" checks that must hold well inside a cache's lifetime."""
    start = time.monotonic()
    value = wait_for(predicate, timeout, 0.05, what)
    return value, time.monotonic() - start
