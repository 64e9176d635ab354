"""The newcomer's path, timed: set up, `make demo`, log in, open 01-quickstart, run it, see a streamed answer.

    .venv/bin/python bench/quickstart.py [--keep-cache] [--user admin]

Runs what `make demo` runs (scripts/setup.sh, then jupyterhub with jupyterhub_config.py), on free ports with a
fresh state dir (the demo's var/) and, unless --keep-cache, a fresh cache dir, so the offline chat model is built
as on a fresh checkout. A real Chromium (Playwright) then does what the newcomer does: signs in as the demo's
first admin (its password set by INFERENCE_FIRST_ADMIN_PASSWORD; the Hub spawns the server), opens
01-quickstart.ipynb from the file browser and runs all cells. The answer of `%%chat` must arrive in more than
one piece. Prints the time of each step, and as its last line `quickstart_seconds=<total>`. Goal (issue 11):
under 300 s on a 2-core machine, from a fresh checkout (setup is timed too, but quick when already done: it
says so). Screenshots in test-artifacts/.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from browser import launch, screenshot  # noqa: E402
from hub_process import stop_hub  # noqa: E402

PASSWORD = secrets.token_urlsafe(18)  # the first admin's (`make demo` prints a generated one instead)
# Counts the distinct texts the `%%chat` cell's output shows while it runs: more than one = streamed.
WATCH_CHAT = """() => {
    const cell = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')]
        .find(c => c.querySelector('.cm-content').innerText.startsWith('%%chat'));
    window.chatTexts = [];
    new MutationObserver(() => {
        const text = cell.querySelector('.jp-OutputArea').innerText.trim();
        if (text && text !== window.chatTexts.at(-1)) window.chatTexts.push(text);
    }).observe(cell, {subtree: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := predicate():
                return value
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


class Steps:
    """Each step's duration, printed as it ends."""

    def __init__(self):
        self.times: list[tuple[str, float]] = []
        self.last = time.monotonic()

    def done(self, name: str, note: str = "") -> None:
        now = time.monotonic()
        self.times.append((name, now - self.last))
        self.last = now
        print(f"{name:<48} {self.times[-1][1]:7.1f} s  {note}", flush=True)


def setup(steps: Steps) -> None:
    out = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    steps.done("setup (scripts/setup.sh)", "already set up" if "up to date" in out else "installed")


def start_hub(tmp: Path, keep_cache: bool, user: str) -> tuple[subprocess.Popen, str, str, Path]:
    ports = {k: free_port() for k in ("public", "hub", "proxy_api", "service")}
    public = f"http://127.0.0.1:{ports['public']}"
    env = {**os.environ, "INFERENCE_STATE_DIR": str(tmp / "var"), "INFERENCE_FIRST_ADMIN": user,
           "INFERENCE_FIRST_ADMIN_PASSWORD": PASSWORD,
           "JUPYTERHUB_BIND_URL": public, "INFERENCE_PORT": str(ports["service"]), "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("JUPYTERHUB_") or k == "JUPYTERHUB_BIND_URL"}
    if not keep_cache:
        env["XDG_CACHE_HOME"] = str(tmp / "cache")  # the offline chat model is built again, as on a fresh machine
    log = tmp / "hub.log"
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/jupyterhub"), "-f", str(ROOT / "jupyterhub_config.py"),
         f"--JupyterHub.hub_port={ports['hub']}", f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{ports['proxy_api']}"],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, public, f"JUPYTERHUB_API_URL=http://127.0.0.1:{ports['hub']}/hub/api", log


def run_quickstart(steps: Steps, public: str, user: str) -> int:
    """In Chromium: log in, open 01-quickstart from the file browser, run all cells; returns the number of
    distinct texts the `%%chat` output showed (more than one: streamed)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.set_default_timeout(300_000)
        page.goto(f"{public}/hub/login")
        page.fill("#username_input", user)
        page.fill("#password_input", PASSWORD)
        page.click("#login_submit")  # the Hub spawns the server and sends the browser to JupyterLab
        entry = page.locator(".jp-DirListing-item", has_text="01-quickstart.ipynb")
        try:
            entry.wait_for()
        except Exception:
            screenshot(page, "bench-quickstart-failed")
            raise
        steps.done("log in: spawn + JupyterLab loaded", page.url.removeprefix(public))

        entry.dblclick()
        sessions = f"""() => fetch('/user/{user}/api/sessions', {{
            headers: {{'X-XSRFToken': decodeURIComponent(document.cookie.match(/_xsrf=([^;]+)/)[1])}}
        }}).then(r => r.json())"""  # what JupyterLab itself asks, with its cookie and XSRF token
        wait_for(lambda: any(s["path"] == "01-quickstart.ipynb" and s["kernel"]["execution_state"] == "idle"
                             for s in page.evaluate(sessions)), 300, "the notebook's kernel")
        steps.done("open 01-quickstart: notebook + kernel ready")

        page.evaluate(WATCH_CHAT)
        page.locator(".lm-MenuBar-item", has_text="Run").click()
        page.locator(".lm-Menu").get_by_text("Run All Cells", exact=True).click()
        notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        notebook.locator(".jp-CodeCell").last.locator(".jp-OutputArea", has_text="Usage since").wait_for()
        steps.done("run all cells (last: %usage)")
        screenshot(page, "bench-quickstart")
        errors = notebook.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        if errors.count():
            raise AssertionError(f"error or stderr output: {errors.all_inner_texts()}")
        pieces = page.evaluate("window.chatTexts.length")
        browser.close()
    return pieces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-cache", action="store_true", help="reuse ~/.cache (the built offline model)")
    parser.add_argument("--user", default="admin", help="the demo's first admin, who signs in")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} at the start; fresh cache: {not args.keep_cache}")
    steps = Steps()
    setup(steps)
    with tempfile.TemporaryDirectory(prefix="jhi-quickstart-") as tmp:
        proc, public, marker, log = start_hub(Path(tmp), args.keep_cache, args.user)
        try:
            def ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyterhub exited: {log.read_text()[-3000:]}")
                # The service answers while its models load; it logs (to the Hub's log) when they are ready.
                return (b"models ready" in log.read_bytes()
                        and requests.get(f"{public}/services/inference/health", timeout=5).status_code == 200)

            wait_for(ready, 600, "the service behind the Hub")
            steps.done("make demo: Hub + service ready (models loaded)")
            pieces = run_quickstart(steps, public, args.user)
        except Exception:
            print(f"failed; the Hub's log ends with:\n{log.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            stop_hub(proc, Path(tmp) / "var" / "jupyterhub-proxy.pid", env_marker=marker, wait=60)
    total = sum(seconds for _name, seconds in steps.times)
    print(f"%%chat answer shown in {pieces} successive versions (streamed: {pieces > 1})")
    print(f"quickstart_seconds={total:.1f}")


if __name__ == "__main__":
    main()
