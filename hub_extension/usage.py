"""Usage metering: every `/v1` request recorded, written in batches off the request path, and reported.

`UsageRecorder.record` is a usage sink (`Services.usage_sinks`): on the event loop it only appends the event to
a buffer. `flush` (every `flush_interval` seconds, and early once `batch_size` events wait) takes the whole
buffer and writes it in ONE transaction on the database pool: the raw rows into `usage_events` and the hourly
sums into `usage_rollups`, upserted (`INSERT .. ON CONFLICT DO UPDATE` adding to the stored sums), so replicas
writing the same hour add up. A failed write keeps its events for the next flush; a stop (SIGTERM/SIGINT)
flushes what is left (`close`).

What can be lost:
- a crash (SIGKILL, power): the events buffered since the last successful flush, i.e. about the last
  `flush_interval` seconds (more while the database is failing: up to `max_buffer` events);
- a database too slow or down for long: beyond `max_buffer` events waiting, the newest are dropped, counted in
  `dropped` (a metric) and logged at most once a minute.

Reports (`UsageReports`) read the rollups only, so they stay fast whatever the raw table holds, and they
outlive the raw events (`raw_retention_days`).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import functools
import io
import logging
import time
from collections.abc import Callable

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from traitlets import Float, Integer, validate
from traitlets.config import LoggingConfigurable

from .db import Database
from .errors import BadRequest
from .orm import UsageEvent, UsageRollup, User

log = logging.getLogger("hub_extension.usage")

EVENTS = UsageEvent.__table__
ROLLUPS = UsageRollup.__table__
ROLLUP_KEY = ("hour", "user", "model", "key_id", "endpoint")
ROLLUP_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens")
PRUNE_CHUNK = 5000  # rows deleted per transaction when pruning (short transactions, no long table locks)
CLOSE_ATTEMPTS = 5  # flushes tried at shutdown before giving up on a failing database
DROP_LOG_SECONDS = 60.0


# The `usage_events` columns, in the order of the row tuples `batch_rows` makes.
EVENT_COLUMNS = ("time", "user", "credential", "key_id", "acting_admin", "model", "endpoint", "status", "streamed",
                 "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")
COLUMNS = ", ".join(f'"{name}"' for name in EVENT_COLUMNS)
INSERT_EVENTS = f"INSERT INTO usage_events ({COLUMNS}) VALUES "
COPY_EVENTS = f"COPY usage_events ({COLUMNS}) FROM STDIN"
INSERT_CHUNK = 1000  # rows per INSERT on SQLite: 13,000 parameters, under its limit of 32,766


EPOCH = dt.datetime(1970, 1, 1)


def _naive_utc(posix: float) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=posix)


def _sqlite_time(posix: float) -> str:
    return _naive_utc(posix).isoformat(" ", "microseconds")  # as SQLAlchemy's SQLite DateTime stores it


def batch_rows(events: list[dict], stored_time: Callable[[float], object]) -> tuple[list[dict], list[tuple], dict]:
    """The events that are well formed, their `usage_events` rows (EVENT_COLUMNS) and their sums per (POSIX
    hour, user, model, key, endpoint). No user, model or credential (a request refused before authentication,
    or before a model was resolved) is stored as "", no key as 0 in the sums. One plain loop: this runs for
    every request, a batch at a time."""
    written, rows, sums = [], [], {}
    for event in events:
        try:
            posix = float(event["time"])
            # Names cut to their columns' 255 characters: PostgreSQL would refuse the whole batch for one.
            user, model, key_id = (event.get("user") or "")[:255], (event.get("model") or "")[:255], event.get("key_id")
            endpoint, status = event["endpoint"], int(event["status"])
            prompt, completion = int(event.get("prompt_tokens") or 0), int(event.get("completion_tokens") or 0)
            acting_admin = event.get("acting_admin")
            rows.append((stored_time(posix), user, event.get("credential") or "", key_id,
                         acting_admin[:255] if acting_admin else None, model, endpoint, status,
                         bool(event.get("streamed")), prompt, completion, float(event.get("latency_ms") or 0.0),
                         event.get("ttft_ms")))
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            log.error("malformed usage event left out: %r", event)
            continue
        written.append(event)
        key = (int(posix // 3600), user, model, key_id or 0, endpoint)
        bucket = sums.get(key)
        if bucket is None:
            bucket = sums[key] = [0, 0, 0, 0]
        bucket[0] += 1
        bucket[1] += status >= 400
        bucket[2] += prompt
        bucket[3] += completion
    return written, rows, sums


def rollup_rows(sums: dict[tuple, list[int]]) -> list[dict]:
    """The `usage_rollups` rows of a batch's sums, in one order on every replica (no deadlocks between them)."""
    rows = []
    for (hours, *rest), counts in sorted(sums.items()):
        hour = _naive_utc(hours * 3600)
        rows.append({**dict(zip(ROLLUP_KEY, (hour, *rest), strict=True)), "day": hour.strftime("%Y-%m-%d"),
                     "month": hour.strftime("%Y-%m"), **dict(zip(ROLLUP_SUMS, counts, strict=True))})
    return rows


