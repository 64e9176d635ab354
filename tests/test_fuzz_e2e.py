"""Schemathesis against the live `/openapi.json`, through the Hub's proxy, with every kind of credential.

For each operation, cases made from the document (valid ones, and invalid ones schemathesis derives from it) are
sent as: a user's Hub token, a narrowed key of another user, a garbage credential, no credential, and an admin
(reads only: an admin's writes would change what the other tests of the session see). An admin's writes are
fuzzed too, against an instance of their own (`admin_target`: its own PostgreSQL database, the same Hub). Every answer must be
below 500, conform to the document (status, content type, body), never be a success without a valid credential,
and never hold anything of the victim, a user whose key names and prefix the callers must never see.
Bounded for CI: a few derandomized examples per operation, no shrinking, short generations.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from conftest import bearer, direct_instance
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from pg import temp_database
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from hub_extension.administration import ACT_AS_HEADER

# Examples per operation, mode and caller: about 1,000 requests in all by default; more by hand.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "4"))
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "cookie")
REAL_MODELS = {"/v1/chat/completions": "tiny-chat", "/v1/completions": "tiny-chat", "/v1/embeddings": "minilm"}
MAX_GENERATED_TOKENS = 4
JSON = "application/json"
BROWSER_PAGES = ("/", "/oauth_callback")  # redirects to a login, not 4xx: invalid data there is not "rejected"


@dataclass
class Caller:
    name: str
    headers: dict
    valid: bool  # a credential that authenticates (success is possible)
    reads_only: bool = False
    secrets: tuple[str, ...] = ()  # strings none of this caller's answers may contain


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)  # (caller, method, path, status) -> answers
    samples: dict = field(default_factory=dict)  # (caller, method, path, status) -> the first answer's start

    def add(self, caller: Caller, case, response, why: str) -> None:
        if len(self.problems) < 50:
            curl = case.as_curl_command(headers=caller.headers)
            self.problems.append(f"[{caller.name}] {case.operation.label}: {why}: {response.status_code} "
                                 f"{response.text[:300]!r}\n  {curl}")


@pytest.fixture(scope="module")
def target(hub):
    """The PostgreSQL instance's document, the callers, and the victim's key (name, prefix, id)."""
    instance = hub.instances["postgresql"]
    doc = requests.get(instance.url + "openapi.json", timeout=30)
    assert doc.status_code == 200 and doc.headers["Content-Type"].startswith("application/json")
    schema = schemathesis.openapi.from_dict(doc.json())

    nonce = secrets.token_hex(4)
    victim = hub.new_user("fuzzvictim")
    victim_token = hub.api.user_token(victim)
    victim_key = requests.post(instance.url + "api/keys", headers=bearer(victim_token), timeout=30,
                               json={"name": f"victim-key-{nonce}"}).json()
    user = hub.new_user("fuzzuser")
    narrow_owner = hub.new_user("fuzznarrow")
    narrowed = requests.post(instance.url + "api/keys", headers=bearer(hub.api.user_token(narrow_owner)),
                             json={"name": "narrow", "features": ["chat"], "models": ["tiny-chat"]}, timeout=30)
    assert narrowed.status_code == 201, narrowed.text
    admin = hub.new_admin()
    leaks = (victim, victim_key["name"], victim_key["prefix"], victim_key["key"])
    callers = [
        # The narrowed key first: the user's fuzzing never touches it, but order keeps each pass independent.
        Caller("narrowed key", bearer(narrowed.json()["key"]), valid=True, secrets=leaks),
        Caller("hub token", bearer(hub.api.user_token(user)), valid=True, secrets=leaks),
        Caller("garbage", bearer("garbage-" + secrets.token_hex(8)), valid=False, secrets=leaks),
        Caller("garbage key", bearer("jhi_" + secrets.token_hex(20)), valid=False, secrets=leaks),
        Caller("none", {}, valid=False, secrets=leaks),
        Caller("admin", bearer(hub.api.user_token(admin)), valid=True, reads_only=True),
    ]
    return instance, schema, callers, victim, victim_token, victim_key


def bound(case, mode: GenerationMode) -> None:
    """Keep generations short (the tiny model still runs them) and, for valid cases, ask for a served model."""
    body = case.body
    if case.operation.path not in REAL_MODELS or not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE:
        body["model"] = REAL_MODELS[case.operation.path]
        if case.operation.path != "/v1/embeddings":
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(name), int) and not isinstance(body.get(name), bool):
                    body[name] = min(body[name], MAX_GENERATED_TOKENS)
            if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                body["max_tokens"] = MAX_GENERATED_TOKENS
            if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool):
                body["n"] = min(body["n"], 2)


def check(caller: Caller, case, response, mode: GenerationMode, findings: Findings) -> None:
    public = case.operation.definition.raw.get("security") == []
    status = response.status_code
    if status >= 500:
        findings.add(caller, case, response, "server error")
    if not caller.valid and not public and 200 <= status < 300:
        findings.add(caller, case, response, "success without a valid credential")
    for secret in caller.secrets:
        if secret and secret in response.text:
            findings.add(caller, case, response, f"the victim's data in the answer ({secret[:12]}...)")
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE and caller.valid and case.operation.path not in BROWSER_PAGES:
        checks.append(negative_data_rejection)
    try:
        case.validate_response(response, checks=checks, headers=caller.headers)
    except (AssertionError, Failure, FailureGroup) as e:
        findings.add(caller, case, response, f"does not conform: {str(e)[:400]}")


def fuzz(base_url: str, operation, caller: Caller, mode: GenerationMode, findings: Findings,
         path_parameters: dict | None = None) -> None:
    session = requests.Session()

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case) -> None:
        send(case)

    def send(case) -> None:
        for name in list(case.headers or {}):
            if name.lower() in CREDENTIAL_HEADERS:  # the caller's credential only (none for "none")
                del case.headers[name]
        bound(case, mode)
        response = case.call(base_url=base_url, session=session, headers=caller.headers, timeout=120)
        findings.requests += 1
        seen = (caller.name, case.operation.method.upper(), case.operation.path, response.status_code)
        findings.statuses[seen] += 1
        findings.samples.setdefault(seen, response.text[:160])
        check(caller, case, response, mode, findings)

    # The document's own example first: a valid request that reaches the models or the key store.
    example = operation.definition.raw.get("requestBody", {}).get("content", {}).get(JSON, {}).get("example")
    if mode is GenerationMode.POSITIVE and example is not None:
        send(operation.Case(body=copy.deepcopy(example), media_type=JSON))
    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
        assert mode is GenerationMode.NEGATIVE


def test_fuzzing_finds_nothing(target):
    instance, schema, callers, victim, victim_token, victim_key = target
    base_url = instance.url.rstrip("/")
    findings = Findings()
    operations = [result.ok() for result in schema.get_all_operations()]
    for caller in callers:
        for operation in operations:
            if caller.reads_only and operation.method.upper() != "GET":
                continue
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(base_url, operation, caller, mode, findings)
    assert not findings.problems, f"{len(findings.problems)} problem(s):\n" + "\n".join(findings.problems)
    # The fuzzer got past the checks, not only refused: valid cases reached the models and the key store.
    succeeded = {(c, m, p) for (c, m, p, status), n in findings.statuses.items() if 200 <= status < 300}
    for expected in [("hub token", "POST", "/v1/chat/completions"), ("hub token", "POST", "/v1/completions"),
                     ("hub token", "POST", "/v1/embeddings"), ("hub token", "POST", "/api/keys"),
                     ("narrowed key", "POST", "/v1/chat/completions"), ("admin", "GET", "/api/users")]:
        assert expected in succeeded, [(k[3], n, findings.samples[k]) for k, n in findings.statuses.items()
                                        if k[:3] == expected]
    # The victim's key survived everyone else's fuzzing and still works.
    r = requests.get(instance.url + "v1/models", headers=bearer(victim_key["key"]), timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def admin_target(hub, model_config_file, tmp_path_factory):
    """An instance of its own for an admin's writes: its own PostgreSQL database, the session's Hub (read only:
    no admin route writes to the Hub), reached directly on loopback. Its document and an admin's credential."""
    tmp = tmp_path_factory.mktemp("fuzz-admin")
    with temp_database("jhi_fuzz") as db_url, direct_instance(hub, model_config_file, db_url, tmp, "fuzz") as url:
        url = url.rstrip("/")
        schema = schemathesis.openapi.from_dict(requests.get(url + "/openapi.json", timeout=30).json())
        admin = Caller("admin", bearer(hub.api.user_token(hub.new_admin())), valid=True)
        subject = hub.new_user("fuzzsubject")  # a user the instance knows, for the routes that name one
        assert requests.get(url + "/api/me", headers=bearer(hub.api.user_token(subject)), timeout=30).ok
        yield url, schema, admin, subject


