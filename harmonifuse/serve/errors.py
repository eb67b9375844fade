"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal the service makes is an :class:`ApiError`; its message says what was wrong and
what to do, and never carries a stack trace or a server path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from starlette.responses import JSONResponse

INVALID = "invalid_request_error"
SERVER = "server_error"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = INVALID
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def error_body(message: str, type_: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, INVALID, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def overloaded(message: str, retry_after: int, code: str = "server_overloaded") -> ApiError:
    return ApiError(503, message, SERVER, None, code, {"Retry-After": str(max(1, int(retry_after)))})
