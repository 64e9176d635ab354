"""Real single-user servers spawned by the test Hub, and nbclient running notebooks in their kernels.

A kernel of a spawned server is what a user gets in JupyterLab: it runs in the server's environment, with the
`JUPYTERHUB_API_TOKEN` the Hub gave that server and the `kernel_ext` kernelspec `hub_config.configure` installs.
The test process reaches it as a browser does: the server's REST API (`/user/<name>/api/kernels`) through the
Hub's proxy, then the kernel's websocket (`.../channels`, the Jupyter messaging protocol as JSON frames), with a
token of the server's owner. nbclient drives it through the two small classes below, so outputs, display updates,
widget state and errors are collected exactly as nbclient collects them from a local kernel.

(jupyter_server's gateway client does the same but opens its websocket without credentials and polls its
queues in a busy loop; this file is what it would be with a header and an asyncio queue.)
"""

from __future__ import annotations

import asyncio
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from urllib.parse import quote

import httpx
from conftest import wait_for
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.jsonutil import extract_dates, json_default
from jupyter_server.services.kernels.connection.base import deserialize_binary_message
from nbclient import NotebookClient
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

SPAWN_SECONDS = 240  # two busy cores: a server starts in about 10 s when idle


@dataclass
class SingleUserServer:
    """A user's running server: its URL through the Hub's proxy, a token of its owner, its notebook dir."""

    name: str
    url: str  # http://127.0.0.1:PORT/user/<name>/
    token: str
    notebook_dir: Path

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """The server's REST API (`api/...`) as its owner."""
        r = httpx.request(method, self.url + path, headers={"Authorization": f"token {self.token}"}, timeout=60, **kw)
        r.raise_for_status()
        return r


def spawn(hub, name: str) -> None:
    """Ask the Hub to start `name`'s server (POST /hub/api/users/<name>/server); `wait_ready` waits for it."""
    hub.api.request("POST", f"/users/{quote(name)}/server")


def wait_ready(hub, name: str) -> SingleUserServer:
    def ready():
        server = hub.api.request("GET", f"/users/{quote(name)}").json()["servers"].get("")
        if server is None:  # the spawn failed: the Hub forgot the server
            raise AssertionError(f"{name}'s server did not start: {hub.log_path.read_text()[-3000:]}")
        return server and server["ready"] and server

    model = wait_for(ready, timeout=SPAWN_SECONDS, interval=0.3, what=f"{name}'s server (log: {hub.log_path})")
    return SingleUserServer(
        name=name,
        url=hub.url + model["url"],
        token=hub.api.user_token(name),
        notebook_dir=hub.log_path.parent / "notebooks" / name,  # tests/conftest.py `_hub_config`
    )


def stop(hub, *names: str) -> None:
    """Stop these users' servers, side by side, and wait until the Hub says they are gone."""
    for name in names:
        hub.api.request("DELETE", f"/users/{quote(name)}/server")
    for name in names:
        wait_for(lambda n=name: "" not in hub.api.request("GET", f"/users/{quote(n)}").json()["servers"],
                 timeout=120, interval=0.3, what=f"{name}'s server to stop")


@contextmanager
def spawned_servers(hub, **names: str):
    """`role=user name` -> that user's running server, spawned side by side; all stopped at the end."""
    started = []
    try:
        for name in names.values():
            spawn(hub, name)
            started.append(name)
        yield {role: wait_ready(hub, name) for role, name in names.items()}
    finally:
        stop(hub, *started)


# -- nbclient in a kernel of a spawned server ------------------------------------------------------------


