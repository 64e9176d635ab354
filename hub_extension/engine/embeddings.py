"""Embeddings (E5): mean-pooled over the attention mask, L2-normalised, batched across requests.

A request costs the event loop a length check per text: tokenising runs on a worker thread (20,000 texts take
seconds) and the forward passes on the model's own thread. The queue is bounded in texts, the unit of work,
not in requests. The model thread takes a batch from each waiting request in turn, topping up a short batch
from the next ones, so a one-text request waits for about one batch of a big request, not for all of it. A
request whose caller left (its task cancelled) is dropped before its next batch and leaves the count at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BadRequest, RateLimited, ServiceUnavailable
from .registry import ModelSpec

log = logging.getLogger("hub_extension.engine")

TOKENIZE_CHUNK = 256  # texts tokenised between two looks at whether the caller is still there


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # float32, shape [len(inputs), dim], rows of unit length
    prompt_tokens: int


@dataclass(eq=False)  # hashed by identity: the model thread keeps a set of the jobs in a batch
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    stop: threading.Event = field(default_factory=threading.Event)  # the caller left
    ids: list[list[int]] = field(default_factory=list)
    out: list[np.ndarray | None] = field(default_factory=list)
    taken: int = 0  # rows handed to a batch so far (model thread only)
    done: int = 0  # rows encoded (model thread only)


class EmbeddingBackend:
    kind = "local"
    task = "embedding"

    def __init__(self, spec: ModelSpec, model, tokenizer, context_length: int):
        self.spec = spec
        self.name = spec.name
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.dimensions = int(getattr(model.config, "hidden_size", 0))
        # Each of the max_concurrency + max_queue request slots holds up to a batch of texts.
        self.capacity = (spec.max_concurrency + spec.max_queue) * spec.batch_size
        # A token spells at most its own characters plus one separator, so a longer text cannot fit. (Runs
        # of blanks and words the vocabulary cannot spell, one [UNK] each, are the exceptions; a text long
        # enough to matter made of those has nothing to embed.)
        self.max_chars = context_length * (max(map(len, tokenizer.get_vocab())) + 1)
        # Settle the tokenizer's truncation and padding state once: later calls with the same arguments
        # then only read it, which is what makes tokenising on several threads at once safe.
        tokenizer("", add_special_tokens=True)
        self._pending = 0  # texts admitted and not yet answered or abandoned (event loop only)
        self._waiting: deque[_Job] = deque()  # guarded by _cond
        self._cond = threading.Condition()
        self._closed = False
        self.step_threads: set[int] = set()
        self._hook = model.register_forward_pre_hook(
            lambda m, a: self.step_threads.add(threading.get_ident())
        )
        self._thread = threading.Thread(target=self._work, name=f"embed-{spec.name}", daemon=True)
        self._thread.start()

    def in_flight(self) -> int:
        """Texts admitted and not yet answered or abandoned."""
        return self._pending

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        """Cancelling the awaiting task stops the work: no further batch is computed for it."""
        texts = list(texts)
        self._admit(texts)
        loop = asyncio.get_running_loop()
        job = _Job(loop=loop, future=loop.create_future())
        self._pending += len(texts)
        try:
            job.ids = await asyncio.to_thread(self._tokenize, texts, job.stop)
            self._check_tokens(job.ids)
            job.out = [None] * len(job.ids)
            with self._cond:
                if self._closed:
                    raise ServiceUnavailable(f"The model '{self.name}' was unloaded; retry.", retry_after=1)
                self._waiting.append(job)
                self._cond.notify()
            vectors = await job.future
        finally:
            job.stop.set()  # the tokenising thread and the model thread skip it from now on
            self._pending -= len(texts)
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(r) for r in job.ids))

    def _admit(self, texts: list[str]) -> None:
        """What can never succeed is a 400; what cannot be taken now is a 429. Nothing is tokenised yet."""
        if not texts:
            raise BadRequest("`input` must not be empty.", param="input")
        if len(texts) > self.capacity:
            raise BadRequest(
                f"The model '{self.name}' takes at most {self.capacity} inputs in one request; "
                f"this one has {len(texts)}.",
                param="input",
                code="invalid_value",
            )
        for i, text in enumerate(texts):
            if len(text) > self.max_chars:
                raise self._too_long(i, f"{len(text)} characters", f"{self.context_length} tokens, which never "
                                     f"spell more than {self.max_chars} characters")
        if self._pending + len(texts) > self.capacity:
            raise RateLimited(
                f"The model '{self.name}' is at capacity ({self.capacity} texts in flight or queued); "
                "retry shortly.",
                retry_after=1.0,
            )

    def _tokenize(self, texts: list[str], stop: threading.Event) -> list[list[int]]:
        """Token ids, a chunk at a time, so a request whose caller left stops early (worker thread)."""
        ids: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            if stop.is_set():
                break
            ids += self.tokenizer(texts[start : start + TOKENIZE_CHUNK], add_special_tokens=True)["input_ids"]
        return ids

    def _check_tokens(self, ids: list[list[int]]) -> None:
        for i, row in enumerate(ids):
            if len(row) > self.context_length:
                raise self._too_long(i, f"{len(row)} tokens", str(self.context_length))

    def _too_long(self, index: int, has: str, most: str) -> BadRequest:
        return BadRequest(
            f"Input {index} has {has}; the model '{self.name}' takes at most {most}.",
            param="input",
            code="context_length_exceeded",
        )

    # -- model thread ----------------------------------------------------------------------------

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        """Rows for the next forward pass: a batch from the first waiting request, topped up from the
        next ones; a request with rows left goes to the back of the line, one whose caller left is dropped.
        None once closed."""
        with self._cond:
            while True:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                rows: list[tuple[_Job, int]] = []
                again = []
                while self._waiting and len(rows) < self.spec.batch_size:
                    job = self._waiting.popleft()
                    if job.stop.is_set():
                        continue
                    take = min(len(job.ids) - job.taken, self.spec.batch_size - len(rows))
                    rows += [(job, i) for i in range(job.taken, job.taken + take)]
                    job.taken += take
                    if job.taken < len(job.ids):
                        again.append(job)
                self._waiting.extend(again)
                if rows:
                    return rows

    def _work(self) -> None:
        while (rows := self._next_batch()) is not None:
            jobs = list(dict.fromkeys(job for job, _ in rows))
            try:
                vectors = self._encode([job.ids[i] for job, i in rows])
            except Exception as e:
                log.exception("embedding failed for model %r", self.name)
                for job in jobs:
                    job.stop.set()
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, e)
                continue
            for (job, i), v in zip(rows, vectors, strict=True):
                job.out[i] = v
                job.done += 1
            for job in jobs:
                if job.done == len(job.ids):
                    job.loop.call_soon_threadsafe(_resolve, job.future, np.stack(job.out), None)

    @torch.inference_mode()
    def _encode(self, batch: list[list[int]]) -> np.ndarray:
        enc = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu().numpy().astype(np.float32)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the model thread; requests still waiting fail rather than wait forever."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for job in left:
            job.loop.call_soon_threadsafe(_resolve, job.future, None, RuntimeError("the model was unloaded"))
        self._thread.join(timeout)
        self._hook.remove()


def _resolve(future: asyncio.Future, value, error) -> None:
    if future.done():  # the request was cancelled while its batch ran
        return
    if error is not None:
        from .generation import EngineError

        future.set_exception(EngineError(f"Embedding failed: {error}"))
    else:
        future.set_result(value)
