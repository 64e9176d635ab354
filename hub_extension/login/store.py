"""What logins keep in the SERVICE's database: users' status rows, local accounts and invites.

Plain synchronous functions on a SQLAlchemy `Session` (run them through `Database.run`), shared by the Hub side
(`registration.py`, `local.py`) and the service side (`handlers/invites.py`, the CLI), so both agree on every rule.
The `users` table is the one the service's `UserDirectory` reads: the status there is the only status there is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..audit import AuditLog
from ..errors import BadRequest, Conflict, NotFound
from ..orm import Invite, LocalAccount, User, UserStatus, utcnow

INVITE_DAYS_DEFAULT = 7
INVITE_DAYS_MAX = 365
INVITE_NOTE_MAX = 500
INVITE_GROUPS_MAX = 32
INVITE_CODE_PREFIX = "inv_"
INVITE_CODE_MAX = 128  # longer "codes" are refused before hashing
# Hub group names: what the Hub accepts in a group name, kept short.
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


# -- users ----------------------------------------------------------------------------------------------


def user_status(session: Session, name: str) -> str | None:
    """The status of `name` in the service (active / pending / disabled), or None for someone unknown."""
    return session.execute(select(User.status).where(User.name == name)).scalar_one_or_none()


def add_user(session: Session, name: str, *, status: str, groups=(), audit: dict | None = None,
             details: dict | None = None) -> None:
    """A user's row, made at their first login (the Hub sync completes it); Conflict when the name is taken."""
    if status not in UserStatus.ALL:
        raise ValueError(f"bad status {status!r}")
    session.add(User(name=name, status=status, hub_groups=sorted(set(groups)), hub_roles=[]))
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"The user name {name!r} is taken.") from None
    if audit is not None:
        AuditLog.add(session, action="user.register", details={"status": status, **(details or {})}, **audit)


def activate_admin(session: Session, name: str, audit: dict) -> None:
    """A configured admin who is still pending is made active (audited); any other status is left alone."""
    row = session.execute(select(User).where(User.name == name).with_for_update()).scalar_one_or_none()
    if row is not None and row.status == UserStatus.PENDING:
        row.status = UserStatus.ACTIVE
        AuditLog.add(session, action="user.approve", details={"from": UserStatus.PENDING, "to": UserStatus.ACTIVE,
                                                              "reason": "configured admin"}, **audit)


def retire_user(session: Session, name: str) -> None:
    """The Hub deleted `name` (its admin page or API): the service retires them now rather than at its next Hub
    sync (`users.retire`), and a local account's password goes too: it opens nothing, and the name is free."""
    from ..users import retire

    row = session.execute(select(User).where(User.name == name).with_for_update()).scalar_one_or_none()
    if row is not None:
        retire(session, row, actor="hub")
    if session.execute(delete(LocalAccount).where(LocalAccount.name == name)).rowcount:
        AuditLog.add(session, action="account.delete", actor="hub", subject=name, client_ip=None)


# -- local accounts -------------------------------------------------------------------------------------


def password_hash(session: Session, name: str) -> str | None:
    return session.execute(select(LocalAccount.password_hash).where(LocalAccount.name == name)).scalar_one_or_none()


def create_account(session: Session, name: str, hashed: str, audit: dict) -> None:
    """A new local account; Conflict when the name already has one."""
    session.add(LocalAccount(name=name, password_hash=hashed))
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"The user name {name!r} is taken.") from None
    AuditLog.add(session, action="account.create", **audit)


def set_password(session: Session, name: str, hashed: str, audit: dict, *, action: str, create: bool = False) -> None:
    """Replace the password hash (`password.change` by the user, `password.reset` by an admin).

    `create`: an admin may give a password to a user who has none yet (a Hub user made by the API).
    """
    row = session.execute(select(LocalAccount).where(LocalAccount.name == name).with_for_update()).scalar_one_or_none()
    if row is None:
        if not create:
            raise NotFound(f"No local account: {name}")
        row = LocalAccount(name=name, password_hash=hashed)
        session.add(row)
    row.password_hash = hashed
    row.password_changed_at = utcnow()
    session.flush()
    AuditLog.add(session, action=action, **audit)


def rehash(session: Session, name: str, old: str, new: str) -> None:
    """Store a hash made with today's parameters, unless the password changed meanwhile."""
    session.execute(update(LocalAccount).where(LocalAccount.name == name, LocalAccount.password_hash == old)
                    .values(password_hash=new))


# -- invites --------------------------------------------------------------------------------------------


def invite_link(hub_url: str, code: str) -> str:
    """`<hub>/hub/invite/<code>`, for `hub_url` the Hub's public address with its base URL."""
    return f"{hub_url.rstrip('/')}/hub/invite/{code}"