def test_an_admins_writes_find_nothing(admin_target):
    """Every admin operation, valid and invalid cases: no 5xx, answers as documented, invalid input refused."""
    url, schema, admin, subject = admin_target
    findings = Findings()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/api/"):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(url, operation, admin, mode, findings)
            if "name" in {p.name for p in operation.path_parameters}:  # and aimed at a user who exists
                fuzz(url, operation, admin, mode, findings, {"name": subject})
    assert not findings.problems, f"{len(findings.problems)} problem(s):\n" + "\n".join(findings.problems)
    succeeded = {(m, p) for (_c, m, p, status), n in findings.statuses.items() if 200 <= status < 300}
    writes = {(m, p) for m, p in succeeded if m != "GET"}
    assert {("POST", "/api/invites"), ("PUT", "/api/users/{name}/grants")} <= writes and len(writes) >= 10, writes
    assert requests.get(url + "/health", timeout=30).status_code == 200


def aim(base_url: str, operation, caller: Caller, path_parameters: dict, findings: Findings) -> None:
    """Cases of `operation` with the victim's name or key id in the path: each must be refused (4xx)."""
    session = requests.Session()

    @settings(max_examples=3, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(path_parameters=path_parameters))
    def run(case) -> None:
        for name in list(case.headers or {}):
            if name.lower() in CREDENTIAL_HEADERS or name == ACT_AS_HEADER:
                del case.headers[name]
        response = case.call(base_url=base_url, session=session, headers=caller.headers, timeout=60)
        findings.requests += 1
        if not 400 <= response.status_code < 500:
            findings.add(caller, case, response, "aimed at the victim: not refused")
        for secret in caller.secrets:
            if secret in response.text:
                findings.add(caller, case, response, "the victim's data in the answer")

    run()


