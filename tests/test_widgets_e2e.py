"""The notebook panels in plain Python against the real service through the real Hub, with real Hub tokens.

Each action is driven the way a click drives it: the test fills the widgets, then calls the method the button's
`on_click` calls, and checks the service's state over HTTP (not the panel's own word for it).
"""

from __future__ import annotations

import datetime as dt

import pytest
import requests
from conftest import bearer, serve, stop, wait_for
from sqlalchemy import select, update

from hub_extension.login.passwords import verify_password
from hub_extension.orm import LocalAccount, User
from kernel_ext.service_api import InferenceClient
from widgets import AccountPanel, AdminPanel
from widgets.admin import QUOTA_FIELDS


def status(url: str, path: str, credential: str) -> int:
    return requests.get(url + path, headers=bearer(credential), timeout=60).status_code


def client_for(hub, instance, name: str) -> InferenceClient:
    """What a kernel of `name`'s server holds: the service's URL and a Hub token of that user."""
    return InferenceClient(instance.url, hub.api.user_token(name))


def test_account_panel_creates_shows_once_and_revokes_a_key(hub, instance):
    user = hub.new_user("wid")
    panel = AccountPanel(client_for(hub, instance, user))
    assert panel.error.value == ""
    assert user in panel.identity.value
    assert "default" in panel.permissions.value  # every answer says where it came from
    assert "by model" in panel.usage.value and "tokens per day" in panel.quota.value

    panel.create_key()  # no name: refused in the panel, nothing created
    assert "name" in panel.error.value and panel.client.keys() == []

    model = "tiny-chat"
    assert model in panel.key_scope.models.options and "chat" in panel.key_scope.features.options  # what I may use
    panel.key_name.value, panel.key_expiry.value, panel.key_scope.models.value = "notebook", 7, (model,)
    panel.create_key()
    secret = panel.secret
    assert panel.error.value == "" and secret.startswith("jhi_") and secret in panel.secret_view.value
    assert panel.secret_view.layout.display is None
    listed = requests.get(instance.url + "v1/models", headers=bearer(secret), timeout=60).json()["data"]
    assert [m["id"] for m in listed] == [model]  # the key works, narrowed to the one model
    [key] = panel.client.keys()
    assert key["name"] == "notebook" and key["expires_at"] and key["models"] == [model]
    assert all(secret not in row.children[0].value for row in panel.key_rows.children)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert requests.post(instance.url + "v1/chat/completions", json=chat, headers=bearer(secret), timeout=60).ok

    def usage_shown() -> bool:
        panel.refresh()
        return model in panel.usage.value

    assert wait_for(usage_shown, what="the chat in the panel's usage")
    assert f'data-series="{model}"' in panel.usage.value  # drawn in the chart as well as listed

    panel.dismiss_secret()  # shown once: gone from the panel, and no call gives it back
    assert panel.secret is None and secret not in panel.secret_view.value
    panel.refresh()
    assert secret not in panel.secret_view.value

    panel.revoke_key(key["id"])
    assert panel.error.value == "" and panel.client.keys() == []
    assert wait_for(lambda: status(instance.url, "v1/models", secret) == 401, what="the revoked key refused")
    panel.revoke_key(key["id"])  # again: the service's error shows in the panel, not as a traceback
    assert "key" in panel.error.value.lower()


def test_panels_report_an_unreachable_service_in_the_error_label(hub, instance):
    token = hub.api.user_token(hub.new_user("wid"))
    client = InferenceClient(instance.url.replace("/services/", "/services/nothing-"), token)
    for panel in (AccountPanel(client), AdminPanel(client)):
        assert panel.error.layout.display is None and panel.error.value
    gone = InferenceClient("http://127.0.0.1:9/", token)
    assert "Cannot reach the inference service" in AccountPanel(gone).error.value


def test_admin_panel_refuses_a_user(hub, instance):
    panel = AdminPanel(client_for(hub, instance, hub.new_user("wid")))
    assert "administrators" in panel.notice.value and panel.tabs.layout.display == "none"