class InviteRefused(Exception):
    """An invite that cannot be used: `reason` is unknown, used, expired or revoked."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


def invite_status(row: Invite, now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    if row.revoked_at is not None:
        return "revoked"
    if row.used_at is not None:
        return "used"
    if row.expires_at <= now:
        return "expired"
    return "active"


def invite_model(row: Invite) -> dict:
    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() + "Z" if value else None

    return {
        "id": row.id, "prefix": row.prefix, "note": row.note, "groups": list(row.groups or ()),
        "status": invite_status(row), "created_at": iso(row.created_at), "created_by": row.created_by,
        "expires_at": iso(row.expires_at), "used_at": iso(row.used_at), "used_by": row.used_by,
        "revoked_at": iso(row.revoked_at),
    }


def parse_invite_request(body: dict) -> dict:
    """`{"expires_in_days": 7, "note": "...", "groups": ["..."]}` checked; 400 naming the bad field."""
    unknown = set(body) - {"expires_in_days", "note", "groups"}
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(sorted(unknown))}.", param=sorted(unknown)[0])
    days = body.get("expires_in_days", INVITE_DAYS_DEFAULT)
    if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= INVITE_DAYS_MAX:
        raise BadRequest(f"'expires_in_days' must be a number of days above 0, at most {INVITE_DAYS_MAX}.",
                         param="expires_in_days")
    note = body.get("note") or ""
    if not isinstance(note, str) or len(note) > INVITE_NOTE_MAX or not note.isprintable():
        raise BadRequest(f"'note' must be printable text of at most {INVITE_NOTE_MAX} characters.", param="note")
    groups = body.get("groups") or []
    if (not isinstance(groups, list) or len(groups) > INVITE_GROUPS_MAX
            or not all(isinstance(g, str) and GROUP_NAME.match(g) for g in groups)):
        raise BadRequest(f"'groups' must be a list of at most {INVITE_GROUPS_MAX} group names.", param="groups")
    return {"expires_in_days": float(days), "note": note, "groups": sorted(set(groups))}


def create_invite(session: Session, *, expires_in_days: float, note: str, groups: list[str],
                  audit: dict) -> tuple[str, dict]:
    """A new invite: (its code, shown once; its model). Only the code's SHA-256 is stored."""
    code = INVITE_CODE_PREFIX + secrets.token_urlsafe(24)
    row = Invite(hashed=code_hash(code), prefix=code[:10], note=note, groups=groups, created_by=audit["actor"],
                 expires_at=utcnow() + dt.timedelta(days=expires_in_days))
    session.add(row)
    session.flush()
    AuditLog.add(session, action="invite.create", subject=None,
                 details={"invite": row.id, "groups": groups, "expires_at": invite_model(row)["expires_at"]},
                 **{k: v for k, v in audit.items() if k != "subject"})
    return code, invite_model(row)


def list_invites(session: Session, status: str | None = None) -> list[dict]:
    if status not in (None, "active", "used", "expired", "revoked"):
        raise BadRequest("'status' must be active, used, expired or revoked.", param="status")
    rows = session.execute(select(Invite).order_by(Invite.id.desc())).scalars()
    models = [invite_model(row) for row in rows]
    return [m for m in models if status is None or m["status"] == status]


def revoke_invite(session: Session, invite_id: int, audit: dict) -> dict:
    """Revoke an unused invite (audited); revoking a revoked one changes nothing; a used one is a 409."""
    row = session.execute(select(Invite).where(Invite.id == invite_id).with_for_update()).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No such invite: {invite_id}")
    if row.used_at is not None:
        raise Conflict(f"Invite {invite_id} was already used by {row.used_by}.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        AuditLog.add(session, action="invite.revoke", details={"invite": row.id},
                     **{k: v for k, v in audit.items() if k != "subject"})
    return invite_model(row)


def check_invite(session: Session, code: str) -> dict:
    """The model of a usable invite, or InviteRefused saying why not (nothing changes)."""
    row = _find_invite(session, code)
    status = invite_status(row)
    if status != "active":
        raise InviteRefused(status)
    return invite_model(row)


def redeem_invite(session: Session, code: str, name: str, *, client_ip: str | None = None) -> list[str]:
    """Use an invite for `name`: its groups, or InviteRefused. Single use even under concurrent redemptions.

    One conditional UPDATE claims it: of two transactions redeeming at the same moment, the second waits on the
    row's lock (PostgreSQL) or the database lock (SQLite) and then matches no row. Audited in the caller's
    transaction, with whatever else the redemption creates (the user's row, a local account).
    """
    if not code or len(code) > INVITE_CODE_MAX:
        raise InviteRefused("unknown")
    now = utcnow()
    claimed = session.execute(
        update(Invite)
        .where(Invite.hashed == code_hash(code), Invite.used_at.is_(None), Invite.revoked_at.is_(None),
               Invite.expires_at > now)
        .values(used_at=now, used_by=name)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        raise InviteRefused(invite_status(_find_invite(session, code), now))
    row = session.execute(select(Invite.id, Invite.groups).where(Invite.hashed == code_hash(code))).one()
    AuditLog.add(session, actor=name, action="invite.redeem", subject=name, client_ip=client_ip,
                 details={"invite": row.id, "groups": list(row.groups or ())})
    return list(row.groups or ())


def set_mirrored_groups(session: Session, name: str, groups: list[str]) -> None:
    """The groups the service shows for `name` until the Hub sync reports the Hub's own."""
    session.execute(update(User).where(User.name == name).values(hub_groups=sorted(set(groups))))


def invited_groups(session: Session, name: str) -> list[str]:
    """The groups of the invite this user redeemed (added back at every login under providers that manage groups).

    Only an invite redeemed by this person: an earlier, deleted user of the same name redeemed theirs before this
    row was made (`used_at` < `created_at`), so it does not count."""
    rows = session.execute(
        select(Invite.groups).join(User, User.name == Invite.used_by)
        .where(User.name == name, Invite.used_at >= User.created_at)
    ).scalars()
    return sorted({g for groups in rows for g in groups or ()})


def _find_invite(session: Session, code: str) -> Invite:
    if not code or len(code) > INVITE_CODE_MAX:
        raise InviteRefused("unknown")
    row = session.execute(select(Invite).where(Invite.hashed == code_hash(code))).scalar_one_or_none()
    if row is None:
        raise InviteRefused("unknown")
    return row
