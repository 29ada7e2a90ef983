"""x402 v2 ``upto`` payments end to end: the real gateway on loopback Hypercorn, the x402 SDK
client as the payer (eth-account key), and a loopback facilitator that checks real signatures.

The facilitator is the SDK's own ``x402FacilitatorSync`` + ``UptoEvmFacilitatorScheme`` (EIP-712
hashing and ecrecover done by the SDK) over an in-memory chain (``FakeChain``) that re-checks the
Permit2 witness signature independently with eth-account, enforces nonce single use, deadlines,
``amount <= permitted``, balances and the Permit2 allowance, and moves balances on settle. It is
served by a stdlib HTTP server on a thread, so the gateway talks to it through the production
``HTTPFacilitatorClient`` (and ``initialize()``'s blocking ``GET /supported``).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import trio
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address
from x402 import x402Client, x402FacilitatorSync
from x402.http.clients.httpx import x402HttpxClient
from x402.http.utils import decode_payment_signature_header, encode_payment_signature_header
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ADDRESS
from x402.mechanisms.evm.types import TransactionReceipt
from x402.mechanisms.evm.upto import UptoEvmClientScheme, UptoEvmFacilitatorScheme
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, parse_payment_payload

from trio_gateway.payments.ledger import SessionLedger
from trio_gateway.payments.price_feed import PriceFeed
from trio_gateway.payments.pricing import cost_units
from trio_gateway.payments.x402_gate import OPG_ADDRESS, PaymentSettings, X402Gate

from .conftest import make_state, start_gateway

NETWORK = "eip155:8453"
CHAIN_ID = 8453
PAYER_KEY = "0x" + "11" * 32
FACILITATOR_KEY = "0x" + "22" * 32
PAYEE = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
PRICE = Decimal("0.5")
CAP = 10**17  # 0.1 OPG per permit
CODE = b"\x60\x80"

pytestmark = pytest.mark.socket


# --- the in-memory chain ----------------------------------------------------------------------


class Revert(Exception):
    pass


@dataclass
class FakeChain:
    """``FacilitatorEvmSigner`` over dicts: the OPG token, Permit2 and the upto proxy."""

    token: str = OPG_ADDRESS
    balances: dict[str, int] = field(default_factory=dict)
    allowance: dict[str, int] = field(default_factory=dict)  # owner -> allowance to Permit2
    used_nonces: set[tuple[str, int]] = field(default_factory=set)
    txs: dict[str, tuple[str, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.account = Account.from_key(FACILITATOR_KEY)

    def get_addresses(self) -> list[str]:
        return [self.account.address]

    def get_chain_id(self) -> int:
        return CHAIN_ID

    def get_code(self, address: str) -> bytes:
        a = to_checksum_address(address)
        known = (to_checksum_address(self.token), PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ADDRESS)
        return CODE if a in known else b""

    def get_balance(self, address: str, token_address: str) -> int:
        return self.balances.get(to_checksum_address(address), 0)

    def verify_typed_data(self, *args: Any) -> bool:  # the SDK ecrecovers EOAs itself
        raise NotImplementedError

    def send_transaction(self, to: str, data: bytes) -> str:
        raise Revert("raw transactions are not supported")

    def read_contract(self, address: str, abi: Any, function_name: str, *args: Any) -> Any:
        with self.lock:
            if function_name == "balanceOf":
                return self.balances.get(to_checksum_address(args[0]), 0)
            if function_name == "allowance":
                owner, spender = (to_checksum_address(a) for a in args)
                return self.allowance.get(owner, 0) if spender == PERMIT2_ADDRESS else 0
            if function_name == "settle":
                self._settle(args, execute=False)
                return None
        raise Revert(f"unsupported read {function_name}")

    def write_contract(
        self, address: str, abi: Any, function_name: str, *args: Any, data_suffix: Any = None
    ) -> str:
        if function_name != "settle":
            raise Revert(f"unsupported write {function_name}")
        with self.lock:
            amount = self._settle(args, execute=True)
            tx = "0x" + os.urandom(32).hex()
            self.txs[tx] = ("settle", amount)
            return tx

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        return TransactionReceipt(status=1, block_number=len(self.txs), tx_hash=tx_hash, logs=None)

    def _settle(self, args: tuple[Any, ...], *, execute: bool) -> int:
        permit, amount, owner, witness, sig = args
        (token, permitted), nonce, deadline = permit
        wit_to, wit_facilitator, valid_after = witness
        owner = to_checksum_address(owner)
        amount = int(amount)
        if time.time() > int(deadline):
            raise Revert("SignatureExpired")
        if amount > int(permitted):
            raise Revert("InvalidAmount")
        if (owner, int(nonce)) in self.used_nonces:
            raise Revert("InvalidNonce")
        if to_checksum_address(wit_facilitator) not in self.get_addresses():
            raise Revert("UnauthorizedFacilitator")
        typed = {  # the Permit2 witness transfer, re-checked independently of the SDK
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "PermitWitnessTransferFrom": [
                    {"name": "permitted", "type": "TokenPermissions"},
                    {"name": "spender", "type": "address"},
                    {"name": "nonce", "type": "uint256"},
                    {"name": "deadline", "type": "uint256"},
                    {"name": "witness", "type": "Witness"},
                ],
                "TokenPermissions": [
                    {"name": "token", "type": "address"},
                    {"name": "amount", "type": "uint256"},
                ],
                "Witness": [
                    {"name": "to", "type": "address"},
                    {"name": "facilitator", "type": "address"},
                    {"name": "validAfter", "type": "uint256"},
                ],
            },
            "primaryType": "PermitWitnessTransferFrom",
            "domain": {
                "name": "Permit2",
                "chainId": CHAIN_ID,
                "verifyingContract": PERMIT2_ADDRESS,
            },
            "message": {
                "permitted": {"token": to_checksum_address(token), "amount": int(permitted)},
                "spender": X402_UPTO_PERMIT2_PROXY_ADDRESS,
                "nonce": int(nonce),
                "deadline": int(deadline),
                "witness": {
                    "to": to_checksum_address(wit_to),
                    "facilitator": to_checksum_address(wit_facilitator),
                    "validAfter": int(valid_after),
                },
            },
        }
        signer = Account.recover_message(encode_typed_data(full_message=typed), signature=sig)
        if signer != owner:
            raise Revert("InvalidSigner")
        if self.allowance.get(owner, 0) < amount or self.balances.get(owner, 0) < amount:
            raise Revert("TRANSFER_FROM_FAILED")
        if execute:
            self.used_nonces.add((owner, int(nonce)))
            self.allowance[owner] -= amount
            self.balances[owner] -= amount
            to = to_checksum_address(wit_to)
            self.balances[to] = self.balances.get(to, 0) + amount
        return amount


# --- the loopback facilitator -----------------------------------------------------------------


class Facilitator(ThreadingHTTPServer):
    daemon_threads = True
    core: x402FacilitatorSync
    calls: dict[str, int]
    down: bool
    verify_delay: float
    url: str

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the gateway gave up on a slow answer


class _Handler(BaseHTTPRequestHandler):
    server: Facilitator

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/price":  # a CoinGecko-shaped OPG/USD answer, for the production test
            return self._send(200, {OPG_ADDRESS.lower(): {"usd": float(PRICE)}})
        if self.path != "/supported":
            return self._send(404, {"error": "not found"})
        sup = self.server.core.get_supported()
        self._send(200, sup.model_dump(by_alias=True, exclude_none=True))

    def do_POST(self) -> None:
        srv = self.server
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        path = self.path.strip("/")
        srv.calls[path] = srv.calls.get(path, 0) + 1
        if srv.down:
            return self._send(500, {"error": "facilitator down"})
        payload = parse_payment_payload(req["paymentPayload"])
        reqs = PaymentRequirements.model_validate(req["paymentRequirements"])
        if path == "verify":
            time.sleep(srv.verify_delay)
            res: Any = srv.core.verify(payload, reqs)
        elif path == "settle":
            res = srv.core.settle(payload, reqs)
        else:
            return self._send(404, {"error": "not found"})
        self._send(200, res.model_dump(by_alias=True, exclude_none=True))


@dataclass
class World:
    chain: FakeChain
    fac: Facilitator
    payer: Any
    base: str
    gate: X402Gate
    state: Any

    @property
    def paid(self) -> int:
        return self.chain.balances.get(PAYEE, 0)

    def client(self) -> x402Client:
        xc = x402Client()
        xc.register(NETWORK, UptoEvmClientScheme(self.payer))
        xc.set_spend_controls(False)  # OPG is not one of the SDK's default assets
        return xc

    async def sign(self, challenge: str) -> str:
        pr = PaymentRequired.model_validate(json.loads(base64.b64decode(challenge)))
        payload = await self.client().create_payment_payload(pr)
        return encode_payment_signature_header(payload)

    async def settled(self, limit: float = 5.0) -> None:
        """Wait until the reconciler has settled every session with a charge."""
        ledger = self.gate.ledger
        await wait_until(lambda: not (ledger.status()["unsettled"] or ledger.open_sessions), limit)

    def cost(self, usage: dict[str, int]) -> int:
        model = self.state.registry.resolve("trio-mock")
        return cost_units(model, usage["prompt_tokens"], usage["completion_tokens"], PRICE)


async def wait_until(pred: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not pred():  # noqa: ASYNC110 (polling state the gateway owns)
            await trio.sleep(0.02)


@pytest.fixture
def facilitator() -> Iterator[tuple[FakeChain, Facilitator]]:
    chain = FakeChain()
    core = x402FacilitatorSync()
    core.register([NETWORK], UptoEvmFacilitatorScheme(chain))
    fac = Facilitator(("127.0.0.1", 0), _Handler)
    fac.core, fac.calls, fac.down, fac.verify_delay = core, {}, False, 0.0
    fac.url = f"http://127.0.0.1:{fac.server_address[1]}"
    thread = threading.Thread(target=fac.serve_forever, daemon=True)
    thread.start()
    try:
        yield chain, fac
    finally:
        fac.shutdown()
        fac.server_close()
        thread.join(5)


def _price_transport() -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={OPG_ADDRESS.lower(): {"usd": float(PRICE)}})

    return httpx.MockTransport(handler)


@pytest.fixture
async def world(
    enclave_key: Any, facilitator: tuple[FakeChain, Facilitator], nursery: trio.Nursery
) -> AsyncIterator[World]:
    chain, fac = facilitator
    payer = Account.from_key(PAYER_KEY)
    chain.balances[payer.address] = 10**20
    chain.allowance[payer.address] = 10**20
    state = make_state(enclave_key, mock_token_delay_ms=10.0)
    feed = PriceFeed(httpx.AsyncClient(transport=_price_transport()), OPG_ADDRESS)
    assert await feed.refresh()
    pay = PaymentSettings(
        facilitator_url=fac.url,
        pay_to=PAYEE,
        network=NETWORK,
        session_cap=CAP,
        verify_timeout=2.0,
        settle_timeout=5.0,
        reconcile_interval=0.05,
    )
    gate = state.build_payment_gate(pay, feed=feed, ledger=SessionLedger(idle_timeout=0.3))
    await gate.initialize()
    state.enable_payments(gate)
    base = await start_gateway(nursery, state)
    try:
        yield World(chain, fac, payer, base, gate, state)
    finally:
        await gate.aclose()
        await feed.client.aclose()


def chat(content: str = "hello", **kw: Any) -> dict[str, Any]:
    return {"model": "trio-mock", "messages": [{"role": "user", "content": content}], **kw}


def b64json(value: str) -> Any:
    return json.loads(base64.b64decode(value))


def tampered(good: str, signature: str | None = None) -> str:
    """``good`` (a PAYMENT-SIGNATURE header) with its Permit2 signature changed: the last two
    bytes flipped, or replaced by ``signature``."""
    payload = decode_payment_signature_header(good)
    assert isinstance(payload, PaymentPayload)
    raw = payload.model_dump(by_alias=True)
    sig = raw["payload"]["signature"]
    raw["payload"]["signature"] = signature or (
        sig[:-4] + ("0000" if sig[-4:] != "0000" else "1111")
    )
    return base64.b64encode(json.dumps(raw).encode()).decode()


# --- tests ------------------------------------------------------------------------------------


async def test_402_pay_session_reuse_settle_replay(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        # no payment: 402 with a decodable upto/Permit2 challenge and an OpenAI-shaped body
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=20))
        assert r.status_code == 402
        assert r.json()["error"]["code"] == "payment_required"
        pr = b64json(r.headers["PAYMENT-REQUIRED"])
        assert pr["x402Version"] == 2
        (opt,) = pr["accepts"]
        assert opt["scheme"] == "upto" and opt["network"] == NETWORK
        assert opt["asset"] == OPG_ADDRESS and opt["amount"] == str(CAP) and opt["payTo"] == PAYEE
        assert opt["extra"]["assetTransferMethod"] == "permit2"
        assert opt["extra"]["facilitatorAddress"] == world.chain.account.address
        assert opt["extra"]["name"] == "OpenGradient" and opt["extra"]["version"] == "1"
        # unknown model: 404 before any payment work
        r = await plain.post("/v1/chat/completions", json={**chat(), "model": "nope"})
        assert r.status_code == 404
        assert world.fac.calls.get("verify", 0) == 0

        # pay with the SDK client: 402 -> sign -> 200, signed answer, session id
        async with x402HttpxClient(world.client(), base_url=world.base, timeout=10) as payer:
            r = await payer.post("/v1/chat/completions", json=chat(max_tokens=20))
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["tee_signature"] and first["choices"][0]["message"]["content"]
        sid = r.headers["X-Upto-Session"]
        assert len(sid) >= 40
        assert world.fac.calls["verify"] == 1

        # session reuse: no facilitator call
        for _ in range(2):
            r = await plain.post(
                "/v1/chat/completions",
                json=chat("again", max_tokens=10),
                headers={"X-Upto-Session": sid},
            )
            assert r.status_code == 200, r.text
            assert r.headers["X-Upto-Session"] == sid
        second = r.json()
        assert world.fac.calls["verify"] == 1
        assert world.gate.stats.session_hits == 2

        health = (await plain.get("/health")).json()["payments"]
        assert health["enabled"] and health["price_feed"]["price_usd"] == "0.5"
        assert health["ledger"]["open_sessions"] == 1

        # the reconciler settles the idle session: exactly the delivered cost, once
        expected = world.cost(first["usage"]) + 2 * world.cost(second["usage"])
        await world.settled()
        assert world.paid == expected > 0
        assert world.fac.calls["settle"] == 1
        assert world.gate.meter.duplicates == 0

        # a settled session is closed, and so is a replay of its payment
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"X-Upto-Session": sid}
        )
        assert r.status_code == 402 and "PAYMENT-REQUIRED" in r.headers
        sig = await world.sign(r.headers["PAYMENT-REQUIRED"])
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 200
        sid2 = r.headers["X-Upto-Session"]
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 200 and r.headers["X-Upto-Session"] == sid2  # same permit
        verifies = world.fac.calls["verify"]
        await world.settled()
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 402  # replay of a settled permit
        assert world.fac.calls["verify"] == verifies
    assert world.gate.ledger.total_settled == world.paid


async def test_tampered_and_garbage_payments_rejected(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        challenge = r.headers["PAYMENT-REQUIRED"]
        good = await world.sign(challenge)

        payload = decode_payment_signature_header(good)
        assert isinstance(payload, PaymentPayload)
        raw = payload.model_dump(by_alias=True)
        raw["payload"]["permit2Authorization"]["witness"]["to"] = world.payer.address  # redirect
        bad_to = base64.b64encode(json.dumps(raw).encode()).decode()
        raw = payload.model_dump(by_alias=True)
        raw["payload"]["permit2Authorization"]["deadline"] = str(int(time.time()) + 7200)
        bad_deadline = base64.b64encode(json.dumps(raw).encode()).decode()
        raw = payload.model_dump(by_alias=True)
        sig = raw["payload"]["signature"]
        raw["payload"]["signature"] = sig[:-4] + ("0000" if sig[-4:] != "0000" else "1111")
        bad_sig = base64.b64encode(json.dumps(raw).encode()).decode()
        for header in (bad_to, bad_deadline, bad_sig, "not-base64!", "e30="):
            r = await plain.post(
                "/v1/chat/completions",
                json=chat(max_tokens=5),
                headers={"PAYMENT-SIGNATURE": header},
            )
            assert r.status_code == 402, (header[:20], r.text)
            assert "tee_signature" not in r.text
        assert world.gate.ledger.open_sessions == 0
        # a made-up session id
        r = await plain.post(
            "/v1/chat/completions", json=chat(), headers={"X-Upto-Session": "x" * 43}
        )
        assert r.status_code == 402
        # the genuine one still works
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": good}
        )
        assert r.status_code == 200
    assert world.paid == 0


async def test_facilitator_down_or_slow_is_never_free(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        challenge = r.headers["PAYMENT-REQUIRED"]
        world.fac.down = True
        sig = await world.sign(challenge)
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "facilitator_unavailable"
        world.fac.down = False
        world.fac.verify_delay = 3.0  # > verify_timeout (2 s)
        sig = await world.sign(challenge)
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 503
        assert world.gate.ledger.open_sessions == 0 and world.gate.meter.charged_requests == 0
        world.fac.verify_delay = 0.0
        # a settle that fails is retried until it lands: no lost debt
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 200
        world.fac.down = True
        await wait_until(lambda: world.gate.stats.settle_failures > 0)
        assert world.paid == 0
        world.fac.down = False
        await world.settled(limit=10)
        assert world.paid == world.cost(r.json()["usage"]) > 0


async def test_client_disconnect_mid_stream_charged_once(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        sig = await world.sign(r.headers["PAYMENT-REQUIRED"])
        body = json.dumps(chat("stream please", max_tokens=400, stream=True)).encode()
        host, port = world.base.removeprefix("http://").split(":")
        sock = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"PAYMENT-SIGNATURE: {sig}\r\n\r\n"
        )
        await sock.send_all(head.encode() + body)
        buf = b""
        with trio.fail_after(5):
            while buf.count(b"data:") < 4:  # a few deltas delivered ...
                buf += await sock.receive_some(65536)
        await sock.aclose()  # ... then hang up mid-stream
    assert buf.startswith(b"HTTP/1.1 200")
    rid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in buf.split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    meter = world.gate.meter
    await wait_until(lambda: meter.charged(rid) is not None)
    charged = meter.charged(rid)
    assert charged is not None
    full = world.cost({"prompt_tokens": 1, "completion_tokens": 400})
    assert 0 < charged < full
    await world.settled()
    assert world.paid == charged
    assert meter.charged_requests == 1 and meter.duplicates == 0
    assert world.state.usage_log.by_outcome.get("client_gone") == 1
    assert world.fac.calls["settle"] == 1


async def test_stale_price_is_503_before_any_payment(world: World) -> None:
    world.gate.feed.max_age = 1e-9
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        assert r.status_code == 503 and r.json()["error"]["code"] == "pricing_unavailable"
        r = await plain.post("/v1/chat/completions", json={**chat(), "model": "nope"})
        assert r.status_code == 404
    assert world.fac.calls.get("verify", 0) == 0


async def test_production_keys_install_payments(
    enclave_key: Any, facilitator: tuple[FakeChain, Facilitator], nursery: trio.Nursery
) -> None:
    _chain, fac = facilitator
    state = make_state(
        enclave_key,
        dev=False,
        price_feed_url=f"{fac.url}/price",
        transport=httpx.MockTransport(lambda r: httpx.Response(500)),
    )
    base = await start_gateway(nursery, state)
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    keys = {
        "openai_api_key": "sk-live",
        "facilitator_url": fac.url,
        "pay_to_address": PAYEE,
        "network": NETWORK,
    }
    async with httpx.AsyncClient(base_url=base, timeout=10) as plain:
        assert (await plain.post("/v1/chat/completions", json=body)).status_code == 503
        r = await plain.post("/v1/keys", json={**keys, "pay_to_address": None})
        assert r.status_code == 400
        r = await plain.post("/v1/keys", json={**keys, "facilitator_url": "http://127.0.0.1:9"})
        assert r.status_code == 502  # unreachable facilitator: nothing installed
        assert state.payments is None and not state.provider_keys.installed
        r = await plain.post("/v1/keys", json=keys)
        assert r.status_code == 200 and r.json()["payments_enabled"] is True
        gate = state.payments
        assert gate is not None and state.relay.meter is gate.meter
        await wait_until(lambda: gate.feed.total_fetches > 0)
        r = await plain.post("/v1/chat/completions", json=body)
        assert r.status_code == 402
        (opt,) = b64json(r.headers["PAYMENT-REQUIRED"])["accepts"]
        assert opt["scheme"] == "upto" and opt["network"] == NETWORK and opt["payTo"] == PAYEE
        health = (await plain.get("/health")).json()["payments"]
        assert health["enabled"] and health["price_feed"]["stale"] is False
    await gate.aclose()
    await gate.feed.client.aclose()


async def test_shutdown_settles_open_sessions(world: World) -> None:
    world.gate.ledger.idle_timeout = 3600.0  # the reconciler would not settle it
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        sig = await world.sign(r.headers["PAYMENT-REQUIRED"])
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": sig}
        )
        assert r.status_code == 200
    await trio.sleep(0.2)
    assert world.paid == 0 and world.gate.ledger.open_sessions == 1
    await world.gate.shutdown()
    assert world.paid == world.cost(r.json()["usage"]) > 0
    assert world.gate.ledger.open_sessions == 0


async def test_dev_payments_flag(
    enclave_key: Any, facilitator: tuple[FakeChain, Facilitator], nursery: trio.Nursery
) -> None:
    _chain, fac = facilitator
    with pytest.raises(ValueError, match="dev-mode switch"):
        make_state(enclave_key, dev=False, payments=True)
    with pytest.raises(ValueError, match="needs"):
        make_state(enclave_key, payments=True, facilitator_url=fac.url)
    state = make_state(
        enclave_key,
        payments=True,
        facilitator_url=fac.url,
        pay_to_address=PAYEE,
        payment_network=NETWORK,
        price_feed_url=f"{fac.url}/price",
    )
    base = await start_gateway(nursery, state)
    gate = state.payments
    assert gate is not None and gate.initialized
    await wait_until(lambda: gate.feed.total_fetches > 0)
    async with httpx.AsyncClient(base_url=base, timeout=10) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        assert r.status_code == 402 and "PAYMENT-REQUIRED" in r.headers
    await gate.aclose()
    await gate.feed.client.aclose()


async def test_concurrent_first_uses_of_one_permit_open_one_session(world: World) -> None:
    """SECURITY F1: k requests racing with the same fresh permit used to verify k times and open
    k full-cap sessions (k x cap of service for one permit that settles once). Now the first
    opens the session and the others, waiting on it, join that session."""
    async with httpx.AsyncClient(base_url=world.base, timeout=20) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        sig = await world.sign(r.headers["PAYMENT-REQUIRED"])
        world.fac.verify_delay = 0.3  # every racer is inside the window
        answers: list[httpx.Response] = []

        async def use() -> None:
            answers.append(
                await plain.post(
                    "/v1/chat/completions",
                    json=chat(max_tokens=5),
                    headers={"PAYMENT-SIGNATURE": sig},
                )
            )

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(use)
        world.fac.verify_delay = 0.0
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert len({a.headers["X-Upto-Session"] for a in answers}) == 1
    assert world.fac.calls["verify"] == 1
    assert world.gate.stats.sessions_opened == 1
    charged = sum(world.cost(a.json()["usage"]) for a in answers)
    await world.settled()
    assert world.paid == charged == world.gate.ledger.total_settled


def test_facilitator_strings_cannot_forge_log_lines() -> None:
    """SECURITY F11: job ids, tx hashes and error strings come from the facilitator; in a log
    line they are escaped (no newline, no terminal escape) and truncated."""
    from trio_gateway.payments.x402_gate import _printable

    hostile = "ok\n2026-01-01 00:00:00.000 [INFO] forged: settled\x1b[2J" + "x" * 500
    out = _printable(hostile)
    assert "\n" not in out and "\x1b" not in out and "\\n" in out and "\\x1b" in out
    assert len(out) <= 200 + 40 and out.endswith("…")
    assert _printable(None) == "" and _printable("0xabc") == "0xabc"


async def test_402_amplification_is_bounded(world: World) -> None:
    """SECURITY F8: a payment header the facilitator rejected is refused again without a
    second /verify; and no more than ``max_concurrent_verifies`` verifies run at once (503
    ``verify_busy`` beyond), so garbage cannot turn into unbounded facilitator traffic."""
    async with httpx.AsyncClient(base_url=world.base, timeout=20) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        good = await world.sign(r.headers["PAYMENT-REQUIRED"])
        bad_sig = tampered(good)
        for _ in range(5):
            r = await plain.post(
                "/v1/chat/completions",
                json=chat(max_tokens=5),
                headers={"PAYMENT-SIGNATURE": bad_sig},
            )
            assert r.status_code == 402
        assert world.fac.calls["verify"] == 1
        assert world.gate.stats.verify_failures_cached == 4

        # one verify slot, a slow facilitator, two fresh permits at once: one waits for nobody
        world.gate._verify_slots = trio.Semaphore(1)
        world.fac.verify_delay = 0.5
        sigs = [await world.sign(r.headers["PAYMENT-REQUIRED"]) for _ in range(2)]
        statuses: list[int] = []

        async def pay(s: str) -> None:
            resp = await plain.post(
                "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": s}
            )
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                assert resp.json()["error"]["code"] == "verify_busy"

        async with trio.open_nursery() as nursery:
            for s in sigs:
                nursery.start_soon(pay, s)
        world.fac.verify_delay = 0.0
    assert sorted(statuses) == [200, 503]
    assert world.gate.stats.verify_busy == 1


async def test_a_forged_copy_of_an_open_permit_does_not_join_its_session(world: World) -> None:
    """SECURITY F15: joining an open session by the claimed payer and nonce alone let a payment
    header with a forged signature (the victim's permit, signature replaced) take over the
    victim's session without any verify. Only the exact payload joins unverified; anything else
    is verified first, and the facilitator rejects the forgery."""
    async with httpx.AsyncClient(base_url=world.base, timeout=20) as plain:
        r = await plain.post("/v1/chat/completions", json=chat(max_tokens=5))
        good = await world.sign(r.headers["PAYMENT-REQUIRED"])
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": good}
        )
        assert r.status_code == 200
        victim = r.headers["X-Upto-Session"]
        forged = tampered(good, "0x" + "11" * 65)
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": forged}
        )
        assert r.status_code == 402, r.text
        assert r.headers.get("X-Upto-Session") != victim
        assert world.fac.calls["verify"] == 2  # the forgery was verified, and rejected
        # the genuine header still joins its session without a verify
        r = await plain.post(
            "/v1/chat/completions", json=chat(max_tokens=5), headers={"PAYMENT-SIGNATURE": good}
        )
        assert r.status_code == 200 and r.headers["X-Upto-Session"] == victim
        assert world.fac.calls["verify"] == 2
