"""Local accounts through a real Hub, driven in real Chromium: sign-up, sign-in, change password, admin reset, the
approval and invite flows, and brute force (the limits hold with a spoofed X-Forwarded-For from an untrusted
address). One Hub per registration mode (`login_hub.py`), each started once for this module."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
import requests
from browser import screenshot
from conftest import ROOT, clean_env, wait_for
from login_hub import ADMIN, ADMIN_PASSWORD, LIMITS, client_from, login_hub
from sqlalchemy import update

from hub_extension.db import Database
from hub_extension.orm import Invite

pytestmark = pytest.mark.e2e
PASSWORD = "violet staircase 42 lanterns"


@pytest.fixture(scope="module")
def login(request, tmp_path_factory):
    mode = request.param
    with login_hub(tmp_path_factory.mktemp(f"login-{mode}"), mode) as hub:
        yield hub


@pytest.fixture(scope="module")
def admin_token(login):
    return login.admin_token()


def mode(name: str):
    return pytest.mark.parametrize("login", [name], indirect=True)


def sign_up(page, hub, name: str, password: str = PASSWORD, confirm: str | None = None) -> None:
    page.goto(f"{hub.url}/hub/signup")
    page.fill("#username_input", name)
    page.fill("#password_input", password)
    page.fill("#password_confirm_input", password if confirm is None else confirm)
    page.click("#signup_submit")
    page.wait_for_load_state()


def sign_in(page, hub, name: str, password: str = PASSWORD) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", password)
    page.click("#login_submit")
    page.wait_for_load_state()


def sign_out(page, hub) -> None:
    page.goto(f"{hub.url}/hub/logout")


def status(hub, token: str, name: str) -> str | None:
    r = hub.service("GET", f"api/users/{name}", token)
    assert r.status_code == 200, r.text
    return r.json()["status"]


# -- open ------------------------------------------------------------------------------------------------


@mode("open")
def test_sign_up_sign_in_change_and_reset_password(page, login, admin_token):
    page.goto(f"{login.url}/hub/login")
    page.click("#signup-link")
    assert page.url.endswith("/hub/signup")
    sign_up(page, login, "olive", "Password2024!")
    assert "most common passwords" in page.inner_text("#signup-error")
    sign_up(page, login, "olive", PASSWORD, confirm=PASSWORD + "x")
    assert "differ" in page.inner_text("#signup-error")
    sign_up(page, login, ADMIN)  # an admin's name can never be signed up
    assert "taken" in page.inner_text("#signup-error")
    screenshot(page, "login-signup-refused")
    sign_up(page, login, "olive")
    assert page.url.endswith("/hub/home"), page.url
    screenshot(page, "login-signed-up-home")
    assert status(login, admin_token, "olive") == "active"
    sign_out(page, login)
    sign_up(page, login, "olive")  # the name is now taken
    assert "taken" in page.inner_text("#signup-error")

    sign_in(page, login, "olive", "not the password at all")
    assert "Invalid username or password" in page.inner_text(".login_error")
    sign_in(page, login, "olive")
    assert page.url.endswith("/hub/home")

    new = "a brand new passphrase 7"
    page.click("#change-password-link")  # from the Hub's navigation bar
    page.wait_for_url("**/hub/change-password")
    page.fill("#current_password_input", "wrong wrong wrong")
    page.fill("#password_input", new)
    page.fill("#password_confirm_input", new)
    page.click("#change_password_submit")
    assert "not right" in page.inner_text("#change-password-error")
    page.fill("#current_password_input", PASSWORD)
    page.fill("#password_input", new)
    page.fill("#password_confirm_input", new)
    page.click("#change_password_submit")
    assert "has been changed" in page.inner_text("#change-password-done")
    screenshot(page, "login-password-changed")
    sign_out(page, login)
    sign_in(page, login, "olive")
    assert "Invalid username or password" in page.inner_text(".login_error")
    sign_in(page, login, "olive", new)
    assert page.url.endswith("/hub/home")
    sign_out(page, login)

    r = login.service("POST", "api/users/olive/password", admin_token, json={})  # an admin's reset
    assert r.status_code == 200, r.text
    reset = r.json()["password"]
    assert login.service("POST", "api/users/olive/password", admin_token, json={"password": "qwertyqwerty"}
                         ).status_code == 400
    sign_in(page, login, "olive", reset)
    assert page.url.endswith("/hub/home")
    events = login.service("GET", "api/audit?user=olive", admin_token).json()["events"]
    assert {"account.create", "user.register", "password.change", "password.reset"} <= {e["action"] for e in events}
    assert PASSWORD not in login.log_path.read_text() and new not in login.log_path.read_text()


def attempt(session: requests.Session, base: str, name: str, password: str, spoof: str | None) -> int:
    """One sign-in as a script would: the form (for its XSRF token), then the POST; the POST's status."""
    headers = {"X-Forwarded-For": spoof, "X-Real-Ip": spoof} if spoof else {}
    form = session.get(f"{base}/hub/login", headers=headers, timeout=30)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.text).group(1)
    r = session.post(f"{base}/hub/login", data={"username": name, "password": password, "_xsrf": xsrf},
                     headers=headers, allow_redirects=False, timeout=30)
    return r.status_code


