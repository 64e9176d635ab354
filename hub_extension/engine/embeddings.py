"""Embeddings (E5): mean-pooled over the attention mask, L2-normalised, batched across requests.

Texts are tokenised on the event loop (fast tokenizers take microseconds, and the count is needed for usage
anyway); the forward passes run on one worker thread, which takes as many waiting texts as fit in a batch,
from whichever requests sent them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BadRequest, RateLimited
from .registry import ModelSpec

log = logging.getLogger("hub_extension.engine")


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # float32, shape [len(inputs), dim], rows of unit length
    prompt_tokens: int


@dataclass
class _Job:
    ids: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    out: list[np.ndarray | None] = field(default_factory=list)
    done: int = 0


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
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self.step_threads: set[int] = set()
        self._hook = model.register_forward_pre_hook(
            lambda m, a: self.step_threads.add(threading.get_ident())
        )
        self._thread = threading.Thread(target=self._work, name=f"embed-{spec.name}", daemon=True)
        self._thread.start()

    def in_flight(self) -> int:
        return self._pending

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    async def embed(self, texts: list[str]) -> EmbeddingResult:
        if not texts:
            raise BadRequest("`input` must not be empty.", param="input")
        if self._pending >= self.spec.max_queue + self.spec.max_concurrency:
            raise RateLimited(f"The model '{self.name}' is at capacity; retry shortly.", retry_after=1.0)
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.context_length:
                raise BadRequest(
                    f"Input {i} has {len(row)} tokens; the model '{self.name}' takes at most "
                    f"{self.context_length}.",
                    param="input",
                    code="context_length_exceeded",
                )
        loop = asyncio.get_running_loop()
        job = _Job(ids=ids, loop=loop, future=loop.create_future(), out=[None] * len(ids))
        self._pending += 1
        self._jobs.put(job)
        try:
            vectors = await job.future
        finally:
            self._pending -= 1
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(r) for r in ids))

    # -- worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            jobs = [job]
            size = len(job.ids)
            while size < self.spec.batch_size:  # take what else is waiting, up to a batch
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
                size += len(more.ids)
            rows = [(j, i, ids) for j in jobs for i, ids in enumerate(j.ids)]
            try:
                for start in range(0, len(rows), self.spec.batch_size):
                    chunk = rows[start : start + self.spec.batch_size]
                    vecs = self._encode([ids for _, _, ids in chunk])
                    for (j, i, _), v in zip(chunk, vecs, strict=True):
                        j.out[i] = v
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, np.stack(j.out), None)
            except Exception as e:
                log.exception("embedding failed for model %r", self.name)
                for j in jobs:
                    j.loop.call_soon_threadsafe(_resolve, j.future, None, e)

    @torch.inference_mode()
    def _encode(self, batch: list[list[int]]) -> np.ndarray:
        enc = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu().numpy().astype(np.float32)

    def close(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
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
