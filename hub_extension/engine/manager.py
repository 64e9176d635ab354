"""The `ModelManager`: every backend by name, loaded at start or on first use, unloaded when idle.

Loading runs on a daemon thread of its own, so a model loading for a minute never stalls the other models'
streams, and a process asked to stop meanwhile need not wait for it (`loads_in_progress`). The manager knows
models only: who may use which is the handlers' question.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound, ServiceUnavailable
from .registry import ModelSpec, Registry, load_registry

log = logging.getLogger("hub_extension.engine")


@dataclass
class ModelInfo:
    """What `/v1/models` shows about a model."""

    name: str
    task: str
    kind: str  # "local" or "upstream"
    loaded: bool
    context_length: int | None
    created: int
    description: str = ""


class _Slot:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.backend: Any = None
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.error: str | None = None


class ModelManager:
    """Holds the backends. Construct with `ModelManager.from_config(path)`, then `await start()`."""

    def __init__(self, registry: Registry, *, reap_interval: float = 5.0):
        self.registry = registry
        self._slots = {name: _Slot(spec) for name, spec in registry.models.items()}
        self._created = int(time.time())
        self._reaper: asyncio.Task | None = None
        self._reap_interval = reap_interval
        self._closed = False

    @classmethod
    def from_config(cls, path: str | os.PathLike, **kw) -> ModelManager:
        """Read and validate the registry file (raises `ConfigError` naming the model and field)."""
        return cls(load_registry(path), **kw)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the `load: startup` models (in threads, one after another) and start the idle reaper.

        A model that fails to load is logged and skipped: the others still serve, and it answers 503 (another
        load is tried per request, so one fixed meanwhile, e.g. a file restored, comes back without a restart)."""
        for slot in self._slots.values():
            if slot.spec.load == "startup":
                try:
                    await self._ensure_loaded(slot)
                except ServiceUnavailable:
                    continue
        if any(s.spec.idle_unload_seconds > 0 for s in self._slots.values()):
            self._reaper = asyncio.create_task(self._reap_idle())

    async def close(self) -> None:
        """Stop every backend's threads; bounded so SIGTERM ends the service in seconds."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        backends = [s.backend for s in self._slots.values() if s.backend is not None]
        for slot in self._slots.values():
            slot.backend = None
        await _close_backends(backends)

    # -- look-ups ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._slots)

    def spec(self, name: str) -> ModelSpec | None:
        slot = self._slots.get(name)
        return slot.spec if slot else None

    def list_models(self) -> list[ModelInfo]:
        return [self._info(slot) for slot in self._slots.values()]

    def info(self, name: str) -> ModelInfo | None:
        slot = self._slots.get(name)
        return self._info(slot) if slot else None

    def _info(self, slot: _Slot) -> ModelInfo:
        b = slot.backend
        return ModelInfo(
            name=slot.spec.name,
            task=slot.spec.task,
            kind="upstream" if slot.spec.is_upstream else "local",
            loaded=b is not None,
            context_length=getattr(b, "context_length", None) or slot.spec.context_length,
            created=self._created,
            description=slot.spec.description,
        )

    async def get(self, name: str):
        """The backend for `name`, loading it first if needed. Unknown names raise `ModelNotFound` (404)."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(name)
        slot.last_used = time.monotonic()
        if slot.backend is None:
            await self._ensure_loaded(slot)
        return slot.backend

    def in_flight(self, name: str | None = None) -> int:
        """Work submitted and not yet finished or cancelled (sequences, requests or texts, as each backend
        counts it), for one model or all."""
        slots = [self._slots[name]] if name is not None else list(self._slots.values())
        return sum(s.backend.in_flight() for s in slots if s.backend is not None)

    def queued(self, name: str) -> int:
        """Work waiting for a slot: a text model's fair-share queue; for the others, what is admitted beyond
        what runs at once (`max_concurrency`, times `batch_size` for a local embedding model, which counts texts)."""
        slot = self._slots[name]
        backend = slot.backend
        if backend is None:
            return 0
        if hasattr(backend, "queued"):
            return backend.queued()
        spec = slot.spec
        at_once = spec.max_concurrency * (spec.batch_size if spec.task == "embedding" and not spec.is_upstream else 1)
        return max(0, backend.in_flight() - at_once)

    # -- loading and unloading ---------------------------------------------------------------------

    async def _ensure_loaded(self, slot: _Slot) -> None:
        if self._closed:
            raise ServiceUnavailable("The service is shutting down.", retry_after=5)
        async with slot.lock:  # concurrent first requests load once
            if slot.backend is not None:
                return
            spec = slot.spec
            t0 = time.perf_counter()
            log.info("loading model %r", spec.name)
            try:
                slot.backend = await _in_daemon_thread(_load, spec, self.registry.build_dir)
            except Exception as e:
                slot.error = f"{type(e).__name__}: {e}"
                log.error("model %r failed to load: %s", spec.name, slot.error)
                raise ServiceUnavailable(
                    f"The model '{spec.name}' could not be loaded.", retry_after=30
                ) from e
            slot.error = None
            slot.last_used = time.monotonic()
            log.info("model %r loaded in %.1f s", spec.name, time.perf_counter() - t0)

    async def unload(self, name: str) -> bool:
        """Unload `name` now if nothing is in flight; True if it was unloaded."""
        slot = self._slots[name]
        async with slot.lock:
            if slot.backend is None or slot.backend.in_flight() > 0:
                return False
            backends = [slot.backend]
            slot.backend = None
        log.info("unloading model %r", name)
        await _close_backends(backends)
        return True

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            now = time.monotonic()
            for name, slot in self._slots.items():
                idle = slot.spec.idle_unload_seconds
                if idle > 0 and slot.backend is not None and now - slot.last_used > idle:
                    try:
                        await self.unload(name)
                    except Exception:
                        log.exception("unloading model %r failed", name)


