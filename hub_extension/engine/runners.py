"""Token runners: the part that owns the model's thread. Two behind one interface.

`ContinuousBatchingRunner` adapts transformers' `ContinuousBatchingManager` (pinned to transformers 5.24:
the API moved in 5.17, 5.23 and 5.24); `GenerateRunner` is the plain `model.generate()` fallback for models
the manager cannot serve, and also serves seeded sampling, which the manager only has process-wide.

Contract, for both: `submit()` is called on the event loop and never blocks it (our own admission control in
the backend bounds the queue, so the manager's input queue never fills); results come back on the loop through
`loop.call_soon_threadsafe` as `on_tokens(new_token_ids, finished, error)`; `cancel()` frees the slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import secrets
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

log = logging.getLogger("hub_extension.engine")

OnTokens = Callable[[list[int], bool, "str | None"], None]


@dataclass
class TokenRequest:
    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    on_tokens: OnTokens | None = None
    request_id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Runner:
    """What a text backend needs from whatever runs the model."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self._ids = itertools.count()
        self._inflight: dict[str, TokenRequest] = {}
        # Thread idents that ran a forward pass: tests check the event loop's thread is never among them.
        self.step_threads: set[int] = set()
        self._hook = model.register_forward_pre_hook(self._record_thread)

    def _record_thread(self, module, args) -> None:
        self.step_threads.add(threading.get_ident())

    def in_flight(self) -> int:
        """Requests submitted and neither finished nor cancelled."""
        return len(self._inflight)

    def engine_pending(self) -> int:
        """Requests the underlying engine still holds (lags `in_flight` by a step after a cancel)."""
        return self.in_flight()

    def submit(self, req: TokenRequest) -> str:
        raise NotImplementedError

    def cancel(self, request_id: str) -> None:
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def _finish(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)


