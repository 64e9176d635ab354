"""The service's API as an OpenAPI 3.1 document (`GET /openapi.json`), kept as data next to the code it describes.

Every bound in a request schema is the constant the handler or component checks (`protocol.MAX_N`,
`api_keys.MAX_NAME_LENGTH`, `quotas.WEIGHT_RANGE`, ...), imported here, so the document cannot drift from the
checks. `ROUTES` is keyed by the route table's own patterns: `tests/test_openapi.py` fails when a route or a
method has no operation here, or an operation describes a route that does not exist. Schemathesis fuzzes the
service against this document (`tests/test_fuzz_e2e.py`).
"""

from __future__ import annotations

from typing import Any

from . import __version__, protocol
from .administration import ACT_AS_HEADER, AUDIT_LIMIT_MAX
from .api_keys import MAX_KEY_MODELS, MAX_NAME_LENGTH
from .handlers.account import MAX_ROW_ID
from .knowledge import MAX_DESCRIPTION_CHARS, MAX_QUERY_CHARS, MAX_TITLE_CHARS, KnowledgeBase
from .login.store import INVITE_DAYS_MAX, INVITE_GROUPS_MAX, INVITE_NOTE_MAX
from .orm import UserStatus
from .permissions import MAX_GRANTS_PER_SUBJECT
from .presets import NAME_RE as RESOURCE_NAME_RE
from .presets import NAME_RULE as RESOURCE_NAME_RULE
from .presets import PARAMETERS as PRESET_PARAMETERS
from .presets import PresetStore
from .quotas import FIELDS as QUOTA_FIELDS
from .quotas import MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_LIMIT, WEIGHT_RANGE
from .scopes import FEATURES
from .usage import BUCKETS, GROUPS, MAX_USERS

OPENAPI_VERSION = "3.1.0"
MAX_KEY_DAYS = 36500  # api_keys.KeyManager.validate_request: expires_in_days from 1 to this
MAX_GRANT_NAME = 128  # permissions.PermissionPolicy.parse_grants: a feature or model name in a grant
STATUS_ACTIONS = ("approve", "deny", "disable", "enable")  # the action group of the user status route

JSON = "application/json"


# -- building blocks --------------------------------------------------------------------------------------


def ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict, required: tuple[str, ...] = (), *, closed: bool = False, **extra: Any) -> dict:
    """An object schema; `closed`: unknown fields are refused (what the request parsers do)."""
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if closed:
        out["additionalProperties"] = False
    return out | extra


def json_body(schema: dict, description: str = "", example: dict | None = None) -> dict:
    media: dict[str, Any] = {"schema": schema} | ({"example": example} if example is not None else {})
    body = {"required": True, "content": {JSON: media}}
    return body | ({"description": description} if description else {})


def answer(description: str, schema: dict | None = None, media: str = JSON, also: dict | None = None) -> dict:
    """A response; `also`: more media types it may come as ({media type: schema})."""
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}, **{m: {"schema": s} for m, s in (also or {}).items()}}
    return out


def path_param(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1}}


def query_param(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


# Errors every authenticated operation may answer, besides its own.
AUTH_ERRORS = {
    "401": ref("responses", "Unauthorized"),
    "403": ref("responses", "Forbidden"),
}
BODY_ERRORS = {"400": ref("responses", "BadRequest"), "413": ref("responses", "PayloadTooLarge")}


def op(
    summary: str,
    responses: dict,
    *,
    tags: tuple[str, ...],
    params: tuple[dict, ...] = (),
    body: dict | None = None,
    public: bool = False,
    description: str = "",
) -> dict:
    """One operation. Authenticated ones take the act-as header and may answer 401/403; every error (any other
    status included) is the JSON error envelope, so `default` says so."""
    out: dict[str, Any] = {"summary": summary, "tags": list(tags), "responses": dict(responses)}
    if description:
        out["description"] = description
    parameters = list(params)
    if public:
        out["security"] = []
    else:
        parameters.append(ref("parameters", "ActAs"))
        for status, response in AUTH_ERRORS.items():
            out["responses"].setdefault(status, response)
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = body
        for status, response in BODY_ERRORS.items():
            out["responses"].setdefault(status, response)
    out["responses"].setdefault("default", ref("responses", "Error"))
    return out


# -- schemas ----------------------------------------------------------------------------------------------

NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH}
ISO_TIME = {"type": "string", "description": "ISO 8601, UTC (`2026-01-31T12:00:00Z`)"}
FEATURE = {"type": "string", "enum": list(FEATURES)}
MODEL_TEXT_PARTS = {
    "type": "array",
    "items": obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text")),
}
HARMLESS_PARAMS = {name: {"description": "Accepted and ignored: it cannot change the answer."}
                   for name in sorted(protocol.HARMLESS)}
SAMPLING = {
    "model": {"type": "string", "minLength": 1},
    "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2, "default": 1}),
    "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1, "default": 1}),
    "n": nullable({"type": "integer", "minimum": 1, "maximum": protocol.MAX_N, "default": 1}),
    "stop": nullable({"anyOf": [{"type": "string"},
                                {"type": "array", "items": {"type": "string"}, "maxItems": protocol.MAX_STOP}]}),
    "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
    "stream": nullable({"type": "boolean", "default": False}),
    "stream_options": nullable(obj({"include_usage": {"type": "boolean"}},
                                   description="Only with `stream: true`: end with a chunk holding the usage.")),
}
MAX_TOKENS = nullable({"type": "integer", "minimum": 1})
TOKEN_IDS = {"type": "array", "items": {"type": "integer"}, "minItems": 1,
             "maxItems": protocol.MAX_PROMPT_TOKEN_IDS}

def _default(cls, trait: str):
    """A configurable bound's default (the document states the defaults; a site may configure others)."""
    return cls.class_traits()[trait].default_value


RESOURCE_NAME = {"type": "string", "pattern": RESOURCE_NAME_RE.pattern, "description": RESOURCE_NAME_RULE}

