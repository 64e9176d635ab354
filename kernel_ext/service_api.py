"""The one HTTP client for the inference service, under the kernel magics and both widget panels.

It never imports `hub_extension`: a kernel reaches the service over HTTP with a Hub token or a key, and every
failure (an error envelope, a refused connection) becomes an `InferenceError` with a one-line message.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

ACT_AS_HEADER = "X-Inference-Act-As"
SUBJECT_KINDS = ("user", "group")
QUOTA_KINDS = (*SUBJECT_KINDS, "default")  # "default": the quota of everyone no user or group limit covers


class InferenceError(Exception):
    """A call the service refused or could not answer: `status` is None when it was never reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def _name(value: str) -> str:
    """A user or group name as one path segment (names may hold `/`, `@` or spaces)."""
    return quote(value, safe="")


def _subject(kind: str, name: str) -> str:
    if kind not in SUBJECT_KINDS:
        raise ValueError(f"kind must be one of {SUBJECT_KINDS}, not {kind!r}")
    return f"api/{kind}s/{_name(name)}"


def _quota(kind: str, name: str | None) -> str:
    """A quota's route: a user's or a group's, or (`kind` "default", no name) the default one."""
    if kind == "default":
        return "api/quotas/default"
    if kind not in QUOTA_KINDS:
        raise ValueError(f"kind must be one of {QUOTA_KINDS}, not {kind!r}")
    return f"{_subject(kind, name)}/quota"


def _key_fields(name: str, expires_in_days: int | None, features, models) -> dict:
    """The body of a key request; empty narrowing lists mean "no narrowing" and are left out."""
    body: dict[str, Any] = {"name": name}
    if expires_in_days:
        body["expires_in_days"] = expires_in_days
    if features:
        body["features"] = list(features)
    if models:
        body["models"] = list(models)
    return body


# A connection idle this long is not reused. The Hub's proxy (Node) closes idle ones after 5 s, httpx's own
# default: a request sent on one just as the proxy closed it fails, and a POST is not retried.
KEEPALIVE_SECONDS = 2.0


