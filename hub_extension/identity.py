"""Who is calling: where every credential is checked.

Modes (`IdentityProvider.mode`):
- `none`: no credential is read; handlers see an anonymous admin identity.
- `static`: keys from configuration, compared in constant time; a holder acts as admin.
- `hub`: users from the Hub: a Hub OAuth cookie (browser), a Hub API token, or a key we issued.
  Configured static keys are still accepted when given.

Every failure is the same 401 (`invalid_api_key`) so a caller learns nothing about which part failed;
a disabled user gets 403 because the credential itself is fine.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass

from traitlets import Enum, Integer, List, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import key_format
from .api_keys import KeyManager
from .errors import Forbidden, ServiceUnavailable, Unauthorized
from .orm import UserStatus
from .permissions import PermissionPolicy
from .scopes import ADMIN_LEVEL_HUB_SCOPES, inference_scopes
from .users import UserDirectory, UserState

log = logging.getLogger("hub_extension.identity")

IDENTITY_MODES = ("none", "static", "hub")
_AUTH_HEADER = re.compile(r"^\s*(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Identity:
    """The caller of one request, as every handler and the permission check see it."""

    name: str
    via: str  # "none" | "static_key" | "api_key" | "hub_token" | "hub_cookie"
    is_admin: bool
    user_id: int | None = None
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    hub_scopes: frozenset[str] | None = None  # None: not known from this credential (resolve from roles)
    key_id: int | None = None
    key_features: tuple[str, ...] | None = None  # a narrowed key's features (None: not narrowed)
    key_models: tuple[str, ...] | None = None
    acting_admin: str | None = None  # set when an admin views the service as this user

    @classmethod
    def anonymous(cls) -> Identity:
        return cls(name="anonymous", via="none", is_admin=True)

    def as_user(self, state: UserState, is_admin: bool) -> Identity:
        """This request, re-identified as another user (view-as): exactly their rights, never ours."""
        return Identity(
            name=state.name,
            via=self.via,
            is_admin=is_admin,
            user_id=state.id,
            groups=state.groups,
            roles=state.roles,
            acting_admin=self.name,
        )

    def model(self) -> dict:
        return {
            "name": self.name,
            "role": "admin" if self.is_admin else "user",
            "groups": list(self.groups),
            "authenticated_via": self.via,
            "key_id": self.key_id,
            "acting_admin": self.acting_admin,
        }


class StaticKeys:
    """Configured keys, compared by SHA-256 digest in constant time against every configured key."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        found = False
        for candidate in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found


