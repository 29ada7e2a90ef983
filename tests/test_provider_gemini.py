"""The Gemini adapter: request building, answer parsing, and the real app end to end.

Transcripts are written from Google's public Gemini API reference (``GenerateContentResponse``
objects, one per ``data:`` line with ``alt=sse``, CRLF line ends as Google sends them). End-to-end
tests drive the real app in-process (``ASGIClient``) over a scripted provider wire; the last test
runs a real Hypercorn gateway against a loopback Gemini-style server (trio + h11) that records
the instant the gateway closes its connection.
"""

from __future__ import annotations

import base64
import gc
import json
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest
import trio
import trio.testing

from tests.asgi import ASGIClient, ASGIResult, ScriptedUpstream, keccak, verify_tee
from tests.conftest import make_state, start_gateway
from tests.test_disconnect_sockets import (
    RawClient,
    assert_metered_once,
    content_chunks,
    head_complete,
    status_of,
)
from trio_gateway.api.errors import InvalidRequest, UpstreamError
from trio_gateway.app import create_app
from trio_gateway.providers.base import ModelInfo, UpstreamCall
from trio_gateway.providers.gemini import GeminiProvider, GeminiStreamParser
from trio_gateway.providers.registry import ModelRegistry
from trio_gateway.relay.accumulate import Answer
from trio_gateway.relay.events import (
    Finish,
    ImageOutput,
    ProviderEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from trio_gateway.signing.keys import EnclaveKey

BASE = "https://generativelanguage.googleapis.com/"
G = GeminiProvider(BASE)
REGISTRY = ModelRegistry.load_default(
    providers={"openai", "anthropic", "google", "xai", "bytedance", "nous", "mock"}, dev=True
)
PATH = "/v1/chat/completions"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nnot-really-a-png").decode()


def model(name: str) -> ModelInfo:
    info = REGISTRY.resolve(name)
    assert info is not None and info.provider == "google"
    return info


def build(raw: dict[str, Any], name: str = "gemini-2.5-flash", kind: Any = "chat") -> UpstreamCall:
    return G.build(kind, raw, model(name), "g-secret-key")


def sent(call: UpstreamCall) -> dict[str, Any]:
    obj = json.loads(call.body)
    assert isinstance(obj, dict)
    return obj


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# -- request building ---------------------------------------------------------------------------


def test_build_text_chat_url_headers_and_exact_body() -> None:
    call = build(
        {
            "model": "gemini-2.5-flash",
            "stream": True,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                user("Hi"),
                {"role": "assistant", "content": "Bonjour"},
                user("Again"),
            ],
            "top_p": 0.5,
            "max_tokens": 100,
            "stop": "END",
            "seed": 7,
            "user": "end-user-42",
        }
    )
    assert call.method == "POST" and call.stream is True
    assert call.url == (
        "https://generativelanguage.googleapis.com/v1beta/models/"
        "gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    headers = dict(call.headers)
    assert headers["x-goog-api-key"] == "g-secret-key"
    assert headers["content-type"] == "application/json"
    assert headers["accept-encoding"] == "identity"
    assert headers["accept"] == "text/event-stream"
    # the key never rides in the URL (URLs are logged)
    assert "g-secret-key" not in call.url and "key=" not in call.url
    assert "g-secret-key" not in call.body.decode()
    assert sent(call) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Bonjour"}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ],
        "generationConfig": {
            "temperature": 0.0,  # the reference's default, made explicit (it is hashed)
            "topP": 0.5,
            "maxOutputTokens": 100,
            "stopSequences": ["END"],
            "seed": 7,
            "thinkingConfig": {"thinkingBudget": 0},  # gemini-2.5-flash in models.toml
        },
    }


