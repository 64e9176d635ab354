"""Presets (R1): a named model, system prompt and generation parameters, private to the user who made it.

A chat request names one as `model: "preset:<name>"`; `apply_preset` turns that request into a plain one (the
preset's model, its system prompt first, its parameters as defaults the request overrides), so everything after
it (the permission check on the model, quotas, usage) is exactly what a plain request gets. Presets belong to a
user row (`users.id`): a person who later gets a deleted user's name starts with none of theirs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from traitlets import Integer
from traitlets.config import LoggingConfigurable

from . import protocol
from .audit import AuditLog
from .db import Database
from .errors import BadRequest, Conflict, NotFound
from .orm import Preset, User, utcnow

PRESET_PREFIX = "preset:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# The generation parameters a preset may carry (the ones a chat request accepts, less model/messages/stream).
PARAMETERS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed")
FIELDS = ("name", "model", "system_prompt", "parameters")


def check_name(name: Any, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadRequest(f"'{what}' must be {NAME_RULE}.", param=what, code="invalid_value")
    return name


def preset_model(row: Preset) -> dict:
    return {
        "name": row.name,
        "model": row.model,
        "system_prompt": row.system_prompt,
        "parameters": json.loads(row.parameters),
        "created_at": row.created_at.isoformat() + "Z",
        "updated_at": row.updated_at.isoformat() + "Z",
    }


def apply_preset(body: dict, preset: dict) -> dict:
    """A chat request body that names a preset, as the plain request it stands for."""
    out = {**preset["parameters"], **{k: v for k, v in body.items() if k != "model"}, "model": preset["model"]}
    if "max_tokens" in body or "max_completion_tokens" in body:  # the request's own limit replaces the preset's
        for key in ("max_tokens", "max_completion_tokens"):
            if key not in body:
                out.pop(key, None)
    if preset["system_prompt"] and isinstance(body.get("messages"), list):
        out["messages"] = [{"role": "system", "content": preset["system_prompt"]}, *body["messages"]]
    return out


class PresetStore(LoggingConfigurable):
    """Create, list, change and delete presets, per user; bounded in number and size."""

    max_presets_per_user = Integer(100, help="Presets one user may keep.").tag(config=True)
    max_system_prompt_chars = Integer(32_000, help="Longest system prompt a preset may hold.").tag(config=True)

    def __init__(self, db: Database | None = None, **kwargs):
        super().__init__(**kwargs)
        self.db = db

    # -- validation (no I/O) --------------------------------------------------------------------------

    def parse(self, body: Any, *, partial: bool = False) -> dict:
        """The fields of a create (`partial=False`: name and model required) or an update request; 400 otherwise."""
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")
        unknown = set(body) - set(FIELDS)
        if unknown:
            key = sorted(unknown)[0]
            raise BadRequest(f"Unknown field '{key}' (allowed: {', '.join(FIELDS)}).", param=key,
                             code="unknown_parameter")
        out: dict[str, Any] = {}
        if "name" in body or not partial:
            out["name"] = check_name(body.get("name"))
        if "model" in body or not partial:
            model = body.get("model")
            if not isinstance(model, str) or not model or len(model) > 255 or model.startswith(PRESET_PREFIX):
                raise BadRequest("'model' must be the name of a chat model.", param="model", code="invalid_value")
            out["model"] = model
        if "system_prompt" in body or not partial:
            prompt = body.get("system_prompt") or ""
            if not isinstance(prompt, str):
                raise BadRequest("'system_prompt' must be a string.", param="system_prompt", code="invalid_value")
            if len(prompt) > self.max_system_prompt_chars:
                raise BadRequest(f"'system_prompt' may hold at most {self.max_system_prompt_chars} characters, "
                                 f"got {len(prompt)}.", param="system_prompt", code="invalid_value")
            out["system_prompt"] = prompt
        if "parameters" in body or not partial:
            params = body.get("parameters")
            out["parameters"] = self.parse_parameters({} if params is None else params)
        return out

    @staticmethod
    def parse_parameters(params: Any) -> dict:
        """Generation parameters, checked exactly as a chat request checks them."""
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be an object.", param="parameters", code="invalid_value")
        unknown = set(params) - set(PARAMETERS)
        if unknown:
            key = sorted(unknown)[0]
            raise BadRequest(f"'parameters' may hold {', '.join(PARAMETERS)}; not '{key}'.", param="parameters",
                             code="invalid_value")
        protocol.parse_chat({"model": "x", "messages": [{"role": "user", "content": "x"}], **params})
        return dict(params)

    # -- reads ------------------------------------------------------------------------------------------

    async def list(self, user_id: int) -> list[dict]:
        if not user_id:
            return []
        return await self.db.run(self._list, user_id)

    @staticmethod
    def _list(session: Session, user_id: int) -> list[dict]:
        rows = session.execute(select(Preset).where(Preset.user_id == user_id).order_by(Preset.name)).scalars()
        return [preset_model(r) for r in rows]

    async def list_all(self, limit: int = 1000) -> list[dict]:
        """Everyone's presets with their owners (for admins)."""
        return await self.db.run(self._list_all, limit)

    @staticmethod
    def _list_all(session: Session, limit: int) -> list[dict]:
        rows = session.execute(select(Preset, User.name).join(User, User.id == Preset.user_id)
                               .order_by(User.name, Preset.name).limit(limit))
        return [preset_model(p) | {"user": owner} for p, owner in rows]

    async def get(self, user_id: int, name: str) -> dict:
        """The user's preset `name`; 404 when they have none of that name (someone else's included)."""
        found = await self.db.run(self._get, user_id, name) if user_id else None
        if found is None:
            raise NotFound(f"No such preset: {name}")
        return found

    @staticmethod
    def _get(session: Session, user_id: int, name: str) -> dict | None:
        row = _find(session, user_id, name)
        return preset_model(row) if row is not None else None

    # -- changes ----------------------------------------------------------------------------------------

    async def create(self, user_id: int, fields: dict) -> dict:
        return await self.db.run(self._create, user_id, fields, self.max_presets_per_user)

    @staticmethod
    def _create(session: Session, user_id: int, fields: dict, limit: int) -> dict:
        count = session.execute(select(func.count()).select_from(Preset).where(Preset.user_id == user_id)).scalar()
        if count >= limit:
            raise BadRequest(f"You may keep at most {limit} presets; delete one first.", code="limit_reached")
        if _find(session, user_id, fields["name"]) is not None:
            raise Conflict(f"You already have a preset named '{fields['name']}'.")
        now = utcnow()
        row = Preset(user_id=user_id, name=fields["name"], model=fields["model"],
                     system_prompt=fields["system_prompt"], parameters=json.dumps(fields["parameters"]),
                     created_at=now, updated_at=now)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:  # created meanwhile by a concurrent request
            raise Conflict(f"You already have a preset named '{fields['name']}'.") from None
        return preset_model(row)

    async def update(self, user_id: int, name: str, fields: dict) -> dict:
        return await self.db.run(self._update, user_id, name, fields)

    @staticmethod
    def _update(session: Session, user_id: int, name: str, fields: dict) -> dict:
        row = _find(session, user_id, name) if user_id else None
        if row is None:
            raise NotFound(f"No such preset: {name}")
        new_name = fields.get("name", name)
        if new_name != name and _find(session, user_id, new_name) is not None:
            raise Conflict(f"You already have a preset named '{new_name}'.")
        row.name = new_name
        for key in ("model", "system_prompt"):
            if key in fields:
                setattr(row, key, fields[key])
        if "parameters" in fields:
            row.parameters = json.dumps(fields["parameters"])
        row.updated_at = utcnow()
        session.flush()
        return preset_model(row)

    async def delete(self, user_id: int, name: str | None, *, audit: dict | None = None) -> int:
        """Delete one preset (404 if there is none of that name) or, `name` None, all of the user's; returns how
        many went. `audit` (an admin acting on someone else's) records it in the same transaction."""
        return await self.db.run(self._delete, user_id, name, audit)

    @staticmethod
    def _delete(session: Session, user_id: int, name: str | None, audit: dict | None) -> int:
        query = select(Preset).where(Preset.user_id == user_id)
        if name is not None:
            query = query.where(Preset.name == name)
        rows = list(session.execute(query).scalars()) if user_id else []
        if name is not None and not rows:
            raise NotFound(f"No such preset: {name}")
        for row in rows:
            session.delete(row)
        if audit is not None:
            AuditLog.add(session, action="presets.deleted",
                         details={"names": sorted(r.name for r in rows)[:100], "count": len(rows)}, **audit)
        session.flush()
        return len(rows)


def _find(session: Session, user_id: int, name: str) -> Preset | None:
    return session.execute(select(Preset).where(Preset.user_id == user_id, Preset.name == name)).scalar_one_or_none()
