"""The notebook panels in plain Python against the real service through the real Hub, with real Hub tokens.

Each action is driven the way a click drives it: the test fills the widgets, then calls the method the button's
`on_click` calls, and checks the service's state over HTTP (not the panel's own word for it).
"""

from __future__ import annotations

import requests
from conftest import bearer, serve, stop, wait_for
from sqlalchemy import update

from hub_extension.orm import User
from kernel_ext.service_api import InferenceClient
from widgets import AccountPanel, AdminPanel


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
    assert model in panel.key_models.options
    panel.key_name.value, panel.key_expiry.value, panel.key_models.value = "notebook", 7, (model,)
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
