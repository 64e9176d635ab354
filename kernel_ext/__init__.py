"""IPython extension (`%load_ext kernel_ext`): the notebook side of jupyterhub-inference.

In a kernel of a Hub-spawned server it finds the service and the kernel's own Hub token (no key to paste), sets
`OPENAI_BASE_URL` and `OPENAI_API_KEY` so any OpenAI-compatible library works, and registers `%%chat`,
`%models` and `%usage`. It reaches the service over HTTP only and never imports `hub_extension` (a kernel needs
the openai SDK, not torch or SQLAlchemy).
"""

from __future__ import annotations

import os

from .discovery import ServiceLocation, ServiceNotFound, find_service
from .service_api import InferenceClient, InferenceError

__all__ = ["InferenceClient", "InferenceError", "ServiceLocation", "ServiceNotFound", "client", "find_service", "load_ipython_extension"]


def client():
    """A real `openai.OpenAI` client for the service, with the kernel's token."""
    from .magics import openai_client

    return openai_client()


def load_ipython_extension(ip) -> None:
    """Register the magics and point OpenAI clients at the service; say what was done in one line."""
    from .magics import PREFIX, InferenceMagics

    ip.register_magics(InferenceMagics)
    try:
        location = find_service()
    except ServiceNotFound as e:
        print(f"{PREFIX}{e}")
        return
    os.environ["OPENAI_BASE_URL"] = location.base_url + "v1"
    os.environ["OPENAI_API_KEY"] = location.token
    try:
        me = InferenceClient(*location, timeout=5).me()  # short: it may run as a kernel starts
    except InferenceError as e:
        print(f"{PREFIX}the service at {location.base_url} did not answer as expected: {e.message}")
        return
    print(f"{PREFIX}{location.base_url} as {me['name']}; OPENAI_BASE_URL and OPENAI_API_KEY are set; "
          "magics: %%chat, %models, %usage.")
