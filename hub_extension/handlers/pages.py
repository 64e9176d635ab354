"""The account page browser users reach from the Hub's Services menu.

A page, not an API: without a Hub login it redirects to the Hub's OAuth login (APIs answer 401 instead).
It renders only the shell, in the Hub's look (its stylesheet, navigation bar and dark mode); the keys are
listed, made and revoked by the page's script through `/api/keys` with the Hub's XSRF token, so there is one
way to do each thing.
"""

from __future__ import annotations

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from jupyterhub.utils import get_browser_protocol
from tornado import web

from ..errors import ApiError, Unauthorized

# The page's own script and styles and the Hub's (same origin through the proxy), no framing by any site (clickjacking).
# `data:` images: the Hub's Bootstrap stylesheet draws its icons (the navbar toggler) as inline SVG.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; style-src 'unsafe-inline' 'self'; script-src 'unsafe-inline' 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)
# The Hub OAuth cookie and its state cookie: Lax, since the Hub's redirects back to `/oauth_callback` and then to
# the page are top-level navigations. HubOAuth already makes both HttpOnly, and Secure when the browser is on https.
OAUTH_COOKIE_OPTIONS = {"samesite": "Lax"}
# `_xsrf`: only the page's own same-origin requests need it, and its script gets the token in the page, not
# from the cookie.
XSRF_COOKIE_OPTIONS = {"samesite": "Strict", "httponly": True}


def configure_hub_auth(hub_auth) -> None:
    """Attributes of the cookies HubOAuth sets (options given by the Hub, $JUPYTERHUB_COOKIE_OPTIONS, win)."""
    hub_auth.cookie_options = {**OAUTH_COOKIE_OPTIONS, **hub_auth.cookie_options}


def tornado_settings() -> dict:
    """Settings for the tornado Application: the attributes of the `_xsrf` cookie, wherever it is set."""
    return {"xsrf_cookie_kwargs": dict(XSRF_COOKIE_OPTIONS)}


class _Page:
    """What both page handlers share: this app's HubOAuth, anti-framing headers, Secure cookies on https."""

    def initialize(self) -> None:
        # JupyterHub's mixins default to a process-wide HubOAuth singleton; use this app's.
        self.hub_auth = self.settings["hub_auth"]

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Frame-Options", "DENY")

    def set_cookie(self, name, value, *args, **kwargs) -> None:
        """Secure when the browser reached the Hub over https, by JupyterHub's test of that (HubOAuth applies
        it to its own cookies, not to `_xsrf`, whose settings are fixed at start)."""
        if get_browser_protocol(self.request) == "https":
            kwargs["secure"] = True
        super().set_cookie(name, value, *args, **kwargs)


class OAuthCallbackHandler(_Page, HubOAuthCallbackHandler):
    """Where the Hub sends the browser back after login (public by nature: it completes the login)."""


class AccountPageHandler(_Page, HubOAuthenticated, web.RequestHandler):
    async def prepare(self) -> None:
        if self.request.query_arguments.keys() & {"token", "api_key"}:
            raise web.HTTPError(401, "Credentials in the URL are refused.")
        self._hub_user = await self.hub_auth.get_user(self, sync=False)
        if not self._hub_user:
            self.redirect(self.get_login_url())
            return
        # The same check as every API request: the identity provider decides who may use the service.
        try:
            await self.settings["services"].identity.hub_identity(self._hub_user, via="hub_cookie")
        except Unauthorized:  # the Hub no longer has this user, or blocks them
            raise web.HTTPError(403, "Your account is blocked; ask an administrator.") from None
        except ApiError as e:  # disabled, awaiting approval, or a Hub login without access to this service
            raise web.HTTPError(403, e.message) from None

    def get_current_user(self):
        return getattr(self, "_hub_user", None)

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        base = self.settings["service_base_url"]
        self.render(
            "account.html",
            user=self._hub_user["name"],
            admin=bool(self._hub_user.get("admin")),
            base=base,
            # The Hub's own pages and static files (stylesheet, navigation bar script, dark mode), so the page
            # looks like part of the Hub; same origin through the proxy, so the CSP's 'self' allows them.
            hub=self.hub_auth.hub_host + self.hub_auth.hub_prefix,
            service=base.rstrip("/").rpartition("/")[2] or "inference",
            xsrf=self.xsrf_token.decode() if isinstance(self.xsrf_token, bytes) else self.xsrf_token,
        )


routes = [(r"/", AccountPageHandler), (r"/oauth_callback", OAuthCallbackHandler)]
