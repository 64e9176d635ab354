"""OIDC login end to end: a real OpenID Connect provider on loopback (npm `oidc-provider`), a real Hub.

Who is admin comes only from an e-mail the provider verified; groups come from the provider's claim and feed the
Hub's roles; a provider that is down at start stops the Hub with a message naming the issuer; a provider that
fails during a login gives a clear page. The component tests at the end (no Hub) check discovery and claims.
"""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
from conftest import ROOT, free_port, wait_for
from oauth_hub import BLOCKED, OAuthHub, follow_login, hub_config, invited_login, start_login

ADMIN_EMAIL = "boss@example.org"
USERS = {
    "alice": {"password": "alice-password", "claims": {
        "email": "alice@example.org", "email_verified": True, "groups": ["embedders", "researchers"]}},
    # The admin e-mail, verified by the provider (case differs: e-mails compare without case).
    "carol": {"password": "carol-password", "claims": {"email": "Boss@Example.org", "email_verified": True}},
    # The admin e-mail, not verified: anyone can type an address into a provider's profile.
    "mallory": {"password": "mallory-password", "claims": {"email": ADMIN_EMAIL, "email_verified": False}},
    # A user who picked the name `admin`, with a verified e-mail that is not an admin e-mail.
    "admin": {"password": "admin-password", "claims": {"email": "someone@example.org", "email_verified": True}},
    "dana": {"password": "dana-password", "claims": {"email": "dana@example.org", "email_verified": True,
                                                     "groups": ["researchers"]}},
}
ROLES = [{"name": "inference-embedders", "groups": ["embedders"], "scopes": ["custom:inference:embeddings"]}]


class OIDCProvider:
    """tests/oidc_provider.mjs as a process: `issuer` once it serves its discovery document."""

    def __init__(self, tmp, redirect_uris: list[str]):
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        setup = tmp / "oidc-setup.json"
        setup.write_text(json.dumps({
            "client": {"client_id": "jupyterhub", "client_secret": "oidc-client-secret", "redirect_uris": redirect_uris},
            "users": USERS,
        }))
        self.log_path = tmp / "oidc-provider.log"
        self.process = subprocess.Popen(
            ["node", str(ROOT / "tests/oidc_provider.mjs"), str(self.port), str(setup)],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._up, timeout=30, interval=0.1, what="the OIDC provider")
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(self.log_path.read_text())
        return requests.get(self.issuer + "/.well-known/openid-configuration", timeout=2).ok

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def oidc_login_config(hub: OAuthHub, issuer: str, mode: str = "open") -> str:
    return f"""
c.JupyterHub.authenticator_class = "hub_extension.login.providers.OIDCLogin"
c.OIDCLogin.issuer = {issuer!r}
c.OIDCLogin.client_id = "jupyterhub"
c.OIDCLogin.client_secret = "oidc-client-secret"
c.OIDCLogin.oauth_callback_url = {hub.callback_url!r}
c.OIDCLogin.scope = ["openid", "email", "profile", "groups"]
c.OIDCLogin.login_service = "Test provider"
c.OIDCLogin.registration_mode = {mode!r}
c.OIDCLogin.admin_emails = {{{ADMIN_EMAIL!r}}}
"""


@pytest.fixture(scope="module")
def oidc(tmp_path_factory):
    """The provider, and a Hub per registration mode that it knows as clients (started by the fixtures below)."""
    hubs = {mode: OAuthHub(tmp_path_factory.mktemp(f"oidc-{mode}"), roles=ROLES, registration_mode=mode)
            for mode in ("open", "approval", "invite")}
    provider = OIDCProvider(tmp_path_factory.mktemp("oidc-provider"), [h.callback_url for h in hubs.values()])
    for mode, hub in hubs.items():
        hub.login_config = oidc_login_config(hub, provider.issuer, mode)
    try:
        yield hubs, provider
    finally:
        provider.stop()


def started(oidc, mode: str):
    hubs, provider = oidc
    with hubs[mode] as hub:
        yield hub, provider
        assert BLOCKED not in hub.log()


@pytest.fixture(scope="module")
def oidc_hub(oidc):
    yield from started(oidc, "open")


@pytest.fixture(scope="module")
def oidc_invite_hub(oidc):
    yield from started(oidc, "invite")


