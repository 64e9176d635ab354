"""What authentication costs: GET /v1/models in mode none, with one of our keys, and with a Hub token.

One invocation, for SQLite and for PostgreSQL: starts a real JupyterHub (to vouch for the Hub token), runs
the service on loopback as a separate process in each mode, drives the same fixed number of requests with
16 concurrent keep-alive clients straight at the service (the Hub's proxy would add the same cost to each),
the modes taking turns in several rounds, and prints requests/s. Then the p50 of one warm key check in-process. Last line:
`key_vs_none=<keyed throughput / none throughput, the lower of the two databases>` (the median of the ratios
measured round by round, the modes running back to back in each round).

    .venv/bin/python bench/auth_overhead.py [--requests 20000] [--clients 16] [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pg import temp_database  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


async def drive(port: int, path: str, headers: dict, total: int, clients: int) -> float:
    """Send `total` GETs over `clients` keep-alive connections; returns requests per second."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode()
    remaining = total

    async def client():
        nonlocal remaining
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while remaining > 0:
            remaining -= 1
            writer.write(request)
            status_line = await reader.readline()
            if b" 200 " not in status_line:
                raise RuntimeError(f"unexpected answer: {status_line!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total / (time.perf_counter() - start)


def start_hub(tmp: Path, service_port: int) -> tuple[subprocess.Popen, dict]:
    ports = {"public": free_port(), "hub": free_port(), "proxy_api": free_port()}
    tokens = {"admin": secrets.token_hex(32), "service": secrets.token_hex(32)}
    (tmp / "hub_config.py").write_text(f"""
c = get_config()
c.JupyterHub.bind_url = "http://127.0.0.1:{ports['public']}"
c.JupyterHub.hub_port = {ports['hub']}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{ports['proxy_api']}"
c.ConfigurableHTTPProxy.command = [{str(ROOT / '.node/node_modules/.bin/configurable-http-proxy')!r}]
c.ConfigurableHTTPProxy.pid_file = {str(tmp / 'proxy.pid')!r}
c.JupyterHub.db_url = "sqlite:///{tmp / 'hub.sqlite'}"
c.JupyterHub.log_level = "WARN"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.services = [
    {{"name": "admin", "api_token": {tokens['admin']!r}}},
    {{"name": "inference", "url": "http://127.0.0.1:{service_port}", "api_token": {tokens['service']!r}}},
]
c.JupyterHub.load_roles = [
    {{"name": "admin-svc", "services": ["admin"], "scopes": ["admin:users", "tokens"]}},
    {{"name": "inference-svc", "services": ["inference"], "scopes": ["list:users", "read:users", "read:roles:users"]}},
    {{"name": "user", "scopes": ["self", "access:services!service=inference"]}},
]
""")
    proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(tmp / "hub_config.py")], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{ports['public']}/hub/api/", 60)
    return proc, {**ports, **tokens}


