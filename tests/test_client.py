"""`InferenceClient` against a real HTTP server on loopback: what it sends, and how failures become one line."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from kernel_ext.service_api import InferenceClient, InferenceError

SEEN: list[dict] = []


class Handler(BaseHTTPRequestHandler):
    """Answers by path: an error envelope, a bare 500, a redirect, a 204, or an echo of the request."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        SEEN.append({"path": self.path, "headers": dict(self.headers)})
        if self.path.startswith("/api/me/quota"):
            self.answer(403, {"error": {"message": "No.\nSecond line.", "type": "forbidden", "code": "denied"}})
        elif self.path.startswith("/api/me/permissions"):
            self.answer(500, None, b"<html>boom</html>")
        elif self.path.startswith("/api/usage"):
            self.send_response(302)
            self.send_header("Location", "/hub/login")
            self.end_headers()
        else:
            self.answer(200, {"path": self.path})

    def do_DELETE(self) -> None:  # noqa: N802
        self.send_response(204)
        self.end_headers()

    def answer(self, code: int, body, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_error_envelope_becomes_one_line(server):
    client = InferenceClient(server, "t0k")
    with pytest.raises(InferenceError) as e:
        client.quota()
    assert (e.value.message, e.value.status, e.value.code) == ("No.", 403, "denied")
    with pytest.raises(InferenceError) as e:
        client.my_permissions()
    assert e.value.status == 500 and e.value.message == "HTTP 500 Internal Server Error from /api/me/permissions"
    with pytest.raises(InferenceError) as e:
        client.usage()  # a redirect (to a login page) is never taken for an answer
    assert e.value.status == 302


def test_unreachable_service_is_one_line():
    with pytest.raises(InferenceError) as e:
        InferenceClient(f"http://127.0.0.1:{free_port()}", "t0k").me()
    assert e.value.status is None and "Cannot reach" in e.value.message and "\n" not in e.value.message


def test_requests_carry_the_credential_act_as_and_quoted_names(server):
    client = InferenceClient(server + "/", "t0k")
    assert client.user("a b/c")["path"] == "/api/users/a%20b%2Fc"
    assert SEEN[-1]["headers"]["Authorization"] == "Bearer t0k" and "X-Inference-Act-As" not in SEEN[-1]["headers"]
    client.act_as("alice").me()
    assert SEEN[-1]["headers"]["X-Inference-Act-As"] == "alice"
    assert client.admin_usage(group_by="user", user=None)["path"] == "/api/admin/usage?group_by=user"
    assert client.revoke_key(3) is None
    assert "t0k" not in repr(client)
    with pytest.raises(ValueError):
        client.grants("role", "x")


def test_idle_connections_are_dropped_before_the_proxy_drops_them():
    """The Hub's proxy closes connections idle for 5 s; the client never reuses one idle that long."""
    from kernel_ext.service_api import KEEPALIVE_SECONDS, InferenceClient

    client = InferenceClient("http://127.0.0.1:9/", "token")
    assert KEEPALIVE_SECONDS < 5 and client.http._transport._pool._keepalive_expiry == KEEPALIVE_SECONDS
