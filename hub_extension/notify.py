"""Changes other replicas must see at once, through PostgreSQL `LISTEN/NOTIFY` (no extra server).

Each replica caches keys, users' states, the grants and the quotas in memory, so a request costs no database
round trip; without this module another replica honours a change only when its cache entry ages out. Here a
change is *published* in the transaction that makes it (`publish`: `pg_notify`, delivered on commit, never
for a rolled-back change), and one listener per process (`ChangeListener`, an asyncio task on the service's
loop: psycopg's async connection never blocks it) drops the matching cache entries (`dispatch_table`).

The caches' own bounds stay in force: if the listening connection is lost, the listener logs it, reconnects
with backoff, and drops every cache on reconnecting (notifications sent meanwhile are lost); until then the
replica is back to today's bounded expiry and periodic reloads. SQLite means one process: publishing is a
no-op and there is no listener.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger("hub_extension.notify")

CHANNEL = "inference_changes"
APPLICATION_NAME = "jupyterhub-inference-listener"  # how the listener's connection shows in pg_stat_activity
ORIGIN = secrets.token_hex(6)  # this process: its own notifications are skipped (it already applied them)
# What a payload names: a key owner's id, a user's id, or nothing (the grants / quotas tables are reloaded whole).
KINDS = ("keys", "user", "grants", "quotas")

Handler = Callable[[dict], Awaitable[None] | None]


def publish(session: Session, kind: str, id: int | None = None) -> None:
    """Tell every replica that `kind` (with `id`) changed, when this transaction commits. SQLite: nothing."""
    if kind not in KINDS:
        raise ValueError(kind)
    if session.get_bind().dialect.name != "postgresql":
        return
    payload = json.dumps({"kind": kind, "id": id, "origin": ORIGIN})
    session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


def dispatch_table(services) -> dict[str, Handler]:
    """What a replica does when it hears of each kind of change: drop exactly the cache entries it names."""
    return {
        "keys": lambda p: services.keys.forget_user(p["id"]),
        "user": lambda p: services.users.forget(p["id"]),
        "grants": lambda p: services.permissions.reload(),
        "quotas": lambda p: services.quotas.reload_limits(),
    }


def forget_everything(services) -> Awaitable[None]:
    """After the listener was away: any change may have been missed, so every cache starts over."""
    services.keys.forget_all()
    services.users.forget_all()
    return asyncio.gather(services.permissions.reload(), services.quotas.reload_limits())


def libpq_url(sqlalchemy_url: str) -> str:
    """`postgresql+psycopg://...` as the plain `postgresql://...` psycopg connects with."""
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """One `LISTEN` connection per process; reconnects with backoff; `run()` is the task that owns it."""

    def __init__(
        self,
        url: str,
        handlers: Mapping[str, Handler],
        *,
        on_reconnect: Callable[[], Awaitable[None] | None] | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ):
        self.url = libpq_url(url)
        self.handlers = dict(handlers)
        self.on_reconnect = on_reconnect
        self.backoff = backoff
        self.heard = 0  # notifications applied (tests and logs)

    async def run(self) -> None:
        import psycopg

        delay, lost_before = self.backoff[0], False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, application_name=APPLICATION_NAME,
                    keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3, connect_timeout=10,
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = self.backoff[0]
                    if lost_before:
                        log.info("listening for changes again on %s", CHANNEL)
                        await self._reconnected()
                    async for note in conn.notifies():
                        await self.dispatch(note.payload)
            except (psycopg.Error, OSError) as e:
                log.warning("lost the change notifications (%s); caches expire as usual, retrying in %.1fs",
                            str(e).strip() or type(e).__name__, delay)
            lost_before = True  # however the connection ended, changes may have been missed until the next one
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def dispatch(self, payload: str) -> None:
        """Apply one notification; a bad or failing one is logged and skipped (the caches still expire)."""
        try:
            message = json.loads(payload)
            if message.get("origin") == ORIGIN:
                return
            handler = self.handlers[message["kind"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring a change notification that is not ours: %.100r", payload)
            return
        try:
            await self._call(handler, message)
            self.heard += 1
        except Exception as e:  # the database may be gone mid-reload: the periodic reload catches up
            log.warning("applying a %s change failed: %s", message["kind"], e)

    async def _reconnected(self) -> None:
        try:
            await self._call(self.on_reconnect)
        except Exception as e:  # the database may still be half there: the caches expire as usual anyway
            log.warning("dropping the caches after reconnecting failed: %s", e)

    @staticmethod
    async def _call(fn, *args: Any) -> None:
        if fn is None:
            return
        result = fn(*args)
        if inspect.isawaitable(result):
            await result