def test_build_non_stream_url_and_client_values() -> None:
    call = build(
        {
            "model": "gemini-2.5-flash",
            "messages": [user("x")],
            "temperature": 0.7,
            "max_completion_tokens": 64,
            "max_tokens": 9,
            "stop": ["a", "b"],
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
        }
    )
    assert call.stream is False
    assert call.url.endswith("/v1beta/models/gemini-2.5-flash:generateContent")
    assert dict(call.headers)["accept"] == "application/json"
    assert sent(call)["generationConfig"] == {
        "temperature": 0.7,
        "maxOutputTokens": 64,  # max_completion_tokens wins over max_tokens
        "stopSequences": ["a", "b"],
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
        "thinkingConfig": {"thinkingBudget": 0},
    }


def test_build_without_key_sends_no_key_header() -> None:
    call = G.build("chat", {"messages": [user("x")]}, model("gemini-2.5-flash"), None)
    assert "x-goog-api-key" not in dict(call.headers)


@pytest.mark.parametrize(
    ("name", "budget"),
    [("gemini-2.5-flash", 0), ("gemini-2.5-pro", 128), ("gemini-3-pro-preview", None)],
)
def test_thinking_budget_from_model_table(name: str, budget: int | None) -> None:
    gc_ = sent(build({"messages": [user("x")]}, name))["generationConfig"]
    if budget is None:
        assert "thinkingConfig" not in gc_
    else:
        assert gc_["thinkingConfig"] == {"thinkingBudget": budget}


def test_build_images_inline_and_file_and_detail() -> None:
    call = build(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in these?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/cat.JPG?x=1"},
                        },
                    ],
                }
            ]
        }
    )
    body = sent(call)
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "What is in these?"},
                {"inlineData": {"mimeType": "image/png", "data": PNG}},
                {
                    "fileData": {
                        "mimeType": "image/jpeg",
                        "fileUri": "https://example.com/cat.JPG?x=1",
                    }
                },
            ],
        }
    ]
    assert body["generationConfig"]["mediaResolution"] == "MEDIA_RESOLUTION_LOW"


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.png",  # not https
        "https://example.com/cat",  # type unknown
        "https://example.com/doc.pdf",  # not an image
        "data:image/png,rawbytes",  # not base64
        "data:text/plain;base64,aGk=",  # not an image
        "ftp://example.com/cat.png",
    ],
)
def test_build_rejects_images_it_cannot_send(url: str) -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(InvalidRequest) as ei:
        build({"messages": [user("first"), msg]})
    assert ei.value.status == 400
    assert ei.value.param == "messages[1].content[0].image_url.url"
    assert url not in ei.value.message  # request content is never echoed


def test_build_rejects_mixed_image_detail() -> None:
    def img(detail: str) -> dict[str, Any]:
        return {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": detail},
        }

    with pytest.raises(InvalidRequest):
        build({"messages": [{"role": "user", "content": [img("low"), img("high")]}]})
    gc_ = sent(build({"messages": [{"role": "user", "content": [img("high"), img("auto")]}]}))
    assert gc_["generationConfig"]["mediaResolution"] == "MEDIA_RESOLUTION_HIGH"


WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        (None, None),
        ("auto", {"functionCallingConfig": {"mode": "AUTO"}}),
        ("none", {"functionCallingConfig": {"mode": "NONE"}}),
        ("required", {"functionCallingConfig": {"mode": "ANY"}}),
        (
            {"type": "function", "function": {"name": "now"}},
            {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["now"]}},
        ),
    ],
)
def test_build_tools_and_tool_choice(choice: Any, config: dict[str, Any] | None) -> None:
    raw: dict[str, Any] = {"messages": [user("x")], "tools": [WEATHER, NOW]}
    if choice is not None:
        raw["tool_choice"] = choice
    body = sent(build(raw))
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    # full JSON Schema: additionalProperties would be refused by `parameters`
                    "parametersJsonSchema": WEATHER["function"]["parameters"],
                },
                {"name": "now"},
            ]
        }
    ]
    assert body.get("toolConfig") == config


def test_build_strict_tool_asks_for_validated_mode() -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    body = sent(build({"messages": [user("x")], "tools": [strict]}))
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "VALIDATED"}}
    body = sent(build({"messages": [user("x")], "tools": [strict], "tool_choice": "required"}))
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


