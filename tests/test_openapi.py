"""The OpenAPI document (`/openapi.json`) against the route table: every route and method described, nothing
described that does not exist, and a valid OpenAPI 3.1 document that schemathesis loads."""

from __future__ import annotations

import re

import jsonschema
import pytest
import schemathesis
from schemathesis.core.result import Err
from schemathesis.specs.openapi.definitions import OPENAPI_31
from tornado import web
from traitlets.config import Config

from hub_extension import openapi
from hub_extension.app import PUBLIC_ROUTES, InferenceService
from hub_extension.handlers.base import APIHandler

METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def implemented(handler) -> set[str]:
    base = APIHandler if issubclass(handler, APIHandler) else web.RequestHandler
    return {m for m in METHODS if getattr(handler, m) is not getattr(base, m)}


def served_app(tmp_path, mode: str, **settings):
    """A real instance in `mode` (components, route table, document built as at start), not listening."""
    config = Config()
    config.IdentityProvider.mode = mode
    config.IdentityProvider.static_keys = ["a-static-key-for-the-test"]
    config.InferenceService.db_url = f"sqlite:///{tmp_path / 'svc.sqlite'}"
    config.InferenceService.cookie_secret_file = str(tmp_path / "cookie-secret")
    config.InferenceService.config_file = ""
    config.HubOAuth.api_url = "http://127.0.0.1:9/hub/api"  # never asked: nothing here calls the Hub
    config.HubOAuth.api_token = "a-hub-api-token-for-the-test"
    config.HubOAuth.oauth_client_id = "service-inference"
    for key, value in settings.items():
        setattr(config.InferenceService, key, value)
    app = InferenceService(config=config)
    app.initialize([])
    tornado_app = app.make_app()
    return app, tornado_app


@pytest.fixture(scope="module")
def hub_app(tmp_path_factory):
    app, tornado_app = served_app(tmp_path_factory.mktemp("openapi"), "hub", base_url="/services/inference/")
    yield app, tornado_app.settings["openapi_document"]
    app.services.db.close()


def test_every_route_and_method_is_described_and_nothing_else(hub_app):
    app, _ = hub_app
    routes = {pattern: implemented(handler) for pattern, handler in app.routes()}
    described = {pattern: set(ops) for pattern, (_, ops) in openapi.ROUTES.items()}
    missing = {(p, m) for p, ms in routes.items() for m in ms} - {(p, m) for p, ms in described.items() for m in ms}
    extra = {(p, m) for p, ms in described.items() for m in ms} - {(p, m) for p, ms in routes.items() for m in ms}
    assert not missing, f"routes or methods without an operation in hub_extension/openapi.py: {sorted(missing)}"
    assert not extra, f"operations for routes or methods that do not exist: {sorted(extra)}"


def test_the_served_document_is_this_instance_s_routes(hub_app, tmp_path):
    app, doc = hub_app
    assert doc["servers"] == [{"url": "/services/inference"}]
    assert set(doc["paths"]) == {openapi.ROUTES[p][0] for p, _ in app.routes() if p in openapi.ROUTES}
    assert doc["components"]["securitySchemes"]["hubCookie"]["name"] == app.services.identity.hub_auth.cookie_name
    # Without a Hub there is no account page and no OAuth callback, and so no description of them.
    static, tornado_app = served_app(tmp_path, "static")
    try:
        paths = set(tornado_app.settings["openapi_document"]["paths"])
        assert "/" not in paths and "/oauth_callback" not in paths and "/v1/chat/completions" in paths
    finally:
        static.services.db.close()


def test_path_templates_match_the_route_patterns():
    """Each OpenAPI path is its route pattern with every group replaced by one `{parameter}`, all declared."""
    for pattern, (path, ops) in openapi.ROUTES.items():
        groups = re.findall(r"\([^)]*\)", pattern)
        names = re.findall(r"\{(\w+)\}", path)
        assert len(groups) == len(names), (pattern, path)
        assert re.sub(r"\{\w+\}", "(G)", path) == re.sub(r"\([^)]*\)", "(G)", pattern), (pattern, path)
        for method, operation in ops.items():
            declared = {p["name"] for p in operation.get("parameters", []) if "name" in p and p["in"] == "path"}
            assert declared == set(names), (pattern, method)


def test_public_operations_are_the_public_routes():
    public = {p for p, (_, ops) in openapi.ROUTES.items() if all(op.get("security") == [] for op in ops.values())}
    assert public == set(PUBLIC_ROUTES)


def test_bounds_come_from_the_checks():
    from hub_extension import api_keys, protocol, quotas

    schemas = openapi.SCHEMAS
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["n"]["anyOf"][0]["maximum"] == protocol.MAX_N
    assert chat["stop"]["anyOf"][0]["anyOf"][1]["maxItems"] == protocol.MAX_STOP
    assert set(chat) == protocol.CHAT_PARAMS | protocol.HARMLESS
    assert set(schemas["CompletionRequest"]["properties"]) == protocol.COMPLETION_PARAMS | protocol.HARMLESS
    assert set(schemas["EmbeddingRequest"]["properties"]) == protocol.EMBEDDING_PARAMS | protocol.HARMLESS
    key = schemas["KeyRequest"]["properties"]
    assert key["name"]["maxLength"] == api_keys.MAX_NAME_LENGTH
    assert key["models"]["anyOf"][0]["maxItems"] == api_keys.MAX_KEY_MODELS
    assert set(schemas["Quota"]["properties"]) == set(quotas.FIELDS)
    assert schemas["Quota"]["properties"]["weight"]["anyOf"][0]["minimum"] == quotas.WEIGHT_RANGE[0]


def test_a_valid_openapi_3_1_document_that_schemathesis_loads(hub_app):
    _, doc = hub_app
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema), name
    schema = schemathesis.openapi.from_dict(doc)
    operations = list(schema.get_all_operations())
    errors = [result.err() for result in operations if isinstance(result, Err)]
    assert not errors
    assert len(operations) == sum(len(ops) for path, ops in doc["paths"].items())  # one per method
