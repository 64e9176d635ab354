"""Logs hold no credential and no forged line, in text and JSON, from every logger (traitlets' own included).

The last test starts the real service in this process (identity mode `hub`, its Hub unreachable: the page
refuses a token in the URL before asking the Hub) and reads everything it wrote.
"""

from __future__ import annotations

import json
import logging
import re
import secrets

import pytest
import requests
from conftest import ServiceThread, free_port
from traitlets.config import Config

from hub_extension import key_format, logs
from hub_extension.app import InferenceService

TEXT_LINE = re.compile(r"\[[DIWEC] \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+\] ")
FORGED = "[E 2026-01-01 00:00:00,000 hub_extension.audit] forged"


@pytest.fixture(params=["text", "json"])
def fmt(request):
    """Each format; a test calls `logs.configure(fmt)` itself (capsys swaps sys.stderr after fixtures)."""
    touched = [logging.getLogger(name) for name in ("", *logs.SELF_HANDLED)]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in touched]
    yield request.param
    logs.configure("text")
    for logger, (handlers, level, propagate) in zip(touched, saved, strict=True):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def events(fmt: str, output: str) -> list[str]:
    """One entry per line logged (JSON: its message and traceback), checking that each line is a whole event."""
    lines = output.splitlines()
    if fmt == "json":
        return [json.loads(line)["message"] + json.loads(line).get("exception", "") for line in lines]
    assert all(TEXT_LINE.match(line) for line in lines), output
    return lines


def secret() -> str:
    return secrets.token_hex(16)


def test_every_credential_form_is_redacted(fmt, capsys):
    logs.configure(fmt, logging.DEBUG)
    hub_token, value, static_key, key = secret(), secret(), "sk static key " + secret()[:6], key_format.generate()
    logs.add_secret(static_key)
    messages = [
        ("401 GET %s (127.0.0.1): refused", f"/services/inference/?token={hub_token}"),
        ("403 GET %s", f"/oauth_callback?code={value}&state={value}"),
        ("redirect to %s", f"/hub/login?next=%2Fhub%2Fapi%2Foauth2%2Fauthorize%3Fstate%3D{value}%26x%3D1"),
        ("%r", f"HTTPServerRequest(uri='/v1/models?api_key={value}&access_token={value}')"),
        ("headers %s", {"Authorization": f"token {hub_token}", "X-Api-Key": value, "Cookie": f"c={value}"}),
        ("%s", f"Authorization: Bearer {value}"),
        ("token %s refused", hub_token),
        ("the model %r does not exist", static_key),
        ("key %s", key),
    ]
    log = logging.getLogger("hub_extension.test")
    for message, arg in messages:
        log.warning(message, arg)
    log.warning("request", extra={"headers": {"authorization": f"Bearer {value}"}, "path": f"/?token={value}"})
    out = capsys.readouterr().err
    assert len(events(fmt, out)) == len(messages) + 1
    for leaked in (hub_token, value, static_key, key):
        assert leaked not in out
    assert key[:12] in out  # a key's listed prefix stays, to tell which key it was
    assert out.count(logs.REDACTED) >= len(messages) + 1


def test_user_input_cannot_forge_a_line(fmt, capsys):
    logs.configure(fmt, logging.DEBUG)
    name = f"bob\n{FORGED}\r{FORGED}\x1b[2J\x85{FORGED}\u2028{FORGED}\u2029{FORGED}"
    logging.getLogger("hub_extension.http").info("No such user: %s", name)
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and not re.search("[\r\x1b\x85\u2028\u2029]", out)
    [event] = events(fmt, out)
    if fmt == "json":
        assert event == "No such user: " + name
    else:
        assert "No such user: bob\\n[E 2026" in event and "\\r[E" in event and "\\x1b[2J\\x85[E" in event


def test_exception_tracebacks_are_redacted_and_one_line(fmt, capsys):
    logs.configure(fmt, logging.DEBUG)
    hub_token = secret()
    try:
        raise ValueError(f"bad request /?token={hub_token}\n{FORGED}")
    except ValueError:
        logging.getLogger("hub_extension.test").exception("failed for %s", "bob")
    out = capsys.readouterr().err
    [event] = events(fmt, out)
    assert "Traceback" in event and "ValueError" in event and hub_token not in out


def test_the_application_logger_uses_the_same_format(fmt, capsys):
    """traitlets gives `Application.log` a handler of its own (HubOAuth logs through it too)."""
    logs.configure(fmt, logging.DEBUG)
    app = InferenceService()
    hub_token = secret()
    app.log.warning("Storing token from url %s\n%s", f"/?token={hub_token}", FORGED)
    out = capsys.readouterr().err
    [event] = events(fmt, out)
    assert hub_token not in out and "Storing token from url /?token=" in event
    if fmt == "json":
        assert json.loads(out)["logger"] == "InferenceService"


def test_a_library_logger_with_a_handler_of_its_own_uses_ours(fmt, capsys):
    """transformers' continuous batching adds its own handler and format unless it finds `propagate` off."""
    logs.configure(fmt, logging.DEBUG)
    library = logging.getLogger("ContinuousBatchingLogger")
    assert not library.propagate
    library.info("batch for %s", f"bob\n{FORGED}")
    [event] = events(fmt, capsys.readouterr().err)
    assert "batch for bob" in event


def test_the_service_logs_no_secret_and_no_forged_line(fmt, capsys, tmp_path):
    static_key, hub_api_token, value = "sk-" + secret(), secret(), secret()
    cfg = Config()
    cfg.InferenceService.log_json = fmt == "json"
    cfg.InferenceService.port = port = free_port()
    cfg.InferenceService.db_url = f"sqlite:///{tmp_path / 'svc.sqlite'}"
    cfg.InferenceService.cookie_secret_file = str(tmp_path / "cookie-secret")
    cfg.IdentityProvider.mode = "hub"
    cfg.IdentityProvider.static_keys = [static_key]
    cfg.UserDirectory.sync_interval = 3600
    cfg.HubOAuth.api_url = f"http://127.0.0.1:{free_port()}/hub/api"  # no Hub: nothing here asks it
    cfg.HubOAuth.api_token = hub_api_token
    cfg.HubOAuth.oauth_client_id = "service-inference"
    service = ServiceThread(cfg)
    service.start()
    try:
        service.app.ready.wait(60)
        assert service.error is None, service.error
        url = f"http://127.0.0.1:{port}/"
        admin = {"Authorization": f"Bearer {static_key}"}
        assert requests.get(url + f"?token={value}").status_code == 401
        assert requests.get(url + f"oauth_callback?code={value}&state={value}").status_code >= 400
        assert requests.get(url + "v1/models/x%0a" + FORGED.replace(" ", "%20"), headers=admin).status_code == 404
        for model in (f"x\n{FORGED}", static_key):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            assert requests.post(url + "v1/chat/completions", headers=admin, json=body).status_code == 404
    finally:
        service.stop()
    captured = capsys.readouterr()
    out = captured.out + captured.err
    for leaked in (static_key, hub_api_token, value):
        assert leaked not in out
    text = "\n".join(events(fmt, out))
    assert "forged" in text and "InferenceService" in out  # the forged text was logged, inside one event
