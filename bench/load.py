"""Load that is held: 200 concurrent clients on loopback, twice, and the service's memory before and after.

    .venv/bin/python bench/load.py [--clients 200] [--seconds 30] [--sqlite] [--kinds models,key_check,chat_stream]

Starts a real JupyterHub (to vouch for the user whose key is used) and the service as its own process in Hub
mode on PostgreSQL (a database of its own; `--sqlite` for SQLite) serving the tiny chat model (built offline,
as the tests build it). A client process opens `--clients` keep-alive connections at once (timed as `connect`),
then each client takes turns for `--seconds` at three requests, all with one of the service's keys:
`GET /v1/models`, `GET /api/me` (a key check and nothing else) and a streamed `POST /v1/chat/completions` of 8
tokens. The whole run happens twice. The client speaks HTTP/1.1 on asyncio streams: httpx, at 200 connections,
tops out near 100 requests/s here and would measure itself.

Prints, per run and request kind, p50/p99 latency (a stream: to `[DONE]`), throughput and errors (anything but
a 200 with a whole answer), the service's resident memory (RSS) before the first run, after the first and after
the second, and the growth across the two runs. Last line: `errors=<count over both runs>`. Goals: 0 errors
and memory that does not grow from the first run to the second.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from auth_overhead import free_port, start_hub, stop, wait_http  # noqa: E402
from pg import temp_database  # noqa: E402

PY = sys.executable
CHAT_TOKENS = 8
KINDS = ("models", "key_check", "chat_stream")
MODELS = """\
defaults:
  dtype: float32
  context_length: 512
models:
  - name: tiny-chat
    source: {tiny}
    task: chat
    engine: continuous
    max_concurrency: 64
    max_queue: 512
    default_max_tokens: 64
