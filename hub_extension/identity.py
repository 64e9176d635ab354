"""Who is calling: where every credential is checked.

Modes:
- `none`: no authenticator exists; handlers see an anonymous admin identity and no credential is read.
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
import re
from dataclasses import dataclass

from . import key_format
from .api_keys import KeyManager
from .errors import Forbidden, Unauthorized
from .orm import UserStatus
from .users import UserDirectory, UserState

log = logging.getLogger("hub_extension.identity")

ADMIN_SCOPE = "custom:inference:admin"
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


class Authenticator:
    """Resolves a request to an Identity, or raises Unauthorized / Forbidden."""

    def __init__(
        self,
        *,
        mode: str,
        static_keys: StaticKeys,
        keys: KeyManager | None = None,
        users: UserDirectory | None = None,
        hub_auth=None,
        hub_roles: list[dict] | None = None,
    ):
        self.mode = mode
        self.static_keys = static_keys
        self.keys = keys
        self.users = users
        self.hub_auth = hub_auth
        self.hub_roles = hub_roles or []
        self.failures = 0  # for metrics
        self._key_identities: dict[int, tuple] = {}

    async def authenticate(self, handler) -> Identity:
        try:
            return await self._authenticate(handler)
        except Unauthorized:
            self.failures += 1
            raise

    async def _authenticate(self, handler) -> Identity:
        credential = presented_credential(handler.request.headers)
        if credential and self.static_keys and self.static_keys.matches(credential):
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
        self._check_state(state)
        # Both caches hand out the same objects until they refresh, so the identity built from them can be reused.
        cached = self._key_identities.get(record.id)
        if cached is not None and cached[0] is record and cached[1] is state:
            return cached[2]
        identity = Identity(
            name=state.name,
            via="api_key",
            is_admin=self.is_admin(state),
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
        if token:  # a Hub API token in the header: asked of the Hub (cached), never falling back to a cookie
            hub_user = await self.hub_auth.user_for_token(token, sync=False)
            handler._token_authenticated = True  # JupyterHub's XSRF rules: token requests need no XSRF
        else:  # a browser with the Hub's OAuth cookie (HubOAuth applies the XSRF check for writes)
            hub_user = await self.hub_auth.get_user(handler, sync=False)
        if not hub_user:
            raise Unauthorized("Authentication required: a Hub token, a Hub login or an API key.")
        if hub_user.get("kind", "user") != "user":
            raise Forbidden("Only users can call this service.")
        scopes = set(hub_user.get("scopes") or ())
        access = self.hub_auth.access_scopes
        if access and not self.hub_auth.check_scopes(access, hub_user):
            raise Forbidden("This Hub credential does not grant access to the inference service.")
        state = await self.users.seen_from_hub(hub_user)
        self._check_state(state)
        self.users.note_seen(state.id)
        hub_scopes = frozenset(s for s in scopes if s.startswith("custom:inference:"))
        via = "hub_token" if token else "hub_cookie"
        return Identity(
            name=state.name,
            via=via,
            is_admin=state.hub_admin or ADMIN_SCOPE in hub_scopes,
            user_id=state.id,
            groups=state.groups,
            roles=state.roles,
            hub_scopes=hub_scopes,
        )

    def scopes_from_roles(self, state: UserState) -> frozenset[str]:
        """The user's `custom:inference:*` Hub scopes, from the Hub roles they or their groups hold.

        The Hub has no API that lists a role's scopes, so the service is handed the same `load_roles`
        list the Hub is configured with (`InferenceService.hub_roles`); which roles a user holds and which
        groups they are in come live from the Hub.
        """
        scopes: set[str] = set()
        groups = set(state.groups)
        for role in self.hub_roles:
            if role.get("name") in state.roles or groups.intersection(role.get("groups") or ()):
                scopes.update(role.get("scopes") or ())
        return frozenset(s for s in scopes if s.startswith("custom:inference:"))

    def is_admin(self, state: UserState) -> bool:
        return state.hub_admin or ADMIN_SCOPE in self.scopes_from_roles(state)

    @staticmethod
    def _check_state(state: UserState | None) -> None:
        if state is None or not state.in_hub:
            raise Unauthorized("Invalid API key.")
        if state.status == UserStatus.DISABLED:
            raise Forbidden("This account is disabled.", code="user_disabled")
        if state.status == UserStatus.PENDING:
            raise Forbidden("This account is awaiting approval.", code="user_pending")