def _tool_history() -> list[dict[str, Any]]:
    return [
        user("Weather in Zürich and the time?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Z\\u00fcrich"}'},
                },
                {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_a", "content": [{"type": "text", "text": "sunny"}]},
        user("Thanks"),
    ]


def test_build_tool_calls_and_results() -> None:
    body = sent(build({"messages": _tool_history(), "tools": [WEATHER, NOW]}))
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Zürich and the time?"}]},
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Zürich"}}},
                {"functionCall": {"name": "now", "args": {}}},
            ],
        },
        {  # one user turn holding every result of the run, names looked up by tool_call_id
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "now", "response": {"content": "12:00"}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "sunny"}}},
            ],
        },
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ]


def test_build_gemini3_replayed_calls_carry_the_documented_skip_signature() -> None:
    body = sent(build({"messages": _tool_history()}, "gemini-3-pro-preview"))
    calls = [p for p in body["contents"][1]["parts"] if "functionCall" in p]
    assert len(calls) == 2
    assert all(p["thoughtSignature"] == "skip_thought_signature_validator" for p in calls)


def test_build_rejects_bad_tool_arguments_and_orphan_results() -> None:
    hist = _tool_history()
    hist[1]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(InvalidRequest) as ei:
        build({"messages": hist})
    assert ei.value.param == "messages[1].tool_calls[0].function.arguments"
    hist = _tool_history()
    hist[1]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    with pytest.raises(InvalidRequest):
        build({"messages": hist})
    with pytest.raises(InvalidRequest) as ei:
        build({"messages": [user("x"), {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    assert ei.value.param == "messages[1].tool_call_id"


def test_build_response_formats() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    gc_ = sent(build({"messages": [user("x")], "response_format": fmt}))["generationConfig"]
    assert gc_["responseMimeType"] == "application/json"
    assert gc_["responseJsonSchema"] == schema
    gc_ = sent(build({"messages": [user("x")], "response_format": {"type": "json_object"}}))[
        "generationConfig"
    ]
    assert gc_["responseMimeType"] == "application/json" and "responseJsonSchema" not in gc_
    gc_ = sent(build({"messages": [user("x")], "response_format": {"type": "text"}}))[
        "generationConfig"
    ]
    assert "responseMimeType" not in gc_


@pytest.mark.parametrize("stream", [False, True])
def test_build_image_output_model_asks_text_and_image_in_one_call(stream: bool) -> None:
    call = build({"messages": [user("draw a cat")], "stream": stream}, "gemini-2.5-flash-image")
    # invoked once even for a streaming client (as the reference does): no SSE image events
    assert call.stream is False
    assert call.url.endswith("/v1beta/models/gemini-2.5-flash-image:generateContent")
    assert sent(call)["generationConfig"] == {
        "temperature": 0.0,
        "responseModalities": ["TEXT", "IMAGE"],
    }


def test_build_completion_kind() -> None:
    call = build({"model": "gemini-2.5-flash", "prompt": "Once upon"}, kind="completion")
    assert sent(call) == {
        "contents": [{"role": "user", "parts": [{"text": "Once upon"}]}],
        # the reference's completion defaults: temperature 1.0, 16 tokens (hashed and run)
        "generationConfig": {
            "temperature": 1.0,
            "maxOutputTokens": 16,
            "thinkingConfig": {"thinkingBudget": 0},
        },
    }
    with pytest.raises(InvalidRequest):
        build({"prompt": "a cat"}, "gemini-2.5-flash-image", kind="completion")


def test_unsupported_fields() -> None:
    ok = {"messages": [user("x")], "user": "u-1", "n": 1, "parallel_tool_calls": True}
    assert G.unsupported("chat", ok) == []
    assert G.unsupported("chat", {"messages": [user("x")], "parallel_tool_calls": False}) == [
        "parallel_tool_calls"
    ]
    assert G.unsupported("chat", {"messages": [user("x")], "reasoning_effort": "low"}) == [
        "reasoning_effort"
    ]
    assert G.unsupported("chat", {"messages": [user("x")], "n": 2}) == ["n"]
    named = {"messages": [user("x"), {"role": "user", "content": "y", "name": "bob"}]}
    assert G.unsupported("chat", named) == ["messages[1].name"]
    legacy = {"messages": [{"role": "function", "name": "f", "content": "1"}]}
    assert G.unsupported("chat", legacy) == []


# -- answers: stream transcripts ----------------------------------------------------------------


def g_chunk(
    parts: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    **extra: Any,
) -> bytes:
    """One ``streamGenerateContent?alt=sse`` event, shaped like Google's."""
    obj: dict[str, Any] = {}
    if parts is not None or finish is not None:
        cand: dict[str, Any] = {"content": {"parts": parts or [], "role": "model"}, "index": 0}
        if finish is not None:
            cand["finishReason"] = finish
        obj["candidates"] = [cand]
    if usage is not None:
        obj["usageMetadata"] = {
            **usage,
            "totalTokenCount": sum(v for k, v in usage.items() if k != "cachedContentTokenCount"),
        }
    obj["modelVersion"] = "gemini-2.5-flash"
    obj["responseId"] = "resp-abc"
    obj.update(extra)
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def u(prompt: int, out: int | None = None, **more: int) -> dict[str, int]:
    d = {"promptTokenCount": prompt, **more}
    if out is not None:
        d["candidatesTokenCount"] = out
    return d


TEXT_STREAM = [
    g_chunk([{"text": "thinking hard", "thought": True}], usage=u(11, 0, thoughtsTokenCount=4)),
    g_chunk([{"text": "Hel"}], usage=u(11, 1, thoughtsTokenCount=4)),
    g_chunk([{"text": "lo, wörld"}], usage=u(11, 4, thoughtsTokenCount=4)),
    g_chunk(
        [{"text": " ✓"}],
        "STOP",
        usage=u(11, 5, thoughtsTokenCount=4, cachedContentTokenCount=3),
    ),
]


def feed_all(chunks: list[bytes], split: int | None = None) -> list[ProviderEvent]:
    p = G.stream_parser("chat", build({"messages": [user("x")], "stream": True}))
    data = b"".join(chunks)
    out: list[ProviderEvent] = []
    if split is None:
        for c in chunks:
            out += p.feed(c)
    else:
        for i in range(0, len(data), split):
            out += p.feed(data[i : i + split])
    out += p.close()
    return out


def fold(evs: list[ProviderEvent]) -> Answer:
    a = Answer()
    for ev in evs:
        a.add(ev)
    return a


@pytest.mark.parametrize("split", [None, 1, 7])
def test_stream_text_skips_thoughts_and_usage_is_not_double_counted(split: int | None) -> None:
    evs = feed_all(TEXT_STREAM, split)
    assert [e.text for e in evs if isinstance(e, TextDelta)] == ["Hel", "lo, wörld", " ✓"]
    assert [e for e in evs if isinstance(e, Finish)] == [Finish("stop")]
    answer = fold(evs)
    # cumulative totals: the last one is the answer's usage, never a sum of the chunks'
    assert answer.usage == UsageReport(
        prompt_tokens=11, completion_tokens=9, cached_tokens=3, reasoning_tokens=4
    )
    reports = [e for e in evs if isinstance(e, UsageReport)]
    assert sum(r.prompt_tokens for r in reports) > 11  # what summing would have billed
    assert answer.text == "Hello, wörld ✓" and answer.finish_reason == "stop"


def test_stream_function_call_is_one_whole_delta() -> None:
    chunks = [
        g_chunk(
            [
                {"functionCall": {"name": "get_weather", "args": {"city": "Zürich"}}},
                {"functionCall": {"name": "now", "args": {}}},
            ],
            usage=u(30, 12),
        ),
        g_chunk([], "STOP", usage=u(30, 12)),
    ]
    evs = feed_all(chunks)
    calls = [e for e in evs if isinstance(e, ToolCallDelta)]
    assert [(c.index, c.name, c.arguments) for c in calls] == [
        (0, "get_weather", '{"city": "Z\\u00fcrich"}'),  # json.dumps(args), as the reference
        (1, "now", "{}"),
    ]
    ids = [c.id for c in calls]
    assert all(i and i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert [c.id for c in feed_all(chunks) if isinstance(c, ToolCallDelta)] == ids  # stable
    assert [e for e in evs if isinstance(e, Finish)] == [Finish("tool_calls")]
    assert [e for e in evs if isinstance(e, UsageReport)] == [UsageReport(30, 12)]
    answer = fold(evs)
    assert answer.finish_reason == "tool_calls"
    expected = json.dumps(
        [
            {
                "function": {"arguments": c.arguments, "name": c.name},
                "id": c.id,
                "type": "function",
            }
            for c in calls
        ],
        sort_keys=True,
    )
    assert answer.output_content() == expected


def test_stream_function_call_keeps_a_provider_id() -> None:
    evs = feed_all([g_chunk([{"functionCall": {"id": "fc-9", "name": "now"}}], "STOP")])
    [call] = [e for e in evs if isinstance(e, ToolCallDelta)]
    assert call.id == "fc-9" and call.arguments == "{}"


def test_stream_inline_image_becomes_data_uri() -> None:
    evs = feed_all(
        [
            g_chunk([{"text": "Here is your cat."}]),
            g_chunk(
                [
                    {"inlineData": {"mimeType": "image/png", "data": "draft"}, "thought": True},
                    {"inlineData": {"mimeType": "image/png", "data": PNG}},
                ],
                "STOP",
                usage=u(5, 1300),
            ),
        ]
    )
    assert [e for e in evs if isinstance(e, ImageOutput)] == [
        ImageOutput(f"data:image/png;base64,{PNG}")
    ]
    answer = fold(evs)
    assert answer.output_content() == "Here is your cat."  # images are not hashed


@pytest.mark.parametrize(
    ("reason", "mapped"),
    [
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MAX_TOKENS", "length"),
        ("OTHER", "stop"),
    ],
)
def test_stream_finish_reasons(reason: str, mapped: str) -> None:
    evs = feed_all([g_chunk([{"text": "partial"}]), g_chunk(None, reason, usage=u(3, 1))])
    assert fold(evs).finish_reason == mapped


def test_stream_prompt_blocked() -> None:
    evs = feed_all([g_chunk(None, None, usage=u(8), promptFeedback={"blockReason": "SAFETY"})])
    assert [e for e in evs if isinstance(e, Finish)] == [Finish("content_filter")]
    assert fold(evs).text == "" and fold(evs).usage == UsageReport(8, 0)


def test_stream_error_object_is_upstream_error() -> None:
    err = {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}
    p = GeminiStreamParser()
    assert p.feed(g_chunk([{"text": "a"}])) == [TextDelta("a")]
    with pytest.raises(UpstreamError) as ei:
        p.feed(b"data: " + json.dumps(err).encode() + b"\r\n\r\n")
    assert "overloaded" not in ei.value.message  # provider bodies are not echoed


def test_stream_tool_failure_is_upstream_error() -> None:
    with pytest.raises(UpstreamError):
        feed_all([g_chunk([], "MALFORMED_FUNCTION_CALL")])


def test_stream_truncated_is_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="before it was complete"):
        feed_all(TEXT_STREAM[:-1])
    p = GeminiStreamParser()
    p.feed(b"".join(TEXT_STREAM[:-1]) + TEXT_STREAM[-1][:30])  # cut inside the last event
    with pytest.raises(UpstreamError):
        p.close()
    with pytest.raises(UpstreamError):
        GeminiStreamParser().feed(b"data: {not json\r\n\r\n")


# -- answers: whole bodies and errors -----------------------------------------------------------


def g_body(parts: list[dict[str, Any]], finish: str = "STOP", **usage: int) -> bytes:
    return json.dumps(
        {
            "candidates": [
                {"content": {"parts": parts, "role": "model"}, "finishReason": finish, "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, **usage},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-1",
        }
    ).encode()


def test_parse_body() -> None:
    call = build({"messages": [user("x")]})
    evs = G.parse_body("chat", call, g_body([{"text": "Hi"}, {"text": "!"}], thoughtsTokenCount=2))
    assert evs == [
        TextDelta("Hi"),
        TextDelta("!"),
        Finish("stop"),
        UsageReport(7, 5, None, 2),
    ]
    with pytest.raises(UpstreamError):
        G.parse_body("chat", call, b'{"candidates": [{"content": {"parts": [{"text": "a"}]}}]}')
    with pytest.raises(UpstreamError):
        G.parse_body("chat", call, b"<html>")


def test_error_mapping() -> None:
    def body(code: int, msg: str, status: str, **extra: Any) -> bytes:
        err = {"code": code, "message": msg, "status": status, **extra}
        return json.dumps({"error": err}).encode()

    e = G.error(400, body(400, "Request contains an invalid argument.", "INVALID_ARGUMENT"))
    assert isinstance(e, InvalidRequest) and e.status == 400 and e.retryable is False
    assert e.message.endswith(": Request contains an invalid argument.")
    e = G.error(404, body(404, "models/x is not found", "NOT_FOUND"))
    assert e.status == 400 and e.provider_status == 404
    long = G.error(400, body(400, "x" * 5000, "INVALID_ARGUMENT"))
    assert len(long.message) < 600
    e = G.error(429, body(429, "Resource exhausted", "RESOURCE_EXHAUSTED"))
    assert e.status == 429 and e.retryable is True and "exhausted" not in e.message
    for status in (500, 503):
        e = G.error(status, body(status, "internal secret detail", "INTERNAL"))
        assert e.status == 502 and e.retryable is True and "secret" not in e.message
    for status in (401, 403):
        e = G.error(status, body(status, "denied", "PERMISSION_DENIED"))
        assert e.status == 502 and e.retryable is False and "denied" not in e.message
    # Gemini answers a bad API key with 400: the operator's problem, not the client's request
    bad_key = body(
        400,
        "API key not valid. Please pass a valid API key.",
        "INVALID_ARGUMENT",
        details=[
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        ],
    )
    e = G.error(400, bad_key)
    assert e.status == 502 and e.retryable is False and "API key" not in e.message
    assert G.error(400, b"not json").status == 400


# -- end to end through the real app ------------------------------------------------------------


def gateway(key: EnclaveKey, up: ScriptedUpstream) -> tuple[Any, ASGIClient]:
    state = make_state(key, transport=up, dev=True, google_api_key="g-key")
    return state, ASGIClient(create_app(state))


def request_hash(body: dict[str, Any]) -> str:
    """keccak256 of the reference's canonical bytes for a plain-string chat body."""
    canon = {
        "model": body["model"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in body["messages"]],
        "temperature": float(body.get("temperature") or 0.0),
    }
    return keccak(json.dumps(canon, sort_keys=True).encode()).hex()


def sse_json(res: ASGIResult) -> list[Any]:
    return [d if d == "[DONE]" else json.loads(d) for d in res.sse_data()]


async def pem(client: ASGIClient) -> str:
    return str((await client.request("GET", "/signing-key")).json()["public_key"])


async def test_e2e_stream_signed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream(TEXT_STREAM)
    state, client = gateway(enclave_key, up)
    body = {"model": "gemini-2.5-flash", "stream": True, "messages": [user("Say hello")]}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 200 and res.complete
    evs = sse_json(res)
    assert evs[-1] == "[DONE]"
    final = evs[-2]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs[:-2])
    assert text == "Hello, wörld ✓"
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["usage"] == {
        "prompt_tokens": 11,
        "completion_tokens": 9,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert final["tee_output_hash"] == keccak(text.encode()).hex()
    assert final["tee_request_hash"] == request_hash(body)
    verify_tee(final, await pem(client), output=text)

    [req] = up.log.requests
    assert str(req.url) == (
        "https://generativelanguage.googleapis.com/v1beta/models/"
        "gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    assert req.headers["x-goog-api-key"] == "g-key" and "key=" not in str(req.url)
    assert json.loads(req.content)["contents"] == [
        {"role": "user", "parts": [{"text": "Say hello"}]}
    ]
    assert up.log.exhausted == 1 and up.log.closed == 1
    log = state.usage_log
    assert log.by_outcome == {"complete": 1}
    assert (log.prompt_tokens, log.completion_tokens) == (11, 9)  # metered once, not summed


async def test_e2e_non_stream_signed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream([g_body([{"text": "Hi there"}])], content_type="application/json")
    state, client = gateway(enclave_key, up)
    body = {"model": "gemini-2.5-flash", "messages": [user("hi")], "temperature": 0.3}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 200
    obj = res.json()
    assert obj["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            "finish_reason": "stop",
        }
    ]
    assert obj["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert obj["tee_request_hash"] == request_hash(body)
    verify_tee(obj, await pem(client), output="Hi there")
    [req] = up.log.requests
    assert req.url.path.endswith("/gemini-2.5-flash:generateContent")
    assert json.loads(req.content)["generationConfig"]["temperature"] == 0.3
    assert state.usage_log.by_outcome == {"complete": 1}


async def test_e2e_stream_tool_call_signed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream(
        [
            g_chunk([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]),
            g_chunk([], "STOP", usage=u(20, 6)),
        ]
    )
    _, client = gateway(enclave_key, up)
    body = {
        "model": "gemini-2.5-flash",
        "stream": True,
        "messages": [user("w?")],
        "tools": [WEATHER],
    }
    res = await client.request("POST", PATH, body=body)
    evs = sse_json(res)
    final = evs[-2]
    [delta] = [e for e in evs[:-2] if e["choices"][0]["delta"].get("tool_calls")]
    [tc] = delta["choices"][0]["delta"]["tool_calls"]
    assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert final["choices"][0]["finish_reason"] == "tool_calls"
    out = json.dumps(
        [{"id": tc["id"], "type": "function", "function": tc["function"]}], sort_keys=True
    )
    verify_tee(final, await pem(client), output=out)


@pytest.mark.parametrize("stream", [False, True])
async def test_e2e_image_output(
    stream: bool, enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream(
        [
            g_body(
                [
                    {"text": "A cat, as asked."},
                    {"inlineData": {"mimeType": "image/png", "data": PNG}},
                ],
                candidatesTokenCount=1300,
            )
        ],
        content_type="application/json",
    )
    state, client = gateway(enclave_key, up)
    body = {"model": "gemini-2.5-flash-image", "stream": stream, "messages": [user("a cat")]}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 200
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    if stream:
        evs = sse_json(res)
        final = evs[-2]
        assert final["images"] == [image]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in evs[:-2])
        signed = final
    else:
        obj = res.json()
        msg = obj["choices"][0]["message"]
        assert msg["images"] == [image]
        text = msg["content"]
        signed = obj
    assert text == "A cat, as asked."
    # only the caption is signed: the image is not in the output hash
    assert signed["tee_output_hash"] == keccak(text.encode()).hex()
    verify_tee(signed, await pem(client), output=text)
    [req] = up.log.requests
    assert req.url.path.endswith("/gemini-2.5-flash-image:generateContent")
    cfg = json.loads(req.content)["generationConfig"]
    assert cfg["responseModalities"] == ["TEXT", "IMAGE"]
    assert state.usage_log.completion_tokens == 1300


async def test_e2e_provider_400_and_unsupported(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    err = {"error": {"code": 400, "message": "Bad schema.", "status": "INVALID_ARGUMENT"}}
    up = ScriptedUpstream([json.dumps(err).encode()], status=400, content_type="application/json")
    state, client = gateway(enclave_key, up)
    res = await client.request(
        "POST", PATH, body={"model": "gemini-2.5-flash", "messages": [user("x")]}
    )
    assert res.status == 400
    e = res.json()["error"]
    assert e["source"] == "provider" and e["provider_status"] == 400
    assert e["message"] == "the provider answered HTTP 400: Bad schema."
    res = await client.request(
        "POST",
        PATH,
        body={"model": "gemini-2.5-flash", "messages": [user("x")], "reasoning_effort": "low"},
    )
    assert res.status == 400 and res.json()["error"]["param"] == "reasoning_effort"
    assert len(up.log.requests) == 1  # the refused request never went upstream
    assert state.usage_log.by_outcome == {"upstream_error": 1}


# -- a loopback Gemini-style server and a real-socket disconnect --------------------------------


@dataclass
class FakeRecord:
    target: str
    headers: dict[str, str]
    body: bytes
    chunks_written: int = 0
    completed: bool = False
    t_peer_closed: float | None = None  # time.monotonic() when we saw the gateway's close


@dataclass
class FakeGemini:
    """Streams ``tokens`` SSE chunks, one every ``delay`` s, over HTTP/1.1 chunked encoding, and
    watches the connection: a FIN (EOF) or RST from the gateway is timestamped at once."""

    tokens: int = 200
    delay: float = 0.02
    records: list[FakeRecord] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        req: h11.Request | None = None
        body = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        assert req is not None
        rec = FakeRecord(
            target=req.target.decode(),
            headers={k.decode(): v.decode() for k, v in req.headers},
            body=body,
        )
        self.records.append(rec)
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "text/event-stream"), ("transfer-encoding", "chunked")],
        )

        async def watch() -> None:
            try:
                data = await stream.receive_some(65536)
                assert data == b"", "the gateway sent bytes after its request"
            except trio.BrokenResourceError:  # RST
                pass
            rec.t_peer_closed = time.monotonic()
            self.closed.set()
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await stream.send_all(conn.send(head) or b"")
            for i in range(self.tokens):
                await trio.sleep(self.delay)
                chunk = g_chunk([{"text": f"w{i} "}], usage=u(5, i + 1))
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                rec.chunks_written += 1
            last = g_chunk([], "STOP", usage=u(5, self.tokens))
            await stream.send_all(conn.send(h11.Data(data=last)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            rec.completed = True
            nursery.cancel_scope.cancel()


CLOSE_WITHIN = 0.100


@pytest.mark.socket
async def test_real_socket_client_rst_closes_gemini_upstream(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    fake = FakeGemini()
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    state = make_state(
        enclave_key, dev=True, google_api_key="g-key", google_base_url=f"http://127.0.0.1:{port}"
    )
    url = urlsplit(await start_gateway(nursery, state))
    assert url.hostname is not None and url.port is not None
    addr = (url.hostname, url.port)
    payload = json.dumps(
        {"model": "gemini-2.5-flash", "stream": True, "messages": [user("count")]}
    ).encode()
    req = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {addr[0]}:{addr[1]}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    client = RawClient()
    try:
        await client.connect(addr)
        await client.send_all(req)
        await client.read_until(lambda b: head_complete(b) and content_chunks(b) >= 5, 5.0)
        assert status_of(bytes(client.buf)) == 200
        t_action = client.act("rst")
        with trio.fail_after(3):
            await fake.closed.wait()
    finally:
        client.close()
    [rec] = fake.records
    assert rec.target == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert rec.headers["x-goog-api-key"] == "g-key" and "key=" not in rec.target
    assert rec.completed is False and rec.chunks_written < fake.tokens
    assert rec.t_peer_closed is not None
    latency = rec.t_peer_closed - t_action
    assert 0 <= latency <= CLOSE_WITHIN, f"upstream closed {latency * 1e3:.1f} ms after the RST"
    await assert_metered_once(state, {"client_gone": 1})
    print(f"\n[close-latency] gemini rst: {latency * 1e3:.2f} ms")
    gc.collect()
