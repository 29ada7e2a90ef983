"""OpenAI-compatible adapter: chat completions and legacy completions, native wire format.

Also serves every provider that speaks OpenAI's wire (the dev mock today; xAI, ModelArk, Nous
later) with a different base URL. Requests are forwarded as the client sent them (validated),
with the upstream model id, ``stream_options.include_usage`` forced on (usage is what gets billed)
and the reference's defaults made explicit so the hash never vouches for a value not used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import GatewayError, InvalidRequest, UpstreamError
from ..codecs.sse import SSEDecoder, SSEError
from ..relay.events import Finish, ProviderEvent, TextDelta, ToolCallDelta, UsageReport
from ..signing.canonical import COMPLETIONS_DEFAULT_MAX_TOKENS, COMPLETIONS_DEFAULT_TEMPERATURE
from .base import Kind, ModelInfo, UpstreamCall

_PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completion": "/completions"}
_CLIENT_ERRORS = frozenset({400, 404, 413, 422})


def _usage(u: Mapping[str, Any] | None) -> UsageReport | None:
    if not u:
        return None
    ptd = u.get("prompt_tokens_details") or {}
    ctd = u.get("completion_tokens_details") or {}
    return UsageReport(
        prompt_tokens=int(u.get("prompt_tokens") or 0),
        completion_tokens=int(u.get("completion_tokens") or 0),
        cached_tokens=ptd.get("cached_tokens"),
        reasoning_tokens=ctd.get("reasoning_tokens"),
    )


def _choice_events(kind: Kind, choice: Mapping[str, Any], *, stream: bool) -> list[ProviderEvent]:
    out: list[ProviderEvent] = []
    if kind == "completion":
        if choice.get("text"):
            out.append(TextDelta(choice["text"]))
    else:
        msg = choice.get("delta" if stream else "message") or {}
        content = msg.get("content")
        if content:
            out.append(TextDelta(content))
        elif msg.get("refusal"):
            out.append(TextDelta(msg["refusal"]))
        for pos, tc in enumerate(msg.get("tool_calls") or ()):
            fn = tc.get("function") or {}
            out.append(
                ToolCallDelta(
                    index=int(tc.get("index", pos)),
                    id=tc.get("id"),
                    name=fn.get("name"),
                    arguments=fn.get("arguments") or "",
                )
            )
    if choice.get("finish_reason"):
        out.append(Finish(str(choice["finish_reason"])))
    return out


def _events(kind: Kind, obj: Mapping[str, Any], *, stream: bool) -> list[ProviderEvent]:
    if obj.get("error"):
        raise UpstreamError("the provider reported an error", code="provider_error")
    out: list[ProviderEvent] = []
    for choice in obj.get("choices") or ():
        if int(choice.get("index", 0)) == 0:
            out.extend(_choice_events(kind, choice, stream=stream))
    usage = _usage(obj.get("usage"))
    if usage is not None:
        out.append(usage)
    return out


@dataclass
class OpenAIStreamParser:
    kind: Kind
    _sse: SSEDecoder = field(default_factory=SSEDecoder)
    _done: bool = False
    _finished: bool = False

    def feed(self, data: bytes) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        try:
            events = self._sse.feed(data)
        except SSEError as exc:
            raise UpstreamError("unreadable event stream from the provider") from exc
        for ev in events:
            if ev.data == "[DONE]":
                self._done = True
                continue
            try:
                obj = json.loads(ev.data)
            except ValueError as exc:
                raise UpstreamError("malformed chunk from the provider") from exc
            if not isinstance(obj, dict):
                raise UpstreamError("malformed chunk from the provider")
            evs = _events(self.kind, obj, stream=True)
            self._finished = self._finished or any(isinstance(e, Finish) for e in evs)
            out.extend(evs)
        return out

    def close(self) -> list[ProviderEvent]:
        if not (self._done or self._finished):
            raise UpstreamError("the provider ended the stream before it was complete")
        return []


@dataclass(frozen=True)
class OpenAICompatible:
    name: str
    base_url: str
    extra_headers: tuple[tuple[str, str], ...] = ()

    def unsupported(self, kind: Kind, fields: Mapping[str, Any]) -> list[str]:
        return []

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        body = dict(raw)
        body["model"] = model.upstream
        stream = bool(body.get("stream"))
        if stream:
            opts = dict(body.get("stream_options") or {})
            opts["include_usage"] = True
            body["stream_options"] = opts
        else:
            body.pop("stream_options", None)
        if kind == "chat":
            if model.fixed_temperature is None and body.get("temperature") is None:
                body["temperature"] = 0.0
        else:
            if body.get("temperature") is None:
                body["temperature"] = COMPLETIONS_DEFAULT_TEMPERATURE
            if body.get("max_tokens") is None:
                body["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        headers = [
            ("content-type", "application/json"),
            ("accept", "text/event-stream" if stream else "application/json"),
            ("accept-encoding", "identity"),
            *self.extra_headers,
        ]
        if api_key:
            headers.append(("authorization", f"Bearer {api_key}"))
        return UpstreamCall(
            method="POST",
            url=self.base_url.rstrip("/") + _PATHS[kind],
            headers=tuple(headers),
            body=json.dumps(body, separators=(",", ":")).encode(),
            stream=stream,
        )

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> OpenAIStreamParser:
        return OpenAIStreamParser(kind)

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("malformed answer from the provider") from exc
        if not isinstance(obj, dict) or not obj.get("choices"):
            raise UpstreamError("malformed answer from the provider")
        return _events(kind, obj, stream=False)

    def error(self, status: int, body: bytes) -> GatewayError:
        message = f"the provider answered HTTP {status}"
        if status in _CLIENT_ERRORS:
            # The client's own request was refused (e.g. context too long): say why, in the
            # provider's words, but only its error message, trimmed. Never logged.
            try:
                detail = json.loads(body)["error"]["message"]
                if isinstance(detail, str):
                    message = f"{message}: {detail[:500]}"
            except (ValueError, KeyError, TypeError):
                pass
            return InvalidRequest(
                message, source="provider", provider_status=status, retryable=False
            )
        if status == 429:
            return UpstreamError(message, status=429, type="rate_limit_error", provider_status=429)
        return UpstreamError(message, provider_status=status)
