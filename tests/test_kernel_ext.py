"""The kernel extension without a Hub: where it looks for the service, and one line (never a traceback) when it
cannot find one. The extension against the real Hub and service: test_kernel_ext_e2e.py."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from conftest import TEST_ROLES, free_port
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client.manager import start_new_kernel
from traitlets.config import Config

import kernel_ext
from hub_extension.hub_config import KERNELSPEC_PATH, configure
from kernel_ext.discovery import ServiceNotFound, find_service

KERNEL_VARIABLES = (
    "JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_URL", "JUPYTERHUB_PUBLIC_HUB_URL",
    "INFERENCE_SERVICE_URL", "INFERENCE_SERVICE_NAME", "OPENAI_BASE_URL", "OPENAI_API_KEY",
)
CLOSED = f"http://127.0.0.1:{free_port()}/hub/api"  # nothing listens: the Hub cannot be asked


@pytest.mark.parametrize(("env", "expected"), [
    ({"JUPYTERHUB_API_TOKEN": "t", "INFERENCE_SERVICE_URL": "http://h:1/services/x"},
     ("http://h:1/services/x/", "t")),
    ({"JPY_API_TOKEN": "old", "INFERENCE_SERVICE_URL": "http://h:1/services/x/"}, ("http://h:1/services/x/", "old")),
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example/base/hub/"},
     ("https://hub.example/base/services/inference/", "t")),
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example/hub/",
      "INFERENCE_SERVICE_NAME": "llm"}, ("https://hub.example/services/llm/", "t")),
    # The override wins over everything; a Hub that cannot be reached is skipped.
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example/hub/",
      "INFERENCE_SERVICE_URL": "http://127.0.0.1:9/services/inference/", "JUPYTERHUB_API_URL": CLOSED},
     ("http://127.0.0.1:9/services/inference/", "t")),
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example/hub/",
      "JUPYTERHUB_API_URL": CLOSED}, ("https://hub.example/services/inference/", "t")),
])
def test_discovery_from_environment(env, expected):
    assert tuple(find_service(env, timeout=2)) == expected


@pytest.mark.parametrize(("env", "says"), [
    ({}, "Not in a JupyterHub server: JUPYTERHUB_API_TOKEN is not set."),
    ({"INFERENCE_SERVICE_URL": "http://h:1/services/inference/"}, "JUPYTERHUB_API_TOKEN is not set"),
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_API_URL": CLOSED}, "set INFERENCE_SERVICE_URL"),
    ({"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_PUBLIC_HUB_URL": ""}, "Cannot locate the 'inference' service"),
])
def test_discovery_says_why_in_one_line(env, says):
    with pytest.raises(ServiceNotFound) as e:
        find_service(env, timeout=2)
    assert says in str(e.value) and "\n" not in str(e.value)


class FakeHubAPI(BaseHTTPRequestHandler):
    """`GET /hub/api/services/<name>` as the Hub answers a token with `read:services` (or only the name)."""

    def do_GET(self):
        full = self.headers.get("Authorization") == "token full"
        model = {"kind": "service", "name": "inference"}
        if full:
            model.update(url="http://127.0.0.1:8010", prefix="/services/inference/")
        body = json.dumps(model).encode()
        self.send_response(200 if self.path == "/hub/api/services/inference" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_discovery_asks_the_hub_when_the_token_may_read_the_service():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{server.server_port}/hub/api"
        public = {"JUPYTERHUB_API_URL": api, "JUPYTERHUB_PUBLIC_HUB_URL": "https://hub.example/hub/"}
        assert find_service({**public, "JUPYTERHUB_API_TOKEN": "full"}).base_url == \
            "http://127.0.0.1:8010/services/inference/"
        # A token that may read only the name: the public URL.
        assert find_service({**public, "JUPYTERHUB_API_TOKEN": "name-only"}).base_url == \
            "https://hub.example/services/inference/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def kernel_env(monkeypatch):
    """None of a kernel's variables set; whatever the test and the extension set is undone afterwards."""
    for name in KERNEL_VARIABLES:
        monkeypatch.setenv(name, "")  # records the original value
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def shell(kernel_env):
    """An in-process IPython, as a kernel has."""
    return InteractiveShell.instance()