def test_aimed_at_the_victim_nothing_succeeds(target):
    """Every operation with the victim's name or key id in its path, as each non-admin caller: never a success,
    and the victim's key still works."""
    instance, schema, callers, victim, victim_token, victim_key = target
    base_url = instance.url.rstrip("/")
    findings = Findings()
    for caller in [c for c in callers if c.name != "admin"]:
        for result in schema.get_all_operations():
            operation = result.ok()
            names = {p.name for p in operation.path_parameters}
            if not names & {"name", "key_id"}:
                continue
            fixed = {"name": victim, "key_id": str(victim_key["id"])}
            aim(base_url, operation, caller, {k: v for k, v in fixed.items() if k in names}, findings)
    assert findings.requests > 20
    assert not findings.problems, "\n".join(findings.problems)
    keys = requests.get(instance.url + "api/keys", headers=bearer(victim_token), timeout=30).json()["keys"]
    assert [k["id"] for k in keys] == [victim_key["id"]]


def test_key_ids_past_the_id_column_are_404(hub, instance):
    """Found by the fuzzer: an id past PostgreSQL's INTEGER (2**31 - 1) was a 500 ("integer out of range")."""
    token = bearer(hub.api.user_token(hub.new_user("fuzzid")))
    admin = bearer(hub.api.user_token(hub.new_admin()))
    for key_id in ("2147483648", "75866105046", "9999999999"):
        assert requests.delete(instance.url + f"api/keys/{key_id}", headers=token, timeout=30).status_code == 404
        r = requests.delete(instance.url + f"api/users/{hub.new_user('fuzzid')}/keys/{key_id}", headers=admin,
                            timeout=30)
        assert r.status_code == 404, r.text
    # The same bound for the other numeric ids in paths (an admin's invite, a document in one's own collection).
    requests.post(instance.url + "api/collections", headers=token, json={"name": "ids"}, timeout=30)
    for key_id in ("2147483648", "75866105046"):
        r = requests.delete(instance.url + f"api/invites/{key_id}", headers=admin, timeout=30)
        assert 400 <= r.status_code < 500, r.text
        r = requests.delete(instance.url + f"api/collections/ids/documents/{key_id}", headers=token, timeout=30)
        assert r.status_code == 404, r.text


def test_a_large_body_refused_before_it_is_read_is_answered_not_reset(hub, instance):
    """Found by the fuzzer: a dead credential with a 2 MB body was refused before the body was read, the socket
    closed with the body unread, and the Hub's proxy answered its own 503 page instead of the 401."""
    body = b'{"name": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    for headers in ({}, bearer("garbage-" + secrets.token_hex(8))):
        for _ in range(2):  # and the proxy's next request on the same upstream connection works too
            r = requests.post(instance.url + "api/keys", data=body, timeout=60,
                              headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text[:200]
    r = requests.get(instance.url + "health", timeout=30)
    assert r.status_code == 200
