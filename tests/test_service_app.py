"""The service as a program: standalone modes, start-up validation, signals, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import clean_env, free_port, serve, stop

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hub_extension"]


def test_mode_none_has_no_auth_at_all_and_stops_on_sigint(tmp_path):
    proc, url = serve(tmp_path, "--identity=none", "--InferenceService.flush_interval=3600")
    try:
        r = requests.get(url + "api/me", headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 200 and r.json()["role"] == "admin" and r.json()["authenticated_via"] == "none"
        assert requests.get(url + "v1/models").status_code == 200
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
