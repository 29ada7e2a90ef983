"""xAI, BytePlus ModelArk and Nous Portal chat through the OpenAI-compatible adapter.

Each provider is ``OpenAICompatible`` with its own base URL (``state.build_providers``). Through
the real app on a scripted wire: the request goes to the provider's ``/chat/completions`` with the
upstream model id and the provider's key, a short SSE answer is relayed and signed, and the
parameters a provider documents as refused for a model (``_PARAM_RULES``: xAI reasoning models)
are answered with 400 before anything is sent.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from tests.asgi import ASGIClient, ScriptedUpstream, keccak, oai_text_stream, verify_tee
from tests.conftest import make_settings, make_state
from trio_gateway.app import create_app
from trio_gateway.providers.openai import OpenAICompatible
from trio_gateway.providers.registry import ModelRegistry
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import build_providers

PATH = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 5, "completion_tokens": 2}
KEYS = {"xai_api_key": "xai-k", "bytedance_api_key": "ark-k", "nous_api_key": "nous-k"}

# name → (URL the request must go to, upstream model id, the Authorization header)
CHAT_MODELS = {
    "grok-4": ("https://api.x.ai/v1/chat/completions", "grok-4", "Bearer xai-k"),
    "seed-1.6": (
        "https://ark.ap-southeast.bytepluses.com/api/v3/chat/completions",
        "seed-1-6-250915",
        "Bearer ark-k",
    ),
    "hermes-4-70b": (
        "https://inference-api.nousresearch.com/v1/chat/completions",
        "Hermes-4-70B",
        "Bearer nous-k",
    ),
}


def gateway(key: EnclaveKey, up: ScriptedUpstream) -> ASGIClient:
    return ASGIClient(create_app(make_state(key, transport=up, dev=True, **KEYS)))


def sse(body: bytes) -> list[Any]:
    out: list[Any] = []
    for block in body.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("name", list(CHAT_MODELS))
async def test_stream_goes_to_the_provider_and_is_relayed_signed(
    enclave_key: EnclaveKey, name: str
) -> None:
    url, upstream, auth = CHAT_MODELS[name]
    words = ["Hel", "lo ", "there"]
    up = ScriptedUpstream(oai_text_stream(words, usage=USAGE))
    client = gateway(enclave_key, up)
    res = await client.request(
        "POST", PATH, body={"model": name, "messages": MESSAGES, "stream": True}
    )

    assert res.status == 200 and res.complete
    evs = sse(res.body)
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    chunks, final = evs[:-2], evs[-2]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == words
    assert all(c["model"] == name and not any(k.startswith("tee_") for k in c) for c in chunks)
    assert final["model"] == name
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert final["tee_output_hash"] == keccak(b"Hello there").hex()
    pem = (await client.request("GET", "/signing-key")).json()["public_key"]
    verify_tee(final, pem, output="Hello there")

    [req] = up.log.requests
    assert str(req.url) == url and req.method == "POST"
    assert req.headers["authorization"] == auth
    assert req.headers["accept"] == "text/event-stream"
    sent = json.loads(req.content)
    assert sent["model"] == upstream
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == MESSAGES and sent["temperature"] == 0.0


@pytest.mark.parametrize("name", list(CHAT_MODELS))
async def test_nonstream_is_asked_unstreamed(enclave_key: EnclaveKey, name: str) -> None:
    """xAI in particular: a non-stream answer must be asked with ``stream: false`` (reference
    §16.3: cumulative chunk usage would otherwise be double-counted), also when the client
    left ``stream`` out."""
    url, upstream, auth = CHAT_MODELS[name]
    answer = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": upstream,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {**USAGE, "total_tokens": 7},
    }
    up = ScriptedUpstream([json.dumps(answer).encode()], content_type="application/json")
    client = gateway(enclave_key, up)
    res = await client.request("POST", PATH, body={"model": name, "messages": MESSAGES})
    assert res.status == 200
    obj = res.json()
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    pem = (await client.request("GET", "/signing-key")).json()["public_key"]
    verify_tee(obj, pem, output="ok")
    [req] = up.log.requests
    assert str(req.url) == url and req.headers["authorization"] == auth
    assert req.headers["accept"] == "application/json"
    sent = json.loads(req.content)
    assert sent["stream"] is False and "stream_options" not in sent
    assert sent["model"] == upstream


# (model, param, value): refused by the provider for that model, so 400 here
REFUSED = [
    ("grok-4", "presence_penalty", 0.5),
    ("grok-4", "frequency_penalty", 0.5),
    ("grok-4", "stop", ["\n"]),
    ("grok-4", "reasoning_effort", "high"),
    ("grok-4-fast", "stop", "END"),
    ("grok-4-1-fast", "reasoning_effort", "low"),
    ("grok-3-mini", "stop", ["\n"]),
    ("grok-3-mini", "presence_penalty", 0.1),
    ("grok-3-mini", "reasoning_effort", "medium"),  # grok-3-mini: "low" | "high" only
    ("grok-3-mini", "reasoning_effort", "minimal"),
    ("grok-3", "reasoning_effort", "low"),
    ("grok-2", "reasoning_effort", "high"),
]

# the same parameters where the provider takes them: forwarded
ACCEPTED = [
    ("grok-3-mini", "reasoning_effort", "low"),
    ("grok-3-mini", "reasoning_effort", "high"),
    ("grok-3", "stop", ["\n"]),
    ("grok-3", "presence_penalty", 0.5),
    ("grok-2", "frequency_penalty", 0.5),
    ("seed-1.6", "stop", ["\n"]),
    ("seed-1.6", "frequency_penalty", 0.5),
    ("hermes-4-70b", "presence_penalty", 0.5),
    ("hermes-4-70b", "stop", "END"),
]


def _id(case: tuple[str, str, Any]) -> str:
    return f"{case[0]}-{case[1]}-{case[2]}"


@pytest.mark.parametrize(("name", "param", "value"), REFUSED, ids=[_id(c) for c in REFUSED])
async def test_refused_params_are_400_before_anything_is_sent(
    enclave_key: EnclaveKey, name: str, param: str, value: Any
) -> None:
    up = ScriptedUpstream(oai_text_stream(["x"]))
    client = gateway(enclave_key, up)
    for stream in (False, True):
        body = {"model": name, "messages": MESSAGES, "stream": stream, param: value}
        res = await client.request("POST", PATH, body=body)
        assert res.status == 400, res.body
        err = res.json()["error"]
        assert err["param"] == param and err["code"] == "unsupported_parameter"
        assert err["type"] == "invalid_request_error"
    assert up.log.requests == []


@pytest.mark.parametrize(("name", "param", "value"), ACCEPTED, ids=[_id(c) for c in ACCEPTED])
async def test_accepted_params_are_forwarded(
    enclave_key: EnclaveKey, name: str, param: str, value: Any
) -> None:
    up = ScriptedUpstream(oai_text_stream(["x"], usage=USAGE))
    client = gateway(enclave_key, up)
    body = {"model": name, "messages": MESSAGES, "stream": True, param: value}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 200 and res.complete
    [req] = up.log.requests
    assert json.loads(req.content)[param] == value


def test_rules_follow_the_upstream_id_not_the_client_name() -> None:
    """Aliases resolve to one row; the rule is chosen by that row's upstream id."""
    providers = build_providers(make_settings())
    registry = ModelRegistry.load_default(providers=set(providers), dev=False)
    xai, bytedance = providers["xai"], providers["bytedance"]
    assert isinstance(xai, OpenAICompatible) and isinstance(bytedance, OpenAICompatible)
    for alias in ("grok-3-mini", "grok-3-mini-beta", "GROK-3-MINI"):
        info = registry.resolve(alias)
        assert info is not None and info.upstream == "grok-3-mini"
        assert xai.unsupported("chat", {"stop": "x", "reasoning_effort": "low"}, info) == ["stop"]
    # not a model we list, but the family rule: non-reasoning grok-4 variants keep stop
    non_reasoning = registry.resolve("grok-4-fast")
    assert non_reasoning is not None
    nr = replace(non_reasoning, upstream="grok-4-fast-non-reasoning")
    assert xai.unsupported("chat", {"stop": "x", "reasoning_effort": "low"}, nr) == [
        "reasoning_effort"
    ]
    # the same field set is fine for another provider's model
    seed = registry.resolve("seed-1.6")
    assert seed is not None
    assert bytedance.unsupported("chat", {"stop": "x"}, seed) == []
