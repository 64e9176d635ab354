"""Text generation as the handlers see it: prompts in, text deltas out, on the event loop.

A `TextBackend` does what the engine lacks (E4): it renders the chat template, bounds `max_tokens` by the
context, admits requests into a bounded queue (429 with Retry-After when full, never a blocked loop), fans
`n` > 1 out into separate engine requests, detokenises incrementally and cuts at stop strings. Every
request's results land in one `asyncio.Queue`, so a handler just iterates a `Generation`.

Fair share: the engine holds at most its runner's `slots` choices at once (`max_concurrency` for continuous
batching, one for the `generate` fallback); the rest wait in a `FairQueue`, one FIFO per tenant (the handler
names the user), and each freed slot goes to the tenant whose turn it is, by weight. One user's 60 queued
requests then delay another user's single request by about one slot, not 60. The runners hold no queue of
their own, so the order they serve in (first come, first served) no longer matters.

Request work never runs on the event loop: a prompt longer than the context could ever hold (in characters)
is refused before anything reads it, and templating and tokenising the rest run on a small thread pool.
This module imports neither torch nor transformers; the runners that need them load with a model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from ..errors import ApiError, BadRequest, RateLimited
from .registry import ModelSpec
from .textstream import IncrementalDetokenizer, StopMatcher

if TYPE_CHECKING:
    from .runners import Runner

OnTokens = Callable[[list[int], bool, "str | None"], None]
log = logging.getLogger("hub_extension.engine")


@dataclass
class TokenRequest:
    """One choice as a runner sees it: token ids in, `on_tokens(new_ids, finished, error)` on the loop."""

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


class EngineError(ApiError):
    """The model failed while generating: a 500 the client can retry."""

    status = 500
    type = "server_error"
    code = "engine_error"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    # Fair share: whose request this is and their share when the model's queue is contended (the engine knows
    # no users; the handler fills these in). A tenant with weight 2 gets two turns for a weight-1 tenant's one.
    tenant: str = ""
    weight: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"SamplingParams.weight must be a positive number, not {self.weight!r}")


@dataclass
class Delta:
    """New text for one choice; `finish_reason` ("stop" or "length") on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass(eq=False)
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    max_new_tokens: int
    tenant: str = ""
    request: TokenRequest | None = None  # set while it waits for a slot
    request_id: str = ""  # set once the runner has it
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Generation:
    """One API request's choices, streamed. Iterate for `Delta`s; `cancel()` on client disconnect."""

    model: str
    prompt_tokens: int
    _cancel: Callable[[_Choice], None]  # the backend's: out of the queue, or out of the engine
    _eos: set[int]
    _choices: list[_Choice] = field(default_factory=list)
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _open: int = 0
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self._choices)

    @property
    def finish_reasons(self) -> list[str | None]:
        return [c.finish_reason for c in self._choices]

    def _on_tokens(self, choice: _Choice, new: list[int], finished: bool, error: str | None) -> None:
        """Called on the event loop for each engine result of one choice."""
        if choice.finish_reason is not None:
            return
        if error is not None:
            choice.finish_reason = "error"
            self._cancel(choice)  # the engine may still count it
            # The error before the end-of-stream marker `_close_choice` may queue, or the reader never sees it.
            self._queue.put_nowait(EngineError(f"Generation failed: {error}"))
            self._close_choice(choice)
            return
        if new and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        text = ""
        for tok in new:  # one by one, so nothing past a stop string is counted or decoded
            choice.tokens += 1
            piece = choice.stops.push(choice.detok.push([tok]))
            text += piece
            if choice.stops.stopped:
                self._cancel(choice)
                self._finish(choice, text, "stop")
                return
        if finished:
            text += choice.stops.push(choice.detok.flush())
            text += choice.stops.flush()
            if choice.stops.stopped:
                reason = "stop"
            elif new and new[-1] in self._eos:
                reason = "stop"
            else:
                reason = "length" if choice.tokens >= choice.max_new_tokens else "stop"
            self._finish(choice, text, reason)
        elif text:
            self._queue.put_nowait(Delta(choice.index, text))

    def _finish(self, choice: _Choice, text: str, reason: str) -> None:
        choice.finish_reason = reason
        self._queue.put_nowait(Delta(choice.index, text, reason))
        self._close_choice(choice)

    def _close_choice(self, choice: _Choice) -> None:
        self._open -= 1
        if self._open == 0:
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while (item := await self._queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel()

    async def collect(self) -> list[str]:
        """All choices' full texts (for non-streaming answers)."""
        texts = [""] * len(self._choices)
        async for delta in self:
            texts[delta.index] += delta.text
        return texts

    def cancel(self) -> None:
        """Stop every unfinished choice and free its slot; safe to call more than once."""
        for choice in self._choices:
            if choice.finish_reason is None:
                choice.finish_reason = "cancelled"
                self._cancel(choice)
                self._close_choice(choice)


class FairQueue:
    """Choices waiting for an engine slot: one FIFO per tenant, taken in weighted turns (start-time fair queueing).

    Each tenant has a tag, its place in line in units of turns, that grows by 1/weight per choice it gets; the
    next slot goes to the waiting tenant with the smallest tag, the earliest to start waiting on a tie. A tenant
    that starts waiting starts no earlier than the tag of the last choice admitted, so time spent idle banks no
    turns, and a newcomer is next in line however long the others' queues are. All on the event loop.
    """

    def __init__(self):
        self._queues: dict[str, deque[_Choice]] = {}  # waiting tenants, in the order they started waiting
        self._tags: dict[str, float] = {}  # waiting tenants, and idle ones still ahead of the clock
        self._weights: dict[str, float] = {}
        self._clock = 0.0  # the tag of the last choice admitted
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, choice: _Choice, weight: float) -> None:
        queue = self._queues.get(choice.tenant)
        if queue is None:
            queue = self._queues[choice.tenant] = deque()
            self._tags[choice.tenant] = max(self._tags.get(choice.tenant, 0.0), self._clock)
        self._weights[choice.tenant] = weight
        queue.append(choice)
        self._len += 1

    def pop(self) -> _Choice | None:
        """The next choice to admit, or None when nothing waits."""
        if not self._queues:
            return None
        tenant = min(self._queues, key=self._tags.__getitem__)
        self._clock = self._tags[tenant]
        self._tags[tenant] += 1 / self._weights[tenant]
        return self._take(tenant, self._queues[tenant].popleft())

    def remove(self, choice: _Choice) -> None:
        """A waiting choice leaves the line (its client went away); its tenant keeps its place."""
        self._queues[choice.tenant].remove(choice)
        self._take(choice.tenant, choice)

    def _take(self, tenant: str, choice: _Choice) -> _Choice:
        self._len -= 1
        if not self._queues[tenant]:
            del self._queues[tenant]
            del self._weights[tenant]
            # An idle tenant's tag matters only while it is ahead of the clock: forget the others.
            self._tags = {t: v for t, v in self._tags.items() if t in self._queues or v > self._clock}
        return choice