def _follow_retired_users(session: Session, events: list[dict]) -> None:
    """An event of someone the Hub deleted before it was written (their row renamed by `users.retire`) goes under
    the retired name, with the rest of their usage: never to a new person given the name. One query per batch."""
    ids = {event.get("user_id") for event in events if isinstance(event.get("user_id"), int)}
    if not ids:
        return
    query = select(User.id, User.name).where(User.id.in_(ids), User.name.contains("/"))  # "/": retired rows only
    retired = dict(session.execute(query).all())
    for event in events:
        name = retired.get(event.get("user_id"))
        if name is not None:
            event["user"] = name


def _insert_events(session: Session, rows: list[tuple]) -> None:
    """The raw rows, straight to the driver (SQLAlchemy's per-row parameter handling would cost more than the
    rest of the write; the values are already what the driver takes): COPY on PostgreSQL, multi-row INSERTs
    on SQLite. Not an executemany: that hands the GIL back and forth with the event loop for every row, a
    thread switch each time, which costs the loop more than the write itself."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(COPY_EVENTS) as copy:
            for row in rows:
                copy.write_row(row)
        return
    one = "(" + ", ".join(["?"] * len(EVENT_COLUMNS)) + ")"
    for start in range(0, len(rows), INSERT_CHUNK):
        chunk = rows[start : start + INSERT_CHUNK]
        conn.exec_driver_sql(INSERT_EVENTS + ", ".join([one] * len(chunk)), tuple(v for row in chunk for v in row))


@functools.cache
def _upsert_statement(dialect_name: str):
    """`INSERT .. ON CONFLICT DO UPDATE` adding to the stored sums; built once (SQLAlchemy then finds it compiled)."""
    stmt = (postgresql if dialect_name == "postgresql" else sqlite).insert(ROLLUPS)
    return stmt.on_conflict_do_update(
        index_elements=list(ROLLUP_KEY),
        set_={name: ROLLUPS.c[name] + stmt.excluded[name] for name in ROLLUP_SUMS},
    )


def _upsert_rollups(session: Session, rollups: list[dict]) -> None:
    """Add the batch's sums to the stored ones (a new bucket is inserted), atomically on either database."""
    session.execute(_upsert_statement(session.get_bind().dialect.name), rollups)


