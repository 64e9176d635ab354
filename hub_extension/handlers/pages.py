"""The account page browser users reach from the Hub's Services menu.

A page, not an API: without a Hub login it redirects to the Hub's OAuth login (APIs answer 401 instead).
It renders only the shell; the keys are listed, made and revoked by the page's script through `/api/keys`
with the Hub's XSRF token, so there is one way to do each thing.
"""

from __future__ import annotations

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from ..orm import UserStatus


class _AppHubAuth:
    """Use this app's HubOAuth (JupyterHub's mixins default to a process-wide singleton)."""

    def initialize(self) -> None:
        self.hub_auth = self.settings["hub_auth"]


class OAuthCallbackHandler(_AppHubAuth, HubOAuthCallbackHandler):
    """Where the Hub sends the browser back after login (public by nature: it completes the login)."""


class AccountPageHandler(_AppHubAuth, HubOAuthenticated, web.RequestHandler):
    async def prepare(self) -> None:
        if self.request.query_arguments.keys() & {"token", "api_key"}:
            raise web.HTTPError(401, "Credentials in the URL are refused.")
        self._hub_user = await self.hub_auth.get_user(self, sync=False)
        if not self._hub_user:
            self.redirect(self.get_login_url())
            return
        access = self.hub_auth.access_scopes
        if access and not self.hub_auth.check_scopes(access, self._hub_user):
            raise web.HTTPError(403, "Your Hub account has no access to the inference service.")
        state = await self.settings["services"].users.seen_from_hub(self._hub_user)
        if not state.in_hub or state.status != UserStatus.ACTIVE:
            reason = "blocked" if not state.in_hub else state.status
            raise web.HTTPError(403, f"Your account is {reason}; ask an administrator.")

    def get_current_user(self):
        return getattr(self, "_hub_user", None)

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline' 'self'; script-src 'unsafe-inline' 'self'")
        self.render(
            "account.html",
            user=self._hub_user["name"],
            base=self.settings["service_base_url"],
            xsrf=self.xsrf_token.decode() if isinstance(self.xsrf_token, bytes) else self.xsrf_token,
        )


routes = [(r"/", AccountPageHandler), (r"/oauth_callback", OAuthCallbackHandler)]
