"""Engine benchmark: one-at-a-time `generate` vs concurrent streams through the HTTP service.

    .venv/bin/python bench/engine.py [--params 30M] [--requests 16] [--tokens 64] [--quantization none]

Builds (or reuses) a random-weight Llama of about 30M parameters offline, then measures in one run:
(a) N requests of T tokens one after another with plain `generate` (what a one-at-a-time server does);
(b) the same N at once as streaming requests through the service (identity mode `none`, in this process)
    with the openai SDK, from a separate client process: tokens/s, time to first token p50/p95, and the worst
    event-loop lag the service saw meanwhile;
(c) one request through HTTP against the same request on the engine in-process: the service's overhead;
plus the resident memory with the demo models loaded and the nf4 footprint against fp32.
The last line is `concurrent_speedup=<b tokens/s / a tokens/s>`. Goals on a 2-core CPU: speedup >= 4,
overhead <= 2 ms p50, loop lag <= 50 ms, nf4 <= 0.3 x fp32.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    import openai
    base, model, n, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = json.loads(sys.stdin.read())
    async def one(client, messages):
        t0 = time.perf_counter(); first = None; usage = None
        stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=tokens,
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            usage = chunk.usage or usage
        return first, usage.completion_tokens
    async def main():
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0)
        await client.models.list()  # connection warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, m) for m in prompts))
        print(json.dumps({"seconds": time.perf_counter() - t0, "ttft": [r[0] for r in results],
                          "tokens": sum(r[1] for r in results)}))
    asyncio.run(main())
""")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class LoopLag:
    """Worst lateness of a 5 ms timer on the service's loop: what a blocked loop would show."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.worst = 0.0
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(self.interval)
            self.worst = max(self.worst, loop.time() - t - self.interval)

    def start(self) -> None:
        self.worst = 0.0
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> float:
        self._task.cancel()
        return self.worst


def write_config(model_dir: Path, args, path: Path, slots: int | None = None) -> None:
    """bench-chat with room for `slots` concurrent requests (default: --requests), and minilm."""
    slots = slots or args.requests
    device_map = "cuda:0" if args.device == "cuda" else "cpu"
    path.write_text(
        textwrap.dedent(f"""\
        models:
          - name: bench-chat
            source: {model_dir}
            task: chat
            dtype: {args.dtype}
            device_map: {device_map}
            quantization: {args.quantization}
            context_length: 512
            max_concurrency: {slots}
            max_queue: {slots}
            kv_cache_tokens: {slots * 256}
            page_size: 32
            max_batch_tokens: 1024
          - name: minilm
            source: builtin:minilm
            task: embedding
            device_map: {device_map}
        """)
    )


def sequential_generate(model, tokenizer, prompts: list[list[int]], tokens: int) -> tuple[float, int]:
    import torch

    eos = model.generation_config.eos_token_id
    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=model.device)
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            total += out.shape[1] - len(ids)
    return time.perf_counter() - t0, total


def footprints(model_dir: Path, device: str) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dm = "cuda:0" if device == "cuda" else "cpu"
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=dm)
    fp32 = full.get_memory_footprint() / 2**20
    del full
    nf4 = AutoModelForCausalLM.from_pretrained(
        model_dir,
        device_map=dm,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    q = nf4.get_memory_footprint() / 2**20
    del nf4
    return fp32, q


def bench_model(args) -> Path:
    """Build (or reuse) the random Llama of the --params preset and say what it is and where it runs."""
    import torch

    from hub_extension.engine.registry import default_build_dir
    from hub_extension.engine.tiny_model import build

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = build(Path(args.model_dir or default_build_dir() / f"tiny-{args.params}"), args.params)
    n_params = json.loads((model_dir / "tiny_model.json").read_text())["num_parameters"]
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters, {model_dir}")
    print(
        f"device: {args.device}, torch threads: {torch.get_num_threads()}, quantization: {args.quantization}"
    )
    return model_dir


async def serve(config: Path, work: Path):
    """The service in this process (identity mode `none`) with its models loaded, listening on loopback.
    Returns (service, app, server, base URL of /v1)."""
    from tornado import httpserver, testing
    from traitlets.config import Config

    from hub_extension.app import InferenceService

    settings = Config()
    settings.IdentityProvider.mode = "none"
    service = InferenceService(
        config=settings,
        db_url=f"sqlite:///{work / 'bench.sqlite'}",
        ip="127.0.0.1",
        base_url="/services/inference/",
        models_config=str(config),
    )
    app = service.make_app()
    await service.services.models.start()
    sock, port = testing.bind_unused_port()
    server = httpserver.HTTPServer(app, max_body_size=8 * service.max_body_bytes)
    server.add_sockets([sock])
    return service, app, server, f"http://127.0.0.1:{port}/services/inference/v1"


async def main(args) -> None:
    import torch

    from hub_extension.engine import SamplingParams

    model_dir = bench_model(args)
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    config = work / "models.yaml"
    write_config(model_dir, args, config)
    rss0 = rss_mb()
    service, app, server, base = await serve(config, work)
    models = service.services.models
    backend = await models.get("bench-chat")
    print(
        f"resident memory with the models loaded (bench-chat + minilm): {rss_mb():.0f} MiB "
        f"(process before loading: {rss0:.0f} MiB)"
    )

    tok = backend.tokenizer
    chats = [
        [{"role": "user", "content": f"Request {i}: summarise the json module in a sentence."}]
        for i in range(args.requests)
    ]
    prompt_ids = [backend.chat_prompt_ids(m) for m in chats]

    # (a) one after another, plain generate (the manager is paused so it cannot compete for the cores)
    with backend.runner.manager.pause() if hasattr(backend.runner, "manager") else contextlib.nullcontext():
        sequential_generate(backend.model, tok, prompt_ids[:1], 4)  # warm-up
        seq_s, seq_tokens = await asyncio.to_thread(
            sequential_generate, backend.model, tok, prompt_ids, args.tokens
        )
    a = seq_tokens / seq_s
    print(
        f"(a) sequential generate: {args.requests} x {args.tokens} tokens: {seq_tokens} tokens in {seq_s:.2f} s "
        f"= {a:.1f} tok/s"
    )

    # warm the engine through the same path
    g = await backend.chat(chats[0], SamplingParams(max_tokens=4, temperature=0))
    await g.collect()

    # (b) N concurrent streaming requests from a separate client process
    lag = LoopLag()
    lag.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        base,
        "bench-chat",
        str(args.requests),
        str(args.tokens),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate(json.dumps(chats).encode())
    worst_lag = lag.stop()
    res = json.loads(out)
    b = res["tokens"] / res["seconds"]
    ttft = statistics.quantiles([t for t in res["ttft"] if t is not None], n=20, method="inclusive")
    print(
        f"(b) {args.requests} concurrent streams via HTTP + openai SDK: {res['tokens']} tokens in "
        f"{res['seconds']:.2f} s = {b:.1f} tok/s; TTFT p50 {ttft[9] * 1000:.0f} ms, "
        f"p95 {ttft[18] * 1000:.0f} ms"
    )
    print(f"    worst event-loop lag during (b): {worst_lag * 1000:.1f} ms")
    if res["tokens"] != seq_tokens:
        print(f"    note: token counts differ from (a): {res['tokens']} vs {seq_tokens}")

    # (c) one request through HTTP vs the same request on the engine in-process
    import httpx

    body = {"model": "bench-chat", "messages": chats[0], "max_tokens": args.overhead_tokens, "temperature": 0}
    direct, http, served = [], [], []
    # The server's own time per request (arrival to last byte), excluding the client's work.
    app.settings["log_function"] = lambda h: served.append(h.request.request_time())
    async with httpx.AsyncClient() as client:
        await client.post(base + "/chat/completions", json=body)
        for _ in range(args.overhead_runs):
            t0 = time.perf_counter()
            g = await backend.chat(chats[0], SamplingParams(max_tokens=args.overhead_tokens, temperature=0))
            await g.collect()
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = await client.post(base + "/chat/completions", json=body)
            http.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
        listing = []
        for _ in range(args.overhead_runs):  # the HTTP round trip alone (client + Tornado), for scale
            t0 = time.perf_counter()
            await client.get(base + "/models")
            listing.append(time.perf_counter() - t0)
    d50, h50 = statistics.median(direct), statistics.median(http)
    s50 = statistics.median(served[1 : 1 + args.overhead_runs])  # [0] was the warm-up request
    print(
        f"(c) one request ({args.overhead_tokens} tokens), median of {args.overhead_runs}: in-process "
        f"{d50 * 1000:.2f} ms; served over HTTP {s50 * 1000:.2f} ms -> service overhead "
        f"{(s50 - d50) * 1000:.2f} ms p50; with the in-process httpx client's own work "
        f"{(h50 - d50) * 1000:.2f} ms (a bare GET /v1/models round trip from it: "
        f"{statistics.median(listing) * 1000:.2f} ms)"
    )

    server.stop()
    await models.close()
    service.services.db.close()

    fp32, nf4 = await asyncio.to_thread(footprints, model_dir, args.device)
    print(f"memory of the weights: fp32 {fp32:.1f} MiB, nf4 {nf4:.1f} MiB = {nf4 / fp32:.2f} x fp32")
    if args.device == "cuda":
        print(f"GPU peak memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"concurrent_speedup={b / a:.2f}")


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options that choose and serve the model, shared with bench/hostile.py."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--params", default="30M", help="tiny-model preset: tiny, 30M or 300M")
    parser.add_argument(
        "--model-dir", help="where to build/reuse the model (default: the registry's build_dir)"
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "nf4", "fp4"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return parser


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--overhead-runs", type=int, default=31)
    parser.add_argument("--overhead-tokens", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
