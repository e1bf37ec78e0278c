"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Every path out of the server that is not a success goes through ``error_response``, so a client always gets
the same shape whatever went wrong (bad JSON, a FastAPI validation error, an unknown route, a full queue).
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the server answers with, raised anywhere below a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def error_body(err: APIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def from_http_status(status: int, detail: Any = None) -> APIError:
    """Starlette's HTTPException (unknown route, wrong method, unparsable body) -> APIError."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = detail if isinstance(detail, str) and detail else phrase
    # FastAPI raises 400 only when it cannot parse the body at all (bad encoding, nesting too deep, huge ints).
    code = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(status)
    return APIError(status, message, code=code)


def from_validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic/FastAPI validation errors -> one 400 naming the first offending field (OpenAI answers 400)."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return bad_request(f"the request body is not valid JSON: {reason}", code="invalid_json")
    # Union members repeat the path with their type names ("prompt.str", "prompt.list[int]"): keep the field.
    param = ".".join(p for p in loc if not _is_type_tag(p)) or None
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return bad_request(message, param=param)


def _is_type_tag(part: str) -> bool:
    return any(ch in part for ch in "[]") or part in {"str", "int", "float", "bool", "list", "dict", "none",
                                                      "constrained-str", "constrained-int", "function-after"}
