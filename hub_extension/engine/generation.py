"""Text generation as the handlers see it: prompts in, text deltas out, on the event loop.

A `TextBackend` does what the engine lacks (E4): it renders the chat template, bounds `max_tokens` by the
context, admits requests into a bounded queue (429 with Retry-After when full, never a blocked loop), fans
`n` > 1 out into separate engine requests, detokenises incrementally and cuts at stop strings. Every
request's results land in one `asyncio.Queue`, so a handler just iterates a `Generation`.

Request work never runs on the event loop: a prompt longer than the context could ever hold (in characters)
is refused before anything reads it, and templating and tokenising the rest run on a small thread pool.
This module imports neither torch nor transformers; the runners that need them load with a model.
"""

from __future__ import annotations

import asyncio
import threading
import time
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


@dataclass
class Delta:
    """New text for one choice; `finish_reason` ("stop" or "length") on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    max_new_tokens: int
    request_id: str = ""
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Generation:
    """One API request's choices, streamed. Iterate for `Delta`s; `cancel()` on client disconnect."""

    model: str
    prompt_tokens: int
    _runner: Runner
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
            self._close_choice(choice)
            self._queue.put_nowait(EngineError(f"Generation failed: {error}"))
            return
        if new and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        text = ""
        for tok in new:  # one by one, so nothing past a stop string is counted or decoded
            choice.tokens += 1
            piece = choice.stops.push(choice.detok.push([tok]))
            text += piece
            if choice.stops.stopped:
                self._runner.cancel(choice.request_id)
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
                self._runner.cancel(choice.request_id)
                self._close_choice(choice)


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
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{spec.name}")

    # -- what the handlers and the manager ask -------------------------------------------------

    def in_flight(self) -> int:
        """Requests admitted and not yet finished: being tokenised, queued or decoding."""
        return self.runner.in_flight() + self._preparing

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
        """Validate, admit and submit; raises before anything is streamed, so errors keep their status code."""
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
            _runner=self.runner,
            _eos=self.eos_token_ids,
        )
        work = []
        for p, ids in enumerate(prompts):
            for j in range(params.n):
                choice = _Choice(
                    index=p * params.n + j,
                    detok=IncrementalDetokenizer(self.tokenizer),
                    stops=StopMatcher(params.stop),
                    max_new_tokens=budgets[p],
                )
                gen._choices.append(choice)
                work.append((choice, ids))
        gen._open = len(gen._choices)
        for choice, ids in work:
            # Each sample of a seeded request gets its own seed, so n > 1 gives n different, repeatable answers.
            req = TokenRequest(
                input_ids=ids,
                max_new_tokens=choice.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=None if params.seed is None else params.seed + choice.index,
                on_tokens=lambda new, fin, err, c=choice: gen._on_tokens(c, new, fin, err),
            )
            choice.request_id = self.runner.submit(req)
        return gen

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.runner.close()
