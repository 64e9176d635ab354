"""Knowledge collections (R2): a user's documents, cut into overlapping chunks, embedded and searched by cosine.

**Storage.** Chunks and their embeddings (float32 bytes of unit-length vectors, so cosine similarity is a dot
product) live in the service database, SQLite or PostgreSQL. A collection belongs to a user row; another user's
collection is never found (404), however it is named.

**Search speed.** Each process keeps, per collection, the matrix of its embeddings in memory (bounded by
`cache_mb`, least recently used first out), so a search is one matrix-vector product and `argpartition`, not a
scan of the database. Every change of a collection's chunks raises `collections.version` in the same transaction,
and every search reads that version with the collection's row (which it needs anyway for ownership), so a
process sees at once that another process changed the collection and reloads its matrix.

**Embedding.** The collection's model (`embedding_model`, by default the first embedding model configured) is
recorded with the collection, so its documents and queries always meet in the same space. Texts go to the model
in batches of `embed_batch`. The tokens count as usage (endpoint `/api/collections/documents` or
`/api/collections/search`) and against the caller's quota, reserved before and settled after, like
`/v1/embeddings`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from traitlets import Integer, Unicode, validate
from traitlets.config import LoggingConfigurable

from .audit import AuditLog
from .db import Database
from .errors import ApiError, BadRequest, Conflict, NotFound, ServiceUnavailable
from .orm import Collection, CollectionChunk, CollectionDocument, User, utcnow
from .presets import check_name
from .quotas import Reservation, estimate_tokens

log = logging.getLogger("hub_extension.knowledge")

ADD_ENDPOINT = "/api/collections/documents"
SEARCH_ENDPOINT = "/api/collections/search"
MAX_TITLE_CHARS = 255
MAX_DESCRIPTION_CHARS = 2000
MAX_QUERY_CHARS = 2000
_BLANKS = (" ", "\n", "\t")


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """`text` in pieces of at most `size` characters, each starting `overlap` characters (about: cuts move to
    the nearest blank) before the previous one ended, so a sentence cut in two is whole in one of them."""
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    chunks: list[str] = []
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + size)
        if end < n:  # end at a blank in the second half of the window, if there is one
            cut = max(text.rfind(b, start + size // 2, end) for b in _BLANKS)
            if cut > start:
                end = cut
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= n:
            break
        nxt = max(end - overlap, start + 1)
        blanks = [i for i in (text.find(b, nxt, end) for b in _BLANKS) if i != -1]
        start = min(blanks) + 1 if blanks else nxt  # begin at a word
    return chunks


def collection_model(row: Collection, owner: str | None = None) -> dict:
    out = {
        "name": row.name,
        "description": row.description,
        "embedding_model": row.embedding_model,
        "documents": row.documents,
        "chunks": row.chunks,
        "created_at": row.created_at.isoformat() + "Z",
        "updated_at": row.updated_at.isoformat() + "Z",
    }
    if owner is not None:
        out["user"] = owner
    return out


def document_model(row: CollectionDocument) -> dict:
    return {"id": row.id, "title": row.title, "characters": row.characters, "chunks": row.chunks,
            "created_at": row.created_at.isoformat() + "Z"}


@dataclass(frozen=True)
class _State:
    """What a search or an add needs of a collection row."""

    id: int
    version: int
    model: str
    dimensions: int | None
    chunks: int


@dataclass
class _Matrix:
    version: int
    ids: np.ndarray  # int64 chunk ids, one per row
    vectors: np.ndarray  # float32 [rows, dimensions], unit length

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.vectors.nbytes


class KnowledgeBase(LoggingConfigurable):
    """Collections, their documents and search (see the module). Handlers pass the caller's identity; the
    component knows nothing of HTTP."""

    embedding_model = Unicode(
        "", help="The model that embeds collections (an embedding model of the registry). Empty: the first "
        "embedding model configured."
    ).tag(config=True)
    chunk_chars = Integer(800, help="Characters per chunk (keep it within the embedding model's context).").tag(
        config=True
    )
    chunk_overlap = Integer(120, help="Characters a chunk shares with the one before it.").tag(config=True)
    embed_batch = Integer(64, help="Texts sent to the embedding model at a time.").tag(config=True)
    max_collections_per_user = Integer(50, help="Collections one user may keep.").tag(config=True)
    max_documents_per_request = Integer(100, help="Documents one request may add.").tag(config=True)
    max_document_chars = Integer(200_000, help="Longest document accepted (characters).").tag(config=True)
    max_chunks_per_collection = Integer(100_000, help="Chunks one collection may hold.").tag(config=True)
    max_top_k = Integer(50, help="The most results one search may ask for.").tag(config=True)
    cache_mb = Integer(
        512, help="Memory for the per-collection embedding matrices this process keeps (MiB); 0: none."
    ).tag(config=True)

    @validate("chunk_chars", "embed_batch", "max_top_k", "max_documents_per_request", "max_document_chars")
    def _validate_positive(self, proposal):
        if proposal.value < 1:
            raise ValueError(f"KnowledgeBase.{proposal.trait.name} must be at least 1")
        return proposal.value

    @validate("chunk_overlap")
    def _validate_overlap(self, proposal):
        if not 0 <= proposal.value < self.chunk_chars:
            raise ValueError("KnowledgeBase.chunk_overlap must be at least 0 and less than chunk_chars")
        return proposal.value

    def __init__(self, db: Database | None = None, models: Any = None, quotas: Any = None,
                 usage_sink: Callable[[dict], None] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.db = db
        self.models = models
        self.quotas = quotas
        self.usage_sink = usage_sink
        self._cache: OrderedDict[int, _Matrix] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.matrix_loads = 0  # counted so tests can see when the cache was (not) used

    # -- the embedding model ------------------------------------------------------------------------------

    def model_name(self) -> str:
        """The model new collections embed with; 503 when none is configured."""
        if self.embedding_model:
            return self.embedding_model
        manager = self.models
        for name in manager.names() if manager is not None else []:
            if manager.spec(name).task == "embedding":
                return name
        raise ServiceUnavailable("No embedding model is configured, so collections are not available.")

    async def embed(self, model: str, texts: list[str], identity=None, *, endpoint: str = ADD_ENDPOINT,
                    ) -> tuple[np.ndarray, int]:
        """Unit vectors for `texts` and the tokens they took, in batches of `embed_batch`. With an `identity`,
        metered like `/v1/embeddings`: its quota reserved before (429 when over) and settled after, one usage
        event whatever came of it."""
        started, arrived = time.perf_counter(), time.time()
        reservation = Reservation(None)
        tokens, status, ran = 0, 200, False
        try:
            if identity is not None and self.quotas is not None:
                reservation = self.quotas.reserve(identity, estimate_tokens(texts))  # 429 when over a limit
            spec = self.models.spec(model) if self.models is not None else None
            if spec is None or spec.task != "embedding":
                raise ServiceUnavailable(f"The embedding model '{model}' of this collection is not served now.")
            backend = await self.models.get(model)
            ran = True
            parts = []
            for start in range(0, len(texts), self.embed_batch):
                result = await backend.embed(texts[start:start + self.embed_batch])
                parts.append(np.asarray(result.vectors, dtype=np.float32))
                tokens += result.prompt_tokens
            return np.concatenate(parts), tokens
        except ApiError as e:
            status = e.status
            if e.code == "context_length_exceeded":
                raise BadRequest(f"A chunk is longer than the model '{model}' takes ({e.message}); the service's "
                                 "KnowledgeBase.chunk_chars is set too high for it.", code="context_length_exceeded"
                                 ) from None
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except BaseException:
            status = 500
            raise
        finally:
            if ran:
                reservation.settle(tokens)
            else:
                reservation.release()
            if identity is not None and self.usage_sink is not None:
                self._record(identity, model, endpoint, tokens, status, started, arrived)

    def _record(self, identity, model: str, endpoint: str, tokens: int, status: int, started: float,
                arrived: float) -> None:
        try:
            self.usage_sink({
                "time": arrived, "user": identity.name, "credential": identity.via, "user_id": identity.user_id,
                "key_id": identity.key_id, "acting_admin": identity.acting_admin, "model": model,
                "endpoint": endpoint, "prompt_tokens": tokens, "completion_tokens": 0,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3), "ttft_ms": None,
                "status": status, "streamed": False,
            })
        except Exception:
            log.exception("usage recording failed")

    # -- input checks (no I/O) ---------------------------------------------------------------------------

    def parse_collection(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")
        unknown = set(body) - {"name", "description"}
        if unknown:
            key = sorted(unknown)[0]
            raise BadRequest(f"Unknown field '{key}' (allowed: name, description).", param=key,
                             code="unknown_parameter")
        description = body.get("description") or ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise BadRequest(f"'description' must be a string of at most {MAX_DESCRIPTION_CHARS} characters.",
                             param="description", code="invalid_value")
        return {"name": check_name(body.get("name")), "description": description}

    def parse_documents(self, body: Any) -> list[dict]:
        """`{"documents": [{"text": ..., "title": ...} | "text", ...]}`, every text non-empty and bounded."""
        docs = body.get("documents") if isinstance(body, dict) else None
        if not isinstance(docs, list) or not docs:
            raise BadRequest("'documents' must be a non-empty array.", param="documents", code="invalid_value")
        if len(docs) > self.max_documents_per_request:
            raise BadRequest(f"One request may add at most {self.max_documents_per_request} documents, got "
                             f"{len(docs)}; split it.", param="documents", code="invalid_value")
        out = []
        for i, doc in enumerate(docs):
            doc = {"text": doc} if isinstance(doc, str) else doc
            if not isinstance(doc, dict) or set(doc) - {"text", "title"}:
                raise BadRequest(f"Document {i} must be a string or an object with 'text' and 'title'.",
                                 param="documents", code="invalid_value")
            text, title = doc.get("text"), doc.get("title") or ""
            if not isinstance(text, str) or not text.strip():
                raise BadRequest(f"Document {i} is empty.", param="documents", code="invalid_value")
            if len(text) > self.max_document_chars:
                raise BadRequest(f"Document {i} has {len(text)} characters; the most is {self.max_document_chars}.",
                                 param="documents", code="invalid_value")
            if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
                raise BadRequest(f"The title of document {i} must be a string of at most {MAX_TITLE_CHARS} "
                                 "characters.", param="documents", code="invalid_value")
            out.append({"text": text, "title": title})
        return out

    def parse_search(self, body: Any) -> tuple[str, int]:
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")
        query, top_k = body.get("query"), body.get("top_k", 5)
        if not isinstance(query, str) or not query.strip() or len(query) > MAX_QUERY_CHARS:
            raise BadRequest(f"'query' must be a non-empty string of at most {MAX_QUERY_CHARS} characters.",
                             param="query", code="invalid_value")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.max_top_k:
            raise BadRequest(f"'top_k' must be an integer from 1 to {self.max_top_k}.", param="top_k",
                             code="invalid_value")
        return query, top_k

    # -- collections ---------------------------------------------------------------------------------------

    async def list(self, user_id: int) -> list[dict]:
        return await self.db.run(self._list, user_id) if user_id else []

    @staticmethod
    def _list(session: Session, user_id: int) -> list[dict]:
        rows = session.execute(select(Collection).where(Collection.user_id == user_id).order_by(Collection.name))
        return [collection_model(r) for r in rows.scalars()]

    async def list_all(self, limit: int = 1000) -> list[dict]:
        """Everyone's collections with their owners (for admins)."""
        return await self.db.run(self._list_all, limit)

    @staticmethod
    def _list_all(session: Session, limit: int) -> list[dict]:
        rows = session.execute(select(Collection, User.name).join(User, User.id == Collection.user_id)
                               .order_by(User.name, Collection.name).limit(limit))
        return [collection_model(c, owner) for c, owner in rows]

    async def get(self, user_id: int, name: str) -> dict:
        return await self.db.run(lambda s: collection_model(_owned(s, user_id, name)))

    async def create(self, user_id: int, fields: dict) -> dict:
        model = self.model_name()
        return await self.db.run(self._create, user_id, fields, model, self.max_collections_per_user)

    @staticmethod
    def _create(session: Session, user_id: int, fields: dict, model: str, limit: int) -> dict:
        count = session.execute(select(func.count()).select_from(Collection).where(Collection.user_id == user_id))
        if count.scalar() >= limit:
            raise BadRequest(f"You may keep at most {limit} collections; delete one first.", code="limit_reached")
        taken = Conflict(f"You already have a collection named '{fields['name']}'.")
        if _find(session, user_id, fields["name"]) is not None:
            raise taken
        now = utcnow()
        row = Collection(user_id=user_id, name=fields["name"], description=fields["description"],
                         embedding_model=model, version=0, documents=0, chunks=0, created_at=now, updated_at=now)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            raise taken from None
        return collection_model(row)

    async def delete(self, user_id: int, name: str | None, *, audit: dict | None = None) -> int:
        """Delete one collection (404 if the user has none of that name) or, `name` None, all of theirs, with
        their documents and chunks; returns how many went. `audit`: recorded in the same transaction."""
        ids = await self.db.run(self._delete, user_id, name, audit)
        with self._cache_lock:
            for cid in ids:
                self._cache.pop(cid, None)
        return len(ids)

    @staticmethod
    def _delete(session: Session, user_id: int, name: str | None, audit: dict | None) -> list[int]:
        if name is not None:
            rows = [_owned(session, user_id, name)]
        else:
            rows = list(session.execute(select(Collection).where(Collection.user_id == user_id)).scalars())
        ids = [r.id for r in rows]
        if ids:
            session.execute(delete(CollectionChunk).where(CollectionChunk.collection_id.in_(ids)))
            session.execute(delete(CollectionDocument).where(CollectionDocument.collection_id.in_(ids)))
            session.execute(delete(Collection).where(Collection.id.in_(ids)))
        if audit is not None:
            AuditLog.add(session, action="collections.deleted",
                         details={"names": sorted(r.name for r in rows)[:100], "count": len(ids),
                                  "chunks": sum(r.chunks for r in rows)}, **audit)
        return ids

    # -- documents -------------------------------------------------------------------------------------------

    async def documents(self, user_id: int, name: str) -> list[dict]:
        return await self.db.run(self._documents, user_id, name)

    @staticmethod
    def _documents(session: Session, user_id: int, name: str) -> list[dict]:
        cid = _owned(session, user_id, name).id
        rows = session.execute(select(CollectionDocument).where(CollectionDocument.collection_id == cid)
                               .order_by(CollectionDocument.id))
        return [document_model(r) for r in rows.scalars()]

    async def add_documents(self, user_id: int, name: str, docs: list[dict], identity=None) -> dict:
        """Chunk, embed (metered for `identity`) and store `docs` (from `parse_documents`)."""
        state = await self.db.run(_state, user_id, name)
        pieces = [chunk_text(d["text"], self.chunk_chars, self.chunk_overlap) for d in docs]
        total = sum(map(len, pieces))
        if state.chunks + total > self.max_chunks_per_collection:
            raise BadRequest(f"The collection would hold {state.chunks + total} chunks; the most is "
                             f"{self.max_chunks_per_collection}.", param="documents", code="invalid_value")
        vectors, tokens = await self.embed(state.model, [p for ps in pieces for p in ps], identity,
                                           endpoint=ADD_ENDPOINT)
        added = await self.db.run(self._store, user_id, name, state.id, docs, pieces, vectors,
                                  limit=self.max_chunks_per_collection)
        return {"documents": added, "chunks": total, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @staticmethod
    def _store(session: Session, user_id: int, name: str, cid: int, docs: list[dict], pieces: list[list[str]],
               vectors: np.ndarray, limit: int | None = None) -> list[dict]:
        row = _owned(session, user_id, name, lock=True)  # concurrent adds to one collection take turns here
        if row.id != cid:  # deleted and made again while we embedded
            raise Conflict(f"The collection '{name}' changed while the documents were embedded; retry.")
        added = sum(map(len, pieces))
        if limit is not None and row.chunks + added > limit:  # other documents were added meanwhile
            raise BadRequest(f"The collection would hold {row.chunks + added} chunks; the most is {limit}.",
                             param="documents", code="invalid_value")
        dims = int(vectors.shape[1])
        if row.dimensions is not None and row.dimensions != dims:
            raise Conflict(f"The collection holds {row.dimensions}-dimensional embeddings, not {dims}.")
        now, docs_out, chunk_rows, at = utcnow(), [], [], 0
        for doc, texts in zip(docs, pieces, strict=True):
            d = CollectionDocument(collection_id=cid, title=doc["title"], characters=len(doc["text"]),
                                   chunks=len(texts), created_at=now)
            session.add(d)
            session.flush()
            docs_out.append(document_model(d))
            for position, text in enumerate(texts):
                chunk_rows.append({"collection_id": cid, "document_id": d.id, "position": position, "text": text,
                                   "embedding": vectors[at].astype(np.float32).tobytes()})
                at += 1
        for start in range(0, len(chunk_rows), 1000):
            session.execute(CollectionChunk.__table__.insert(), chunk_rows[start:start + 1000])
        # Counters and version in one statement: concurrent adds from other processes never lose an update.
        session.execute(update(Collection).where(Collection.id == cid).values(
            version=Collection.version + 1, documents=Collection.documents + len(docs),
            chunks=Collection.chunks + len(chunk_rows), dimensions=dims, updated_at=now))
        return docs_out

    async def delete_document(self, user_id: int, name: str, document_id: int) -> None:
        await self.db.run(self._delete_document, user_id, name, document_id)

    @staticmethod
    def _delete_document(session: Session, user_id: int, name: str, document_id: int) -> None:
        cid = _owned(session, user_id, name).id
        doc = session.execute(select(CollectionDocument).where(
            CollectionDocument.id == document_id, CollectionDocument.collection_id == cid)).scalar_one_or_none()
        if doc is None:
            raise NotFound("No such document in this collection.")
        session.execute(delete(CollectionChunk).where(CollectionChunk.document_id == doc.id))
        session.execute(update(Collection).where(Collection.id == cid).values(
            version=Collection.version + 1, documents=Collection.documents - 1,
            chunks=Collection.chunks - doc.chunks, updated_at=utcnow()))
        session.delete(doc)

    # -- search ---------------------------------------------------------------------------------------------

    async def search(self, user_id: int, name: str, query: str, top_k: int, identity=None) -> dict:
        """The `top_k` chunks most like `query` (cosine similarity), best first."""
        state = await self.db.run(_state, user_id, name)
        vectors, tokens = await self.embed(state.model, [query], identity, endpoint=SEARCH_ENDPOINT)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        matrix = await self._matrix(state)
        if matrix.ids.size == 0:
            return {"results": [], "usage": usage}
        ids, scores = await asyncio.to_thread(_top, matrix, vectors[0], top_k)
        found = await self.db.run(_chunks, state.id, ids)
        results = [found[i] | {"score": round(float(s), 6)} for i, s in zip(ids, scores, strict=True) if i in found]
        return {"results": results, "usage": usage}

    async def _matrix(self, state: _State) -> _Matrix:
        with self._cache_lock:
            cached = self._cache.get(state.id)
            if cached is not None and cached.version == state.version:
                self._cache.move_to_end(state.id)
                return cached
        matrix = await self.db.run(_load_matrix, state.id, state.dimensions)
        self.matrix_loads += 1
        self._keep(state.id, matrix)
        return matrix

    def _keep(self, cid: int, matrix: _Matrix) -> None:
        budget = self.cache_mb * 1024 * 1024
        with self._cache_lock:
            self._cache.pop(cid, None)
            if matrix.nbytes > budget:
                return
            self._cache[cid] = matrix
            while sum(m.nbytes for m in self._cache.values()) > budget:
                self._cache.popitem(last=False)


def _find(session: Session, user_id: int, name: str, lock: bool = False) -> Collection | None:
    query = select(Collection).where(Collection.user_id == user_id, Collection.name == name)
    return session.execute(query.with_for_update() if lock else query).scalar_one_or_none()


def _owned(session: Session, user_id: int, name: str, lock: bool = False) -> Collection:
    """The user's collection `name`; 404 otherwise (another user's of the same name included). `lock`: until the
    transaction ends (PostgreSQL; SQLite has one writer at a time anyway)."""
    row = _find(session, user_id, name, lock) if user_id else None
    if row is None:
        raise NotFound(f"No such collection: {name}")
    return row


def _state(session: Session, user_id: int, name: str) -> _State:
    row = _owned(session, user_id, name)
    return _State(row.id, row.version, row.embedding_model, row.dimensions, row.chunks)


def _load_matrix(session: Session, cid: int, dimensions: int | None) -> _Matrix:
    """The collection's embeddings as one matrix. The version is read first: a change committed between the two
    reads makes the matrix newer than its label, which costs one more load later, never a stale answer."""
    version = session.execute(select(Collection.version).where(Collection.id == cid)).scalar_one_or_none()
    rows = session.execute(select(CollectionChunk.id, CollectionChunk.embedding)
                           .where(CollectionChunk.collection_id == cid).order_by(CollectionChunk.id)).all()
    if not rows:
        return _Matrix(version or 0, np.zeros(0, np.int64), np.zeros((0, dimensions or 1), np.float32))
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    flat = np.frombuffer(bytearray(b"".join(bytes(r[1]) for r in rows)), dtype=np.float32)  # writable: torch
    return _Matrix(version or 0, ids, flat.reshape(len(rows), -1))


def _top(matrix: _Matrix, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """The `k` best rows by dot product (cosine: the rows are unit vectors), best first.

    With torch rather than numpy: it runs on the thread pool the embedding model already uses, where numpy's
    OpenBLAS would start a second pool of as many threads that fights it for the cores (measured: 3x slower
    searches on a busy 2-core machine)."""
    import torch

    scores = torch.mv(torch.from_numpy(matrix.vectors), torch.from_numpy(np.ascontiguousarray(query, np.float32)))
    best = torch.topk(scores, min(k, scores.numel()))
    return [int(matrix.ids[i]) for i in best.indices.tolist()], best.values.tolist()


def _chunks(session: Session, cid: int, ids: list[int]) -> dict[int, dict]:
    rows = session.execute(
        select(CollectionChunk.id, CollectionChunk.text, CollectionChunk.position, CollectionDocument.id,
               CollectionDocument.title)
        .join(CollectionDocument, CollectionDocument.id == CollectionChunk.document_id)
        .where(CollectionChunk.collection_id == cid, CollectionChunk.id.in_(ids))
    )
    return {cid_: {"text": text, "position": pos, "document": {"id": did, "title": title}}
            for cid_, text, pos, did, title in rows}
