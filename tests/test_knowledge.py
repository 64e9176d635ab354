"""Knowledge collections without Tornado, on SQLite and PostgreSQL, with the real MiniLM: chunking with overlap,
retrieval quality on a small fixture set, isolation between users, bad input, the per-process matrix cache seeing
another process's change, usage and quotas for embedding tokens, admin deletion audited."""

from __future__ import annotations

import pytest

from hub_extension.audit import AuditLog
from hub_extension.engine import ModelManager, parse_registry
from hub_extension.errors import BadRequest, NotFound, RateLimited
from hub_extension.identity import Identity
from hub_extension.knowledge import ADD_ENDPOINT, SEARCH_ENDPOINT, KnowledgeBase, chunk_text
from hub_extension.orm import User
from hub_extension.quotas import QuotaPolicy

AUDIT = {"actor": "root", "subject": "ann", "client_ip": None}
# A small fixture set: each query paraphrases one document and shares few words with it.
DOCUMENTS = {
    "volcanoes": "Volcanoes form where molten rock from the mantle reaches the surface. Eruptions release lava, "
                 "ash and gases; Mount Etna in Sicily is among the most active.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast and lactic acid bacteria. Feed the starter "
                 "flour and water daily, then bake the dough in a hot Dutch oven.",
    "tides": "Ocean tides are caused mostly by the Moon's gravity pulling on the Earth's seas, with a smaller "
             "effect from the Sun; most coasts see two high tides a day.",
    "chess": "In chess, castling moves the king two squares toward a rook, which jumps to the other side. It is "
             "allowed only if neither piece has moved and the king is not in check.",
    "photosynthesis": "Plants turn sunlight, water and carbon dioxide into sugar and oxygen in their chloroplasts; "
                      "chlorophyll absorbs mostly red and blue light.",
    "python": "Python lists are mutable sequences; a list comprehension builds a new list from an iterable, and "
              "sorted() returns a new sorted list without changing the original.",
}
QUERIES = {
    "Why does the sea level rise and fall twice daily?": "tides",
    "How do I bake bread with natural leaven?": "sourdough",
    "What happens when magma erupts from a mountain?": "volcanoes",
    "Can my king swap places with a rook?": "chess",
    "How do leaves make food from light?": "photosynthesis",
    "How to order items of an array in a programming language": "python",
}
ANN = Identity(name="ann", via="hub_token", is_admin=False, user_id=1)


@pytest.fixture(scope="module")
async def models():
    """The real MiniLM behind a real model manager, loaded once for the module."""
    manager = ModelManager(parse_registry({"models": [
        {"name": "minilm", "source": "builtin:minilm", "task": "embedding", "context_length": 256}]}))
    await manager.get("minilm")
    yield manager
    await manager.close()



@pytest.fixture
def users(db) -> dict[str, int]:
    def make(session):
        rows = [User(name=n, hub_groups=[], hub_roles=[]) for n in ("ann", "bob")]
        session.add_all(rows)
        session.flush()
        return {r.name: r.id for r in rows}

    return db.call(make)


@pytest.fixture
def kb(db, models):
    return KnowledgeBase(db, models=models, chunk_chars=300, chunk_overlap=60)


async def filled(kb: KnowledgeBase, user_id: int, name: str = "notes") -> dict:
    await kb.create(user_id, kb.parse_collection({"name": name}))
    docs = kb.parse_documents({"documents": [{"title": t, "text": x} for t, x in DOCUMENTS.items()]})
    return await kb.add_documents(user_id, name, docs)


def test_chunks_overlap_and_end_at_words():
    words = [f"w{i:03d}" for i in range(300)]  # 1,499 characters, every word 4 long
    chunks = chunk_text(" ".join(words), 200, 50)
    assert all(len(c) <= 200 for c in chunks)
    assert all(set(c.split()) <= set(words) for c in chunks)  # no word is ever cut
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = set(before.split()) & set(after.split())
        assert 5 <= len(shared) <= 12  # about 50 characters of overlap
    assert chunks[0].split()[0] == "w000" and chunks[-1].split()[-1] == "w299"
    assert chunk_text("  short  ", 200, 50) == ["short"] and chunk_text("   ", 200, 50) == []


