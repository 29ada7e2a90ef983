"""Routes through the ASGI app: OpenAI error shape for every bad input, keys, meta endpoints."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.asgi import ASGIClient
from tests.conftest import make_state
from trio_gateway.app import create_app
from trio_gateway.signing.keys import EnclaveKey

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def dev_client(enclave_key: EnclaveKey) -> ASGIClient:
    return ASGIClient(create_app(make_state(enclave_key, mock_token_delay_ms=0)))


def assert_openai_error(res: Any, status: int, *, param: str | None = None) -> dict[str, Any]:
    assert res.status == status, res.body
    assert res.header("content-type") == "application/json"
    body = res.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err)
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in res.body.decode()
    return err  # type: ignore[no-any-return]


BAD_BODIES: list[tuple[dict[str, Any], int, str | None]] = [
    ({"messages": MSG}, 400, "model"),
    ({"model": "trio-mock"}, 400, "messages"),
    ({"model": "trio-mock", "messages": []}, 400, "messages"),
    ({"model": 123, "messages": MSG}, 400, "model"),
    ({"model": "trio-mock", "messages": MSG, "temperature": 3}, 400, "temperature"),
    ({"model": "trio-mock", "messages": MSG, "max_tokens": "abc"}, 400, "max_tokens"),
    ({"model": "trio-mock", "messages": MSG, "n": 2}, 400, "n"),
    ({"model": "trio-mock", "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ({"model": "trio-mock", "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": "trio-mock", "messages": [{"role": "user"}]}, 400, None),
    (
        {
            "model": "trio-mock",
            "messages": [{"role": "user", "content": [{"type": "input_audio", "x": 1}]}],
        },
        400,
        None,
    ),
    ({"model": "no-such-model", "messages": MSG}, 404, "model"),
    ({"model": "trio-mock", "messages": MSG, "max_tokens": 10**9}, 400, "max_tokens"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
async def test_bad_chat_bodies(
    dev_client: ASGIClient, body: dict[str, Any], status: int, param: str | None
) -> None:
    res = await dev_client.request("POST", CHAT, body=body)
    assert_openai_error(res, status, param=param)


async def test_unknown_parameter_message(dev_client: ASGIClient) -> None:
    res = await dev_client.request(
        "POST", CHAT, body={"model": "trio-mock", "messages": MSG, "logit_bias": {}}
    )
    err = assert_openai_error(res, 400, param="logit_bias")
    assert err["message"] == "Unrecognized request argument supplied: logit_bias"


@pytest.mark.parametrize(
    ("raw", "ctype", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'{"model": NaN}', "application/json", 400),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
        (b'{"model": "trio-mock"}', "text/plain", 415),
        (b'{"model": "trio-mock"}', "", 415),
    ],
)
async def test_bad_raw_bodies(dev_client: ASGIClient, raw: bytes, ctype: str, status: int) -> None:
    headers = {"content-type": ctype} if ctype else {}
    res = await dev_client.request("POST", CHAT, body=raw, headers=headers)
    assert_openai_error(res, status)


async def test_oversized_body_413(enclave_key: EnclaveKey) -> None:
    client = ASGIClient(create_app(make_state(enclave_key, max_body_bytes=1024)))
    big = {"model": "trio-mock", "messages": [{"role": "user", "content": "x" * 4096}]}
    res = await client.request("POST", CHAT, body=big)
    assert_openai_error(res, 413)


async def test_unknown_route_and_method(dev_client: ASGIClient) -> None:
    assert_openai_error(await dev_client.request("GET", "/v1/nope"), 404)
    res = await dev_client.request("GET", CHAT)
    assert_openai_error(res, 405)
    assert "POST" in (res.header("allow") or "")


async def test_fixed_temperature_model_rejects_other_values(enclave_key: EnclaveKey) -> None:
    st = make_state(enclave_key, openai_api_key="sk-x")
    client = ASGIClient(create_app(st))
    body = {"model": "o4-mini", "messages": MSG, "temperature": 0.2}
    assert_openai_error(await client.request("POST", CHAT, body=body), 400, param="temperature")


async def test_meta_endpoints(dev_client: ASGIClient, enclave_key: EnclaveKey) -> None:
    health = (await dev_client.request("GET", "/health")).json()
    assert health["status"] == "OK" and health["dev_mode"] is True and health["ready"] is True
    sk = (await dev_client.request("GET", "/signing-key")).json()
    assert sk["public_key"] == enclave_key.public_pem
    assert sk["tee_id"] == enclave_key.tee_id
    models = (await dev_client.request("GET", "/v1/models")).json()
    ids = {m["id"] for m in models["data"]}
    assert {"trio-mock", "gpt-4.1", "o4-mini"} <= ids
    spec = (await dev_client.request("GET", "/openapi.json")).json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "ChatCompletionRequest" in json.dumps(spec)
    docs = await dev_client.request("GET", "/docs")
    assert docs.status == 200 and b"openapi.json" in docs.body


async def test_model_lookup_is_case_insensitive_and_echoes(dev_client: ASGIClient) -> None:
    res = await dev_client.request("POST", CHAT, body={"model": " TRIO-Mock ", "messages": MSG})
    assert res.status == 200
    assert res.json()["model"] == " TRIO-Mock "


# -- production mode and POST /v1/keys ----------------------------------------------------------


def upstream_ok(request: httpx.Request) -> httpx.Response:
    assert request.headers["authorization"] == "Bearer sk-live"
    body = json.loads(request.content)
    return httpx.Response(
        200,
        json={
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
    )


@pytest.fixture
def prod(enclave_key: EnclaveKey) -> tuple[Any, Any]:
    st = make_state(
        enclave_key, dev=False, allow_unpaid=True, transport=httpx.MockTransport(upstream_ok)
    )
    return st, create_app(st)


async def test_production_refuses_inference_before_keys(prod: tuple[Any, Any]) -> None:
    _st, app = prod
    client = ASGIClient(app)
    res = await client.request("POST", CHAT, body={"model": "gpt-4.1", "messages": MSG})
    assert_openai_error(res, 503)
    # the dev mock does not exist in production
    keys = {"openai_api_key": "sk-live"}
    assert (await client.request("POST", "/v1/keys", body=keys)).status == 200
    res = await client.request("POST", CHAT, body={"model": "trio-mock", "messages": MSG})
    assert_openai_error(res, 404, param="model")
    res = await client.request("POST", CHAT, body={"model": "gpt-4.1", "messages": MSG})
    assert res.status == 200 and res.json()["choices"][0]["message"]["content"] == "ok"
    assert res.json()["usage"]["total_tokens"] == 4


@pytest.mark.parametrize("peer", ["10.0.0.7", "192.168.1.2", "8.8.8.8", "::ffff:1.2.3.4"])
async def test_keys_refused_from_non_loopback(prod: tuple[Any, Any], peer: str) -> None:
    st, app = prod
    assert not st.provider_keys.installed
    res = await ASGIClient(app, client=(peer, 4000)).request(
        "POST",
        "/v1/keys",
        body={"openai_api_key": "sk-live"},
        headers={"x-forwarded-for": "127.0.0.1"},
    )
    assert_openai_error(res, 403)
    assert not st.provider_keys.installed


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"openai_api_key": 5},
        {"openai_api_key": "sk-live", "surprise": 1},
        {"openai_api_key": "sk-live", "tee_heartbeat_interval": "soon"},
        {"facilitator_url": "http://x"},
        {"openai_api_key": "sk-live", "anthropic_api_key": "x" * 600},
    ],
)
async def test_keys_bad_body_installs_nothing(prod: tuple[Any, Any], body: dict[str, Any]) -> None:
    st, app = prod
    res = await ASGIClient(app, client=("::1", 4000)).request("POST", "/v1/keys", body=body)
    assert_openai_error(res, 400)
    assert not st.provider_keys.installed and st.provider_keys.keys == {}


async def test_keys_once_then_409(prod: tuple[Any, Any]) -> None:
    st, app = prod
    client = ASGIClient(app)
    body = {"openai_api_key": "sk-live", "tee_heartbeat_interval": "900"}
    res = await client.request("POST", "/v1/keys", body=body)
    assert res.status == 200
    assert res.json() == {
        "status": "ok",
        "providers_initialized": ["openai"],
        "heartbeat_enabled": False,
    }
    again = await client.request("POST", "/v1/keys", body={"openai_api_key": "sk-other"})
    assert_openai_error(again, 409)
    assert st.provider_keys.keys == {"openai": "sk-live"}
    assert "sk-live" not in repr(st.provider_keys)


async def test_production_keys_without_payments_are_refused(enclave_key: EnclaveKey) -> None:
    """Production inference is paid: provider keys alone would open a free public path."""
    st = make_state(enclave_key, dev=False, transport=httpx.MockTransport(upstream_ok))
    client = ASGIClient(create_app(st))
    res = await client.request("POST", "/v1/keys", body={"openai_api_key": "sk-live"})
    err = assert_openai_error(res, 400)
    assert err["code"] == "payments_required"
    assert not st.provider_keys.installed and st.payments is None
    res = await client.request("POST", CHAT, body={"model": "gpt-4.1", "messages": MSG})
    assert_openai_error(res, 503)
