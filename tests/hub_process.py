"""Starting and stopping a real JupyterHub process for tests and benchmarks (no pytest here: bench/ uses it too)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / ".node/node_modules/.bin/configurable-http-proxy"


def hub_base_config(tmp: Path, ports: dict) -> str:
    """What every test Hub's config shares: the checkout importable, loopback ports, its proxy, its own SQLite
    database and cookie secret; `c` defined. The caller adds the authenticator, the service and the rest."""
    return f"""
import sys
sys.path.insert(0, {str(ROOT)!r})

c = get_config()
c.JupyterHub.bind_url = "http://127.0.0.1:{ports['public']}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {ports['hub']}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports['proxy_api']}"
c.ConfigurableHTTPProxy.command = [{str(PROXY)!r}]
c.ConfigurableHTTPProxy.pid_file = {str(tmp / 'proxy.pid')!r}
c.JupyterHub.db_url = "sqlite:///{tmp / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret = bytes.fromhex({secrets.token_hex(32)!r})
"""


def start_hub(tmp: Path, config: str, env: dict) -> subprocess.Popen:
    """`jupyterhub` on `config` (written to tmp/jupyterhub_config.py), its output in tmp/hub.log."""
    (tmp / "jupyterhub_config.py").write_text(config)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(tmp / "jupyterhub_config.py")],
        cwd=tmp, env=env, stdout=open(tmp / "hub.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def stop_hub(proc: subprocess.Popen, proxy_pid_file: Path, *, cmdline_marker: str = "", env_marker: str = "",
             wait: float = 30) -> None:
    """SIGTERM to the Hub's process group (the Hub stops its servers and services), then whatever it left
    running (see `left_behind`)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for pid in left_behind(proxy_pid_file, cmdline_marker, env_marker):
        os.kill(pid, signal.SIGTERM)


def left_behind(proxy_pid_file: Path, cmdline_marker: str = "", env_marker: str = "") -> list[int]:
    """What a Hub that did not stop cleanly left running: its proxy (its pid file outlives it), the service it
    started (`cmdline_marker` in its command line, e.g. its port) and single-user servers, their kernels and
    Hub-managed services (`env_marker` in their environment, e.g. the Hub's API URL). Only processes we started."""
    pids = []
    if proxy_pid_file.exists():
        pids.append(int(proxy_pid_file.read_text().strip() or 0))
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (
                cmdline_marker and cmdline_marker.encode() in (entry / "cmdline").read_bytes()
                or env_marker and (env_marker.encode() + b"\0") in (entry / "environ").read_bytes()
            ):
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return [pid for pid in pids if pid > 0 and pid != os.getpid() and Path(f"/proc/{pid}").exists()]