SCHEMAS: dict[str, dict] = {
    "Error": obj(
        {"error": obj(
            {"message": {"type": "string"}, "type": {"type": "string"}, "param": nullable({"type": "string"}),
             "code": nullable({"type": "string"})},
            ("message", "type", "param", "code"), closed=True,
        )},
        ("error",), closed=True,
        description="Every error, on /v1 and /api alike: OpenAI's error envelope, which the openai SDK maps to "
                    "its exceptions. `code` is machine-readable (`invalid_api_key`, `permission_denied`, "
                    "`model_not_found`, `rate_limit_exceeded`, ...).",
    ),
    # -- /v1 requests --
    "ChatMessage": obj(
        {"role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
         "content": nullable({"anyOf": [{"type": "string"}, MODEL_TEXT_PARTS]}),
         "name": {}, "refusal": {}},
        ("role",), closed=True,
        description="Text only; `content` may be null for an assistant message only. `developer` counts as `system`.",
    ),
    "ChatCompletionRequest": obj(
        {**SAMPLING, "messages": {"type": "array", "items": ref("schemas", "ChatMessage"), "minItems": 1},
         "max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, **HARMLESS_PARAMS},
        ("model", "messages"), closed=True,
        description="OpenAI's chat completion request. Parameters this server does not do (tools, logprobs, "
                    f"penalties, ...: {', '.join(sorted(protocol.UNSUPPORTED))}) answer 400 "
                    "`unsupported_parameter` unless sent with their no-op value; unknown ones 400 "
                    "`unknown_parameter`. Give `max_tokens` or `max_completion_tokens`, not both.",
    ),
    "CompletionRequest": obj(
        {**SAMPLING, "max_tokens": nullable({"type": "integer", "minimum": 1, "default": 16}),
         "prompt": {"anyOf": [
             {"type": "string", "minLength": 1},
             {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
              "maxItems": protocol.MAX_INPUTS},
             TOKEN_IDS,
             {"type": "array", "items": TOKEN_IDS, "minItems": 1, "maxItems": protocol.MAX_INPUTS},
         ], "description": f"At most {protocol.MAX_INPUTS} prompts and {protocol.MAX_PROMPT_TOKEN_IDS} token ids "
                           "in all; an empty prompt, or one that leaves no room in the model's context, is 400."},
         **{k: v for k, v in HARMLESS_PARAMS.items() if k != "prompt"}},
        ("model", "prompt"), closed=True,
    ),
    "EmbeddingRequest": obj(
        {"model": {"type": "string", "minLength": 1},
         "input": {"anyOf": [
             {"type": "string", "minLength": 1},
             {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
              "maxItems": protocol.MAX_INPUTS},
         ], "description": f"At most {protocol.MAX_INPUTS} texts and {protocol.MAX_INPUT_CHARS} characters in all."},
         "encoding_format": nullable({"type": "string", "enum": ["float", "base64"], "default": "float"}),
         "dimensions": nullable({"type": "integer", "minimum": 1,
                                 "description": "Must equal the model's own dimensions."}),
         **HARMLESS_PARAMS},
        ("model", "input"), closed=True,
    ),
    # -- /v1 answers --
    "Model": obj(
        {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
         "owned_by": {"const": protocol.OWNED_BY},
         "task": {"type": "string", "enum": ["chat", "completion", "embedding"]}},
        ("id", "object", "created", "owned_by"),
    ),
    "ModelList": obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("schemas", "Model")}},
                     ("object", "data")),
    "Usage": obj({"prompt_tokens": {"type": "integer", "minimum": 0},
                  "completion_tokens": {"type": "integer", "minimum": 0},
                  "total_tokens": {"type": "integer", "minimum": 0}},
                 ("prompt_tokens", "total_tokens")),
    "ChatCompletion": obj(
        {"id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
         "model": {"type": "string"}, "system_fingerprint": {"type": "null"},
         "choices": {"type": "array", "items": obj(
             {"index": {"type": "integer"}, "finish_reason": nullable({"type": "string"}),
              "logprobs": {"type": "null"},
              "message": obj({"role": {"const": "assistant"}, "content": {"type": "string"},
                              "refusal": {"type": "null"}}, ("role", "content"))},
             ("index", "message", "finish_reason"))},
         "usage": ref("schemas", "Usage")},
        ("id", "object", "created", "model", "choices", "usage"),
    ),
    "Completion": obj(
        {"id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
         "model": {"type": "string"}, "system_fingerprint": {"type": "null"},
         "choices": {"type": "array", "items": obj(
             {"index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": "null"},
              "finish_reason": nullable({"type": "string"})},
             ("index", "text", "finish_reason"))},
         "usage": ref("schemas", "Usage")},
        ("id", "object", "created", "model", "choices", "usage"),
    ),
    "EventStream": {
        "type": "string",
        "description": "Server-sent events: `data: <chunk JSON>` per delta (OpenAI's `chat.completion.chunk` or "
                       "`text_completion`), an error envelope if the engine fails mid-stream, then `data: [DONE]`.",
    },
    "EmbeddingList": obj(
        {"object": {"const": "list"}, "model": {"type": "string"},
         "data": {"type": "array", "items": obj(
             {"object": {"const": "embedding"}, "index": {"type": "integer"},
              "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}],
                            "description": "floats, or base64 of little-endian float32"}},
             ("object", "index", "embedding"))},
         "usage": ref("schemas", "Usage")},
        ("object", "model", "data", "usage"),
    ),
    # -- /api requests --
    "KeyRequest": obj(
        {"name": {**NAME, "description": "Printable; surrounding spaces are dropped."},
         "expires_in_days": nullable({"type": "integer", "minimum": 1, "maximum": MAX_KEY_DAYS,
                                      "description": "null: never (unless KeyManager.max_lifetime_days)."}),
         "features": nullable({"type": "array", "items": FEATURE, "maxItems": len(FEATURES),
                               "description": "Narrow the key to these features (null: the owner's)."}),
         "models": nullable({"type": "array", "items": NAME, "maxItems": MAX_KEY_MODELS,
                             "description": "Narrow the key to these models (null: the owner's)."})},
        ("name",), closed=True,
    ),
    "Grants": obj(
        {"features": nullable({"type": "object", "propertyNames": FEATURE, "additionalProperties": {"type": "boolean"}}),
         "models": nullable({"type": "object", "maxProperties": MAX_GRANTS_PER_SUBJECT,
                             "propertyNames": {"type": "string", "minLength": 1, "maxLength": MAX_GRANT_NAME},
                             "additionalProperties": {"type": "boolean"},
                             "description": "Model names (printable); `*` stands for every other model."})},
        closed=True, description="`PUT`: the subject's grants become exactly these.",
    ),
    "GrantsPatch": obj(
        {"features": nullable({"type": "object", "propertyNames": FEATURE,
                               "additionalProperties": nullable({"type": "boolean"})}),
         "models": nullable({"type": "object", "maxProperties": MAX_GRANTS_PER_SUBJECT,
                             "propertyNames": {"type": "string", "minLength": 1, "maxLength": MAX_GRANT_NAME},
                             "additionalProperties": nullable({"type": "boolean"})})},
        closed=True, description="`PATCH`: merged into the subject's grants; null removes one.",
    ),
    "Quota": obj(
        {"tokens_per_day": nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOKENS_LIMIT}),
         "tokens_per_month": nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOKENS_LIMIT}),
         "requests_per_minute": nullable({"type": "integer", "minimum": 0, "maximum": MAX_REQUESTS_PER_MINUTE}),
         "weight": nullable({"type": "number", "minimum": WEIGHT_RANGE[0], "maximum": WEIGHT_RANGE[1]})},
        closed=True, description="0: unlimited; null: nothing at this level (the next level decides). A missing "
                                 "field is null: `PUT` replaces the whole row.",
    ),
    # -- /api answers --
    "Me": obj(
        {"name": {"type": "string"}, "role": {"type": "string", "enum": ["admin", "user"]},
         "groups": {"type": "array", "items": {"type": "string"}},
         "authenticated_via": {"type": "string", "enum": ["none", "static_key", "api_key", "hub_token", "hub_cookie"]},
         "key_id": nullable({"type": "integer"}), "acting_admin": nullable({"type": "string"}),
         "status": {"type": "string", "enum": list(UserStatus.ALL)}},
        ("name", "role", "groups", "authenticated_via", "key_id", "acting_admin", "status"),
    ),
    "Decision": obj({"allowed": {"type": "boolean"}, "source": {"type": "string"}, "via": {"type": "string"}},
                    ("allowed", "source")),
    "EffectivePermissions": obj(
        {"user": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}},
         "precedence": {"type": "string"},
         "features": {"type": "object", "additionalProperties": ref("schemas", "Decision")},
         "models": {"type": "object", "additionalProperties": ref("schemas", "Decision")},
         "other_models": ref("schemas", "Decision"), "hub_scopes": {"type": "array", "items": {"type": "string"}},
         "key": obj({"id": {"type": "integer"}, "features": nullable({"type": "array", "items": {"type": "string"}}),
                     "models": nullable({"type": "array", "items": {"type": "string"}})}),
         "acting_admin": {"type": "string"}},
        ("user", "groups", "features", "models", "other_models", "hub_scopes"),
    ),
    "Key": obj(
        {"id": {"type": "integer"}, "name": {"type": "string"},
         "prefix": {"type": "string", "description": "The key's first characters, for recognising it."},
         "created_at": ISO_TIME, "expires_at": nullable(ISO_TIME), "last_used": nullable(ISO_TIME),
         "revoked_at": nullable(ISO_TIME), "features": nullable({"type": "array", "items": {"type": "string"}}),
         "models": nullable({"type": "array", "items": {"type": "string"}}), "created_by": nullable({"type": "string"})},
        ("id", "name", "prefix", "created_at", "expires_at", "revoked_at", "features", "models"),
        description="A key as listed: never its secret.",
    ),
    "NewKey": {"allOf": [ref("schemas", "Key"), obj({"key": {"type": "string", "description":
                                                             "The secret, shown this once only."}}, ("key",))]},
    "KeyList": obj({"keys": {"type": "array", "items": ref("schemas", "Key")}}, ("keys",)),
    "Revoked": obj({"revoked": {"type": "integer", "minimum": 0}}, ("revoked",)),
    "User": obj(
        {"name": {"type": "string"}, "role": {"type": "string", "enum": ["admin", "user"]},
         "status": nullable({"type": "string", "enum": list(UserStatus.ALL)}),
         "groups": {"type": "array", "items": {"type": "string"}},
         "roles": {"type": "array", "items": {"type": "string"}}, "in_hub": {"type": "boolean"},
         "created_at": nullable(ISO_TIME), "last_seen": nullable(ISO_TIME), "hub_last_activity": nullable(ISO_TIME),
         "usage_30d": obj({"requests": {"type": "integer", "minimum": 0},
                           "total_tokens": {"type": "integer", "minimum": 0}}, ("requests", "total_tokens"),
                          description="Requests and tokens of the last 30 days.")},
        ("name", "role", "status", "groups", "roles"),
        description="`status` is null for a Hub user who has not used the service yet.",
    ),
    "UserList": obj({"users": {"type": "array", "items": ref("schemas", "User")}}, ("users",)),
    "UserDetail": {"allOf": [ref("schemas", "User"), obj(
        {"grants": ref("schemas", "GrantsModel"), "permissions": ref("schemas", "EffectivePermissions")},
        ("grants", "permissions"))]},
    "GrantsModel": obj(
        {"features": {"type": "object", "additionalProperties": {"type": "boolean"}},
         "models": {"type": "object", "additionalProperties": {"type": "boolean"}}},
        ("features", "models"),
    ),
    "AuditEvents": obj({"events": {"type": "array", "items": obj(
        {"id": {"type": "integer"}, "time": ISO_TIME, "actor": nullable({"type": "string"}),
         "acting_as": nullable({"type": "string"}), "subject": nullable({"type": "string"}),
         "action": {"type": "string"}, "details": {}, "client_ip": nullable({"type": "string"})},
        ("id", "time", "actor", "action"))}}, ("events",)),
    "QuotaWindow": obj(
        {"limit": nullable({"type": "integer"}), "used": {"type": "integer"}, "reserved": {"type": "integer"},
         "remaining": nullable({"type": "integer"}), "resets_at": nullable(ISO_TIME), "source": {"type": "string"}},
        ("limit", "used", "remaining", "source"), description="`limit` null: unlimited.",
    ),
    "QuotaRemaining": obj(
        {"user": {"type": "string"}, "precedence": {"type": "string"},
         "limits": obj({name: ref("schemas", "QuotaWindow") for name in QUOTA_FIELDS if name != "weight"}),
         "weight": obj({"value": {"type": "number"}, "source": {"type": "string"}}, ("value", "source"))},
        ("user", "limits", "weight"),
    ),
    "QuotaRow": obj(
        {"subject_kind": {"type": "string", "enum": ["user", "group", "default"]}, "subject": {"type": "string"},
         **{name: nullable({"type": "number"}) for name in QUOTA_FIELDS},
         "effective": ref("schemas", "QuotaRemaining")},
        ("subject_kind", "subject", *QUOTA_FIELDS),
        description="One subject's row (every field null when none); a user's also has `effective`.",
    ),
    "UsageReport": obj(
        {"bucket": {"type": "string", "enum": list(BUCKETS)}, "group_by": nullable({"type": "string"}),
         "since": ISO_TIME, "until": ISO_TIME,
         "rows": {"type": "array", "items": obj(
             {"bucket": {"type": "string"}, "group": nullable({"type": "string"}),
              **{n: {"type": "integer"} for n in ("requests", "errors", "prompt_tokens", "completion_tokens",
                                                   "total_tokens")}},
             ("bucket", "group", "requests", "total_tokens"))},
         "totals": {"type": "object", "additionalProperties": {"type": "integer"}}},
        ("bucket", "group_by", "since", "until", "rows", "totals"),
    ),
    # -- presets and collections (feature `resources`) --
    "PresetRequest": obj(
        {"name": RESOURCE_NAME, "model": {"type": "string", "minLength": 1, "maxLength": 255,
                                          "description": "A chat model the caller may use."},
         "system_prompt": nullable({"type": "string", "maxLength": _default(PresetStore, "max_system_prompt_chars")}),
         "parameters": nullable(obj({name: SAMPLING.get(name, MAX_TOKENS) for name in PRESET_PARAMETERS}, closed=True,
                                    description="Checked as a chat request checks them."))},
        ("name", "model"), closed=True,
    ),
    "PresetPatch": obj(
        {"name": RESOURCE_NAME, "model": {"type": "string", "minLength": 1, "maxLength": 255},
         "system_prompt": nullable({"type": "string", "maxLength": _default(PresetStore, "max_system_prompt_chars")}),
         "parameters": nullable({"type": "object"})},
        closed=True, description="Only the fields given change.",
    ),
    "Preset": obj(
        {"name": {"type": "string"}, "model": {"type": "string"}, "system_prompt": nullable({"type": "string"}),
         "parameters": {"type": "object"}, "created_at": ISO_TIME, "updated_at": ISO_TIME,
         "user": {"type": "string"}},
        ("name", "model", "parameters"),
        description="Use it as `model: \"preset:<name>\"` in a chat request.",
    ),
    "PresetList": obj({"presets": {"type": "array", "items": ref("schemas", "Preset")}}, ("presets",)),
    "CollectionRequest": obj(
        {"name": RESOURCE_NAME, "description": nullable({"type": "string", "maxLength": MAX_DESCRIPTION_CHARS})},
        ("name",), closed=True,
    ),
    "Collection": obj(
        {"name": {"type": "string"}, "description": nullable({"type": "string"}),
         "embedding_model": {"type": "string"}, "documents": {"type": "integer"}, "chunks": {"type": "integer"},
         "created_at": ISO_TIME, "updated_at": ISO_TIME, "user": {"type": "string"}},
        ("name", "documents", "chunks"),
    ),
    "CollectionList": obj({"collections": {"type": "array", "items": ref("schemas", "Collection")}},
                          ("collections",)),
    "DocumentsRequest": obj(
        {"documents": {"type": "array", "minItems": 1,
                       "maxItems": _default(KnowledgeBase, "max_documents_per_request"),
                       "items": {"anyOf": [
                           {"type": "string", "minLength": 1, "maxLength": _default(KnowledgeBase, "max_document_chars")},
                           obj({"text": {"type": "string", "minLength": 1,
                                         "maxLength": _default(KnowledgeBase, "max_document_chars")},
                                "title": nullable({"type": "string", "maxLength": MAX_TITLE_CHARS})},
                               ("text",), closed=True)]}}},
        ("documents",), description="Texts must not be blank. Embedded with the collection's model.",
    ),
    "DocumentList": obj({"documents": {"type": "array", "items": obj(
        {"id": {"type": "integer"}, "title": {"type": "string"}, "characters": {"type": "integer"},
         "chunks": {"type": "integer"}, "created_at": ISO_TIME}, ("id", "title"))}}, ("documents",)),
    "SearchRequest": obj(
        {"query": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS},
         "top_k": {"type": "integer", "minimum": 1, "maximum": _default(KnowledgeBase, "max_top_k"), "default": 5}},
        ("query",), description="A blank query is 400.",
    ),
    "SearchResults": obj(
        {"results": {"type": "array", "items": obj(
            {"text": {"type": "string"}, "position": {"type": "integer"}, "score": {"type": "number"},
             "document": obj({"id": {"type": "integer"}, "title": {"type": "string"}}, ("id",))},
            ("text", "score", "document"))},
         "usage": ref("schemas", "Usage")},
        ("results",),
    ),
    "Deleted": obj({"deleted": {"type": "integer", "minimum": 0}}, ("deleted",)),
    # -- invites and local passwords (admins) --
    "InviteRequest": obj(
        {"expires_in_days": {"type": "number", "exclusiveMinimum": 0, "maximum": INVITE_DAYS_MAX, "default": 7},
         "note": nullable({"type": "string", "maxLength": INVITE_NOTE_MAX}),
         "groups": nullable({"type": "array", "maxItems": INVITE_GROUPS_MAX,
                             "items": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$"}})},
        closed=True,
    ),
    "Invite": obj(
        {"id": {"type": "integer"}, "prefix": {"type": "string"}, "note": nullable({"type": "string"}),
         "groups": {"type": "array", "items": {"type": "string"}},
         "status": {"type": "string", "enum": ["active", "used", "expired", "revoked"]},
         "created_at": ISO_TIME, "created_by": nullable({"type": "string"}), "expires_at": nullable(ISO_TIME),
         "used_at": nullable(ISO_TIME), "used_by": nullable({"type": "string"}), "revoked_at": nullable(ISO_TIME)},
        ("id", "status"),
    ),
    "NewInvite": {"allOf": [ref("schemas", "Invite"), obj(
        {"code": {"type": "string"}, "url": {"type": "string"}}, ("code", "url"),
        description="The code and link, shown this once only.")]},
    "InviteList": obj({"invites": {"type": "array", "items": ref("schemas", "Invite")}}, ("invites",)),
    "PasswordRequest": obj({"password": {"type": "string", "description": "Empty body: one is generated."}},
                           closed=True),
    "PasswordSet": obj({"name": {"type": "string"},
                        "password": {"type": "string", "description": "Only when generated; shown once."}},
                       ("name",)),
}

# -- parameters -------------------------------------------------------------------------------------------

USER = path_param("name", "A Hub user's name.")
GROUP = path_param("group", "A Hub group's name.")
KEY_ID = path_param("key_id", f"A key's id, 1 to {MAX_ROW_ID} (anything else is 404).",
                    {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID})
EMPTY = "; empty is the same as absent"  # these arguments are read as `value or default`
INCLUDE_REVOKED = query_param("include_revoked", "`true`: list revoked and expired keys too" + EMPTY,
                              {"type": "string", "enum": ["true", "false", ""], "default": "false"})
SINCE = query_param("since", "Start, ISO 8601 (default: 30 days before `until`).", ISO_TIME)
UNTIL = query_param("until", "End, ISO 8601 (default: now); at most two years after `since`.", ISO_TIME)
BUCKET = query_param("bucket", "Sum by hour, day or month" + EMPTY,
                     {"type": "string", "enum": [*BUCKETS, ""], "default": "day"})
FORMAT = query_param("format", "`csv` for CSV (also `Accept: text/csv`).", {"type": "string", "enum": ["json", "csv"]})
PRESET = path_param("preset", RESOURCE_NAME_RULE, RESOURCE_NAME)
COLLECTION = path_param("collection", RESOURCE_NAME_RULE, RESOURCE_NAME)
OWN_GROUPS = [g for g in GROUPS if g != "user"] + ["none"]

KEYS_TAG, ADMIN_TAG, V1_TAG, QUOTA_TAG, USAGE_TAG = ("keys",), ("admin",), ("openai",), ("quotas",), ("usage",)
ME_TAG, SERVICE_TAG, RES_TAG = ("account",), ("service",), ("resources",)


def _grants_ops(kind: str, param: dict) -> dict:
    who = "user" if kind == "user" else "group"
    missing = {"404": ref("responses", "NotFound")}
    return {
        "get": op(f"A {who}'s grants", {"200": answer("Grants", ref("schemas", "GrantsModel")), **missing},
                  tags=ADMIN_TAG, params=(param,)),
        "put": op(f"Replace a {who}'s grants", {"200": answer("The new grants", ref("schemas", "GrantsModel")),
                                                **missing},
                  tags=ADMIN_TAG, params=(param,), body=json_body(ref("schemas", "Grants"))),
        "patch": op(f"Change some of a {who}'s grants",
                    {"200": answer("The new grants", ref("schemas", "GrantsModel")), **missing},
                    tags=ADMIN_TAG, params=(param,), body=json_body(ref("schemas", "GrantsPatch"))),
        "delete": op(f"Remove all of a {who}'s grants",
                     {"200": answer("The grants left (none)", ref("schemas", "GrantsModel")), **missing},
                     tags=ADMIN_TAG, params=(param,)),
    }


def _quota_ops(who: str, params: tuple[dict, ...]) -> dict:
    row = {"200": answer("The quota row", ref("schemas", "QuotaRow"))}
    missing = {"404": ref("responses", "NotFound")} if params else {}
    return {
        "get": op(f"{who}'s quota", {**row, **missing}, tags=QUOTA_TAG, params=params),
        "put": op(f"Replace {who}'s quota", {**row, **missing}, tags=QUOTA_TAG, params=params,
                  body=json_body(ref("schemas", "Quota"))),
        "delete": op(f"Remove {who}'s quota", {**row, **missing}, tags=QUOTA_TAG, params=params),
    }


NOT_FOUND = {"404": ref("responses", "NotFound")}
GENERATION_ERRORS = {"404": ref("responses", "NotFound"), "429": ref("responses", "RateLimited"),
                     "502": ref("responses", "Error"), "503": ref("responses", "ServiceUnavailable")}
REPORT = answer("Usage rows and totals", ref("schemas", "UsageReport"), also={"text/csv": {"type": "string"}})

# Route pattern (as in the route table) -> (OpenAPI path, {method: operation}).
ROUTES: dict[str, tuple[str, dict[str, dict]]] = {
    "/health": ("/health", {"get": op(
        "Liveness", {"200": answer("Up", obj({"status": {"const": "ok"}}, ("status",)))}, tags=SERVICE_TAG,
        public=True)}),
    "/openapi.json": ("/openapi.json", {"get": op(
        "This document", {"200": answer("OpenAPI 3.1", {"type": "object"})}, tags=SERVICE_TAG, public=True)}),
    "/oauth_callback": ("/oauth_callback", {"get": op(
        "Where the Hub sends the browser back after login (JupyterHub's OAuth callback)",
        {"302": answer("Logged in: back to the page asked for"),
         "400": answer("No or a wrong `code`/`state`", {"type": "string"}, media="text/html"),
         "default": answer("Error page", {"type": "string"}, media="text/html")},
        tags=SERVICE_TAG, public=True,
        params=(query_param("code", "The Hub's authorization code.", {"type": "string"}),
                query_param("state", "The state this service sent.", {"type": "string"})))}),
    "/": ("/", {"get": {
        "summary": "The account page (browser, Hub login): keys, permissions, quota",
        "tags": list(ME_TAG),
        "security": [{"hubCookie": []}],
        "responses": {
            "200": answer("The page", {"type": "string"}, media="text/html"),
            "302": answer("No Hub login: to the Hub's login"),
            "403": answer("A disabled, pending or blocked user", {"type": "string"}, media="text/html"),
            "default": answer("Error page", {"type": "string"}, media="text/html"),
        },
    }}),
    "/api/me": ("/api/me", {"get": op(
        "Who the caller is", {"200": answer("The caller", ref("schemas", "Me"))}, tags=ME_TAG)}),
    "/api/me/permissions": ("/api/me/permissions", {"get": op(
        "What the caller may use, each with its source",
        {"200": answer("Effective permissions", ref("schemas", "EffectivePermissions"))}, tags=ME_TAG)}),
    "/api/me/quota": ("/api/me/quota", {"get": op(
        "The caller's limits, use and what is left", {"200": answer("Quota", ref("schemas", "QuotaRemaining"))},
        tags=QUOTA_TAG)}),
    "/api/keys": ("/api/keys", {
        "get": op("The caller's keys", {"200": answer("Keys", ref("schemas", "KeyList"))}, tags=KEYS_TAG,
                  params=(INCLUDE_REVOKED,)),
        "post": op("Create a key (the secret is in this answer only)",
                   {"201": answer("The new key", ref("schemas", "NewKey")), "409": ref("responses", "Conflict")},
                   tags=KEYS_TAG, body=json_body(ref("schemas", "KeyRequest"), example={
                       "name": "laptop", "expires_in_days": 90, "features": ["chat"], "models": None}),
                   description="Not while viewing as another user. A narrowed key cannot widen its owner's rights."),
        "delete": op("Revoke all the caller's keys", {"200": answer("How many", ref("schemas", "Revoked"))},
                     tags=KEYS_TAG),
    }),
    "/api/keys/([^/]+)": ("/api/keys/{key_id}", {"delete": op(
        "Revoke one of the caller's keys", {"204": answer("Revoked"), **NOT_FOUND}, tags=KEYS_TAG,
        params=(KEY_ID,))}),
    "/api/usage": ("/api/usage", {"get": op(
        "The caller's usage", {"200": REPORT}, tags=USAGE_TAG,
        params=(BUCKET, query_param("group_by", "Group rows by this" + EMPTY, {"type": "string", "enum": [*OWN_GROUPS, ""]}),
                SINCE, UNTIL, FORMAT))}),
    "/api/admin/usage": ("/api/admin/usage", {"get": op(
        "Everyone's usage (admin)", {"200": REPORT}, tags=USAGE_TAG,
        params=(BUCKET, query_param("group_by", "Group rows by this" + EMPTY,
                                    {"type": "string", "enum": [*GROUPS, "none", ""]}),
                SINCE, UNTIL, FORMAT,
                query_param("user", f"Only these users (comma-separated or repeated; at most {MAX_USERS}).",
                            {"type": "string"})))}),
    "/api/users": ("/api/users", {"get": op(
        "Users, ours merged with the Hub's (admin)", {"200": answer("Users", ref("schemas", "UserList"))},
        tags=ADMIN_TAG,
        params=(query_param("status", "Only users with this status.", {"type": "string", "enum": list(UserStatus.ALL)}),))}),
    "/api/users/([^/]+)": ("/api/users/{name}", {"get": op(
        "One user with grants and effective permissions (admin)",
        {"200": answer("The user", ref("schemas", "UserDetail")), **NOT_FOUND}, tags=ADMIN_TAG, params=(USER,))}),
    "/api/users/([^/]+)/(approve|deny|disable|enable)": ("/api/users/{name}/{action}", {"post": op(
        "Change a user's status (admin)",
        {"200": answer("The user", ref("schemas", "UserDetail")), **NOT_FOUND, "409": ref("responses", "Conflict")},
        tags=ADMIN_TAG,
        params=(USER, path_param("action", "What to do.", {"type": "string", "enum": list(STATUS_ACTIONS)})),
        description="409 when the user's status does not allow it; an admin cannot disable or deny themselves.")}),
    "/api/users/([^/]+)/permissions": ("/api/users/{name}/permissions", {"get": op(
        "A user's effective permissions (admin)",
        {"200": answer("Effective permissions", ref("schemas", "EffectivePermissions")), **NOT_FOUND},
        tags=ADMIN_TAG, params=(USER,))}),
    "/api/users/([^/]+)/grants": ("/api/users/{name}/grants", _grants_ops("user", USER)),
    "/api/groups/([^/]+)/grants": ("/api/groups/{group}/grants", _grants_ops("group", GROUP)),
    "/api/users/([^/]+)/keys": ("/api/users/{name}/keys", {
        "get": op("A user's keys (admin)", {"200": answer("Keys", ref("schemas", "KeyList")), **NOT_FOUND},
                  tags=ADMIN_TAG, params=(USER, INCLUDE_REVOKED)),
        "post": op("Issue a key for a user (admin; audited with both names)",
                   {"201": answer("The new key", ref("schemas", "NewKey")), **NOT_FOUND,
                    "409": ref("responses", "Conflict")},
                   tags=ADMIN_TAG, params=(USER,), body=json_body(ref("schemas", "KeyRequest"))),
        "delete": op("Revoke all of a user's keys (admin)",
                     {"200": answer("How many", ref("schemas", "Revoked")), **NOT_FOUND}, tags=ADMIN_TAG,
                     params=(USER,)),
    }),
    "/api/users/([^/]+)/keys/([^/]+)": ("/api/users/{name}/keys/{key_id}", {"delete": op(
        "Revoke one of a user's keys (admin)", {"204": answer("Revoked"), **NOT_FOUND}, tags=ADMIN_TAG,
        params=(USER, KEY_ID))}),
    "/api/users/([^/]+)/quota": ("/api/users/{name}/quota", _quota_ops("A user", (USER,))),
    "/api/groups/([^/]+)/quota": ("/api/groups/{group}/quota", _quota_ops("A group", (GROUP,))),
    "/api/quotas/default": ("/api/quotas/default", _quota_ops("Everyone (the default)", ())),
    "/api/audit": ("/api/audit", {"get": op(
        "The audit log, newest first (admin)", {"200": answer("Events", ref("schemas", "AuditEvents"))},
        tags=ADMIN_TAG,
        params=(query_param("user", "Events whose subject or actor is this user.", {"type": "string"}),
                query_param("action", "Only this action.", {"type": "string"}), SINCE, UNTIL,
                query_param("limit", "At most this many" + EMPTY,
                            {"anyOf": [{"type": "integer", "minimum": 1, "maximum": AUDIT_LIMIT_MAX},
                                       {"const": ""}], "default": 100})))}),
    "/api/presets": ("/api/presets", {
        "get": op("The caller's presets", {"200": answer("Presets", ref("schemas", "PresetList"))}, tags=RES_TAG),
        "post": op("Save a preset (a chat model, a system prompt and parameters under a name)",
                   {"201": answer("The preset", ref("schemas", "Preset")), "409": ref("responses", "Conflict")},
                   tags=RES_TAG, body=json_body(ref("schemas", "PresetRequest"))),
    }),
    "/api/presets/([^/]+)": ("/api/presets/{preset}", {
        "get": op("One of the caller's presets", {"200": answer("The preset", ref("schemas", "Preset")), **NOT_FOUND},
                  tags=RES_TAG, params=(PRESET,)),
        "put": op("Replace a preset", {"200": answer("The preset", ref("schemas", "Preset")), **NOT_FOUND},
                  tags=RES_TAG, params=(PRESET,), body=json_body(ref("schemas", "PresetRequest"))),
        "patch": op("Change some of a preset", {"200": answer("The preset", ref("schemas", "Preset")), **NOT_FOUND},
                    tags=RES_TAG, params=(PRESET,), body=json_body(ref("schemas", "PresetPatch"))),
        "delete": op("Delete a preset", {"204": answer("Deleted"), **NOT_FOUND}, tags=RES_TAG, params=(PRESET,)),
    }),
    "/api/collections": ("/api/collections", {
        "get": op("The caller's knowledge collections", {"200": answer("Collections", ref("schemas", "CollectionList"))},
                  tags=RES_TAG),
        "post": op("Create a collection", {"201": answer("The collection", ref("schemas", "Collection")),
                                           "409": ref("responses", "Conflict")},
                   tags=RES_TAG, body=json_body(ref("schemas", "CollectionRequest"))),
    }),
    "/api/collections/([^/]+)": ("/api/collections/{collection}", {
        "get": op("One collection", {"200": answer("The collection", ref("schemas", "Collection")), **NOT_FOUND},
                  tags=RES_TAG, params=(COLLECTION,)),
        "delete": op("Delete a collection and its documents", {"204": answer("Deleted"), **NOT_FOUND}, tags=RES_TAG,
                     params=(COLLECTION,)),
    }),
    "/api/collections/([^/]+)/documents": ("/api/collections/{collection}/documents", {
        "get": op("A collection's documents", {"200": answer("Documents", ref("schemas", "DocumentList")),
                                               **NOT_FOUND}, tags=RES_TAG, params=(COLLECTION,)),
        "post": op("Add documents (chunked and embedded; metered as embeddings)",
                   {"201": answer("What was added", obj({"documents": {"type": "array"}, "chunks": {"type": "integer"},
                                                         "usage": ref("schemas", "Usage")}, ("documents",))),
                    **GENERATION_ERRORS},
                   tags=RES_TAG, params=(COLLECTION,), body=json_body(ref("schemas", "DocumentsRequest"))),
    }),
    "/api/collections/([^/]+)/documents/([^/]+)": ("/api/collections/{collection}/documents/{document_id}", {
        "delete": op("Delete one document", {"204": answer("Deleted"), **NOT_FOUND}, tags=RES_TAG,
                     params=(COLLECTION, path_param("document_id", "The document's id (digits; else 404).",
                                                    {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID})))}),
    "/api/collections/([^/]+)/search": ("/api/collections/{collection}/search", {"post": op(
        "The chunks most like a query, best first",
        {"200": answer("Results", ref("schemas", "SearchResults")), **GENERATION_ERRORS},
        tags=RES_TAG, params=(COLLECTION,), body=json_body(ref("schemas", "SearchRequest")))}),
    "/api/admin/resources": ("/api/admin/resources", {"get": op(
        "Everyone's presets and collections, with owners (admin)",
        {"200": answer("Resources", obj({"presets": {"type": "array", "items": ref("schemas", "Preset")},
                                          "collections": {"type": "array", "items": ref("schemas", "Collection")}},
                                         ("presets", "collections")))}, tags=ADMIN_TAG)}),
    "/api/users/([^/]+)/presets": ("/api/users/{name}/presets", {
        "get": op("A user's presets (admin)", {"200": answer("Presets", ref("schemas", "PresetList")), **NOT_FOUND},
                  tags=ADMIN_TAG, params=(USER,)),
        "delete": op("Delete all of a user's presets (admin; audited)",
                     {"200": answer("How many", ref("schemas", "Deleted")), **NOT_FOUND}, tags=ADMIN_TAG,
                     params=(USER,)),
    }),
    "/api/users/([^/]+)/presets/([^/]+)": ("/api/users/{name}/presets/{preset}", {
        "get": op("One of a user's presets (admin)", {"200": answer("The preset", ref("schemas", "Preset")),
                                                      **NOT_FOUND}, tags=ADMIN_TAG, params=(USER, PRESET)),
        "delete": op("Delete one of a user's presets (admin; audited)",
                     {"200": answer("How many", ref("schemas", "Deleted")), **NOT_FOUND}, tags=ADMIN_TAG,
                     params=(USER, PRESET)),
    }),
    "/api/users/([^/]+)/collections": ("/api/users/{name}/collections", {
        "get": op("A user's collections (admin)", {"200": answer("Collections", ref("schemas", "CollectionList")),
                                                   **NOT_FOUND}, tags=ADMIN_TAG, params=(USER,)),
        "delete": op("Delete all of a user's collections (admin; audited)",
                     {"200": answer("How many", ref("schemas", "Deleted")), **NOT_FOUND}, tags=ADMIN_TAG,
                     params=(USER,)),
    }),
    "/api/users/([^/]+)/collections/([^/]+)": ("/api/users/{name}/collections/{collection}", {
        "get": op("One of a user's collections (admin)", {"200": answer("The collection", ref("schemas", "Collection")),
                                                          **NOT_FOUND}, tags=ADMIN_TAG, params=(USER, COLLECTION)),
        "delete": op("Delete one of a user's collections (admin; audited)",
                     {"200": answer("How many", ref("schemas", "Deleted")), **NOT_FOUND}, tags=ADMIN_TAG,
                     params=(USER, COLLECTION)),
    }),
    "/api/invites": ("/api/invites", {
        "get": op("Invites, newest first (admin; never a code)",
                  {"200": answer("Invites", ref("schemas", "InviteList"))}, tags=ADMIN_TAG,
                  params=(query_param("status", "Only invites in this state.",
                                      {"type": "string", "enum": ["active", "used", "expired", "revoked"]}),)),
        "post": op("Create an invite (admin); its code and link are in this answer only",
                   {"201": answer("The invite", ref("schemas", "NewInvite"))}, tags=ADMIN_TAG,
                   body=json_body(ref("schemas", "InviteRequest"))),
    }),
    "/api/invites/([^/]+)": ("/api/invites/{invite_id}", {"delete": op(
        "Revoke an unused invite (admin)",
        {"200": answer("The invite", ref("schemas", "Invite")), **NOT_FOUND, "409": ref("responses", "Conflict")},
        tags=ADMIN_TAG,
        params=(path_param("invite_id", "The invite's id (a number; else 400).",
                           {"type": "integer", "minimum": 0, "maximum": MAX_ROW_ID}),))}),
    "/api/users/([^/]+)/password": ("/api/users/{name}/password", {"post": op(
        "Set a user's local password, or generate one (admin; audited)",
        {"200": answer("Done (with the generated password, once)", ref("schemas", "PasswordSet")), **NOT_FOUND},
        tags=ADMIN_TAG, params=(USER,), body=json_body(ref("schemas", "PasswordRequest")))}),
    "/metrics": ("/metrics", {"get": op(
        "Prometheus metrics (an admin, the custom:inference:metrics scope, or the scraper token: Metrics.auth)",
        {"200": answer("Prometheus' text format", {"type": "string"}, media="text/plain")}, tags=SERVICE_TAG)}),
    "/v1/models": ("/v1/models", {"get": op(
        "The models the caller may use", {"200": answer("Models", ref("schemas", "ModelList"))}, tags=V1_TAG)}),
    "/v1/models/(.+)": ("/v1/models/{model}", {"get": op(
        "One model", {"200": answer("The model", ref("schemas", "Model")), **NOT_FOUND}, tags=V1_TAG,
        params=(path_param("model", "The model's name (a model the caller may not use is 404, as one that "
                           "does not exist)."),))}),
    "/v1/chat/completions": ("/v1/chat/completions", {"post": op(
        "Chat completion (OpenAI)",
        {"200": answer("The answer, or with `stream` server-sent events", ref("schemas", "ChatCompletion"),
                       also={"text/event-stream": ref("schemas", "EventStream")}), **GENERATION_ERRORS},
        tags=V1_TAG, body=json_body(ref("schemas", "ChatCompletionRequest"), example={
            "model": "my-chat-model", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}))}),
    "/v1/completions": ("/v1/completions", {"post": op(
        "Text completion (OpenAI)",
        {"200": answer("The answer, or with `stream` server-sent events", ref("schemas", "Completion"),
                       also={"text/event-stream": ref("schemas", "EventStream")}), **GENERATION_ERRORS},
        tags=V1_TAG, body=json_body(ref("schemas", "CompletionRequest"), example={
            "model": "my-chat-model", "prompt": "Once upon a time", "max_tokens": 16}))}),
    "/v1/embeddings": ("/v1/embeddings", {"post": op(
        "Embeddings (OpenAI)", {"200": answer("Vectors", ref("schemas", "EmbeddingList")), **GENERATION_ERRORS},
        tags=V1_TAG, body=json_body(ref("schemas", "EmbeddingRequest"), example={
            "model": "my-embedding-model", "input": ["first text", "second text"]}))}),
}


def _error(description: str) -> dict:
    return answer(description, ref("schemas", "Error"))


RESPONSES = {
    "Error": _error("An error (any status), as OpenAI's error envelope."),
    "BadRequest": _error("A parameter or body is off; `param` names it."),
    "Unauthorized": _error("No, a malformed or a dead credential (always the same answer, `invalid_api_key`); "
                           "also any credential in the URL."),
    "Forbidden": _error("A disabled or pending user, a credential without the needed feature, scope or admin "
                        "role, a narrowed key, or act-as by a non-admin."),
    "NotFound": _error("No such thing, or not the caller's (answered alike)."),
    "Conflict": _error("The state does not allow it (e.g. too many live keys, approving an active user)."),
    "PayloadTooLarge": _error("The body is larger than InferenceService.max_body_bytes."),
    "RateLimited": {**_error("Over a quota; `Retry-After` says when to try again."),
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    "ServiceUnavailable": _error("Not now: the Hub is unreachable, a model failed to load, the service stops."),
}

SECURITY_SCHEMES = {
    "bearer": {
        "type": "http", "scheme": "bearer",
        "description": "`Authorization: Bearer <credential>` (or `token <credential>`): a key this service "
                       "issued (`jhi_...`), a JupyterHub API token with access to the service, or a configured "
                       "static key (an admin). Never in the URL.",
    },
    "apiKeyHeader": {
        "type": "apiKey", "in": "header", "name": "x-api-key",
        "description": "A key this service issued (Anthropic-style header); never a Hub token.",
    },
    "hubCookie": {
        "type": "apiKey", "in": "cookie", "name": "jupyterhub-services",
        "description": "The Hub's OAuth login cookie (browsers; writes also need the `X-XSRFToken` header).",
    },
}

ACT_AS = {
    "name": ACT_AS_HEADER, "in": "header", "required": False,
    "description": "View as (admins only): the request runs as this user, with exactly their rights, and is "
                   "audited with both names. Refused (403) for anyone else and for an admin target.",
    "schema": {"type": "string", "minLength": 1},
}


def document(patterns=None, *, base_url: str = "/", cookie_name: str | None = None) -> dict:
    """The OpenAPI document for the routes `patterns` (the app's route table; default: every route described).

    `base_url` is the service's prefix (the only server); `cookie_name` the Hub login cookie's name, when known.
    """
    wanted = ROUTES.keys() if patterns is None else [p for p in ROUTES if p in set(patterns)]
    schemes = dict(SECURITY_SCHEMES)
    if cookie_name:
        schemes["hubCookie"] = {**schemes["hubCookie"], "name": cookie_name}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "jupyterhub-inference",
            "version": __version__,
            "description": "Language models for JupyterHub users: OpenAI's API under /v1, the service's own under "
                           "/api. Every route but the public ones needs a credential; every error is "
                           '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "servers": [{"url": base_url.rstrip("/") or "/"}],
        "security": [{"bearer": []}, {"apiKeyHeader": []}, {"hubCookie": []}],
        "paths": {ROUTES[p][0]: ROUTES[p][1] for p in wanted},
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "parameters": {"ActAs": ACT_AS},
            "securitySchemes": schemes,
        },
    }
