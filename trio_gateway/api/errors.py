"""One exception type for every error a client may see, rendered in OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}``, plus, for upstream failures, the reference's
later taxonomy: ``source`` ("provider" | "gateway"), ``provider_status`` and ``retryable``. Messages
never carry request content, provider keys or provider response bodies.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

RETRYABLE_PROVIDER_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    source: Literal["provider", "gateway"] | None = None
    provider_status: int | None = None
    retryable: bool | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        source: Literal["provider", "gateway"] | None = None,
        provider_status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        self.code = code
        self.source = source
        self.provider_status = provider_status
        self.retryable = retryable

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.source is not None:
            err["source"] = self.source
            err["provider_status"] = self.provider_status
            err["retryable"] = bool(self.retryable)
        return {"error": err}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"


class UpstreamError(GatewayError):
    """The provider answered with an error, broke the stream, or sent something unparseable."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, provider_status: int | None = None, **kw: Any) -> None:
        kw.setdefault("source", "provider")
        kw.setdefault(
            "retryable",
            provider_status is None or provider_status in RETRYABLE_PROVIDER_STATUSES,
        )
        super().__init__(message, provider_status=provider_status, **kw)


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("retryable", True)
        super().__init__(message, **kw)


def error_body(
    status: int, message: str, type: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return GatewayError(message, status=status, type=type, code=code).body()
