"""The account page as a browser meets it through the Hub: anti-framing headers and every cookie's attributes.

A `requests` session plays the browser: it logs in with the Hub's form, follows the OAuth redirects to the
page, then makes the page script's own request. Over https too, as behind a proxy that ends TLS and says so
in `X-Forwarded-Proto` (the Hub's proxy passes it on); its cookie jar then sends Secure cookies back as a
browser on https would.
"""

from __future__ import annotations

import re
from http.cookiejar import DefaultCookiePolicy
from http.cookies import Morsel, SimpleCookie
from urllib.parse import urlparse

import pytest
import requests

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