class UsageRecorder(LoggingConfigurable):
    """Buffers usage events on the loop and writes them in batches, one transaction each, off the loop."""

    flush_interval = Float(
        1.0,
        help="""Seconds between batched writes of usage events. Also what a crash can lose: the events of about
        the last `flush_interval` seconds.""",
    ).tag(config=True)
    batch_size = Integer(
        500, help="Write early (before `flush_interval` is up) once this many events are waiting."
    ).tag(config=True)
    max_buffer = Integer(
        100_000,
        help="""Most events kept in memory while the database is slow or down (about 1 KB each). Beyond it the
        newest events are dropped, counted (the `dropped` metric) and logged at most once a minute.""",
    ).tag(config=True)
    raw_retention_days = Integer(
        90,
        help="""Days the raw per-request events (`usage_events`) are kept; 0 keeps them forever. Reports read
        the hourly rollups, which this does not touch.""",
    ).tag(config=True)
    rollup_retention_days = Integer(
        0, help="Days the hourly rollups (what reports and quota windows read) are kept; 0 keeps them forever."
    ).tag(config=True)

    @validate("flush_interval")
    def _validate_interval(self, proposal):
        if proposal.value <= 0:
            raise ValueError("UsageRecorder.flush_interval must be > 0")
        return proposal.value

    @validate("batch_size", "max_buffer")
    def _validate_positive(self, proposal):
        if proposal.value < 1:
            raise ValueError(f"UsageRecorder.{proposal.trait.name} must be >= 1")
        return proposal.value

    @validate("raw_retention_days", "rollup_retention_days")
    def _validate_retention(self, proposal):
        if proposal.value < 0:
            raise ValueError(f"UsageRecorder.{proposal.trait.name} must be >= 0 (0: forever)")
        return proposal.value

    def __init__(self, db: Database | None = None, **kwargs):
        super().__init__(**kwargs)
        self.db = db
        self.flushed_callbacks: list[Callable[[list[dict]], None]] = []  # on the loop, with each committed batch
        self.written = 0  # events committed
        self.dropped = 0  # events dropped because `max_buffer` were waiting
        self.transactions = 0  # committed writes (one per flush that had events)
        self._buffer: list[dict] = []
        self._buffer_since: float | None = None  # monotonic time the oldest buffered event was recorded
        self._writing: list[dict] = []  # the batch being written
        self._writing_since: float | None = None
        self._lock = asyncio.Lock()  # one write at a time, in order
        self._early: asyncio.Task | None = None  # the flush `record` started because `batch_size` were waiting
        self._failing = False  # the last write failed: no early flushes until one succeeds
        self._drop_logged = -DROP_LOG_SECONDS

    # -- the request path ----------------------------------------------------------------------------

    def record(self, event: dict) -> None:
        """A usage sink: on the event loop, for every request. O(1) (the event is only appended: rows are made
        off the loop, a batch at a time), no I/O, never raises."""
        try:
            if len(self._buffer) + len(self._writing) >= self.max_buffer:
                self._drop()
                return
            if not self._buffer:
                self._buffer_since = time.monotonic()
            self._buffer.append(event)
            if len(self._buffer) >= self.batch_size and not self._failing and self._early is None:
                self._early = asyncio.get_running_loop().create_task(self._flush_early())
        except Exception:
            log.exception("usage event not recorded")

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._drop_logged >= DROP_LOG_SECONDS:
            self._drop_logged = now
            log.warning("usage buffer full (%d events waiting for the database): dropping new events, %d so far",
                        self.pending(), self.dropped)

    async def _flush_early(self) -> None:
        try:
            await self.flush()
        finally:
            self._early = None

    # -- writing ---------------------------------------------------------------------------------------

    def pending(self) -> int:
        """Events recorded and not yet committed (buffered or being written)."""
        return len(self._buffer) + len(self._writing)

    def lag_seconds(self) -> float:
        """Age of the oldest event not yet committed; 0 when none waits."""
        since = [t for t in (self._writing_since, self._buffer_since) if t is not None]
        return time.monotonic() - min(since) if since else 0.0

    async def flush(self) -> int:
        """Write everything buffered in one transaction; the number of events written (0 on failure: the
        events stay buffered for the next flush)."""
        async with self._lock:
            if not self._buffer:
                return 0
            # Swapped on the loop: events recorded from now on go to a new buffer.
            batch, self._buffer = self._buffer, []
            self._writing, self._writing_since, self._buffer_since = batch, self._buffer_since, None
            try:
                written = await self.db.run(self._write, batch)
            except Exception as e:
                self._buffer = batch + self._buffer  # older first; pending() is unchanged, so still bounded
                self._buffer_since = self._writing_since
                if not self._failing:
                    log.warning("writing %d usage events failed (kept, retried on the next flush): %s", len(batch), e)
                self._failing = True
                return 0
            finally:
                self._writing, self._writing_since = [], None
        if self._failing:
            log.info("usage events are written again")
            self._failing = False
        self.written += len(written)
        self.transactions += 1
        for callback in self.flushed_callbacks:
            try:
                callback(written)
            except Exception:
                log.exception("usage flush callback %r failed", callback)
        return len(written)

    @staticmethod
    def _write(session: Session, events: list[dict]) -> list[dict]:
        """The raw rows and the hourly sums of a batch in one transaction (on the database pool): the events
        written. A malformed event (a bug in the handler that made it) is logged and left out."""
        stored_time = _sqlite_time if session.get_bind().dialect.name == "sqlite" else _naive_utc
        _follow_retired_users(session, events)
        written, rows, sums = batch_rows(events, stored_time)
        if rows:
            _insert_events(session, rows)
            _upsert_rollups(session, rollup_rows(sums))
        return written

    async def close(self) -> None:
        """Flush until nothing is left (a graceful stop loses nothing), trying a few times if the database
        fails; what still cannot be written is logged."""
        if self._early is not None:
            await asyncio.gather(self._early, return_exceptions=True)
        for attempt in range(CLOSE_ATTEMPTS):
            await self.flush()
            if not self._buffer:
                return
            await asyncio.sleep(min(1.0, 0.1 * 2**attempt))
        log.error("stopping with %d usage events not written (the database kept failing)", len(self._buffer))

    # -- retention -------------------------------------------------------------------------------------

    async def prune(self) -> int:
        """Delete raw events older than `raw_retention_days` (and rollups older than `rollup_retention_days`,
        when set), in chunks of PRUNE_CHUNK rows, one short transaction each. The number of rows deleted."""
        deleted = 0
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        for table, column, days in ((EVENTS, EVENTS.c.time, self.raw_retention_days),
                                    (ROLLUPS, ROLLUPS.c.hour, self.rollup_retention_days)):
            if not days:
                continue
            cutoff = now - dt.timedelta(days=days)
            while True:
                n = await self.db.run(_delete_chunk, table, column, cutoff)
                deleted += n
                if n < PRUNE_CHUNK:
                    break
        if deleted:
            self.log.info("pruned %d usage rows past their retention", deleted)
        return deleted


