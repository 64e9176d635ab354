"""What recording usage costs: a cheap metered request with the usage recorder on and off, interleaved.

    .venv/bin/python bench/usage.py [--requests 40000] [--clients 32] [--rounds 10]

The service runs in this process (identity mode `none`, no models) on SQLite, then on PostgreSQL. The request
is `POST /v1/chat/completions` for a model that does not exist: authenticated, parsed, refused with a 404 and
metered like any other, and so cheap that the recorder's share of it is as large as it can be. A separate client
process sends it over keep-alive connections. Round by round the same service runs with the usage sink on
(`UsageRecorder.record`, flushed as in production: every `flush_interval` and every `batch_size` events) and off
(no usage sink), in alternating order; an "on" round is charged the flush of its last events too.

Prints requests/s for both, database transactions per metered request, and as its last line
`usage_on_vs_off=<median of the per-round ratios, the lower of the two databases>`.
Goals: >= 0.95, and at most one transaction per 20 requests under load.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pg import temp_database  # noqa: E402

PATH = "/v1/chat/completions"
BODY = b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'

# Reads a number of requests per line on stdin, sends them over `clients` keep-alive connections, prints req/s.
CLIENT = textwrap.dedent("""
    import asyncio, re, sys, time
    port, clients, path, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
    request = (f"POST {path} HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Type: application/json\\r\\n"
               f"Content-Length: {len(body)}\\r\\n\\r\\n").encode() + body
    LENGTH = re.compile(rb"(?i)\\r\\ncontent-length: *(\\d+)")
    async def main():
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            remaining = int(line)
            async def client(reader, writer):
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    writer.write(request)
                    head = await reader.readuntil(b"\\r\\n\\r\\n")
                    if not head.startswith(b"HTTP/1.1 404 "):
                        raise RuntimeError(f"unexpected answer: {head!r}")
                    await reader.readexactly(int(LENGTH.search(head)[1]))
            t0 = time.perf_counter()
            await asyncio.gather(*(client(r, w) for r, w in conns))
            print(time.perf_counter() - t0, flush=True)
    asyncio.run(main())
""")


async def serve(db_url: str):
    """The service in this process, identity `none`, no models; (service, port)."""
    from tornado import httpserver, testing
    from traitlets.config import Config

    from hub_extension.app import InferenceService

    config = Config()
    config.IdentityProvider.mode = "none"
    service = InferenceService(config=config, db_url=db_url, ip="127.0.0.1")
    # Not the access log line of every 404: it would cost more than what is measured here.
    logging.getLogger("hub_extension.access").setLevel(logging.ERROR)
    app = service.make_app()
    sock, port = testing.bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    return service, server, port


async def measure(label: str, db_url: str, total: int, clients: int, rounds: int) -> float:
    from sqlalchemy import event

    service, server, port = await serve(db_url)
    services = service.services
    usage = services.usage
    commits = [0]
    event.listen(services.db.engine, "commit", lambda _conn: commits.__setitem__(0, commits[0] + 1))
    flusher = asyncio.ensure_future(service._periodic(usage.flush_interval, usage.flush))
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), str(clients), PATH, BODY.decode(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )

    async def round_trip(n: int, on: bool) -> float:
        """Requests per second of one round; an "on" round includes writing its last events."""
        services.usage_sinks = [usage.record] if on else []
        client.stdin.write(f"{n}\n".encode())
        await client.stdin.drain()
        seconds = float(await client.stdout.readline())
        t0 = time.perf_counter()
        await usage.flush()
        return n / (seconds + (time.perf_counter() - t0 if on else 0.0))

    try:
        await round_trip(2000, True)  # warm-up: connections, code paths, the database
        await round_trip(2000, False)
        per_round = total // rounds
        rates: dict[bool, list[float]] = {True: [], False: []}
        commits[0], written = 0, usage.written
        for i in range(rounds):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                rates[on].append(await round_trip(per_round, on))
        transactions, metered = commits[0], usage.written - written
    finally:
        client.stdin.close()
        await client.wait()
        flusher.cancel()
        server.stop()
        services.db.close()
    ratios = [on / off for on, off in zip(rates[True], rates[False], strict=True)]
    for on, name in ((True, "on"), (False, "off")):
        print(f"{label:<11} usage {name:<3} {per_round * rounds} requests  "
              f"{statistics.harmonic_mean(rates[on]):8.0f} req/s", flush=True)
    print(f"{label:<11} {metered} metered requests, {transactions} database transactions: "
          f"{transactions / max(metered, 1):.4f} per request (one per {metered / max(transactions, 1):.0f}); "
          f"dropped {usage.dropped}; median per-round on/off={statistics.median(ratios):.3f}", flush=True)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40000, help="requests per mode and database")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp, temp_database("jhi_bench_usage") as pg:
        for label, url in (("sqlite", f"sqlite:///{Path(tmp) / 'bench.sqlite'}"), ("postgresql", pg)):
            ratios[label] = asyncio.run(measure(label, url, args.requests, args.clients, args.rounds))
    print(f"usage_on_vs_off={min(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
