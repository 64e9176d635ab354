"""What a user does in a real Chromium (Playwright): log in to the Hub, open JupyterLab in their spawned server,
run `02-account`, see the AccountPanel and create a key by clicking; then the same on the account page.

The server is the user's from `conftest.notebook_servers` (spawned by the Hub, notebooks copied by the spawner's
hook); the browser logs in with the test Hub's shared password. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import secrets
from urllib.parse import quote, urlparse

import requests
from browser import screenshot
from conftest import bearer, wait_for
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

PASSWORD = "test-password-1"  # the test Hub's shared password (conftest `_hub_config`)
LAB_SECONDS = 180_000  # JupyterLab's first load and a kernel start, on two busy cores (milliseconds)


def log_in(page, hub, user: str, next_url: str) -> None:
    """The Hub's login form, then on to `next_url` (a path, or a URL on the Hub)."""
    page.goto(f"{hub.url}/hub/login?next={quote(urlparse(next_url).path)}")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")


def keys_named(instance, token: str, name: str) -> list[dict]:
    keys = requests.get(instance.url + "api/keys", headers=bearer(token), timeout=30).json()["keys"]
    return [k for k in keys if k["name"] == name]


def works(instance, secret: str) -> bool:
    return requests.get(instance.url + "v1/models", headers=bearer(secret), timeout=30).status_code == 200


def test_account_panel_in_jupyterlab(hub, notebook_servers, page):
    server = notebook_servers["user"]
    log_in(page, hub, server.name, f"{server.url}lab/tree/02-account.ipynb")
    page.wait_for_url(f"{server.url}lab/**", timeout=LAB_SECONDS)
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    notebook.locator(".jp-Cell").first.wait_for(timeout=LAB_SECONDS)
    # Lab started a kernel for the notebook (the server's kernelspec, with kernel_ext): its session is on the
    # server. Running cells before that would ask which kernel to start.
    wait_for(lambda: any(s["path"] == "02-account.ipynb" and s["kernel"]["execution_state"] == "idle"
                         for s in server.api("GET", "api/sessions").json()),
             timeout=LAB_SECONDS / 1000, interval=0.5, what="the notebook's kernel")
    notebook.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=LAB_SECONDS)

    page.locator(".lm-MenuBar-item", has_text="Run").click()
    page.locator(".lm-Menu").get_by_text("Run All Cells", exact=True).click()
    panel = notebook.locator(".jhi-panel")
    panel.get_by_text("Your keys").wait_for(timeout=LAB_SECONDS)
    panel.get_by_text(server.name).first.wait_for()
    screenshot(page, "jupyterlab-account-panel")

    name = f"lab-{secrets.token_hex(3)}"
    panel.locator("input[placeholder='laptop']").fill(name)
    panel.get_by_role("button", name="Create key").click()
    secret = panel.locator("input.jhi-secret")
    secret.wait_for()
    screenshot(page, "jupyterlab-account-panel-new-key")
    assert panel.locator(".jhi-error").all_inner_texts() in ([], [""])

    # The service made the key for this user, and the secret the panel showed once works.
    instance = hub.instances["sqlite"]
    token = hub.api.user_token(server.name)
    assert len(keys_named(instance, token, name)) == 1
    assert works(instance, secret.input_value())
    # The Copy button puts it on the clipboard.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    panel.locator("button.jhi-copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == secret.input_value()

    # A chat through that key shows in the panel's usage chart once the service has written it down.
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = requests.post(instance.url + "v1/chat/completions", json=chat, headers=bearer(secret.input_value()), timeout=60)
    assert r.status_code == 200, r.text
    bar = panel.locator("svg.jhi-chart rect[data-series='tiny-chat']")

    def charted() -> bool:
        # One click, then time for that refresh to finish (clicks faster than the kernel refreshes would queue
        # refreshes, each redrawing the chart).
        panel.get_by_role("button", name="Refresh").click()
        try:
            bar.first.wait_for(state="visible", timeout=15_000)
        except PlaywrightTimeoutError:
            return False
        return True

    wait_for(charted, timeout=120, interval=0, what="the chat in the panel's usage chart")
    try:
        panel.locator("svg.jhi-chart").first.scroll_into_view_if_needed(timeout=5_000)
    except PlaywrightError:  # a late refresh redrew it: the screenshot is only an artefact
        pass
    screenshot(page, "jupyterlab-account-panel-usage-chart")
    # `make setup`'s JupyterLab settings: no prompt to fetch news from the internet (these machines may be offline).
    assert page.get_by_text("official Jupyter news").count() == 0


def test_create_a_key_on_the_account_page(hub, page):
    instance = hub.instances["sqlite"]  # the Hub-managed service, as deployed
    user = hub.new_user("page")
    log_in(page, hub, user, instance.url)
    page.wait_for_url(instance.url)
    page.locator("#role", has_text="Role:").wait_for()  # the page's script has loaded the account

    name = f"page-{secrets.token_hex(3)}"
    page.fill("#key-name", name)
    page.locator("#create button[type=submit]").click()
    box = page.locator("#new-key")
    box.wait_for()
    page.locator("#keys td", has_text=name).wait_for()
    screenshot(page, "account-page-new-key")
    assert page.locator("#error").inner_text() == ""

    secret = page.locator("#new-key-secret").input_value()
    token = hub.api.user_token(user)
    assert len(keys_named(instance, token, name)) == 1
    assert works(instance, secret)
