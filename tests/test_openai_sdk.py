"""The official ``openai`` SDK as the client, against a real Hypercorn socket (dev mode mock).

The SDK is synchronous here (run in a worker thread) so the gateway keeps the trio loop.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import openai
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.conftest import make_state, start_gateway
from trio_gateway.signing.canonical import chat_request_bytes, completion_request_bytes
from trio_gateway.signing.hashing import keccak256
from trio_gateway.signing.keys import EnclaveKey

pytestmark = pytest.mark.socket


def verify_fields(pem: str, f: dict[str, Any]) -> None:
    msg = keccak256(
        bytes.fromhex(f["tee_request_hash"])
        + bytes.fromhex(f["tee_output_hash"])
        + int(f["tee_timestamp"]).to_bytes(32, "big")
    )
    pub = serialization.load_pem_public_key(pem.encode())
    pub.verify(  # type: ignore[union-attr, call-arg]
        base64.b64decode(f["tee_signature"]),
        msg,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),  # type: ignore[arg-type]
        hashes.SHA256(),  # type: ignore[arg-type]
    )


@pytest.fixture
async def sdk(nursery: trio.Nursery, enclave_key: EnclaveKey) -> openai.OpenAI:
    url = await start_gateway(nursery, make_state(enclave_key, mock_token_delay_ms=1))
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=20)


async def test_sdk_non_stream_signed(sdk: openai.OpenAI, enclave_key: EnclaveKey) -> None:
    req = {"model": "trio-mock", "messages": [{"role": "user", "content": "Grüezi"}], "seed": 1}
    r = await trio.to_thread.run_sync(lambda: sdk.chat.completions.create(**req))  # type: ignore[arg-type]
    text = r.choices[0].message.content
    assert text and "Grüezi" in text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    extra = r.model_extra or {}
    assert extra["tee_request_hash"] == keccak256(chat_request_bytes(req)).hex()
    assert extra["tee_output_hash"] == keccak256(text.encode()).hex()
    assert extra["tee_timestamp"] == r.created
    verify_fields(enclave_key.public_pem, extra)


async def test_sdk_stream_signed(sdk: openai.OpenAI, enclave_key: EnclaveKey) -> None:
    req = {"model": "trio-mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}

    def run() -> list[Any]:
        return list(sdk.chat.completions.create(stream=True, **req))  # type: ignore[call-overload]

    chunks = await trio.to_thread.run_sync(run)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    assert final.choices[0].finish_reason == "length"
    assert final.usage is not None and final.usage.completion_tokens == 7
    extra = final.model_extra or {}
    assert extra["tee_output_hash"] == keccak256(text.encode()).hex()
    assert extra["tee_request_hash"] == keccak256(chat_request_bytes(req)).hex()
    assert not any("tee_signature" in (c.model_extra or {}) for c in chunks[:-1])
    verify_fields(enclave_key.public_pem, extra)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_tools(sdk: openai.OpenAI, enclave_key: EnclaveKey, stream: bool) -> None:
    req = {
        "model": "trio-mock",
        "messages": [{"role": "user", "content": "What's the weather in Bern?"}],
        "tools": TOOLS,
        "tool_choice": "required",
    }

    def run() -> Any:
        return sdk.chat.completions.create(stream=stream, **req)  # type: ignore[call-overload]

    result = await trio.to_thread.run_sync(run)
    if stream:
        chunks = await trio.to_thread.run_sync(lambda: list(result))
        args = "".join(
            tc.function.arguments or ""
            for c in chunks
            if c.choices and c.choices[0].delta.tool_calls
            for tc in c.choices[0].delta.tool_calls
        )
        names = [
            tc.function.name
            for c in chunks
            if c.choices and c.choices[0].delta.tool_calls
            for tc in c.choices[0].delta.tool_calls
            if tc.function and tc.function.name
        ]
        final = chunks[-1]
        finish = final.choices[0].finish_reason
        call_id = next(
            tc.id
            for c in chunks
            if c.choices and c.choices[0].delta.tool_calls
            for tc in c.choices[0].delta.tool_calls
            if tc.id
        )
        extra = final.model_extra or {}
    else:
        call = result.choices[0].message.tool_calls[0]
        args, names, finish, call_id = (
            call.function.arguments,
            [call.function.name],
            (result.choices[0].finish_reason),
            call.id,
        )
        extra = result.model_extra or {}
    assert names == ["get_weather"] and finish == "tool_calls"
    assert json.loads(args) == {"city": "example"}
    expected_output = json.dumps(
        [
            {
                "function": {"arguments": args, "name": "get_weather"},
                "id": call_id,
                "type": "function",
            }
        ],
        sort_keys=True,
    )
    assert extra["tee_output_hash"] == keccak256(expected_output.encode()).hex()
    verify_fields(enclave_key.public_pem, extra)


async def test_sdk_completions(sdk: openai.OpenAI, enclave_key: EnclaveKey) -> None:
    req = {"model": "trio-mock", "prompt": "Once upon a time"}
    r = await trio.to_thread.run_sync(lambda: sdk.completions.create(**req))  # type: ignore[arg-type]
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"  # OpenAI's legacy default: 16 tokens
    assert r.usage is not None and r.usage.completion_tokens == 16
    extra = r.model_extra or {}
    assert extra["tee_request_hash"] == keccak256(completion_request_bytes(req)).hex()
    assert extra["tee_output_hash"] == keccak256(r.choices[0].text.encode()).hex()
    verify_fields(enclave_key.public_pem, extra)

    def run_stream() -> list[Any]:
        return list(sdk.completions.create(stream=True, max_tokens=4, **req))  # type: ignore[call-overload]

    chunks = await trio.to_thread.run_sync(run_stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    final = chunks[-1].model_extra or {}
    assert final["tee_output_hash"] == keccak256(text.encode()).hex()
    verify_fields(enclave_key.public_pem, final)


async def test_sdk_errors_are_typed(sdk: openai.OpenAI) -> None:
    def bad() -> None:
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

    with pytest.raises(openai.NotFoundError) as exc:
        await trio.to_thread.run_sync(bad)
    assert exc.value.code == "model_not_found"
