"""Presets without Tornado, on SQLite and PostgreSQL: create, list, change, delete; one user never reaches another's
(404, as for a name nobody has); bounds; how a preset turns into a plain chat request; admin deletion audited."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import run_command

from hub_extension.audit import AuditLog
from hub_extension.db import Database
from hub_extension.errors import BadRequest, Conflict, NotFound
from hub_extension.knowledge import KnowledgeBase
from hub_extension.orm import User
from hub_extension.presets import PresetStore, apply_preset

AUDIT = {"actor": "root", "subject": "ann", "client_ip": None}
PIRATE = {"name": "pirate", "model": "tiny-chat", "system_prompt": "Talk like a pirate.",
          "parameters": {"temperature": 0.2, "max_tokens": 32}}



def add_users(db: Database, *names: str) -> list[int]:
    def make(session):
        rows = [User(name=n, hub_groups=[], hub_roles=[]) for n in names]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]

    return db.call(make)


@pytest.fixture
def store(db):
    return PresetStore(db)


async def test_create_list_update_delete(db, store):
    ann, = add_users(db, "ann")
    made = await store.create(ann, store.parse(PIRATE))
    assert made["name"] == "pirate" and made["parameters"] == {"temperature": 0.2, "max_tokens": 32}
    assert [p["name"] for p in await store.list(ann)] == ["pirate"]
    changed = await store.update(ann, "pirate", store.parse({"system_prompt": "Arr.", "name": "arr"}, partial=True))
    assert (changed["name"], changed["system_prompt"], changed["model"]) == ("arr", "Arr.", "tiny-chat")
    assert (await store.get(ann, "arr"))["system_prompt"] == "Arr."
    with pytest.raises(NotFound):
        await store.get(ann, "pirate")
    with pytest.raises(Conflict):
        await store.create(ann, store.parse({**PIRATE, "name": "arr"}))
    assert await store.delete(ann, "arr") == 1
    assert await store.list(ann) == []


async def test_another_users_preset_is_not_found(db, store):
    ann, bob = add_users(db, "ann", "bob")
    await store.create(ann, store.parse(PIRATE))
    for attempt in (
        store.get(bob, "pirate"),
        store.update(bob, "pirate", {"system_prompt": "mine now"}),
        store.delete(bob, "pirate"),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert await store.list(bob) == []
    await store.create(bob, store.parse(PIRATE))  # the same name is bob's own
    assert (await store.get(ann, "pirate"))["system_prompt"] == "Talk like a pirate."
    assert await store.list(0) == [] and await store.delete(0, None) == 0  # a user without a row has nothing


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-chat"}, "name"),
    ({"name": "bad name!", "model": "tiny-chat"}, "name"),
    ({"name": "x" * 65, "model": "tiny-chat"}, "name"),
    ({"name": "p"}, "model"),
    ({"name": "p", "model": "preset:other"}, "model"),
    ({"name": "p", "model": "tiny-chat", "system_prompt": "x" * 101}, "system_prompt"),
    ({"name": "p", "model": "tiny-chat", "parameters": {"temperature": 9}}, "temperature"),
    ({"name": "p", "model": "tiny-chat", "parameters": {"messages": []}}, "parameters"),
    ({"name": "p", "model": "tiny-chat", "parameters": []}, "parameters"),
    ({"name": "p", "model": "tiny-chat", "owner": "bob"}, "owner"),
])
def test_bad_input_is_a_400_naming_the_field(body, param):
    store = PresetStore(max_system_prompt_chars=100)
    with pytest.raises(BadRequest) as info:
        store.parse(body)
    assert info.value.param == param, info.value.message


async def test_presets_per_user_are_bounded(db):
    ann, bob = add_users(db, "ann", "bob")
    store = PresetStore(db, max_presets_per_user=2)
    for name in ("a", "b"):
        await store.create(ann, store.parse({**PIRATE, "name": name}))
    with pytest.raises(BadRequest) as info:
        await store.create(ann, store.parse({**PIRATE, "name": "c"}))
    assert info.value.code == "limit_reached"
    await store.create(bob, store.parse({**PIRATE, "name": "c"}))  # per user


async def test_admin_lists_everyones_and_deletes_a_users_audited(db, store):
    ann, bob = add_users(db, "ann", "bob")
    for user in (ann, bob):
        await store.create(user, store.parse(PIRATE))
        await store.create(user, store.parse({**PIRATE, "name": "plain", "system_prompt": ""}))
    everyone = await store.list_all()
    assert [(p["user"], p["name"]) for p in everyone] == [
        ("ann", "pirate"), ("ann", "plain"), ("bob", "pirate"), ("bob", "plain")]
    assert await store.delete(ann, None, audit=AUDIT) == 2
    assert await store.list(ann) == [] and len(await store.list(bob)) == 2
    events = await AuditLog(db).query(user="ann", action="presets.deleted")
    assert len(events) == 1 and events[0]["actor"] == "root"
    assert events[0]["details"] == {"names": ["pirate", "plain"], "count": 2}


def test_a_preset_becomes_the_plain_request_it_stands_for():
    preset = {"model": "tiny-chat", "system_prompt": "Be brief.", "parameters": {"temperature": 0.2, "max_tokens": 32}}
    body = {"model": "preset:brief", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0}
    assert apply_preset(body, preset) == {
        "model": "tiny-chat",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "temperature": 1.0,  # the request's own value wins
        "max_tokens": 32,  # the preset's default
    }
    own_limit = apply_preset({**body, "max_completion_tokens": 5}, preset)
    assert own_limit["max_completion_tokens"] == 5 and "max_tokens" not in own_limit  # never both
    assert apply_preset(body, preset | {"system_prompt": ""})["messages"] == body["messages"]


def test_cli_lists_and_deletes_a_users_resources_audited(db, db_url, capsys):
    ann, bob = add_users(db, "ann", "bob")
    store, kb = PresetStore(db), KnowledgeBase(db, embedding_model="minilm")  # no documents: no model needed

    async def fill():
        for user in (ann, bob):
            await store.create(user, store.parse(PIRATE))
            await kb.create(user, {"name": "notes", "description": ""})

    asyncio.run(fill())

    def cli(*argv) -> tuple[int, str]:
        return run_command(capsys, "resources", *argv, "--db-url", db_url)

    code, out = cli("list", "--user", "ann", "--json")
    assert code == 0 and [(r["kind"], r["name"]) for r in json.loads(out)] == [("preset", "pirate"),
                                                                              ("collection", "notes")]
    code, out = cli("list")
    assert code == 0 and out.count("ann") == 2 and out.count("bob") == 2
    assert cli("delete", "--user", "ann")[0] == 1  # says what to delete
    assert cli("delete", "--user", "nobody", "--all")[0] == 1
    code, out = cli("delete", "--user", "ann", "--all")
    assert code == 0 and "1 preset(s) and 1 collection(s)" in out
    code, out = cli("list", "--user", "ann", "--json")
    assert json.loads(out) == []
    events = asyncio.run(AuditLog(db).query(user="ann"))
    assert {e["action"] for e in events} == {"presets.deleted", "collections.deleted"}
    assert all(e["actor"].startswith("cli:") for e in events)
    assert asyncio.run(store.list(bob)) and asyncio.run(kb.list(bob))