def test_admin_panel_workflow(hub):
    """Approve a pending user, change a grant, issue and revoke a key, set a quota, view as the user."""
    instance = hub.instances["postgresql"]
    url, app = instance.url, instance.app
    admin_name = hub.new_admin()
    admin_token = hub.api.user_token(admin_name)
    alice, bob = hub.new_user("wpend"), hub.new_user("wpend")
    alice_token = hub.api.user_token(alice)
    group = f"g-{alice}"
    hub.api.add_to_group(group, alice)
    for token in (alice_token, hub.api.user_token(bob)):
        requests.get(url + "api/me", headers=bearer(token), timeout=60)
    app.services.db.call(lambda s: s.execute(update(User).where(User.name.in_([alice, bob])).values(status="pending")))
    wait_for(lambda: status(url, "api/me", alice_token) == 403, what="the pending status")

    panel = AdminPanel(InferenceClient(url, admin_token))
    assert panel.error.value == "" and panel.tabs.layout.display is None
    panel.status_filter.value = "pending"
    assert {alice, bob} <= {u["name"] for u in panel.filtered}
    assert all(u["status"] == "pending" for u in panel.filtered)
    panel.search.value = alice
    assert [u["name"] for u in panel.filtered] == [alice]
    assert "tokens (30 d)" in panel.users_table.value and all("usage_30d" in u for u in panel.filtered)
    panel.seen_filter.value = 1  # alice used the service today
    assert [u["name"] for u in panel.filtered] == [alice]
    panel.seen_filter.value = 0  # never
    assert panel.filtered == []
    panel.seen_filter.value, panel.search.value, panel.status_filter.value = None, "", ""
    panel.group_filter.value = group
    assert [u["name"] for u in panel.filtered] == [alice]
    panel.user_choice.value = alice  # picking the user loads them (as the dropdown does)
    assert panel.selected == alice and "pending" in panel.user_detail.value

    panel.set_status("enable")  # pending users are approved, not enabled: the service's 409 shows
    assert panel.error.value and status(url, "api/me", alice_token) == 403
    panel.set_status("approve")
    assert panel.error.value == "" and "active" in panel.user_detail.value
    assert wait_for(lambda: status(url, "api/me", alice_token) == 200, what="the approval")

    grants_url = url + f"api/users/{alice}/grants"
    panel.grant_target_kind.value, panel.grant_target.value, panel.grant_value.value = "feature", "embeddings", False
    panel.set_grant()
    assert requests.get(grants_url, headers=bearer(admin_token), timeout=60).json()["features"] == {"embeddings": False}
    assert "user_grant" in panel.user_detail.value
    panel.grant_value.value = None
    panel.set_grant()
    assert requests.get(grants_url, headers=bearer(admin_token), timeout=60).json()["features"] == {}
    panel.grant_kind.value, panel.grant_subject.value = "group", group
    panel.grant_target_kind.value, panel.grant_target.value, panel.grant_value.value = "model", "tiny-chat", False
    panel.set_grant()
    group_grants = requests.get(url + f"api/groups/{group}/grants", headers=bearer(admin_token), timeout=60).json()
    assert group_grants["models"] == {"tiny-chat": False} and group in panel.grants_view.value

    panel.issue_name.value = "job"
    panel.issue_key()
    assert panel.error.value == "" and status(url, "v1/models", panel.secret) == 200
    [key] = panel.client.user_keys(alice)
    assert key["created_by"] == admin_name
    panel.revoke_user_key(key["id"])
    assert panel.client.user_keys(alice) == []

    panel.quota_fields["tokens_per_day"].value = "1000"
    panel.set_quota()
    quota = requests.get(url + f"api/users/{alice}/quota", headers=bearer(admin_token), timeout=60).json()
    assert quota["tokens_per_day"] == 1000 and panel.error.value == ""
    panel.quota_fields["weight"].value = "heavy"
    panel.set_quota()
    assert "weight" in panel.error.value

    panel.audit_user.value = alice
    panel.load_audit()
    assert "grants.set" in panel.audit_view.value and panel.error.value == ""
    panel.load_usage()
    assert panel.error.value == "" and "by user" in panel.usage_view.value
    assert 'class="jhi-chart"' in panel.usage_view.value  # the session's users have used the service today

    panel.view_as()
    viewed = panel.view_panel
    assert viewed.me["name"] == alice and viewed.me["acting_admin"] == admin_name
    assert viewed.error.value == "" and alice in viewed.identity.value


def admin_panel(hub, instance) -> tuple[AdminPanel, str]:
    """An AdminPanel of a fresh service admin, and that admin's Hub token (to check the service's state)."""
    token = hub.api.user_token(hub.new_admin())
    panel = AdminPanel(InferenceClient(instance.url, token))
    assert panel.error.value == "" and panel.tabs.layout.display is None
    return panel, token