class InferenceClient:
    """Synchronous calls to the service's `/api` and `/v1` routes with one credential.

    `http` lets a caller share an `httpx.Client` (connection pooling, proxies); `act_as(name)` returns a client
    that views the service as that user (admins only; the service audits it).
    """

    def __init__(self, base_url: str, token: str, *, http: httpx.Client | None = None, timeout: float = 30.0,
                 acting_as: str | None = None):
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self.acting_as = acting_as
        self.http = http or httpx.Client(timeout=timeout, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS))

    @classmethod
    def from_environment(cls, **kwargs) -> InferenceClient:
        """The service and the kernel's own Hub token, found from the variables a Hub-spawned server has."""
        from .discovery import ServiceNotFound, find_service

        try:
            location = find_service()
        except ServiceNotFound as e:
            raise InferenceError(str(e)) from None
        return cls(location.base_url, location.token, **kwargs)

    def act_as(self, name: str) -> InferenceClient:
        return InferenceClient(self.base_url, self.token, http=self.http, acting_as=name)

    def close(self) -> None:
        """Close the pooled connections (a client made with `act_as` shares them)."""
        self.http.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never the token
        acting = f", acting_as={self.acting_as!r}" if self.acting_as else ""
        return f"InferenceClient({self.base_url!r}{acting})"

    # -- transport ------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict | None = None, json: Any = None) -> Any:
        """One call; the decoded JSON answer (None for 204), or an InferenceError."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if self.acting_as:
            headers[ACT_AS_HEADER] = self.acting_as
        params = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        url = self.base_url + path
        try:
            response = self.http.request(method, url, params=params, json=json, headers=headers)
        except httpx.HTTPError as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise InferenceError(f"Cannot reach the inference service at {self.base_url} ({reason}).") from None
        if response.status_code >= 300:  # a redirect is a login page or a wrong URL, never an answer
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise InferenceError(f"{method} {path}: the service answered something that is not JSON.",
                                 response.status_code) from None

    # -- everyone -------------------------------------------------------------------------------------------

    def health(self) -> dict:
        return self.request("GET", "health")

    def me(self) -> dict:
        return self.request("GET", "api/me")

    def my_permissions(self) -> dict:
        return self.request("GET", "api/me/permissions")

    def keys(self, include_revoked: bool = False) -> list[dict]:
        return self.request("GET", "api/keys", params={"include_revoked": str(include_revoked).lower()})["keys"]

    def create_key(self, name: str, expires_in_days: int | None = None, features=None, models=None) -> dict:
        """The new key's model with its secret in `"key"` (the only time the service shows it)."""
        return self.request("POST", "api/keys", json=_key_fields(name, expires_in_days, features, models))

    def revoke_key(self, key_id: int) -> None:
        self.request("DELETE", f"api/keys/{int(key_id)}")

    def usage(self, **query) -> dict:
        """`/api/usage`: `bucket`, `group_by`, `since`, `until` (the last 30 days by default)."""
        return self.request("GET", "api/usage", params=query)

    def quota(self) -> dict:
        return self.request("GET", "api/me/quota")

    def models(self) -> list[dict]:
        return self.request("GET", "v1/models")["data"]

    # -- presets and knowledge collections (feature `resources`) ------------------------------------------

    def presets(self) -> list[dict]:
        return self.request("GET", "api/presets")["presets"]

    def create_preset(self, name: str, model: str, system_prompt: str = "", parameters: dict | None = None) -> dict:
        """A preset, used in chat as `model="preset:<name>"`."""
        body = {"name": name, "model": model, "system_prompt": system_prompt, "parameters": parameters or {}}
        return self.request("POST", "api/presets", json=body)

    def update_preset(self, name: str, **changes) -> dict:
        """Change some of `name`, `model`, `system_prompt`, `parameters`."""
        return self.request("PATCH", f"api/presets/{_name(name)}", json=changes)

    def delete_preset(self, name: str) -> None:
        self.request("DELETE", f"api/presets/{_name(name)}")

    def collections(self) -> list[dict]:
        return self.request("GET", "api/collections")["collections"]

    def create_collection(self, name: str, description: str = "") -> dict:
        return self.request("POST", "api/collections", json={"name": name, "description": description})

    def delete_collection(self, name: str) -> None:
        self.request("DELETE", f"api/collections/{_name(name)}")

    def documents(self, collection: str) -> list[dict]:
        return self.request("GET", f"api/collections/{_name(collection)}/documents")["documents"]

    def add_documents(self, collection: str, documents) -> dict:
        """`documents`: texts, or `{"text": ..., "title": ...}` objects; chunked and embedded by the service."""
        body = {"documents": [d if isinstance(d, dict) else {"text": d} for d in documents]}
        return self.request("POST", f"api/collections/{_name(collection)}/documents", json=body)

    def search(self, collection: str, query: str, top_k: int = 5) -> list[dict]:
        """The chunks most like `query`, best first (`text`, `score`, `document`)."""
        body = {"query": query, "top_k": top_k}
        return self.request("POST", f"api/collections/{_name(collection)}/search", json=body)["results"]

    # -- admins ---------------------------------------------------------------------------------------------

    def users(self, status: str | None = None) -> list[dict]:
        return self.request("GET", "api/users", params={"status": status})["users"]

    def user(self, name: str) -> dict:
        return self.request("GET", _subject("user", name))

    def set_user_status(self, name: str, action: str) -> dict:
        """`action`: approve, deny, disable or enable (409 when the user's status does not allow it)."""
        return self.request("POST", f"{_subject('user', name)}/{_name(action)}")

    def user_permissions(self, name: str) -> dict:
        return self.request("GET", f"{_subject('user', name)}/permissions")

    def grants(self, kind: str, name: str) -> dict:
        return self.request("GET", f"{_subject(kind, name)}/grants")

    def set_grants(self, kind: str, name: str, changes: dict, replace: bool = False) -> dict:
        """Merge `{"features": {f: true|false|null}, "models": {...}}` (null clears one), or replace them all."""
        return self.request("PUT" if replace else "PATCH", f"{_subject(kind, name)}/grants", json=changes)

    def user_keys(self, name: str, include_revoked: bool = False) -> list[dict]:
        params = {"include_revoked": str(include_revoked).lower()}
        return self.request("GET", f"{_subject('user', name)}/keys", params=params)["keys"]

    def issue_key(self, user: str, name: str, expires_in_days: int | None = None, features=None,
                  models=None) -> dict:
        """A key an admin issues for a user (audited with both names); the secret is in `"key"`."""
        body = _key_fields(name, expires_in_days, features, models)
        return self.request("POST", f"{_subject('user', user)}/keys", json=body)

    def revoke_user_key(self, user: str, key_id: int) -> None:
        self.request("DELETE", f"{_subject('user', user)}/keys/{int(key_id)}")

    def revoke_user_keys(self, user: str) -> int:
        """Revoke every key of a user at once (audited); returns how many were still active."""
        return self.request("DELETE", f"{_subject('user', user)}/keys")["revoked"]

    def audit(self, **filters) -> list[dict]:
        """`user`, `action`, `since`, `until`, `limit`; newest first."""
        return self.request("GET", "api/audit", params=filters)["events"]

    def admin_usage(self, **query) -> dict:
        """`/api/admin/usage`: as `usage`, plus `group_by=user` and `user=`."""
        return self.request("GET", "api/admin/usage", params=query)

    def subject_quota(self, kind: str, name: str | None = None) -> dict:
        """The quota row of a user, a group or (`kind` "default", no name) everyone's default."""
        return self.request("GET", _quota(kind, name))

    def set_subject_quota(self, kind: str, name: str | None, limits: dict) -> dict:
        """Replace the limits (`tokens_per_day`, `tokens_per_month`, `requests_per_minute`, `weight`; 0:
        unlimited, None: nothing at this level); `kind` "default" (name None) sets everyone's default."""
        return self.request("PUT", _quota(kind, name), json=limits)

    def invites(self, status: str | None = None) -> list[dict]:
        """Invitations, newest first; `status`: active, used, expired or revoked. Codes are never listed."""
        return self.request("GET", "api/invites", params={"status": status})["invites"]

    def create_invite(self, expires_in_days: float = 7, note: str = "", groups=None) -> dict:
        """A new invitation; its `code` and `url` (the Hub's `/hub/invite/<code>`) are in this answer only."""
        body = {"expires_in_days": expires_in_days, "note": note, "groups": list(groups or ())}
        return self.request("POST", "api/invites", json=body)

    def revoke_invite(self, invite_id: int) -> dict:
        return self.request("DELETE", f"api/invites/{int(invite_id)}")

    def reset_password(self, name: str, password: str | None = None) -> dict:
        """Set a user's local password; without one a random one is made and answered (`"password"`) once."""
        body = {} if password is None else {"password": password}
        return self.request("POST", f"{_subject('user', name)}/password", json=body)

    def all_resources(self) -> dict:
        """Everyone's presets and collections, each with its `user`."""
        return self.request("GET", "api/admin/resources")

    def delete_user_resources(self, user: str, kind: str, name: str | None = None) -> int:
        """Delete a user's preset or collection `name` (`kind` "presets" or "collections"), or all of that kind;
        audited. Returns how many went."""
        if kind not in ("presets", "collections"):
            raise ValueError(f"kind must be 'presets' or 'collections', not {kind!r}")
        path = f"{_subject('user', user)}/{kind}" + (f"/{_name(name)}" if name else "")
        return self.request("DELETE", path)["deleted"]


def _error(response: httpx.Response) -> InferenceError:
    """The service's `{"error": {...}}` envelope as an InferenceError; anything else by its status line."""
    try:
        body = response.json()
        error = body["error"]
        message, code = str(error.get("message") or ""), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = "", None
    if not message:
        message = f"HTTP {response.status_code} {response.reason_phrase} from {response.request.url.path}"
    return InferenceError(message.splitlines()[0], response.status_code, code)
