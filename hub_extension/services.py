"""The components one running service is made of, handed to every handler as `settings["services"]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .api_keys import KeyManager
from .audit import AuditLog
from .db import Database
from .identity import IdentityProvider
from .permissions import PermissionPolicy
from .users import UserDirectory


@dataclass
class Services:
    db: Database
    keys: KeyManager
    users: UserDirectory
    audit: AuditLog
    permissions: PermissionPolicy
    identity: IdentityProvider
    hub: Any = None  # users.HubUsers: the Hub's REST API (None outside `hub` mode)
    admin: Any = None  # administration.UserAdmin
    models: Any = None  # engine.ModelManager
    usage: Any = None  # usage.UsageRecorder
    quotas: Any = None  # quotas.QuotaPolicy
    metrics: Any = None  # metrics.Metrics
    presets: Any = None  # presets.PresetStore
    knowledge: Any = None  # knowledge.KnowledgeBase
    max_body_bytes: int = 8 * 1024 * 1024
    trusted_proxies: tuple = ()  # net.parse_networks(InferenceService.trusted_proxies)
    hub_public_url: str = ""  # InferenceService.hub_public_url: where invitation links point
    usage_sinks: list = field(default_factory=list)
    # Set on SIGTERM: requests in flight may finish (InferenceService.shutdown_grace_seconds), new ones get 503.
    stopping: bool = False
    in_flight: set = field(default_factory=set)  # the API handlers between prepare() and their end

    def record_usage(self, event: dict) -> None:
        """The seam for usage metering: handlers hand every request's event here (no I/O on this path)."""
        for sink in self.usage_sinks:
            sink(event)
