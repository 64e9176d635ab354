"""`GET /metrics`: Prometheus' text format, for whom `Metrics.auth` allows (an admin by default)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import Forbidden
from ..scopes import METRICS_SCOPE
from .base import APIHandler, Auth


class MetricsHandler(APIHandler):
    """An admin's credential or one carrying `custom:inference:metrics` (e.g. a Prometheus service registered with
    the Hub), or with `Metrics.auth` = `token` the scraper's token (no user behind it)."""

    auth = Auth.USER

    async def prepare(self) -> None:
        if self.services.metrics.token_matches(self.request.headers):
            self.auth = Auth.PUBLIC  # for this request only: the token was the credential
        await super().prepare()
        if self.auth is Auth.USER and not (
            self.identity.is_admin or METRICS_SCOPE in self.services.permissions.scopes_for(self.identity)
        ):
            raise Forbidden("Reading metrics needs an administrator or the custom:inference:metrics scope.")

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.services.metrics.exposition())


class PublicMetricsHandler(MetricsHandler):
    """With `Metrics.auth` = `public` only: the app then routes this one and lists `/metrics` as public."""

    auth = Auth.PUBLIC


routes = [(r"/metrics", MetricsHandler)]
public_routes = [(r"/metrics", PublicMetricsHandler)]
