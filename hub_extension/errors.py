"""Errors that carry their HTTP answer.

Components raise these (they know nothing of Tornado); the base handler turns them into JSON: the
`/api` shape `{"error": {...}}` and, under `/v1`, OpenAI's envelope, which is the same shape.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error with a status, a message safe to show the caller and OpenAI's `type`/`param`/`code`."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(f"The model '{model}' does not exist or you do not have access to it.", param="model")


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(ApiError):
    """429 with Retry-After (seconds) so clients, the openai SDK included, back off."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float = 1.0, **kw):
        seconds = max(1, int(retry_after + 0.999))
        headers = {"Retry-After": str(seconds), "retry-after-ms": str(int(retry_after * 1000))}
        super().__init__(message, headers=headers, **kw)


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, retry_after: float | None = None, **kw):
        headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))} if retry_after else None
        super().__init__(message, headers=headers, **kw)