def start_service(port: int, db_url: str, mode: str, hub: dict) -> subprocess.Popen:
    env = {**os.environ, "INFERENCE_IDENTITY": mode, "PYTHONUNBUFFERED": "1"}
    if mode == "hub":
        env.update({
            "JUPYTERHUB_API_TOKEN": hub["service"],
            "JUPYTERHUB_API_URL": f"http://127.0.0.1:{hub['hub']}/hub/api",
            "JUPYTERHUB_CLIENT_ID": "service-inference",
            "JUPYTERHUB_SERVICE_NAME": "inference",
            "JUPYTERHUB_SERVICE_PREFIX": "/",
        })
    proc = subprocess.Popen(
        [PY, "-m", "hub_extension", "serve", f"--port={port}", f"--db-url={db_url}", "--log-level=WARN",
         "--InferenceService.hub_token_cache_seconds=600", "--InferenceService.hub_sync_interval=600"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/health")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def measure_database(label: str, db_url: str, hub: dict, total: int, clients: int, rounds: int) -> dict:
    """Both services run side by side; the modes take turns for `rounds` rounds, so drift and noise on this
    shared machine fall on all of them alike. Each mode gets `total` requests in all."""
    user = f"bench-{secrets.token_hex(3)}"
    admin = {"Authorization": f"token {hub['admin']}"}
    requests.post(f"http://127.0.0.1:{hub['public']}/hub/api/users/{user}", headers=admin).raise_for_status()
    hub_token = requests.post(f"http://127.0.0.1:{hub['public']}/hub/api/users/{user}/tokens", headers=admin,
                              json={"note": "bench"}).json()["token"]
    none_port, hub_port = free_port(), hub["service_port"]
    procs = [start_service(none_port, db_url, "none", hub), start_service(hub_port, db_url, "hub", hub)]
    try:
        key = requests.post(f"http://127.0.0.1:{hub_port}/api/keys", json={"name": "bench"},
                            headers={"Authorization": f"token {hub_token}"}).json()["key"]
        modes = {
            "none": (none_port, {}),
            "hub-key": (hub_port, {"Authorization": f"Bearer {key}"}),
            "hub-token": (hub_port, {"Authorization": f"token {hub_token}"}),
        }
        rates: dict[str, list[float]] = {mode: [] for mode in modes}
        for port, headers in modes.values():
            asyncio.run(drive(port, "/v1/models", headers, 500, clients))  # warm-up: caches, connections
        per_round = total // rounds
        for _ in range(rounds):
            for mode, (port, headers) in modes.items():
                rates[mode].append(asyncio.run(drive(port, "/v1/models", headers, per_round, clients)))
    finally:
        for proc in procs:
            stop(proc)
    for mode, values in rates.items():
        overall = statistics.harmonic_mean(values)  # every round sent the same number of requests
        print(f"{label:<11} {mode:<10} {per_round * rounds} requests  {overall:8.0f} req/s", flush=True)
    # Ratios within each round (the modes ran back to back), then the median: drift cancels out.
    return {
        mode: statistics.median(r / n for r, n in zip(rates[mode], rates["none"], strict=True))
        for mode in ("hub-key", "hub-token")
    }


def key_check_p50_us(db_url: str) -> float:
    from hub_extension.api_keys import KeyManager
    from hub_extension.db import Database
    from hub_extension.users import UserDirectory

    async def run():
        db = Database(db_url)
        db.upgrade()
        users, keys = UserDirectory(db), KeyManager(db)
        state = await users.get_or_create("p50")
        secret, _ = await keys.create(state.id, **keys.validate_request({"name": "p50"}))
        await keys.check(secret)
        samples = []
        for _ in range(20000):
            t = time.perf_counter_ns()
            await keys.check(secret)
            samples.append(time.perf_counter_ns() - t)
        db.close()
        return statistics.median(samples) / 1000

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        service_port = free_port()
        hub_proc, hub = start_hub(tmp, service_port)
        hub["service_port"] = service_port
        try:
            ratios = {}
            with temp_database("jhi_bench") as pg:
                for label, url in (("sqlite", f"sqlite:///{tmp / 'bench.sqlite'}"), ("postgresql", pg)):
                    r = measure_database(label, url, hub, args.requests, args.clients, args.rounds)
                    ratios[label] = (r["hub-key"], r["hub-token"])
                    print(f"{label:<11} median per-round key/none={ratios[label][0]:.3f} "
                          f"hub_token/none={ratios[label][1]:.3f}")
            p50 = key_check_p50_us(f"sqlite:///{tmp / 'p50.sqlite'}")
            print(f"key_check_p50_us={p50:.1f}")
            print(json.dumps({k: [round(x, 3) for x in v] for k, v in ratios.items()}))
            print(f"key_vs_none={min(v[0] for v in ratios.values()):.3f}")
        finally:
            os.killpg(hub_proc.pid, signal.SIGTERM)
            hub_proc.wait(30)


if __name__ == "__main__":
    main()
