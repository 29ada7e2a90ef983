"""The Anthropic adapter: request translation, Messages SSE and body parsing, error mapping, and
end to end through the real app (in-process with a scripted wire, and over real sockets against
the bench mock provider's ``/v1/messages``).

Stream transcripts follow the event sequences in Anthropic's streaming documentation
(``message_start`` … ``message_stop``, ``ping``, ``input_json_delta`` fragments, ``error``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from tests.asgi import ASGIClient, ScriptedUpstream, keccak, verify_tee
from tests.conftest import MockUpstream, make_state, start_gateway
from tests.test_disconnect_sockets import (
    CLOSE_WITHIN,
    RawClient,
    assert_cut_early,
    assert_metered_once,
    content_chunks,
    head_complete,
    report,
    status_of,
    upstream_closed,
)
from trio_gateway.api.errors import InvalidRequest, UpstreamError
from trio_gateway.app import create_app
from trio_gateway.providers.anthropic import AnthropicProvider
from trio_gateway.providers.base import Kind, ModelInfo, UpstreamCall
from trio_gateway.relay.events import (
    Finish,
    ProviderEvent,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from trio_gateway.signing.canonical import chat_request_bytes
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

P = AnthropicProvider("https://api.anthropic.com/")
SONNET = ModelInfo(
    name="claude-sonnet-4-5",
    provider="anthropic",
    upstream="claude-sonnet-4-5",
    input_usd="0.000003",
    output_usd="0.000015",
    context=200000,
    max_output=64000,
)
SMALL = ModelInfo(
    name="small", provider="anthropic", upstream="claude-small", input_usd="0", output_usd="0",
    max_output=4096,
)  # fmt: skip
HI = [{"role": "user", "content": "hi"}]
PNG_B64 = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
    "AAAABJRU5ErkJggg=="
)


def build(raw: dict[str, Any], kind: Kind = "chat", model: ModelInfo = SONNET) -> UpstreamCall:
    return P.build(kind, {"model": "claude-sonnet-4-5", **raw}, model, "sk-ant")


def sent(raw: dict[str, Any], **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(build(raw, **kw).body)
    return body


# -- request building ---------------------------------------------------------------------------


def test_build_defaults_url_headers_body() -> None:
    call = build({"messages": HI})
    assert call.method == "POST"
    assert call.url == "https://api.anthropic.com/v1/messages"
    assert dict(call.headers) == {
        "content-type": "application/json",
        "accept": "application/json",
        "accept-encoding": "identity",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant",
    }
    assert call.stream is False and dict(call.context) == {}
    assert json.loads(call.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8192,  # min(max_output 64000, 8192)
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.0,  # what the request hash vouches for when omitted
    }


def test_build_max_tokens_choice() -> None:
    assert sent({"messages": HI}, model=SMALL)["max_tokens"] == 4096
    assert sent({"messages": HI, "max_tokens": 300})["max_tokens"] == 300
    assert sent({"messages": HI, "max_completion_tokens": 200})["max_tokens"] == 200
    both = {"messages": HI, "max_tokens": 100, "max_completion_tokens": 50}
    assert sent(both)["max_tokens"] == 50  # the tighter of the two is honoured


def test_build_stream_sampling_stop_user() -> None:
    raw = {
        "messages": HI,
        "stream": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-1",
        "n": 1,
    }
    call = build(raw)
    assert call.stream is True and dict(call.headers)["accept"] == "text/event-stream"
    assert json.loads(call.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8192,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }
    assert sent({"messages": HI, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


def test_build_without_key_sends_no_key_header() -> None:
    call = P.build("chat", {"model": "m", "messages": HI}, SONNET, None)
    assert "x-api-key" not in dict(call.headers)


def test_build_system_and_developer_messages_become_top_level_system_in_order() -> None:
    single = sent({"messages": [{"role": "system", "content": "Be terse."}, *HI]})
    assert single["system"] == "Be terse."
    assert single["messages"] == [{"role": "user", "content": "hi"}]

    body = sent(
        {
            "messages": [
                {"role": "system", "content": "A"},
                {"role": "developer", "content": [{"type": "text", "text": "B"}]},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "system", "content": "C"},
                {"role": "user", "content": "q2"},
            ]
        }
    )
    assert body["system"] == [
        {"type": "text", "text": "A"},
        {"type": "text", "text": "B"},
        {"type": "text", "text": "C"},
    ]
    assert body["messages"] == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]


def test_build_images() -> None:
    content = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {
            "type": "image_url",
            "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
        },
    ]
    body = sent({"messages": [{"role": "user", "content": content}]})
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        }
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/cat.jpg",
        "ftp://example.com/cat.jpg",
        "data:image/bmp;base64,AAAA",
        "data:image/png,rawbytes",
    ],
)
def test_build_rejects_images_anthropic_cannot_take(url: str) -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(InvalidRequest) as exc:
        build({"messages": [msg]})
    assert exc.value.status == 400 and exc.value.param == "messages[0].content[0].image_url.url"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


def test_build_tools_and_tool_choice() -> None:
    body = sent({"messages": HI, "tools": [WEATHER_TOOL, TIME_TOOL]})
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in body  # Anthropic's default is auto

    def choice(tc: Any, **extra: Any) -> Any:
        return sent({"messages": HI, "tools": [WEATHER_TOOL], "tool_choice": tc, **extra}).get(
            "tool_choice"
        )

    assert choice("auto") == {"type": "auto"}
    assert choice("required") == {"type": "any"}
    assert choice("none") == {"type": "none"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert choice(named) == {"type": "tool", "name": "get_weather"}
    assert choice(None, parallel_tool_calls=False) == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert choice("required", parallel_tool_calls=False) == {
        "type": "any",
        "disable_parallel_tool_use": True,
    }
    assert choice("auto", parallel_tool_calls=True) == {"type": "auto"}
    with pytest.raises(InvalidRequest):
        sent({"messages": HI, "tool_choice": "required"})  # forcing a tool that is not there


def test_build_tool_round_trip_merges_tool_results_into_one_user_turn() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, cloudy"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "9:00"}]},
        {"role": "user", "content": "Thanks. Summarise."},
    ]
    body = sent({"messages": messages, "tools": [WEATHER_TOOL, TIME_TOOL]})
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, cloudy"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "9:00"}],
                },
                {"type": "text", "text": "Thanks. Summarise."},
            ],
        },
    ]


@pytest.mark.parametrize("args", ["{not json", "[1, 2]", '"text"'])
def test_build_tool_call_arguments_must_be_a_json_object(args: str) -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": args}}
    messages = [*HI, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(InvalidRequest) as exc:
        build({"messages": messages})
    assert exc.value.param == "messages[1].tool_calls[0].function.arguments"


def test_build_legacy_function_role_is_refused() -> None:
    with pytest.raises(InvalidRequest) as exc:
        build({"messages": [*HI, {"role": "function", "name": "f", "content": "x"}]})
    assert exc.value.param == "messages[1].role"


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp_c": {"type": "number"}},
    "required": ["city", "temp_c"],
}
JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "weather_report", "schema": SCHEMA, "strict": True},
}


def test_build_json_schema_becomes_a_forced_tool() -> None:
    call = build({"messages": HI, "response_format": JSON_SCHEMA_FORMAT})
    body = json.loads(call.body)
    assert body["tools"] == [
        {
            "name": "weather_report",
            "description": "Give the final answer as this tool's input, matching its schema.",
            "input_schema": SCHEMA,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "weather_report"}
    assert dict(call.context) == {"json_tool": "weather_report"}


def test_build_json_schema_conflicts_and_text_format() -> None:
    with pytest.raises(InvalidRequest):
        build({"messages": HI, "response_format": JSON_SCHEMA_FORMAT, "tools": [WEATHER_TOOL]})
    array = {"type": "json_schema", "json_schema": {"name": "xs", "schema": {"type": "array"}}}
    with pytest.raises(InvalidRequest):
        build({"messages": HI, "response_format": array})
    plain = build({"messages": HI, "response_format": {"type": "text"}})
    assert plain.body == build({"messages": HI}).body and dict(plain.context) == {}


def test_build_completion_prompt_is_one_user_message_with_legacy_defaults() -> None:
    call = build({"prompt": "Once upon", "stream": True}, kind="completion")
    assert json.loads(call.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 16,  # hashed as 16 (OpenAI's legacy default), so used as 16
        "messages": [{"role": "user", "content": "Once upon"}],
        "temperature": 1.0,
        "stream": True,
    }


@pytest.mark.parametrize(
    ("extra", "bad"),
    [
        ({"seed": 1}, ["seed"]),
        ({"frequency_penalty": 0.5}, ["frequency_penalty"]),
        ({"presence_penalty": -1}, ["presence_penalty"]),
        ({"reasoning_effort": "low"}, ["reasoning_effort"]),
        ({"response_format": {"type": "json_object"}}, ["response_format"]),
        ({"temperature": 1.5}, ["temperature"]),
        ({"n": 2}, ["n"]),
        ({"logit_bias": {"50256": -100}}, ["logit_bias"]),
        ({"seed": 3, "temperature": 2}, ["temperature", "seed"]),
        # defaults and what Anthropic can honour
        ({"temperature": 1.0, "n": 1, "frequency_penalty": 0, "presence_penalty": 0}, []),
        ({"response_format": JSON_SCHEMA_FORMAT, "stop": "x", "top_p": 0.5}, []),
    ],
)
def test_unsupported(extra: dict[str, Any], bad: list[str]) -> None:
    assert P.unsupported("chat", {"model": "m", "messages": HI, **extra}) == bad
    if bad:  # build refuses too (a caller that skipped the check)
        with pytest.raises(InvalidRequest):
            build({"messages": HI, **extra})


# -- stream parsing -----------------------------------------------------------------------------

TEXT_STREAM = b"""event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", w\xc3\xb6rld!"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}