@mode("open")
def test_brute_force_limits_hold_with_a_spoofed_forwarded_for(login, admin_token):
    per_address = LIMITS["login_limit_per_address"]
    # Straight to the Hub's port from 127.0.0.2 (not a trusted proxy), a new X-Forwarded-For / X-Real-Ip each time.
    attacker = client_from("127.0.0.2")
    codes = [attempt(attacker, login.hub_url, f"guess-{i}", "wrong password!", f"203.0.113.{i}")
             for i in range(per_address + 2)]
    assert codes == [403] * per_address + [429, 429]
    # Through the proxy from 127.0.0.3: the proxy's own hop is believed, the spoofed one is not.
    attacker = client_from("127.0.0.3")
    codes = [attempt(attacker, login.url, f"guess-{i}", "wrong password!", f"198.51.100.{i}")
             for i in range(per_address + 1)]
    assert codes == [403] * per_address + [429]
    # Someone else (127.0.0.1) is not affected.
    assert attempt(requests.Session(), login.url, ADMIN, ADMIN_PASSWORD, None) == 302

    # One account from many addresses: its own limit holds, even for the right password afterwards.
    login.api.create_user("victim")
    r = login.service("POST", "api/users/victim/password", admin_token, json={"password": PASSWORD})
    assert r.status_code == 200, r.text
    per_account = LIMITS["login_limit_per_account"]
    codes = [attempt(client_from(f"127.0.1.{i}"), login.url, "victim", "wrong password!", None)
             for i in range(per_account)]
    assert codes == [403] * per_account
    blocked = client_from("127.0.1.200")
    assert attempt(blocked, login.url, "victim", PASSWORD, None) == 429
    page = blocked.get(f"{login.url}/hub/login", timeout=30)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = blocked.post(f"{login.url}/hub/login", data={"username": "victim", "password": PASSWORD, "_xsrf": xsrf},
                     allow_redirects=False, timeout=30)
    assert r.status_code == 429 and "Too many sign-in attempts" in r.text and 0 < int(r.headers["Retry-After"]) <= 600


def sign_up_by_script(base: str, name: str, password: str) -> int:
    """The sign-up form as a script would post it; the POST's status (302 when signed up and in)."""
    session = requests.Session()
    form = session.get(f"{base}/hub/signup", timeout=30)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.text).group(1)
    r = session.post(f"{base}/hub/signup", data={"username": name, "password": password, "password_confirm": password,
                                                 "_xsrf": xsrf}, allow_redirects=False, timeout=30)
    return r.status_code


