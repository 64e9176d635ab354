"""Login through GitHub or any OpenID Connect provider, under the registration policy of `RegistrationMixin`.

The provider classes only say who someone is and which e-mail addresses the provider vouches for
(`verified_emails`); the mixin decides who gets in, who is pending and who is admin, the same way for every
provider. Neither class ever makes an admin from a user name (the mixin refuses `admin_users` for them).
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from urllib.parse import urlsplit

from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.github import GitHubOAuthenticator
from oauthenticator.oauth2 import OAuthCallbackHandler
from tornado import web
from tornado.httpclient import HTTPClientError
from traitlets import Float, Integer, Unicode, default, validate

from .registration import RegistrationMixin

# Bounds on what a provider may hand us (a claim is input like any other).
MAX_GROUPS = 200
MAX_GROUP_NAME = 255  # the Hub's group name column
MAX_DISCOVERY_BYTES = 1_000_000


class ProviderError(RuntimeError):
    """The provider could not be used: at start, the Hub refuses to start with this message."""


class ProviderCallbackHandler(OAuthCallbackHandler):
    """oauthenticator's callback, with a page that says what went wrong when the provider refused the sign-in."""

    def check_error(self):
        error = self.get_argument("error", "")
        if error:
            description = self.get_argument("error_description", "")[:300] or error[:100]
            raise web.HTTPError(
                403,
                f"Signing in with {self.authenticator.login_service} did not complete: {description}. "
                "You can try again from the login page.",
            )


class ProviderLoginMixin:
    """What GitHub and OIDC logins share: a clear page when the provider fails in the middle of a login."""

    callback_handler = ProviderCallbackHandler

    async def authenticate(self, handler, data=None, **kwargs):
        try:
            return await super().authenticate(handler, data, **kwargs)
        except HTTPClientError as e:  # the provider answered an error, or did not answer (599)
            self.log.warning("%s login failed at the provider: %s", self.provider, e)
            problem = "could not be reached" if e.code == 599 else f"answered an error ({e.code})"
            raise web.HTTPError(
                502,
                f"{self.login_service} {problem} while signing you in. Please try again in a moment; "
                "if it keeps failing, tell the Hub's administrators.",
            ) from None
        except OSError as e:  # connection refused, DNS...
            self.log.warning("%s login failed at the provider: %s", self.provider, e)
            raise web.HTTPError(
                502,
                f"{self.login_service} could not be reached while signing you in. Please try again in a moment.",
            ) from None


