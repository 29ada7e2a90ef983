"""Google Gemini adapter: ``generateContent`` / ``streamGenerateContent``, native wire format.

Pure, like every adapter: OpenAI request in, Gemini request bytes out; Gemini bytes in, relay
events out. Written from Google's public Gemini API reference (v1beta).

Request (OpenAI → Gemini):

* ``system``/``developer`` → ``systemInstruction.parts`` (Gemini has one system instruction: all
  of them, in order); ``user``/``assistant`` → ``contents`` with role ``user``/``model``; text →
  ``text`` parts; ``image_url`` data: URI → ``inlineData``, https URL → ``fileData`` (MIME type
  from the path's extension, else 400); assistant ``tool_calls`` → ``functionCall`` parts; ``tool``
  (and legacy ``function``) messages → ``functionResponse`` parts in one user turn per run.
* The key travels in ``x-goog-api-key``, never in the URL (URLs end up in logs).
* ``generationConfig``: the reference's defaults made explicit, like the OpenAI adapter (chat
  temperature 0.0 when omitted; completions 1.0 and 16 tokens), since the hash vouches for them.
* Tool parameters and ``json_schema`` go as ``parametersJsonSchema`` / ``responseJsonSchema``
  (full JSON Schema), not the OpenAPI-subset ``parameters`` / ``responseSchema``, which reject
  ordinary OpenAI schemas (``additionalProperties`` and friends).
* ``image_output`` models (``responseModalities`` TEXT + IMAGE) are called once, with
  ``generateContent``, also for a streaming client (as the reference does): an inline image is
  megabytes of base64 in one event, and nothing is gained by streaming it.

Answers: text parts → ``TextDelta`` (``thought`` parts skipped), ``functionCall`` → one whole
``ToolCallDelta``, ``inlineData`` → ``ImageOutput`` (a data: URI). ``usageMetadata`` is cumulative
in a stream: each report *replaces* the last (the relay keeps the last one), never summed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from ..api.errors import GatewayError, InvalidRequest, UpstreamError
from ..codecs.sse import SSEDecoder, SSEError
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
from .common import http_error, sse_json

_CLIENT_ERRORS = frozenset({400, 404, 413, 422})

# An image part is a few MB of base64 on one ``data:`` line; the default 1 MiB line cap is for
# text providers.
_MAX_SSE_LINE = 24 << 20

_FINISH: dict[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "LANGUAGE": "content_filter",  # the model declined: unsupported language
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
}
# The model failed at function calling: nothing worth signing came back.
_TOOL_FAILURES = frozenset(
    {
        "MALFORMED_FUNCTION_CALL",
        "UNEXPECTED_TOOL_CALL",
        "TOO_MANY_TOOL_CALLS",
        "MISSING_THOUGHT_SIGNATURE",
    }
)
# The image types Gemini accepts, by file extension (not the host's mime.types: deterministic).
_IMAGE_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
}
_TOOL_CHOICE = {"auto": "AUTO", "required": "ANY", "none": "NONE"}
_DETAIL = {"low": "MEDIA_RESOLUTION_LOW", "high": "MEDIA_RESOLUTION_HIGH"}
# Gemini 3 rejects a replayed functionCall without the thoughtSignature it came with, which an
# OpenAI-shaped history cannot carry. Google documents this value for exactly that case.
_SKIP_SIGNATURE = "skip_thought_signature_validator"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


# -- request ------------------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """A string, or a list of text parts, as one string (system, tool and function messages)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text") or "") for p in content)


