"""The base handlers every route uses.

Deny by default: `APIHandler.auth` is `Auth.USER` unless a handler says otherwise, and `prepare()`
authenticates before any method runs. The public routes are the ones declaring `Auth.PUBLIC`; the app
checks them against `PUBLIC_ROUTES` at start so a new public route is always a deliberate choice.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any

from tornado import web

from ..administration import ACT_AS_HEADER
from ..db import unavailable
from ..errors import ApiError, Forbidden, NotFound, PayloadTooLarge, ServiceUnavailable, Unauthorized
from ..identity import Identity
from ..json_body import LARGE_BODY_BYTES, parse_object
from ..net import client_ip

log = logging.getLogger("hub_extension.http")


class Auth(enum.Enum):
    PUBLIC = "public"  # no credentials needed (health)
    USER = "user"  # any authenticated, active user
    ADMIN = "admin"  # an authenticated admin, never while acting as another user


@web.stream_request_body
class APIHandler(web.RequestHandler):
    """JSON in, JSON out; errors as `{"error": {...}}`; never a redirect to a login page.

    The body is streamed in: past `max_body_bytes` it is read and dropped, and the handler answers a clean
    413 (the Hub's proxy turns a connection closed mid-upload into a confusing 503). The server itself
    drops bodies beyond `InferenceService.max_body_bytes * 8`.
    """

    auth: Auth = Auth.USER
    identity: Identity

    @property
    def services(self):
        return self.settings["services"]

    @property
    def client_ip(self) -> str:
        """The caller's address: forwarding headers count only from a trusted proxy (`net.client_ip`)."""
        return client_ip(
            self.request.remote_ip, self.request.headers.get("X-Forwarded-For"), self.services.trusted_proxies
        )

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def check_xsrf_cookie(self) -> None:
        """Cookie-authenticated writes must carry the Hub's XSRF token; header credentials need none."""
        if getattr(self, "identity", None) is not None and self.identity.via == "hub_cookie":
            super().check_xsrf_cookie()

    async def prepare(self) -> None:
        self._body_parts: list[bytes] = []
        self._body_size = 0
        if getattr(self.services, "stopping", False):  # health included: balancers must stop sending work here
            raise ServiceUnavailable("The service is shutting down; try again shortly.", retry_after=5)
        self._in_flight = getattr(self.services, "in_flight", set())  # (some tests hand a bare namespace)
        self._in_flight.add(self)
        if "token" in self.request.query_arguments or "api_key" in self.request.query_arguments:
            raise Unauthorized("Credentials in the URL are refused; send them in the Authorization header.")
        if self.auth is Auth.PUBLIC:
            return
        if self.services.identity.mode == "none":  # no authentication at all: nothing read, nothing checked
            self.identity = Identity.anonymous()
            return
        self.identity = await self.services.identity.authenticate(self)
        # Only now that we know the credential kind can the XSRF rule be applied.
        if self.request.method not in ("GET", "HEAD", "OPTIONS"):
            self.check_xsrf_cookie()
        act_as = self.request.headers.get(ACT_AS_HEADER)
        if act_as is not None:  # view as user (D4): from here on the request runs as that user, never more
            self.identity = await self.services.admin.act_as(
                self.identity, act_as.strip(), audit_log=self.services.audit, client_ip=self.client_ip,
                method=self.request.method, path=self.request.path,
            )
        if self.auth is Auth.ADMIN and not self.identity.is_admin:
            raise Forbidden("This action needs an administrator.")

    def finish(self, chunk=None):
        """Out of `in_flight` once answered (after `on_finish`, so its usage is buffered by then)."""
        try:
            return super().finish(chunk)
        finally:
            getattr(self, "_in_flight", set()).discard(self)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        getattr(self, "_in_flight", set()).discard(self)

    # -- request bodies ------------------------------------------------------------------------

    def data_received(self, chunk: bytes) -> None:
        if getattr(self, "_refused_early", False):  # answered already (send_error): read and dropped, never kept
            return
        self._body_size += len(chunk)
        if self._body_size <= self.services.max_body_bytes:
            self._body_parts.append(chunk)
        else:
            self._body_parts = []

    async def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object; 413 past the limit, 400 for anything else (`json_body.py`).

        A large body is parsed and checked on a worker thread, so one big request never holds the event loop.
        """
        if self._body_size > self.services.max_body_bytes:
            raise PayloadTooLarge(f"Request body is larger than {self.services.max_body_bytes} bytes.")
        raw = b"".join(self._body_parts)
        if len(raw) > LARGE_BODY_BYTES:
            return await asyncio.to_thread(parse_object, raw)
        return parse_object(raw)

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(value, default=str))

    # -- errors ----------------------------------------------------------------------------------

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        """An error raised before the (streamed) body was read is sent once the body is in, read and dropped.

        Closing a socket with unread data resets it: the Hub's proxy, still sending a large body, then answers
        its own 503 page instead of this error (found by fuzzing: a 2 MB body with a dead credential).
        """
        body = getattr(self.request, "_body_future", None)
        if body is None or body.done() or getattr(self.request.connection, "_read_finished", True):
            super().send_error(status_code, **kwargs)
            return
        self._refused_early = True

        def answer(future) -> None:
            if future.exception() is None:  # else the client went away: nobody to answer
                super(APIHandler, self).send_error(status_code, **kwargs)

        body.add_done_callback(answer)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        exc = database_unavailable(exc) or exc
        if isinstance(exc, ApiError):
            error = exc
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message or self._reason
            if exc.status_code == 403 and "XSRF" in (exc.log_message or ""):
                message = "XSRF check failed: send the _xsrf cookie's value as the X-XSRFToken header."
            error = ApiError(message, status=exc.status_code, type=_type_for(exc.status_code))
        else:
            error = ApiError("Internal server error.", status=500, type="server_error", code="internal_error")
        self.clear()  # drop headers set before the error
        self.set_default_headers()
        for name, value in error.headers.items():
            self.set_header(name, value)
        if not getattr(self.request.connection, "_read_finished", True):
            # Answered during prepare(), before the (streamed) body was read: Tornado will close the connection
            # after this response but only decides so after writing the headers. Say so, or the Hub's proxy
            # reuses the socket and its next request fails as a 503 ("socket hang up").
            self.set_header("Connection", "close")
        self.set_status(error.status)
        self.finish(json.dumps(error.to_json()))

    def log_exception(self, typ, value, tb) -> None:
        if database_unavailable(value):  # one line, not a traceback per request while the database is away
            log.warning("%s %s -> 503: the database is unavailable: %s", self.request.method, self.request.path,
                        str(getattr(value, "orig", None) or value).strip().splitlines()[0][:200])
        elif isinstance(value, ApiError):
            log.info("%s %s -> %d %s", self.request.method, self.request.path, value.status, value.message)
        else:
            super().log_exception(typ, value, tb)

    def get_login_url(self) -> str:  # pragma: no cover - never used: APIs answer 401, not redirects
        raise Unauthorized("Authentication required.")


class OpenAIHandler(APIHandler):
    """Handlers under `/v1`. Errors already use OpenAI's envelope everywhere (`ApiError.to_json`), which the
    openai SDK maps to its exceptions; streams report errors mid-stream themselves (handlers/openai.py)."""


class NotFoundHandler(APIHandler):
    """Everything no route matched: authenticated like any other route, then 404."""

    async def prepare(self) -> None:
        await super().prepare()
        raise NotFound(f"No such endpoint: {self.request.path}")


def database_unavailable(exc: BaseException | None) -> ServiceUnavailable | None:
    """The 503 for an error that means the database cannot be reached (`db.unavailable`), else None. Fails
    closed: the request is refused, never answered from a guess."""
    if unavailable(exc):
        return ServiceUnavailable("The service's database is unavailable; try again shortly.", retry_after=5)
    return None


def _type_for(status: int) -> str:
    if status in (401, 403):
        return "authentication_error" if status == 401 else "permission_error"
    return "server_error" if status >= 500 else "invalid_request_error"
