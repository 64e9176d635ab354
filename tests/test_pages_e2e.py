"""The account page as a browser meets it through the Hub: anti-framing headers and every cookie's attributes;
then, in a real Chromium, what the page does beyond making a key: narrowed keys, the effective permissions,
copying a new key, presets with parameters.

A `requests` session plays the browser for the headers: it logs in with the Hub's form, follows the OAuth
redirects to the page, then makes the page script's own request. Over https too, as behind a proxy that ends
TLS and says so in `X-Forwarded-Proto` (the Hub's proxy passes it on); its cookie jar then sends Secure cookies
back as a browser on https would. The Chromium tests (Playwright, `page`) click as a user does and check what
the service stored through its REST API; screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import secrets
from http.cookiejar import DefaultCookiePolicy
from http.cookies import Morsel, SimpleCookie
from urllib.parse import urlparse

import pytest
import requests
from browser import screenshot
from conftest import bearer
from test_jupyterlab_e2e import keys_named, log_in

CSP_DIRECTIVES = {"default-src 'self'", "style-src 'unsafe-inline' 'self'", "script-src 'unsafe-inline' 'self'"}


def browser(hub, user: str, scheme: str, monkeypatch) -> tuple[requests.Session, list[requests.Response]]:
    """A session logged in to the Hub with its login form, and every response it will get."""
    s = requests.Session()
    seen: list[requests.Response] = []
    s.hooks["response"].append(lambda r, *args, **kwargs: seen.append(r))
    if scheme == "https":
        s.headers["X-Forwarded-Proto"] = "https"
        # requests builds a cookie jar per request with the default policy: make every one send Secure cookies.
        monkeypatch.setattr(DefaultCookiePolicy, "return_ok_secure", lambda self, cookie, request: True)
    s.get(hub.url + "/hub/login")
    xsrf = s.cookies.get("_xsrf", path="/hub/")
    login = {"username": user, "password": "test-password-1", "_xsrf": xsrf}
    r = s.post(hub.url + "/hub/login", data=login, allow_redirects=False)  # then to a server we do not need
    assert r.status_code == 302, r.text[:500]
    return s, seen


def set_cookies(responses: list[requests.Response], prefix: str) -> list[Morsel]:
    """Every cookie the responses under `prefix` set (not the ones they delete), one morsel per Set-Cookie."""
    morsels = []
    for r in responses:
        if urlparse(r.url).path.startswith(prefix):
            for header in r.raw.headers.getlist("Set-Cookie"):
                cookie = SimpleCookie()
                cookie.load(header)
                morsels.extend(m for m in cookie.values() if m.value)
    return morsels


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_account_page_headers_and_cookies(hub, instance, scheme, monkeypatch):
    user = hub.new_user("page")
    s, seen = browser(hub, user, scheme, monkeypatch)
    prefix = urlparse(instance.url).path
    page = s.get(instance.url)
    assert page.status_code == 200 and user in page.text, (page.url, [h.url for h in page.history])
    # The page script's own request, with the token the page hands it (it cannot read the HttpOnly cookie).
    xsrf = re.search(r'const xsrf = "([^"]+)"', page.text).group(1)
    fetch = {"X-XSRFToken": xsrf, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"}
    assert s.post(instance.url + "api/keys", json={"name": "page"}, headers=fetch).status_code == 201

    directives = {d.strip() for d in page.headers["Content-Security-Policy"].split(";")}
    assert CSP_DIRECTIVES | {"frame-ancestors 'none'"} <= directives
    for r in [page, *page.history]:
        if urlparse(r.url).path.startswith(prefix):  # the login redirect and the OAuth callback too
            assert r.headers["X-Frame-Options"] == "DENY", r.url

    client_id = "service-" + instance.name
    morsels = set_cookies(seen, prefix)
    assert {client_id, client_id + "-oauth-state", "_xsrf"} <= {m.key for m in morsels}
    for m in morsels:
        assert m["httponly"] is True, m.OutputString()
        assert m["samesite"] == ("Strict" if m.key == "_xsrf" else "Lax"), m.OutputString()
        assert bool(m["secure"]) == (scheme == "https"), m.OutputString()


def test_account_page_is_part_of_the_hub(hub, instance, monkeypatch):
    """The page uses the Hub's stylesheet, scripts (navigation bar, dark mode) and links to the Hub's pages."""
    s, _seen = browser(hub, hub.new_user("look"), "http", monkeypatch)
    page = s.get(instance.url)
    assets = re.findall(r'(?:href|src)="(/hub/(?:static/[^"]+|logo))"', page.text)
    assert {"/hub/static/css/style.min.css", "/hub/static/js/darkmode.js", "/hub/logo"} <= set(assets)
    for asset in assets:
        assert s.get(hub.url + asset).status_code == 200, asset
    for link in ("/hub/home", "/hub/token", "/hub/logout"):
        assert f'href="{link}"' in page.text


# -- in Chromium ------------------------------------------------------------------------------------


def open_account_page(page, hub, instance, user: str) -> None:
    """Log in as `user` and wait until the page's script has loaded the account and the permissions."""
    log_in(page, hub, user, instance.url)
    page.wait_for_url(instance.url)
    page.locator("#role", has_text="Role:").wait_for()
    page.locator("#permissions tr").first.wait_for()


