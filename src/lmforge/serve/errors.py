"""Errors in OpenAI's shape: every failure the server sends is `{"error": {"message", "type", "param", "code"}}`.

    status  type                    when
    400     invalid_request_error   a field is missing, of the wrong type or out of range (`param` names it:
                                    "messages[0].content", "max_tokens"); malformed JSON; unsupported features
    401     authentication_error    missing or wrong API key
    404     not_found_error         unknown model or route
    405     invalid_request_error   wrong method for a route
    413     invalid_request_error   the body is larger than the server's limit
    429     rate_limit_error        the engine's queue is full (with Retry-After)
    503     service_unavailable     the model is still loading, the server is shutting down, or the request can
                                    never fit in the KV cache (with Retry-After)
    500     server_error            a bug of ours, never something a client sent

NOTE: FastAPI answers invalid bodies with 422 and its own body by default; OpenAI's clients and every tool built
on them expect 400 in the shape above, so `install_error_handlers` replaces FastAPI's handlers.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lmforge.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to send to the client: HTTP `status`, a message, the request field it is about (`param`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    async def __call__(self, scope, receive, send) -> None:
        """Send this error as an ASGI response (for middleware)."""
        await self.response()(scope, receive, send)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def param_of(loc: tuple) -> str | None:
    """The request field a pydantic error location names, as OpenAI writes it. pydantic puts the union member
    it tried into the location too ("str", "list[int]", "constrained-int"): those are not fields.

    Worked example: ("body", "messages", 0, "content", "str") -> "messages[0].content"; ("body",) -> None.
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_TAGS and not any(c in part for c in "[]-"):
            out += f".{part}" if out else part
    return out or None


def _validation_message(err: dict, param: str | None) -> str:
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON"
    if err.get("type") == "missing":
        return f"{param} is required" if param else "a request body is required"
    if err.get("type") == "extra_forbidden":
        return f"{param} is not a parameter this server accepts"
    what = f"{param}: " if param else ""
    return what + err.get("msg", "invalid value")


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for our errors, for invalid requests (400, not 422) and for HTTP errors."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = None if first.get("type") == "json_invalid" else param_of(tuple(first.get("loc", ())))
        return APIError(400, _validation_message(first, param), param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                    413: "the request body is larger than this server accepts"}
        message = messages.get(exc.status_code) or str(exc.detail)
        if exc.status_code == 400 and message == "There was an error parsing the body":  # FastAPI's words
            message = "the request body could not be read as JSON (it must be UTF-8)"
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", type="server_error").response()


__all__ = ["APIError", "install_error_handlers", "param_of"]