def test_admin_panel_sets_the_default_quota(hub, instance):
    panel, admin_token = admin_panel(hub, instance)
    default_url = instance.url + "api/quotas/default"
    before = requests.get(default_url, headers=bearer(admin_token), timeout=60).json()
    with pytest.raises(ValueError, match="default"):  # the client names the kinds it knows
        panel.client.subject_quota("team", "x")
    panel.quota_kind.value = "default"
    assert panel.quota_subject.disabled  # the default has no name
    try:
        panel.load_quota()
        assert panel.error.value == "" and "Default limits" in panel.quota_view.value
        panel.quota_fields["tokens_per_month"].value = str(10**12)  # a limit no test reaches
        panel.set_quota()
        assert panel.error.value == ""
        assert requests.get(default_url, headers=bearer(admin_token), timeout=60).json()["tokens_per_month"] == 10**12
        user = hub.new_user("wquota")  # no limit of their own or of a group: the default applies to them
        effective = requests.get(instance.url + f"api/users/{user}/quota", headers=bearer(admin_token),
                                 timeout=60).json()["effective"]["limits"]["tokens_per_month"]
        assert (effective["limit"], effective["source"]) == (10**12, "default")
        panel.quota_fields["weight"].value = "heavy"
        panel.set_quota()
        assert "weight" in panel.error.value
        panel.select_user(user)  # picking a user goes back to that user's quota
        assert panel.quota_kind.value == "user" and not panel.quota_subject.disabled
    finally:
        panel.client.set_subject_quota("default", None, {f: before[f] for f in QUOTA_FIELDS})


def test_admin_panel_resets_a_local_password_and_shows_it_once(hub):
    instance = hub.instances["postgresql"]  # in this process: the stored hash can be checked
    panel, admin_token = admin_panel(hub, instance)
    panel.reset_password()  # nobody picked: said in the panel, nothing sent
    assert "Pick a user" in panel.error.value and panel.new_password is None

    user = hub.new_user("wpw")
    panel.select_user(user)
    panel.reset_password()
    password = panel.new_password
    assert panel.error.value == "" and password and password in panel.password_view.value
    stored = instance.app.services.db.call(
        lambda s: s.execute(select(LocalAccount.password_hash).where(LocalAccount.name == user)).scalar_one())
    assert verify_password(stored, password)
    events = requests.get(instance.url + "api/audit", params={"user": user, "action": "password.reset"},
                          headers=bearer(admin_token), timeout=60).json()["events"]
    assert len(events) == 1

    panel.select_user(hub.new_user("wpw"))  # shown once: gone when another user is picked
    assert panel.new_password is None and password not in panel.password_view.value

    gone = panel.selected
    hub.api.delete_user(gone)  # deleted from the Hub after it was picked: the service's 404 shows in the panel
    panel.reset_password()
    assert gone in panel.error.value and panel.new_password is None


def test_admin_panel_issues_a_narrowed_key_and_revokes_all_keys(hub, instance):
    url = instance.url
    panel, admin_token = admin_panel(hub, instance)
    panel.revoke_all_keys()
    assert "Pick a user" in panel.error.value

    user, other = hub.new_user("wkey"), hub.new_user("wkey")
    panel.select_user(user)
    model = "tiny-chat"
    scope = panel.issue_scope
    assert model in scope.models.options and "chat" in scope.features.options  # what the user may use
    panel.issue_name.value, scope.features.value, scope.models.value = "narrow", ("chat",), (model,)
    panel.issue_key()
    narrowed = panel.secret
    assert panel.error.value == "" and narrowed in panel.secret_view.value
    assert scope.features.value == () and scope.models.value == ()  # the next key starts wide
    listed = requests.get(url + "v1/models", headers=bearer(narrowed), timeout=60).json()["data"]
    assert [m["id"] for m in listed] == [model]
    panel.issue_name.value = "wide"
    panel.issue_key()
    wide = panel.secret
    keys = requests.get(url + f"api/users/{user}/keys", headers=bearer(admin_token), timeout=60).json()["keys"]
    by_name = {k["name"]: k for k in keys}
    assert by_name["narrow"]["features"] == ["chat"] and by_name["narrow"]["models"] == [model]
    assert not by_name["wide"]["features"] and not by_name["wide"]["models"]
    assert len(panel.user_key_rows.children) == 2

    panel.revoke_all_keys()  # the first click only asks, naming how many keys of whom
    assert panel.error.value == "" and panel.revoke_all.button.description == f"Confirm: revoke all 2 keys of {user}"
    assert panel.revoke_all.cancel.layout.display is None
    assert len(requests.get(url + f"api/users/{user}/keys", headers=bearer(admin_token), timeout=60).json()["keys"]) == 2
    assert status(url, "v1/models", narrowed) == 200 and status(url, "v1/models", wide) == 200
    panel.revoke_all.cancel.click()  # Cancel: back to one button, and the next click asks again
    assert panel.revoke_all.button.description == "Revoke all keys" and panel.revoke_all.cancel.layout.display == "none"
    panel.revoke_all_keys()
    panel.select_user(other)  # picking another user forgets the question
    assert panel.revoke_all.button.description == "Revoke all keys"
    panel.revoke_all_keys()  # the other user has no key: nothing to ask
    assert f"{other} has no active keys" in panel.notice.value and panel.revoke_all.pending is None
    panel.select_user(user)
    panel.revoke_all_keys()
    assert status(url, "v1/models", wide) == 200  # still asking
    panel.revoke_all_keys()  # the second click revokes
    assert panel.error.value == "" and f"Revoked 2 key(s) of {user}" in panel.notice.value
    assert panel.revoke_all.button.description == "Revoke all keys"
    assert requests.get(url + f"api/users/{user}/keys", headers=bearer(admin_token), timeout=60).json()["keys"] == []
    assert "No keys" in panel.user_key_rows.children[0].value
    for secret in (narrowed, wide):
        assert wait_for(lambda secret=secret: status(url, "v1/models", secret) == 401, what="the revoked keys refused")
    audit = requests.get(url + "api/audit", params={"user": user, "action": "key.revoke"}, headers=bearer(admin_token),
                         timeout=60).json()["events"]
    assert audit


