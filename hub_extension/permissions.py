"""Who may use which feature and which model: the one permission hook every handler asks.

Grants come from three places, resolved per feature and per model in this order; the first level that says
anything decides, and within a level an explicit deny wins over an allow:

1. **user grant** (database, set by an admin for this user: allow or deny);
2. **group grant** (database, set by an admin for a Hub group the user is in: allow or deny);
3. **Hub scope** (`custom:inference:<feature>`, `custom:inference:model:<name>` or `custom:inference:model:*`,
   granted by a Hub role in `load_roles`: config as code; scopes can only allow);
4. **default** (`PermissionPolicy.feature_defaults`, `PermissionPolicy.model_default_allow`).

For models, a grant on the exact model name beats a `*` grant *at the same level*; a level with neither
passes to the next. A narrowed key can only take away: what a key may do is the key's subset intersected
with what its owner may do now, so taking a permission from a user takes it from all their keys at once.

Synchronous on purpose: checks read an in-memory snapshot of the grants table, so the hot path never waits
on the database. The snapshot is loaded at start, reloaded right after a change made in this process, and
reloaded when another replica or the CLI announces a change (`notify.py`, PostgreSQL), and every
`reload_seconds` in any case.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from traitlets import Bool, Dict, Float, List, default, validate
from traitlets.config import LoggingConfigurable

from . import notify
from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict
from .orm import Grant
from .scopes import (
    ADMIN_SCOPE,
    ANY_MODEL,
    FEATURES,
    MODEL_SCOPE_PREFIX,
    feature_scope,
    model_scope,
    scopes_from_roles,
)

log = logging.getLogger("hub_extension.permissions")

PRECEDENCE = "user grant > group grant > Hub scope > default; an explicit deny wins at its level"
SUBJECT_KINDS = ("user", "group")
MAX_GRANTS_PER_SUBJECT = 256  # grants one user or group may have (every grant is a row and in every snapshot)
# Identities that no permission narrows: mode `none` and configured static keys (both act as admin).
UNRESTRICTED_VIA = frozenset({"none", "static_key"})


@dataclass(frozen=True)
class Decision:
    """One feature's or model's answer and where it came from (shown by the effective-permissions API)."""

    allowed: bool
    source: str  # "user_grant" | "group_grant" | "hub_scope" | "default" | "key" | "unrestricted"
    via: str | None = None  # the grant's subject ("user:alice", "group:staff") or the scope that decided

    def model(self) -> dict:
        out: dict[str, Any] = {"allowed": self.allowed, "source": self.source}
        if self.via is not None:
            out["via"] = self.via
        return out


@dataclass(frozen=True)
class GrantSnapshot:
    """The grants table in memory: subject name -> {(kind, target): allow}."""

    users: Mapping[str, Mapping[tuple[str, str], bool]] = field(default_factory=dict)
    groups: Mapping[str, Mapping[tuple[str, str], bool]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session) -> GrantSnapshot:
        users: dict[str, dict] = {}
        groups: dict[str, dict] = {}
        for row in session.execute(select(Grant)).scalars():
            table = users if row.subject_kind == "user" else groups
            table.setdefault(row.subject, {})[(row.kind, row.target)] = row.allow
        return cls(users=users, groups=groups)


def grants_model(entries: Mapping[tuple[str, str], bool]) -> dict:
    """`{"features": {name: bool}, "models": {name: bool}}`: the JSON shape of one subject's grants."""
    out: dict[str, dict[str, bool]] = {"features": {}, "models": {}}
    for (kind, target), allow in sorted(entries.items()):
        out["features" if kind == "feature" else "models"][target] = allow
    return out