def _delete_chunk(session: Session, table, column, cutoff: dt.datetime) -> int:
    ids = select(table.c.id).where(column < cutoff).limit(PRUNE_CHUNK).scalar_subquery()
    return session.execute(delete(table).where(table.c.id.in_(ids))).rowcount


# -- reports ---------------------------------------------------------------------------------------------

BUCKETS = {"hour": ROLLUPS.c.hour, "day": ROLLUPS.c.day, "month": ROLLUPS.c.month}
GROUPS = {"user": ROLLUPS.c.user, "model": ROLLUPS.c.model, "key": ROLLUPS.c.key_id, "endpoint": ROLLUPS.c.endpoint}
COUNTS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")


def totals(rows: list[dict]) -> dict:
    """A report's rows summed (the `totals` of the JSON answer, the CLI's last line)."""
    return {name: sum(row[name] for row in rows) for name in COUNTS}
DEFAULT_RANGE = dt.timedelta(days=30)
MAX_RANGE = dt.timedelta(days=731)
MAX_ROWS = 10_000
MAX_USERS = 100  # users one report may name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def report_range(since: dt.datetime | None, until: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """The time range of a report (naive UTC): by default the last 30 days; at most two years; else a 400."""
    until = until or _now()
    since = since or until - DEFAULT_RANGE
    if since >= until:
        raise BadRequest("'since' must be before 'until'.", param="since")
    if until - since > MAX_RANGE:
        raise BadRequest(f"A report spans at most {MAX_RANGE.days} days: narrow 'since' and 'until'.", param="since")
    return since, until


def parse_time(name: str, raw: str | None) -> dt.datetime | None:
    """An ISO 8601 query argument as naive UTC (None when absent); a 400 naming `name` when it is not one."""
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):  # OverflowError: a valid time that UTC pushes past year 1 or 9999
        raise BadRequest(f"'{name}' must be an ISO 8601 time, e.g. 2026-01-31T12:00:00Z.", param=name) from None
    return value


def parse_report_query(args: dict[str, str | None]) -> dict:
    """Report arguments from a query string or the CLI: `bucket` (hour|day|month, default day), `group_by`
    (user|model|key|endpoint|none), `since`/`until` (ISO 8601; default the last 30 days, at most two years) and
    `user` (comma-separated names). The keyword arguments of `UsageReports.query`; a 400 for anything off."""
    bucket = args.get("bucket") or "day"
    if bucket not in BUCKETS:
        raise BadRequest("'bucket' must be one of hour, day or month.", param="bucket")
    group_by = args.get("group_by") or None
    if group_by == "none":
        group_by = None
    if group_by is not None and group_by not in GROUPS:
        raise BadRequest("'group_by' must be one of user, model, key, endpoint or none.", param="group_by")
    users = [name for name in (args.get("user") or "").split(",") if name] or None
    if users is not None and len(users) > MAX_USERS:
        raise BadRequest(f"At most {MAX_USERS} users per report.", param="user")
    since, until = report_range(parse_time("since", args.get("since")), parse_time("until", args.get("until")))
    return {"users": users, "since": since, "until": until, "bucket": bucket, "group_by": group_by}


