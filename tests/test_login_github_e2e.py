"""GitHub login end to end: GitHub faked at the HTTP level on loopback (tests/fake_github.py), a real Hub.

The Hub runs in `approval` mode with an organisation restriction (and once more in `invite` mode). Admin only for GitHub's verified primary
e-mail (never for the name `admin`, never for an unverified or merely public e-mail), and an admin is let in at
once; everyone else in the organisation waits for approval; anyone outside it is kept out with a page that says
why. The Hub may reach no host but loopback: anything else would be logged as BLOCKED and fail the module.
The last tests (no Hub) check how jupyterhub_config.py sets the login up from the environment.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests
from fake_github import FakeGitHub, GitHubUser
from oauth_hub import _GUARD, BLOCKED, OAuthHub, follow_login, hub_config, invited_login, start_login

ADMIN_EMAIL = "boss@example.org"
ORG = "inference-org"
USERS = {
    # Member; the admin e-mail is the primary one and GitHub verified it.
    "octo": GitHubUser("octo-password", 1, orgs={ORG}, emails=[
        {"email": "octo@users.example", "primary": False, "verified": True},
        {"email": "Boss@Example.org", "primary": True, "verified": True}]),
    # Member; the admin e-mail is primary and public on the profile, but GitHub has not verified it.
    "sneaky": GitHubUser("sneaky-password", 2, orgs={ORG}, public_email=ADMIN_EMAIL, emails=[
        {"email": ADMIN_EMAIL, "primary": True, "verified": False}]),
    # Member; the admin e-mail is verified but not the primary one.
    "second": GitHubUser("second-password", 3, orgs={ORG}, emails=[
        {"email": "second@example.org", "primary": True, "verified": True},
        {"email": ADMIN_EMAIL, "primary": False, "verified": True}]),
    # A member who took the name `admin`.
    "admin": GitHubUser("admin-password", 4, orgs={ORG}, emails=[
        {"email": "admin@example.org", "primary": True, "verified": True}]),
    # Not in the organisation.
    "outsider": GitHubUser("outsider-password", 5, orgs={"other-org"}, emails=[
        {"email": ADMIN_EMAIL, "primary": True, "verified": True}]),
}


def github_login_hub(tmp, mode: str):
    """A Hub with GitHub login (faked on loopback) in registration `mode`; yields (hub, fake GitHub)."""
    with FakeGitHub("github-client-id", "github-client-secret", USERS) as github:
        hub = OAuthHub(tmp, registration_mode=mode)
        hub.login_config = f"""
c.JupyterHub.authenticator_class = "hub_extension.login.providers.GitHubLogin"
c.GitHubLogin.github_url = {github.url!r}
c.GitHubLogin.client_id = "github-client-id"
c.GitHubLogin.client_secret = "github-client-secret"
c.GitHubLogin.oauth_callback_url = {hub.callback_url!r}
c.GitHubLogin.allowed_organizations = {{{ORG!r}}}
c.GitHubLogin.registration_mode = {mode!r}
c.GitHubLogin.admin_emails = {{{ADMIN_EMAIL!r}}}
"""
        with hub:
            yield hub, github
            assert BLOCKED not in hub.log()


@pytest.fixture(scope="module")
def github_hub(tmp_path_factory):
    yield from github_login_hub(tmp_path_factory.mktemp("github-hub"), "approval")


@pytest.fixture(scope="module")
def github_invite_hub(tmp_path_factory):
    yield from github_login_hub(tmp_path_factory.mktemp("github-invite-hub"), "invite")


@pytest.mark.e2e
def test_login_with_a_verified_admin_email(github_hub):
    hub, github = github_hub
    r = follow_login(requests.Session(), hub, "octo", "octo-password")
    assert r.status_code == 200 and r.url.endswith("/hub/home"), r.text[:500]
    assert hub.user("octo")["admin"] is True
    assert hub.service_status("octo") == "active"  # an admin is let in in every mode
    # What the Hub asked GitHub: the token, the user, its e-mails and the organisation membership.
    asked = {path for _, path in github.requests}
    assert {"/login/oauth/access_token", "/api/v3/user", "/api/v3/user/emails",
            f"/api/v3/orgs/{ORG}/members/octo"} <= asked


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["sneaky", "second", "admin"])
def test_no_admin_without_a_verified_primary_admin_email(github_hub, name):
    hub, _ = github_hub
    r = follow_login(requests.Session(), hub, name, USERS[name].password)
    assert r.status_code == 200 and r.url.endswith("/hub/registration/pending"), r.url
    assert "waiting for an administrator" in r.text
    assert hub.user(name)["admin"] is False
    assert hub.service_status(name) == "pending"


@pytest.mark.e2e
def test_approval_lets_the_next_login_in(github_hub):
    hub, _ = github_hub
    session = requests.Session()
    assert follow_login(session, hub, "sneaky", "sneaky-password").url.endswith("/hub/registration/pending")
    token = hub.api.user_token("octo")  # the admin approves, through the service's admin API
    assert hub.service("POST", "api/users/sneaky/approve", token).status_code == 200
    r = follow_login(session, hub, "sneaky", "sneaky-password")
    assert r.status_code == 200 and r.url.endswith("/hub/home"), r.url
    assert hub.user("sneaky")["admin"] is False


@pytest.mark.e2e
def test_the_organisation_restriction(github_hub):
    hub, _ = github_hub
    r = follow_login(requests.Session(), hub, "outsider", "outsider-password")
    assert r.status_code == 403
    assert f"not a member of an organisation allowed on this Hub ({ORG})" in r.text
    with pytest.raises(requests.HTTPError) as e:
        hub.user("outsider")
    assert e.value.response.status_code == 404
    assert hub.service_status("outsider") is None


@pytest.mark.e2e
def test_a_refused_code_is_a_clear_page(github_hub):
    hub, _ = github_hub
    session, state = start_login(hub)
    r = session.get(f"{hub.url}/hub/oauth_callback", params={"code": "not-a-code", "state": state}, timeout=30)
    assert r.status_code == 403 and "The code passed is incorrect or expired" in r.text


@pytest.mark.e2e
def test_an_invite_carries_a_person_through_github(github_invite_hub):
    """Invite mode with GitHub: an organisation member without an invite is refused (nobody made); with one they
    are in, with the invite's groups; the link then works for nobody else."""
    hub, _ = github_invite_hub
    invite = invited_login(hub, "octo", "second", "second-password")
    assert hub.user("second")["groups"] == ["invited-team"] and hub.user("second")["admin"] is False
    session = requests.Session()
    assert session.get(invite, timeout=30).status_code == 410
    assert follow_login(session, hub, "sneaky", "sneaky-password").url.endswith("/hub/registration/invite-required")
    # Outside the organisation an invite does not help: the provider's own restriction comes first.
    r = hub.service("POST", "api/invites", hub.api.user_token("octo"), json={})
    session = requests.Session()
    assert session.get(r.json()["url"], timeout=30).status_code == 200
    assert follow_login(session, hub, "outsider", "outsider-password").status_code == 403
    assert hub.service_status("outsider") is None


