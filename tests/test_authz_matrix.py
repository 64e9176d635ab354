"""The authorization matrix: every route of the app x every kind of caller, with the status each must get.

Real handlers, through the Hub's proxy, on both instances (SQLite and PostgreSQL). The route list comes from
the application's own route table: a route (or a method) added without a row here fails
`test_every_route_has_a_row`.
"""

from __future__ import annotations

import secrets

import pytest
import requests
from conftest import bearer
from tornado import web

from hub_extension.handlers.base import APIHandler
from hub_extension.permissions import FEATURES

COLUMNS = (
    "anonymous", "garbage", "no_feature", "no_model", "user", "narrowed", "disabled", "admin", "as_user", "as_admin",
)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
NO_KEY = "999999999"

# What each caller gets on a route open to any active user, and on an admin route (X: the admin's answer).
ADMIN_ONLY = (401, 401, 403, 403, 403, 403, 403, None, 403, 403)


def admin_route(status: int) -> tuple:
    return tuple(status if s is None else s for s in ADMIN_ONLY)


# (route pattern, method, path, JSON body, statuses in COLUMNS order). Rows run in this order.
ROWS = [
    ("/health", "GET", "health", None, (200,) * 10),
    ("/openapi.json", "GET", "openapi.json", None, (200,) * 10),
    ("/oauth_callback", "GET", "oauth_callback", None, (400,) * 10),  # the Hub's OAuth handler: no code, 400
    # The account page (browser, Hub login only): no Hub login redirects to it; a disabled user is told so; the
    # page is a shell whose data comes from /api (which applies permissions), so other Hub users get the shell.
    ("/", "GET", "", None, (302, 302, 200, 200, 200, 302, 403, 200, 200, 200)),
    #                                                anon garb nofeat nomodel user narrow disab admin asusr asadm
    ("/api/me", "GET", "api/me", None, (401, 401, 200, 200, 200, 200, 403, 200, 200, 403)),
    ("/api/me/permissions", "GET", "api/me/permissions", None, (401, 401, 200, 200, 200, 200, 403, 200, 200, 403)),
    ("/api/keys", "GET", "api/keys", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/keys", "POST", "api/keys", {"name": "m"}, (401, 401, 403, 201, 201, 403, 403, 201, 403, 403)),
    ("/api/keys", "DELETE", "api/keys", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/keys/([^/]+)", "DELETE", f"api/keys/{NO_KEY}", None, (401, 401, 403, 404, 404, 403, 403, 404, 404, 403)),
    ("/api/users", "GET", "api/users", None, admin_route(200)),
    ("/api/users/([^/]+)", "GET", "api/users/{victim}", None, admin_route(200)),
    ("/api/users/([^/]+)", "GET", "api/users/no-such-user-{nonce}", None, admin_route(404)),
    ("/api/users/([^/]+)/(approve|deny|disable|enable)", "POST", "api/users/{victim}/disable", None, admin_route(200)),
    ("/api/users/([^/]+)/(approve|deny|disable|enable)", "POST", "api/users/{victim}/enable", None, admin_route(200)),
    ("/api/users/([^/]+)/(approve|deny|disable|enable)", "POST", "api/users/{victim}/approve", None, admin_route(409)),
    ("/api/users/([^/]+)/(approve|deny|disable|enable)", "POST", "api/users/{victim}/deny", None, admin_route(409)),
    ("/api/users/([^/]+)/permissions", "GET", "api/users/{victim}/permissions", None, admin_route(200)),
    ("/api/users/([^/]+)/grants", "GET", "api/users/{victim}/grants", None, admin_route(200)),
    ("/api/users/([^/]+)/grants", "PUT", "api/users/{victim}/grants", {"features": {"usage": True}}, admin_route(200)),
    ("/api/users/([^/]+)/grants", "PATCH", "api/users/{victim}/grants", {"features": {"usage": None}},
     admin_route(200)),
    ("/api/users/([^/]+)/grants", "PATCH", "api/users/{victim}/grants", {"features": {"flying": True}},
     admin_route(400)),
    ("/api/users/([^/]+)/grants", "DELETE", "api/users/{victim}/grants", None, admin_route(200)),
    ("/api/groups/([^/]+)/grants", "GET", "api/groups/{group}/grants", None, admin_route(200)),
    ("/api/groups/([^/]+)/grants", "PUT", "api/groups/{group}/grants", {"models": {"minilm": True}},
     admin_route(200)),
    ("/api/groups/([^/]+)/grants", "PUT", "api/groups/no-such-group-{nonce}/grants", {"models": {"minilm": True}},
     admin_route(404)),
    ("/api/groups/([^/]+)/grants", "PATCH", "api/groups/{group}/grants", {"features": {"chat": True}},
     admin_route(200)),
    ("/api/groups/([^/]+)/grants", "DELETE", "api/groups/{group}/grants", None, admin_route(200)),
    ("/api/users/([^/]+)/keys", "GET", "api/users/{victim}/keys", None, admin_route(200)),
    ("/api/users/([^/]+)/keys", "POST", "api/users/{victim}/keys", {"name": "from-admin"}, admin_route(201)),
    ("/api/users/([^/]+)/keys", "DELETE", "api/users/{victim}/keys", None, admin_route(200)),
    ("/api/users/([^/]+)/keys/([^/]+)", "DELETE", f"api/users/{{victim}}/keys/{NO_KEY}", None, admin_route(404)),
    ("/api/audit", "GET", "api/audit?limit=5", None, admin_route(200)),
    ("/api/audit", "GET", "api/audit?since=yesterday", None, admin_route(400)),
    ("/v1/models", "GET", "v1/models", None, (401, 401, 200, 200, 200, 200, 403, 200, 200, 403)),
    ("/v1/models/(.+)", "GET", "v1/models/tiny-chat", None, (401, 401, 200, 404, 200, 200, 403, 200, 200, 403)),
    ("/v1/chat/completions", "POST", "v1/chat/completions", CHAT, (401, 401, 403, 404, 200, 200, 403, 200, 200, 403)),
    ("/v1/completions", "POST", "v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": 1},
     (401, 401, 403, 404, 200, 403, 403, 200, 200, 403)),
    ("/v1/embeddings", "POST", "v1/embeddings", {"model": "minilm", "input": "hi"},
     (401, 401, 403, 404, 200, 403, 403, 200, 200, 403)),
    # -- usage rows (issue 9: reports) --
    ("/api/usage", "GET", "api/usage", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/usage", "GET", "api/usage?format=csv&group_by=model", None,
     (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/usage", "GET", "api/usage?bucket=week", None, (401, 401, 403, 400, 400, 403, 403, 400, 400, 403)),
    ("/api/usage", "GET", "api/usage?group_by=user", None, (401, 401, 403, 400, 400, 403, 403, 400, 400, 403)),
    ("/api/admin/usage", "GET", "api/admin/usage?group_by=user&user={victim}", None, admin_route(200)),
    ("/api/admin/usage", "GET", "api/admin/usage?since=yesterday", None, admin_route(400)),
    # -- quota rows (issue 9: quotas) --
    ("/api/me/quota", "GET", "api/me/quota", None, (401, 401, 200, 200, 200, 200, 403, 200, 200, 403)),
    ("/api/users/([^/]+)/quota", "GET", "api/users/{victim}/quota", None, admin_route(200)),
    ("/api/users/([^/]+)/quota", "GET", "api/users/no-such-user-{nonce}/quota", None, admin_route(404)),
    ("/api/users/([^/]+)/quota", "PUT", "api/users/{victim}/quota", {"tokens_per_day": 10**6}, admin_route(200)),
    ("/api/users/([^/]+)/quota", "PUT", "api/users/{victim}/quota", {"tokens_per_day": -1}, admin_route(400)),
    ("/api/users/([^/]+)/quota", "DELETE", "api/users/{victim}/quota", None, admin_route(200)),
    ("/api/groups/([^/]+)/quota", "GET", "api/groups/{group}/quota", None, admin_route(200)),
    ("/api/groups/([^/]+)/quota", "PUT", "api/groups/{group}/quota", {"requests_per_minute": 1000},
     admin_route(200)),
    ("/api/groups/([^/]+)/quota", "PUT", "api/groups/no-such-group-{nonce}/quota", {"weight": 2}, admin_route(404)),
    ("/api/groups/([^/]+)/quota", "DELETE", "api/groups/{group}/quota", None, admin_route(200)),
    ("/api/quotas/default", "GET", "api/quotas/default", None, admin_route(200)),
    ("/api/quotas/default", "PUT", "api/quotas/default", {"weight": 1}, admin_route(200)),  # the setting's value
    ("/api/quotas/default", "PUT", "api/quotas/default", {"weight": "heavy"}, admin_route(400)),
    ("/api/quotas/default", "DELETE", "api/quotas/default", None, admin_route(200)),
    # -- registration rows (issue 10: invites, local passwords) --
    ("/api/invites", "GET", "api/invites", None, admin_route(200)),
    ("/api/invites", "GET", "api/invites?status=lost", None, admin_route(400)),
    ("/api/invites", "POST", "api/invites", {"note": "matrix", "groups": ["matrix"]}, admin_route(201)),
    ("/api/invites", "POST", "api/invites", {"expires_in_days": 0}, admin_route(400)),
    ("/api/invites/([^/]+)", "DELETE", f"api/invites/{NO_KEY}", None, admin_route(404)),
    ("/api/invites/([^/]+)", "DELETE", "api/invites/first", None, admin_route(400)),
    ("/api/users/([^/]+)/password", "POST", "api/users/{victim}/password", {}, admin_route(200)),
    ("/api/users/([^/]+)/password", "POST", "api/users/{victim}/password", {"password": "short"}, admin_route(400)),
    ("/api/users/([^/]+)/password", "POST", "api/users/no-such-user-{nonce}/password", {}, admin_route(404)),
    # -- metrics rows (issue 9: /metrics) --
    ("/metrics", "GET", "metrics", None, admin_route(200)),  # Metrics.auth = admin (the default)
    # -- resources rows (issue 12: presets and knowledge collections; feature `resources`) --
    ("/api/presets", "GET", "api/presets", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/presets", "POST", "api/presets", {"name": "m", "model": "tiny-chat"},
     (401, 401, 403, 400, 201, 403, 403, 201, 201, 403)),  # no_model: the preset's model is not theirs
    ("/api/presets/([^/]+)", "GET", "api/presets/m", None, (401, 401, 403, 404, 200, 403, 403, 200, 200, 403)),
    ("/api/presets/([^/]+)", "PATCH", "api/presets/m", {"system_prompt": "s"},
     (401, 401, 403, 404, 200, 403, 403, 200, 200, 403)),
    ("/api/presets/([^/]+)", "PUT", "api/presets/m", {"name": "m", "model": "tiny-chat"},
     (401, 401, 403, 400, 200, 403, 403, 200, 200, 403)),
    ("/api/presets/([^/]+)", "DELETE", "api/presets/m", None, (401, 401, 403, 404, 204, 403, 403, 204, 204, 403)),
    ("/api/collections", "GET", "api/collections", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/collections", "POST", "api/collections", {"name": "m"}, (401, 401, 403, 201, 201, 403, 403, 201, 201, 403)),
    ("/api/collections/([^/]+)", "GET", "api/collections/m", None, (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/collections/([^/]+)/documents", "GET", "api/collections/m/documents", None,
     (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/collections/([^/]+)/documents", "POST", "api/collections/m/documents", {"documents": ["hello world"]},
     (401, 401, 403, 201, 201, 403, 403, 201, 201, 403)),
    ("/api/collections/([^/]+)/search", "POST", "api/collections/m/search", {"query": "hello", "top_k": 1},
     (401, 401, 403, 200, 200, 403, 403, 200, 200, 403)),
    ("/api/collections/([^/]+)/documents/([^/]+)", "DELETE", f"api/collections/m/documents/{NO_KEY}", None,
     (401, 401, 403, 404, 404, 403, 403, 404, 404, 403)),
    ("/api/collections/([^/]+)", "DELETE", "api/collections/m", None,
     (401, 401, 403, 204, 204, 403, 403, 204, 204, 403)),
    ("/api/admin/resources", "GET", "api/admin/resources", None, admin_route(200)),
    ("/api/users/([^/]+)/presets", "GET", "api/users/{victim}/presets", None, admin_route(200)),
    ("/api/users/([^/]+)/presets", "DELETE", "api/users/{victim}/presets", None, admin_route(200)),
    ("/api/users/([^/]+)/presets/([^/]+)", "GET", "api/users/{victim}/presets/none", None, admin_route(404)),
    ("/api/users/([^/]+)/presets/([^/]+)", "DELETE", "api/users/{victim}/presets/none", None, admin_route(404)),
    ("/api/users/([^/]+)/collections", "GET", "api/users/{victim}/collections", None, admin_route(200)),
    ("/api/users/([^/]+)/collections", "DELETE", "api/users/{victim}/collections", None, admin_route(200)),
    ("/api/users/([^/]+)/collections/([^/]+)", "GET", "api/users/{victim}/collections/none", None,
     admin_route(404)),
    ("/api/users/([^/]+)/collections/([^/]+)", "DELETE", "api/users/{victim}/collections/none", None,
     admin_route(404)),
    # Not a route: the fallback handler authenticates (and applies view-as) before its 404.
    (None, "GET", "no/such/route", None, (401, 401, 404, 404, 404, 404, 403, 404, 404, 403)),
]


def implemented(handler) -> list[str]:
    base = APIHandler if issubclass(handler, APIHandler) else web.RequestHandler
    return [m for m in METHODS if getattr(handler, m.lower()) is not getattr(base, m.lower())]


def test_every_route_has_a_row(hub):
    app = hub.instances["postgresql"].app
    routes = {(pattern, method) for pattern, handler in app.routes() for method in implemented(handler)}
    rows = {(pattern, method) for pattern, method, *_ in ROWS if pattern is not None}
    assert routes - rows == set(), "routes without a row in the authorization matrix"
    assert rows - routes == set(), "rows for routes that no longer exist"


def callers(hub, instance) -> tuple[dict[str, dict], dict]:
    """Fresh users for every column, set up through the admin API; returns headers per column and names."""
    api, url = hub.api, instance.url
    admin, other_admin = hub.new_admin(), hub.new_admin()
    names = {c: hub.new_user(c.replace("_", "")) for c in ("no_feature", "no_model", "user", "narrowed", "disabled")}
    names |= {"actee": hub.new_user("actee"), "victim": hub.new_user("victim"), "nonce": secrets.token_hex(4)}
    names["group"] = f"matrix-{names['nonce']}"
    api.add_to_group(names["group"], names["victim"])
    tokens = {c: api.user_token(n) for c, n in names.items() if c in COLUMNS}
    admin_headers = bearer(api.user_token(admin))

    def admin_call(method, path, body=None):
        r = requests.request(method, url + path, headers=admin_headers, json=body, timeout=30)
        assert r.status_code < 300, (path, r.status_code, r.text)

    admin_call("PUT", f"api/users/{names['no_feature']}/grants", {"features": {f: False for f in FEATURES}})
    admin_call("PUT", f"api/users/{names['no_model']}/grants", {"models": {"*": False}})
    admin_call("POST", f"api/users/{names['disabled']}/disable")
    key = requests.post(url + "api/keys", headers=bearer(tokens["narrowed"]), timeout=30,
                        json={"name": "narrow", "features": ["chat"], "models": ["tiny-chat"]})
    assert key.status_code == 201, key.text
    headers = {
        "anonymous": {},
        "garbage": bearer("garbage-" + secrets.token_hex(8)),
        "no_feature": bearer(tokens["no_feature"]),
        "no_model": bearer(tokens["no_model"]),
        "user": bearer(tokens["user"]),
        "narrowed": bearer(key.json()["key"]),
        "disabled": bearer(tokens["disabled"]),
        "admin": admin_headers,
        "as_user": admin_headers | {"X-Inference-Act-As": names["actee"]},
        "as_admin": admin_headers | {"X-Inference-Act-As": other_admin},
    }
    return headers, names


def test_authorization_matrix(hub, instance):
    headers, names = callers(hub, instance)
    wrong = []
    for pattern, method, path, body, expected in ROWS:
        path = path.format(**names)
        for column, status in zip(COLUMNS, expected, strict=True):
            r = requests.request(method, instance.url + path, headers=headers[column], json=body, timeout=60,
                                 allow_redirects=False)
            if r.status_code != status:
                wrong.append(f"{method} {path} as {column}: {r.status_code} (expected {status}) {r.text[:200]}")
            elif status >= 400 and pattern not in ("/oauth_callback", "/"):
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, (method, path, column, error)
    assert not wrong, f"{len(wrong)} cell(s) wrong:\n" + "\n".join(wrong)


@pytest.mark.parametrize("column", ["as_user"])
def test_acting_is_audited_with_both_names(hub, instance, column):
    headers, names = callers(hub, instance)
    admin_headers = headers["admin"]
    r = requests.get(instance.url + "api/me", headers=headers[column])
    assert r.status_code == 200 and r.json()["name"] == names["actee"], r.text
    assert r.json()["acting_admin"] is not None and r.json()["role"] == "user"
    events = requests.get(instance.url + f"api/audit?user={names['actee']}&action=impersonate",
                          headers=admin_headers).json()["events"]
    assert len(events) == 1
    event = events[0]
    assert event["actor"] == r.json()["acting_admin"] and event["acting_as"] == names["actee"]
    assert event["details"] == {"method": "GET", "path": "/" + instance.url.split("/", 3)[3] + "api/me"}
