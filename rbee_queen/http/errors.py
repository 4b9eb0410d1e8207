"""Errors as OpenAI's clients expect them: ``{"error": {"message", "type",
"param", "code"}}`` with the matching HTTP status, and rbee's own error codes
turned into that shape in one table."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbee.errors import RbeeError
from rbee.rpc import internal_error

# The type OpenAI names for each status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

# rbee codes → HTTP status (anything not here is a 500 with an error id).
RBEE_STATUS = {
    "INVALID_ARGUMENT": 400,
    "USAGE_ERROR": 400,
    "INVALID_MODEL_REF": 400,
    "INVALID_BACKEND": 400,
    "INVALID_DEVICE": 400,
    "DUPLICATE_REQUEST_ID": 400,
    "MISSING_API_KEY": 401,
    "INVALID_API_KEY": 401,
    "WRONG_KEY_SCOPE": 403,
    "ACCESS_DENIED": 403,
    "MODEL_NOT_FOUND": 404,
    "NODE_NOT_FOUND": 404,
    "NOT_FOUND": 404,
    "ALL_SLOTS_BUSY": 429,
    "WORKER_DRAINING": 503,
    "MODEL_LOADING": 503,
    "COLD_START_TIMEOUT": 503,
    "HIVE_UNREACHABLE": 503,
    "WORKER_UNREACHABLE": 503,
    "UNAVAILABLE": 503,
    "INSUFFICIENT_RAM": 503,
    "NO_NODE_FITS": 503,
    "VRAM_EXHAUSTED": 503,
    "INSUFFICIENT_DISK": 503,
    "MODEL_LOAD_FAILED": 503,
    "SSH_CONNECTION_FAILED": 503,
    "CONNECTION_TIMEOUT": 503,
    "STREAM_BROKEN": 503,
    "ENGINE_DIED": 503,
    "ENGINE_OOM_KILLED": 503,
}
# Seconds a client should wait before retrying a 429/503.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error with its HTTP status, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip

    def headers(self) -> dict[str, str]:
        if self.retry_after is not None:
            return {"Retry-After": str(self.retry_after)}
        return {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def sse_data(self) -> str:
        """The error as one SSE event (a failure after the stream began)."""
        return f"data: {json.dumps(self.body(), separators=(',', ':'))}\n\n"


def bad_request(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def from_rbee(err: RbeeError, where: str = "the front door") -> ApiError:
    """An rbee error as the HTTP client sees it. Unknown and internal codes
    become a 500 that names only an error id (the details go to the log)."""
    status = RBEE_STATUS.get(err.code)
    if status is None:
        if err.code == "INTERNAL" and "error_id" in err.details:
            return ApiError(500, f"Internal error (id {err.details['error_id']})", None, "internal_error")
        return internal(err, where)
    param = err.details.get("field") or err.details.get("param")
    retry = RETRY_AFTER_S if status in (429, 503) else None
    if err.code == "COLD_START_TIMEOUT":
        retry = int(err.details.get("retry_after", RETRY_AFTER_S))
    return ApiError(status, err.message, param, err.code.lower(), retry)


def internal(exc: BaseException, where: str) -> ApiError:
    """A 500 naming only an error id; the exception and its traceback go to the log."""
    err = internal_error(exc, where)
    return ApiError(500, f"Internal error (id {err.details['error_id']})", None, "internal_error")


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _rbee_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RbeeError)
    return from_rbee(exc).response()


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "json-or-python"}


def _param(loc: Any) -> str | None:
    """``('messages', 0, 'content', 'str')`` → ``messages[0].content``: the
    parameter's path, without pydantic's tags for the members of a union."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if "[" in text or "(" in text or text.split("-")[0] in _TYPE_TAGS:
            break
        out += f".{text}" if out else text
    return out or None


def validation_error(errors: Any) -> ApiError:
    """A body that does not validate: 400 naming the first bad parameter
    (``messages.0.content``), without echoing its value."""
    errors = list(errors)
    first = errors[0] if errors else {}
    param = _param(first.get("loc", ()))
    message = str(first.get("msg", "Invalid request"))
    if first.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON", None, "invalid_json")
    if first.get("type") == "missing":
        return ApiError(400, f"{param}: a required parameter is missing", param, "missing_required_parameter")
    return ApiError(400, f"{param}: {message}" if param else message, param, "invalid_value")


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    text = {404: "No such route", 405: "Method not allowed"}.get(status, str(exc.detail))
    code = "request_too_large" if status == 413 else None
    response = ApiError(status, text, None, code).response()
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return internal(exc, f"{request.method} {request.url.path}").response()


def install(app: Any) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RbeeError, _rbee_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
