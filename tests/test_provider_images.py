"""Endpoint-based image generation (reference §16.3) through the OpenAI-compatible adapter.

grok-2-image (xAI) and seedream-4.0 (BytePlus ModelArk) are served by ``POST
{base}/images/generations``, always asking for ``b64_json`` (a hosted URL is never fetched). The
adapter is pure, so the request it builds and the events it parses are checked directly; then the
real app runs end to end on an ``httpx.MockTransport`` wire: the images arrive under
``message.images`` (or on the single final SSE frame), usage is all zeros, and the signature
covers the request hash and an empty output.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from tests.asgi import ASGIClient, ASGIResult, keccak, verify_tee
from tests.conftest import make_settings, make_state
from trio_gateway.api.errors import InvalidRequest, UpstreamError
from trio_gateway.app import create_app
from trio_gateway.providers.base import ModelInfo
from trio_gateway.providers.openai import OpenAICompatible
from trio_gateway.providers.registry import ModelRegistry
from trio_gateway.relay.events import Finish, ImageOutput, UsageReport
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState, build_providers

PATH = "/v1/chat/completions"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(32))
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(16)
PNG_B64 = base64.b64encode(PNG).decode()
JPEG_B64 = base64.b64encode(JPEG).decode()

# name → (provider, URL the request must go to, upstream id, the key make_state installs)
IMAGE_MODELS = {
    "grok-2-image": ("xai", "https://api.x.ai/v1/images/generations", "grok-2-image-1212", "x"),
    "seedream-4.0": (
        "bytedance",
        "https://ark.ap-southeast.bytepluses.com/api/v3/images/generations",
        "seedream-4-0-250828",
        "b",
    ),
}

MESSAGES = [
    {"role": "system", "content": "You are a painter."},
    {"role": "user", "content": "a red fox"},
    {"role": "assistant", "content": "Which style?"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "in snow"}, {"type": "text", "text": "watercolour"}],
    },
]
PROMPT = "a red fox\nin snow\nwatercolour"

PROVIDERS = build_providers(make_settings())
REGISTRY = ModelRegistry.load_default(providers=set(PROVIDERS), dev=False)


def model(name: str) -> tuple[OpenAICompatible, ModelInfo]:
    info = REGISTRY.resolve(name)
    assert info is not None and info.mode == "image_generation"
    provider = PROVIDERS[info.provider]
    assert isinstance(provider, OpenAICompatible)
    return provider, info


def sent_json(body: bytes) -> dict[str, Any]:
    obj = json.loads(body)
    assert isinstance(obj, dict)
    return obj


# -- build: the exact upstream request ------------------------------------------------------------


def test_build_grok_image_request() -> None:
    provider, info = model("grok-2-image")
    raw = {"model": "grok-2-image", "messages": MESSAGES, "stream": True, "n": 1, "user": "u-1"}
    call = provider.build("chat", raw, info, "xai-key")
    assert call.method == "POST"
    assert call.url == "https://api.x.ai/v1/images/generations"
    assert sent_json(call.body) == {
        "model": "grok-2-image-1212",
        "prompt": PROMPT,
        "n": 1,
        "response_format": "b64_json",
        "user": "u-1",  # xAI's image endpoint takes ``user``
    }
    assert call.stream is False  # even for a streaming client
    assert dict(call.context) == {"mode": "image_generation"}
    headers = dict(call.headers)
    assert headers["authorization"] == "Bearer xai-key"
    assert headers["accept"] == "application/json"
    assert headers["content-type"] == "application/json"


def test_build_seedream_request() -> None:
    provider, info = model("seedream-4.0")
    raw = {"model": "seedream-4.0", "messages": MESSAGES}
    call = provider.build("chat", raw, info, "ark-key")
    assert call.url == "https://ark.ap-southeast.bytepluses.com/api/v3/images/generations"
    # ModelArk's image API has no ``n`` (one image unless sequential generation is asked for)
    assert sent_json(call.body) == {
        "model": "seedream-4-0-250828",
        "prompt": PROMPT,
        "response_format": "b64_json",
    }
    assert call.stream is False and dict(call.context) == {"mode": "image_generation"}
    assert dict(call.headers)["authorization"] == "Bearer ark-key"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "a red fox"}],  # no user turn at all
        [{"role": "user", "content": "  \n "}],
        [{"role": "user", "content": [{"type": "text", "text": ""}]}],
    ],
    ids=["system-only", "blank", "empty-part"],
)
@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_build_without_a_prompt_is_invalid(name: str, messages: list[dict[str, Any]]) -> None:
    provider, info = model(name)
    with pytest.raises(InvalidRequest) as exc:
        provider.build("chat", {"model": name, "messages": messages}, info, "k")
    assert exc.value.status == 400 and exc.value.param == "messages"


def test_build_refuses_image_inputs_and_legacy_completions() -> None:
    provider, info = model("seedream-4.0")
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}}
    msgs = [{"role": "user", "content": [{"type": "text", "text": "like this"}, part]}]
    with pytest.raises(InvalidRequest) as exc:
        provider.build("chat", {"model": "seedream-4.0", "messages": msgs}, info, "k")
    assert exc.value.param == "messages"
    with pytest.raises(InvalidRequest) as exc:
        provider.build("completion", {"model": "seedream-4.0", "prompt": "a fox"}, info, "k")
    assert exc.value.status == 400 and exc.value.param == "model"


def test_unsupported_names_chat_params_for_image_models_only() -> None:
    xai, grok_image = model("grok-2-image")
    bytedance, seedream = model("seedream-4.0")
    fields = {"model": "m", "messages": MESSAGES, "stream": False, "n": 1, "temperature": 0.5}
    fields |= {"tools": None, "max_tokens": 10}
    assert xai.unsupported("chat", fields, grok_image) == ["temperature", "max_tokens"]
    assert bytedance.unsupported("chat", {**fields, "user": "u"}, seedream) == [
        "temperature",
        "max_tokens",
        "user",
    ]
    assert (
        xai.unsupported("chat", {"model": "m", "messages": MESSAGES, "user": "u"}, grok_image) == []
    )
    # the route does not pass the model today: nothing to say then (``build`` checks)
    assert xai.unsupported("chat", fields) == []
    grok_chat = REGISTRY.resolve("grok-2")
    assert grok_chat is not None
    assert xai.unsupported("chat", fields, grok_chat) == []


# -- parse: base64 in, data: URIs out -------------------------------------------------------------


def parse(name: str, answer: Any) -> list[Any]:
    provider, info = model(name)
    call = provider.build("chat", {"model": name, "messages": MESSAGES}, info, "k")
    return provider.parse_body("chat", call, json.dumps(answer).encode())


def test_parse_b64_images_to_data_uris() -> None:
    answer = {
        "created": 1700000000,
        "data": [
            {"b64_json": PNG_B64, "revised_prompt": "a red fox in snow"},
            {"b64_json": JPEG_B64},  # grok-2-image sends JPEG, unlabelled
            {"b64_json": base64.b64encode(WEBP).decode(), "mime_type": "image/png"},
        ],
    }
    assert parse("grok-2-image", answer) == [
        ImageOutput("data:image/png;base64," + PNG_B64),
        ImageOutput("data:image/jpeg;base64," + JPEG_B64),
        ImageOutput("data:image/webp;base64," + base64.b64encode(WEBP).decode()),  # bytes decide
        UsageReport(prompt_tokens=0, completion_tokens=0),
        Finish("stop"),
    ]


@pytest.mark.parametrize(
    ("item", "answer_extra", "mime"),
    [
        ({"mime_type": "image/webp"}, {}, "image/webp"),
        ({"output_format": "jpeg"}, {}, "image/jpeg"),
        ({}, {"output_format": "webp"}, "image/webp"),
        ({"mime_type": "text/html"}, {}, "image/png"),  # not an image label: ignored
        ({}, {}, "image/png"),
    ],
)
def test_parse_labels_unrecognised_bytes_from_the_provider_else_png(
    item: dict[str, str], answer_extra: dict[str, str], mime: str
) -> None:
    opaque = base64.b64encode(b"not a known image header").decode()
    events = parse("seedream-4.0", {"data": [{"b64_json": opaque, **item}], **answer_extra})
    assert events[0] == ImageOutput(f"data:{mime};base64,{opaque}")


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"data": [{"url": "https://cdn.example/fox.png"}]}, "image_url_only"),
        ({"data": []}, "no_image"),
        ({"created": 1}, "no_image"),
        ({"data": [{"error": {"code": "OutputImageSensitiveContentDetected"}}]}, "no_image"),
        ({"data": [{"b64_json": "not base64!"}]}, None),
        ({"data": ["x"]}, None),
        ({"error": {"message": "boom"}}, "provider_error"),
    ],
    ids=["url-only", "empty", "no-data", "item-error", "bad-b64", "bad-item", "error"],
)
def test_parse_without_an_image_is_an_upstream_error(answer: Any, code: str | None) -> None:
    with pytest.raises(UpstreamError) as exc:
        parse("seedream-4.0", answer)
    assert exc.value.status == 502
    if code is not None:
        assert exc.value.code == code


# -- end to end through the real app --------------------------------------------------------------


class Wire:
    """An ``httpx.MockTransport`` provider that records requests and answers ``answer``."""

    def __init__(self, answer: Any, status: int = 200) -> None:
        self.answer = answer
        self.status = status
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.answer)


def gateway(key: EnclaveKey, wire: Wire) -> tuple[AppState, ASGIClient]:
    state = make_state(
        key, transport=wire.transport, dev=True, xai_api_key="x", bytedance_api_key="b"
    )
    return state, ASGIClient(create_app(state))


def request_hash(body: dict[str, Any]) -> str:
    """keccak256 of the reference's canonical chat request, built from scratch (§3.2)."""
    msgs = [
        {
            "role": m["role"],
            "content": str(m["content"]) if isinstance(m["content"], list) else m["content"],
        }
        for m in body["messages"]
    ]
    canon = {"model": body["model"], "messages": msgs, "temperature": 0.0}
    return keccak(json.dumps(canon, sort_keys=True).encode()).hex()


