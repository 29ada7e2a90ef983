"""Anthropic Messages API adapter: OpenAI chat/completions in, ``POST /v1/messages`` out.

Pure, like every adapter: ``build`` translates the validated OpenAI request into a Messages
request, the parsers turn Messages answers (SSE or one JSON body) into relay events. Choices made
where the two APIs differ (each keeps the signed hash honest: it never vouches for a value that
was not used, and a parameter Anthropic cannot honour is refused, not dropped):

* ``system``/``developer`` messages, wherever they stand, become the top-level ``system`` (one
  string when there is a single string, else text blocks in order). ``name`` fields are dropped
  (Anthropic has none; the reference drops them too). Legacy ``function`` messages carry no tool
  call id and are refused (400).
* Consecutive messages that map to the same Anthropic role are merged into one message (tool
  results first, as Anthropic requires, since ``tool`` messages come right after the assistant
  turn). A merged message that is a single text block is sent as a plain string.
* ``max_tokens`` is required by Anthropic: the smaller of ``max_tokens`` and
  ``max_completion_tokens`` when the client gave either, else ``min(model.max_output, 8192)``
  for chat (``DEFAULT_MAX_TOKENS``; the reference used 4096, and an omitted value is not hashed)
  and 16 for legacy completions (hashed as 16, as in the OpenAI adapter).
* ``temperature`` defaults to 0.0 for chat (it is hashed as 0.0) and 1.0 for completions;
  Anthropic's range is 0..1, so a larger value is refused by ``unsupported``. ``top_p`` is passed
  through: some models refuse ``temperature`` and ``top_p`` together, which surfaces as the
  provider's 400.
* ``response_format: json_schema`` becomes a forced tool named after the schema; the tool's input
  is delivered as text, ``json.dumps(input)`` with default separators (what the reference signs),
  finish ``stop`` (``length`` if cut). Text blocks beside it are not part of that answer. It
  cannot be combined with client tools (400). ``json_object`` has no Anthropic equivalent (400).
* Tool ``strict`` flags and image ``detail`` have no equivalent and are dropped; empty assistant
  ``arguments`` are read as ``{}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.errors import GatewayError, InvalidRequest, UpstreamError
from ..codecs.sse import SSEDecoder
from ..relay.events import Finish, ProviderEvent, TextDelta, ToolCallDelta, UsageReport
from ..signing.canonical import COMPLETIONS_DEFAULT_MAX_TOKENS, COMPLETIONS_DEFAULT_TEMPERATURE
from .base import Kind, ModelInfo, UpstreamCall
from .common import error_message, http_error, sse_json

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 8192  # chat requests without a limit: min(model.max_output, this)
MAX_TEMPERATURE = 1.0
JSON_TOOL = "json_tool"  # UpstreamCall.context key: name of the forced structured-output tool

_CLIENT_ERRORS = frozenset({400, 404, 413, 422})
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_DATA_URI = re.compile(r"data:(image/(?:jpeg|png|gif|webp));base64,([A-Za-z0-9+/=\s]+)", re.S)
_JSON_TOOL_DESCRIPTION = "Give the final answer as this tool's input, matching its schema."


# -- request ------------------------------------------------------------------------------------


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _texts(content: Any) -> Iterator[str]:
    """The texts of a string or a list of text parts (already validated)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if part.get("type") == "text":
                yield str(part["text"])


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    return [{"type": "text", "text": t} for t in _texts(content) if t]


def _image_block(url: str, param: str) -> dict[str, Any]:
    if url.startswith("data:"):
        m = _DATA_URI.fullmatch(url)
        if m is None:
            raise _bad(
                "image data URIs must be base64 JPEG, PNG, GIF or WebP for this model", param
            )
        data = re.sub(r"\s+", "", m.group(2))
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": m.group(1), "data": data},
        }
    if url.startswith("https://"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad("image URLs must be https:// URLs or data: URIs", param)


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        if part.get("type") == "text":
            out.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            out.append(_image_block(part["image_url"]["url"], f"{param}[{i}].image_url.url"))
    return out


def _tool_use(call: Mapping[str, Any], param: str) -> dict[str, Any]:
    fn = call["function"]
    args = fn.get("arguments") or ""
    try:
        parsed = json.loads(args) if args.strip() else {}
    except ValueError:
        raise _bad("tool call arguments must be a JSON object", param) from None
    if not isinstance(parsed, dict):
        raise _bad("tool call arguments must be a JSON object", param)
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed}


def _tool_result(msg: Mapping[str, Any]) -> dict[str, Any]:
    content = msg["content"]
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": msg["tool_call_id"]}
    block["content"] = content if isinstance(content, str) else _text_blocks(content)
    return block


def _translate_messages(
    messages: list[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, Anthropic messages) from OpenAI chat messages."""
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        param = f"messages[{i}]"
        blocks: list[dict[str, Any]]
        if role in ("system", "developer"):
            system.extend(_text_blocks(msg["content"]))
            continue
        if role == "user":
            anth_role, blocks = "user", _user_blocks(msg["content"], f"{param}.content")
        elif role == "assistant":
            blocks = _text_blocks(msg.get("content"))
            for j, call in enumerate(msg.get("tool_calls") or ()):
                blocks.append(_tool_use(call, f"{param}.tool_calls[{j}].function.arguments"))
            anth_role = "assistant"
        elif role == "tool":
            anth_role, blocks = "user", [_tool_result(msg)]
        else:
            raise _bad(
                f"messages with role '{role}' are not supported by this model; "
                "use 'tool' messages with a tool_call_id",
                f"{param}.role",
                "unsupported_value",
            )
        if not blocks:
            continue
        if turns and turns[-1][0] == anth_role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((anth_role, blocks))
    out: list[dict[str, Any]] = []
    for anth_role, blocks in turns:
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            out.append({"role": anth_role, "content": blocks[0]["text"]})
        else:
            out.append({"role": anth_role, "content": blocks})
    return system, out


def _tools(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tool in raw.get("tools") or ():
        fn = tool["function"]
        t: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            t["description"] = fn["description"]
        t["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
        out.append(t)
    return out


def _tool_choice(raw: Mapping[str, Any], have_tools: bool) -> dict[str, Any] | None:
    choice = raw.get("tool_choice")
    if not have_tools:
        if choice in (None, "none", "auto"):
            return None
        raise _bad("'tool_choice' needs 'tools'", "tool_choice")
    tc: dict[str, Any]
    if choice is None or choice == "auto":
        tc = {"type": "auto"}
    elif choice == "required":
        tc = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    else:
        tc = {"type": "tool", "name": choice["function"]["name"]}
    if raw.get("parallel_tool_calls") is False:
        tc["disable_parallel_tool_use"] = True
    elif choice is None:
        return None  # Anthropic's default is auto
    return tc


def _max_tokens(kind: Kind, raw: Mapping[str, Any], model: ModelInfo) -> int:
    given = [v for v in (raw.get("max_tokens"), raw.get("max_completion_tokens")) if v is not None]
    if given:
        return int(min(given))
    if kind == "completion":
        return COMPLETIONS_DEFAULT_MAX_TOKENS
    return min(model.max_output or DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS)


def _json_schema_tool(fmt: Mapping[str, Any]) -> dict[str, Any]:
    js = fmt["json_schema"]
    schema = js.get("schema")
    if schema is None:
        schema = {"type": "object"}
    if schema.get("type", "object") != "object":
        raise _bad(
            "with this model, response_format.json_schema.schema must describe a JSON object",
            "response_format.json_schema.schema",
        )
    return {
        "name": js["name"],
        "description": js.get("description") or _JSON_TOOL_DESCRIPTION,
        "input_schema": schema,
    }


# -- answers ------------------------------------------------------------------------------------


def _finish(stop_reason: Any, json_mode: bool) -> Finish:
    reason = _STOP_REASONS.get(str(stop_reason), "stop")
    if json_mode and reason == "tool_calls":
        reason = "stop"
    return Finish(reason)


def _int(v: Any) -> int:
    return int(v) if v is not None else 0


def _json_text(value: Any) -> str:
    """Structured output as the reference signs it: ``json.dumps(parsed)``, default separators."""
    return json.dumps(value)


@dataclass
class _Usage:
    input: int = 0
    cache_read: int | None = None
    cache_creation: int = 0
    output: int = 0

    def update(self, u: Mapping[str, Any] | None) -> None:
        if not u:
            return
        if u.get("input_tokens") is not None:
            self.input = int(u["input_tokens"])
        if u.get("cache_read_input_tokens") is not None:
            self.cache_read = int(u["cache_read_input_tokens"])
        if u.get("cache_creation_input_tokens") is not None:
            self.cache_creation = int(u["cache_creation_input_tokens"])
        if u.get("output_tokens") is not None:
            self.output = int(u["output_tokens"])

    def report(self) -> UsageReport:
        return UsageReport(
            prompt_tokens=self.input + _int(self.cache_read) + self.cache_creation,
            completion_tokens=self.output,
            cached_tokens=self.cache_read,
        )


def _error_event(obj: Mapping[str, Any]) -> UpstreamError:
    err = obj.get("error") or {}
    etype = err.get("type") if isinstance(err, dict) else None
    retryable = etype in (
        None,
        "overloaded_error",
        "api_error",
        "rate_limit_error",
        "timeout_error",
    )
    return UpstreamError(
        "the provider reported an error", code="provider_error", retryable=retryable
    )


@dataclass
class _Block:
    kind: str  # "text" | "tool" | "json" | "other"
    tool_index: int = -1
    got_args: bool = False
    json_parts: list[str] = field(default_factory=list)


@dataclass
class AnthropicStreamParser:
    json_tool: str | None = None
    _sse: SSEDecoder = field(default_factory=SSEDecoder)
    _blocks: dict[int, _Block] = field(default_factory=dict)
    _tools: int = 0
    _usage: _Usage = field(default_factory=_Usage)
    _started: bool = False
    _stopped: bool = False
    _pending_json: str | None = None  # structured output that did not parse (yet)

    def feed(self, data: bytes) -> list[ProviderEvent]:
        out: list[ProviderEvent] = []
        for ev, obj in sse_json(self._sse, data):
            if not isinstance(obj, dict):
                raise UpstreamError("malformed event from the provider")
            self._event(str(obj.get("type") or ev.event), obj, out)
        return out

    def close(self) -> list[ProviderEvent]:
        if not self._stopped:
            raise UpstreamError("the provider ended the stream before it was complete")
        return []

    def _event(self, etype: str, obj: Mapping[str, Any], out: list[ProviderEvent]) -> None:
        if etype == "error":
            raise _error_event(obj)
        if self._stopped or etype == "ping":
            return
        if etype == "message_start":
            self._started = True
            self._usage.update((obj.get("message") or {}).get("usage"))
        elif etype == "content_block_start":
            self._block_start(int(obj["index"]), obj["content_block"], out)
        elif etype == "content_block_delta":
            self._block_delta(int(obj["index"]), obj["delta"], out)
        elif etype == "content_block_stop":
            self._block_stop(int(obj["index"]), out)
        elif etype == "message_delta":
            self._usage.update(obj.get("usage"))
            out.append(self._usage.report())
            stop_reason = (obj.get("delta") or {}).get("stop_reason")
            if stop_reason is not None:
                finish = _finish(stop_reason, self.json_tool is not None)
                if self._pending_json is not None:
                    if finish.reason != "length":
                        raise UpstreamError("malformed structured output from the provider")
                    out.append(TextDelta(self._pending_json))  # cut short: deliver what came
                    self._pending_json = None
                out.append(finish)
        elif etype == "message_stop":
            if not self._started:
                raise UpstreamError("malformed event stream from the provider")
            self._stopped = True
        # other event types: Anthropic may add new ones; they are ignored, as its docs ask

    def _block_start(self, index: int, block: Mapping[str, Any], out: list[ProviderEvent]) -> None:
        btype = block.get("type")
        if btype == "text":
            self._blocks[index] = _Block("text" if self.json_tool is None else "other")
            if block.get("text") and self.json_tool is None:
                out.append(TextDelta(str(block["text"])))
        elif btype == "tool_use" and self.json_tool is not None and block["name"] == self.json_tool:
            self._blocks[index] = _Block("json")
        elif btype == "tool_use":
            b = _Block("tool", tool_index=self._tools)
            self._tools += 1
            self._blocks[index] = b
            out.append(ToolCallDelta(b.tool_index, id=str(block["id"]), name=str(block["name"])))
        else:  # thinking, server tools, ...: not part of an OpenAI answer
            self._blocks[index] = _Block("other")

    def _block_delta(self, index: int, delta: Mapping[str, Any], out: list[ProviderEvent]) -> None:
        b = self._blocks.get(index)
        if b is None:
            raise UpstreamError("malformed event stream from the provider")
        dtype = delta.get("type")
        if b.kind == "text" and dtype == "text_delta":
            if delta["text"]:
                out.append(TextDelta(str(delta["text"])))
        elif b.kind == "tool" and dtype == "input_json_delta":
            if delta["partial_json"]:
                b.got_args = True
                out.append(ToolCallDelta(b.tool_index, arguments=str(delta["partial_json"])))
        elif b.kind == "json" and dtype == "input_json_delta":
            b.json_parts.append(str(delta["partial_json"]))

    def _block_stop(self, index: int, out: list[ProviderEvent]) -> None:
        b = self._blocks.get(index)
        if b is None:
            raise UpstreamError("malformed event stream from the provider")
        if b.kind == "tool" and not b.got_args:
            out.append(ToolCallDelta(b.tool_index, arguments="{}"))  # a tool without input
        elif b.kind == "json":
            raw = "".join(b.json_parts)
            try:
                out.append(TextDelta(_json_text(json.loads(raw or "{}"))))
            except ValueError:
                self._pending_json = raw  # fine only if the answer was cut (message_delta)


def _body_events(obj: Mapping[str, Any], json_tool: str | None) -> list[ProviderEvent]:
    out: list[ProviderEvent] = []
    tools = 0
    for block in obj["content"]:
        btype = block.get("type")
        if btype == "tool_use" and json_tool is not None and block["name"] == json_tool:
            out.append(TextDelta(_json_text(block["input"])))
        elif btype == "tool_use":
            out.append(
                ToolCallDelta(
                    tools,
                    id=str(block["id"]),
                    name=str(block["name"]),
                    arguments=json.dumps(block["input"]),
                )
            )
            tools += 1
        elif btype == "text" and json_tool is None and block.get("text"):
            out.append(TextDelta(str(block["text"])))
    usage = _Usage()
    usage.update(obj.get("usage"))
    out.append(usage.report())
    out.append(_finish(obj.get("stop_reason"), json_tool is not None))
    return out


# -- the adapter --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnthropicProvider:
    base_url: str
    name: str = "anthropic"

    def unsupported(
        self, kind: Kind, fields: Mapping[str, Any], model: ModelInfo | None = None
    ) -> list[str]:
        bad: list[str] = []
        t = fields.get("temperature")
        if t is not None and t > MAX_TEMPERATURE:
            bad.append("temperature")
        if fields.get("seed") is not None:
            bad.append("seed")
        for name in ("frequency_penalty", "presence_penalty"):
            if fields.get(name) not in (None, 0):
                bad.append(name)
        for name in ("logit_bias", "logprobs", "top_logprobs"):
            if fields.get(name) not in (None, False, {}):
                bad.append(name)
        if fields.get("n") not in (None, 1):
            bad.append("n")
        if fields.get("reasoning_effort") is not None:
            bad.append("reasoning_effort")
        fmt = fields.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
            bad.append("response_format")
        return bad

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        bad = self.unsupported(kind, raw)  # the route checks first; a direct caller too
        if bad:
            raise _bad(
                f"Unsupported parameter for this model: '{bad[0]}'", bad[0], "unsupported_parameter"
            )
        stream = bool(raw.get("stream"))
        context: dict[str, Any] = {}
        body: dict[str, Any] = {
            "model": model.upstream,
            "max_tokens": _max_tokens(kind, raw, model),
        }
        if kind == "completion":
            body["messages"] = [{"role": "user", "content": raw["prompt"]}]
        else:
            system, messages = _translate_messages(raw["messages"])
            if system:
                only = len(system) == 1
                body["system"] = system[0]["text"] if only else system
            body["messages"] = messages
        t = raw.get("temperature")
        if t is None and kind == "completion":
            t = COMPLETIONS_DEFAULT_TEMPERATURE
        elif t is None and model.fixed_temperature is None:
            t = 0.0
        if t is not None:
            body["temperature"] = t
        if raw.get("top_p") is not None:
            body["top_p"] = raw["top_p"]
        stop = raw.get("stop")
        if stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        if kind == "chat":
            tools = _tools(raw)
            tool_choice = _tool_choice(raw, bool(tools))
            fmt = raw.get("response_format") or {}
            if fmt.get("type") == "json_schema":
                if tools:
                    raise _bad(
                        "with this model, response_format json_schema cannot be combined with "
                        "tools",
                        "response_format",
                        "unsupported_value",
                    )
                forced = _json_schema_tool(fmt)
                tools = [forced]
                tool_choice = {"type": "tool", "name": forced["name"]}
                context[JSON_TOOL] = forced["name"]
            if tools:
                body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        if raw.get("user"):
            body["metadata"] = {"user_id": raw["user"]}
        if stream:
            body["stream"] = True
        headers = [
            ("content-type", "application/json"),
            ("accept", "text/event-stream" if stream else "application/json"),
            ("accept-encoding", "identity"),
            ("anthropic-version", ANTHROPIC_VERSION),
        ]
        if api_key:
            headers.append(("x-api-key", api_key))
        return UpstreamCall(
            method="POST",
            url=self.base_url.rstrip("/") + "/v1/messages",
            headers=tuple(headers),
            body=json.dumps(body, separators=(",", ":")).encode(),
            stream=stream,
            context=context,
        )

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> AnthropicStreamParser:
        return AnthropicStreamParser(json_tool=call.context.get(JSON_TOOL))

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("malformed answer from the provider") from exc
        if not isinstance(obj, dict):
            raise UpstreamError("malformed answer from the provider")
        if obj.get("type") == "error":
            raise _error_event(obj)
        if not isinstance(obj.get("content"), list):
            raise UpstreamError("malformed answer from the provider")
        return _body_events(obj, call.context.get(JSON_TOOL))

    def error(self, status: int, body: bytes) -> GatewayError:
        return http_error(status, error_message(body))