@pytest.fixture(scope="module")
def oidc_approval_hub(oidc):
    yield from started(oidc, "approval")


@pytest.mark.e2e
def test_login_creates_the_user_with_the_providers_groups(oidc_hub):
    hub, _ = oidc_hub
    r = follow_login(requests.Session(), hub, "alice", "alice-password")
    assert r.status_code == 200 and urlsplit(r.url).path == "/hub/home", r.text[:500]
    user = hub.user("alice")
    assert sorted(user["groups"]) == ["embedders", "researchers"]
    assert user["admin"] is False
    assert hub.service_status("alice") == "active"  # open mode: made active in the service at first login
    # The provider's group feeds the roles configured for it, and so the inference permissions.
    assert "inference-embedders" in hub.api.request("GET", "/groups/embedders").json()["roles"]
    perms = hub.service("GET", "api/me/permissions", hub.api.user_token("alice")).json()
    assert perms["features"]["embeddings"] == {
        "allowed": True, "source": "hub_scope", "via": "custom:inference:embeddings"}, perms


@pytest.mark.e2e
def test_admin_only_for_a_verified_admin_email(oidc_hub):
    hub, _ = oidc_hub
    for name, admin in (("carol", True), ("mallory", False)):
        r = follow_login(requests.Session(), hub, name, USERS[name]["password"])
        assert r.status_code == 200, r.text[:500]
        assert hub.user(name)["admin"] is admin, name


@pytest.mark.e2e
def test_the_name_admin_is_not_an_admin(oidc_hub):
    hub, _ = oidc_hub
    r = follow_login(requests.Session(), hub, "admin", "admin-password")
    assert r.status_code == 200, r.text[:500]
    assert hub.user("admin")["admin"] is False


@pytest.mark.e2e
def test_login_in_a_browser(oidc_hub, page):
    hub, provider = oidc_hub
    page.goto(f"{hub.url}/hub/login?next=%2Fhub%2Fhome")
    page.get_by_text("Sign in with Test provider").click()
    page.wait_for_url(f"{provider.issuer}/interaction/**")
    page.fill("#login", "dana")
    page.fill("#password", "dana-password")
    page.click("#submit")
    page.wait_for_url(f"{hub.url}/hub/home")
    assert page.get_by_text("Start My Server").is_visible()
    assert hub.user("dana")["groups"] == ["researchers"]


@pytest.mark.e2e
def test_an_invite_carries_a_person_through_the_provider(oidc_invite_hub):
    hub, _ = oidc_invite_hub
    # The verified admin e-mail gets in without an invite (an admin is let in in every mode); dana needs one, and
    # comes in with the provider's groups and the invite's.
    invite = invited_login(hub, "carol", "dana", "dana-password")
    assert sorted(hub.user("dana")["groups"]) == ["invited-team", "researchers"]
    # The provider's groups replace the Hub's at every login; the invite's come back with them.
    again = requests.Session()
    r = follow_login(again, hub, "dana", "dana-password")
    assert r.status_code == 200 and r.url.endswith("/hub/home"), r.url
    assert sorted(hub.user("dana")["groups"]) == ["invited-team", "researchers"]
    # Used once: the next person who follows the same link is told so, and cannot get in with it.
    session = requests.Session()
    r = session.get(invite, timeout=30)
    assert r.status_code == 410 and "already been used" in r.text
    assert follow_login(session, hub, "alice", "alice-password").url.endswith("/hub/registration/invite-required")
    assert hub.service_status("alice") is None


@pytest.mark.e2e
def test_approval_through_the_provider(oidc_approval_hub):
    """The same policy as for local accounts and GitHub: pending at the first login, in once approved, a clear
    page once denied; an admin (verified admin e-mail) is let in at once."""
    hub, _ = oidc_approval_hub
    assert follow_login(requests.Session(), hub, "carol", "carol-password").url.endswith("/hub/home")
    token = hub.api.user_token("carol")
    for name in ("dana", "alice"):
        r = follow_login(requests.Session(), hub, name, f"{name}-password")
        assert r.status_code == 200 and r.url.endswith("/hub/registration/pending"), r.url
        assert "waiting for an administrator" in r.text
        assert hub.service_status(name) == "pending"
    assert hub.service("POST", "api/users/dana/approve", token).status_code == 200
    r = follow_login(requests.Session(), hub, "dana", "dana-password")
    assert r.status_code == 200 and r.url.endswith("/hub/home"), r.url
    assert hub.user("dana")["groups"] == ["researchers"]  # the provider's groups, as in open mode
    assert hub.service("POST", "api/users/alice/deny", token).status_code == 200
    r = follow_login(requests.Session(), hub, "alice", "alice-password")
    assert r.url.endswith("/hub/registration/denied"), r.url
    assert hub.service_status("alice") == "disabled"