async def test_the_relevant_document_ranks_first(kb, users):
    added = await filled(kb, users["ann"])
    assert added["chunks"] == len(DOCUMENTS) and added["usage"]["prompt_tokens"] > 100
    for query, expected in QUERIES.items():
        found = await kb.search(users["ann"], "notes", query, 3)
        titles = [r["document"]["title"] for r in found["results"]]
        assert titles[0] == expected, (query, titles)
        scores = [r["score"] for r in found["results"]]
        assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1
    collection = await kb.get(users["ann"], "notes")
    assert (collection["documents"], collection["chunks"], collection["embedding_model"]) == (6, 6, "minilm")


async def test_long_documents_are_chunked_and_found_by_their_middle(kb, users):
    await kb.create(users["ann"], {"name": "long", "description": ""})
    text = " ".join(DOCUMENTS.values())  # about 900 characters: several chunks of 300
    added = await kb.add_documents(users["ann"], "long", [{"title": "all", "text": text}])
    assert added["chunks"] >= 3 and added["documents"][0]["chunks"] == added["chunks"]
    best = (await kb.search(users["ann"], "long", "castling the king", 1))["results"][0]
    assert "castling" in best["text"] and best["position"] > 0


async def test_another_users_collection_is_not_found(kb, users):
    await filled(kb, users["ann"])
    bob = users["bob"]
    docs = [{"title": "x", "text": "mine"}]
    for attempt in (
        kb.get(bob, "notes"),
        kb.documents(bob, "notes"),
        kb.search(bob, "notes", "tides", 1),
        kb.add_documents(bob, "notes", docs),
        kb.delete(bob, "notes"),
        kb.delete_document(bob, "notes", 1),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert await kb.list(bob) == [] and await kb.list(0) == []
    assert len(await kb.documents(users["ann"], "notes")) == len(DOCUMENTS)  # untouched


@pytest.mark.parametrize("body", [
    {"documents": []},
    {"documents": "text"},
    {"documents": [""]},
    {"documents": ["   \n "]},
    {"documents": [{"text": "x", "author": "me"}]},
    {"documents": [{"text": "x" * 1001}]},
    {"documents": ["x"] * 4},
    {"documents": [{"text": "x", "title": "t" * 256}]},
])
def test_bad_documents_are_a_400(body):
    kb = KnowledgeBase(max_document_chars=1000, max_documents_per_request=3)
    with pytest.raises(BadRequest) as info:
        kb.parse_documents(body)
    assert info.value.param == "documents"


@pytest.mark.parametrize("body, param", [
    ({"query": "tides", "top_k": 0}, "top_k"),
    ({"query": "tides", "top_k": 51}, "top_k"),
    ({"query": "tides", "top_k": True}, "top_k"),
    ({"query": "tides", "top_k": "3"}, "top_k"),
    ({"query": ""}, "query"),
    ({"query": "x" * 2001}, "query"),
    ({"top_k": 3}, "query"),
])
def test_bad_searches_are_a_400(body, param):
    with pytest.raises(BadRequest) as info:
        KnowledgeBase().parse_search(body)
    assert info.value.param == param
    assert KnowledgeBase().parse_search({"query": "tides"}) == ("tides", 5)


async def test_unknown_collection_and_document_are_404(kb, users):
    with pytest.raises(NotFound):
        await kb.search(users["ann"], "nothing", "tides", 1)
    await kb.create(users["ann"], {"name": "empty", "description": ""})
    assert (await kb.search(users["ann"], "empty", "tides", 3))["results"] == []
    with pytest.raises(NotFound):
        await kb.delete_document(users["ann"], "empty", 12345)


async def test_bounds_on_collections_and_chunks(db, models, users):
    kb = KnowledgeBase(db, models=models, max_collections_per_user=1, max_chunks_per_collection=3,
                       chunk_chars=100, chunk_overlap=0)
    await kb.create(users["ann"], {"name": "one", "description": ""})
    with pytest.raises(BadRequest) as info:
        await kb.create(users["ann"], {"name": "two", "description": ""})
    assert info.value.code == "limit_reached"
    with pytest.raises(BadRequest) as info:
        await kb.add_documents(users["ann"], "one", [{"title": "", "text": "word " * 100}])  # 5 chunks
    assert "chunks" in info.value.message
    assert (await kb.get(users["ann"], "one"))["chunks"] == 0


async def test_a_change_by_another_process_is_seen_at_once(db, models, users):
    """Two KnowledgeBase instances on one database, as two replicas: each caches its matrix and notices the
    other's change through the collection's version."""
    one, two = (KnowledgeBase(db, models=models) for _ in range(2))
    ann = users["ann"]
    await filled(one, ann)
    assert (await one.search(ann, "notes", "tides", 1))["results"][0]["document"]["title"] == "tides"
    await one.search(ann, "notes", "chess", 1)
    assert one.matrix_loads == 1  # the second search used the cached matrix
    await two.add_documents(ann, "notes", [{"title": "eclipse", "text": "A solar eclipse happens when the Moon "
                                            "passes between the Sun and the Earth, darkening the sky."}])
    found = await one.search(ann, "notes", "the moon hides the sun", 1)
    assert found["results"][0]["document"]["title"] == "eclipse" and one.matrix_loads == 2
    doc_id = found["results"][0]["document"]["id"]
    await two.delete_document(ann, "notes", doc_id)
    found = await one.search(ann, "notes", "the moon hides the sun", 6)
    assert "eclipse" not in [r["document"]["title"] for r in found["results"]] and one.matrix_loads == 3


async def test_embedding_tokens_are_usage_and_count_against_the_quota(db, models, users):
    quotas = QuotaPolicy(db)
    quotas.load()
    events: list[dict] = []
    kb = KnowledgeBase(db, models=models, quotas=quotas, usage_sink=events.append)
    ann = Identity(name="ann", via="hub_token", is_admin=False, user_id=users["ann"])
    await kb.create(ann.user_id, {"name": "notes", "description": ""})
    added = await kb.add_documents(ann.user_id, "notes", [{"title": "t", "text": DOCUMENTS["tides"]}], ann)
    found = await kb.search(ann.user_id, "notes", "tides", 1, ann)
    assert [(e["endpoint"], e["model"], e["status"], e["user"]) for e in events] == [
        (ADD_ENDPOINT, "minilm", 200, "ann"), (SEARCH_ENDPOINT, "minilm", 200, "ann")]
    assert events[0]["prompt_tokens"] == added["usage"]["prompt_tokens"] > 20
    assert events[1]["prompt_tokens"] == found["usage"]["prompt_tokens"] > 2
    spent = sum(e["prompt_tokens"] for e in events)
    assert (await quotas.remaining(ann))["limits"]["tokens_per_day"]["used"] == spent  # settled, not yet written
    await quotas.set_quota("user", "ann", {"tokens_per_day": spent + 5}, audit=AUDIT)
    with pytest.raises(RateLimited):
        await kb.add_documents(ann.user_id, "notes", [{"title": "t", "text": DOCUMENTS["chess"]}], ann)
    assert events[-1]["status"] == 429 and events[-1]["prompt_tokens"] == 0
    assert (await kb.get(ann.user_id, "notes"))["documents"] == 1  # nothing stored


async def test_admin_lists_everyones_and_deletes_a_users_audited(kb, db, users):
    await filled(kb, users["ann"])
    await filled(kb, users["ann"], "more")
    await filled(kb, users["bob"])
    assert [(c["user"], c["name"]) for c in await kb.list_all()] == [("ann", "more"), ("ann", "notes"),
                                                                       ("bob", "notes")]
    await kb.search(users["ann"], "notes", "tides", 1)  # cached now
    assert await kb.delete(users["ann"], None, audit=AUDIT) == 2
    assert await kb.list(users["ann"]) == [] and len(await kb.list(users["bob"])) == 1
    with pytest.raises(NotFound):
        await kb.search(users["ann"], "notes", "tides", 1)
    events = await AuditLog(db).query(user="ann", action="collections.deleted")
    assert len(events) == 1 and events[0]["details"] == {"names": ["more", "notes"], "count": 2, "chunks": 12}
    assert (await kb.search(users["bob"], "notes", "tides", 1))["results"][0]["document"]["title"] == "tides"