"""

# The clients: argv base key clients seconds; prints one JSON object of results.
CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    from urllib.parse import urlsplit
    base, key, clients, seconds, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    kinds = tuple(sys.argv[6].split(","))
    url = urlsplit(base)
    chat = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "Tell me about modules."}],
                       "max_tokens": tokens, "stream": True}).encode()

    def request(method, path, body=b"", auth=True):
        head = f"{method} {url.path}{path} HTTP/1.1\\r\\nHost: {url.netloc}\\r\\n"
        if auth:
            head += f"Authorization: Bearer {key}\\r\\n"
        if body:
            head += f"Content-Type: application/json\\r\\nContent-Length: {len(body)}\\r\\n"
        return (head + "\\r\\n").encode() + body

    REQUESTS = {"health": request("GET", "health", auth=False), "models": request("GET", "v1/models"),
                "key_check": request("GET", "api/me"), "chat_stream": request("POST", "v1/chat/completions", chat)}
    latencies = {kind: [] for kind in kinds}
    errors = {kind: 0 for kind in kinds}
    samples, connects = [], []

    async def answer(reader):
        \"\"\"Status and body of one HTTP/1.1 answer (Content-Length or chunked, as Tornado streams).\"\"\"
        status = int((await reader.readline()).split()[1])
        length, chunked = 0, False
        while (line := await reader.readline()) not in (b"\\r\\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await reader.readexactly(length)
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readline()
        return status, b"".join(parts)

    def whole(kind, status, body):
        if status != 200:
            return False
        if kind == "chat_stream":
            return body.rstrip().endswith(b"data: [DONE]")
        if kind == "key_check":
            return json.loads(body)["authenticated_via"] == "api_key"
        return kind != "models" or bool(json.loads(body)["data"])

    async def client(i, deadline):
        t0 = time.perf_counter()  # the connection first (all clients at once), timed on its own
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(REQUESTS["health"])
            status, _ = await answer(reader)
            assert status == 200, status
            connects.append(time.perf_counter() - t0)
        except Exception as e:
            errors["connect"] = errors.get("connect", 0) + 1
            samples.append(f"connect: {e!r}")
            return
        n = i
        while time.monotonic() < deadline:
            kind = kinds[n % len(kinds)]
            n += 1
            t0 = time.perf_counter()
            try:
                writer.write(REQUESTS[kind])
                status, body = await answer(reader)
                ok = whole(kind, status, body)
            except Exception as e:
                ok, status, body = False, repr(e), b""
            if ok:
                latencies[kind].append(time.perf_counter() - t0)
            else:
                errors[kind] += 1
                if len(samples) < 5:
                    samples.append(f"{kind}: {status} {body[:200]!r}")
                if not isinstance(status, int):  # the connection is gone: a new one
                    writer.close()
                    try:
                        reader, writer = await asyncio.open_connection(url.hostname, url.port)
                    except OSError:
                        return
        writer.close()

    async def main():
        t0 = time.monotonic()
        await asyncio.gather(*(client(i, t0 + seconds) for i in range(clients)))
        elapsed = time.monotonic() - t0
        print(json.dumps({"latencies": latencies, "errors": errors, "seconds": elapsed, "samples": samples,
                          "connects": connects}))

    asyncio.run(main())
""")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start_service(port: int, db_url: str, models: Path, hub: dict) -> subprocess.Popen:
    env = {**os.environ, "INFERENCE_IDENTITY": "hub", "PYTHONUNBUFFERED": "1", "INFERENCE_CONFIG": "",
           "JUPYTERHUB_API_TOKEN": hub["service"], "JUPYTERHUB_API_URL": f"http://127.0.0.1:{hub['hub']}/hub/api",
           "JUPYTERHUB_CLIENT_ID": "service-inference", "JUPYTERHUB_SERVICE_NAME": "inference",
           "JUPYTERHUB_SERVICE_PREFIX": "/"}
    proc = subprocess.Popen(
        [PY, "-m", "hub_extension", "serve", f"--port={port}", f"--db-url={db_url}", f"--models={models}",
         "--log-level=WARN", "--InferenceService.cookie_secret_file=" + str(models.parent / "cookie-secret")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{port}/health", 120)
    return proc


def run_load(base: str, key: str, clients: int, seconds: float, kinds: str = ",".join(KINDS)) -> dict:
    out = subprocess.run([PY, "-c", CLIENT, base, key, str(clients), str(seconds), str(CHAT_TOKENS), kinds],
                         capture_output=True, text=True, timeout=seconds + 300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout)


def report(label: str, result: dict) -> int:
    total_ok = sum(len(v) for v in result["latencies"].values())
    total_errors = sum(result["errors"].values())
    print(f"{label}: {total_ok + total_errors} requests in {result['seconds']:.1f} s, "
          f"{(total_ok + total_errors) / result['seconds']:.0f} req/s, {total_errors} errors")
    for kind, values in result["latencies"].items():
        if not values and not result["errors"].get(kind):
            continue
        print(f"  {kind:<12} {len(values):6d} ok {result['errors'][kind]:4d} errors  "
              f"p50 {1000 * percentile(values, 0.5):7.1f} ms  p99 {1000 * percentile(values, 0.99):7.1f} ms  "
              f"{len(values) / result['seconds']:7.1f} req/s")
    connects = result["connects"]
    print(f"  {'connect':<12} {len(connects):6d} ok {result['errors'].get('connect', 0):4d} errors  "
          f"p50 {1000 * percentile(connects, 0.5):7.1f} ms  p99 {1000 * percentile(connects, 0.99):7.1f} ms  "
          "(each client's first request, all at once)")
    for sample in result["samples"]:
        print(f"  error: {sample}")
    return total_errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="the requests clients take turns at, comma-separated (also `health`: a baseline)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hub_extension.engine.tiny_model import build

    with tempfile.TemporaryDirectory() as tmp_name, temp_database("jhi_bench_load") as pg_url:
        tmp = Path(tmp_name)
        models = tmp / "models.yaml"
        models.write_text(MODELS.format(tiny=build(tmp / "tiny-model", "tiny")))
        db_url = f"sqlite:///{tmp / 'load.sqlite'}" if args.sqlite else pg_url
        port = free_port()
        hub_proc, hub = start_hub(tmp, port)
        service = None
        try:
            admin = {"Authorization": f"token {hub['admin']}"}
            user = f"load-{secrets.token_hex(3)}"
            hub_api = f"http://127.0.0.1:{hub['public']}/hub/api"
            requests.post(f"{hub_api}/users/{user}", headers=admin, timeout=30).raise_for_status()
            token = requests.post(f"{hub_api}/users/{user}/tokens", headers=admin, json={"note": "load"},
                                  timeout=30).json()["token"]
            service = start_service(port, db_url, models, hub)
            base = f"http://127.0.0.1:{port}/"
            key = requests.post(base + "api/keys", json={"name": "load"}, timeout=30,
                                headers={"Authorization": f"token {token}"}).json()["key"]
            run_load(base, key, 8, 3)  # warm-up: the model's first batches, the caches, the connections
            before = rss_mib(service.pid)
            errors = report("run 1", run_load(base, key, args.clients, args.seconds, args.kinds))
            after_first = rss_mib(service.pid)
            errors += report("run 2", run_load(base, key, args.clients, args.seconds, args.kinds))
            after_second = rss_mib(service.pid)
            print(f"service RSS: {before:.1f} MiB before, {after_first:.1f} MiB after run 1, "
                  f"{after_second:.1f} MiB after run 2; growth across the two runs "
                  f"{after_second - after_first:+.1f} MiB ({100 * (after_second - after_first) / after_first:+.1f}%)")
        finally:
            if service is not None:
                stop(service)
            os.killpg(hub_proc.pid, 15)
            hub_proc.wait(30)
    print(f"errors={errors}")


if __name__ == "__main__":
    main()