def _in_daemon_thread(fn, *args) -> asyncio.Future:
    """`fn(*args)` on a daemon thread of its own, awaited on the loop. Unlike `asyncio.to_thread`, a process asked
    to stop while a model loads (a minute for a big one) does not wait for the load to end before it exits."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is gone: the service stopped meanwhile
            pass

    thread = threading.Thread(target=work, name=f"load-{getattr(args[0], 'name', 'model')}", daemon=True)
    _LOADS.add(thread)
    thread.start()
    return future


_LOADS: set[threading.Thread] = set()  # every load thread started; finished ones are dropped when counted


def loads_in_progress() -> list[str]:
    """The models still loading on their daemon threads. A process exiting now must not run the interpreter's
    teardown under them: torch aborts the process (SIGABRT) when its native threads are torn down mid-load."""
    for thread in [t for t in _LOADS if not t.is_alive()]:
        _LOADS.discard(thread)
    return sorted(t.name.removeprefix("load-") for t in _LOADS)


_LOADING = threading.Lock()  # one model loads at a time: concurrent first imports of transformers fail


def _load(spec: ModelSpec, build_dir: Path):
    with _LOADING:
        return _load_one(spec, build_dir)


def _load_one(spec: ModelSpec, build_dir: Path):
    from . import loading

    if spec.upstream is not None:
        from .upstream import UpstreamBackend

        return UpstreamBackend(spec)
    if spec.task == "embedding":
        return loading.load_embedding(spec, build_dir)
    return loading.load_text(spec, build_dir)


async def _close_backends(backends: list) -> None:
    """Close and drop every backend in `backends` (the list is emptied: the caller's last reference)."""
    while backends:
        backend = backends.pop()
        if hasattr(backend, "aclose"):
            await backend.aclose()
        else:
            await asyncio.to_thread(backend.close)
        del backend
    # Free the weights now rather than at the next collection (matters for GPUs and big models). A full
    # collection of a process holding a model takes long enough to stall every stream: not on the loop.
    await asyncio.to_thread(gc.collect)
