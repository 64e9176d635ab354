"""Deny by default: every route but the explicit public list refuses missing and bad credentials.

The routes come from the application's own route table, so a route added later is walked too.
"""

from __future__ import annotations

import re
import time

import pytest
import requests
from conftest import wait_for
from tornado.web import RequestHandler

from hub_extension import key_format
from hub_extension.app import PUBLIC_ROUTES, InferenceService, check_public_routes
from hub_extension.handlers.base import APIHandler, Auth
from hub_extension.handlers.pages import OAuthCallbackHandler

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def route_requests(app: InferenceService) -> list[tuple[str, str]]:
    """(method, path) for every method every non-public route implements, groups filled with samples."""
    out = []
    for pattern, handler in app.routes():
        if pattern in PUBLIC_ROUTES:
            continue
        path = re.sub(r"\([^)]*\)", "x1", pattern).replace("$", "")
        base = APIHandler if issubclass(handler, APIHandler) else RequestHandler
        for method in METHODS:
            if getattr(handler, method.lower()) is not getattr(base, method.lower()):
                out.append((method, path.lstrip("/")))
    # And a path no route matches: the fallback handler authenticates too.
    out.append(("GET", "no/such/route"))
    return out


def refused(instance, method: str, path: str, headers: dict) -> requests.Response:
    body = b'{"model": "tiny-chat", "messages": [], "name": "x"}' if method in ("POST", "PUT", "PATCH") else None
    r = requests.request(method, instance.url + path, headers=headers, data=body, allow_redirects=False, timeout=30)
    if path == "":  # the account page: browsers are sent to the Hub's login instead
        assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"], (headers, r.status_code)
        return r
    assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json"), (method, path)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    return r


@pytest.fixture(scope="module")
def dead_credentials(hub):
    """Credentials that must all fail: garbage, an expired and a revoked key, an expired and a revoked Hub token."""
    pg = hub.instances["postgresql"]
    user = hub.new_user("walk")
    token = hub.api.user_token(user)
    headers = {"Authorization": f"Bearer {token}"}
    revoked = requests.post(pg.url + "api/keys", headers=headers, json={"name": "r"}).json()
    requests.delete(pg.url + f"api/keys/{revoked['id']}", headers=headers).raise_for_status()
    expired = requests.post(pg.url + "api/keys", headers=headers, json={"name": "e", "expires_in_days": 1}).json()
    from sqlalchemy import update

    from hub_extension.orm import ApiKey, utcnow

    # Expire it in both databases' terms: the SQLite instance never saw it, so its key is unknown there (also 401).
    pg.app.services.db.call(lambda s: s.execute(update(ApiKey).where(ApiKey.id == expired["id"]).values(expires_at=utcnow())))
    pg.app.services.keys.forget_all()

    expiring_token = hub.api.user_token(user, expires_in=1)
    revoked_token = hub.api.user_token(user)
    token_id = [t for t in hub.api.request("GET", f"/users/{user}/tokens").json()["api_tokens"] if t["note"] == "test"]
    for t in token_id:
        hub.api.request("DELETE", f"/users/{user}/tokens/{t['id']}")
    time.sleep(1.5)  # past the expiring token's life
    return {
        "garbage bearer": {"Authorization": "Bearer not-a-real-token"},
        "garbage key": {"Authorization": "Bearer " + key_format.PREFIX + "garbage"},
        "garbage x-api-key": {"x-api-key": "garbage"},
        "malformed header": {"Authorization": "Basic dXNlcjpwYXNz"},
        "revoked key": {"Authorization": f"Bearer {revoked['key']}"},
        "expired key": {"Authorization": f"Bearer {expired['key']}"},
        "expired hub token": {"Authorization": f"token {expiring_token}"},
        "revoked hub token": {"Authorization": f"token {revoked_token}"},
    }


def test_public_routes_are_the_explicit_list(hub):
    app = hub.instances["postgresql"].app
    public = {p for p, h in app.routes() if h is OAuthCallbackHandler or (issubclass(h, APIHandler) and h.auth is Auth.PUBLIC)}
    assert public == set(PUBLIC_ROUTES) == {"/health", "/oauth_callback", "/openapi.json"}
    pages = {p for p, h in app.routes() if not issubclass(h, APIHandler) and h is not OAuthCallbackHandler}
    assert pages == {"/"}  # walked below: it redirects to the Hub's login


def test_a_public_route_not_on_the_list_stops_the_start():
    class Sneaky(APIHandler):
        auth = Auth.PUBLIC

    with pytest.raises(RuntimeError, match="PUBLIC_ROUTES"):
        check_public_routes([("/sneaky", Sneaky)])


def test_every_route_refuses_missing_credentials(hub, instance):
    for method, path in route_requests(hub.instances["postgresql"].app):
        refused(instance, method, path, {})


def test_every_route_refuses_dead_credentials(hub, instance, dead_credentials):
    # Hub token cache bound: the revoked Hub token may live one cache period; wait for it first.
    revoked = dead_credentials["revoked hub token"]
    wait_for(lambda: requests.get(instance.url + "api/me", headers=revoked).status_code == 401, 30, 0.2, "revocation")
    for method, path in route_requests(hub.instances["postgresql"].app):
        for _name, headers in dead_credentials.items():
            refused(instance, method, path, headers)


def test_tokens_in_the_url_are_refused(hub, instance):
    user = hub.new_user()
    token = hub.api.user_token(user)
    for param in ("token", "api_key"):
        r = requests.get(instance.url + f"v1/models?{param}={token}")
        assert r.status_code == 401 and "URL" in r.json()["error"]["message"]


def test_health_is_public(hub, instance):
    r = requests.get(instance.url + "health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_browser_without_login_gets_json_not_a_redirect(hub, instance):
    r = requests.get(instance.url + "api/keys", headers={"Accept": "text/html"}, allow_redirects=False)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("application/json")


def test_account_page_redirects_to_hub_login_then_works_with_xsrf(hub, instance):
    """The browser path: page -> Hub OAuth login -> back to the page; the page's script uses the cookie + XSRF."""
    user = hub.new_user("web")
    s = requests.Session()
    r = s.get(instance.url, allow_redirects=False)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
    # Log in to the Hub (shared password), then follow the OAuth dance back to the service.
    s.get(hub.url + "/hub/login")
    s.post(hub.url + "/hub/login", data={"username": user, "password": "test-password-1", "_xsrf": s.cookies.get("_xsrf", path="/hub/")})
    page = s.get(instance.url)
    assert page.status_code == 200 and user in page.text, (page.url, [h.url for h in page.history], page.text[:800])
    xsrf = re.search(r'const xsrf = "([^"]+)"', page.text).group(1)
    # GET with the cookie works; a write without the XSRF header is refused; with it, it works.
    assert s.get(instance.url + "api/me").json()["authenticated_via"] == "hub_cookie"
    refused = s.post(instance.url + "api/keys", json={"name": "web"})
    assert refused.status_code in (401, 403) and "xsrf" in refused.text.lower(), refused.text
    made = s.post(instance.url + "api/keys", json={"name": "web"}, headers={"X-XSRFToken": xsrf})
    assert made.status_code == 201, made.text
    assert requests.get(instance.url + "v1/models", headers={"Authorization": "Bearer " + made.json()["key"]}).status_code == 200