def test_loading_outside_a_hub_says_so_in_one_line(shell, capsys):
    shell.run_line_magic("reload_ext", "kernel_ext")
    out = capsys.readouterr()
    assert out.out == "kernel_ext: Not in a JupyterHub server: JUPYTERHUB_API_TOKEN is not set.\n"
    assert "Traceback" not in out.err
    # The magics are registered and say the same, without a traceback.
    for magic in ("%models", "%usage", "%%chat\nhello"):
        result = shell.run_cell(magic)
        assert result.success
        assert capsys.readouterr().out == "kernel_ext: Not in a JupyterHub server: JUPYTERHUB_API_TOKEN is not set.\n"
    assert "OPENAI_BASE_URL" not in os.environ
    with pytest.raises(ServiceNotFound):
        kernel_ext.client()


def test_loading_when_the_service_is_unreachable_says_so_in_one_line(shell, capsys, kernel_env):
    url = f"http://127.0.0.1:{free_port()}/services/inference/"
    kernel_env.setenv("JUPYTERHUB_API_TOKEN", "t")
    kernel_env.setenv("INFERENCE_SERVICE_URL", url)
    shell.run_line_magic("reload_ext", "kernel_ext")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kernel_ext: the service at {url} did not answer")
    assert shell.run_cell("%%chat --max-tokens 4\nhello").success
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kernel_ext: Cannot reach the inference service"), lines
    # Any OpenAI-compatible library finds the service; kernel_ext.client() is the real SDK pointed at it.
    assert os.environ["OPENAI_BASE_URL"] == url + "v1" and os.environ["OPENAI_API_KEY"] == "t"
    client = kernel_ext.client()
    assert isinstance(client, openai.OpenAI)
    assert (str(client.base_url), client.api_key) == (url + "v1/", "t")


def test_the_server_role_lists_every_inference_scope():
    """A kernel's token asks for all of them; the Hub gives it those its owner holds (test_kernel_ext_e2e)."""
    c = Config()
    configure(c, roles=TEST_ROLES)
    server = next(r for r in c.JupyterHub.load_roles if r["name"] == "server")
    assert {"custom:inference:admin", "custom:inference:embeddings", "custom:inference:model:*",
            "custom:inference:model:minilm", "access:services!service=inference"} <= set(server["scopes"])
    assert set(c.JupyterHub.custom_scopes) >= {s for s in server["scopes"] if s.startswith("custom:")}


def test_spawned_servers_kernels_load_the_extension(monkeypatch):
    """`configure` points spawned servers at a `python3` kernelspec that loads kernel_ext (the admin's own
    JUPYTER_PATH kept after it); a kernel started the way a server starts one has it loaded."""
    c = Config()
    c.Spawner.environment = {"JUPYTER_PATH": "/opt/kernels"}
    configure(c, port=8123)
    env = c.Spawner.environment
    assert env["INFERENCE_SERVICE_URL"] == "http://127.0.0.1:8123/services/inference/"
    assert env["JUPYTER_PATH"].split(os.pathsep) == [str(KERNELSPEC_PATH), "/opt/kernels"]
    off = Config()
    configure(off, load_kernel_extension=False)
    assert "environment" not in off.Spawner

    monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])
    manager, kernel = start_new_kernel(kernel_name="python3")
    try:
        loaded = {"loaded": "'kernel_ext' in get_ipython().extension_manager.loaded"}
        reply = kernel.execute_interactive("", user_expressions=loaded, timeout=60)["content"]
        assert reply["user_expressions"]["loaded"]["data"]["text/plain"] == "True", reply
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