def test_admin_panel_usage_over_a_date_range(hub, instance):
    url = instance.url
    user = hub.new_user("wuse")
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    user_token = hub.api.user_token(user)
    assert requests.post(url + "v1/chat/completions", json=chat, headers=bearer(user_token), timeout=60).ok
    panel, _ = admin_panel(hub, instance)
    today = dt.datetime.now(dt.UTC).date()
    week_ago = today - dt.timedelta(days=6)

    panel.usage_group.value, panel.usage_since.value, panel.usage_until.value = "user", week_ago, today

    def user_shown() -> bool:
        panel.load_usage()
        return user in panel.usage_view.value

    assert wait_for(user_shown, what="the chat in the admin's usage for the last week")
    assert panel.error.value == "" and f"Tokens per day, {week_ago} to {today}, by user" in panel.usage_view.value
    panel.usage_group.value = "model"
    panel.load_usage()
    assert "tiny-chat" in panel.usage_view.value and 'class="jhi-chart"' in panel.usage_view.value

    quiet = dt.date(2020, 1, 1)  # one day long ago: the range is the one asked for, and nothing was used then
    panel.usage_since.value = panel.usage_until.value = quiet
    panel.load_usage()
    assert panel.error.value == "" and f"{quiet} to {quiet}" in panel.usage_view.value
    assert "(none)" in panel.usage_view.value and "jhi-chart" not in panel.usage_view.value

    shown = panel.usage_view.value
    panel.usage_since.value, panel.usage_until.value = today, today - dt.timedelta(days=1)  # backwards
    panel.load_usage()
    assert "is after Until" in panel.error.value and panel.usage_view.value == shown
    panel.usage_since.value, panel.usage_until.value = today + dt.timedelta(days=1), None  # tomorrow onwards
    panel.load_usage()
    assert f"today, {today}" in panel.error.value

    panel.usage_group.value, panel.usage_since.value = "user", today - dt.timedelta(days=200)  # past the chart
    panel.load_usage()
    assert panel.error.value == "" and "totals only" in panel.usage_view.value and user in panel.usage_view.value
    assert "jhi-chart" not in panel.usage_view.value
    panel.usage_since.value = today - dt.timedelta(days=800)  # past what the service reports: its 400 shows
    panel.load_usage()
    assert "731 days" in panel.error.value


def test_panels_find_the_service_from_a_kernels_environment(hub, instance, monkeypatch):
    """No client given: the panel uses what a Hub-spawned kernel has (its Hub token), or says what is missing."""
    for variable in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "INFERENCE_SERVICE_URL"):
        monkeypatch.delenv(variable, raising=False)
    assert "JUPYTERHUB_API_TOKEN" in AccountPanel().error.value  # outside a Hub: one line, no traceback
    user = hub.new_user("wid")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.api.user_token(user))
    monkeypatch.setenv("INFERENCE_SERVICE_URL", instance.url)
    panel = AccountPanel()
    assert panel.error.value == "" and panel.me["name"] == user


def test_panels_without_authentication_say_so_and_hide_user_management(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text("models: []\n")  # the panels need no model (and the service starts at once)
    proc, url = serve(tmp_path, "--identity=none", f"--models={models}")
    try:
        with InferenceClient(url, "anything") as client:
            account, admin = AccountPanel(client), AdminPanel(client)
    finally:
        stop(proc)
    assert account.error.value == "" and "without authentication" in account.identity.value
    assert account.keys_section.layout.display == "none"
    assert "without authentication" in admin.notice.value and admin.tabs.layout.display == "none"