class TextBackend:
    """A local chat or completion model: tokenizer + runner + the server-side features the engine lacks."""

    kind = "local"

    def __init__(
        self,
        spec: ModelSpec,
        model,
        tokenizer,
        runner: Runner,
        context_length: int,
        eos_token_ids: list[int],
        chars_per_token: int | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.task = spec.task
        self.model = model
        self.tokenizer = tokenizer
        self.runner = runner
        self.context_length = context_length
        self.eos_token_ids = set(eos_token_ids)
        self.capacity = spec.max_concurrency + spec.max_queue
        # No text longer than this can fit: each token covers at most `chars_per_token` characters of it.
        self.max_prompt_chars = context_length * chars_per_token if chars_per_token else None
        self._preparing = 0  # requests admitted and still being templated or tokenised
        self._waiting = FairQueue()  # choices admitted and waiting for one of the engine's slots
        self._restarting = False  # the engine is starting again on the pool: choices wait meanwhile
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{spec.name}")

    # -- what the handlers and the manager ask -------------------------------------------------

    def in_flight(self) -> int:
        """Choices admitted and not yet finished: being tokenised, waiting for a slot or decoding."""
        return self.runner.in_flight() + len(self._waiting) + self._preparing

    def queued(self) -> int:
        """Choices waiting for a slot in the engine (tokenised, not yet decoding)."""
        return len(self._waiting)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Render the model's chat template; a template that rejects the messages is the caller's 400.
        Blocking (run it on the pool)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(
                f"The model '{self.name}' has no chat template; use /v1/completions.", param="model"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # jinja raises for e.g. roles that do not alternate
            raise BadRequest(
                f"The messages do not fit the model's chat template: {e}", param="messages"
            ) from None
        self._check_length(text, "messages")
        return self._tokenize(text, special=False)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt as ids, validated. Blocking (run it on the pool)."""
        if isinstance(prompt, str):
            self._check_length(prompt, "prompt")
            return self._tokenize(prompt, special=True)
        vocab = len(self.tokenizer)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab for t in prompt):
            raise BadRequest(f"Token ids in `prompt` must be integers in [0, {vocab}).", param="prompt")
        return list(prompt)

    async def chat(self, messages: Sequence[dict[str, Any]], params: SamplingParams) -> Generation:
        ids = await self._prepare(1, params, "messages", lambda: [self.chat_prompt_ids(messages)])
        return self.start(ids, params, param="messages")

    async def complete(self, prompts: Sequence[str | list[int]], params: SamplingParams) -> Generation:
        """Choice `i * n + j` is the j-th sample of prompt i, as OpenAI numbers them."""
        for p in prompts:  # O(1) each: what can never fit is refused before the pool sees it
            if isinstance(p, str):
                self._check_length(p, "prompt")
            elif len(p) >= self.context_length:
                self._context_exceeded(f"{len(p)} tokens, which leaves no room for an answer", "prompt")
        ids = await self._prepare(
            len(prompts), params, "prompt", lambda: [self.prompt_ids(p) for p in prompts]
        )
        return self.start(ids, params, param="prompt")

    # -- the work ----------------------------------------------------------------------------------

    def _tokenize(self, text: str, special: bool) -> list[int]:
        """The one place text becomes token ids."""
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _check_length(self, text: str, param: str) -> None:
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            self._context_exceeded(
                f"{len(text)} characters, more than {self.context_length} tokens can hold", param
            )

    def _context_exceeded(self, detail: str, param: str) -> NoReturn:
        raise BadRequest(
            f"This model's maximum context length is {self.context_length} tokens; the prompt has {detail}.",
            param=param,
            code="context_length_exceeded",
        )

    def _admit(self, prompts: int, params: SamplingParams, param: str) -> None:
        """400 for what this model can never take at once, 429 (retry) for what it cannot take right now."""
        total = prompts * params.n
        if total > self.capacity:
            raise BadRequest(
                f"The model '{self.name}' takes at most {self.capacity} choices per request (prompts x n); "
                f"this request asks for {total}.",
                param="n" if params.n > 1 else param,
                code="invalid_value",
            )
        if self.in_flight() + total > self.capacity:
            raise RateLimited(
                f"The model '{self.name}' is at capacity ({self.capacity} requests in flight or queued); retry shortly.",
                retry_after=1.0,
            )

    async def _prepare(
        self, prompts: int, params: SamplingParams, param: str, work: Callable[[], list]
    ) -> list:
        """Admit, then run `work` (templating, tokenising) on the pool, holding the request's place meanwhile."""
        self._admit(prompts, params, param)
        total = prompts * params.n
        self._preparing += total
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, work)
        finally:
            self._preparing -= total

    def start(self, prompts: list[list[int]], params: SamplingParams, param: str = "prompt") -> Generation:
        """Validate, admit and queue for the engine; raises before anything is streamed, so errors keep their
        status code."""
        budgets = []
        for ids in prompts:
            if not ids:
                raise BadRequest("The prompt is empty.", param=param)
            room = self.context_length - len(ids)
            if room <= 0:
                self._context_exceeded(f"{len(ids)} tokens, which leaves no room for an answer", param)
            wanted = params.max_tokens or self.spec.default_max_tokens or room
            budgets.append(min(wanted, room))
        self._admit(len(prompts), params, param)
        gen = Generation(
            model=self.name,
            prompt_tokens=sum(len(p) for p in prompts),
            _cancel=self._cancel,
            _eos=self.eos_token_ids,
        )
        for p, ids in enumerate(prompts):
            for j in range(params.n):
                choice = _Choice(
                    index=p * params.n + j,
                    detok=IncrementalDetokenizer(self.tokenizer),
                    stops=StopMatcher(params.stop),
                    max_new_tokens=budgets[p],
                    tenant=params.tenant,
                )
                # Each sample of a seeded request gets its own seed, so n > 1 gives n different, repeatable answers.
                choice.request = TokenRequest(
                    input_ids=ids,
                    max_new_tokens=choice.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    seed=None if params.seed is None else params.seed + choice.index,
                    on_tokens=lambda new, fin, err, c=choice: self._on_tokens(gen, c, new, fin, err),
                )
                gen._choices.append(choice)
                self._waiting.push(choice, params.weight)
        gen._open = len(gen._choices)
        self._fill_slots()
        return gen

    # -- fair share: the engine's slots, handed out on the loop ------------------------------------

    def _fill_slots(self) -> None:
        """Hand free engine slots to waiting choices, in fair turns. Called whenever a slot may have freed."""
        if self._restarting or not self._waiting:
            return
        if self.runner.needs_restart():
            self._restarting = True
            future = asyncio.get_running_loop().run_in_executor(self._pool, self.runner.restart)
            future.add_done_callback(self._restarted)
            return
        while self.runner.in_flight() < self.runner.slots and (choice := self._waiting.pop()) is not None:
            req, choice.request = choice.request, None
            choice.request_id = self.runner.submit(req)

    def _restarted(self, future: asyncio.Future) -> None:
        """The engine runs again: the waiting choices go in. If it could not start, they end with the error (a 500)
        and the next request tries again."""
        self._restarting = False
        if future.cancelled():  # the backend is closing
            return
        error = future.exception()
        if error is None:
            self._fill_slots()
            return
        log.error("the engine of %r could not start again: %s: %s", self.name, type(error).__name__, error)
        failed = []
        while (choice := self._waiting.pop()) is not None:
            failed.append(choice)
        for choice in failed:
            req, choice.request = choice.request, None
            req.on_tokens([], True, "the engine could not start again")

    def _on_tokens(self, gen: Generation, choice: _Choice, new: list[int], finished: bool, error) -> None:
        gen._on_tokens(choice, new, finished, error)
        if finished:
            self._fill_slots()

    def _cancel(self, choice: _Choice) -> None:
        """A choice stops: out of the line if it waits, out of the engine (freeing a slot) if it runs."""
        if choice.request is not None:
            choice.request = None
            self._waiting.remove(choice)
        else:
            self.runner.cancel(choice.request_id)
            self._fill_slots()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.runner.close()
