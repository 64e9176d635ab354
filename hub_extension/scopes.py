"""The names the Hub and the service share: features, `custom:inference:*` scopes, admin-level Hub scopes.

One home for them: `hub_config.py` (run inside the Hub process) declares them to the Hub, `permissions.py` and
`identity.py` read them back from credentials. Pure data and pure functions, so the Hub imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Iterable

FEATURES = ("chat", "completions", "embeddings", "keys", "usage", "resources")
SCOPE_PREFIX = "custom:inference:"
MODEL_SCOPE_PREFIX = "custom:inference:model:"
ANY_MODEL = "*"
ADMIN_SCOPE = "custom:inference:admin"
METRICS_SCOPE = "custom:inference:metrics"  # read /metrics without administering anything (a scraper's role)
# A Hub credential carrying one of these administers the service. `admin:users` is what makes a Hub token an
# administrator's; `admin-ui` is the Hub-admin-only scope the service's OAuth client may request, so a Hub
# admin's browser login (whose token holds only the scopes that client may ask for) is an admin's too.
ADMIN_LEVEL_HUB_SCOPES = frozenset({ADMIN_SCOPE, "admin:users", "admin-ui"})


def feature_scope(feature: str) -> str:
    return f"{SCOPE_PREFIX}{feature}"


def model_scope(model: str) -> str:
    return f"{MODEL_SCOPE_PREFIX}{model}"


def inference_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Only the `custom:inference:*` scopes of a set (what permissions read)."""
    return frozenset(s for s in scopes if s.startswith(SCOPE_PREFIX))


def scopes_from_roles(roles: Iterable[dict], role_names: Iterable[str], groups: Iterable[str]) -> frozenset[str]:
    """The `custom:inference:*` scopes granted by the Hub roles a user holds directly or through a group.

    The Hub has no API that lists a role's scopes, so the service is handed the same `load_roles` list the
    Hub is configured with; which roles a user holds and which groups they are in come live from the Hub.
    """
    held, member_of = set(role_names), set(groups)
    scopes: set[str] = set()
    for role in roles:
        if role.get("name") in held or member_of.intersection(role.get("groups") or ()):
            scopes.update(role.get("scopes") or ())
    return inference_scopes(scopes)