async def public_key(client: ASGIClient) -> str:
    return str((await client.request("GET", "/signing-key")).json()["public_key"])


def check_upstream(wire: Wire, name: str) -> None:
    _, url, upstream, api_key = IMAGE_MODELS[name]
    [req] = wire.requests
    assert str(req.url) == url and req.method == "POST"
    assert req.headers["authorization"] == f"Bearer {api_key}"
    sent = sent_json(req.content)
    assert sent["model"] == upstream and sent["prompt"] == PROMPT
    assert sent["response_format"] == "b64_json"


IMAGES: list[dict[str, Any]] = [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}}
]
ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
EMPTY_HASH = keccak(b"").hex()


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
async def test_nonstream_image_answer_is_signed_over_an_empty_output(
    enclave_key: EnclaveKey, name: str
) -> None:
    wire = Wire({"created": 1700000000, "data": [{"b64_json": PNG_B64}]})
    state, client = gateway(enclave_key, wire)
    body = {"model": name, "messages": MESSAGES, "stream": False}
    res = await client.request("POST", PATH, body=body)

    assert res.status == 200 and res.complete, res.body
    assert res.header("content-type") == "application/json"
    obj = res.json()
    assert obj["object"] == "chat.completion" and obj["model"] == name
    assert obj["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "", "images": IMAGES},
            "finish_reason": "stop",
        }
    ]
    assert obj["usage"] == ZERO_USAGE
    assert obj["tee_output_hash"] == EMPTY_HASH
    assert obj["tee_request_hash"] == request_hash(body)
    pem = await public_key(client)
    verify_tee(obj, pem, output="")
    with pytest.raises(AssertionError):  # the check can fail: the images are not what is signed
        verify_tee(obj, pem, output=IMAGES[0]["image_url"]["url"])
    check_upstream(wire, name)
    assert state.usage_log is not None and state.usage_log.by_outcome == {"complete": 1}


