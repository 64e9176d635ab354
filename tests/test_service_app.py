"""The service as a program: standalone modes, start-up validation, signals, the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests
from conftest import clean_env, free_port, running, serve, stop
from openai import OpenAI
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hub_extension"]


def test_mode_none_has_no_auth_at_all_and_stops_on_sigint(tmp_path):
    proc, url = serve(tmp_path, "--identity=none", "--InferenceService.flush_interval=3600")
    try:
        r = requests.get(url + "api/me", headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 200 and r.json()["role"] == "admin" and r.json()["authenticated_via"] == "none"
        assert requests.get(url + "v1/models").status_code == 200
        # No one to tell apart, so nothing about users, keys or grants exists, and nothing is read or checked:
        # an act-as header or a write without an XSRF token changes nothing.
        for path in ("api/keys", "api/users", "api/users/alice/grants", "api/invites", "api/presets", "api/audit"):
            r = requests.get(url + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        r = requests.get(url + "api/me", headers={"X-Inference-Act-As": "alice"})
        assert r.status_code == 200 and r.json()["name"] == "anonymous"
        paths = requests.get(url + "openapi.json").json()["paths"]
        assert "/api/keys" not in paths and "/api/users" not in paths and "/v1/chat/completions" in paths
    finally:
        stop(proc, signal.SIGINT)  # SIGTERM: the static-key test; both end in a clean exit, buffers flushed
    assert proc.returncode == 0


def test_mode_static_compares_configured_keys_and_logs_json_without_secrets(tmp_path):
    keys = "sk-one-secret,sk-two-secret"
    proc, url = serve(tmp_path, "--identity=static", env={"INFERENCE_API_KEYS": keys, "INFERENCE_LOG_FORMAT": "json"})
    made_up = "jhi_" + "A" * 49
    try:
        for key in ("sk-one-secret", "sk-two-secret"):
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                r = requests.get(url + "api/me", headers=headers)
                assert r.status_code == 200 and r.json()["role"] == "admin", r.text
        for headers in ({}, {"Authorization": "Bearer sk-one-secreT"}, {"x-api-key": "sk-one"},
                        {"Authorization": f"Bearer {made_up}"}):
            r = requests.get(url + "v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        requests.get(url + f"v1/models?api_key={made_up}")
        requests.get(url + "v1/models?token=sk-one-secret")
    finally:
        out = stop(proc)
    assert proc.returncode == 0
    assert "sk-one-secret" not in out and "sk-two-secret" not in out and made_up not in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [rec for rec in lines if rec["logger"] == "hub_extension.access"]
    assert access and {"status", "method", "path", "user", "duration_ms"} <= set(access[0])


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--identity=static"], {}, "static_keys"),
        (["--IdentityProvider.hub_token_cache_seconds=0"], {"INFERENCE_API_KEYS": "k"}, "hub_token_cache_seconds"),
        (["--identity=none", "--ip=0.0.0.0"], {}, "allow_remote_none"),
        (["--identity=none", "--models=/nonexistent/models.yaml"], {}, "models.yaml"),
        (["--PermissionPolicy.feature_defaults={'teleport': True}"], {}, "teleport"),
        (["--InferenceService.trusted_proxies=['10.0.0.0/8', 'proxy']"], {}, "'proxy'"),
        (["--identity=none", "--InferenceService.torch_threads=-1"], {}, "torch_threads"),
    ],
)
def test_bad_configuration_stops_the_start(tmp_path, monkeypatch, args, env, message):
    """Every bad setting fails while the service starts (before it listens), naming the setting."""
    from traitlets import TraitError

    from hub_extension.app import InferenceService

    for name, value in clean_env().items() | env.items():
        monkeypatch.setenv(name, value)
    for name in set(os.environ) - set(clean_env()) - set(env):
        monkeypatch.delenv(name)
    app = InferenceService()
    with pytest.raises((ValueError, TraitError)) as raised:
        app.initialize([f"--db-url=sqlite:///{tmp_path / 'x.sqlite'}", *args])
        app.make_app()
    assert message in str(raised.value)


def test_a_bad_setting_ends_the_process_with_its_name(tmp_path):
    r = subprocess.run(
        CLI + ["serve", f"--port={free_port()}", f"--db-url=sqlite:///{tmp_path / 'x.sqlite'}", "--identity=sometimes"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "configuration error" in r.stderr and "'mode' trait of an IdentityProvider" in r.stderr
    assert "Traceback" not in r.stderr


# One key per line; surrounding whitespace (a Windows line end too) and blank lines are ignored.
STATIC_KEYS_FILE = "sk-file-one\n\n   sk-file-two  \n\t\nsk-file-three\r\n"


def in_process_config(tmp_path, **identity):
    """Settings for an instance in this process: SQLite in `tmp_path`, no config file, no models, no Hub."""
    cfg = Config()
    cfg.InferenceService.port = free_port()
    cfg.InferenceService.db_url = f"sqlite:///{tmp_path / 'svc.sqlite'}"
    cfg.InferenceService.cookie_secret_file = str(tmp_path / "cookie-secret")
    cfg.InferenceService.config_file = ""
    cfg.InferenceService.models_config = ""
    for name, value in identity.items():
        setattr(cfg.IdentityProvider, name, value)
    return cfg


def test_static_keys_file_keys_are_accepted_and_others_refused(tmp_path):
    keys_file = tmp_path / "static-keys"
    keys_file.write_text(STATIC_KEYS_FILE)
    cfg = in_process_config(tmp_path, mode="static", static_keys=["sk-config-key"], static_keys_file=str(keys_file))
    with running(cfg):
        url = f"http://127.0.0.1:{cfg.InferenceService.port}/"
        # The file's keys are added to the configured ones.
        for key in ("sk-file-one", "sk-file-two", "sk-file-three", "sk-config-key"):
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                r = requests.get(url + "api/me", headers=headers, timeout=30)
                assert r.status_code == 200, (key, r.text)
                assert (r.json()["role"], r.json()["authenticated_via"]) == ("admin", "static_key")
        assert OpenAI(base_url=url + "v1", api_key="sk-file-two", max_retries=0).models.list().data == []
        # Anything else is a 401 in OpenAI's shape, whichever way it is presented.
        for key in ("sk-file-four", "sk-file", "sk-file-onesk-file-two", "sk-file-one sk-file-two"):
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                r = requests.get(url + "v1/models", headers=headers, timeout=30)
                assert r.status_code == 401 and list(r.json()) == ["error"], (key, headers, r.text)
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
                assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)
        with pytest.raises(openai.AuthenticationError) as raised:
            OpenAI(base_url=url + "v1", api_key="sk-not-in-the-file", max_retries=0).models.list()
        assert (raised.value.status_code, raised.value.code) == (401, "invalid_api_key")


def test_a_comment_in_the_static_keys_file_is_not_a_key(tmp_path):
    """Anyone sending `x-api-key: # the CI runner` would be an admin if a comment line counted as a key."""
    from hub_extension.identity import IdentityProvider

    keys_file = tmp_path / "static-keys"
    keys_file.write_text("# the CI runner\nsk-file-one\n")
    provider = IdentityProvider(mode="static", static_keys=[], static_keys_file=str(keys_file))
    assert provider.checker.matches("sk-file-one")
    assert not provider.checker.matches("# the CI runner")


@pytest.mark.parametrize("where", ["missing", "a folder"])
def test_a_static_keys_file_that_cannot_be_read_is_a_configuration_error(tmp_path, where):
    path = tmp_path / "no-such-file" if where == "missing" else tmp_path
    r = subprocess.run(
        CLI + ["serve", f"--port={free_port()}", f"--db-url=sqlite:///{tmp_path / 'x.sqlite'}", "--identity=static",
               f"--IdentityProvider.static_keys_file={path}"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "configuration error" in r.stderr and "static_keys_file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_mode_none_beyond_loopback_warns_loudly_when_allowed(tmp_path, caplog):
    """`allow_remote_none` lets the service start, with a warning that says anyone who reaches it is an admin."""
    from hub_extension.app import InferenceService

    def warnings_at_start(ip: str, folder: str) -> list[str]:
        (tmp_path / folder).mkdir()
        cfg = in_process_config(tmp_path / folder, mode="none")
        cfg.InferenceService.ip = ip
        cfg.InferenceService.allow_remote_none = True
        app = InferenceService(config=cfg)
        app.initialize([])
        # The service's own logging replaces the root's handlers and traitlets' logger does not propagate:
        # listen on the application's logger itself.
        app.log.addHandler(caplog.handler)
        caplog.clear()
        try:
            app.make_app()
        finally:
            app.log.removeHandler(caplog.handler)
            app.services.db.close()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "'none'" in r.getMessage()]

    assert warnings_at_start("0.0.0.0", "remote") == [
        "!!! identity mode 'none' on 0.0.0.0: ANYONE who can reach it is an admin !!!"
    ]
    assert warnings_at_start("127.0.0.1", "loopback") == []


def test_cli_keys_and_users(db_url, capsys):
    """The key commands in this process (`cli.run`: the same code path as the console script)."""
    from hub_extension.cli import run

    def cli(*args):
        code = run([*args, "--db-url", db_url])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert cli("db", "upgrade")[0] == 0
    code, _, err = cli("keys", "list", "--user", "ghost")
    assert code == 1 and "No such user" in err
    # A user exists once the Hub has shown them to the service; create one through the component.
    from hub_extension.db import Database
    from hub_extension.users import UserDirectory

    db = Database(db_url)
    db.call(lambda s: UserDirectory(db)._upsert(s, {"name": "alice"}))
    db.close()
    code, secret, _ = cli("keys", "create", "--user", "alice", "--name", "ci", "--expires-in-days", "7", "--features", "chat")
    secret = secret.strip()
    assert code == 0 and secret.startswith("jhi_")
    code, out, _ = cli("keys", "list", "--user", "alice", "--json")
    listed = json.loads(out)
    assert [k["name"] for k in listed] == ["ci"] and listed[0]["features"] == ["chat"] and secret not in out
    assert listed[0]["created_by"].startswith("cli:")
    code, out, _ = cli("keys", "revoke", "--user", "alice", "--id", str(listed[0]["id"]))
    assert code == 0 and "revoked 1" in out
    code, out, _ = cli("users", "list")
    assert code == 0 and "alice" in out
    code, _, err = cli("keys", "create", "--user", "alice", "--name", "x", "--features", "teleport")
    assert code == 1 and "teleport" in err


def test_redaction_filter():
    from hub_extension import key_format, logs

    key = key_format.generate()
    assert key not in logs.redact(f"oops {key} leaked") and key[:12] in logs.redact(key)


def test_cli_finds_the_service_database_or_says_why_not(tmp_path, monkeypatch, capsys):
    """Run anywhere, a command opens the database the service's config file names, or fails saying which is
    missing; it never creates one (only `db upgrade` does). In this process, from another folder."""
    from hub_extension.cli import run
    from hub_extension.db import Database
    from hub_extension.users import UserDirectory

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("INFERENCE_DB_URL", raising=False)
    monkeypatch.setenv("INFERENCE_CONFIG", "")
    assert run(["users", "list"]) == 1
    err = capsys.readouterr().err
    assert "no database at 'inference.sqlite'" in err and "db upgrade" in err
    assert list(elsewhere.iterdir()) == []  # nothing created

    db_path = tmp_path / "state" / "service.sqlite"
    config = tmp_path / "jupyterhub_inference_config.py"
    config.write_text(f"c.InferenceService.db_url = 'sqlite:///{db_path}'\n")
    monkeypatch.setenv("INFERENCE_CONFIG", str(config))
    assert run(["users", "list"]) == 1 and str(db_path) in capsys.readouterr().err
    db_path.parent.mkdir()
    assert run(["db", "upgrade"]) == 0
    db = Database(f"sqlite:///{db_path}")
    db.call(lambda s: UserDirectory(db)._upsert(s, {"name": "carmen"}))
    db.close()
    assert run(["users", "list"]) == 0 and "carmen" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []


def test_cli_and_help_do_not_load_the_engine(tmp_path):
    """`--help` and the admin commands start without torch or transformers (the fast start the CLI needs)."""
    for args in (["--help"], ["users", "list", f"--db-url=sqlite:///{tmp_path / 'none.sqlite'}"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "hub_extension", *args], cwd=tmp_path,
                           env=clean_env(), capture_output=True, text=True, timeout=60)
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert imported and not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}, args


def test_help_all_groups_settings_by_component(capsys):
    from hub_extension.cli import run

    assert run(["--help-all"]) == 0
    out = capsys.readouterr().out
    for section in ("InferenceService(Application)", "IdentityProvider(LoggingConfigurable)",
                    "KeyManager(LoggingConfigurable)", "UserDirectory(LoggingConfigurable)",
                    "PermissionPolicy(LoggingConfigurable)"):
        assert f"{section} options" in out
    assert "--KeyManager.max_keys_per_user" in out and "--UserDirectory.new_user_status" in out


def test_cookie_secret_persists_across_restarts(tmp_path):
    from hub_extension.app import InferenceService

    path = tmp_path / "secret"
    first = InferenceService(cookie_secret_file=str(path)).cookie_secret()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert InferenceService(cookie_secret_file=str(path)).cookie_secret() == first and len(first) == 32
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        InferenceService(cookie_secret_file=str(path)).cookie_secret()


@pytest.mark.parametrize("command", [["db", "upgrade"], ["users", "list"], ["users", "disable"], ["keys", "create"],
                                     ["keys", "revoke"], ["grants", "set"], ["audit"], ["usage"],
                                     ["quotas", "set"]])
def test_every_command_has_help(command, capsys):
    from hub_extension.cli import run

    assert run([*command, "--help"]) == 0
    assert "--db-url" in capsys.readouterr().out


def test_the_account_page_bounds_a_key_name_as_the_api_does():
    """The browser stops at the length the API accepts (`api_keys.MAX_NAME_LENGTH`), not at a longer one."""
    import re

    from tornado.template import Loader

    from hub_extension.api_keys import MAX_NAME_LENGTH

    page = Loader(str(ROOT / "hub_extension" / "templates")).load("account.html").generate(
        user="alice", admin=False, base="/services/inference/", hub="/hub/", service="inference", xsrf="x"
    ).decode()
    [field] = re.findall(r'<input[^>]* id="key-name"[^>]*>', page)
    assert f'maxlength="{MAX_NAME_LENGTH}"' in field