"""  # noqa: E501

TOOL_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5","stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":100,"cache_read_input_tokens":2048,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let me check."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \\"San Francisco\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""  # noqa: E501


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def message_start(input_tokens: int = 10, **usage: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_x", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
        },
    }  # fmt: skip


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def json_delta(index: int, partial: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial},
    }


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def message_delta(stop_reason: str, output_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


MESSAGE_STOP = {"type": "message_stop"}


def parse_stream(
    data: bytes, *, split: int | None = None, json_tool: str | None = None
) -> list[ProviderEvent]:
    """Feed ``data`` in pieces of ``split`` bytes (all at once if None), then close."""
    call = UpstreamCall("POST", "u", (), b"", True, {"json_tool": json_tool} if json_tool else {})
    parser = P.stream_parser("chat", call)
    out: list[ProviderEvent] = []
    step = split or len(data) or 1
    for i in range(0, len(data), step):
        out.extend(parser.feed(data[i : i + step]))
    out.extend(parser.close())
    return out


def text_of(evs: list[ProviderEvent]) -> str:
    return "".join(e.text for e in evs if isinstance(e, TextDelta))


@pytest.mark.parametrize("split", [None, 1, 7, 64])
def test_stream_text(split: int | None) -> None:
    evs = parse_stream(TEXT_STREAM, split=split)
    assert text_of(evs) == "Hello, wörld!"
    assert [e for e in evs if not isinstance(e, TextDelta)] == [
        UsageReport(prompt_tokens=25, completion_tokens=15, cached_tokens=0),
        Finish("stop"),
    ]


def test_stream_tool_use_with_partial_json() -> None:
    evs = parse_stream(TOOL_STREAM, split=13)
    assert evs == [
        TextDelta("Okay, let me check."),
        ToolCallDelta(0, id="toolu_01T1x1fJ34qAmk2tNTrN7Up6", name="get_weather"),
        ToolCallDelta(0, arguments='{"city":'),
        ToolCallDelta(0, arguments=' "San Francisco"}'),
        ToolCallDelta(1, id="toolu_02", name="get_time"),
        ToolCallDelta(1, arguments="{}"),  # a tool called without input still gets an object
        # usage: input + cache reads + cache writes; cached = cache reads
        UsageReport(prompt_tokens=472 + 2048 + 100, completion_tokens=89, cached_tokens=2048),
        Finish("tool_calls"),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stream_stop_reasons(stop_reason: str, finish: str) -> None:
    data = sse(message_start(), message_delta(stop_reason, 3), MESSAGE_STOP)
    assert parse_stream(data)[-1] == Finish(finish)


def test_stream_structured_output_is_delivered_as_json_text() -> None:
    data = sse(
        message_start(30),
        block_start(
            0, {"type": "tool_use", "id": "toolu_s", "name": "weather_report", "input": {}}
        ),
        json_delta(0, ""),
        json_delta(0, '{"city": "Z'),
        json_delta(0, '\\u00fcrich",'),
        json_delta(0, '"temp_c":21.5}'),
        block_stop(0),
        message_delta("tool_use", 20),
        MESSAGE_STOP,
    )
    evs = parse_stream(data, split=5, json_tool="weather_report")
    text = json.dumps({"city": "Zürich", "temp_c": 21.5})  # what the reference signs
    assert evs == [
        TextDelta(text),
        UsageReport(prompt_tokens=30, completion_tokens=20),
        Finish("stop"),
    ]


def test_stream_structured_output_cut_by_max_tokens_is_delivered_raw_with_length() -> None:
    def transcript(stop_reason: str) -> bytes:
        return sse(
            message_start(),
            block_start(0, {"type": "tool_use", "id": "t", "name": "out", "input": {}}),
            json_delta(0, '{"city": "Par'),
            block_stop(0),
            message_delta(stop_reason, 8),
            MESSAGE_STOP,
        )

    evs = parse_stream(transcript("max_tokens"), json_tool="out")
    assert text_of(evs) == '{"city": "Par' and evs[-1] == Finish("length")
    with pytest.raises(UpstreamError):  # not cut, yet not JSON: the provider broke it
        parse_stream(transcript("tool_use"), json_tool="out")


def test_stream_error_event() -> None:
    data = TEXT_STREAM.split(b"event: content_block_stop")[0] + (
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
        b'"message": "Overloaded"}}\n\n'
    )
    call = UpstreamCall("POST", "u", (), b"", True)
    parser = P.stream_parser("chat", call)
    with pytest.raises(UpstreamError) as exc:
        parser.feed(data)
    assert exc.value.status == 502 and exc.value.retryable is True
    assert "Overloaded" not in exc.value.message  # the provider's words are never echoed


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(b"event: message_stop", id="before-message_stop"),
        pytest.param(b"event: message_delta", id="before-message_delta"),
        pytest.param(b"event: content_block_delta", id="mid-content"),
    ],
)
def test_stream_truncated_raises_on_close(cut: bytes) -> None:
    head = TEXT_STREAM[: TEXT_STREAM.index(cut)]
    parser = P.stream_parser("chat", UpstreamCall("POST", "u", (), b"", True))
    parser.feed(head)
    with pytest.raises(UpstreamError):
        parser.close()


@pytest.mark.parametrize(
    "bad",
    [
        b"event: message_start\ndata: {not json\n\n",
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":5,'
        b'"delta":{"type":"text_delta","text":"x"}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',  # stop without a start
    ],
)
def test_stream_malformed(bad: bytes) -> None:
    parser = P.stream_parser("chat", UpstreamCall("POST", "u", (), b"", True))
    with pytest.raises(UpstreamError):
        parser.feed(bad)


def test_stream_ignores_thinking_and_unknown_events() -> None:
    data = sse(
        message_start(),
        block_start(0, {"type": "thinking", "thinking": ""}),
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hmm"},
        },
        block_stop(0),
        {"type": "some_future_event", "x": 1},
        block_start(1, {"type": "text", "text": ""}),
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "ok"}},
        block_stop(1),
        message_delta("end_turn", 4),
        MESSAGE_STOP,
    )
    evs = parse_stream(data)
    assert text_of(evs) == "ok" and evs[-1] == Finish("stop")


# -- non-stream bodies and errors ---------------------------------------------------------------


def message_body(content: list[dict[str, Any]], stop_reason: str, **usage: int) -> bytes:
    return json.dumps(
        {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": 6, **usage},
        }
    ).encode()


def parse_body(body: bytes, json_tool: str | None = None) -> list[ProviderEvent]:
    ctx = {"json_tool": json_tool} if json_tool else {}
    return P.parse_body("chat", UpstreamCall("POST", "u", (), b"", False, ctx), body)


def test_body_text_and_tool_use() -> None:
    body = message_body(
        [
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "toolu_a",
                "name": "get_weather",
                "input": {"city": "Zürich"},
            },
            {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
        ],
        "tool_use",
        cache_read_input_tokens=7,
    )
    assert parse_body(body) == [
        TextDelta("Let me look."),
        ToolCallDelta(0, id="toolu_a", name="get_weather", arguments='{"city": "Z\\u00fcrich"}'),
        ToolCallDelta(1, id="toolu_b", name="get_time", arguments="{}"),
        UsageReport(prompt_tokens=19, completion_tokens=6, cached_tokens=7),
        Finish("tool_calls"),
    ]


def test_body_structured_output() -> None:
    body = message_body(
        [
            {
                "type": "tool_use",
                "id": "t",
                "name": "weather_report",
                "input": {"city": "Oslo", "temp_c": -3},
            }
        ],
        "tool_use",
    )
    assert parse_body(body, json_tool="weather_report") == [
        TextDelta('{"city": "Oslo", "temp_c": -3}'),
        UsageReport(prompt_tokens=12, completion_tokens=6),
        Finish("stop"),
    ]


@pytest.mark.parametrize("body", [b"{nope", b"[]", b'{"type":"message"}'])
def test_body_malformed(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        parse_body(body)


ERR_BODY = b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}'  # noqa: E501


def test_error_mapping() -> None:
    e = P.error(400, ERR_BODY)
    assert isinstance(e, InvalidRequest) and e.status == 400 and e.retryable is False
    assert e.message == (
        "the provider answered HTTP 400: prompt is too long: 210000 tokens > 200000 maximum"
    )
    assert P.error(400, b"<html>").message == "the provider answered HTTP 400"
    rate = P.error(429, b'{"type":"error","error":{"type":"rate_limit_error","message":"x"}}')
    assert (rate.status, rate.type, rate.retryable) == (429, "rate_limit_error", True)
    over = P.error(529, b'{"type":"error","error":{"type":"overloaded_error","message":"x"}}')
    assert (over.status, over.provider_status, over.retryable) == (502, 529, True)
    assert (P.error(500, b"").status, P.error(500, b"").retryable) == (502, True)
    for status in (401, 403):
        e = P.error(status, b'{"type":"error","error":{"message":"invalid x-api-key"}}')
        assert (e.status, e.retryable) == (502, False) and "x-api-key" not in e.message


# -- end to end through the app -----------------------------------------------------------------

PATH = "/v1/chat/completions"


class App:
    def __init__(self, key: EnclaveKey, up: ScriptedUpstream) -> None:
        self.up = up
        self.state: AppState = make_state(key, transport=up, dev=True, anthropic_api_key="sk-ant")
        self.client = ASGIClient(create_app(self.state))

    async def post(self, body: dict[str, Any]) -> Any:
        with trio.fail_after(60):
            return await self.client.request("POST", PATH, body=body)

    async def pem(self) -> str:
        return str((await self.client.request("GET", "/signing-key")).json()["public_key"])

    def upstream_request(self) -> tuple[str, dict[str, str], dict[str, Any]]:
        [req] = self.up.log.requests
        return str(req.url), dict(req.headers), json.loads(req.content)


def chat(stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "stream": stream, "messages": HI, **extra}


def sse_payloads(body: bytes) -> list[Any]:
    out = []
    for block in body.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                d = line[6:]
                out.append(d if d == "[DONE]" else json.loads(d))
    return out


async def test_e2e_nonstream_text(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = message_body(
        [{"type": "text", "text": "Bonjour ✓"}], "end_turn", cache_read_input_tokens=4
    )
    app = App(enclave_key, ScriptedUpstream([upstream], content_type="application/json"))
    body = chat(False)
    res = await app.post(body)
    assert res.status == 200 and res.complete
    obj = res.json()
    assert obj["object"] == "chat.completion" and obj["model"] == "claude-sonnet-4-5"
    assert obj["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Bonjour ✓"},
            "finish_reason": "stop",
        }
    ]
    assert obj["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 6,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert obj["tee_request_hash"] == keccak(chat_request_bytes(body)).hex()
    assert obj["tee_output_hash"] == keccak("Bonjour ✓".encode()).hex()
    verify_tee(obj, await app.pem(), output="Bonjour ✓")
    url, headers, sent_body = app.upstream_request()
    assert url == "https://api.anthropic.com/v1/messages"
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert sent_body["model"] == "claude-sonnet-4-5" and "stream" not in sent_body
    assert app.state.usage_log is not None
    assert app.state.usage_log.by_outcome == {"complete": 1}


async def test_e2e_stream_text(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    # the transcript arrives in arbitrary pieces, as TCP would cut it
    pieces = [TEXT_STREAM[i : i + 97] for i in range(0, len(TEXT_STREAM), 97)]
    app = App(enclave_key, ScriptedUpstream(pieces))
    res = await app.post(chat(True))
    assert res.status == 200 and res.header("content-type") == "text/event-stream; charset=utf-8"
    evs = sse_payloads(res.body)
    assert evs[-1] == "[DONE]"
    chunks, final = evs[:-2], evs[-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == "Hello, wörld!"
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["usage"] == {
        "prompt_tokens": 25,
        "completion_tokens": 15,
        "total_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    verify_tee(final, await app.pem(), output=text)
    _, headers, sent_body = app.upstream_request()
    assert sent_body["stream"] is True and headers["accept"] == "text/event-stream"
    assert app.state.usage_log is not None
    assert app.state.usage_log.by_outcome == {"complete": 1}
    assert (app.state.usage_log.prompt_tokens, app.state.usage_log.completion_tokens) == (25, 15)


async def test_e2e_stream_tool_calls_signed_as_sorted_json(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    app = App(enclave_key, ScriptedUpstream([TOOL_STREAM]))
    res = await app.post(chat(True, tools=[WEATHER_TOOL, TIME_TOOL]))
    evs = sse_payloads(res.body)
    final = evs[-2]
    assert final["choices"][0]["finish_reason"] == "tool_calls"
    first_call = next(
        e["choices"][0]["delta"]["tool_calls"][0]
        for e in evs[:-2]
        if "tool_calls" in e["choices"][0]["delta"]
    )
    assert first_call == {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    calls = [
        {
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "San Francisco"}'},
        },
        {"id": "toolu_02", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    output = json.dumps(calls, sort_keys=True)
    verify_tee(final, await app.pem(), output=output)
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 2048}


async def test_e2e_nonstream_structured_output(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    upstream = message_body(
        [
            {
                "type": "tool_use",
                "id": "t",
                "name": "weather_report",
                "input": {"city": "Zürich", "temp_c": 21.5},
            }
        ],
        "tool_use",
    )
    app = App(enclave_key, ScriptedUpstream([upstream], content_type="application/json"))
    res = await app.post(chat(False, response_format=JSON_SCHEMA_FORMAT))
    obj = res.json()
    text = json.dumps({"city": "Zürich", "temp_c": 21.5})
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert obj["choices"][0]["finish_reason"] == "stop"
    verify_tee(obj, await app.pem(), output=text)
    _, _, sent_body = app.upstream_request()
    assert sent_body["tool_choice"] == {"type": "tool", "name": "weather_report"}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
        ({"seed": 7}, "seed"),
    ],
)
async def test_e2e_unsupported_is_400_before_any_upstream_call(
    enclave_key: EnclaveKey, extra: dict[str, Any], param: str
) -> None:
    app = App(enclave_key, ScriptedUpstream([]))
    res = await app.post(chat(False, **extra))
    assert res.status == 400
    err = res.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert app.up.log.requests == []


@pytest.mark.parametrize("stream", [True, False])
async def test_e2e_upstream_errors(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, stream: bool
) -> None:
    up = ScriptedUpstream([ERR_BODY], status=400, content_type="application/json")
    res = await App(enclave_key, up).post(chat(stream))
    assert res.status == 400
    assert res.json()["error"]["message"].endswith(
        "prompt is too long: 210000 tokens > 200000 maximum"
    )
    over = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    up = ScriptedUpstream([over], status=529, content_type="application/json")
    res = await App(enclave_key, up).post(chat(stream))
    assert res.status == 502 and b"Overloaded" not in res.body
    assert res.json()["error"]["retryable"] is True


async def test_e2e_stream_error_event_mid_stream_is_not_signed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    head = TEXT_STREAM.split(b"event: content_block_stop")[0]
    err = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'  # noqa: E501
    app = App(enclave_key, ScriptedUpstream([head, err]))
    res = await app.post(chat(True))
    evs = sse_payloads(res.body)
    assert "[DONE]" not in evs and set(evs[-1]) == {"error"}
    assert b"tee_" not in res.body
    assert "".join(e["choices"][0]["delta"]["content"] for e in evs[:-1]) == "Hello, wörld!"
    assert app.state.usage_log is not None
    assert app.state.usage_log.by_outcome == {"upstream_error": 1}


# -- real sockets: a client that leaves mid-stream ----------------------------------------------


@pytest.mark.socket
async def test_socket_client_rst_mid_stream_closes_the_anthropic_upstream(
    nursery: trio.Nursery,
    enclave_key: EnclaveKey,
    mock_upstream: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    state = make_state(
        enclave_key, anthropic_base_url=mock_upstream.url, anthropic_api_key="sk-ant", dev=True
    )
    url = urlsplit(await start_gateway(nursery, state))
    assert url.hostname is not None and url.port is not None
    addr = (url.hostname, url.port)
    bench_id = f"anth-{uuid.uuid4().hex[:12]}"
    text = f"bench-id={bench_id} bench-tokens=300 bench-delay_ms=20"
    body = json.dumps(
        {
            "model": "claude-sonnet-4-5",
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {addr[0]}:{addr[1]}\r\n"
        f"content-type: application/json\r\naccept: text/event-stream\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    client = RawClient()
    try:
        await client.connect(addr)
        await client.send_all(head + body)
        await client.read_until(lambda b: head_complete(b) and content_chunks(b) >= 5, 5.0)
        assert status_of(bytes(client.buf)) == 200
        assert b'"content":"tok0 "' in client.buf  # the mock's Anthropic text, OpenAI-shaped
        t_action = client.act("rst")
        rec = await upstream_closed(mock_upstream, bench_id)
        assert rec["path"] == "/v1/messages", rec
        latency = assert_cut_early(rec, t_action, within=CLOSE_WITHIN)
        await assert_metered_once(state, {"client_gone": 1})
    finally:
        client.close()
    report(request, latency)


def test_stream_message_delta_usage_is_cumulative_not_summed() -> None:
    """``message_delta`` usage is cumulative and may restate input and cache counts (server
    tools can send several): the latest values replace the earlier ones."""
    later = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 40, "cache_read_input_tokens": 8, "output_tokens": 30},
    }
    data = sse(
        message_start(10, cache_read_input_tokens=0),
        message_delta("end_turn", 12),
        later,
        MESSAGE_STOP,
    )
    reports = [e for e in parse_stream(data) if isinstance(e, UsageReport)]
    assert reports[-1] == UsageReport(prompt_tokens=48, completion_tokens=30, cached_tokens=8)
    assert reports[0] == UsageReport(prompt_tokens=10, completion_tokens=12, cached_tokens=0)
