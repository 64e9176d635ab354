"""Knowledge collections at scale: add 20,000 chunks with the real MiniLM, then search them.

    .venv/bin/python bench/collections.py [--chunks 20000] [--searches 100] [--chars 160] [--no-postgresql]
                                          [--random-vectors] [--threads N]

`KnowledgeBase` runs in this process on SQLite: documents (one chunk each, `chars` characters of varied
sentences) go in through `add_documents` in requests of 100, embedded in batches and stored, which gives chunks
embedded (and stored) per second. Then `searches` searches, each what `POST /api/collections/{name}/search` does
minus HTTP: read the collection's row, embed the query, one matrix-vector product over the cached matrix, read the
best chunks' texts. The first search after the adds loads the matrix from the database (reported on its own as
"cold"); the rest are timed for p50/p95. The same chunks and vectors are then stored in a PostgreSQL collection
(no second embedding) and searched the same way. `--random-vectors` skips the embedding of the chunks (random
unit vectors instead: the same search work, minutes sooner).

Prints chunks/s, the cold search, search p50/p95 per database and the matrix product alone, and as its last line
`search_p95_ms=<the higher p95 of the databases>`. Goal: <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pg import temp_database  # noqa: E402

SUBJECTS = ["the river", "a small robot", "the old library", "our team", "the volcano", "a quiet village",
            "the spacecraft", "the market", "a young chess player", "the orchestra", "the bakery", "the glacier",
            "a software library", "the harbour", "the forest", "a research lab", "the museum", "the train"]
VERBS = ["measured", "celebrated", "rebuilt", "explored", "predicted", "described", "replaced", "protected",
         "painted", "simulated", "catalogued", "repaired", "studied", "photographed", "translated", "designed"]
OBJECTS = ["the tides of the northern coast", "a new sourdough recipe", "rare manuscripts from Venice",
           "solar panels on every roof", "the migration of birds", "an opening in the endgame",
           "the lava flows of last spring", "a faster sorting algorithm", "ancient coins", "the winter festival",
           "a bridge over the canyon", "the spread of a fungus", "quantum sensors", "the local football league",
           "melting ice sheets", "a map of the night sky", "folk songs of the valley", "wind turbines"]
QUERIES = ["who studied bird migration", "a recipe for bread", "sorting algorithms that are fast",
           "volcanic eruptions and lava", "maps of stars", "renewable energy on houses", "chess endgames",
           "old books and manuscripts", "glaciers melting", "music of the mountains"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} in {rng.randint(1800, 2030)}."


def document(rng: random.Random, chars: int) -> str:
    text = ""
    while len(text) < chars:
        text += sentence(rng) + " "
    return text[:chars].rsplit(" ", 1)[0]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def time_searches(kb, user_id: int, searches: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    await kb.search(user_id, "bench", QUERIES[0], 5)
    cold = (time.perf_counter() - t0) * 1000
    times = []
    for i in range(searches):
        t0 = time.perf_counter()
        found = await kb.search(user_id, "bench", QUERIES[i % len(QUERIES)], 5)
        times.append((time.perf_counter() - t0) * 1000)
        assert len(found["results"]) == 5
    return cold, times


def new_user(db) -> int:
    from hub_extension.orm import User

    def make(session):
        row = User(name="bench", hub_groups=[], hub_roles=[])
        session.add(row)
        session.flush()
        return row.id

    return db.call(make)


async def main(args) -> None:
    import numpy as np

    from hub_extension.db import Database
    from hub_extension.engine import ModelManager, parse_registry
    from hub_extension.knowledge import KnowledgeBase, _top

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rng = random.Random(7)
    texts = [document(rng, args.chars) for _ in range(args.chunks)]
    manager = ModelManager(parse_registry({"models": [
        {"name": "minilm", "source": "builtin:minilm", "task": "embedding", "context_length": 256}]}))
    await manager.get("minilm")
    import torch

    print(f"MiniLM on CPU, torch threads: {torch.get_num_threads()}, {args.chars}-character chunks")
    p95s = []
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{Path(tmp) / 'bench.sqlite'}")
        db.upgrade()
        kb = KnowledgeBase(db, models=manager, chunk_chars=300, max_chunks_per_collection=max(args.chunks, 100_000))
        user = new_user(db)
        await kb.create(user, {"name": "bench", "description": ""})
        t0 = time.perf_counter()
        if args.random_vectors:  # the search timing only: the same rows, with random unit vectors
            vectors = np.random.default_rng(7).standard_normal((len(texts), 384)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            cid = await db.run(_id_of, user)
            for start in range(0, len(texts), 1000):
                docs = [{"title": f"doc {i}", "text": t} for i, t in enumerate(texts[start:start + 1000], start)]
                await db.run(kb._store, user, "bench", cid, docs, [[d["text"]] for d in docs],
                             vectors[start:start + 1000])
            print(f"stored {len(texts)} chunks with random vectors (no embedding) in {time.perf_counter() - t0:.1f} s")
        else:
            for start in range(0, len(texts), 100):
                docs = [{"title": f"doc {i}", "text": t} for i, t in enumerate(texts[start:start + 100], start)]
                await kb.add_documents(user, "bench", docs)
            elapsed = time.perf_counter() - t0
            print(f"added {len(texts)} chunks in {elapsed:.1f} s: {len(texts) / elapsed:.0f} chunks embedded and "
                  f"stored per second (SQLite)")
        backends = [("sqlite", db, kb)]
        pg = temp_database("jhi_bench_collections") if args.postgresql else None
        if pg is not None:
            url = pg.__enter__()
            pg_db = Database(url)
            pg_db.upgrade()
            pg_kb = KnowledgeBase(db=pg_db, models=manager, max_chunks_per_collection=max(args.chunks, 100_000))
            pg_user = new_user(pg_db)
            await pg_kb.create(pg_user, {"name": "bench", "description": ""})
            matrix = await kb._matrix(await db.run(_state_of, user))
            kb._cache.clear()  # so that SQLite's first search below loads its matrix, as PostgreSQL's does
            t0 = time.perf_counter()
            for start in range(0, len(texts), 1000):
                docs = [{"title": f"doc {i}", "text": t} for i, t in enumerate(texts[start:start + 1000], start)]
                await pg_db.run(pg_kb._store, pg_user, "bench", await pg_db.run(_id_of, pg_user), docs,
                                [[d["text"]] for d in docs], matrix.vectors[start:start + 1000])
            print(f"stored the same {len(texts)} chunks in PostgreSQL in {time.perf_counter() - t0:.1f} s")
            backends.append(("postgresql", pg_db, pg_kb))
        for name, _db, base in backends:
            owner = user if base is kb else pg_user
            cold, times = await time_searches(base, owner, args.searches)
            p50, p95 = pct(times, 50), pct(times, 95)
            p95s.append(p95)
            print(f"{name}: first search {cold:.1f} ms (loads the matrix); {args.searches} searches: "
                  f"p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        matrix = await kb._matrix(await db.run(_state_of, user))
        query = matrix.vectors[0].copy()
        product = []
        for _ in range(args.searches):
            t0 = time.perf_counter()
            _top(matrix, query, 5)
            product.append((time.perf_counter() - t0) * 1000)
        print(f"matrix {matrix.vectors.shape[0]}x{matrix.vectors.shape[1]} float32 "
              f"({matrix.vectors.nbytes / 2**20:.0f} MiB): product + top-k p50 {pct(product, 50):.2f} ms, "
              f"p95 {pct(product, 95):.2f} ms")
        assert np.isfinite(matrix.vectors).all()
        for _name, database, _kb in backends:
            database.close()
        if pg is not None:
            pg.__exit__(None, None, None)
    await manager.close()
    print(f"search_p95_ms={max(p95s):.1f}")


def _state_of(session, user_id: int):
    from hub_extension.knowledge import _state

    return _state(session, user_id, "bench")


def _id_of(session, user_id: int) -> int:
    return _state_of(session, user_id).id


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--searches", type=int, default=100)
    parser.add_argument("--chars", type=int, default=160, help="characters per chunk (one sentence or two)")
    parser.add_argument("--no-postgresql", dest="postgresql", action="store_false")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--random-vectors", action="store_true",
                        help="store random unit vectors instead of embedding the chunks (search timing only)")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