class WebSocketChannel:
    """One channel (shell, iopub...) of a kernel's websocket: what jupyter_client's channels offer nbclient."""

    def __init__(self, name: str, client: RemoteKernelClient):
        self.name, self.client = name, client
        self.queue: asyncio.Queue[dict] = asyncio.Queue()

    async def get_msg(self, timeout: float | None = None) -> dict:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise Empty from None

    async def msg_ready(self) -> bool:
        return not self.queue.empty()

    def send(self, msg: dict) -> None:
        self.client.send(self.name, msg)

    def is_alive(self) -> bool:
        return self.client.connected

    is_beating = is_alive

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class RemoteKernelClient(AsyncKernelClient):
    """jupyter_client's kernel client with its five channels carried by the kernel's websocket on the server."""

    def __init__(self, ws_url: str, token: str, **kw):
        super().__init__(**kw)
        self.ws_url, self.token = ws_url, token
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.channels = {name: WebSocketChannel(name, self) for name in ("shell", "iopub", "stdin", "hb", "control")}

    shell_channel = property(lambda self: self.channels["shell"])
    iopub_channel = property(lambda self: self.channels["iopub"])
    stdin_channel = property(lambda self: self.channels["stdin"])
    hb_channel = property(lambda self: self.channels["hb"])
    control_channel = property(lambda self: self.channels["control"])

    @property
    def connected(self) -> bool:
        return self.reader is not None and not self.reader.done()

    @property
    def channels_running(self) -> bool:
        return self.connected

    async def start_channels(self, *args, **kwargs) -> None:
        request = HTTPRequest(self.ws_url, headers={"Authorization": f"token {self.token}"}, request_timeout=60)
        self.ws = await websocket_connect(request, max_message_size=64 * 1024 * 1024)
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        """Route each message the server sends to its channel's queue, until the websocket closes."""
        while (frame := await self.ws.read_message()) is not None:
            msg = deserialize_binary_message(frame) if isinstance(frame, bytes) else json.loads(frame)
            msg["header"] = extract_dates(msg["header"])
            msg["parent_header"] = extract_dates(msg.get("parent_header") or {})
            self.channels[msg.pop("channel")].queue.put_nowait(msg)

    def send(self, channel: str, msg: dict) -> None:
        frame = {key: msg[key] for key in ("header", "parent_header", "metadata", "content")}
        self.ws.write_message(json.dumps({**frame, "channel": channel}, default=json_default))

    async def _async_is_alive(self) -> bool:
        return self.connected

    def stop_channels(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


class RemoteKernelManager:
    """What nbclient asks of a kernel manager, for one kernel on a spawned server (its `api/kernels`)."""

    ipykernel = False  # nbclient's extra command-line arguments do not apply: the server starts the kernel

    def __init__(self, server: SingleUserServer, kernel_name: str = "python3", path: str = ""):
        self.server, self.kernel_name, self.path = server, kernel_name, path
        self.kernel_id: str | None = None

    @property
    def has_kernel(self) -> bool:
        return self.kernel_id is not None

    async def _api(self, method: str, path: str, **kw) -> httpx.Response:
        async with httpx.AsyncClient(headers={"Authorization": f"token {self.server.token}"}, timeout=60) as http:
            return await http.request(method, self.server.url + path, **kw)

    async def start_kernel(self, **_ignored) -> None:
        """A kernel from the server's kernelspec (the one that loads kernel_ext), in the notebook's folder."""
        r = await self._api("POST", "api/kernels", json={"name": self.kernel_name, "path": self.path})
        r.raise_for_status()
        self.kernel_id = r.json()["id"]

    def client(self) -> RemoteKernelClient:
        ws_url = self.server.url.replace("http", "ws", 1) + f"api/kernels/{self.kernel_id}/channels"
        return RemoteKernelClient(ws_url, self.server.token)

    async def is_alive(self) -> bool:
        if not self.has_kernel:
            return False
        r = await self._api("GET", f"api/kernels/{self.kernel_id}")
        return r.status_code == 200 and r.json()["execution_state"] != "dead"

    async def interrupt_kernel(self) -> None:
        (await self._api("POST", f"api/kernels/{self.kernel_id}/interrupt")).raise_for_status()

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        (await self._api("DELETE", f"api/kernels/{self.kernel_id}")).raise_for_status()
        self.kernel_id = None

    async def cleanup_resources(self, restart: bool = False) -> None:
        pass


def execute(nb, server: SingleUserServer, *, path: str = "", client_class=NotebookClient, **options):
    """Run `nb` top to bottom in a new kernel of `server` (in the folder of `path`, relative to the server's
    notebook dir), as nbclient does: raises `CellExecutionError` on an error output. The kernel is shut down
    at the end. Returns the client (its `nb` holds the outputs)."""
    client = client_class(nb, km=RemoteKernelManager(server, path=path), **options)
    client.execute(cleanup_kc=True)  # nbclient stops a kernel it did not start only when asked to
    return client
