"""Errors of the HTTP front as OpenAI error objects: one map, from the status every error already has.

An exception becomes a canonical status code and message through the gateway's ``ERRORS`` (the same
``ErrorMap`` the gRPC front applies: ``RequestError`` and ``RpcError`` carry theirs), then
``HTTP_STATUS`` turns the code into the HTTP status and the OpenAI error ``type``:

    INVALID_ARGUMENT 400 · UNAUTHENTICATED 401 · NOT_FOUND 404 · RESOURCE_EXHAUSTED 429 ·
    UNAVAILABLE 503 (loading, draining) · DEADLINE_EXCEEDED 504 · anything else 500

so both fronts answer the same request with the same words, and the OpenAI SDKs raise their usual
classes (BadRequestError, AuthenticationError, NotFoundError, RateLimitError, InternalServerError).
:class:`HttpError` is for the few conditions only HTTP has (a body too large, not JSON).
The body is ``{"error": {"message", "type", "param", "code"}}``; ``code`` is the status name in lower
case (``invalid_argument`` …), the same name a gRPC client sees.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from starlette.responses import Response

from exec_service.gateway import ERRORS

HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
INTERNAL = (500, "internal_error")


class HttpError(Exception):
    """A condition of the HTTP protocol itself, with its own status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_object(
    exc: BaseException, param: str | None = None
) -> tuple[int, dict[str, Any], grpc.StatusCode | None]:
    """(HTTP status, the OpenAI error body, the canonical code — None for an ``HttpError``)."""
    if isinstance(exc, HttpError):
        return exc.status, _body(exc.message, exc.type, param, None), None
    code, message = ERRORS.status(exc)
    status, type_ = HTTP_STATUS.get(code, INTERNAL)
    return status, _body(message, type_, param, code.name.lower()), code


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )
