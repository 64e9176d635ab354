"""Rendering the login pages with the Hub's own templates, so they look like the rest of the Hub.

Our templates (`templates/`) extend the Hub's `page.html` / `login.html`; they are found first, then the Hub's
(its loader, with any `c.JupyterHub.template_paths`), in an overlay of the Hub's own Jinja environment.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader

TEMPLATES = Path(__file__).with_name("templates")
_overlays: dict[int, Environment] = {}


def environment(hub_env: Environment) -> Environment:
    overlay = _overlays.get(id(hub_env))
    if overlay is None:
        overlay = _overlays[id(hub_env)] = hub_env.overlay(
            loader=ChoiceLoader([FileSystemLoader(str(TEMPLATES)), hub_env.loader])
        )
    return overlay


def render(handler, name: str, sync: bool = False, **ns):
    """Render one of our templates with the Hub's namespace (user, URLs, static files, XSRF token): awaitable,
    or a string with `sync` (the Hub renders error pages synchronously, as `BaseHandler.render_template`)."""
    namespace = {**handler.template_namespace, "xsrf_token": handler.xsrf_token.decode("ascii"), **ns}
    if sync:
        return environment(handler.settings["jinja2_env_sync"]).get_template(name).render(**namespace)
    return environment(handler.settings["jinja2_env"]).get_template(name).render_async(**namespace)