class ContinuousBatchingRunner(Runner):
    """Many requests decoded together by transformers' manager, each streaming its own tokens.

    Per-request sampling rides on the manager's per-request processors: every request passes explicit
    `temperature`, `top_k` and `top_p`. Greedy is `top_k=1`, which leaves one candidate, so the manager's
    sampler returns the argmax (the same tokens as `generate(do_sample=False)`).
    """

    def __init__(
        self,
        model,
        name: str,
        *,
        eos_token_ids: list[int],
        pad_token_id: int | None,
        max_concurrency: int,
        num_blocks: int,
        page_size: int,
        max_batch_tokens: int,
        seed: int | None = None,
    ):
        super().__init__(model, name)
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        vocab = int(model.config.get_text_config().vocab_size)
        # Values other than 1.0 make transformers create the three processors; each request overrides them.
        gen_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=vocab,
            top_p=0.5,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            max_new_tokens=256,
        )
        cb_config = ContinuousBatchingConfig(
            num_blocks=num_blocks,  # sized by us, never the library's share of free memory
            page_size=page_size,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=max_concurrency,
            per_request_processors=True,
            max_queue_size=0,  # our admission control bounds it; a bounded queue would block `add_request`
            seed=seed,
        )
        self.vocab = vocab
        self.manager = model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        with torch.inference_mode():
            self.manager.start()
        self._seeded = GenerateRunner(
            model,
            name + "/seeded",
            exclusive=self.manager.pause,
            eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id,
            hook=False,
        )

    def submit(self, req: TokenRequest) -> str:
        if req.seed is not None and not req.greedy:
            # The manager seeds the whole process, not a request: a seeded sample runs alone, with its own generator.
            outer = req.on_tokens

            def on_seeded(new, finished, error):
                if finished:
                    self._finish(req.request_id)
                outer(new, finished, error)

            req.on_tokens = on_seeded
            rid = self._seeded.submit(req)
            self._inflight[rid] = req
            return rid
        rid = req.request_id = f"{self.name}-{next(self._ids)}"
        seen = 0

        def on_output(out) -> None:  # on the event loop, via the manager's call_soon_threadsafe
            nonlocal seen
            if rid not in self._inflight:
                return  # cancelled: drop late results
            new = list(out.generated_tokens[seen:])
            seen = len(out.generated_tokens)
            finished = out.is_finished()
            if finished:
                self._finish(rid)
            req.on_tokens(new, finished, out.error)

        self._inflight[rid] = req
        self.manager.register_result_handler(rid, on_output)
        kwargs = (
            {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
            if req.greedy
            else {"temperature": float(req.temperature), "top_k": self.vocab, "top_p": float(req.top_p)}
        )
        self.manager.add_request(
            list(req.input_ids), request_id=rid, max_new_tokens=req.max_new_tokens, streaming=True, **kwargs
        )
        return rid

    def cancel(self, request_id: str) -> None:
        req = self._inflight.pop(request_id, None)
        if req is None:
            return
        if request_id.startswith(self._seeded.name):
            self._seeded.cancel(request_id)
            return
        self.manager.cancel_request(request_id)
        # The manager keeps the handler of a request that never finishes; drop it ourselves.
        with self.manager.output_router._lock:
            self.manager.output_router.result_handlers.pop(request_id, None)

    def engine_pending(self) -> int:
        bp = self.manager.batch_processor
        pending = self.manager.input_queue.qsize() + self.manager.cancel_queue.qsize()
        if bp is not None:
            pending += len(bp.scheduler.active_requests) + len(bp.scheduler.waiting_requests)
        return pending + self._seeded.engine_pending()

    def close(self, timeout: float = 5.0) -> None:
        self._seeded.close(timeout)
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        self._hook.remove()


class _Streamer:
    """`generate(streamer=...)` hands us each new token on the worker thread; pass it to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, req: TokenRequest):
        self.loop = loop
        self.req = req
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True  # the first call carries the prompt
            return
        if not self.req.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.req.on_tokens, value.reshape(-1).tolist(), False, None)

    def end(self) -> None:
        pass


class _Cancelled:
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _SeededSampler:
    """Temperature, top-p and a draw from the request's own generator; leaves only the drawn token.

    Used with `do_sample=False`, so `generate` takes that token and the process-wide RNG is never touched.
    """

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cum <= (1 - self.top_p)
            remove[..., -1:] = False
            logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
        token = torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class GenerateRunner(Runner):
    """One request at a time through `model.generate()` on a worker thread: the fallback path."""

    def __init__(
        self,
        model,
        name: str,
        *,
        eos_token_ids: list[int],
        pad_token_id: int | None,
        exclusive: Callable[[], AbstractContextManager] | None = None,
        hook: bool = True,
    ):
        if hook:
            super().__init__(model, name)
        else:  # shares the step_threads of the runner that owns it
            self.model, self.name, self._ids, self._inflight = model, name, itertools.count(), {}
            self.step_threads = set()
            self._hook = None
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_ids[0]
        self.exclusive = exclusive or nullcontext
        self.loop: asyncio.AbstractEventLoop | None = None
        self.jobs: queue.Queue[TokenRequest | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name=f"generate-{name}", daemon=True)
        self.thread.start()

    def submit(self, req: TokenRequest) -> str:
        self.loop = asyncio.get_running_loop()
        rid = req.request_id = f"{self.name}-{next(self._ids)}"
        self._inflight[rid] = req
        outer = req.on_tokens

        def on_tokens(new, finished, error, rid=rid):
            if rid not in self._inflight:
                return
            if finished:
                self._finish(rid)
            outer(new, finished, error)

        req.on_tokens = on_tokens
        self.jobs.put(req)
        return rid

    def cancel(self, request_id: str) -> None:
        req = self._inflight.pop(request_id, None)
        if req is not None:
            req.cancelled.set()

    def engine_pending(self) -> int:
        return len(self._inflight)

    def _work(self) -> None:
        while (req := self.jobs.get()) is not None:
            if req.cancelled.is_set():
                continue
            error = None
            try:
                self._generate(req)
            except Exception as e:  # reported to the request, the worker lives on
                log.exception("generation failed for %s", req.request_id)
                error = f"{type(e).__name__}: {e}"
            if not req.cancelled.is_set():
                self.loop.call_soon_threadsafe(req.on_tokens, [], True, error)

    @torch.inference_mode()
    def _generate(self, req: TokenRequest) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ids = torch.tensor([req.input_ids], device=self.model.device)
        processors = LogitsProcessorList()
        if not req.greedy:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            processors.append(_SeededSampler(req.temperature, req.top_p, seed))
        with self.exclusive():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=req.max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_Cancelled(req.cancelled)]),
                streamer=_Streamer(self.loop, req),
            )

    def close(self, timeout: float = 5.0) -> None:
        for req in list(self._inflight.values()):
            req.cancelled.set()
        self._inflight.clear()
        self.jobs.put(None)
        self.thread.join(timeout)
        if self._hook is not None:
            self._hook.remove()