class GitHubLogin(ProviderLoginMixin, RegistrationMixin, GitHubOAuthenticator):
    """Login with GitHub (or GitHub Enterprise Server through `github_url`).

    Admin e-mails count only for the account's primary e-mail, and only when GitHub marks it verified (read from
    the `/user/emails` API, which needs the `user:email` scope). `allowed_organizations` (organisations or
    `org:team`) restricts who may sign in at all, before the registration mode is considered.
    """

    provider = "github"

    @default("scope")
    def _scope_default(self):
        # read:org: private organisation memberships count too, not only public ones.
        return ["read:user", "user:email", *(["read:org"] if self.allowed_organizations else [])]

    @validate("scope")
    def _scope_has_email(self, proposal):
        if not set(proposal.value) & {"user", "user:email"}:
            raise ValueError("GitHubLogin.scope must include 'user:email': admin e-mails need GitHub's verified e-mail")
        return proposal.value

    async def update_auth_model(self, auth_model):
        """Restrict to the allowed organisations, then record the verified primary e-mail in the auth state."""
        auth_model = await super().update_auth_model(auth_model)
        state = auth_model["auth_state"]
        token = state["token_response"]
        if self.allowed_organizations and not await self._in_allowed_organization(auth_model["name"], token):
            orgs = ", ".join(sorted(self.allowed_organizations))
            raise web.HTTPError(
                403,
                f"Your GitHub account {auth_model['name']} is not a member of an organisation allowed on this Hub "
                f"({orgs}). Ask an organisation owner to add you, then sign in again.",
            )
        state["verified_emails"] = await self._verified_primary_email(state, token)
        return auth_model

    def verified_emails(self, auth_model: dict) -> set[str]:
        return set((auth_model.get("auth_state") or {}).get("verified_emails") or ())

    async def _in_allowed_organization(self, username: str, token: dict) -> bool:
        for org_team in sorted(self.allowed_organizations):
            if await self._check_membership_allowed_organizations(
                org_team, username, token["access_token"], token["token_type"]
            ):
                return True
        self.log.warning("GitHub user %s is not in any allowed organisation", username)
        return False

    async def _verified_primary_email(self, state: dict, token: dict) -> list[str]:
        # GitHub separates granted scopes with commas, oauthenticator splits them on spaces: accept both.
        granted = {s for part in state.get("scope") or () for s in part.replace(",", " ").split()}
        if not granted & {"user", "user:email"}:
            self.log.warning("GitHub did not grant the user:email scope: no verified e-mail for admin e-mails")
            return []
        response = await self.httpfetch(
            f"{self.github_api}/user/emails",
            "fetching the user's e-mails",
            parse_json=False,
            raise_error=False,
            method="GET",
            headers=self.build_userdata_request_headers(token["access_token"], token["token_type"]),
            validate_cert=self.validate_server_cert,
        )
        try:
            emails = json.loads(response.body) if response.code == 200 else None
        except ValueError:
            emails = None
        if emails is None:  # the login goes on, without admin by e-mail
            self.log.warning("GitHub /user/emails answered %s: no verified e-mail for this login", response.code)
        for entry in emails if isinstance(emails, list) else ():
            if isinstance(entry, dict) and entry.get("primary") is True and entry.get("verified") is True:
                email = entry.get("email")
                return [email.strip().lower()] if isinstance(email, str) and email.strip() else []
        return []


