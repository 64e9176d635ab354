"""Who may use which feature and which model: the one permission hook every handler asks.

Synchronous on purpose: it reads an in-memory snapshot, so the hot path never waits on the database.
"""

from __future__ import annotations

from .errors import BadRequest
from .identity import Identity

FEATURES = ("chat", "completions", "embeddings", "keys", "usage", "resources")


class PermissionPolicy:
    def __init__(self, feature_defaults: dict[str, bool] | None = None):
        self.feature_defaults = {f: True for f in FEATURES} | (feature_defaults or {})

    def allowed(self, identity: Identity, feature: str, model: str | None = None) -> bool:
        if identity.via in ("none", "static_key"):
            return True
        if identity.key_features is not None and feature not in identity.key_features:
            return False
        if model is not None and identity.key_models is not None and model not in identity.key_models:
            return False
        return self.feature_defaults.get(feature, False)

    def visible_models(self, identity: Identity, names: list[str]) -> list[str]:
        return [n for n in names if identity.key_models is None or n in identity.key_models]

    def check_key_narrowing(self, identity: Identity, fields: dict) -> None:
        """A new key may only narrow what its creator may do now, never widen it."""
        features = fields.get("features")
        if features is not None:
            denied = [f for f in features if not self.allowed(identity, f)]
            if denied:
                raise BadRequest(f"You may not grant feature(s) you lack: {', '.join(denied)}.", param="features")