def page_api(page, path: str):
    """A GET by the page itself (its own cookie, so the same identity the page's script has)."""
    return page.evaluate("path => fetch(path, {credentials: 'same-origin'}).then(r => r.json())", path)


def test_the_hubs_services_menu_leads_to_the_account_page(hub, page):
    """From the Hub's home page, as a newcomer finds it: Services, then the service's name."""
    instance = hub.instances["sqlite"]  # the service `configure` registered (shown in the menu)
    log_in(page, hub, hub.new_user("menu"), f"{hub.url}/hub/home")
    page.wait_for_url(f"{hub.url}/hub/home")
    page.locator("a.dropdown-toggle", has_text="Services").click()
    page.locator(".dropdown-menu").get_by_role("link", name=instance.name, exact=True).click()
    page.wait_for_url(instance.url)
    page.locator("#role", has_text="Role:").wait_for()
    screenshot(page, "account-page-from-the-services-menu")


def test_narrowed_key_and_permissions_on_the_account_page(hub, instance, page):
    url = instance.url
    user = hub.new_user("narrow")
    hub.api.add_to_group("embedders", user)  # a Hub role: embeddings and minilm by `hub_scope`
    admin = bearer(hub.api.user_token(hub.new_admin()))
    r = requests.put(url + f"api/users/{user}/grants", headers=admin, json={"models": {"tiny-busy": False}})
    assert r.status_code == 200, r.text
    open_account_page(page, hub, instance, user)

    # The permissions table is what api/me/permissions answers, row by row.
    perms = page_api(page, "api/me/permissions")
    assert perms["models"]["tiny-busy"] == {"allowed": False, "source": "user_grant", "via": f"user:{user}"}
    expected = [("feature", n, d) for n, d in perms["features"].items()]
    expected += [("model", n, d) for n, d in perms["models"].items()] + [("model", "*", perms["other_models"])]
    rows = page.locator("#permissions tr")
    assert rows.count() == len(expected)
    for i, (kind, name, decision) in enumerate(expected):
        row = rows.nth(i)
        assert (row.get_attribute("data-kind"), row.get_attribute("data-name")) == (kind, name)
        assert row.get_attribute("data-source") == decision["source"]
        cells = row.locator("td").all_inner_texts()
        assert cells[2] == ("allowed" if decision["allowed"] else "denied"), (name, cells)
        assert cells[4] == decision.get("via", "-"), (name, cells)
    assert page.locator("#precedence").inner_text() == perms["precedence"]

    # The narrowing choices are what the user may use now: the denied model is not offered.
    offered = page.locator("#key-models option").all_inner_texts()
    assert "tiny-chat" in offered and "tiny-busy" not in offered
    assert set(page.locator("#key-features option").all_inner_texts()) == {
        n for n, d in perms["features"].items() if d["allowed"]}

    name = f"narrow-{secrets.token_hex(3)}"
    page.fill("#key-name", name)
    page.select_option("#key-features", ["chat"])
    page.select_option("#key-models", ["tiny-chat"])
    page.locator("#create button[type=submit]").click()
    page.locator("#new-key").wait_for()
    page.locator("#keys tr", has_text=name).locator("td", has_text="features: chat; models: tiny-chat").wait_for()
    screenshot(page, f"account-page-narrowed-key-{instance.backend}")
    assert page.locator("#error").inner_text() == ""
    secret = page.locator("#new-key-secret").input_value()
    assert secret.startswith("jhi_")

    # The service stored the narrowing, and holds the key to it.
    (stored,) = keys_named(instance, hub.api.user_token(user), name)
    assert (stored["features"], stored["models"]) == (["chat"], ["tiny-chat"])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ok = requests.post(url + "v1/chat/completions", headers=bearer(secret), json={**chat, "model": "tiny-chat"},
                       timeout=120)
    assert ok.status_code == 200, ok.text
    outside = requests.post(url + "v1/chat/completions", headers=bearer(secret),
                            json={**chat, "model": "tiny-generate"}, timeout=60)
    assert outside.status_code == 404 and outside.json()["error"]["code"] == "model_not_found", outside.text
    embed = requests.post(url + "v1/embeddings", headers=bearer(secret), json={"model": "minilm", "input": "x"},
                          timeout=60)
    assert embed.status_code == 403, embed.text  # the user may embed; the key may not

    # Copy: the clipboard API (127.0.0.1 is a secure context), then the fallback a Hub on plain http gets.
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#copy-key")
    page.locator("#copy-key", has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.evaluate("""() => {
        Object.defineProperty(window, "isSecureContext", {value: false});  // as on a Hub served over plain http
        document.getElementById("copy-key").textContent = "Copy";
        return navigator.clipboard.writeText("");
    }""")
    assert page.evaluate("window.isSecureContext") is False and page.evaluate("navigator.clipboard.readText()") == ""
    page.click("#copy-key")
    page.locator("#copy-key", has_text="Copied").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert page.locator("#error").inner_text() == ""


def test_presets_with_parameters_on_the_account_page(hub, instance, page):
    user = hub.new_user("preset")
    token = hub.api.user_token(user)
    open_account_page(page, hub, instance, user)
    page.locator("#preset-model option[value='tiny-chat']").wait_for(state="attached")

    name = f"brief-{secrets.token_hex(3)}"
    page.fill("#preset-name", name)
    page.select_option("#preset-model", "tiny-chat")
    page.fill("#preset-prompt", "Answer briefly.")
    page.fill("#preset-temperature", "0.2")
    page.fill("#preset-max-tokens", "50")
    page.fill("#preset-top-p", "0.9")
    page.locator("#preset-form button[type=submit]").click()
    row = page.locator("#presets tr", has_text=name)
    row.wait_for()
    assert row.locator("td").all_inner_texts()[:4] == [
        name, "tiny-chat", "Answer briefly.", "temperature=0.2, max_tokens=50, top_p=0.9"]
    assert page.locator("#error").inner_text() == ""
    r = requests.get(instance.url + f"api/presets/{name}", headers=bearer(token), timeout=30)
    assert r.json()["parameters"] == {"temperature": 0.2, "max_tokens": 50, "top_p": 0.9}, r.text

    # A value the service refuses: its own message shows, and nothing is made.
    bad = f"hot-{secrets.token_hex(3)}"
    page.fill("#preset-name", bad)
    page.fill("#preset-temperature", "9")
    page.locator("#preset-form button[type=submit]").click()
    page.locator("#error:not(:empty)").wait_for()
    screenshot(page, f"account-page-preset-parameters-{instance.backend}")
    body = {"name": bad, "model": "tiny-chat", "system_prompt": "", "parameters": {"temperature": 9}}
    r = requests.post(instance.url + "api/presets", headers=bearer(token), json=body, timeout=30)
    assert r.status_code == 400
    assert page.locator("#error").inner_text() == r.json()["error"]["message"]
    assert "temperature" in r.json()["error"]["message"]
    assert requests.get(instance.url + f"api/presets/{bad}", headers=bearer(token), timeout=30).status_code == 404