def _bucket_label(bucket: str, value) -> str:
    return value.strftime("%Y-%m-%dT%H:00:00Z") if bucket == "hour" else value


def _group_label(group_by: str | None, value) -> str | None:
    if group_by == "key":
        return str(value) if value else ""  # "": not through one of our keys (a Hub token, the browser, ...)
    return value


class UsageReports:
    """Usage summed by hour, day or month, grouped by user, model, key or endpoint, from the hourly rollups.

    An hour counts when it starts in [`since` rounded down to its hour, `until`)."""

    def __init__(self, db: Database):
        self.db = db

    async def query(
        self,
        *,
        users: list[str] | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        bucket: str = "day",
        group_by: str | None = None,
    ) -> list[dict]:
        """Rows `{"bucket", "group", "requests", "errors", "prompt_tokens", "completion_tokens",
        "total_tokens"}` ordered by bucket then group; a 400 beyond MAX_ROWS rows (ask for a narrower report)."""
        if bucket not in BUCKETS or (group_by is not None and group_by not in GROUPS):
            raise BadRequest("Unknown 'bucket' or 'group_by'.", param="bucket" if bucket not in BUCKETS else "group_by")
        since, until = report_range(since, until)
        return await self.db.run(self._query, users, since, until, bucket, group_by)

    @staticmethod
    def _query(session: Session, users, since, until, bucket: str, group_by: str | None) -> list[dict]:
        bucket_col = BUCKETS[bucket]
        keys = [bucket_col] + ([GROUPS[group_by]] if group_by else [])
        sums = [func.sum(ROLLUPS.c[name]) for name in ROLLUP_SUMS]
        query = (
            select(*keys, *sums)
            .where(ROLLUPS.c.hour >= since.replace(minute=0, second=0, microsecond=0), ROLLUPS.c.hour < until)
            .group_by(*keys)
            .order_by(*keys)
            .limit(MAX_ROWS + 1)
        )
        if users is not None:
            query = query.where(ROLLUPS.c.user.in_(users))
        result = session.execute(query).all()
        if len(result) > MAX_ROWS:
            raise BadRequest(
                f"This report has more than {MAX_ROWS} rows: ask for a shorter range, a larger bucket or fewer "
                "groups.", param="bucket",
            )
        rows = []
        for values in result:
            group = _group_label(group_by, values[1]) if group_by else None
            requests, errors, prompt, completion = (int(v) for v in values[-4:])
            rows.append({
                "bucket": _bucket_label(bucket, values[0]), "group": group, "requests": requests, "errors": errors,
                "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            })
        return rows

    async def per_user(self, users: list[str] | None = None, since: dt.datetime | None = None,
                       until: dt.datetime | None = None) -> dict[str, dict]:
        """Each user's requests and tokens over a range (the last 30 days by default), for the admin's user list:
        one grouped query, a row per user (of `users`, if given) who used the service."""
        since, until = report_range(since, until)
        return await self.db.run(self._per_user, users, since, until)

    @staticmethod
    def _per_user(session: Session, users: list[str] | None, since: dt.datetime, until: dt.datetime) -> dict[str, dict]:
        c = ROLLUPS.c
        query = (
            select(c.user, func.sum(c.requests), func.sum(c.prompt_tokens), func.sum(c.completion_tokens))
            .where(c.hour >= since.replace(minute=0, second=0, microsecond=0), c.hour < until)
            .group_by(c.user)
        )
        if users is not None:
            query = query.where(c.user.in_(users))
        return {user: {"requests": int(requests), "total_tokens": int(prompt) + int(completion)}
                for user, requests, prompt, completion in session.execute(query)}


def _cell(value) -> object:
    """A text cell a spreadsheet would run as a formula (=, +, -, @) is quoted with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(rows: list[dict]) -> str:
    """The rows of `UsageReports.query` as CSV with a header line."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["bucket", "group", *COUNTS])
    for row in rows:
        writer.writerow([row["bucket"], _cell(row["group"] if row["group"] is not None else ""),
                         *(row[name] for name in COUNTS)])
    return out.getvalue()
