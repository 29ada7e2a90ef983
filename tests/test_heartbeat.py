"""The signed heartbeat: wire body, signature, schedule, retries, failures, cancellation, and its
wiring through ``POST /v1/keys`` and ``GET /heartbeat/status``.

The facilitator is ``httpx.MockTransport`` (or the scripted wire of ``tests/asgi.py``) and time is
trio's ``MockClock``, so the hour-long schedules run instantly. The signature is checked
independently of the module under test: the message is rebuilt with ``eth_abi`` (ABI encoding of
``bytes32, uint256``) and ``eth_hash``'s keccak, and verified with ``cryptography`` directly. The
route tests run the app's lifespan (``app.test_app()``) and a real loopback facilitator served by
Hypercorn, because the gateway builds the heartbeat's own HTTP client.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import eth_abi
import httpx
import pytest
import trio
import trio.testing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from eth_hash.auto import keccak as eth_keccak
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from tests.asgi import HANG, ASGIClient, ScriptedUpstream
from tests.conftest import make_state
from trio_gateway.app import create_app
from trio_gateway.routes.meta import HeartbeatStatus
from trio_gateway.services import supervise
from trio_gateway.signing.heartbeat import (
    Heartbeat,
    HeartbeatConfig,
    disabled_status,
    heartbeat_msg_hash,
    shown_url,
)
from trio_gateway.signing.keys import EnclaveKey

WALL0 = 1_750_000_000.0  # the wall clock at trio time 0
FAC = "https://facilitator.test"
CONTRACT = "0x4aB9cA3D1E4F0b7e6C2d5A8f9B0c1D2e3F4a5B6c"  # mixed case: sent as given
TX = "0x" + "ab" * 32


# -- helpers ----------------------------------------------------------------------------------


def ok(tx: str = TX) -> httpx.Response:
    return httpx.Response(200, json={"txHash": tx})


Step = httpx.Response | Exception | Callable[[], httpx.Response]


class Facilitator:
    """Scripted answers, one per request (the last one repeats); records requests and the trio
    time of each."""

    def __init__(self, *script: Step) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise type(step)(str(step))  # a fresh instance: scripts repeat
        if callable(step):
            return step()
        return httpx.Response(step.status_code, headers=step.headers, content=step.content)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def wall() -> float:
    return WALL0 + trio.current_time()


def make_hb(
    key: EnclaveKey, transport: Facilitator | httpx.AsyncBaseTransport, **cfg: Any
) -> Heartbeat:
    wire = httpx.MockTransport(transport) if isinstance(transport, Facilitator) else transport
    config = HeartbeatConfig(
        contract_address=cfg.pop("contract_address", CONTRACT),
        facilitator_url=cfg.pop("facilitator_url", FAC),
        **cfg,
    )
    return Heartbeat(config, key, httpx.AsyncClient(transport=wire), wall_clock=wall)


def independent_msg(tee_id: str, timestamp: int) -> bytes:
    """keccak256(abi.encode(bytes32 teeId, uint256 timestamp)), which for these two static types
    is the same 64 bytes as the packed teeId ‖ uint256_be(timestamp)."""
    raw = bytes.fromhex(tee_id.removeprefix("0x"))
    return bytes(eth_keccak(eth_abi.encode(["bytes32", "uint256"], [raw, timestamp])))


def verify_heartbeat(body: dict[str, Any], public_pem: str) -> int:
    """Check a heartbeat body against the public key alone; return its timestamp. Raises
    (AssertionError or cryptography's InvalidSignature) when anything is off."""
    pub = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(pub, rsa.RSAPublicKey)
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert body["teeId"] == "0x" + bytes(eth_keccak(der)).hex()
    assert re.fullmatch(r"0x[0-9a-f]{64}", body["teeId"])
    assert re.fullmatch(r"[0-9]+", body["timestamp"])
    ts = int(body["timestamp"])
    sig = base64.b64decode(body["signature"], validate=True)
    assert len(sig) == 256
    pub.verify(
        sig,
        independent_msg(body["teeId"], ts),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    return ts


# -- the message and the config ------------------------------------------------------------------


def test_message_hash_is_keccak_of_tee_id_and_uint256_timestamp() -> None:
    tee = "0x" + "5a" * 32
    for ts in (0, 1, WALL0, 2**255 + 7):
        got = heartbeat_msg_hash(bytes.fromhex(tee[2:]), int(ts))
        assert got == independent_msg(tee, int(ts))
    assert heartbeat_msg_hash(b"\x01" * 32, 5) != heartbeat_msg_hash(b"\x01" * 32, 6)
    with pytest.raises(ValueError, match="32 bytes"):
        heartbeat_msg_hash(b"\x01" * 20, 5)
    for bad in (-1, 2**256):
        with pytest.raises(ValueError, match="uint256"):
            heartbeat_msg_hash(b"\x01" * 32, bad)


def test_config_defaults_and_validation() -> None:
    cfg = HeartbeatConfig(contract_address=CONTRACT, facilitator_url="https://f.test/base//")
    assert cfg.facilitator_url == "https://f.test/base"
    assert cfg.endpoint == "https://f.test/base/heartbeat"
    assert (cfg.interval, cfg.timestamp_buffer, cfg.facilitator_timeout) == (900, 300, 20)
    assert (cfg.max_attempts, cfg.retry_delay) == (3, 10)
    assert [cfg.retry_wait(n) for n in (1, 2, 3)] == [10, 20, 40]
    short = HeartbeatConfig(contract_address=CONTRACT, facilitator_url=FAC, interval=30)
    assert [short.retry_wait(n) for n in (1, 2, 3)] == [10, 15, 15]  # capped at interval / 2
    bad: list[dict[str, Any]] = [
        {"facilitator_url": "ftp://f.test"},
        {"facilitator_url": "https://"},
        {"contract_address": ""},
        {"interval": 0},
        {"facilitator_timeout": -1},
        {"timestamp_buffer": -1},
        {"max_attempts": 0},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            HeartbeatConfig(**{"contract_address": CONTRACT, "facilitator_url": FAC, **kw})


def test_shown_url_drops_credentials_query_and_fragment() -> None:
    assert shown_url("https://op:s3cret@f.test:8443/a/heartbeat?key=k#x") == (
        "https://f.test:8443/a/heartbeat"
    )
    assert shown_url("http://[::1]:9/heartbeat") == "http://[::1]:9/heartbeat"


# -- one heartbeat on the wire --------------------------------------------------------------------


async def test_wire_body_is_exact_and_the_signature_verifies(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    fac = Facilitator(ok())
    hb = make_hb(enclave_key, fac, facilitator_url=FAC + "/")
    now = wall()
    assert await hb.beat() is True
    (req,) = fac.requests
    assert req.method == "POST"
    assert str(req.url) == f"{FAC}/heartbeat"  # the trailing "/" was stripped
    assert req.headers["content-type"] == "application/json"
    assert "authorization" not in req.headers
    body = json.loads(req.content)
    assert list(body) == ["teeId", "timestamp", "signature", "contractAddress"]
    assert body["teeId"] == enclave_key.tee_id
    assert body["timestamp"] == str(int(now) - 300)
    assert body["contractAddress"] == CONTRACT
    compact = json.dumps(body, separators=(",", ":")).encode()
    assert req.content == compact
    assert verify_heartbeat(body, enclave_key.public_pem) == int(now) - 300
    # the check can fail: the signature covers this timestamp, this teeId and this key only
    with pytest.raises(InvalidSignature):
        verify_heartbeat({**body, "timestamp": str(int(now) - 299)}, enclave_key.public_pem)
    other = EnclaveKey.generate()
    with pytest.raises(AssertionError):
        verify_heartbeat(body, other.public_pem)
    with pytest.raises(InvalidSignature):
        verify_heartbeat({**body, "teeId": other.tee_id}, other.public_pem)
    st = hb.status()
    assert (st["total_sent"], st["total_errors"], st["attempts"]) == (1, 0, 1)
    assert st["last_tx_hash"] == TX and st["last_error"] is None
    assert st["last_success_timestamp"] == int(now)
    assert st["last_heartbeat_timestamp"] == int(now) - 300


@pytest.mark.parametrize("buffer", [0, 42, 3600])
async def test_timestamp_is_now_minus_the_configured_buffer(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, buffer: int
) -> None:
    fac = Facilitator(ok())
    hb = make_hb(enclave_key, fac, timestamp_buffer=buffer)
    await trio.sleep(123.75)
    assert await hb.beat() is True
    (body,) = fac.bodies()
    assert body["timestamp"] == str(int(WALL0 + 123.75) - buffer)
    assert verify_heartbeat(body, enclave_key.public_pem) == int(WALL0 + 123.75) - buffer


# -- the schedule -------------------------------------------------------------------------------


async def test_sends_at_once_then_every_interval(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    fac = Facilitator(ok("0x01"), ok("0x02"), ok("0x03"))
    hb = make_hb(enclave_key, fac)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervise, "heartbeat", hb.run)
        await trio.sleep(1)
        assert hb.running and hb.total_sent == 1
        assert hb.status()["next_due_in"] == 899
        await trio.sleep(1800)
        nursery.cancel_scope.cancel()
    assert [t - t0 for t in fac.times] == [0, 900, 1800]
    stamps = [verify_heartbeat(b, enclave_key.public_pem) for b in fac.bodies()]
    assert stamps == [int(WALL0 + t) - 300 for t in fac.times]
    assert not hb.running
    st = hb.status()
    assert (st["total_sent"], st["total_errors"], st["last_tx_hash"]) == (3, 0, "0x03")
    assert st["next_due_in"] is None


async def test_failed_heartbeat_retries_with_backoff_then_waits_for_the_next_interval(
    enclave_key: EnclaveKey,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fac = Facilitator(httpx.Response(500, json={"error": "facilitator down"}))
    hb = make_hb(enclave_key, fac)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervise, "heartbeat", hb.run)
        await trio.sleep(1000)
        assert hb.running  # failures never end the service
        nursery.cancel_scope.cancel()
    assert [t - t0 for t in fac.times] == [0, 10, 30, 900, 910, 930]
    st = hb.status()
    assert (st["total_sent"], st["total_errors"], st["consecutive_failures"]) == (0, 2, 2)
    assert (st["attempts"], st["failed_attempts"]) == (6, 6)
    assert st["last_error"] == "HTTP 500: facilitator down"
    assert st["last_tx_hash"] is None and st["last_success_timestamp"] is None
    # every attempt is signed afresh, with its own timestamp
    stamps = [verify_heartbeat(b, enclave_key.public_pem) for b in fac.bodies()]
    assert stamps == [int(WALL0 + t) - 300 for t in fac.times]
    # the service never raised into supervise, and no signature reached the logs
    assert not [r for r in caplog.records if r.name == "trio_gateway.services"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "facilitator down" in logged
    assert not any(b["signature"] in logged for b in fac.bodies())


async def test_a_retry_that_succeeds_clears_the_error(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    fac = Facilitator(httpx.Response(503, text="busy"), ok())
    hb = make_hb(enclave_key, fac)
    hb.last_error = "HTTP 500: from before"
    t0 = trio.current_time()
    assert await hb.beat() is True
    assert [t - t0 for t in fac.times] == [0, 10]
    st = hb.status()
    assert (st["total_sent"], st["total_errors"], st["failed_attempts"]) == (1, 0, 1)
    assert st["last_error"] is None and st["last_tx_hash"] == TX


async def test_retries_stay_inside_the_interval(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """interval 20: the retry waits are capped at 10 s, and the third attempt (due at 20 s, when
    the next heartbeat is) is dropped."""
    fac = Facilitator(httpx.Response(500))
    hb = make_hb(enclave_key, fac, interval=20)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hb.run)
        await trio.sleep(45)
        nursery.cancel_scope.cancel()
    assert [t - t0 for t in fac.times] == [0, 10, 20, 30, 40]
    assert (hb.total_errors, hb.failed_attempts) == (2, 5)
    assert hb.last_error == "HTTP 500"


async def test_a_hung_facilitator_times_out_and_missed_slots_are_skipped(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """Each attempt is bounded by 20 s; with a 10 s interval one attempt overruns its slot, so
    no retry is made and the next heartbeat goes at the next slot boundary (30 s, not 20 s)."""
    wire = ScriptedUpstream([], head=HANG)
    hb = make_hb(enclave_key, wire, interval=10)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hb.run)
        await trio.sleep(65)
        nursery.cancel_scope.cancel()
    times = [t0 + 0, t0 + 30, t0 + 60]
    assert len(wire.log.requests) == 3
    assert wire.log.head_cancelled == 3
    assert (hb.total_errors, hb.failed_attempts, hb.total_sent) == (2, 2, 0)
    assert hb.last_error == "no answer within 20 s"
    bodies = [json.loads(r.content) for r in wire.log.requests]
    assert [int(b["timestamp"]) for b in bodies] == [int(WALL0 + t) - 300 for t in times]


# -- what counts as a failure --------------------------------------------------------------------

FAILURES: list[tuple[Step, str]] = [
    (httpx.Response(500, json={"error": "nonce too low"}), "HTTP 500: nonce too low"),
    (httpx.Response(400, text="x" * 2000), "HTTP 400: " + "x" * 500),
    (httpx.Response(400, json={"txHash": TX}), 'HTTP 400: {"txHash":"' + TX + '"}'),
    (httpx.Response(404, json={"error": {"code": 7}}), 'HTTP 404: {"code":7}'),
    (httpx.Response(200, json={"error": "y" * 900}), "HTTP 200: " + "y" * 500),
    (httpx.Response(200, text="<html>ok</html>"), "HTTP 200: <html>ok</html>"),
    (httpx.Response(200, json={"status": "queued"}), 'HTTP 200: {"status":"queued"}'),
    (httpx.Response(201, json={"txHash": 5}), 'HTTP 201: {"txHash":5}'),
    (httpx.Response(200, json={"txHash": ""}), 'HTTP 200: {"txHash":""}'),
    (httpx.Response(200, json=[TX]), 'HTTP 200: ["' + TX + '"]'),
    (httpx.Response(200), "HTTP 200: no txHash in the answer"),
    (
        httpx.Response(302, headers={"location": "https://elsewhere.test/"}),
        "HTTP 302: no txHash in the answer",
    ),
    (httpx.Response(503), "HTTP 503"),
    (httpx.Response(500, content=b"\xff\xfe bad"), "HTTP 500: \ufffd\ufffd bad"),
    (httpx.Response(200, content=b"a" * 70_000), "HTTP 200: the answer is over 65536 bytes"),
    (httpx.ConnectError("refused"), "transport error (ConnectError)"),
    (httpx.ReadError("reset"), "transport error (ReadError)"),
]


@pytest.mark.parametrize(("answer", "error"), FAILURES)
async def test_failures_retry_three_times_and_keep_a_trimmed_error(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, answer: Step, error: str
) -> None:
    fac = Facilitator(answer)
    hb = make_hb(enclave_key, fac)
    t0 = trio.current_time()
    assert await hb.beat() is False
    assert [t - t0 for t in fac.times] == [0, 10, 30]
    st = hb.status()
    assert st["last_error"] == error
    assert len(st["last_error"]) <= len("HTTP 200: ") + 500
    assert (st["total_sent"], st["total_errors"], st["failed_attempts"]) == (0, 1, 3)
    assert st["last_tx_hash"] is None


async def test_a_hung_answer_body_times_out_and_is_closed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    wire = ScriptedUpstream([b'{"txHa', HANG], content_type="application/json")
    hb = make_hb(enclave_key, wire)
    t0 = trio.current_time()
    assert await hb.beat() is False
    assert trio.current_time() - t0 == 20 + 10 + 20 + 20 + 20
    assert (wire.log.opened, wire.log.closed) == (3, 3)
    assert hb.last_error == "no answer within 20 s"


# -- cancellation (shutdown) and stop() -------------------------------------------------------


@pytest.mark.parametrize("where", ["head", "body"])
async def test_cancel_mid_post_ends_at_once_and_closes_the_request(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock, where: str
) -> None:
    """``mock_clock`` never advances on its own: leaving the nursery without any time passing
    proves that no timeout or wait was involved."""
    if where == "head":
        wire = ScriptedUpstream([], head=HANG)
    else:
        wire = ScriptedUpstream([b'{"txHa', HANG], content_type="application/json")
    hb = make_hb(enclave_key, wire)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervise, "heartbeat", hb.run)
        await trio.testing.wait_all_tasks_blocked()
        assert hb.running and len(wire.log.requests) == 1
        nursery.cancel_scope.cancel()
    assert trio.current_time() == t0
    assert not nursery.child_tasks
    if where == "head":
        assert wire.log.head_cancelled == 1
    else:
        assert (wire.log.chunks_sent, wire.log.closed) == (1, 1)
    assert not hb.running
    # a cancelled heartbeat is neither an error nor a success
    assert (hb.total_errors, hb.failed_attempts, hb.total_sent, hb.attempts) == (0, 0, 0, 1)


@pytest.mark.parametrize("where", ["backoff", "interval"])
async def test_cancel_mid_wait_ends_at_once(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock, where: str
) -> None:
    fac = Facilitator(httpx.Response(500) if where == "backoff" else ok())
    hb = make_hb(enclave_key, fac)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervise, "heartbeat", hb.run)
        await trio.testing.wait_all_tasks_blocked()
        assert len(fac.requests) == 1 and hb.running
        nursery.cancel_scope.cancel()
    assert trio.current_time() == t0
    assert not nursery.child_tasks and not hb.running
    assert len(fac.requests) == 1
    assert (hb.failed_attempts, hb.total_sent) == ((1, 0) if where == "backoff" else (0, 1))
    assert hb.total_errors == 0  # the cut-short heartbeat is not counted as failed


async def test_stop_ends_run_without_a_restart_and_aclose_closes_the_client(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    fac = Facilitator(ok())
    hb = make_hb(enclave_key, fac)
    with trio.fail_after(5):  # a heartbeat still sleeping would let the clock jump to 900 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervise, "heartbeat", hb.run)
            await trio.sleep(1)
            assert hb.running
            await hb.aclose()
    assert not hb.running and hb.client.is_closed
    await hb.run()  # a stopped heartbeat does not start again
    assert len(fac.requests) == 1


def test_status_has_the_route_model_fields_and_never_needs_trio(enclave_key: EnclaveKey) -> None:
    hb = make_hb(enclave_key, Facilitator(ok()))
    hb._next_due = 5.0  # as if running; trio.current_time() is unavailable here
    st = hb.status()
    assert st["next_due_in"] is None
    fields = set(HeartbeatStatus.model_fields)
    assert set(st) == fields == set(disabled_status(enclave_key.tee_id))
    assert st["wallet"] is None and st["relay_mode"] == "facilitator"
    assert st["registry"] == CONTRACT and st["heartbeat_endpoint"] == f"{FAC}/heartbeat"
    assert "s3cret" not in repr(
        make_hb(enclave_key, Facilitator(ok()), facilitator_url="https://u:s3cret@f.test")
    )


# -- POST /v1/keys and GET /heartbeat/status ----------------------------------------------------


class LoopbackFacilitator:
    """A tiny ASGI facilitator served by Hypercorn on loopback: records each request and answers
    with a txHash."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body", False):
                break
        self.requests.append((scope["method"], scope["path"], body))
        answer = json.dumps({"txHash": TX}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


async def serve_facilitator(nursery: trio.Nursery, fac: LoopbackFacilitator) -> str:
    cfg = HypercornConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.graceful_timeout = 0.5
    binds: list[str] = await nursery.start(partial(serve, fac, cfg))
    return binds[0]


async def wait_until(pred: Callable[[], bool], limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not pred():  # noqa: ASYNC110 (polling state the gateway owns)
            await trio.sleep(0.02)


KEYS = {"openai_api_key": "sk-live"}


def assert_error(res: Any, status: int, code: str) -> None:
    assert res.status == status, res.body
    err = res.json()["error"]
    assert err["code"] == code and err["message"]


async def test_keys_enable_the_heartbeat_and_status_shows_it(
    enclave_key: EnclaveKey, nursery: trio.Nursery
) -> None:
    fac = LoopbackFacilitator()
    fac_url = await serve_facilitator(nursery, fac)
    st = make_state(enclave_key, dev=False, allow_unpaid=True)
    app = create_app(st)
    async with app.test_app():
        client = ASGIClient(app)
        off = (await client.request("GET", "/heartbeat/status")).json()
        assert off["enabled"] is False and off["total_sent"] == 0
        body = {
            **KEYS,
            "facilitator_url": fac_url + "/",  # heartbeat only: no pay_to_address
            "heartbeat_contract_address": CONTRACT,
            "tee_heartbeat_interval": "60",
            "tee_heartbeat_buffer": 0,
        }
        res = await client.request("POST", "/v1/keys", body=body)
        assert res.status == 200, res.body
        assert res.json() == {
            "status": "ok",
            "providers_initialized": ["openai"],
            "heartbeat_enabled": True,
        }
        assert st.payments is None  # the facilitator serves the heartbeat only
        hb = st.heartbeat
        assert hb is not None and hb.client.trust_env is False
        await wait_until(lambda: hb.total_sent == 1)
        res = await client.request("GET", "/heartbeat/status")
        assert res.status == 200
        status = res.json()
        assert status["enabled"] is True and status["running"] is True
        assert status["tee_id"] == enclave_key.tee_id
        assert status["registry"] == CONTRACT and status["wallet"] is None
        assert status["relay_mode"] == "facilitator"
        assert status["facilitator_url"] == fac_url
        assert status["heartbeat_endpoint"] == f"{fac_url}/heartbeat"
        assert (status["interval_seconds"], status["timestamp_buffer_seconds"]) == (60, 0)
        assert (status["total_sent"], status["total_errors"]) == (1, 0)
        assert status["last_tx_hash"] == TX and status["last_error"] is None
        assert 0 < status["next_due_in"] <= 60
        ((method, path, raw),) = fac.requests
        assert (method, path) == ("POST", "/heartbeat")
        sent = json.loads(raw)
        assert sent["contractAddress"] == CONTRACT
        ts = verify_heartbeat(sent, enclave_key.public_pem)
        assert abs(ts - time.time()) < 30  # buffer 0: the signed time is now
        assert status["last_heartbeat_timestamp"] == ts
        again = await client.request("POST", "/v1/keys", body=body)
        assert_error(again, 409, "already_initialized")
        assert st.heartbeat is hb
        spec = (await client.request("GET", "/openapi.json")).json()
        assert spec["paths"]["/heartbeat/status"]["get"]["tags"] == ["meta"]
        stopping = trio.current_time()
    # shutdown (after_serving) stopped the heartbeat at once and closed its client; the app
    # nursery's own 5 s background-task deadline was not needed
    assert trio.current_time() - stopping < 2
    assert hb.client.is_closed and not hb.running
    assert len(fac.requests) == 1


@pytest.mark.parametrize("allow_unpaid", [True, False])
async def test_heartbeat_without_a_facilitator_is_400_and_installs_nothing(
    enclave_key: EnclaveKey, allow_unpaid: bool
) -> None:
    st = make_state(enclave_key, dev=False, allow_unpaid=allow_unpaid)
    client = ASGIClient(create_app(st))
    body = {**KEYS, "heartbeat_contract_address": CONTRACT}
    if not allow_unpaid:
        body["pay_to_address"] = "0x" + "11" * 20
        res = await client.request("POST", "/v1/keys", body=body)
        assert_error(res, 400, "incomplete_payments")
    else:
        res = await client.request("POST", "/v1/keys", body=body)
        assert_error(res, 400, "heartbeat_needs_facilitator")
        assert res.json()["error"]["param"] == "facilitator_url"
    assert st.heartbeat is None and not st.provider_keys.installed and st.payments is None


async def test_dev_heartbeat_without_a_facilitator_is_400(enclave_key: EnclaveKey) -> None:
    st = make_state(enclave_key)
    res = await ASGIClient(create_app(st)).request(
        "POST", "/v1/keys", body={**KEYS, "heartbeat_contract_address": CONTRACT}
    )
    assert_error(res, 400, "heartbeat_needs_facilitator")
    assert st.heartbeat is None and not st.provider_keys.installed


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"heartbeat_contract_address": "0x1234"}, "heartbeat_contract_address"),
        ({"heartbeat_contract_address": "4aB9cA3D1E4F0b7e6C2d5A8f9B0c1D2e3F4a5B6c00"}, None),
        ({"heartbeat_contract_address": CONTRACT + "00"}, None),
        ({"heartbeat_contract_address": "0x" + "g" * 40}, None),
        ({"heartbeat_contract_address": 5}, None),
        ({"heartbeat_contract_address": CONTRACT, "facilitator_url": "https://"}, None),
        ({"heartbeat_contract_address": CONTRACT, "facilitator_url": "ftp://f"}, "facilitator_url"),
        ({"heartbeat_contract_address": CONTRACT, "tee_heartbeat_interval": 5}, None),
        ({"heartbeat_contract_address": CONTRACT, "tee_heartbeat_buffer": -1}, None),
    ],
)
async def test_bad_heartbeat_fields_are_400_and_install_nothing(
    enclave_key: EnclaveKey, extra: dict[str, Any], param: str | None
) -> None:
    st = make_state(enclave_key, dev=False, allow_unpaid=True)
    body = {**KEYS, "facilitator_url": FAC, **extra}
    res = await ASGIClient(create_app(st)).request("POST", "/v1/keys", body=body)
    assert_error(res, 400, "invalid_value")
    if param is not None:
        assert res.json()["error"]["param"] == param
    assert st.heartbeat is None and not st.provider_keys.installed


async def test_empty_contract_address_means_no_heartbeat(enclave_key: EnclaveKey) -> None:
    """The operator script sends "" for an unset variable: the heartbeat stays off."""
    st = make_state(enclave_key, dev=False, allow_unpaid=True)
    body = {**KEYS, "heartbeat_contract_address": "", "tee_heartbeat_interval": "900"}
    res = await ASGIClient(create_app(st)).request("POST", "/v1/keys", body=body)
    assert res.status == 200 and res.json()["heartbeat_enabled"] is False
    assert st.heartbeat is None and st.provider_keys.installed


@pytest.mark.parametrize(
    ("settings", "body", "code"),
    [
        # production without --allow-unpaid: a facilitator alone is an incomplete payment set-up,
        # with or without a heartbeat
        ({}, {"facilitator_url": FAC}, "incomplete_payments"),
        (
            {},
            {"facilitator_url": FAC, "heartbeat_contract_address": CONTRACT},
            "incomplete_payments",
        ),
        ({}, {"heartbeat_contract_address": CONTRACT}, "payments_required"),
        # --allow-unpaid: a facilitator without pay_to is only accepted for the heartbeat
        ({"allow_unpaid": True}, {"facilitator_url": FAC}, "incomplete_payments"),
        ({"allow_unpaid": True}, {"pay_to_address": "0x" + "11" * 20}, "incomplete_payments"),
    ],
)
async def test_payment_rules_around_the_heartbeat(
    enclave_key: EnclaveKey, settings: dict[str, Any], body: dict[str, Any], code: str
) -> None:
    st = make_state(enclave_key, dev=False, **settings)
    res = await ASGIClient(create_app(st)).request("POST", "/v1/keys", body={**KEYS, **body})
    assert_error(res, 400, code)
    assert st.heartbeat is None and st.payments is None and not st.provider_keys.installed


async def test_status_when_disabled(enclave_key: EnclaveKey) -> None:
    st = make_state(enclave_key)
    res = await ASGIClient(create_app(st)).request("GET", "/heartbeat/status")
    assert res.status == 200 and res.header("content-type") == "application/json"
    body = res.json()
    assert body == disabled_status(enclave_key.tee_id)
    assert body["enabled"] is False and body["running"] is False
    assert body["tee_id"] == enclave_key.tee_id
    assert set(body) == set(HeartbeatStatus.model_fields)