@mode("open")
def test_a_user_deleted_in_the_hub_is_retired_at_once_and_their_password_opens_nothing(login, admin_token):
    """Deleting a user in the Hub (its admin page or API) reaches the service through the authenticator, not only
    at the service's next Hub sync: keys revoked, the row retired, and the local password gone, so it no longer
    signs in and the name can be signed up afresh by someone else."""
    assert sign_up_by_script(login.url, "dora", PASSWORD) == 302
    token = login.api.user_token("dora")
    created = login.service("POST", "api/keys", token, json={"name": "laptop"})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert login.service("GET", "v1/models", key).status_code == 200

    login.api.delete_user("dora")
    events = login.service("GET", "api/audit?user=dora", admin_token).json()["events"]
    by_action = {e["action"]: e for e in events}
    assert by_action["user.deleted"]["actor"] == "hub" and by_action["user.deleted"]["details"]["revoked_keys"] == 1
    assert by_action["account.delete"]["actor"] == "hub"
    wait_for(lambda: login.service("GET", "v1/models", key).status_code == 401, 60, 0.5, "the key refused")
    assert attempt(requests.Session(), login.url, "dora", PASSWORD, None) == 403  # the password opens nothing
    assert sign_up_by_script(login.url, "dora", "another person's passphrase 9") == 302  # the name is free
    assert status(login, admin_token, "dora") == "active"


# -- approval --------------------------------------------------------------------------------------------


