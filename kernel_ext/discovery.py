"""Find the inference service and the kernel's own Hub token from the variables a Hub-spawned server has.

No key is pasted or created: a single-user server's `JUPYTERHUB_API_TOKEN` is its user's token, and the Hub
gives it its owner's `custom:inference:*` rights (the `server` role lists them; see `hub_config.configure`).
"""

from __future__ import annotations

import os
from typing import NamedTuple
from urllib.parse import quote

import httpx

DEFAULT_SERVICE_NAME = "inference"
TOKEN_VARIABLES = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


class ServiceNotFound(Exception):
    """The service cannot be located from this process's environment; the message is one line."""


class ServiceLocation(NamedTuple):
    base_url: str  # ends in '/', e.g. http://127.0.0.1:8000/services/inference/
    token: str


def find_service(environ: dict[str, str] | None = None, *, timeout: float = 5.0) -> ServiceLocation:
    """Where the service is and the token to call it with.

    The URL, first found wins: `INFERENCE_SERVICE_URL` (set for spawned servers by `hub_config.configure`, or
    by hand); the service's own URL from the Hub's API (when the token may read it); the Hub's public URL
    (`JUPYTERHUB_PUBLIC_HUB_URL`) + `services/<INFERENCE_SERVICE_NAME>/`.
    """
    env = os.environ if environ is None else environ
    token = next((env[v] for v in TOKEN_VARIABLES if env.get(v)), "")
    if not token:
        raise ServiceNotFound("Not in a JupyterHub server: JUPYTERHUB_API_TOKEN is not set.")
    name = env.get("INFERENCE_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    url = env.get("INFERENCE_SERVICE_URL") or _ask_hub(env, name, token, timeout) or _from_public_url(env, name)
    if not url:
        raise ServiceNotFound(
            f"Cannot locate the '{name}' service: set INFERENCE_SERVICE_URL to its URL "
            f"(e.g. http://127.0.0.1:8000/services/{name}/)."
        )
    return ServiceLocation(url.rstrip("/") + "/", token)


def _ask_hub(env, name: str, token: str, timeout: float) -> str | None:
    """The service's URL from `GET <hub api>/services/<name>`, or None when the Hub will not say."""
    api_url = env.get("JUPYTERHUB_API_URL")
    if not api_url:
        return None
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/services/{quote(name, safe='')}",
                             headers={"Authorization": f"token {token}"}, timeout=timeout)
        model = response.json() if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(model, dict) or not model.get("url") or not model.get("prefix"):
        return None  # the token may see the name only (no read:services)
    return model["url"].rstrip("/") + model["prefix"]


def _from_public_url(env, name: str) -> str | None:
    """`<public hub url without hub/>services/<name>/`; the Hub sets the variable when `public_url` is set."""
    hub_url = (env.get("JUPYTERHUB_PUBLIC_HUB_URL") or "").rstrip("/")
    if not hub_url.endswith("/hub"):
        return None
    return f"{hub_url[:-len('hub')]}services/{quote(name, safe='')}/"