def test_the_guard_lets_the_hub_reach_only_loopback():
    """What makes an unfaked host fail these tests: the Hub's HTTP client refuses it, and says so in the log."""
    script = _GUARD + """
import asyncio
from tornado.httpclient import AsyncHTTPClient
async def main():
    try:
        await AsyncHTTPClient(force_instance=True).fetch("https://api.github.com/user")
    except OSError as e:
        print("refused:", e)
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "refused: " + BLOCKED in out.stdout and f"{BLOCKED} to https://api.github.com/user" in out.stderr


# -- jupyterhub_config.py's login section, from the environment (no Hub) ---------------------------------


def test_config_github(monkeypatch, tmp_path):
    from hub_extension.login.providers import GitHubLogin

    config = hub_config(monkeypatch, tmp_path, INFERENCE_LOGIN="github", GITHUB_CLIENT_ID="id",
                        GITHUB_CLIENT_SECRET="secret", GITHUB_ORGS="org-a, org-b:team",
                        INFERENCE_ADMIN_EMAILS="boss@example.org", INFERENCE_REGISTRATION="approval",
                        INFERENCE_ADMINS="admin")
    assert config.JupyterHub.authenticator_class == "hub_extension.login.providers.GitHubLogin"
    login = GitHubLogin(config=config)
    assert (login.client_id, login.client_secret) == ("id", "secret")
    assert login.allowed_organizations == {"org-a", "org-b:team"}
    assert set(login.scope) == {"read:user", "user:email", "read:org"}
    assert login.admin_emails == {"boss@example.org"} and login.admin_users == set()  # INFERENCE_ADMINS: local only
    assert login.registration_mode == "approval" and login.allow_all is False  # the organisations restrict
    assert login.oauth_callback_url == "http://127.0.0.1:8000/hub/oauth_callback"


def test_config_local_is_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("INFERENCE_LOGIN", raising=False)
    config = hub_config(monkeypatch, tmp_path, INFERENCE_ADMINS="root,ops", INFERENCE_FIRST_ADMIN="boss")
    assert config.JupyterHub.authenticator_class == "hub_extension.login.local.LocalAccountsAuthenticator"
    local = config.LocalAccountsAuthenticator
    assert local.admin_users == {"root", "ops"} and local.bootstrap_admin == "boss"
    assert config.Authenticator.registration_mode == "open"
    service = next(s for s in config.JupyterHub.services if s["name"] == "inference")
    assert "--UserDirectory.new_user_status=pending" not in service["command"]


def test_config_refuses_an_unknown_provider(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="INFERENCE_LOGIN must be one of local, github, oidc"):
        hub_config(monkeypatch, tmp_path, INFERENCE_LOGIN="shared-password")