@pytest.mark.e2e
def test_a_provider_error_at_login_is_a_clear_page(oidc_hub):
    hub, _ = oidc_hub
    # The provider sends the person back with an error (e.g. they declined).
    session, state = start_login(hub)
    r = session.get(f"{hub.url}/hub/oauth_callback", params={
        "error": "access_denied", "error_description": "End-User aborted interaction", "state": state}, timeout=30)
    assert r.status_code == 403
    assert "Signing in with Test provider did not complete: End-User aborted interaction" in r.text
    # The provider refuses the code at its token endpoint: a real error from the provider, shown as a page.
    session, state = start_login(hub)
    r = session.get(f"{hub.url}/hub/oauth_callback", params={"code": "not-a-code", "state": state}, timeout=30)
    assert r.status_code == 502
    assert "Test provider answered an error (400) while signing you in" in r.text


@pytest.mark.e2e
def test_a_provider_down_at_start_stops_the_hub(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    hub = OAuthHub(tmp_path)
    hub.login_config = oidc_login_config(hub, dead)
    hub.start(wait=False)
    assert hub.wait_exit(timeout=120) != 0  # it stops by itself (wait_exit raises if it does not)
    log = hub.log()
    assert f"OIDC discovery failed for issuer {dead}" in log, log[-3000:]
    assert "check OIDC_ISSUER and that the provider is up" in log


# -- component tests: discovery and claims, no Hub ------------------------------------------------------


class Discovery:
    """A loopback server answering /.well-known/openid-configuration with `body` (a dict, or raw text)."""

    def __init__(self):
        self.body: object = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.body if isinstance(outer.body, str) else json.dumps(outer.body)
                found = self.path == "/.well-known/openid-configuration"
                self.send_response(200 if found else 404)
                self.end_headers()
                self.wfile.write(body.encode() if found else b"")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def document(self, **changes) -> dict:
        base = {"issuer": self.issuer, "authorization_endpoint": self.issuer + "/auth",
                "token_endpoint": self.issuer + "/token", "userinfo_endpoint": self.issuer + "/me"}
        return {k: v for k, v in {**base, **changes}.items() if v is not None}


@pytest.fixture(scope="module")
def discovery_server():
    d = Discovery()
    yield d
    d.server.shutdown()
    d.server.server_close()


@pytest.fixture
def discovery(discovery_server):
    discovery_server.body = discovery_server.document()
    return discovery_server


def oidc_login(issuer: str, **config):
    from hub_extension.login.providers import OIDCLogin

    return OIDCLogin(issuer=issuer, client_id="c", client_secret="s", **config)


def test_discovery_sets_the_endpoints(discovery):
    login = oidc_login(discovery.issuer + "/")  # a trailing slash is the same issuer
    assert (login.authorize_url, login.token_url, login.userdata_url) == (
        discovery.issuer + "/auth", discovery.issuer + "/token", discovery.issuer + "/me")
    assert login.manage_groups is True and login.username_claim == "preferred_username"


@pytest.mark.parametrize("body, expected", [
    ({"issuer": "https://elsewhere.example"}, "the provider calls itself 'https://elsewhere.example'"),
    ({"userinfo_endpoint": None}, "no valid userinfo_endpoint"),
    ({"token_endpoint": "javascript:alert(1)"}, "no valid token_endpoint"),
    ("<html>not json</html>", "OIDC discovery failed for issuer"),
    ("[1, 2]", "is not a JSON object"),
])
def test_discovery_refuses_a_bad_document(discovery, body, expected):
    from hub_extension.login.providers import ProviderError

    discovery.body = body if isinstance(body, str) else discovery.document(**body)
    with pytest.raises(ProviderError) as e:
        oidc_login(discovery.issuer)
    assert expected in str(e.value) and discovery.issuer in str(e.value)


def test_admin_by_name_is_refused_at_start(discovery):
    with pytest.raises(ValueError, match="admin_users must be empty"):
        oidc_login(discovery.issuer, admin_users={"admin"})


def test_no_issuer_is_refused():
    from hub_extension.login.providers import ProviderError

    with pytest.raises(ProviderError, match="OIDC_ISSUER"):
        oidc_login("")


@pytest.mark.parametrize("claims, verified", [
    ({"email": "Boss@Example.org", "email_verified": True}, {"boss@example.org"}),
    ({"email": "boss@example.org", "email_verified": "true"}, {"boss@example.org"}),
    ({"email": "boss@example.org", "email_verified": False}, set()),
    ({"email": "boss@example.org", "email_verified": "false"}, set()),
    ({"email": "boss@example.org", "email_verified": 1}, set()),
    ({"email": "boss@example.org"}, set()),
    ({"email": ["boss@example.org"], "email_verified": True}, set()),
    ({"email_verified": True}, set()),
])
def test_only_a_verified_email_counts(discovery, claims, verified):
    login = oidc_login(discovery.issuer)
    assert login.verified_emails({"name": "x", "auth_state": {"oauth_user": claims}}) == verified


@pytest.mark.parametrize("claim, user_info, groups", [
    ("groups", {"groups": ["a", "b", "a"]}, {"a", "b"}),
    ("groups", {"groups": "solo"}, {"solo"}),
    ("groups", {"groups": ["ok", 3, None, {"x": 1}, "", "  ", "x" * 256]}, {"ok"}),
    ("groups", {"groups": {"not": "a list"}}, set()),
    ("groups", {}, set()),
    ("realm_access.roles", {"realm_access": {"roles": ["r1", "r2"]}}, {"r1", "r2"}),
    ("realm_access.roles", {"realm_access": "oops"}, set()),
])
def test_groups_from_the_claim(discovery, claim, user_info, groups):
    login = oidc_login(discovery.issuer, groups_claim=claim)
    assert login.groups_from_claims(user_info) == groups


def test_groups_are_bounded(discovery):
    login = oidc_login(discovery.issuer, max_groups=5)
    assert len(login.groups_from_claims({"groups": [f"g{i}" for i in range(50)]})) == 5


def test_a_missing_user_name_claim_is_a_clear_page(discovery):
    from tornado import web

    login = oidc_login(discovery.issuer, username_claim="upn")
    with pytest.raises(web.HTTPError) as e:
        login.user_info_to_username({"sub": "123"})
    assert e.value.status_code == 502 and "'upn' claim" in e.value.log_message


def test_config_oidc(discovery, monkeypatch, tmp_path):
    """jupyterhub_config.py's OIDC settings from the environment, through to a working OIDCLogin."""
    from hub_extension.login.providers import OIDCLogin

    config = hub_config(monkeypatch, tmp_path, INFERENCE_LOGIN="oidc", OIDC_ISSUER=discovery.issuer,
                        OIDC_CLIENT_ID="id", OIDC_CLIENT_SECRET="secret", OIDC_GROUPS_CLAIM="realm_access.roles",
                        OIDC_USERNAME_CLAIM="sub", OIDC_SCOPES="openid,email,roles", OIDC_NAME="Keycloak",
                        INFERENCE_ADMIN_EMAILS="boss@example.org", INFERENCE_REGISTRATION="invite",
                        INFERENCE_TRUSTED_PROXIES="10.0.0.0/8", OAUTH_CALLBACK_URL="https://hub.example/hub/oauth_callback")
    assert config.JupyterHub.authenticator_class == "hub_extension.login.providers.OIDCLogin"
    login = OIDCLogin(config=config)
    assert login.userdata_url == discovery.issuer + "/me"
    assert (login.groups_claim, login.username_claim, login.login_service) == ("realm_access.roles", "sub", "Keycloak")
    assert set(login.scope) == {"openid", "email", "roles"} and login.manage_groups is True
    assert login.admin_emails == {"boss@example.org"} and login.registration_mode == "invite"
    assert login.trusted_proxies == ["10.0.0.0/8"] and login.allow_all is True
    assert login.oauth_callback_url == "https://hub.example/hub/oauth_callback"
    service = next(s for s in config.JupyterHub.services if s["name"] == "inference")
    assert "--UserDirectory.new_user_status=pending" in service["command"]  # the service agrees on the mode