def read_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and '#' comments skipped (a comment taken as a key would be anyone's key)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"IdentityProvider.static_keys_file {path!r} cannot be read: {e}") from None
    return [line for line in lines if line and not line.startswith("#")]


def presented_credential(headers) -> str | None:
    """The bearer credential from `Authorization: Bearer|token X` or `x-api-key: X`, if any."""
    header = headers.get("Authorization")
    if header:
        match = _AUTH_HEADER.match(header)
        if not match:
            raise Unauthorized("Malformed Authorization header; use 'Bearer <key>'.")
        return match.group(1)
    key = headers.get("x-api-key")
    return key.strip() if key else None


class IdentityProvider(LoggingConfigurable):
    """Resolves a request to an Identity, or raises Unauthorized / Forbidden. The one identity path: the API and
    the account page both ask it (`authenticate` for API requests, `hub_identity` for a Hub user already known)."""

    mode = Enum(
        list(IDENTITY_MODES),
        help="""How callers are identified: `none`, `static` or `hub`.

        - `none`: no authentication at all (every caller is an anonymous admin). Loopback only, please.
        - `static`: only the configured `static_keys`; a holder acts as admin.
        - `hub`: JupyterHub users (OAuth cookie, Hub API token) and keys this service issued;
          configured static keys are still accepted.

        Defaults to $INFERENCE_IDENTITY, else `hub` when run by a Hub, else `static` when static keys are
        configured, else `none`.""",
    ).tag(config=True)

    @default("mode")
    def _mode_default(self):
        if os.environ.get("INFERENCE_IDENTITY"):
            return os.environ["INFERENCE_IDENTITY"]
        if os.environ.get("JUPYTERHUB_API_TOKEN"):
            return "hub"
        return "static" if self.static_keys else "none"

    static_keys = List(
        Unicode(),
        help="""Keys accepted as an admin in `static` mode (and also in `hub` mode).
        Defaults to the comma-separated $INFERENCE_API_KEYS. Compared in constant time.""",
    ).tag(config=True)

    @default("static_keys")
    def _static_keys_default(self):
        return [k.strip() for k in os.environ.get("INFERENCE_API_KEYS", "").split(",") if k.strip()]

    static_keys_file = Unicode(
        "",
        help="""A file with one static key per line, added to `static_keys`; blank lines and lines starting with
        '#' are skipped. A file that cannot be read stops the start (a configuration error).""",
    ).tag(config=True)

    hub_token_cache_seconds = Integer(
        30,
        help="""How long a Hub token's (or cookie's) identity is cached. This bounds how long a revoked Hub
        token keeps working. Must be at least 1 (JupyterHub treats 0 as 'forever').""",
    ).tag(config=True)

    @validate("hub_token_cache_seconds")
    def _validate_cache(self, proposal):
        if proposal.value < 1:
            raise ValueError("IdentityProvider.hub_token_cache_seconds must be >= 1 (0 means forever to HubAuth)")
        return proposal.value

    def __init__(self, *, keys: KeyManager | None = None, users: UserDirectory | None = None,
                 permissions: PermissionPolicy | None = None, hub_auth=None, **kwargs):
        super().__init__(**kwargs)
        if self.static_keys_file:
            self.static_keys = self.static_keys + read_keys_file(self.static_keys_file)
        if self.mode == "static" and not self.static_keys:
            raise ValueError("IdentityProvider.mode is 'static' but no static_keys are configured")
        self.keys = keys
        self.users = users
        self.permissions = permissions
        self.hub_auth = hub_auth
        self.checker = StaticKeys(self.static_keys)
        self._key_identities: dict[int, tuple] = {}
        self.on_failure = lambda reason: None  # told why each refused request was refused (metrics)

    async def authenticate(self, handler) -> Identity:
        try:
            return await self._authenticate(handler)
        except (Unauthorized, Forbidden) as e:
            self.on_failure(e.code or type(e).__name__)
            raise

    async def _authenticate(self, handler) -> Identity:
        if self.mode == "none":  # no credential is read at all
            return Identity.anonymous()
        credential = presented_credential(handler.request.headers)
        if credential and self.checker and self.checker.matches(credential):
            return Identity(name="static", via="static_key", is_admin=True)
        if self.mode == "static":
            raise Unauthorized("Invalid API key." if credential else "An API key is required.")
        if credential and key_format.looks_like_key(credential):
            return await self._from_key(credential)
        if handler.request.headers.get("x-api-key") and not handler.request.headers.get("Authorization"):
            raise Unauthorized("Invalid API key.")  # x-api-key carries only our keys, never Hub tokens
        return await self._from_hub(handler, credential)

    async def _from_key(self, secret: str) -> Identity:
        record = await self.keys.check(secret)
        state = await self.users.by_id(record.user_id)
        check_state(state)
        # Both caches hand out the same objects until they refresh, so the identity built from them can be reused.
        cached = self._key_identities.get(record.id)
        if cached is not None and cached[0] is record and cached[1] is state:
            return cached[2]
        narrowed = record.features is not None or record.models is not None
        identity = Identity(
            name=state.name,
            via="api_key",
            # A narrowed key never administers (nor acts as another user): only a key with its owner's full rights.
            is_admin=not narrowed and self.permissions.is_admin(state),
            user_id=state.id,
            groups=state.groups,
            roles=state.roles,
            key_id=record.id,
            key_features=record.features,
            key_models=record.models,
        )
        if len(self._key_identities) > 100_000:
            self._key_identities.clear()
        self._key_identities[record.id] = (record, state, identity)
        return identity

    async def _from_hub(self, handler, token: str | None) -> Identity:
        from tornado.web import HTTPError

        try:
            hub_user = await self._ask_hub(handler, token)
        except HTTPError as e:  # HubAuth's answer when the Hub is unreachable or failing (its cache still works)
            if e.status_code < 500:
                raise
            log.warning("the Hub could not check a credential: %s", e.log_message)
            raise ServiceUnavailable("The Hub cannot be reached to check this credential; try again shortly.",
                                     retry_after=5) from None
        if not hub_user:
            raise Unauthorized("Authentication required: a Hub token, a Hub login or an API key.")
        return await self.hub_identity(hub_user, via="hub_token" if token else "hub_cookie")

    async def _ask_hub(self, handler, token: str | None) -> dict | None:
        if token:  # a Hub API token in the header: asked of the Hub (cached), never falling back to a cookie
            hub_user = await self.hub_auth.user_for_token(token, sync=False)
            handler._token_authenticated = True  # JupyterHub's XSRF rules: token requests need no XSRF
        else:  # a browser with the Hub's OAuth cookie (HubOAuth applies the XSRF check for writes)
            hub_user = await self.hub_auth.get_user(handler, sync=False)
        return hub_user

    async def hub_identity(self, hub_user: dict, via: str) -> Identity:
        """The identity of a user the Hub vouched for, with the rights of that credential (its scopes)."""
        if hub_user.get("kind", "user") != "user":
            raise Forbidden("Only users can call this service.")
        access = self.hub_auth.access_scopes
        if access and not self.hub_auth.check_scopes(access, hub_user):
            raise Forbidden("This Hub credential does not grant access to the inference service.")
        state = await self.users.seen_from_hub(hub_user)
        check_state(state)
        self.users.note_seen(state.id)
        scopes = frozenset(hub_user.get("scopes") or ())
        return Identity(
            name=state.name,
            via=via,
            # Admin power follows the credential, not the person: a Hub admin's token narrowed to
            # `access:services` is an ordinary user's here.
            is_admin=bool(scopes & ADMIN_LEVEL_HUB_SCOPES),
            user_id=state.id,
            groups=state.groups,
            roles=state.roles,
            hub_scopes=inference_scopes(scopes),
        )


def check_state(state: UserState | None) -> None:
    """Refuse a user the Hub no longer has, a disabled one (403) and one awaiting approval (403)."""
    if state is None or not state.in_hub:
        raise Unauthorized("Invalid API key.")
    if state.status == UserStatus.DISABLED:
        raise Forbidden("This account is disabled.", code="user_disabled")
    if state.status == UserStatus.PENDING:
        raise Forbidden("This account is awaiting approval.", code="user_pending")
