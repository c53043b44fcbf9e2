"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Types and codes follow vLLM's server (the type names the ``openai`` package's exception classes,
``code`` is the HTTP status), so clients written against vLLM or OpenAI read them unchanged.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import msgspec
from aiohttp import web

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class APIError(Exception):
    """An error answered to the client with ``status`` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}  # sent with the error (Retry-After, Connection: close)
        self.message = message
        self.param = param
        self.error_type = (
            error_type or ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
        )

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorInfo(self.message, self.error_type, self.param, self.status))

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        all_headers = {**self.headers, **(headers or {})}
        response = web.Response(
            status=self.status,
            body=msgspec.json.encode(self.body()),
            content_type="application/json",
            headers=all_headers,
        )
        if all_headers.get("Connection", "").lower() == "close":
            response.force_close()
        return response


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_FIELD = re.compile(r"missing required field `(?P<field>[^`]+)`")


def from_decode_error(error: msgspec.DecodeError) -> APIError:
    """A 400 for a body msgspec could not decode; ``param`` is the JSON path of the bad value
    (``messages[0].content``), or the missing field's path."""
    message = str(error)
    if not isinstance(error, msgspec.ValidationError):
        return bad_request(f"Invalid JSON in the request body: {message}")
    path = ""
    match = _AT_PATH.search(message)
    if match:
        path = match.group("path")
    missing = _MISSING_FIELD.search(message)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    return bad_request(message, path or None)
