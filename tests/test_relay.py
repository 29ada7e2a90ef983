"""Deterministic relay tests: the real app in-process, a scripted provider wire, virtual time.

Every test drives ``create_app(state)`` through ``tests/asgi.py``'s ASGI driver with model
``gpt-4.1`` (the OpenAI adapter) on a ``ScriptedUpstream`` transport whose body we control chunk
by chunk (yield, sleep, hang, raise) and which records whether httpx closed it. Deadlines run on
``autojump_clock`` (MockClock, autojump 0): a 120 s silence costs nothing, and elapsed virtual
time is asserted where a deadline is the point. Signatures are verified independently of the
gateway's signing code (``verify_tee``: cryptography RSA-PSS + pycryptodome keccak).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.asgi import (
    HANG,
    ASGIClient,
    ASGIResult,
    Disconnect,
    ScriptedUpstream,
    keccak,
    oai_chunk,
    oai_text_stream,
    verify_tee,
)
from tests.conftest import make_settings, make_state
from trio_gateway.app import create_app
from trio_gateway.relay.metering import Outcome, RequestRecord
from trio_gateway.signing.keys import EnclaveKey, Signature
from trio_gateway.state import AppState

PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 9, "completion_tokens": 3}


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1", "stream": stream, "messages": MESSAGES, **extra}


class RecordingMeter:
    """The metering hook as a test double: every record it was handed, and an event per call."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.called = trio.Event()

    async def finish(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.called.set()

    @property
    def only(self) -> RequestRecord:
        assert len(self.records) == 1, f"metering hook ran {len(self.records)} times"
        return self.records[0]


class Gateway:
    """The app under test, its wire and its meter."""

    def __init__(
        self,
        key: EnclaveKey,
        upstream: ScriptedUpstream,
        deadlines: dict[str, float] | None = None,
    ) -> None:
        self.upstream = upstream
        self.meter = RecordingMeter()
        self.state = AppState.build(
            make_settings(openai_api_key="sk-x", deadlines=deadlines or {}),
            key=key,
            meter=self.meter,
            transport=upstream,
        )
        self.app = create_app(self.state)
        self.client = ASGIClient(self.app)

    async def post(self, body: dict[str, Any], **kw: Any) -> ASGIResult:
        with trio.fail_after(GUARD):
            res = await self.client.request("POST", PATH, body=body, **kw)
        collect_garbage()
        return res

    async def public_key(self) -> str:
        r = await self.client.request("GET", "/signing-key")
        assert r.status == 200
        return str(r.json()["public_key"])

    @property
    def upstream_closed(self) -> bool:
        log = self.upstream.log
        return log.opened == 1 and log.closed == 1


def collect_garbage() -> None:
    """An async generator abandoned mid-iteration (httpx's body iterators, when a read is cut)
    is warned about by trio only if it is collected while trio runs (an error under
    ``-W error``); in a reference cycle it could outlive the run and go unnoticed. So every
    request here ends with a collection, inside the test's trio run."""
    gc.collect(1)


GUARD = 3600  # virtual seconds: a request the gateway never ends fails the test, never hangs it


@contextlib.asynccontextmanager
async def guarded_nursery() -> AsyncIterator[trio.Nursery]:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            yield nursery
    collect_garbage()


def events(res: ASGIResult) -> list[Any]:
    """The SSE data payloads, JSON-decoded ("[DONE]" kept as the string)."""
    return [d if d == "[DONE]" else json.loads(d) for d in res.sse_data()]


def streamed_text(evs: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in evs
        if isinstance(e, dict) and e.get("choices")
    )


def assert_nothing_signed(res: ASGIResult) -> None:
    assert b"tee_" not in res.body, "a failed answer carries tee_* fields"
    assert b"[DONE]" not in res.body


def canonical_request_hash(body: dict[str, Any]) -> bytes:
    """keccak256 of the reference's canonical request bytes, built here from scratch for the
    simple chat body these tests send (model, messages, temperature defaulting to 0.0)."""
    canon = {
        "model": body["model"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in body["messages"]],
        "temperature": float(body.get("temperature") or 0.0),
    }
    if body.get("max_tokens") is not None:
        canon["max_tokens"] = body["max_tokens"]
    return keccak(json.dumps(canon, sort_keys=True).encode())


# -- happy paths --------------------------------------------------------------------------------


async def test_stream_happy_path_openai_chunks_and_verifiable_signature(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    words = ["Hel", "lo, ", "wörld", " ✓"]
    up = ScriptedUpstream(oai_text_stream(words, usage=USAGE))
    state = make_state(enclave_key, transport=up, dev=True, openai_api_key="sk-x")
    client = ASGIClient(create_app(state))
    body = chat()
    res = await client.request("POST", PATH, body=body)

    assert res.status == 200 and res.complete
    assert res.header("content-type") == "text/event-stream; charset=utf-8"
    rid = res.header("x-request-id")
    assert rid is not None and rid.startswith("chatcmpl-")
    evs = events(res)
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    chunks, final = evs[:-2], evs[-2]
    assert len(chunks) == len(words)
    for i, c in enumerate(chunks):
        assert c["id"] == rid
        assert c["object"] == "chat.completion.chunk"
        assert isinstance(c["created"], int)
        assert c["model"] == "gpt-4.1"  # the name the client asked for, not the upstream id
        assert c["choices"] == [
            {
                "index": 0,
                "delta": ({"role": "assistant"} if i == 0 else {}) | {"content": words[i]},
                "finish_reason": None,
            }
        ]
        assert not any(k.startswith("tee_") for k in c)
    assert final["id"] == rid and final["object"] == "chat.completion.chunk"
    assert final["model"] == "gpt-4.1" and final["created"] == chunks[0]["created"]
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert set(final) >= {
        "tee_signature",
        "tee_request_hash",
        "tee_output_hash",
        "tee_timestamp",
        "tee_id",
    }

    text = streamed_text(evs)
    assert text == "".join(words)
    assert final["tee_output_hash"] == keccak(text.encode()).hex()
    assert final["tee_request_hash"] == canonical_request_hash(body).hex()
    pem = (await client.request("GET", "/signing-key")).json()["public_key"]
    verify_tee(final, pem, output=text)
    # a signature over anything else must not verify (the check can fail)
    with pytest.raises(Exception):  # noqa: B017
        verify_tee({**final, "tee_timestamp": final["tee_timestamp"] + 1}, pem)
    with pytest.raises(AssertionError):
        verify_tee(final, pem, output=text + " ")

    # what went upstream: the upstream model id, usage forced on, the key, streamed
    [req] = up.log.requests
    sent = json.loads(req.content)
    assert sent["model"] == "gpt-4.1-2025-04-14"
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert req.headers["authorization"] == "Bearer sk-x"
    assert up.log.exhausted == 1 and up.log.closed == 1
    assert state.usage_log is not None
    assert state.usage_log.by_outcome == {"complete": 1} and state.usage_log.duplicates == 0
    assert (state.usage_log.prompt_tokens, state.usage_log.completion_tokens) == (9, 3)


async def test_nonstream_happy_path_signed_body(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    upstream_body = {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {**USAGE, "total_tokens": 12},
    }
    up = ScriptedUpstream([json.dumps(upstream_body).encode()], content_type="application/json")
    gw = Gateway(enclave_key, up)
    body = chat(stream=False)
    res = await gw.post(body)
    assert res.status == 200 and res.complete
    assert res.header("content-type") == "application/json"
    obj = res.json()
    assert obj["object"] == "chat.completion" and obj["model"] == "gpt-4.1"
    assert obj["id"] == res.header("x-request-id")
    assert obj["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}
    ]
    assert obj["usage"]["total_tokens"] == 12
    assert obj["tee_request_hash"] == canonical_request_hash(body).hex()
    verify_tee(obj, await gw.public_key(), output="Hi!")
    assert gw.meter.only.outcome == Outcome.COMPLETE and gw.meter.only.signed
    assert gw.upstream_closed


async def test_tool_call_stream_signs_sorted_json_of_buffered_calls(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    def tc(index: int, **kw: Any) -> bytes:
        fn = {k: v for k, v in kw.items() if k in ("name", "arguments")}
        call: dict[str, Any] = {"index": index, "function": fn}
        if "id" in kw:
            call |= {"id": kw["id"], "type": "function"}
        return oai_chunk({"tool_calls": [call]})

    script = [
        oai_chunk({"role": "assistant", "content": None}),
        tc(0, id="call_a", name="get_weather", arguments=""),
        tc(0, arguments='{"city":'),
        tc(1, id="call_b", name="get_time", arguments='{"tz":"UTC"}'),
        tc(0, arguments=' "Paris"}'),
        oai_chunk({}, "tool_calls"),
        oai_chunk(usage=USAGE, choices=False),
        b"data: [DONE]\n\n",
    ]
    gw = Gateway(enclave_key, ScriptedUpstream(script))
    res = await gw.post(chat())
    assert res.status == 200
    evs = events(res)
    assert evs[-1] == "[DONE]"
    final = evs[-2]
    assert final["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [e["choices"][0]["delta"] for e in evs[:-2]]
    assert all("tool_calls" in d for d in deltas) and len(deltas) == 4
    assert deltas[0]["role"] == "assistant" and deltas[0]["content"] is None
    assert deltas[0]["tool_calls"][0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'},
        },
    ]
    output = json.dumps(calls, sort_keys=True)
    assert final["tee_output_hash"] == keccak(output.encode()).hex()
    verify_tee(final, await gw.public_key(), output=output)
    assert gw.meter.only.outcome == Outcome.COMPLETE
    assert gw.upstream_closed


async def test_finish_reason_length(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream(oai_text_stream(["a", "b"], finish="length")))
    res = await gw.post(chat(max_tokens=2))
    evs = events(res)
    final = evs[-2]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["usage"] is None  # the provider sent none: reported as such, never invented
    assert final["tee_request_hash"] == canonical_request_hash(chat(max_tokens=2)).hex()
    verify_tee(final, await gw.public_key(), output="ab")
    assert gw.meter.only.outcome == Outcome.COMPLETE and gw.meter.only.usage is None


# -- provider errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_500_before_stream_is_502(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, stream: bool
) -> None:
    up = ScriptedUpstream(
        [b'{"error":{"message":"secret provider detail"}}'],
        status=500,
        content_type="application/json",
    )
    gw = Gateway(enclave_key, up)
    res = await gw.post(chat(stream=stream))
    assert res.status == 502 and res.complete
    assert res.header("content-type") == "application/json"
    assert res.json() == {
        "error": {
            "message": "the provider answered HTTP 500",
            "type": "upstream_error",
            "param": None,
            "code": None,
            "source": "provider",
            "provider_status": 500,
            "retryable": True,
        }
    }
    assert b"secret" not in res.body
    rec = gw.meter.only
    assert rec.outcome == Outcome.UPSTREAM_ERROR and rec.upstream_status == 500
    assert not rec.signed
    assert gw.upstream_closed


async def test_upstream_400_is_400_from_provider(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream(
        [b'{"error":{"message":"context too long","type":"invalid_request_error"}}'],
        status=400,
        content_type="application/json",
    )
    gw = Gateway(enclave_key, up)
    res = await gw.post(chat())
    assert res.status == 400
    err = res.json()["error"]
    assert err["source"] == "provider" and err["provider_status"] == 400
    assert err["retryable"] is False and err["type"] == "invalid_request_error"
    assert err["message"] == "the provider answered HTTP 400: context too long"
    assert gw.meter.only.outcome == Outcome.UPSTREAM_ERROR
    assert gw.upstream_closed


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param([httpx.RemoteProtocolError("peer closed connection")], id="connection-breaks"),
        pytest.param([], id="ends-without-finish"),
        pytest.param([b"data: {not json\n\n"], id="malformed-chunk"),
    ],
)
async def test_upstream_breaks_mid_stream_error_event_no_done_no_signature(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, tail: list[Any]
) -> None:
    script = [*oai_text_stream(["one ", "two"])[:3], 1.0, *tail]
    gw = Gateway(enclave_key, ScriptedUpstream(script))
    res = await gw.post(chat())
    assert res.status == 200 and res.complete
    evs = events(res)
    assert streamed_text(evs[:-1]) == "one two"
    last = evs[-1]
    assert set(last) == {"error"}
    assert last["error"]["source"] == "provider" and last["error"]["retryable"] is True
    assert_nothing_signed(res)
    rec = gw.meter.only
    assert rec.outcome == Outcome.UPSTREAM_ERROR and not rec.signed
    assert rec.delivered_events == 2 and rec.delivered_chars == len("one two")
    assert gw.upstream_closed


async def test_upstream_500_after_keepalive_started_the_stream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """A keep-alive before the provider's head commits the response (200, SSE); a provider
    error after that arrives as the final error event, with the same taxonomy."""
    up = ScriptedUpstream([b"{}"], status=500, head=20.0, content_type="application/json")
    gw = Gateway(enclave_key, up, deadlines={"keepalive": 15})
    res = await gw.post(chat())
    assert res.status == 200 and res.body.startswith(b": keep-alive\n\n")
    [err] = events(res)
    assert err["error"]["provider_status"] == 500 and err["error"]["source"] == "provider"
    assert_nothing_signed(res)
    assert gw.meter.only.outcome == Outcome.UPSTREAM_ERROR
    assert gw.upstream_closed


# -- deadlines ----------------------------------------------------------------------------------


async def test_first_byte_deadline_is_504(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream([], head=HANG)
    gw = Gateway(enclave_key, up, deadlines={"first_byte": 5, "keepalive": 15})
    t0 = trio.current_time()
    res = await gw.post(chat())
    assert trio.current_time() - t0 == pytest.approx(5, abs=0.05)
    assert res.status == 504
    err = res.json()["error"]
    assert (err["type"], err["code"], err["source"], err["retryable"]) == (
        "timeout",
        "first_byte",
        "provider",
        True,
    )
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT
    assert up.log.head_cancelled == 1 and up.log.opened == 0  # the hung call was cut


async def test_first_byte_deadline_after_keepalive_is_an_error_event(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """When keep-alives start before the first byte, the stream is committed (200): the
    first-byte timeout then arrives as an error event, still unsigned, no [DONE]."""
    up = ScriptedUpstream([HANG])  # head arrives, no events
    gw = Gateway(enclave_key, up, deadlines={"first_byte": 40, "keepalive": 15})
    t0 = trio.current_time()
    res = await gw.post(chat())
    assert trio.current_time() - t0 == pytest.approx(40, abs=0.05)
    assert res.status == 200
    assert res.body.count(b": keep-alive\n\n") == 2  # at 15 s and 30 s
    evs = events(res)
    assert evs[-1]["error"]["code"] == "first_byte"
    assert_nothing_signed(res)
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT
    assert gw.upstream_closed


async def test_idle_deadline_mid_stream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    script = [*oai_text_stream(["a", "b"])[:3], HANG]
    gw = Gateway(enclave_key, ScriptedUpstream(script), deadlines={"idle": 10, "keepalive": 4})
    t0 = trio.current_time()
    res = await gw.post(chat())
    assert trio.current_time() - t0 == pytest.approx(10, abs=0.05)
    evs = events(res)
    assert streamed_text(evs[:-1]) == "ab"
    assert evs[-1]["error"]["type"] == "timeout" and evs[-1]["error"]["code"] == "idle"
    assert_nothing_signed(res)
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT
    assert gw.upstream_closed


async def test_total_deadline(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    # A provider that never stops and never goes idle: only ``total`` ends it.
    script: list[Any] = [oai_chunk({"role": "assistant", "content": ""})]
    for _ in range(1000):
        script += [1.0, oai_chunk({"content": "x"})]
    up = ScriptedUpstream(script)
    gw = Gateway(enclave_key, up, deadlines={"total": 30, "idle": 5, "keepalive": 4})
    t0 = trio.current_time()
    res = await gw.post(chat())
    assert trio.current_time() - t0 == pytest.approx(30, abs=1.01)
    evs = events(res)
    assert evs[-1]["error"]["code"] == "total"
    assert 25 <= len(evs) - 1 <= 31
    assert_nothing_signed(res)
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT
    assert gw.upstream_closed and up.log.exhausted == 0


async def test_total_deadline_nonstream_is_504(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """A whole-body answer has no first-byte or idle bound (it arrives in one piece): only
    ``total`` cuts a provider that never finishes it, before anything was sent: a 504."""
    up = ScriptedUpstream([b'{"choices":', HANG], content_type="application/json")
    gw = Gateway(enclave_key, up, deadlines={"total": 30, "first_byte": 5, "idle": 5})
    t0 = trio.current_time()
    res = await gw.post(chat(stream=False))
    assert trio.current_time() - t0 == pytest.approx(30, abs=0.05)
    assert res.status == 504
    assert res.json()["error"]["code"] == "total"
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT
    assert gw.upstream_closed


async def test_keepalive_comment_during_silence_shorter_than_idle(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    chunks = oai_text_stream(["slow ", "answer"], usage=USAGE)
    script = [*chunks[:2], 35.0, *chunks[2:]]  # 35 s of silence: keep-alive 15, idle 40
    gw = Gateway(enclave_key, ScriptedUpstream(script), deadlines={"keepalive": 15, "idle": 40})
    res = await gw.post(chat())
    body = res.body
    assert body.count(b": keep-alive\n\n") == 2  # at 15 s and 30 s of silence
    first, second = body.index(b'"slow "'), body.index(b'"answer"')
    assert first < body.index(b": keep-alive\n\n") < second
    evs = events(res)
    assert evs[-1] == "[DONE]"
    verify_tee(evs[-2], await gw.public_key(), output="slow answer")
    assert gw.meter.only.outcome == Outcome.COMPLETE


async def test_keepalive_before_first_byte_starts_stream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    script = [20.0, *oai_text_stream(["late"])]
    gw = Gateway(enclave_key, ScriptedUpstream(script), deadlines={"keepalive": 15})
    res = await gw.post(chat())
    assert res.status == 200
    assert res.body.startswith(b": keep-alive\n\n")
    verify_tee(events(res)[-2], await gw.public_key(), output="late")


# -- the client side ----------------------------------------------------------------------------


def stalling_app(
    app: Any, *, after_bodies: int, stalled: trio.Event, stall_for: float | None = None
) -> Any:
    """The app behind a server whose socket write blocks after ``after_bodies`` body messages
    (a client that stopped reading, with full TCP buffers): forever, or ``stall_for`` seconds
    (then it reads again)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        n = 0

        async def send_or_stall(msg: dict[str, Any]) -> None:
            nonlocal n
            if msg["type"] == "http.response.body":
                n += 1
                if n == after_bodies + 1:
                    stalled.set()
                    if stall_for is None:
                        await trio.sleep_forever()
                    await trio.sleep(stall_for)
            await send(msg)

        await app(scope, receive, send_or_stall)

    return wrapped


async def test_client_stall_cuts_upstream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    script: list[Any] = []
    for w in ["a", "b", "c", "d", "e", "f"]:
        script += [1.0, oai_chunk({"content": w})]
    script += [HANG]
    up = ScriptedUpstream(script)
    gw = Gateway(enclave_key, up, deadlines={"client_stall": 5, "keepalive": 4})
    stalled = trio.Event()
    client = ASGIClient(stalling_app(gw.app, after_bodies=2, stalled=stalled))
    res = ASGIResult()
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: client.request("POST", PATH, body=chat(), result=res))
        await stalled.wait()
        t_stall = trio.current_time()
        await gw.meter.called.wait()
        # the next chunk comes 1 s after the stall; its hand-off waits client_stall (5 s)
        assert trio.current_time() - t_stall == pytest.approx(1 + 5)
        rec = gw.meter.only
        assert rec.outcome == Outcome.CLIENT_STALLED and not rec.signed
        assert gw.upstream_closed
        # zero-buffer hand-offs: 2 delivered, 1 in the stuck send(), at most 2 more in flight
        # inside the gateway; the relay could not read ahead (the script has 6)
        assert up.log.chunks_sent <= 5
        nursery.cancel_scope.cancel()  # the server drops the connection
    assert len(res.sse_data()) == 2
    assert_nothing_signed(res)


async def test_client_stall_then_resume_ends_without_signed_final(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """Hypercorn's socket write is shielded and has no timeout, so after ``client_stall`` the
    request task stays in ``send()`` until the peer reads again or goes away (the relay side is
    already released: upstream closed, metered). When the client does resume, the request ends
    at once, and what it gets is the truncated stream: no final event, no [DONE]."""
    script: list[Any] = []
    for w in ["a", "b", "c", "d"]:
        script += [1.0, oai_chunk({"content": w})]
    script += [*oai_text_stream([])[1:]]  # finish chunk + [DONE]: the answer would complete
    up = ScriptedUpstream(script)
    gw = Gateway(enclave_key, up, deadlines={"client_stall": 5})
    stalled = trio.Event()
    client = ASGIClient(stalling_app(gw.app, after_bodies=2, stalled=stalled, stall_for=100))
    with trio.fail_after(GUARD):
        res = await client.request("POST", PATH, body=chat())
    collect_garbage()
    rec = gw.meter.only
    assert rec.outcome == Outcome.CLIENT_STALLED and not rec.signed
    assert gw.upstream_closed and up.log.exhausted == 0
    assert streamed_text(events(res)) == "abc"  # the two before the stall, the one stuck in it
    assert_nothing_signed(res)


async def test_client_stall_during_upstream_silence_is_caught_by_keepalive(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """No provider bytes to hand over, only keep-alives: the stalled client is still noticed
    (the keep-alive hand-off does not complete) and the hung upstream is cut."""
    up = ScriptedUpstream([oai_chunk({"role": "assistant", "content": "a"}), HANG])
    gw = Gateway(enclave_key, up, deadlines={"client_stall": 5, "keepalive": 4, "idle": 600})
    stalled = trio.Event()
    client = ASGIClient(stalling_app(gw.app, after_bodies=1, stalled=stalled))
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: client.request("POST", PATH, body=chat()))
        await gw.meter.called.wait()
        # keep-alive #1 at 4 s is stuck in send(); #2 at 8 s waits client_stall → 13 s
        assert trio.current_time() == pytest.approx(4 + 4 + 5)
        assert stalled.is_set()
        assert gw.meter.only.outcome == Outcome.CLIENT_STALLED
        assert gw.upstream_closed
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("usage_sent", [True, False], ids=["usage-sent", "no-usage-yet"])
async def test_client_disconnect_mid_stream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, usage_sent: bool
) -> None:
    chunks = oai_text_stream(["x", "y"], usage=USAGE)  # role, x, y, finish, usage, DONE
    script = [*chunks[:5], HANG] if usage_sent else [*chunks[:3], HANG]
    up = ScriptedUpstream(script)
    gw = Gateway(enclave_key, up)
    gone = Disconnect()
    res = ASGIResult()
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: gw.post(chat(), disconnect=gone, result=res))
        await trio.testing.wait_all_tasks_blocked()  # everything sent is through; upstream hangs
        assert up.log.chunks_sent == len(script) - 1
        assert not gw.meter.records
        t0 = trio.current_time()
        gone.set()
        await gw.meter.called.wait()
        assert trio.current_time() - t0 < 0.01  # upstream cut and metered at once
    assert gw.upstream_closed and up.log.exhausted == 0
    rec = gw.meter.only
    assert rec.outcome == Outcome.CLIENT_GONE and not rec.signed
    assert rec.delivered_events == 2 and rec.delivered_chars == 2
    if usage_sent:
        assert rec.usage is not None
        assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (9, 3)
    else:
        assert rec.usage is None
    assert streamed_text(events(res)) == "xy"
    assert_nothing_signed(res)
    await trio.testing.wait_all_tasks_blocked()
    assert len(gw.meter.records) == 1  # and never again


async def test_client_disconnect_while_the_handoff_is_blocked(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """The client leaves while the relay waits to hand over the next chunk (the server is
    still writing the previous one), i.e. cut between two upstream reads: upstream closed, the
    hook runs once, and httpx's body iterators are ended, not left for the GC (trio's
    ResourceWarning would fail this test under -W error)."""
    script: list[Any] = [oai_chunk({"content": w}) for w in ["a", "b", "c", "d"]] + [HANG]
    up = ScriptedUpstream(script)
    gw = Gateway(enclave_key, up, deadlines={"client_stall": 60})
    stalled = trio.Event()
    gone = Disconnect()
    client = ASGIClient(stalling_app(gw.app, after_bodies=1, stalled=stalled))
    async with guarded_nursery() as nursery:
        nursery.start_soon(
            lambda: client.request(
                "POST",
                PATH,
                body=chat(),
                disconnect=gone,  # type: ignore[arg-type]  # duck-typed, see asgi.Disconnect
            )
        )
        await stalled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert up.log.chunks_sent < len(script) - 1 and not gw.meter.records
        gone.set()
    rec = gw.meter.only
    assert rec.outcome == Outcome.CLIENT_GONE and not rec.signed
    assert gw.upstream_closed and up.log.exhausted == 0


async def test_client_disconnect_while_waiting_nonstream(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    up = ScriptedUpstream([HANG], content_type="application/json")
    gw = Gateway(enclave_key, up)
    gone = Disconnect()
    res = ASGIResult()
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: gw.post(chat(stream=False), disconnect=gone, result=res))
        await trio.testing.wait_all_tasks_blocked()
        assert up.log.opened == 1
        await trio.sleep(100)  # no keep-alive, no first-byte deadline for a whole body
        assert res.status is None and not gw.meter.records
        gone.set()
    assert gw.meter.only.outcome == Outcome.CLIENT_GONE
    assert gw.upstream_closed
    assert res.status is None


# -- the metering hook --------------------------------------------------------------------------


class HangingMeter:
    def __init__(self) -> None:
        self.calls = 0

    async def finish(self, record: RequestRecord) -> None:
        self.calls += 1
        await trio.sleep_forever()


class FailingMeter:
    def __init__(self) -> None:
        self.calls = 0

    async def finish(self, record: RequestRecord) -> None:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        raise RuntimeError("settlement backend down")


@pytest.mark.parametrize("meter_cls", [HangingMeter, FailingMeter])
async def test_metering_hook_overrun_or_failure_does_not_break_the_answer(
    enclave_key: EnclaveKey,
    autojump_clock: trio.testing.MockClock,
    meter_cls: type[HangingMeter | FailingMeter],
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream(oai_text_stream(["ok"])), deadlines={"settle": 3})
    meter = meter_cls()
    gw.state.relay.meter = meter
    t0 = trio.current_time()
    res = await gw.post(chat())
    elapsed = trio.current_time() - t0
    assert meter.calls == 1
    assert elapsed == pytest.approx(3 if meter_cls is HangingMeter else 0, abs=0.05)
    assert res.status == 200 and res.complete
    evs = events(res)
    assert evs[-1] == "[DONE]"
    verify_tee(evs[-2], await gw.public_key(), output="ok")


# -- signing deadline ---------------------------------------------------------------------------


class SlowSigner:
    """Signs correctly, but only after ``delay`` seconds (an HSM/enclave call that hangs)."""

    def __init__(self, key: EnclaveKey, delay: float) -> None:
        self.key = key
        self.delay = delay
        self.started = 0
        self.finished = 0
        self.entered = trio.Event()

    async def sign(self, request_bytes: bytes, output_content: str) -> Signature:
        self.started += 1
        self.entered.set()
        await trio.sleep(self.delay)
        self.finished += 1
        return self.key.sign_answer(request_bytes, output_content, 1_700_000_000)


@pytest.mark.parametrize("stream", [True, False])
async def test_signing_overrun_never_sends_unsigned_final(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, stream: bool
) -> None:
    if stream:
        up = ScriptedUpstream(oai_text_stream(["a", "b"], usage=USAGE))
    else:
        body = {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ab"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {**USAGE, "total_tokens": 12},
        }
        up = ScriptedUpstream([json.dumps(body).encode()], content_type="application/json")
    gw = Gateway(enclave_key, up, deadlines={"sign": 2})
    signer = SlowSigner(enclave_key, delay=60)
    gw.state.relay.signer = signer
    t0 = trio.current_time()
    res = await gw.post(chat(stream=stream))
    assert trio.current_time() - t0 == pytest.approx(2, abs=0.05)
    assert signer.started == 1 and signer.finished == 0
    if stream:
        assert res.status == 200
        evs = events(res)
        assert streamed_text(evs[:-1]) == "ab"
        assert not any(
            isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]
            for e in evs
        ), "a final event went out without a signature"
        assert evs[-1]["error"]["code"] == "signing_unavailable"
    else:
        assert res.status == 503
        err = res.json()["error"]
        assert err["code"] == "signing_unavailable" and err["type"] == "service_unavailable"
        assert "choices" not in res.json()
    assert_nothing_signed(res)
    rec = gw.meter.only
    assert rec.outcome == Outcome.SIGNING_FAILED and not rec.signed
    assert rec.usage is not None  # billed on what the provider reported
    assert gw.upstream_closed


async def test_signing_within_deadline_is_shielded_from_disconnect(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """A disconnect during the (shielded) signing step does not interrupt it; the hook still
    runs once, as client_gone, and nothing reaches the gone client."""
    gw = Gateway(enclave_key, ScriptedUpstream(oai_text_stream(["a"])), deadlines={"sign": 2})
    signer = SlowSigner(enclave_key, delay=1)
    gw.state.relay.signer = signer
    gone = Disconnect()
    res = ASGIResult()
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: gw.post(chat(), disconnect=gone, result=res))
        await signer.entered.wait()
        gone.set()
    assert signer.finished == 1  # shielded: ran to its end
    rec = gw.meter.only
    assert rec.outcome == Outcome.CLIENT_GONE
    assert b"tee_" not in res.body and b"[DONE]" not in res.body
    assert gw.upstream_closed