def sse(res: ASGIResult) -> list[Any]:
    return [d if d == "[DONE]" else json.loads(d) for d in res.sse_data()]


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
async def test_stream_image_answer_is_one_signed_final_frame(
    enclave_key: EnclaveKey, name: str
) -> None:
    wire = Wire({"created": 1700000000, "data": [{"b64_json": PNG_B64}]})
    _, client = gateway(enclave_key, wire)
    body = {"model": name, "messages": MESSAGES, "stream": True}
    res = await client.request("POST", PATH, body=body)

    assert res.status == 200 and res.complete
    assert res.header("content-type") == "text/event-stream; charset=utf-8"
    [final, done] = sse(res)
    assert done == "[DONE]"
    assert final["object"] == "chat.completion.chunk" and final["model"] == name
    assert final["id"] == res.header("x-request-id")
    assert final["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert final["images"] == IMAGES
    assert final["usage"] == ZERO_USAGE
    assert final["tee_output_hash"] == EMPTY_HASH
    assert final["tee_request_hash"] == request_hash(body)
    verify_tee(final, await public_key(client), output="")
    check_upstream(wire, name)


@pytest.mark.parametrize("stream", [False, True])
async def test_hosted_url_answer_is_refused_unsigned(enclave_key: EnclaveKey, stream: bool) -> None:
    wire = Wire({"data": [{"url": "http://169.254.169.254/latest/meta-data/"}]})
    state, client = gateway(enclave_key, wire)
    body = {"model": "grok-2-image", "messages": MESSAGES, "stream": stream}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 502 and res.complete
    assert res.json()["error"]["code"] == "image_url_only"
    assert b"tee_" not in res.body and b"[DONE]" not in res.body
    assert len(wire.requests) == 1  # the provider, and nothing else: the URL is not fetched
    assert state.usage_log is not None and state.usage_log.by_outcome == {"upstream_error": 1}


async def test_provider_refusal_is_relayed_as_400(enclave_key: EnclaveKey) -> None:
    wire = Wire({"error": {"message": "prompt rejected by moderation"}}, status=400)
    _, client = gateway(enclave_key, wire)
    res = await client.request("POST", PATH, body={"model": "seedream-4.0", "messages": MESSAGES})
    assert res.status == 400
    err = res.json()["error"]
    assert err["source"] == "provider" and "moderation" in err["message"]


CHAT_ONLY = [
    ("temperature", 0.7),
    ("top_p", 0.9),
    ("max_tokens", 100),
    ("max_completion_tokens", 100),
    ("stop", ["\n"]),
    ("seed", 7),
    ("frequency_penalty", 0.5),
    ("presence_penalty", 0.5),
    (
        "tools",
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    ),
    ("tool_choice", "auto"),
    ("parallel_tool_calls", False),
    ("response_format", {"type": "json_object"}),
    ("reasoning_effort", "low"),
]


@pytest.mark.parametrize(("param", "value"), CHAT_ONLY, ids=[p for p, _ in CHAT_ONLY])
@pytest.mark.parametrize("name", list(IMAGE_MODELS))
async def test_chat_params_on_image_models_are_400(
    enclave_key: EnclaveKey, name: str, param: str, value: Any
) -> None:
    wire = Wire({"data": [{"b64_json": PNG_B64}]})
    _, client = gateway(enclave_key, wire)
    body = {"model": name, "messages": MESSAGES, param: value}
    res = await client.request("POST", PATH, body=body)
    assert res.status == 400, res.body
    err = res.json()["error"]
    assert err["param"] == param and err["code"] == "unsupported_parameter"
    assert wire.requests == []


async def test_user_is_forwarded_to_xai_but_refused_by_modelark(enclave_key: EnclaveKey) -> None:
    wire = Wire({"data": [{"b64_json": PNG_B64}]})
    _, client = gateway(enclave_key, wire)
    ok = await client.request(
        "POST", PATH, body={"model": "grok-2-image", "messages": MESSAGES, "user": "u-9"}
    )
    assert ok.status == 200
    assert sent_json(wire.requests[0].content)["user"] == "u-9"
    bad = await client.request(
        "POST", PATH, body={"model": "seedream-4.0", "messages": MESSAGES, "user": "u-9"}
    )
    assert bad.status == 400 and bad.json()["error"]["param"] == "user"
    assert len(wire.requests) == 1


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "draw a fox"}],
        [{"role": "user", "content": " "}],
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}],
            }
        ],
    ],
    ids=["no-user-turn", "blank", "image-input"],
)
async def test_no_usable_prompt_is_400(
    enclave_key: EnclaveKey, messages: list[dict[str, Any]]
) -> None:
    wire = Wire({"data": [{"b64_json": PNG_B64}]})
    _, client = gateway(enclave_key, wire)
    res = await client.request("POST", PATH, body={"model": "grok-2-image", "messages": messages})
    assert res.status == 400 and res.json()["error"]["param"] == "messages"
    assert wire.requests == []


async def test_image_model_on_legacy_completions_is_400(enclave_key: EnclaveKey) -> None:
    wire = Wire({"data": [{"b64_json": PNG_B64}]})
    _, client = gateway(enclave_key, wire)
    res = await client.request(
        "POST", "/v1/completions", body={"model": "seedream-4.0", "prompt": "a fox"}
    )
    assert res.status == 400 and res.json()["error"]["param"] == "model"
    assert wire.requests == []
