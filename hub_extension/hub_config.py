"""Helpers for `jupyterhub_config.py`: the service entry, its role, the custom scopes and the users' access.

Runs inside the Hub process: it must not import the engine or the database layer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .scopes import (
    ADMIN_SCOPE,
    ANY_MODEL,
    FEATURES,
    METRICS_SCOPE,
    MODEL_SCOPE_PREFIX,
    feature_scope,
    model_scope,
)

SERVICE_NAME = "inference"
# A `python3` kernelspec that loads `kernel_ext` (`--InteractiveShellApp.extra_extensions`), shipped with the
# package; spawned servers find it first through JUPYTER_PATH. Located without importing kernel_ext.
KERNELSPEC_PATH = Path(__file__).resolve().parent.parent / "kernel_ext" / "share"
# The example notebooks (`notebooks/*.ipynb`) each user finds in their file browser (`example_notebooks_hook`).
NOTEBOOKS_PATH = Path(__file__).resolve().parent.parent / "notebooks"

CUSTOM_SCOPES = {
    ADMIN_SCOPE: {"description": "Administer the inference service: users, keys, grants, audit."},
    METRICS_SCOPE: {"description": "Read the inference service's Prometheus metrics."},
    **{
        feature_scope(feature): {"description": f"Use the inference service's '{feature}' feature."}
        for feature in FEATURES
    },
    model_scope(ANY_MODEL): {"description": "Use every model of the inference service."},
}
# Requested by the service's OAuth client besides its own scopes: the Hub-admin-only scope that tells the service
# a browser login is a Hub admin's (see scopes.ADMIN_LEVEL_HUB_SCOPES). It lets the holder open the Hub's admin page
# and nothing else.
HUB_ADMIN_MARKER_SCOPE = "admin-ui"


def model_scopes(roles: list[dict] | None) -> dict[str, dict]:
    """Definitions for the `custom:inference:model:<name>` scopes the roles use (the Hub needs each defined).

    The Hub allows only lowercase letters, digits, `-`, `_` and `*` in scope names: a model whose name has
    other characters is granted through database grants instead.
    """
    names = {s for r in roles or () for s in r.get("scopes") or () if s.startswith(MODEL_SCOPE_PREFIX)}
    return {s: {"description": f"Use the inference model '{s[len(MODEL_SCOPE_PREFIX):]}'."} for s in sorted(names)}

# The least the service needs from the Hub: look users up (name, admin flag, groups, roles).
SERVICE_SCOPES = ["list:users", "read:users", "read:roles:users", "read:groups"]


def access_scope(service: str = SERVICE_NAME) -> str:
    return f"access:services!service={service}"


def configure(
    c,
    *,
    port: int = 8010,
    db_url: str | None = None,
    models_config: str | None = None,
    config_file: str | os.PathLike | None = None,
    roles: list[dict] | None = None,
    service_name: str = SERVICE_NAME,
    environment: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    load_kernel_extension: bool = True,
    registration_mode: str = "open",
) -> dict:
    """Add the inference service to a Hub config `c`; returns the service entry.

    `roles` are extra Hub roles (config as code), e.g. a role that gives a group
    `custom:inference:embeddings`. They are added to `c.JupyterHub.load_roles` *and* handed to the service,
    which cannot otherwise learn which scopes a role holds.

    `registration_mode` (open | approval | invite, as the login's `RegistrationMixin.registration_mode`): in
    approval and invite modes a user the service sees first (through the API) is pending too, never active.

    `load_kernel_extension`: spawned servers' Python kernels load `kernel_ext` (so `%%chat` and the OpenAI
    variables work with no setup), and are told the service's URL (`INFERENCE_SERVICE_URL`: its own address,
    right for servers on this host; set `c.Spawner.environment` yourself for others).
    """
    extra_scopes = {s: d for s, d in model_scopes(roles).items() if s not in CUSTOM_SCOPES}
    c.JupyterHub.custom_scopes = {**_get(c, "custom_scopes", {}), **CUSTOM_SCOPES, **extra_scopes}
    inference_scopes = sorted({*CUSTOM_SCOPES, *extra_scopes})
    all_roles = [
        {"name": f"{service_name}-service", "services": [service_name], "scopes": SERVICE_SCOPES},
        # Every user may reach the service (the default `user` role is only `self`).
        {"name": "user", "scopes": ["self", access_scope(service_name)]},
        # A kernel's token may call the service as its user, with its user's inference rights: the Hub grants a
        # server's token only the requested scopes its owner holds, so listing all of them here gives exactly those.
        {"name": "server", "scopes": [
            "users:activity!user", "access:servers!server", access_scope(service_name), *inference_scopes,
        ]},
        *(roles or []),
    ]
    ours = {r["name"] for r in all_roles}
    existing = [r for r in _get(c, "load_roles", []) if r["name"] not in ours]
    c.JupyterHub.load_roles = existing + all_roles
    env = {
        "INFERENCE_HUB_ROLES": json.dumps([r for r in all_roles if r.get("scopes")]),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
        "PYTHONUNBUFFERED": "1",
        **(environment or {}),
    }
    hub_url = _get(c, "public_url", "") or _get(c, "bind_url", "")
    if hub_url:  # invitation links point there (InferenceService.hub_public_url)
        env.setdefault("INFERENCE_HUB_PUBLIC_URL", hub_url)
    if db_url:
        env["INFERENCE_DB_URL"] = db_url
    if models_config:
        env["INFERENCE_MODELS_CONFIG"] = str(models_config)
    if config_file:
        env["INFERENCE_CONFIG"] = str(config_file)
    for name in ("PATH", "HOME", "HF_HOME", "TRANSFORMERS_CACHE", "INFERENCE_LOG_LEVEL", "INFERENCE_STATE_DIR"):
        if name in os.environ:
            env.setdefault(name, os.environ[name])
    if registration_mode not in ("open", "approval", "invite"):
        raise ValueError(f"registration_mode must be open, approval or invite, not {registration_mode!r}")
    if registration_mode != "open":
        extra_args = [*(extra_args or []), "--UserDirectory.new_user_status=pending"]
    service = {
        "name": service_name,
        "url": f"http://127.0.0.1:{port}",
        "command": [sys.executable, "-m", "hub_extension", "serve", *(extra_args or [])],
        "environment": env,
        "oauth_no_confirm": True,
        "oauth_client_allowed_scopes": sorted({*inference_scopes, HUB_ADMIN_MARKER_SCOPE}),
        "display": True,
    }
    services = [s for s in _get(c, "services", []) if s.get("name") != service_name]
    c.JupyterHub.services = services + [service]
    if load_kernel_extension:
        _load_kernel_extension(c, service_name, f"{service['url']}/services/{service_name}/")
    return service


def _load_kernel_extension(c, service_name: str, service_url: str) -> None:
    """Spawned servers' kernels load `kernel_ext` and find the service; what the admin set already wins."""
    spawner_env = dict(c.Spawner.environment) if "environment" in c.Spawner else {}
    path = [str(KERNELSPEC_PATH), *filter(None, str(spawner_env.get("JUPYTER_PATH", "")).split(os.pathsep))]
    c.Spawner.environment = {
        "INFERENCE_SERVICE_NAME": service_name,
        "INFERENCE_SERVICE_URL": service_url,
        **spawner_env,
        "JUPYTER_PATH": os.pathsep.join(dict.fromkeys(path)),
    }


def _get(c, name: str, empty):
    """A JupyterHub setting already in `c`, or `empty` (unset settings are lazy placeholders)."""
    return c.JupyterHub[name] if name in c.JupyterHub else empty


def example_notebooks_hook(root: str | os.PathLike, notebooks: str | os.PathLike = NOTEBOOKS_PATH):
    """A `Spawner.pre_spawn_hook`: each user's server opens in `<root>/<user name>`, which holds the example
    notebooks. A notebook already there is the user's copy (perhaps edited): it is never overwritten."""
    root = Path(root).resolve()

    def copy_example_notebooks(spawner) -> None:
        directory = (root / spawner.user.name).resolve()
        if directory.parent != root:  # a name such as '..' must not lead out of `root`
            raise ValueError(f"user name {spawner.user.name!r} is not usable as a directory name")
        directory.mkdir(parents=True, exist_ok=True)
        for source in sorted(Path(notebooks).glob("*.ipynb")):
            target = directory / source.name
            if not target.exists():
                shutil.copyfile(source, target)
        spawner.notebook_dir = str(directory)

    return copy_example_notebooks
