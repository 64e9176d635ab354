"""Token runners: the part that owns the model's thread. Two behind one interface.

`ContinuousBatchingRunner` adapts transformers' `ContinuousBatchingManager` (pinned to transformers 5.24:
the API moved in 5.17, 5.23 and 5.24); `GenerateRunner` is the plain `model.generate()` fallback for models
the manager cannot serve.

Contract, for both: `submit()` is called on the event loop and never blocks it; results come back on the loop
through `loop.call_soon_threadsafe` as `on_tokens(new_token_ids, finished, error)`; `cancel()` frees the slot.
The backend submits at most `slots` requests at a time (what the runner decodes together) and keeps the rest
in its fair-share queue, so neither runner queues work of its own, and the order they serve in (first come,
first served) is never the order users wait in.

Seeded sampling: the manager samples the whole batch from the process-wide RNG, so a seed handed to it would
be shared by everyone. A seeded request draws its own tokens instead: the token at position p is where a
uniform number, a hash of (seed, p), falls in the cumulative distribution left after temperature and top-p.
It is a per-request processor inside the batch (nothing pauses, nothing shares its state), both runners draw
the same way, and the same seed gives the same tokens (up to the last bits of the logits, which can differ
between batch shapes: OpenAI's `seed` is best-effort too).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import queue
import secrets
import threading

import torch
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from .generation import TokenRequest

log = logging.getLogger("hub_extension.engine")


def seeded_uniform(seed: int, position: int) -> float:
    """A number in [0, 1) for the token at `position`; 24 bits, so float32 holds it exactly."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=3).digest()
    return int.from_bytes(digest, "big") / 2**24


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows with `u >= 0`: every score -inf but the token where `u` falls in the softmax's cumulative sum.
    Rows with `u < 0` pass unchanged. No data-dependent branch, so a captured accelerator graph replays it."""
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)
    target = (u.clamp(min=0) * cdf[:, -1]).unsqueeze(-1)
    token = torch.searchsorted(cdf, target, right=True).clamp(max=scores.size(-1) - 1)  # never a 0-prob token
    drawn = torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
    return torch.where((u >= 0).unsqueeze(-1), drawn, scores)


class _SeededDraw(ContinuousBatchingLogitsProcessor):
    """The manager's last per-request processor: rows of requests added with `seed=` draw their own token."""

    supported_kwargs = {"seed": int}
    ignored_kwargs = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.copy_(torch.full_like(int32_tensor, -1.0, dtype=torch.float32).view(torch.int32))

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        # `position_offset` already counts the tokens this step feeds: it is the position of the new token.
        u = [
            -1.0
            if (seed := r.state.logit_processor_kwargs.get("seed")) is None
            else seeded_uniform(seed, r.state.position_offset)
            for r in requests_with_new_token
        ]
        return torch.tensor(u, dtype=torch.float32).view(torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        return draw(scores, tensor_arg[: scores.size(0)].view(torch.float32))


class Runner:
    """What a text backend needs from whatever runs the model."""

    slots = 1  # requests it decodes together: the backend never submits more

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self._ids = itertools.count()
        self._inflight: dict[str, TokenRequest] = {}
        # Thread idents that ran a forward pass: tests check the event loop's thread is never among them.
        self.step_threads: set[int] = set()
        self.restart_threads: set[int] = set()  # the same for `restart`
        self._hook = model.register_forward_pre_hook(self._record_thread)

    def _record_thread(self, module, args) -> None:
        self.step_threads.add(threading.get_ident())

    def in_flight(self) -> int:
        """Requests submitted and neither finished nor cancelled."""
        return len(self._inflight)

    def engine_pending(self) -> int:
        """Requests the underlying engine still holds (lags `in_flight` by a step after a cancel)."""
        return self.in_flight()

    def needs_restart(self) -> bool:
        """True when the engine stopped and must start again (`restart`) before it takes another request."""
        return False

    def restart(self) -> None:
        """Start the engine again. Blocking: the backend runs it on its worker pool, never on the event loop."""

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
    sampler returns the argmax (the same tokens as `generate(do_sample=False)`); a seeded request also
    passes `seed`, and `_SeededDraw` leaves it one candidate of its own choosing.
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
        self.slots = max_concurrency
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
            max_requests_per_batch=max_concurrency,  # `slots`: all the backend ever submits at once
            per_request_processors=True,
            max_queue_size=0,  # our admission control bounds it; a bounded queue would block `add_request`
            seed=seed,
        )
        self.vocab = vocab
        self.manager = model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        # Appended before `start()` builds the batch tensors, which hold one argument row per processor.
        processors = self.manager.logit_processor
        processors.logits_processor.append(_SeededDraw())
        processors.tensors_required += 1
        processors._retrieve_processors_kwargs()
        with torch.inference_mode():
            self.manager.start()

    def needs_restart(self) -> bool:
        """An error inside a batch kills the manager's thread (its requests get the error), and a manager in that
        state drops new requests silently: the next one would wait forever on a loop that is gone."""
        manager = self.manager
        return manager.background_thread_status.can_accept_new_requests() is not None or not manager.is_running()

    def restart(self) -> None:
        manager = self.manager
        log.warning("the batching engine of %r stopped (%s); starting it again", self.name,
                    manager.background_thread_status.fatal_error or "not running")
        self.restart_threads.add(threading.get_ident())
        if manager._generation_thread is not None:
            manager._generation_thread.join(timeout=2)  # it is on its way out: the error is recorded last
        with torch.inference_mode():
            manager.start()

    def submit(self, req: TokenRequest) -> str:
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
        if req.greedy:
            kwargs = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            kwargs = {"temperature": float(req.temperature), "top_k": self.vocab, "top_p": float(req.top_p)}
            if req.seed is not None:
                kwargs["seed"] = req.seed
        self.manager.add_request(
            list(req.input_ids), request_id=rid, max_new_tokens=req.max_new_tokens, streaming=True, **kwargs
        )
        return rid

    def cancel(self, request_id: str) -> None:
        req = self._inflight.pop(request_id, None)
        if req is None:
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
        return pending

    def close(self, timeout: float = 5.0) -> None:
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


class _Draw:
    """`generate`'s version of `_SeededDraw`, after transformers' own temperature and top-p warpers."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, input_ids, scores):
        u = torch.full((scores.size(0),), seeded_uniform(self.seed, input_ids.shape[1]), device=scores.device)
        return draw(scores.float(), u)


class GenerateRunner(Runner):
    """One request at a time through `model.generate()` on a worker thread: the fallback path. One slot,
    whatever `max_concurrency` says, so the requests waiting behind it wait in the backend's fair queue."""

    def __init__(
        self,
        model,
        name: str,
        *,
        eos_token_ids: list[int],
        pad_token_id: int | None,
    ):
        super().__init__(model, name)
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_ids[0]
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
        from transformers import (
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        ids = torch.tensor([req.input_ids], device=self.model.device)
        processors = LogitsProcessorList()
        if not req.greedy:  # do_sample stays off: the drawn token is the only candidate left
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            processors.extend(
                [TemperatureLogitsWarper(float(req.temperature)), TopPLogitsWarper(float(req.top_p))]
            )
            processors.append(_Draw(seed))
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
        self._hook.remove()