class PermissionPolicy(LoggingConfigurable):
    """Resolves grants for an identity (or a user's state) against the in-memory snapshot.

    Hub scopes count from the credential when it carried them (a Hub token or login), else from the Hub roles
    the user holds (`hub_roles`): our keys, view-as, admin views of another user.
    """

    feature_defaults = Dict(
        help=f"""Feature -> bool: what every user may do unless a grant says otherwise.

        Features: {", ".join(FEATURES)}. Unlisted features default to allowed."""
    ).tag(config=True)

    @validate("feature_defaults")
    def _validate_features(self, proposal):
        unknown = set(proposal.value) - set(FEATURES)
        if unknown:
            raise ValueError(f"PermissionPolicy.feature_defaults: unknown feature(s) {sorted(unknown)}")
        if not all(isinstance(v, bool) for v in proposal.value.values()):
            raise ValueError("PermissionPolicy.feature_defaults: values must be true or false")
        return proposal.value

    model_default_allow = Bool(
        True,
        help="""Whether a user may use a model nobody granted or denied them.

        True: every configured model, unless a grant denies it. False: an allow-list; a user may use only
        the models granted to them, their Hub groups (database grants) or their Hub roles
        (`custom:inference:model:<name>` or `custom:inference:model:*` scopes).""",
    ).tag(config=True)

    reload_seconds = Float(
        5.0,
        help="""Seconds between reloads of the grants table into memory. A grant changed in this process
        applies at once; one changed by another replica or the CLI applies within this time.""",
    ).tag(config=True)

    hub_roles = List(
        Dict(),
        help="""The Hub's `load_roles` (the same list given to `c.JupyterHub.load_roles`).

        The Hub cannot tell a service which scopes a role holds, so the service reads the `custom:inference:*`
        scopes of roles from here, and which roles and groups a user has from the Hub. Defaults to the JSON
        in $INFERENCE_HUB_ROLES (set by `hub_extension.hub_config`).""",
    ).tag(config=True)

    @default("hub_roles")
    def _hub_roles_default(self):
        raw = os.environ.get("INFERENCE_HUB_ROLES")
        return json.loads(raw) if raw else []

    def __init__(self, db: Database | None = None, **kwargs):
        super().__init__(**kwargs)
        self.db = db
        self.snapshot = GrantSnapshot()
        self._tickets = itertools.count(1)
        self._applied = 0  # ticket of the snapshot in use: an older read finishing late never replaces a newer one

    def role_scopes(self, state) -> frozenset[str]:
        """The `custom:inference:*` scopes `state` (a user) holds through their Hub roles and groups."""
        return scopes_from_roles(self.hub_roles, state.roles, state.groups)

    def is_admin(self, state) -> bool:
        """Whether a user (not a credential) administers the service: a Hub admin or the admin scope by role."""
        return bool(state.hub_admin) or ADMIN_SCOPE in self.role_scopes(state)

    # -- the snapshot ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the grants table now (blocking: at start, or from the CLI)."""
        if self.db is not None:
            ticket = next(self._tickets)
            self._apply(ticket, self.db.call(GrantSnapshot.load))

    async def reload(self) -> None:
        """Reload off the event loop; run periodically and after every change made here."""
        if self.db is not None:
            ticket = next(self._tickets)
            self._apply(ticket, await self.db.run(GrantSnapshot.load))

    def _apply(self, ticket: int, snapshot: GrantSnapshot) -> None:
        if ticket > self._applied:
            self._applied, self.snapshot = ticket, snapshot

    # -- the checks (hot path: no I/O) ------------------------------------------------------------------

    def scopes_for(self, subject) -> frozenset[str]:
        """The Hub scopes that count for `subject`: the credential's own when it carried them, else the roles'."""
        scopes = getattr(subject, "hub_scopes", None)
        return scopes if scopes is not None else self.role_scopes(subject)

    def allowed(self, identity, feature: str, model: str | None = None) -> bool:
        """May `identity` use `feature` (and, if given, `model` with it)? Unknown features: no."""
        if getattr(identity, "via", None) in UNRESTRICTED_VIA:
            return True
        if not self.feature(identity, feature).allowed:
            return False
        return model is None or self.model(identity, model).allowed

    def visible_models(self, identity, names: Iterable[str]) -> list[str]:
        """The names (from the registry) that `identity` may use: what `/v1/models` lists."""
        if getattr(identity, "via", None) in UNRESTRICTED_VIA:
            return list(names)
        return [n for n in names if self.model(identity, n).allowed]

    def feature(self, who, feature: str) -> Decision:
        if feature not in FEATURES:
            return Decision(False, "default", "unknown feature")
        key_features = getattr(who, "key_features", None)
        if key_features is not None and feature not in key_features:
            return Decision(False, "key")
        return self._resolve(who, "feature", feature)

    def model(self, who, name: str) -> Decision:
        key_models = getattr(who, "key_models", None)
        if key_models is not None and name not in key_models:
            return Decision(False, "key")
        return self._resolve(who, "model", name)

    def _resolve(self, who, kind: str, target: str) -> Decision:
        snap = self.snapshot
        targets = (target, ANY_MODEL) if kind == "model" and target != ANY_MODEL else (target,)
        user_grants = snap.users.get(who.name, {})
        for t in targets:
            if (kind, t) in user_grants:
                return Decision(user_grants[(kind, t)], "user_grant", f"user:{who.name}")
        for t in targets:
            found = [(g, snap.groups[g][(kind, t)]) for g in who.groups if (kind, t) in snap.groups.get(g, {})]
            if found:
                denied = [g for g, allow in found if not allow]
                group = denied[0] if denied else found[0][0]
                return Decision(not denied, "group_grant", f"group:{group}")
        scopes = self.scopes_for(who)
        for t in targets:
            scope = model_scope(t) if kind == "model" else feature_scope(t)
            if scope in scopes:
                return Decision(True, "hub_scope", scope)
        if kind == "model":
            return Decision(self.model_default_allow, "default")
        return Decision(self.feature_defaults.get(target, True), "default")

    def effective(self, who, models: Iterable[str] = ()) -> dict:
        """Every feature and model with its answer and source, for `who` (an Identity or a UserState).

        `models` are the registry's names; models named by a grant or scope of this user are added, and
        `*` stands for any other model.
        """
        names = set(models)
        snap = self.snapshot
        for entries in [snap.users.get(who.name, {})] + [snap.groups.get(g, {}) for g in who.groups]:
            names.update(t for k, t in entries if k == "model")
        scopes = self.scopes_for(who)
        names.update(s[len(MODEL_SCOPE_PREFIX):] for s in scopes if s.startswith(MODEL_SCOPE_PREFIX))
        names.discard(ANY_MODEL)
        key_models = getattr(who, "key_models", None)
        if key_models is not None:
            names.update(key_models)
        unrestricted = getattr(who, "via", None) in UNRESTRICTED_VIA

        def show(decision: Decision) -> dict:
            return Decision(True, "unrestricted").model() if unrestricted else decision.model()

        out: dict[str, Any] = {
            "user": who.name,
            "groups": list(who.groups),
            "precedence": PRECEDENCE,
            "features": {f: show(self.feature(who, f)) for f in FEATURES},
            "models": {n: show(self.model(who, n)) for n in sorted(names)},
            "other_models": show(self.model(who, ANY_MODEL) if key_models is None else Decision(False, "key")),
            "hub_scopes": sorted(scopes),
        }
        if getattr(who, "key_id", None) is not None:
            out["key"] = {
                "id": who.key_id,
                "features": list(who.key_features) if who.key_features is not None else None,
                "models": list(who.key_models) if who.key_models is not None else None,
            }
        if getattr(who, "acting_admin", None):
            out["acting_admin"] = who.acting_admin
        return out

    def check_key_narrowing(self, identity, fields: dict) -> None:
        """A new key may only narrow what its creator may do now, never widen it.

        A key made with a narrowed key inherits that key's narrowing when the request names none (otherwise
        a narrowed key could mint a wider one). Updates `fields` in place.
        """
        if getattr(identity, "via", None) in UNRESTRICTED_VIA:
            return
        for name, current in (("features", identity.key_features), ("models", identity.key_models)):
            if fields.get(name) is None and current is not None:
                fields[name] = sorted(current)
        features = fields.get("features")
        if features is not None:
            denied = sorted(f for f in set(features) if not self.allowed(identity, f))
            if denied:
                raise BadRequest(f"You may not grant feature(s) you lack: {', '.join(denied)}.", param="features")
        models = fields.get("models")
        if models is not None:
            denied = sorted(m for m in set(models) if not self.model(identity, m).allowed)
            if denied:
                raise BadRequest(f"You may not grant model(s) you lack: {', '.join(denied)}.", param="models")

    # -- changing grants -----------------------------------------------------------------------------

    def grants(self, subject_kind: str, subject: str) -> dict:
        """One user's or group's database grants, from the snapshot."""
        table = self.snapshot.users if subject_kind == "user" else self.snapshot.groups
        return grants_model(table.get(subject, {}))

    @staticmethod
    def parse_grants(body: Any, *, partial: bool) -> dict[tuple[str, str], bool | None]:
        """A grants body (`{"features": {...}, "models": {...}}`) as {(kind, target): allow}; 400 when off.

        `None` (JSON null) removes a grant and is only meaningful in a partial update.
        """
        if not isinstance(body, dict):
            raise BadRequest("Grants must be a JSON object with 'features' and/or 'models'.")
        unknown = set(body) - {"features", "models"}
        if unknown:
            raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
        out: dict[tuple[str, str], bool | None] = {}
        for section, kind in (("features", "feature"), ("models", "model")):
            entries = body.get(section) or {}
            if not isinstance(entries, dict):
                raise BadRequest(f"'{section}' must be an object of name -> true/false.", param=section)
            if len(entries) > MAX_GRANTS_PER_SUBJECT:
                raise BadRequest(f"At most {MAX_GRANTS_PER_SUBJECT} grants per subject.", param=section)
            for target, allow in entries.items():
                if kind == "feature" and target not in FEATURES:
                    raise BadRequest(f"Unknown feature {target!r}; one of {', '.join(FEATURES)}.", param=section)
                if not target or len(target) > 128 or not target.isprintable():
                    raise BadRequest(f"Names must be 1 to 128 printable characters: {target[:40]!r}.", param=section)
                if not (isinstance(allow, bool) or (allow is None and partial)):
                    expected = "true, false or null" if partial else "true or false"
                    raise BadRequest(f"'{section}.{target}' must be {expected}.", param=section)
                out[(kind, target)] = allow
        return out

    async def set_grants(
        self,
        subject_kind: str,
        subject: str,
        changes: Mapping[tuple[str, str], bool | None],
        *,
        replace: bool,
        audit: dict,
    ) -> dict:
        """Apply grant changes for one subject in one transaction with one audit entry; returns the new grants.

        `replace`: the subject's grants become exactly `changes` (PUT/DELETE); else they are merged (PATCH,
        `None` removes). No audit entry when nothing changed. This process sees the change at once.
        """
        if subject_kind not in SUBJECT_KINDS:
            raise ValueError(subject_kind)
        try:
            result = await self.db.run(self._set_grants, subject_kind, subject, dict(changes), replace, audit)
        except IntegrityError:
            raise Conflict("The grants changed concurrently; try again.") from None
        await self.reload()
        return result

    @staticmethod
    def _set_grants(
        session: Session,
        subject_kind: str,
        subject: str,
        changes: dict,
        replace: bool,
        audit: dict,
    ) -> dict:
        actor = audit["actor"]
        rows = {
            (r.kind, r.target): r
            for r in session.execute(
                select(Grant).where(Grant.subject_kind == subject_kind, Grant.subject == subject).with_for_update()
            ).scalars()
        }
        wanted = {k: v for k, v in changes.items() if v is not None} if replace else None
        diff: dict[str, dict] = {}
        for key in set(rows) | set(changes):
            old = rows[key].allow if key in rows else None
            new = wanted.get(key) if wanted is not None else changes.get(key, old)
            if old == new:
                continue
            diff[f"{key[0]}:{key[1]}"] = {"from": old, "to": new}
            if new is None:
                session.delete(rows[key])
            elif key in rows:
                rows[key].allow, rows[key].created_by = new, actor
            else:
                session.add(Grant(subject_kind=subject_kind, subject=subject, kind=key[0], target=key[1],
                                  allow=new, created_by=actor))
        session.flush()
        count = session.execute(
            select(func.count(Grant.id)).where(Grant.subject_kind == subject_kind, Grant.subject == subject)
        ).scalar_one()
        if count > MAX_GRANTS_PER_SUBJECT:
            raise BadRequest(f"At most {MAX_GRANTS_PER_SUBJECT} grants per subject; remove some first.")
        if diff:
            action = "grants.set" if (changes or not replace) else "grants.delete"
            AuditLog.add(session, action=action, details={"subject_kind": subject_kind, "changes": diff}, **audit)
            notify.publish(session, "grants")
        current = session.execute(
            select(Grant).where(Grant.subject_kind == subject_kind, Grant.subject == subject)
        ).scalars()
        return grants_model({(r.kind, r.target): r.allow for r in current})