class OIDCLogin(ProviderLoginMixin, RegistrationMixin, GenericOAuthenticator):
    """Login with any OpenID Connect provider (Keycloak, Authentik, Entra ID, Google, Okta...).

    The endpoints come from the issuer's discovery document, read once when the Hub starts: an unreachable
    provider or a wrong issuer stops the Hub with a message that names the issuer, instead of a Hub whose login
    routes silently do not work. The `email` claim counts for admin e-mails only when `email_verified` is true.
    Groups from `groups_claim` become the user's Hub groups at each login (`manage_groups`), which feed the
    roles (and so the inference permissions) configured for those groups.
    """

    provider = "oidc"

    issuer = Unicode(
        "",
        config=True,
        help="""The provider's issuer URL (e.g. https://keycloak.example.org/realms/main).

        `<issuer>/.well-known/openid-configuration` is read at start; its `issuer` must equal this value
        (OpenID Connect Discovery 1.0, section 4.3), and it gives the authorize, token and userinfo endpoints.
        """,
    )
    groups_claim = Unicode(
        "groups",
        config=True,
        help="""The userinfo claim that lists the user's groups (a dotted path reaches into nested claims,
        e.g. `realm_access.roles`). Its values become the user's Hub groups at each login. Empty: no groups.""",
    )
    discovery_timeout = Float(
        10.0, config=True, help="Seconds to wait for the discovery document at start before refusing to start."
    )
    max_groups = Integer(MAX_GROUPS, config=True, help="At most this many groups are taken from the claim.")

    @default("login_service")
    def _login_service_default(self):
        return "OpenID Connect"

    @default("scope")
    def _scope_default(self):
        return ["openid", "email", "profile"]

    @default("username_claim")
    def _username_claim_default(self):
        return "preferred_username"

    @default("manage_groups")
    def _manage_groups_default(self):
        return bool(self.groups_claim)

    @validate("issuer")
    def _issuer_is_url(self, proposal):
        parts = urlsplit(proposal.value)
        if proposal.value and (parts.scheme not in ("http", "https") or not parts.netloc or parts.query):
            raise ValueError(f"OIDCLogin.issuer must be an http(s) URL without a query, not {proposal.value!r}")
        return proposal.value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.discover()

    def discover(self) -> dict:
        """Read the issuer's discovery document and take the endpoints from it; a `ProviderError` if we cannot.

        Runs once at start, before the Hub serves anything, so a blocking read (bounded by
        `discovery_timeout`) holds nothing up.
        """
        if not self.issuer:
            raise ProviderError("OIDCLogin.issuer is not set (OIDC_ISSUER): the Hub cannot offer OIDC login")
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=self.discovery_timeout, context=self._ssl_context()) as r:
                document = json.loads(r.read(MAX_DISCOVERY_BYTES + 1)[:MAX_DISCOVERY_BYTES])
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, bad JSON
            raise ProviderError(
                f"OIDC discovery failed for issuer {self.issuer} ({url}): {e}. "
                "The Hub does not start without its login provider: check OIDC_ISSUER and that the provider is up."
            ) from None
        if not isinstance(document, dict):
            raise ProviderError(f"OIDC discovery for issuer {self.issuer}: {url} is not a JSON object")
        if str(document.get("issuer", "")).rstrip("/") != self.issuer.rstrip("/"):
            raise ProviderError(
                f"OIDC discovery for issuer {self.issuer}: the provider calls itself {document.get('issuer')!r}; "
                "set OIDC_ISSUER to exactly the provider's issuer"
            )
        endpoints = {}
        for trait, key in (("authorize_url", "authorization_endpoint"), ("token_url", "token_endpoint"),
                           ("userdata_url", "userinfo_endpoint")):
            value = document.get(key)
            if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
                raise ProviderError(f"OIDC discovery for issuer {self.issuer}: no valid {key} in {url}")
            endpoints[trait] = value
        for trait, value in endpoints.items():
            setattr(self, trait, value)
        self.log.info("OIDC provider %s: endpoints read from its discovery document", self.issuer)
        return document

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.issuer.startswith("https:"):
            return None
        if not self.validate_server_cert:
            return ssl._create_unverified_context()  # OAUTH_TLS_VERIFY=0: the admin's explicit choice
        return ssl.create_default_context(cafile=self.http_request_kwargs.get("ca_certs"))

    def user_info_to_username(self, user_info):
        """The `username_claim` claim; a clear page, not a 500, when the provider does not send it."""
        if callable(self.username_claim):
            return super().user_info_to_username(user_info)
        name = user_info.get(self.username_claim)
        if not isinstance(name, str) or not name.strip():
            raise web.HTTPError(
                502,
                f"{self.login_service} did not send the '{self.username_claim}' claim this Hub uses as the user "
                "name (OIDC_USERNAME_CLAIM): sign-in refused. Tell the Hub's administrators.",
            )
        return name.strip()

    async def get_user_groups(self, auth_state: dict) -> set[str]:
        return self.groups_from_claims(auth_state.get(self.user_auth_state_key) or {})

    def groups_from_claims(self, user_info: dict) -> set[str]:
        """The groups claim as Hub group names: strings only, bounded in length and number."""
        value = user_info
        for part in self.groups_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            self.log.warning("OIDC claim %s is missing (does OIDC_SCOPES release it?): no groups", self.groups_claim)
            return set()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.log.warning("OIDC claim %s is not a list of groups; ignored", self.groups_claim)
            return set()
        groups = {g.strip() for g in value if isinstance(g, str) and 0 < len(g.strip()) <= MAX_GROUP_NAME}
        if len(groups) > self.max_groups:
            self.log.warning("OIDC claim %s lists %d groups; keeping %d", self.groups_claim, len(groups), self.max_groups)
            groups = set(sorted(groups)[: self.max_groups])
        return groups

    def verified_emails(self, auth_model: dict) -> set[str]:
        """The `email` claim, only when the provider says it verified it (`email_verified` true)."""
        user_info = (auth_model.get("auth_state") or {}).get(self.user_auth_state_key) or {}
        email, verified = user_info.get("email"), user_info.get("email_verified")
        if isinstance(email, str) and email.strip() and (verified is True or verified == "true"):
            return {email.strip().lower()}
        return set()