@dataclass
class _Builder:
    upstream: str
    details: set[str] = field(default_factory=set)
    call_names: dict[str, str] = field(default_factory=dict)

    def image(self, url: str, detail: str | None, param: str) -> dict[str, Any]:
        if detail in _DETAIL:
            self.details.add(detail)
        if url.startswith("data:"):
            head, sep, data = url[5:].partition(",")
            mime, _, enc = head.partition(";")
            if not sep or enc.lower() != "base64" or not mime.lower().startswith("image/"):
                raise _bad("image data: URIs must be data:image/<type>;base64,<data>", param)
            return {"inlineData": {"mimeType": mime.lower(), "data": data}}
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.netloc:
            raise _bad("image URLs must be https URLs or data: URIs", param)
        guessed = _IMAGE_TYPES.get(parts.path.rsplit(".", 1)[-1].lower())
        if guessed is None:
            raise _bad(
                "the image type cannot be told from this URL's extension: "
                "send the image as a data: URI",
                param,
            )
        return {"fileData": {"mimeType": guessed, "fileUri": url}}

    def user_parts(self, content: Any, param: str) -> list[dict[str, Any]]:
        if isinstance(content, str):
            return [{"text": content}] if content else []
        parts: list[dict[str, Any]] = []
        for j, p in enumerate(content):
            if p.get("type") == "text":
                parts.append({"text": p["text"]})
            else:
                img = p.get("image_url") or {}
                parts.append(
                    self.image(
                        str(img.get("url", "")),
                        img.get("detail"),
                        f"{param}[{j}].image_url.url",
                    )
                )
        return parts

    def model_parts(self, msg: Mapping[str, Any], param: str) -> list[dict[str, Any]]:
        text = _text_of(msg.get("content")) or str(msg.get("refusal") or "")
        parts: list[dict[str, Any]] = [{"text": text}] if text else []
        for k, tc in enumerate(msg.get("tool_calls") or ()):
            fn = tc.get("function") or {}
            name = str(fn.get("name") or "")
            raw_args = str(fn.get("arguments") or "")
            where = f"{param}.tool_calls[{k}].function.arguments"
            try:
                args = json.loads(raw_args) if raw_args.strip() else {}
            except ValueError:
                raise _bad("tool call arguments must be a JSON object", where) from None
            if not isinstance(args, dict):
                raise _bad("tool call arguments must be a JSON object", where)
            self.call_names[str(tc.get("id"))] = name
            part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
            if self.upstream.startswith("gemini-3"):
                part["thoughtSignature"] = _SKIP_SIGNATURE
            parts.append(part)
        return parts

    def contents(
        self, messages: list[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        results: list[dict[str, Any]] | None = None  # the open run of function responses
        for i, msg in enumerate(messages):
            role = msg.get("role")
            param = f"messages[{i}]"
            if role in ("tool", "function"):
                if role == "tool":
                    call_id = str(msg.get("tool_call_id"))
                    if call_id not in self.call_names:
                        raise _bad(
                            "tool message answers no earlier assistant tool call",
                            f"{param}.tool_call_id",
                        )
                    name = self.call_names[call_id]
                else:
                    name = str(msg.get("name"))
                part = {
                    "functionResponse": {
                        "name": name,
                        "response": {"content": _text_of(msg.get("content"))},
                    }
                }
                if results is None:
                    results = []
                    contents.append({"role": "user", "parts": results})
                results.append(part)
                continue
            results = None
            if role in ("system", "developer"):
                text = _text_of(msg.get("content"))
                if text:
                    system.append({"text": text})
            elif role == "user":
                parts = self.user_parts(msg.get("content"), f"{param}.content")
                if parts:
                    contents.append({"role": "user", "parts": parts})
            elif role == "assistant":
                parts = self.model_parts(msg, param)
                if parts:
                    contents.append({"role": "model", "parts": parts})
        return system, contents


def _tools(raw: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    decls: list[dict[str, Any]] = []
    strict = False
    for tool in raw.get("tools") or ():
        fn = tool["function"]
        decl: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description") is not None:
            decl["description"] = fn["description"]
        if fn.get("parameters") is not None:
            decl["parametersJsonSchema"] = fn["parameters"]
        strict = strict or bool(fn.get("strict"))
        decls.append(decl)
    return ([{"functionDeclarations": decls}] if decls else []), strict


def _tool_config(choice: Any, strict: bool) -> dict[str, Any] | None:
    """OpenAI ``tool_choice`` → ``functionCallingConfig``. A ``strict`` tool under AUTO asks for
    VALIDATED (Gemini's AUTO with function-schema adherence); ANY is schema-constrained already."""
    cfg: dict[str, Any]
    if choice is None:
        if not strict:
            return None
        cfg = {"mode": "VALIDATED"}
    elif isinstance(choice, str):
        mode = _TOOL_CHOICE[choice]
        cfg = {"mode": "VALIDATED" if strict and mode == "AUTO" else mode}
    else:
        cfg = {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    return {"functionCallingConfig": cfg}


def _generation_config(
    kind: Kind, raw: Mapping[str, Any], model: ModelInfo, details: set[str]
) -> dict[str, Any]:
    gc: dict[str, Any] = {}
    t = raw.get("temperature")
    if kind == "completion":
        gc["temperature"] = COMPLETIONS_DEFAULT_TEMPERATURE if t is None else t
    elif model.fixed_temperature is not None:
        gc["temperature"] = model.fixed_temperature
    else:
        gc["temperature"] = 0.0 if t is None else t
    if raw.get("top_p") is not None:
        gc["topP"] = raw["top_p"]
    limit = raw.get("max_completion_tokens") or raw.get("max_tokens")
    if limit is None and kind == "completion":
        limit = COMPLETIONS_DEFAULT_MAX_TOKENS
    if limit is not None:
        gc["maxOutputTokens"] = limit
    stop = raw.get("stop")
    if stop:
        gc["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if raw.get("seed") is not None:
        gc["seed"] = raw["seed"]
    if raw.get("presence_penalty") is not None:
        gc["presencePenalty"] = raw["presence_penalty"]
    if raw.get("frequency_penalty") is not None:
        gc["frequencyPenalty"] = raw["frequency_penalty"]
    fmt = raw.get("response_format") or {}
    if fmt.get("type") == "json_object":
        gc["responseMimeType"] = "application/json"
    elif fmt.get("type") == "json_schema":
        gc["responseMimeType"] = "application/json"
        schema = (fmt.get("json_schema") or {}).get("schema")
        if schema is not None:
            gc["responseJsonSchema"] = schema
    if len(details) > 1:
        raise InvalidRequest(
            "images with different 'detail' values cannot be mixed with this model",
            param="messages",
            code="unsupported_value",
        )
    if details:
        gc["mediaResolution"] = _DETAIL[next(iter(details))]
    if model.thinking_budget is not None:
        gc["thinkingConfig"] = {"thinkingBudget": model.thinking_budget}
    if model.mode == "image_output":
        gc["responseModalities"] = ["TEXT", "IMAGE"]
    return gc


# -- answers ------------------------------------------------------------------------------------


def _usage(u: Mapping[str, Any]) -> UsageReport:
    thoughts = u.get("thoughtsTokenCount")
    cached = u.get("cachedContentTokenCount")
    return UsageReport(
        # tool-use prompt tokens are billed as input (built-in tools; none requested today)
        prompt_tokens=int(u.get("promptTokenCount") or 0)
        + int(u.get("toolUsePromptTokenCount") or 0),
        completion_tokens=int(u.get("candidatesTokenCount") or 0) + int(thoughts or 0),
        cached_tokens=int(cached) if cached is not None else None,
        reasoning_tokens=int(thoughts) if thoughts is not None else None,
    )


@dataclass
class _Folder:
    """Turns GenerateContentResponse objects (stream chunks or one whole body) into events."""

    calls: int = 0
    finished: bool = False
    usage: UsageReport | None = None

    def call_id(self, obj: Mapping[str, Any], fc: Mapping[str, Any], args: str) -> str:
        if fc.get("id"):
            return str(fc["id"])
        seed = f"{obj.get('responseId') or ''}|{self.calls}|{fc.get('name')}|{args}"
        return "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24]

    def events(self, obj: Any) -> list[ProviderEvent]:
        if not isinstance(obj, dict):
            raise UpstreamError("malformed chunk from the provider")
        if obj.get("error"):
            raise UpstreamError("the provider reported an error", code="provider_error")
        out: list[ProviderEvent] = []
        cands = [c for c in obj.get("candidates") or () if int(c.get("index") or 0) == 0]
        for cand in cands[:1]:
            for part in (cand.get("content") or {}).get("parts") or ():
                if part.get("thought"):
                    continue
                if part.get("text"):
                    out.append(TextDelta(str(part["text"])))
                elif part.get("functionCall"):
                    fc = part["functionCall"]
                    args = json.dumps(fc.get("args") or {})
                    out.append(
                        ToolCallDelta(
                            index=self.calls,
                            id=self.call_id(obj, fc, args),
                            name=str(fc.get("name") or ""),
                            arguments=args,
                        )
                    )
                    self.calls += 1
                elif part.get("inlineData"):
                    blob = part["inlineData"]
                    mime = str(blob.get("mimeType") or "application/octet-stream")
                    out.append(ImageOutput(f"data:{mime};base64,{blob.get('data') or ''}"))
            reason = cand.get("finishReason")
            if reason:
                if reason in _TOOL_FAILURES:
                    raise UpstreamError(
                        "the model produced an invalid function call", code="bad_function_call"
                    )
                mapped = _FINISH.get(str(reason), "stop")
                if mapped == "stop" and self.calls:
                    mapped = "tool_calls"
                out.append(Finish(mapped))
                self.finished = True
        if not cands and (obj.get("promptFeedback") or {}).get("blockReason"):
            out.append(Finish("content_filter"))
            self.finished = True
        meta = obj.get("usageMetadata")
        if meta:
            usage = _usage(meta)
            if usage != self.usage:  # cumulative: a new total replaces the old one
                self.usage = usage
                out.append(usage)
        return out


@dataclass
class GeminiStreamParser:
    _sse: SSEDecoder = field(
        default_factory=lambda: SSEDecoder(max_line=_MAX_SSE_LINE, max_event=_MAX_SSE_LINE)
    )
    _fold: _Folder = field(default_factory=_Folder)

    def feed(self, data: bytes) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        for _, obj in sse_json(self._sse, data):
            out.extend(self._fold.events(obj))
        return out

    def close(self) -> list[ProviderEvent]:
        try:
            self._sse.close()
        except SSEError as exc:
            raise UpstreamError("the provider ended the stream inside an event") from exc
        if not self._fold.finished:
            raise UpstreamError("the provider ended the stream before it was complete")
        return []


# -- the adapter --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeminiProvider:
    base_url: str
    name: str = "google"

    def unsupported(
        self, kind: Kind, fields: Mapping[str, Any], model: ModelInfo | None = None
    ) -> list[str]:
        """What Gemini cannot honour, so the answer is refused rather than signed as if it had.

        * ``n`` > 1: one candidate per answer (the relay folds one choice).
        * ``parallel_tool_calls: false``: Gemini has no switch to forbid parallel calls.
        * ``reasoning_effort``: the model table fixes each model's thinking budget (as the
          reference does); a per-request effort would be silently overridden.
        * ``name`` on a message: Gemini has no participant names.
        * ``user`` is accepted and not forwarded: an end-user id for the provider's abuse
          tracking; no answer depends on it (and it is not hashed).
        Everything else the schema accepts is translated by ``build``.
        """
        bad: list[str] = []
        if (fields.get("n") or 1) != 1:
            bad.append("n")
        if fields.get("parallel_tool_calls") is False:
            bad.append("parallel_tool_calls")
        if fields.get("reasoning_effort") is not None:
            bad.append("reasoning_effort")
        for i, msg in enumerate(fields.get("messages") or ()):
            if isinstance(msg, Mapping) and msg.get("role") != "function" and msg.get("name"):
                bad.append(f"messages[{i}].name")
        return bad

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        if kind == "completion" and model.mode == "image_output":
            raise InvalidRequest(
                f"The model '{model.name}' answers with images: use /v1/chat/completions.",
                param="model",
                code="unsupported_model",
            )
        b = _Builder(model.upstream)
        if kind == "chat":
            system, contents = b.contents(list(raw.get("messages") or ()))
        else:
            system, contents = [], [{"role": "user", "parts": [{"text": raw.get("prompt", "")}]}]
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        tools, strict = _tools(raw)
        if tools:
            body["tools"] = tools
        tool_config = _tool_config(raw.get("tool_choice"), strict and bool(tools))
        if tool_config is not None:
            body["toolConfig"] = tool_config
        body["generationConfig"] = _generation_config(kind, raw, model, b.details)

        stream = bool(raw.get("stream")) and model.mode != "image_output"
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        headers = [
            ("content-type", "application/json"),
            ("accept", "text/event-stream" if stream else "application/json"),
            ("accept-encoding", "identity"),
        ]
        if api_key:
            headers.append(("x-goog-api-key", api_key))
        return UpstreamCall(
            method="POST",
            url=f"{self.base_url.rstrip('/')}/v1beta/models/{quote(model.upstream)}:{method}",
            headers=tuple(headers),
            body=_dumps(body),
            stream=stream,
        )

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> GeminiStreamParser:
        return GeminiStreamParser()

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("malformed answer from the provider") from exc
        fold = _Folder()
        events = fold.events(obj)
        if not fold.finished:
            raise UpstreamError("malformed answer from the provider")
        return events

    def error(self, status: int, body: bytes) -> GatewayError:
        message = f"the provider answered HTTP {status}"
        detail: str | None = None
        reasons: set[str] = set()
        try:
            err = json.loads(body)["error"]
            if isinstance(err.get("message"), str):
                detail = err["message"]
            for d in err.get("details") or ():
                if isinstance(d, dict) and isinstance(d.get("reason"), str):
                    reasons.add(d["reason"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        if "API_KEY_INVALID" in reasons:
            # Gemini answers a bad key with 400: the gateway's fault, not the client's.
            return UpstreamError(message, provider_status=status, code="provider_auth")
        return http_error(status, detail)
