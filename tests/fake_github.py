"""GitHub faked at the HTTP level on loopback: the endpoints GitHubOAuthenticator calls, nothing more.

    with FakeGitHub(client_id, client_secret, users) as gh:   # gh.url: http://127.0.0.1:<port>
        ... c.GitHubLogin.github_url = gh.url   (the API is then at gh.url + "/api/v3", as on GitHub Enterprise)

`users`: {login: GitHubUser(...)}. The authorize page is a sign-in form (login + password), as GitHub's is;
the token and API endpoints check the client secret and the access token like GitHub does. Every request is
recorded in `requests` (method, path) so tests can see what the Hub asked for; unknown paths answer 404.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

API = "/api/v3"


@dataclass
class GitHubUser:
    password: str
    id: int
    emails: list[dict] = field(default_factory=list)  # GitHub's /user/emails entries: email, primary, verified
    orgs: set[str] = field(default_factory=set)
    public_email: str | None = None  # the `email` field of /user (null when the user keeps it private)


class FakeGitHub:
    def __init__(self, client_id: str, client_secret: str, users: dict[str, GitHubUser]):
        self.client_id, self.client_secret, self.users = client_id, client_secret, users
        self.codes: dict[str, tuple[str, str]] = {}  # code -> (login, redirect_uri)
        self.tokens: dict[str, str] = {}  # access token -> login
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="fake-github")

    def __enter__(self) -> FakeGitHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    # -- what the endpoints do ---------------------------------------------------------------------

    def authorize(self, query: dict, form: dict | None) -> tuple[int, dict, str]:
        if query.get("client_id") != self.client_id or not query.get("redirect_uri"):
            return 400, {}, "unknown client"
        if form is None:
            return 200, {"Content-Type": "text/html"}, _LOGIN_PAGE
        login = form.get("login", "")
        user = self.users.get(login)
        if user is None or not hmac.compare_digest(user.password, form.get("password", "")):
            return 200, {"Content-Type": "text/html"}, _LOGIN_PAGE.replace("<form", "<p>Wrong login.</p><form")
        code = secrets.token_hex(10)
        with self._lock:
            self.codes[code] = (login, query["redirect_uri"])
        target = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query.get("state", "")})
        return 302, {"Location": target}, ""

    def access_token(self, headers, form: dict) -> tuple[int, dict, str]:
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if headers.get("Authorization", "").startswith("Basic "):
            client_id, _, secret = base64.b64decode(headers["Authorization"][6:]).decode().partition(":")
        if client_id != self.client_id or not hmac.compare_digest(secret, self.client_secret):
            return 200, {}, json.dumps({"error": "incorrect_client_credentials",
                                        "error_description": "The client_id and/or client_secret passed are incorrect."})
        with self._lock:
            login, redirect_uri = self.codes.pop(form.get("code", ""), (None, None))
        if login is None or form.get("redirect_uri") != redirect_uri:
            return 200, {}, json.dumps({"error": "bad_verification_code",
                                        "error_description": "The code passed is incorrect or expired."})
        token = "gho_" + secrets.token_hex(16)
        with self._lock:
            self.tokens[token] = login
        # GitHub separates the granted scopes with commas.
        return 200, {}, json.dumps({"access_token": token, "token_type": "bearer", "scope": "read:org,read:user,user:email"})

    def api(self, headers, path: str) -> tuple[int, dict, str]:
        auth = headers.get("Authorization", "")
        login = self.tokens.get(auth.split(" ", 1)[-1]) if auth.lower().startswith(("bearer ", "token ")) else None
        if login is None:
            return 401, {}, json.dumps({"message": "Bad credentials"})
        user = self.users[login]
        if path == "/user":
            return 200, {}, json.dumps({"login": login, "id": user.id, "name": login.title(), "email": user.public_email})
        if path == "/user/emails":
            return 200, {}, json.dumps(user.emails)
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == "orgs" and parts[2] == "members":
            return (204 if parts[1] in user.orgs and parts[3] == login else 404), {}, ""
        return 404, {}, json.dumps({"message": "Not Found"})


_LOGIN_PAGE = """<!doctype html><html><head><title>Sign in to GitHub (fake)</title></head><body>
<form method="post"><input name="login" id="login"> <input name="password" id="password" type="password">
<button type="submit" id="submit">Sign in</button></form></body></html>"""


def _handler(fake: FakeGitHub):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, headers: dict, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, form: dict | None) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            fake.requests.append((self.command, url.path))
            if url.path == "/login/oauth/authorize":
                self._reply(*fake.authorize(query, form))
            elif url.path == "/login/oauth/access_token" and form is not None:
                self._reply(*fake.access_token(self.headers, form))
            elif url.path.startswith(API + "/") and form is None:
                self._reply(*fake.api(self.headers, url.path[len(API):]))
            else:
                self._reply(404, {}, json.dumps({"message": "Not Found"}))

        def do_GET(self):
            self._route(None)

        def do_POST(self):
            length = min(int(self.headers.get("Content-Length") or 0), 100_000)
            body = self.rfile.read(length).decode()
            self._route({k: v[0] for k, v in parse_qs(body).items()})

        def log_message(self, *args):  # quiet: the test reads `fake.requests`
            pass

    return Handler
