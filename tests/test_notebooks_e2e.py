"""The example notebooks, executed top to bottom by nbclient in a real ipykernel against the real Hub and service.

The kernel gets what a kernel of a Hub-spawned server has: a real Hub token of its user as `JUPYTERHUB_API_TOKEN`,
with the scopes a server's token gets (access to the service, plus the owner's `custom:inference:*` scopes), and
the service's URL through the Hub's proxy as `INFERENCE_SERVICE_URL`. Spawning a real single-user server (and
driving JupyterLab in a browser) is not part of this round: the kernel runs here, with this .venv's Python.
"""

from __future__ import annotations

import json
import os
import sys
from itertools import pairwise

import nbformat
import pytest
import requests
from conftest import ROOT, bearer
from nbclient import NotebookClient

NOTEBOOKS = ROOT / "notebooks"
KERNEL = "jhi-notebook-test"
SERVICE = "inference"  # the Hub-managed instance, as deployed
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


class RecordingClient(NotebookClient):
    """nbclient keeps only a display's final state in the cell; this also keeps every message, in order."""

    def process_message(self, msg, cell, cell_index):
        self.messages.append((cell_index, msg["msg_type"], msg["content"]))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture
def run_notebook(hub, tmp_path, monkeypatch):
    """`run(name, user, scopes, **parameters)`: the executed notebook and every kernel message, per cell.

    `parameters` replace the cell tagged `parameters` (as papermill does), one assignment per name.
    """
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    def run(name: str, user: str, scopes: list[str], **parameters) -> tuple[nbformat.NotebookNode, list]:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        if parameters:
            cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
            cell.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        token = hub.api.user_token(user, scopes=[f"access:services!service={SERVICE}", *scopes])
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "OPENAI_", "INFERENCE_"))}
        env |= {"JUPYTERHUB_API_TOKEN": token, "INFERENCE_SERVICE_URL": hub.instances["sqlite"].url,
                "IPYTHONDIR": str(tmp_path / "ipython")}
        client = RecordingClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
        client.messages = []
        client.execute(env=env)  # raises CellExecutionError on any error output
        return nb, client.messages

    return run


def cell_index(nb, start: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.source.startswith(start))


def printed(nb, index: int) -> str:
    return "".join(o.get("text", "") for o in nb.cells[index].outputs if o.output_type == "stream")


def widget_values(nb) -> str:
    """Every widget's state as one text (what the panels show), from the executed notebook's metadata."""
    return json.dumps(nb.metadata["widgets"][WIDGET_STATE]["state"])


def test_quickstart_as_a_user(hub, run_notebook):
    user = hub.new_user("nb")
    nb, messages = run_notebook("01-quickstart", user, [])

    loaded = printed(nb, cell_index(nb, "%load_ext kernel_ext"))
    assert f"as {user}" in loaded, loaded
    models = printed(nb, cell_index(nb, "import kernel_ext"))
    assert "tiny-chat chat" in models and "minilm embedding" in models, models
    # Magics say what went wrong in one printed line (no error output): none of that either.
    problems = [c.source for c in nb.cells[cell_index(nb, "chat_model ="):] if "kernel_ext: " in str(c.get("outputs"))]
    assert problems == []
    similarities = printed(nb, cell_index(nb, "import math")).splitlines()
    assert len(similarities) == 2 and all(-1 <= float(line.split()[0]) <= 1 for line in similarities)

    # `%%chat` streamed: one display, then updates of that display, each a longer text than the one before.
    chat = cell_index(nb, "%%chat")
    shown = [(kind, content) for i, kind, content in messages
             if i == chat and kind in ("display_data", "update_display_data")]
    assert shown[0][0] == "display_data" and len(shown) > 2, [kind for kind, _ in shown]
    display_id = shown[0][1]["transient"]["display_id"]
    texts = [content["data"]["text/markdown"] for _kind, content in shown[1:]]
    assert all(kind == "update_display_data" and content["transient"]["display_id"] == display_id
               for kind, content in shown[1:])
    assert all(a != b and b.startswith(a) for a, b in pairwise(texts)) and texts[-1].strip()
    assert nb.cells[chat].outputs[0].data["text/markdown"] == texts[-1]

    # The streamed completion printed as it went: more than one piece of output.
    streamed = cell_index(nb, "stream = client")
    assert sum(1 for i, kind, _ in messages if i == streamed and kind == "stream") > 1
    assert "Usage since" in printed(nb, cell_index(nb, "%usage"))


def test_account_notebook_as_a_user(hub, run_notebook):
    user = hub.new_user("nb")
    nb, _messages = run_notebook("02-account", user, [])
    state = widget_values(nb)
    assert user in state and "Your keys" in state
    assert '<span class=\\"jhi-error\\">' not in state  # the panel showed no error


def test_admin_notebook_as_an_admin(hub, run_notebook):
    admin, user = hub.new_admin(), hub.new_user("nb")
    nb, _messages = run_notebook("03-admin", admin, ["custom:inference:admin"], USER=user)
    state = widget_values(nb)
    assert f"Signed in as {admin} (administrator)" in state
    assert '<span class=\\"jhi-error\\">' not in state
    assert "viewed by" in state  # the AccountPanel opened with `act_as(USER)` sees the service as the user
    assert "users;" in printed(nb, cell_index(nb, "users = admin.users()"))

    # What the notebook did holds in the service: the grant, and the audit log naming the admin.
    token = hub.api.user_token(admin, scopes=[f"access:services!service={SERVICE}", "custom:inference:admin"])
    url = hub.instances["sqlite"].url
    perms = requests.get(f"{url}api/users/{user}/permissions", headers=bearer(token), timeout=30).json()
    assert perms["features"]["embeddings"]["allowed"] is True
    assert perms["features"]["embeddings"]["source"] == "user_grant", perms["features"]["embeddings"]
    audit = printed(nb, cell_index(nb, "for event in admin.audit"))
    assert f"{admin} grants.set" in audit and f"{admin} impersonate" in audit, audit
