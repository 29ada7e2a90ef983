"""Who may call ``POST /v1/keys``, over real Hypercorn sockets.

In an enclave, nitriding proxies every public request to the gateway from 127.0.0.1, so "the
peer is loopback" proves nothing; the operator reaches the enclave through gvproxy (peer
192.168.127.1). So ``scripts/start.sh`` runs an operator listener (``--operator-port``): keys are
accepted there and nowhere else, and it serves nothing but keys and a few reads. Without one
(dev, a private deployment), a loopback peer is required and a request that came through a
proxy (X-Forwarded-For and friends) is refused.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.conftest import make_state, start_gateway
from trio_gateway.signing.keys import EnclaveKey

pytestmark = pytest.mark.socket

KEYS = {"openai_api_key": "sk-operator"}


async def production(
    nursery: trio.Nursery, key: EnclaveKey, **settings: Any
) -> tuple[Any, str, str | None]:
    """A production-mode gateway (no dev, no nitriding, unpaid allowed) on real sockets."""
    state = make_state(key, dev=False, nitriding=False, allow_unpaid=True, **settings)
    public = await start_gateway(nursery, state)
    op = state.operator_endpoint
    return state, public, (f"http://127.0.0.1:{op[1]}" if op else None)


async def test_with_an_operator_listener_keys_go_there_and_nowhere_else(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    state, public, operator = await production(
        nursery, enclave_key, operator_host="127.0.0.1", operator_port=0
    )
    assert operator is not None and operator != public
    async with httpx.AsyncClient() as c:
        # what nitriding's proxied public traffic looks like: a loopback peer on the public port
        r = await c.post(f"{public}/v1/keys", json=KEYS)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "operator_listener_only"
        assert not state.provider_keys.installed
        # the operator listener serves reads the operator script needs, and nothing else
        assert (await c.get(f"{operator}/health")).status_code == 200
        assert (await c.get(f"{operator}/signing-key")).status_code == 200
        r = await c.post(f"{operator}/v1/chat/completions", json={"model": "gpt-4.1"})
        assert r.status_code == 404 and r.json()["error"]["message"].endswith("listener")
        assert (await c.get(f"{operator}/v1/models")).status_code == 404
        # the operator's call, once
        r = await c.post(f"{operator}/v1/keys", json=KEYS)
        assert r.status_code == 200, r.text
        assert state.provider_keys.keys == {"openai": "sk-operator"}
        r = await c.post(f"{operator}/v1/keys", json=KEYS)
        assert r.status_code == 409
        # the public listener still serves the API
        assert (await c.get(f"{public}/v1/models")).status_code == 200


async def test_without_an_operator_listener_a_proxied_request_is_refused(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    state, public, operator = await production(nursery, enclave_key)
    assert operator is None
    async with httpx.AsyncClient() as c:
        for header in (
            {"X-Forwarded-For": "203.0.113.7"},
            {"Forwarded": "for=203.0.113.7"},
            {"X-Real-IP": "203.0.113.7"},
        ):
            r = await c.post(f"{public}/v1/keys", json=KEYS, headers=header)
            assert r.status_code == 403, (header, r.text)
            assert r.json()["error"]["code"] == "proxied"
        assert not state.provider_keys.installed
        r = await c.post(f"{public}/v1/keys", json=KEYS)
        assert r.status_code == 200, r.text
        assert state.provider_keys.installed


def test_operator_port_must_differ_from_the_port() -> None:
    with pytest.raises(ValueError, match="operator_port must differ"):
        make_state(EnclaveKey.generate(), port=8000, operator_port=8000)
