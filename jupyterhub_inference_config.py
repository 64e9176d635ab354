"""The inference service's settings for `make demo`; the service (started by the Hub) and the admin commands
(`jupyterhub-inference users list`, ...) both read this file, so they open the same database.

Run the commands from this folder, or point them at it from anywhere with
`INFERENCE_CONFIG=/path/to/jupyterhub_inference_config.py`. Every class's settings: `jupyterhub-inference --help-all`.
"""

import os
from pathlib import Path

here = Path(__file__).resolve().parent
state = Path(os.environ.get("INFERENCE_STATE_DIR", here / "var"))

c = get_config()  # noqa: F821
c.InferenceService.db_url = os.environ.get("INFERENCE_DB_URL", f"sqlite:///{state / 'inference.sqlite'}")
c.InferenceService.models_config = os.environ.get(
    "INFERENCE_MODELS_CONFIG", str(here / "hub_extension/engine/demo_models.yaml")
)
c.InferenceService.cookie_secret_file = str(state / "inference_cookie_secret")
# Where invitation links point (the CLI prints them too): the demo Hub's address (jupyterhub_config.py).
c.InferenceService.hub_public_url = os.environ.get("JUPYTERHUB_BIND_URL", "http://127.0.0.1:8000")
