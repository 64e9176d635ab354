"""The example notebooks, executed top to bottom by nbclient in kernels of real single-user servers the Hub spawned.

Each kernel is what a user gets in JupyterLab: started by the user's own server (`conftest.notebook_servers`:
a user's and a service admin's), with the `JUPYTERHUB_API_TOKEN` the Hub gave that server and `kernel_ext`
loaded by the server's kernelspec. The notebooks run from the copies the spawner's hook put in each user's
notebook dir (what `make demo` does), through the server's REST API and kernel websocket (tests/remote_kernel.py).
"""

from __future__ import annotations

import json
from itertools import pairwise
from types import SimpleNamespace

import nbformat
import pytest
import requests
from conftest import bearer
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell
from remote_kernel import execute
from traitlets import List

from hub_extension.hub_config import NOTEBOOKS_PATH, example_notebooks_hook

SERVICE = "inference"  # the Hub-managed instance, as deployed
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_PATH.glob("*.ipynb"))
# Added around a notebook: what the kernel holds (never a secret: only whether the two are the same). Before the
# first cell: the server's kernelspec loaded kernel_ext as the kernel started. After the last: whose kernel it is,
# and that the OpenAI variables carry the Hub token the spawner gave the server.
KERNEL_AT_START = 'print("kernel_ext" in get_ipython().extension_manager.loaded)'
KERNEL_FACTS = """import os
print(os.environ["JUPYTERHUB_USER"], os.environ["OPENAI_API_KEY"] == os.environ["JUPYTERHUB_API_TOKEN"])"""


class RecordingClient(NotebookClient):
    """nbclient keeps only a display's final state in the cell; this also keeps every message, in order."""

    messages = List()

    def process_message(self, msg, cell, cell_index):
        self.messages.append((cell_index, msg["msg_type"], msg["content"]))
        return super().process_message(msg, cell, cell_index)


@pytest.fixture
def run_notebook(notebook_servers):
    """`run(name, role, **parameters)`: the notebook executed in a new kernel of that role's server, and every
    kernel message, per cell. `parameters` replace the cell tagged `parameters` (as papermill does)."""

    def run(name: str, role: str, **parameters) -> tuple[nbformat.NotebookNode, list]:
        server = notebook_servers[role]
        nb = nbformat.read(server.notebook_dir / f"{name}.ipynb", as_version=4)  # the user's copy
        if parameters:
            cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
            cell.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells = [new_code_cell(KERNEL_AT_START), *nb.cells, new_code_cell(KERNEL_FACTS)]
        client = execute(nb, server, path=f"{name}.ipynb", client_class=RecordingClient, timeout=300,
                         messages=[])  # raises CellExecutionError on any error output
        return nb, client.messages

    return run


def cell_index(nb, start: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.source.startswith(start))


def printed(nb, index: int) -> str:
    return "".join(o.get("text", "") for o in nb.cells[index].outputs if o.output_type == "stream")


def widget_values(nb) -> str:
    """Every widget's state as one text (what the panels show), from the executed notebook's metadata."""
    return json.dumps(nb.metadata["widgets"][WIDGET_STATE]["state"])


def kernel_facts(nb) -> list[str]:
    """(kernel_ext loaded at start, user, whether OPENAI_API_KEY is the server's own Hub token), as printed."""
    return [*printed(nb, 0).split(), *printed(nb, len(nb.cells) - 1).split()]


def test_the_example_notebooks_are_in_each_users_file_browser(notebook_servers):
    for server in notebook_servers.values():
        listing = server.api("GET", "api/contents/").json()["content"]
        assert NOTEBOOKS == sorted(item["name"] for item in listing if item["type"] == "notebook")


def test_quickstart_as_a_user(notebook_servers, run_notebook):
    user = notebook_servers["user"].name
    nb, messages = run_notebook("01-quickstart", "user")
    assert kernel_facts(nb) == ["True", user, "True"]

    loaded = printed(nb, cell_index(nb, "%reload_ext kernel_ext"))
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


def test_account_notebook_as_a_user(notebook_servers, run_notebook):
    user = notebook_servers["user"].name
    nb, _messages = run_notebook("02-account", "user")
    assert kernel_facts(nb) == ["True", user, "True"]
    state = widget_values(nb)
    assert user in state and "Your keys" in state
    assert '<span class=\\"jhi-error\\">' not in state  # the panel showed no error


def test_admin_notebook_as_an_admin(hub, notebook_servers, run_notebook):
    admin, user = notebook_servers["admin"].name, hub.new_user("nb")
    nb, _messages = run_notebook("03-admin", "admin", USER=user)
    assert kernel_facts(nb) == ["True", admin, "True"]
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


# -- the spawner's hook (no Hub) ---------------------------------------------------------------------


def spawner(name: str) -> SimpleNamespace:
    return SimpleNamespace(user=SimpleNamespace(name=name), notebook_dir="")


def test_the_hook_copies_the_notebooks_and_keeps_a_users_edits(tmp_path):
    hook = example_notebooks_hook(tmp_path / "users")
    ann = spawner("ann")
    hook(ann)
    assert ann.notebook_dir == str(tmp_path / "users" / "ann")
    assert sorted(p.name for p in (tmp_path / "users" / "ann").iterdir()) == NOTEBOOKS
    edited = tmp_path / "users" / "ann" / NOTEBOOKS[0]
    edited.write_text("{}")  # ann's own version
    (tmp_path / "users" / "ann" / NOTEBOOKS[1]).unlink()  # ... and one she deleted
    hook(spawner("ann"))
    assert edited.read_text() == "{}"
    assert (tmp_path / "users" / "ann" / NOTEBOOKS[1]).read_bytes() == (NOTEBOOKS_PATH / NOTEBOOKS[1]).read_bytes()


@pytest.mark.parametrize("name", ["..", ".", "a/../../b"])
def test_the_hook_keeps_each_user_inside_the_root(tmp_path, name):
    with pytest.raises(ValueError):
        example_notebooks_hook(tmp_path / "users")(spawner(name))
    assert not (tmp_path / "b").exists()
