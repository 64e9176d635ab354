"""Hostile-input benchmark: do ordinary streams keep their pace while hostile requests arrive beside them?

    .venv/bin/python bench/hostile.py [--params 30M] [--requests 16] [--tokens 64]

Serves the demo-sized random Llama (built or reused as bench/engine.py does) and MiniLM in this process
(identity mode `none`), then, back to back in one run:
(1) N greedy streams of T tokens through HTTP + the openai SDK, alone;
(2) the same N streams while one 7 MiB chat prompt, one 5,000-input embedding request (refused: over the
    2,048-input cap) and one seeded sampling request (256 tokens) arrive alongside them (with
    --served-embedding also a 2,048-input embedding request, which is served: real work on the same cores), and another client polls GET /health every 50 ms;
for --rounds rounds. Prints the streams' tokens/s in both phases and their ratio, each hostile request's
status and time, and the worst event-loop lag the service saw in each phase; then the median ratio and the
/health p99. The last line is `worst_loop_lag_ms=<the worst lag of the hostile phases>`.
Goals: lag <= 100 ms, the streams keep >= 0.7 of their tokens/s beside the hostile requests.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402  (bench/engine.py: model, config, in-process service, stream client)

HOSTILE = textwrap.dedent("""
    import asyncio, json, sys, time
    import httpx
    base, model, embedder, served_embedding = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    bodies = {
        "7 MiB chat prompt": ("/chat/completions", {"model": model, "max_tokens": 16,
                              "messages": [{"role": "user", "content": "x" * (7 << 20)}]}),
        "5,000-input embedding": ("/embeddings", {"model": embedder,
                                  "input": [f"Sentence {i} says something about the json module." for i in range(5000)]}),
        "seeded sampling, 256 tokens": ("/chat/completions", {"model": model, "max_tokens": 256, "temperature": 0.8,
                                        "seed": 7, "messages": [{"role": "user", "content": "Tell me a story."}]}),
    }
    if served_embedding:
        bodies["2,048-input embedding (the most allowed)"] = ("/embeddings", {"model": embedder,
            "input": [f"Sentence {i} says something about the json module." for i in range(2048)]})
    encoded = {name: (path, json.dumps(body).encode()) for name, (path, body) in bodies.items()}
    async def send(client, name, path, content):
        t0 = time.perf_counter()
        r = await client.post(base + path, content=content, headers={"content-type": "application/json"})
        code = r.json()["error"]["code"] if r.status_code >= 400 else None
        return name, {"status": r.status_code, "code": code, "seconds": time.perf_counter() - t0}
    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            results = await asyncio.gather(*(send(client, n, p, c) for n, (p, c) in encoded.items()))
        print(json.dumps(dict(results)))
    asyncio.run(main())
""")

HEALTH = textwrap.dedent("""
    import json, sys, threading, time
    import httpx
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    latencies = []
    with httpx.Client(timeout=600) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get(sys.argv[1]).raise_for_status()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    print(json.dumps(latencies))
""")


async def client(script: str, *argv: str, stdin: bytes | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


async def streams(base: str, args, chats: list) -> dict:
    proc = await client(engine.CLIENT, base, "bench-chat", str(args.requests), str(args.tokens))
    out, _ = await proc.communicate(json.dumps(chats).encode())
    return json.loads(out)


async def main(args) -> None:
    from hub_extension.engine import SamplingParams

    model_dir = engine.bench_model(args)
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    config = work / "models.yaml"
    engine.write_config(model_dir, args, config, slots=args.requests + 1)  # + the seeded request
    service, _, server, base = await engine.serve(config, work)
    backend = await service.services.models.get("bench-chat")
    chats = [
        [{"role": "user", "content": f"Request {i}: summarise the json module."}]
        for i in range(args.requests)
    ]
    await (await backend.chat(chats[0], SamplingParams(max_tokens=4, temperature=0))).collect()  # warm-up

    lag = engine.LoopLag()
    ratios, worst_lag, polls = [], 0.0, []
    for round_ in range(1, args.rounds + 1):  # the phases alternate, so drift on a shared machine hits both
        lag.start()
        calm = await streams(base, args, chats)
        calm_lag = lag.stop()

        health = await client(HEALTH, base.removesuffix("/v1") + "/health")
        lag.start()
        hostile = await client(HOSTILE, base, "bench-chat", "minilm", "1" if args.served_embedding else "0")
        busy, (hostile_out, _) = await asyncio.gather(streams(base, args, chats), hostile.communicate())
        health_out, _ = await health.communicate(b"stop\n")
        busy_lag = lag.stop()
        worst_lag = max(worst_lag, busy_lag)
        polls += json.loads(health_out)

        alone, beside = (r["tokens"] / r["seconds"] for r in (calm, busy))
        ratios.append(beside / alone)
        print(
            f"round {round_}: {args.requests} greedy streams x {args.tokens} tokens alone {alone:.1f} tok/s "
            f"(loop lag {calm_lag * 1000:.1f} ms); beside the hostile requests {beside:.1f} tok/s "
            f"= {ratios[-1]:.2f} x (loop lag {busy_lag * 1000:.1f} ms)"
        )
        for name, res in json.loads(hostile_out).items():
            code = " " + res["code"] if res["code"] else ""
            print(f"    {name}: HTTP {res['status']}{code} in {res['seconds']:.2f} s")
    p99 = statistics.quantiles(polls, n=100, method="inclusive")[98]
    print(f"median tokens/s beside the hostile requests / alone: {statistics.median(ratios):.2f}")
    print(
        f"GET /health during the hostile phases: {len(polls)} polls, p99 {p99 * 1000:.1f} ms, "
        f"max {max(polls) * 1000:.1f} ms"
    )
    server.stop()
    await service.services.models.close()
    service.services.db.close()
    print(f"worst_loop_lag_ms={worst_lag * 1000:.1f}")


if __name__ == "__main__":
    parser = engine.arguments(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="alone/hostile phase pairs")
    parser.add_argument("--served-embedding", action="store_true",
                        help="also send a 2,048-input embedding request (the most allowed: served, on the same cores)")
    asyncio.run(main(parser.parse_args()))