@mode("approval")
def test_approval_flow(page, login, admin_token):
    sign_up(page, login, "ann")
    assert page.url.endswith("/hub/registration/pending"), page.url
    assert "waiting for an administrator" in page.inner_text("#registration-message")
    screenshot(page, "login-approval-pending")
    pending = login.service("GET", "api/users?status=pending", admin_token).json()["users"]
    assert [u["name"] for u in pending] == ["ann"]
    cli = subprocess.run(  # its own process: Playwright's loop runs in this one
        [sys.executable, "-m", "hub_extension", "users", "list", "--status", "pending", "--db-url", login.db_url],
        env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert cli.returncode == 0 and "ann" in cli.stdout, cli.stderr
    assert login.api.request("GET", "/users/ann").json()["name"] == "ann"  # the Hub knows them: the sync keeps them
    sign_in(page, login, "ann")
    assert page.url.endswith("/hub/registration/pending")

    r = login.service("POST", "api/users/ann/approve", admin_token)
    assert r.status_code == 200, r.text
    sign_in(page, login, "ann")
    assert page.url.endswith("/hub/home")
    wait_for(lambda: status(login, admin_token, "ann") == "active", 10, what="ann stays active through Hub syncs")
    assert login.service("POST", "api/users/ann/disable", admin_token).status_code == 200
    wait_for(lambda: "/hub/login" in page.goto(f"{login.url}/hub/home").url, 20, 0.5,
             what="a disabled user's Hub session ends")
    sign_in(page, login, "ann")
    assert page.url.endswith("/hub/registration/denied")

    sign_up(page, login, "dan")
    assert page.url.endswith("/hub/registration/pending")
    assert login.service("POST", "api/users/dan/deny", admin_token).status_code == 200
    sign_in(page, login, "dan")
    assert page.url.endswith("/hub/registration/denied")
    assert "refused" in page.inner_text("#registration-message")
    screenshot(page, "login-approval-denied")

    sign_in(page, login, ADMIN, ADMIN_PASSWORD)  # a configured admin is let in in every mode
    assert page.url.endswith("/hub/home")

    # A Hub user the service meets first through the API is pending there too (configure(registration_mode=...)).
    login.api.create_user("api-only")
    token = login.api.user_token("api-only")
    assert login.service("GET", "api/me", token).status_code == 403
    assert status(login, admin_token, "api-only") == "pending"


# -- invite ----------------------------------------------------------------------------------------------


@mode("invite")
def test_invite_flow(page, browser, login, admin_token):
    page.goto(f"{login.url}/hub/signup")  # no invitation: told so
    assert page.url.endswith("/hub/registration/invite-required")
    screenshot(page, "login-invite-required")
    page.goto(f"{login.url}/hub/login")
    assert page.locator("#signup-link").count() == 0

    r = login.service("POST", "api/invites", admin_token, json={"note": "Welcome, Ivy", "groups": ["cohort"]})
    assert r.status_code == 201, r.text
    invite = r.json()
    assert invite["url"] == f"{login.url}/hub/invite/{invite['code']}"
    listed = login.service("GET", "api/invites", admin_token)
    assert invite["code"] not in listed.text and listed.json()["invites"][0]["status"] == "active"

    page.goto(invite["url"])
    assert "Welcome, Ivy" in page.inner_text("#invite-note")
    screenshot(page, "login-invite-page")
    page.click("#invite-continue")
    assert "invitation" in page.inner_text("#signup-invite")
    sign_up(page, login, "ivy")
    assert page.url.endswith("/hub/home"), page.url
    assert "cohort" in login.api.request("GET", "/users/ivy").json()["groups"]
    assert status(login, admin_token, "ivy") == "active"

    other = browser.new_context()
    try:
        second = other.new_page()
        response = second.goto(invite["url"])  # used: a clear page
        assert response.status == 410
        assert "already been used" in second.inner_text("#registration-message")
        screenshot(second, "login-invite-used")
    finally:
        other.close()

    revoked = login.service("POST", "api/invites", admin_token, json={"expires_in_days": 1}).json()
    assert login.service("DELETE", f"api/invites/{revoked['id']}", admin_token).json()["status"] == "revoked"
    response = page.goto(revoked["url"])
    assert response.status == 410 and "withdrawn" in page.inner_text("#registration-message")
    assert page.goto(f"{login.url}/hub/invite/inv_made-up").status == 404
    expired = login.service("POST", "api/invites", admin_token, json={"expires_in_days": 1}).json()
    db = Database(login.db_url, threads=1)
    try:  # a week later, as far as this invite is concerned
        db.call(lambda s: s.execute(update(Invite).where(Invite.id == expired["id"])
                                    .values(expires_at=dt.datetime(2020, 1, 1))))
    finally:
        db.close()
    response = page.goto(expired["url"])
    assert response.status == 410 and "expired" in page.inner_text("#registration-message")
    screenshot(page, "login-invite-expired")

    actions = [e["action"] for e in login.service("GET", "api/audit?limit=50", admin_token).json()["events"]]
    assert actions.count("invite.create") == 3 and actions.count("invite.redeem") == 1
    assert actions.count("invite.revoke") == 1


@mode("invite")
def test_invites_in_the_admin_panel(login, admin_token):
    """The AdminPanel's Invites tab through the notebook client: create (the link shown once), list, revoke."""
    from kernel_ext.service_api import InferenceClient
    from widgets import AdminPanel

    with InferenceClient(login.service_url, admin_token) as client:
        panel = AdminPanel(client)
        panel.invite_note.value, panel.invite_groups.value, panel.invite_days.value = "for Quinn", "tas, cohort", 3
        assert panel.create_invite() is True
        link = re.search(r'value="([^"]+)"', panel.invite_link.value).group(1)
        assert link.startswith(f"{login.url}/hub/invite/inv_") and "shown only this once" in panel.invite_link.value
        [listed] = [i for i in client.invites("active") if i["note"] == "for Quinn"]
        assert listed["groups"] == ["cohort", "tas"] and link.rsplit("/", 1)[1] not in panel.invites_view.value
        panel.invite_choice.value = listed["id"]
        assert panel.revoke_invite() is True
        assert client.invites("revoked")[0]["id"] == listed["id"]
        assert requests.get(link, timeout=30).status_code == 410
        assert panel.revoke_invite() is False and "Pick" in panel.error.value  # nothing picked any more
        reset = client.reset_password(ADMIN)
        assert len(reset["password"]) == 20
        client.reset_password(ADMIN, ADMIN_PASSWORD)  # back as it was, for the other tests
