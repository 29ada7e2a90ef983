"""What every adapter shares: the HTTP-error taxonomy and SSE-of-JSON decoding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..api.errors import GatewayError, InvalidRequest, UpstreamError
from ..codecs.sse import SSEDecoder, SSEError, SSEEvent

CLIENT_ERRORS = frozenset({400, 404, 413, 422})


def error_message(body: bytes) -> str | None:
    """``error.message`` of a provider's JSON error body (OpenAI, Anthropic and Gemini all put it
    there), or None."""
    try:
        detail = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return detail if isinstance(detail, str) else None


def http_error(status: int, detail: str | None) -> GatewayError:
    """A provider's HTTP error answer as our error: the client's own request refused (400 with
    the provider's message, trimmed, never logged), rate limited (429), else 502 whose
    ``retryable`` follows the status."""
    message = f"the provider answered HTTP {status}"
    if status in CLIENT_ERRORS:
        if detail:
            message = f"{message}: {detail[:500]}"
        return InvalidRequest(message, source="provider", provider_status=status, retryable=False)
    if status == 429:
        return UpstreamError(message, status=429, type="rate_limit_error", provider_status=429)
    return UpstreamError(message, provider_status=status)


def sse_json(sse: SSEDecoder, data: bytes) -> Iterator[tuple[SSEEvent, Any]]:
    """Feed ``data`` to ``sse``; yield each completed event with its JSON payload (``[DONE]``
    yields None). Undecodable streams and payloads become ``UpstreamError``."""
    try:
        events = sse.feed(data)
    except SSEError as exc:
        raise UpstreamError("unreadable event stream from the provider") from exc
    for ev in events:
        if ev.data == "[DONE]":
            yield ev, None
            continue
        try:
            yield ev, json.loads(ev.data)
        except ValueError as exc:
            raise UpstreamError("malformed event from the provider") from exc
