"""OpenAI-compatible adapter: chat completions, legacy completions and image generation.

Serves every provider that speaks OpenAI's wire (OpenAI, xAI, BytePlus ModelArk, Nous Portal, the
dev mock), each with its own base URL. Chat requests are forwarded as the client sent them
(validated), with the upstream model id, ``stream_options.include_usage`` forced on (usage is what
gets billed) and the reference's defaults made explicit so the hash never vouches for a value not
used. Parameters a provider refuses for a model are answered with 400 here, from a table
(``_PARAM_RULES``), before anything is sent or signed.

``image_generation`` models (reference §16.3) are served through ``/images/generations``: the
prompt is the joined text of the user turns, one image, always as base64 (``b64_json``), so the
gateway never fetches a provider-hosted URL: no SSRF surface and no second network hop. The answer
is one piece (never streamed upstream); it becomes ``ImageOutput`` events, zero usage and
``Finish("stop")``; the output hash covers ``""`` (images are not signed, like the reference).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from ..api.errors import GatewayError, InvalidRequest, UpstreamError
from ..codecs.sse import SSEDecoder
from ..relay.events import (
    Finish,
    ImageOutput,
    ProviderEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from ..signing.canonical import COMPLETIONS_DEFAULT_MAX_TOKENS, COMPLETIONS_DEFAULT_TEMPERATURE
from .base import Kind, ModelInfo, UpstreamCall
from .common import error_message, http_error, sse_json

_PATHS: dict[Kind, str] = {"chat": "/chat/completions", "completion": "/completions"}
_IMAGES_PATH = "/images/generations"
_CLIENT_ERRORS = frozenset({400, 404, 413, 422})


# -- what each provider refuses -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    """Chat/completion parameters that ``provider`` answers 400 to for the models whose upstream
    id matches ``pattern`` (fnmatch; the first matching rule wins): ``rejects`` outright, and
    ``values`` accepted only with the listed values."""

    provider: str
    pattern: str
    rejects: frozenset[str] = frozenset()
    values: tuple[tuple[str, frozenset[str]], ...] = ()


_PENALTIES_STOP = frozenset({"presence_penalty", "frequency_penalty", "stop"})

_PARAM_RULES: tuple[_Rule, ...] = (
    # xAI (docs.x.ai/docs/guides/reasoning): reasoning models (grok-3-mini, the grok-4 family)
    # do not support presence_penalty, frequency_penalty or stop ("adding them in the request
    # would result in error"); reasoning_effort exists only on grok-3-mini, as "low" | "high",
    # and other models answer 400 "Model ... does not support parameter reasoningEffort".
    _Rule("xai", "grok-4*non-reasoning*", frozenset({"reasoning_effort"})),
    _Rule(
        "xai", "grok-3-mini*", _PENALTIES_STOP, (("reasoning_effort", frozenset({"low", "high"})),)
    ),
    _Rule("xai", "grok-4*", _PENALTIES_STOP | {"reasoning_effort"}),
    _Rule("xai", "*", frozenset({"reasoning_effort"})),
    # BytePlus ModelArk (seed-*, docs.byteplus.com ModelArk "Chat API") and Nous Portal
    # (Hermes-4, OpenAI-compatible): no refusal of a parameter we accept is documented that we
    # could confirm, so nothing is listed; their own 400s are relayed as 400s (``error``).
)

# Image generation (reference §16.3). What the image endpoints take:
#   xAI  POST /v1/images/generations (docs.x.ai, image generation guide + API reference): model,
#        prompt, n (1-10), response_format (url | b64_json), user; quality, size and style are
#        "not supported". Answers JPEG.
#   BytePlus ModelArk POST /api/v3/images/generations (Seedream 4.0 "Image generation API"):
#        model, prompt, image, size, sequential_image_generation(_options), stream,
#        response_format, watermark; seed and guidance_scale only on the 3.0 models; no ``n``
#        (one image unless sequential generation is asked for). Answers JPEG.
# So of the chat request, only the messages (the user turns' text becomes the prompt), ``stream``
# (the client's framing), ``n`` (always 1 today) and, on xAI, ``user`` mean anything. Everything
# else (temperature, top_p, max_tokens, max_completion_tokens, stop, seed, penalties, tools,
# tool_choice, parallel_tool_calls, response_format, reasoning_effort) would be dropped while the
# request hash (temperature, max_tokens, stop, tools, response_format) vouches for it: 400.
_IMAGE_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})
_IMAGE_PASSTHROUGH: Mapping[str, frozenset[str]] = {"xai": frozenset({"user"})}
_IMAGE_TAKES_N = frozenset({"openai", "xai", "mock"})
_IMAGE_MAX_N = 10

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
)
_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def _unsupported_param(name: str) -> InvalidRequest:
    # the same answer as the route's own check (routes/inference.py)
    return InvalidRequest(
        f"Unsupported parameter for this model: '{name}'",
        param=name,
        code="unsupported_parameter",
    )


def _image_prompt(messages: Any) -> str:
    """The joined text of every user turn (reference §16.3); other roles are not part of it."""
    turns: list[str] = []
    for msg in messages or ():
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            turns.append(content)
            continue
        parts: list[str] = []
        for part in content or ():
            if part.get("type") != "text":
                # reference images (§16.3: ``image`` on ModelArk, /images/edits on OpenAI) are
                # not relayed yet: refuse rather than generate while ignoring them
                raise InvalidRequest(
                    "Image inputs are not supported with this model yet: send text only",
                    param="messages",
                    code="unsupported_content",
                )
            parts.append(part.get("text") or "")
        turns.append("\n".join(parts))
    prompt = "\n".join(t for t in turns if t.strip())
    if not prompt.strip():
        raise InvalidRequest(
            "Image generation needs a text prompt in a user message",
            param="messages",
            code="invalid_value",
        )
    return prompt


def _mime(image: bytes, item: Mapping[str, Any], answer: Mapping[str, Any]) -> str:
    """The bytes decide (grok-2-image labels nothing and sends JPEG); then the provider's label
    (``mime_type``, ``output_format``); then PNG."""
    for magic, mime in _MAGIC:
        if image.startswith(magic):
            return mime
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    declared = item.get("mime_type")
    if isinstance(declared, str) and declared in _FORMATS.values():
        return declared
    fmt = item.get("output_format") or answer.get("output_format")
    if isinstance(fmt, str) and fmt.lower() in _FORMATS:
        return _FORMATS[fmt.lower()]
    return "image/png"


def _image_events(obj: Mapping[str, Any]) -> list[ProviderEvent]:
    if obj.get("error"):
        raise UpstreamError("the provider reported an error", code="provider_error")
    data = obj.get("data")
    if not isinstance(data, list) or not data:
        raise UpstreamError("the provider returned no image", code="no_image")
    out: list[ProviderEvent] = []
    for item in data:
        if not isinstance(item, dict):
            raise UpstreamError("malformed answer from the provider")
        b64 = item.get("b64_json")
        if not isinstance(b64, str) or not b64:
            if item.get("url"):
                # we asked for b64_json; a hosted URL is never fetched from inside the enclave
                raise UpstreamError(
                    "the provider returned an image URL instead of the image",
                    code="image_url_only",
                )
            raise UpstreamError("the provider returned no image", code="no_image")
        try:
            image = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise UpstreamError("malformed image from the provider") from None
        out.append(ImageOutput(f"data:{_mime(image, item, obj)};base64,{b64}"))
    # billed per image, not per token (reference §16.3: usage all zeros)
    return [*out, UsageReport(prompt_tokens=0, completion_tokens=0), Finish("stop")]


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
        for _, obj in sse_json(self._sse, data):
            if obj is None:  # [DONE]
                self._done = True
                continue
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

    def unsupported(
        self, kind: Kind, fields: Mapping[str, Any], model: ModelInfo | None = None
    ) -> list[str]:
        """Parameters this provider cannot honour for ``model`` (``_PARAM_RULES``; for image
        models, all but ``_IMAGE_FIELDS``). Without a model there is nothing to say: ``build``
        asks again with one, so the 400 is the same whoever asks first."""
        if model is None:
            return []
        present = [k for k, v in fields.items() if v is not None]
        if model.mode == "image_generation" and kind != "chat":
            return ["model"]  # image models answer on /v1/chat/completions only
        if model.mode == "image_generation":
            allowed = _IMAGE_FIELDS | _IMAGE_PASSTHROUGH.get(self.name, frozenset())
            return [k for k in present if k not in allowed]
        for rule in _PARAM_RULES:
            if rule.provider == self.name and fnmatchcase(model.upstream, rule.pattern):
                bad = [k for k in present if k in rule.rejects]
                bad += [k for k, ok in rule.values if k in present and fields[k] not in ok]
                return bad
        return []

    def _headers(self, stream: bool, api_key: str | None) -> tuple[tuple[str, str], ...]:
        headers = [
            ("content-type", "application/json"),
            ("accept", "text/event-stream" if stream else "application/json"),
            ("accept-encoding", "identity"),
            *self.extra_headers,
        ]
        if api_key:
            headers.append(("authorization", f"Bearer {api_key}"))
        return tuple(headers)

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        if model.mode == "image_generation" and kind != "chat":
            raise InvalidRequest(
                f"The model '{model.name}' generates images: use /v1/chat/completions",
                param="model",
                code="unsupported_model",
            )
        bad = self.unsupported(kind, raw, model)
        if bad:
            raise _unsupported_param(bad[0])
        if model.mode == "image_generation":
            return self._build_image(raw, model, api_key)
        body = dict(raw)
        body["model"] = model.upstream
        stream = bool(body.get("stream"))
        # explicit either way: xAI answers a non-stream call with stream=false in one piece
        # (reference §16.3; cumulative chunk usage would otherwise be double-counted)
        body["stream"] = stream
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
        return UpstreamCall(
            method="POST",
            url=self.base_url.rstrip("/") + _PATHS[kind],
            headers=self._headers(stream, api_key),
            body=json.dumps(body, separators=(",", ":")).encode(),
            stream=stream,
        )

    def _build_image(
        self, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        body: dict[str, Any] = {"model": model.upstream, "prompt": _image_prompt(raw["messages"])}
        if self.name in _IMAGE_TAKES_N:
            body["n"] = min(max(int(raw.get("n") or 1), 1), _IMAGE_MAX_N)
        body["response_format"] = "b64_json"  # never a hosted URL: nothing to fetch
        for key in _IMAGE_PASSTHROUGH.get(self.name, frozenset()):
            if raw.get(key) is not None:
                body[key] = raw[key]
        return UpstreamCall(
            method="POST",
            url=self.base_url.rstrip("/") + _IMAGES_PATH,
            headers=self._headers(False, api_key),
            body=json.dumps(body, separators=(",", ":")).encode(),
            stream=False,  # an image answer is one piece, even for a streaming client
            context={"mode": "image_generation"},
        )

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> OpenAIStreamParser:
        return OpenAIStreamParser(kind)

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("malformed answer from the provider") from exc
        if call.context.get("mode") == "image_generation":
            if not isinstance(obj, dict):
                raise UpstreamError("malformed answer from the provider")
            return _image_events(obj)
        if not isinstance(obj, dict) or not obj.get("choices"):
            raise UpstreamError("malformed answer from the provider")
        return _events(kind, obj, stream=False)

    def error(self, status: int, body: bytes) -> GatewayError:
        return http_error(status, error_message(body))
