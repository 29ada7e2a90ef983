"""The payment path under cancellation, and the end-to-end gaps around it.

**The paid cancel sweep.** ``test_cancel_sweep``'s machinery (``CancelAtStep``, ``run_case``,
``sweep``, the Hypercorn-like server model, invariants I0 to I5) is reused as is, over the real
app with x402 payments enabled: the gate, ``SessionLedger``, ``SettlingMeter`` and an
**in-process facilitator** (the SDK's ``x402FacilitatorSync`` + ``UptoEvmFacilitatorScheme``
over ``test_payments_x402.FakeChain``, which re-checks the Permit2 signature; called directly,
with a virtual-time round trip, so it runs under ``MockClock`` inside each swept ``trio.run``).
The payer is the SDK client (``World.sign``). Two modes:

* ``fresh``: every run carries a new ``PAYMENT-SIGNATURE``, so the verify round trip and the
  session opening are swept too; after each run the reconciler settles (twice over, to catch a
  double settle);
* ``session``: every run reuses one session (``X-Upto-Session``, opened before the sweep), the
  hot path; the session is settled once at the end.

Payment invariants, added to the sweep's own after every run (``check_payment``):

* P1 (charged once or released, never both, never neither): when the relay ran, nothing is
  held on the ledger once it returned; when it did not, any reservation left (an orphan: the
  client left between admission and the relay) is released by the next reconciler round;
* P2 (charged for what was delivered): the ledger's charge for the run equals an independent
  oracle of ``meter.py``'s documented rule (usage on completion; on a disconnect, the delivered
  estimate plus the prompt iff the provider accepted or something was delivered; else 0);
* P3 (never an unpaid answer): a signed final / signed body that reached the client implies a
  charge > 0;
* P4 (settle once): after the reconciler, nothing is open or pending, the facilitator was
  asked to settle at most once per session and the chain received exactly what was charged.

``test_paid_sweep_catches_planted_bugs`` plants a meter that double-charges a client that left
(P2) and one that forgets a reservation (P1); both are caught.

The end-to-end gaps (in-process ASGI driver, same facilitator, pytest-trio ``mock_clock``):
cap saturation, a client disconnect before the first token (provider accepted or not),
disconnect during settlement (reconciler cancelled or shutdown with a settle in flight, a
settle whose answer was lost), and the permit deadline margins on the ledger's injectable
clock.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from eth_account import Account
from eth_utils import to_checksum_address
from x402 import x402FacilitatorSync
from x402.http.utils import decode_payment_signature_header
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme

from tests import test_cancel_sweep as cs
from tests.asgi import HANG, ASGIClient, ASGIResult, ScriptedUpstream, oai_text_stream
from tests.conftest import make_settings
from tests.test_payments_x402 import (
    NETWORK,
    PAYEE,
    PAYER_KEY,
    PRICE,
    FakeChain,
    World,
    _price_transport,
)
from trio_gateway.app import create_app
from trio_gateway.payments.ledger import SessionLedger, State
from trio_gateway.payments.meter import SettlingMeter
from trio_gateway.payments.price_feed import PriceFeed
from trio_gateway.payments.pricing import cost_units, worst_case_cost
from trio_gateway.payments.x402_gate import (
    OPG_ADDRESS,
    PAYMENT_SIGNATURE,
    SESSION_HEADER,
    PaymentSettings,
    X402Gate,
)
from trio_gateway.providers.base import ModelInfo
from trio_gateway.relay.metering import Outcome, RequestRecord
from trio_gateway.signing.canonical import chat_request_bytes
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

MODEL = "gpt-4.1"
USAGE = cs.USAGE  # what the scripted provider reports
PATH = "/v1/chat/completions"
URL = "http://gateway.test" + PATH


# --- the in-process facilitator ----------------------------------------------------------------


class InProcessFacilitator:
    """The SDK facilitator core over ``FakeChain`` (real signature checks), called in-process.
    Each call takes ``rtt`` virtual seconds; a settle executes on the chain after ``rtt`` and
    its answer takes ``answer_delay`` more (longer than the gate's settle deadline: the answer
    is lost, the transfer is not)."""

    def __init__(self, chain: FakeChain, rtt: float = 0.01) -> None:
        self.chain = chain
        self.core = x402FacilitatorSync()
        self.core.register([NETWORK], UptoEvmFacilitatorScheme(chain))
        self.rtt = rtt
        self.answer_delay = 0.0
        self.calls: Counter[str] = Counter()
        self.landed: list[int] = []  # amounts actually transferred on the chain
        self.settle_started = trio.Event()

    def get_supported(self) -> Any:
        return self.core.get_supported()

    async def verify(self, payload: Any, requirements: Any) -> Any:
        self.calls["verify"] += 1
        await trio.sleep(self.rtt)
        return self.core.verify(payload, requirements)

    async def settle(self, payload: Any, requirements: Any) -> Any:
        self.calls["settle"] += 1
        self.settle_started.set()
        await trio.sleep(self.rtt)
        res = self.core.settle(payload, requirements)
        if res.success:
            self.landed.append(int(requirements.amount))
        await trio.sleep(self.answer_delay)
        return res


class LedgerClock:
    """The ledger's injectable unix clock: real time plus a virtual offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Paid:
    """The real app with payments on, the in-process facilitator and the SDK payer."""

    state: AppState
    gate: X402Gate
    fac: InProcessFacilitator
    chain: FakeChain
    clock: LedgerClock
    inner: cs.CountingMeter  # the settling meter's inner meter: every finish() record
    upstream: ScriptedUpstream
    payer: World
    model: ModelInfo
    challenge: str = ""

    @property
    def ledger(self) -> SessionLedger:
        return self.gate.ledger

    @property
    def meter(self) -> SettlingMeter:
        return self.gate.meter

    @property
    def paid(self) -> int:
        return self.chain.balances.get(PAYEE, 0)

    def cost(self, prompt: int, completion: int) -> int:
        return cost_units(self.model, prompt, completion, PRICE)

    async def sign(self) -> str:
        return await self.payer.sign(self.challenge)

    async def setup(self) -> None:
        """Inside a trio run: the price, ``/supported`` and a challenge to sign."""
        assert await self.gate.feed.refresh()
        await self.gate.initialize()
        self.state.enable_payments(self.gate)
        self.challenge = await self.gate.challenge(URL, PATH)


def build_paid(
    key: EnclaveKey,
    upstream: ScriptedUpstream,
    *,
    cap: int = 10**18,
    idle_timeout: float = 100.0,
    settle_timeout: float = 5.0,
    meter_cls: type[SettlingMeter] = SettlingMeter,
) -> Paid:
    chain = FakeChain()
    payer = Account.from_key(PAYER_KEY)
    chain.balances[payer.address] = 10**20
    chain.allowance[payer.address] = 10**20
    fac = InProcessFacilitator(chain)
    inner = cs.CountingMeter()
    state = AppState.build(
        make_settings(openai_api_key="sk-x"), key=key, meter=inner, transport=upstream
    )
    state.relay.signer = cs.AwaitingSigner(key)
    clock = LedgerClock()
    pay = PaymentSettings(
        facilitator_url="http://facilitator.invalid",
        pay_to=PAYEE,
        network=NETWORK,
        session_cap=cap,
        settle_timeout=settle_timeout,
        reconcile_interval=1.0,
    )
    feed = PriceFeed(httpx.AsyncClient(transport=_price_transport()), OPG_ADDRESS)
    ledger = SessionLedger(clock=clock, idle_timeout=idle_timeout)
    gate = state.build_payment_gate(pay, facilitator=fac, feed=feed, ledger=ledger)
    if meter_cls is not SettlingMeter:
        gate.meter = meter_cls(ledger, decimals=pay.decimals, inner=inner)
    model = state.registry.resolve(MODEL)
    assert model is not None
    signer = World(chain, None, payer, "", gate, state)
    return Paid(state, gate, fac, chain, clock, inner, upstream, signer, model)


def expected_charge(rec: RequestRecord, p: Paid, request_size: int) -> int:
    """An independent oracle of the documented billing rule (``meter.py`` / ``pricing.py``)."""
    delivered = max(rec.delivered_events, math.ceil(rec.delivered_chars / 4))
    if rec.outcome == Outcome.COMPLETE:
        assert rec.usage is not None
        return p.cost(rec.usage.prompt_tokens, rec.usage.completion_tokens)
    if rec.outcome in (Outcome.CLIENT_GONE, Outcome.CLIENT_STALLED):
        accepted = rec.upstream_status is not None and 200 <= rec.upstream_status < 300
        charge_prompt = accepted or delivered > 0
    else:  # an error: the prompt only if something was delivered
        charge_prompt = delivered > 0
    prompt = 0
    if charge_prompt:
        if rec.usage is not None and rec.usage.prompt_tokens > 0:
            prompt = rec.usage.prompt_tokens
        else:
            prompt = math.ceil(request_size / 4)
    return p.cost(prompt, delivered)


# --- the paid sweep ----------------------------------------------------------------------------


class _PayingClient:
    """``run_case`` calls ``rig.client.request(...)``: add the run's payment headers."""

    def __init__(self, inner: ASGIClient, rig: PaidRig) -> None:
        self.inner = inner
        self.rig = rig

    async def request(self, method: str, path: str, **kw: Any) -> ASGIResult:
        return await self.inner.request(method, path, headers=dict(self.rig.headers), **kw)


@dataclass
class PaidRig(cs.Rig):
    paid: Paid | None = None
    fresh: bool = True  # a new PAYMENT-SIGNATURE per run (else the one open session)
    headers: dict[str, str] = field(default_factory=dict)
    session: str = ""
    baseline: tuple[int, int, int] = (0, 0, 0)  # (total_charged, settle calls, paid) at reset
    runs: Counter[str] = field(default_factory=Counter)

    @property
    def p(self) -> Paid:
        assert self.paid is not None
        return self.paid

    @property
    def body(self) -> dict[str, Any]:
        return {**super().body, "max_tokens": 16}

    def reset(self) -> None:
        super().reset()
        p = self.p
        if self.fresh:
            self.headers = {PAYMENT_SIGNATURE: trio.run(p.sign)}
        else:
            self.headers = {SESSION_HEADER: self.session}
        self.baseline = (p.ledger.total_charged, p.fac.calls["settle"], p.paid)


def build_paid_rig(
    key: EnclaveKey,
    *,
    stream: bool,
    fresh: bool,
    meter_cls: type[SettlingMeter] = SettlingMeter,
) -> PaidRig:
    script = cs._stream_script() if stream else cs._body_script()
    kind = "text/event-stream" if stream else "application/json"
    upstream = ScriptedUpstream(script, content_type=kind)
    p = build_paid(key, upstream, meter_cls=meter_cls)
    trio.run(p.setup)
    rig = PaidRig(key, stream, False, ASGIClient(None), upstream, p.inner, paid=p, fresh=fresh)
    app = cs.server(create_app(p.state), rig, yielding=True)
    rig.client = _PayingClient(ASGIClient(app), rig)  # type: ignore[assignment]
    relay = p.state.relay
    real_run = relay.run

    async def run(job: Any, out: Any) -> None:
        rig.entered.append(job.record.request_id)
        await real_run(job, out)

    relay.run = run  # type: ignore[method-assign]
    if not fresh:  # open the session with one uncancelled paid request

        async def open_session() -> str:
            res = await ASGIClient(create_app(p.state)).request(
                "POST", PATH, body=rig.body, headers={PAYMENT_SIGNATURE: await p.sign()}
            )
            assert res.status == 200, res.body[:300]
            sid = res.header(SESSION_HEADER)
            assert sid
            return sid

        rig.session = trio.run(open_session, clock=trio.testing.MockClock(autojump_threshold=0))
    return rig


def _reconcile(rig: PaidRig, *, settle: bool) -> None:
    """After a run: a later reconciler round (trio time past the orphan deadline; with
    ``settle``, ledger time past the idle timeout, and a second round that must be a no-op)."""
    p = rig.p
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        clock.jump(p.gate.settings.orphan_after + cs.GUARD + 1)
        if not settle:
            await p.meter.reap_orphans(p.gate.settings.orphan_after)
            return
        p.clock.offset += p.ledger.idle_timeout + 1
        await p.gate.settle_due()
        await p.gate.settle_due()
        # every session is closed now; back to real time (the next run's permit is signed on it)
        p.clock.offset -= p.ledger.idle_timeout + 1

    trio.run(main, clock=clock)


def check_payment(rig: PaidRig, r: cs.RunResult) -> list[str]:
    p = rig.p
    errs: list[str] = []
    ledger, meter = p.ledger, p.meter
    charged0, settles0, paid0 = rig.baseline
    charged = ledger.total_charged - charged0
    recs = rig.meter.calls
    size = len(chat_request_bytes(rig.body))
    if rig.entered:
        if ledger.status()["reserved"]:
            errs.append(f"P1 {ledger.status()['reserved']} still reserved after finish()")
        if recs:
            rec = recs[0]
            want = expected_charge(rec, p, size)
            if charged != want:
                errs.append(f"P2 charged {charged}, delivered cost {want} ({rec.outcome})")
            if meter.charged(rec.request_id) != charged:
                errs.append(f"P2 meter says {meter.charged(rec.request_id)}, ledger {charged}")
    elif charged:
        errs.append(f"P2 charged {charged} but the relay never ran")
    signed, _ = cs._delivered(rig, r.res)
    if signed and charged <= 0:
        errs.append("P3 a signed answer was delivered unpaid")
    orphan = bool(ledger.status()["reserved"]) and not rig.entered
    rig.runs["orphans"] += orphan
    rig.runs["charged"] += charged > 0
    _reconcile(rig, settle=rig.fresh)
    if ledger.status()["reserved"] or meter.snapshot()["in_flight"]:
        errs.append(f"P1 reservation leaked past the reconciler: {ledger.status()['reserved']}")
    if rig.fresh:
        settles = p.fac.calls["settle"] - settles0
        settled = p.paid - paid0
        if len(ledger):
            errs.append(f"P4 {len(ledger)} session(s) still open after the reconciler")
        if settles > 1:
            errs.append(f"P4 the session was settled {settles} times")
        if settled != ledger.total_charged - charged0:
            errs.append(f"P4 settled {settled} != charged {ledger.total_charged - charged0}")
        if (settles == 1) != (charged > 0):
            errs.append(f"P4 settle calls {settles} for a charge of {charged}")
    return errs


def paid_sweep(rig: PaidRig, monkeypatch: pytest.MonkeyPatch, seeds: int) -> tuple[cs.Sweep, float]:
    real = cs.run_case

    def run_case(r: cs.Rig, k: int) -> cs.RunResult:
        assert isinstance(r, PaidRig)
        res = real(r, k)
        res.violations += check_payment(r, res)
        return res

    monkeypatch.setattr(cs, "run_case", run_case)
    t0 = time.perf_counter()
    return cs.sweep(rig, seeds=seeds), time.perf_counter() - t0


PAID_VARIANTS = {
    "fresh_stream": (True, True, 2),
    "fresh_nonstream": (False, True, 2),
    "session_stream": (True, False, 3),
    "session_nonstream": (False, False, 3),
}


@pytest.mark.parametrize("variant", list(PAID_VARIANTS))
def test_paid_cancel_at_every_checkpoint(
    enclave_key: EnclaveKey, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    stream, fresh, seeds = PAID_VARIANTS[variant]
    rig = build_paid_rig(enclave_key, stream=stream, fresh=fresh)
    p = rig.p
    settled_before = p.paid
    result, wall = paid_sweep(rig, monkeypatch, seeds)
    print(f"\npaid sweep {variant}: {result.report()} {dict(rig.runs)} wall={wall:.2f}s")
    assert len(result.completed_at) == seeds, result.report()
    assert result.cases > 3 * seeds, "the sweep did not cancel anything"
    assert not result.violations, result.report()
    assert rig.runs["charged"] >= seeds  # at least the uncancelled runs were billed
    assert p.meter.duplicates == 0 and p.meter.errors == 0
    if fresh:
        assert p.fac.calls["settle"] == len(p.fac.landed) == rig.runs["charged"]
    else:  # one session, all runs: settled once, for everything charged on it
        assert p.fac.calls["verify"] == 1 and p.fac.calls["settle"] == 0
        owed = p.ledger.total_charged
        trio.run(p.gate.shutdown)
        assert p.fac.calls["settle"] == 1
        assert p.paid - settled_before == owed == p.ledger.total_settled > 0


class DoubleChargeMeter(SettlingMeter):
    """BUG: a client that left mid-answer is billed the prompt again on top of the record's
    cost (a second charge on the session). Invisible without cancellation."""

    async def _finish(self, record: RequestRecord) -> None:
        pending = self._pending.get(record.request_id)
        await super()._finish(record)
        gone = record.outcome == Outcome.CLIENT_GONE
        if pending is not None and gone and record.delivered_events:
            sid = pending.reservation.session_id
            s = self.ledger.get(sid)
            assert s is not None
            r = await self.ledger.reserve(sid, s.payer, 0)
            await self.ledger.commit(r, 10**9)


class LeakyMeter(SettlingMeter):
    """BUG: a request the client left before anything was delivered "costs nothing", so the
    meter forgets it - without releasing its reservation."""

    async def _finish(self, record: RequestRecord) -> None:
        rid = record.request_id
        gone = record.outcome == Outcome.CLIENT_GONE and not record.delivered_events
        if gone and self._pending.pop(rid, None) is not None:
            self._registered_at.pop(rid, None)
            return
        await super()._finish(record)


@pytest.mark.parametrize(
    ("meter_cls", "invariant"), [(DoubleChargeMeter, "P2"), (LeakyMeter, "P1")]
)
def test_paid_sweep_catches_planted_bugs(
    enclave_key: EnclaveKey,
    monkeypatch: pytest.MonkeyPatch,
    meter_cls: type[SettlingMeter],
    invariant: str,
) -> None:
    rig = build_paid_rig(enclave_key, stream=True, fresh=False, meter_cls=meter_cls)
    result, _ = paid_sweep(rig, monkeypatch, seeds=1)
    print(f"\nplanted {meter_cls.__name__}: {result.report()}")
    assert any(v.startswith(invariant) for v in result.violations), result.report()
    assert len(result.completed_at) == 1  # and the uncancelled run itself passes


# --- end-to-end gaps (in-process ASGI driver, virtual time) ------------------------------------


def body_steps(prompt_tokens: int, completion_tokens: int, text: str = cs.TEXT) -> list[Any]:
    body = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return [json.dumps(body).encode()]


def chat(stream: bool = False, max_tokens: int = 16) -> dict[str, Any]:
    return {
        "model": MODEL,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "tell me about trio"}],
    }


async def started(key: EnclaveKey, clock: trio.testing.MockClock, **kw: Any) -> Paid:
    upstream = ScriptedUpstream(body_steps(**USAGE), content_type="application/json")
    p = build_paid(key, upstream, **kw)
    await p.setup()  # its thread hop runs on the frozen clock, then time jumps
    clock.autojump_threshold = 0
    return p


async def post(p: Paid, body: dict[str, Any], headers: dict[str, str], **kw: Any) -> ASGIResult:
    return await ASGIClient(create_app(p.state)).request(
        "POST", PATH, body=body, headers=headers, **kw
    )


def _permit_deadline(signature: str) -> int:
    payload = decode_payment_signature_header(signature)
    return int(payload.payload["permit2Authorization"]["deadline"])


async def test_cap_saturation_settles_the_cap_then_402(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    probe = build_paid(enclave_key, ScriptedUpstream([]))
    size = len(chat_request_bytes(chat(max_tokens=5)))
    first = probe.cost(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    worst = worst_case_cost(probe.model, math.ceil(size / 4), 5, PRICE)
    cap = first + worst + 1  # room for the second request's worst case, not its actual cost
    p = await started(enclave_key, mock_clock, cap=cap)

    sig = await p.sign()
    r = await post(p, chat(max_tokens=5), {PAYMENT_SIGNATURE: sig})
    assert r.status == 200, r.body[:300]
    sid = r.header(SESSION_HEADER)
    assert sid and p.ledger.total_charged == first
    # the provider reports far more prompt tokens than the byte estimate: cost > remaining
    p.upstream.steps = body_steps(100_000, 4)
    r = await post(p, chat(max_tokens=5), {SESSION_HEADER: sid})
    assert r.status == 200 and "tee_signature" in r.json()  # delivered: it must be paid
    assert p.ledger.saturations == 1
    assert p.ledger.total_charged == cap  # saturated at the cap, never beyond
    s = p.ledger.get(sid)
    assert s is not None and s.exhausted and s.charged == cap and s.held == 0
    upstream_calls = len(p.upstream.log.requests)
    # the next request is refused with a fresh challenge, by session or by the same permit
    for headers in ({SESSION_HEADER: sid}, {PAYMENT_SIGNATURE: sig}):
        r = await post(p, chat(max_tokens=5), headers)
        assert r.status == 402 and r.header("PAYMENT-REQUIRED"), r.body[:200]
        assert "tee_signature" not in r.body.decode()
    assert len(p.upstream.log.requests) == upstream_calls  # never served free
    assert p.ledger.total_charged == cap
    # the exhausted session is due at once: settled for exactly the cap, once
    await p.gate.settle_due()
    await p.gate.settle_due()
    assert p.paid == cap and p.fac.calls["settle"] == 1 and p.ledger.total_settled == cap
    assert p.ledger.state_of(sid) is State.SETTLED
    r = await post(p, chat(max_tokens=5), {SESSION_HEADER: sid})
    assert r.status == 402
    # a re-signed permit opens a new session
    p.upstream.steps = body_steps(**USAGE)
    r = await post(p, chat(max_tokens=5), {PAYMENT_SIGNATURE: await p.sign()})
    assert r.status == 200 and r.header(SESSION_HEADER) != sid


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nonstream"])
@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "not_accepted"])
async def test_disconnect_before_first_token(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock, stream: bool, accepted: bool
) -> None:
    p = await started(enclave_key, mock_clock)
    if stream:
        chunks = oai_text_stream(cs.WORDS, usage=USAGE)
        p.upstream.steps = [30.0, *chunks]  # the head at once, the first token after 30 s
        p.upstream.content_type = "text/event-stream"
    else:
        p.upstream.steps = [30.0, *body_steps(**USAGE)]
    if not accepted:
        p.upstream.head = HANG  # the provider never answers the request
    body = chat(stream=stream)
    gone = trio.Event()
    res = ASGIResult()
    async with trio.open_nursery() as nursery:
        sig = await p.sign()

        async def request() -> None:
            await post(p, body, {PAYMENT_SIGNATURE: sig}, disconnect=gone, result=res)

        nursery.start_soon(request)
        await trio.sleep(5.0)  # verified, reserved, upstream called; no token yet
        assert p.ledger.status()["reserved"] > 0
        gone.set()
    assert "data: {" not in res.body.decode() and "tee_signature" not in res.body.decode()
    (rec,) = p.inner.calls
    assert rec.outcome == Outcome.CLIENT_GONE and rec.delivered_events == 0
    assert p.upstream.log.head_cancelled == (0 if accepted else 1)
    size = len(chat_request_bytes(body))
    want = p.cost(math.ceil(size / 4), 0) if accepted else 0
    assert p.meter.charged(rec.request_id) == want == p.ledger.total_charged
    assert (want > 0) == accepted
    assert p.ledger.status()["reserved"] == 0
    assert p.meter.charged_requests == 1 and p.meter.duplicates == 0
    p.clock.offset += p.ledger.idle_timeout + 1
    await p.gate.settle_due()
    await p.gate.settle_due()
    assert p.paid == want and p.fac.calls["settle"] == (1 if accepted else 0)
    assert len(p.ledger) == 0


async def _one_paid_request(p: Paid) -> int:
    r = await post(p, chat(), {PAYMENT_SIGNATURE: await p.sign()})
    assert r.status == 200, r.body[:300]
    cost = p.cost(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert p.ledger.total_charged == cost
    return cost


async def test_reconciler_cancelled_with_a_settle_in_flight(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    p = await started(enclave_key, mock_clock)
    owed = await _one_paid_request(p)
    p.fac.rtt = 2.0  # the settle round trip
    p.clock.offset += p.ledger.idle_timeout + 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.gate.reconcile)
        await p.fac.settle_started.wait()
        nursery.cancel_scope.cancel()  # shutdown / disconnect while the settle is in flight
    assert p.fac.landed == [owed] and p.paid == owed
    assert p.ledger.total_settled == owed and len(p.ledger) == 0
    # later rounds and the shutdown settle nothing again
    await p.gate.settle_due()
    await p.gate.shutdown()
    assert p.fac.calls["settle"] == 1 and p.paid == owed


async def test_shutdown_during_an_in_flight_settle_does_not_settle_twice(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    p = await started(enclave_key, mock_clock)
    owed = await _one_paid_request(p)
    p.fac.rtt = 2.0
    p.clock.offset += p.ledger.idle_timeout + 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.gate.settle_due)
        await p.fac.settle_started.wait()
        await p.gate.shutdown()  # the claimed session is not handed out again
    assert p.fac.calls["settle"] == 1 and p.fac.landed == [owed]
    assert p.paid == owed == p.ledger.total_settled and len(p.ledger) == 0


async def test_settle_answer_lost_is_neither_lost_nor_settled_twice(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    """The transfer lands but its answer outlives the settle deadline (the connection dropped
    during settlement): the debt stays owed, the retry finds it spent, the session is final."""
    p = await started(enclave_key, mock_clock, settle_timeout=5.0)
    owed = await _one_paid_request(p)
    p.fac.answer_delay = 60.0
    p.clock.offset += p.ledger.idle_timeout + 1
    await p.gate.settle_due()  # timed out: not confirmed, so still owed
    assert p.fac.landed == [owed] and p.paid == owed
    assert p.ledger.status()["unsettled"] == owed and p.ledger.total_settled == 0
    assert p.gate.status()["facilitator"]["settle_failures"] == 1
    p.fac.answer_delay = 0.0
    for _ in range(3):
        await p.gate.settle_due()
        if not len(p.ledger):
            break
    assert len(p.ledger) == 0, f"the spent permit is retried forever: {p.gate.last_settle_error}"
    assert p.fac.landed == [owed] and p.paid == owed  # one transfer
    assert p.ledger.total_settled == owed and p.ledger.total_lost == 0
    assert p.fac.calls["settle"] >= 2  # the retry ran, and found the permit spent
    calls = p.fac.calls["settle"]
    await p.gate.settle_due()
    assert p.fac.calls["settle"] == calls


async def test_permit_spent_elsewhere_is_not_counted_settled(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    """The payer spends the permit's nonce before we settle: no settle of ours may have landed,
    so "nonce already used" must not mark the debt paid (it stays owed, then is counted lost)."""
    p = await started(enclave_key, mock_clock)
    sig = await p.sign()
    owed = await _one_paid_request_with(p, sig)
    auth = decode_payment_signature_header(sig).payload["permit2Authorization"]
    p.chain.used_nonces.add((to_checksum_address(auth["from"]), int(auth["nonce"])))
    p.clock.offset += p.ledger.idle_timeout + 1
    await p.gate.settle_due()
    await p.gate.settle_due()
    assert p.fac.landed == [] and p.paid == 0
    assert p.ledger.total_settled == 0 and p.ledger.status()["unsettled"] == owed
    assert p.gate.status()["facilitator"]["settle_failures"] >= 1


async def test_permit_deadline_margins(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    p = await started(enclave_key, mock_clock)
    led = p.ledger
    sig = await p.sign()
    deadline = _permit_deadline(sig)
    at = lambda t: setattr(p.clock, "offset", t - time.time())  # noqa: E731

    # a permit already within the serve margin: refused with 402, the client must re-sign
    at(deadline - led.serve_margin + 1)
    r = await post(p, chat(), {PAYMENT_SIGNATURE: sig})
    assert r.status == 402 and r.header("PAYMENT-REQUIRED")
    assert "expire" in r.json()["error"]["message"]
    assert led.open_sessions == 0 and not p.upstream.log.requests

    # just outside the serve margin: served
    at(deadline - led.serve_margin - 1)
    r = await post(p, chat(), {PAYMENT_SIGNATURE: sig})
    assert r.status == 200, r.body[:300]
    sid = r.header(SESSION_HEADER)
    owed = led.total_charged
    assert sid and owed > 0

    # the open session crosses into the serve margin: 402 with a challenge, nothing served
    at(deadline - led.serve_margin + 1)
    served = len(p.upstream.log.requests)
    for headers in ({SESSION_HEADER: sid}, {PAYMENT_SIGNATURE: sig}):
        r = await post(p, chat(), headers)
        assert r.status == 402 and r.header("PAYMENT-REQUIRED"), r.body[:200]
    assert len(p.upstream.log.requests) == served and led.total_charged == owed
    await p.gate.settle_due()  # not due yet (neither idle nor within the settle margin)
    assert p.fac.calls["settle"] == 0 and led.status()["unsettled"] == owed

    # within the settle margin: settled, for exactly what was charged, once
    at(deadline - led.settle_margin + 1)
    await p.gate.settle_due()
    await p.gate.settle_due()
    assert p.fac.calls["settle"] == 1 and p.paid == owed == led.total_settled
    assert led.state_of(sid) is State.SETTLED and led.total_lost == 0


async def test_unsettled_session_past_the_abandon_margin_is_counted_lost(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The facilitator down through the whole settle window: the debt is counted lost (and
    logged CRITICAL, with the session's fingerprint, never its id: a bearer secret), never
    settled late or twice."""
    p = await started(enclave_key, mock_clock)
    sig = await p.sign()
    deadline = _permit_deadline(sig)
    owed = await _one_paid_request_with(p, sig)
    (sid,) = list(p.gate._permits)

    async def down(payload: Any, requirements: Any) -> Any:
        p.fac.calls["settle"] += 1
        raise httpx.ConnectError("facilitator down")

    p.fac.settle = down  # type: ignore[method-assign]
    p.clock.offset = deadline - p.ledger.settle_margin + 1 - time.time()
    await p.gate.settle_due()
    assert p.ledger.status()["unsettled"] == owed and p.paid == 0
    p.clock.offset = deadline - p.ledger.abandon_margin + 1 - time.time()
    await p.gate.settle_due()
    assert p.ledger.total_lost == owed and p.ledger.abandoned == 1 and len(p.ledger) == 0
    assert p.paid == 0
    assert "abandoned" in caplog.text and sid not in caplog.text  # SECURITY F6


async def _one_paid_request_with(p: Paid, sig: str) -> int:
    r = await post(p, chat(), {PAYMENT_SIGNATURE: sig})
    assert r.status == 200, r.body[:300]
    return p.ledger.total_charged


async def test_shutdown_settlement_is_bounded_in_all(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """SECURITY F4: each settle is shielded with its own deadline, so the shutdown's overall
    bound used to be ignored (3 sessions x 5 s settle deadline = 15 s against a 2 s bound).
    Now every settle is bounded by what is left of the shutdown's time, and what is left
    unsettled is logged CRITICAL with its amount."""
    import dataclasses

    p = await started(enclave_key, mock_clock, settle_timeout=5.0)
    p.gate.settings = dataclasses.replace(p.gate.settings, shutdown_timeout=2.0)
    for _ in range(3):  # three permits, three sessions
        r = await post(p, chat(), {PAYMENT_SIGNATURE: await p.sign()})
        assert r.status == 200, r.body[:300]
    assert p.ledger.status()["open_sessions"] == 3
    p.fac.rtt = 10.0  # a facilitator that takes 10 s per settle
    t0 = trio.current_time()
    await p.gate.shutdown()
    took = trio.current_time() - t0
    assert took == pytest.approx(2.0, abs=0.05), f"shutdown took {took:.2f} s"
    assert p.fac.landed == [] and p.paid == 0
    assert "shutdown: 3 of 3 payment sessions unsettled" in caplog.text  # every one (F17)


async def test_cancelled_reconciler_round_stops_between_settles(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    """SECURITY F16: a round that claimed several sessions used to run every (shielded) settle
    after being cancelled, N x the settle time, past the service host's wait. Now it stops
    after the one in flight and hands the rest back; the shutdown settles them."""
    p = await started(enclave_key, mock_clock, settle_timeout=5.0)
    owed = 0
    for _ in range(3):
        r = await post(p, chat(), {PAYMENT_SIGNATURE: await p.sign()})
        assert r.status == 200, r.body[:300]
    owed = p.ledger.total_charged
    p.fac.rtt = 2.0
    p.clock.offset += p.ledger.idle_timeout + 1
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.gate.settle_due)
        await p.fac.settle_started.wait()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.1)  # the settle in flight only
    assert len(p.fac.landed) == 1
    await p.gate.shutdown()
    assert len(p.fac.landed) == 3 and p.paid == owed == p.ledger.total_settled


async def test_client_leaving_before_the_relay_starts_frees_the_reservation_at_once(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    """Found by the soak under a slowed gateway: a client that leaves after admission but while
    Quart is still finishing the response object (before the relay runs) left its reservation
    held until the orphan reaper, 20 minutes later, and the payer's budget with it. Now the end
    of the request frees it at once (relay.asgi.ADMITTED)."""
    from tests.asgi import Disconnect

    p = await started(enclave_key, mock_clock)
    app = create_app(p.state)
    bye = Disconnect()
    in_hook = trio.Event()

    @app.after_request
    async def slow_finish(response: Any) -> Any:  # where Quart awaits after the route returned
        in_hook.set()
        await trio.sleep(10)
        return response

    sig = await p.sign()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: ASGIClient(app).request(
                "POST", PATH, body=chat(), headers={PAYMENT_SIGNATURE: sig}, disconnect=bye
            )
        )
        await in_hook.wait()
        assert p.ledger.status()["reserved"] > 0  # admitted: the worst case is held
        bye.set()
    assert p.ledger.status()["reserved"] == 0, "the reservation outlived the request"
    assert p.meter.snapshot()["in_flight"] == 0
    assert p.ledger.total_charged == 0 and p.upstream.log.requests == []


async def test_ledger_commit_completes_even_past_the_hook_deadline(
    enclave_key: EnclaveKey, mock_clock: trio.testing.MockClock
) -> None:
    """Found by the soak with an overloaded gateway ("metering hook overran its deadline"): the
    meter had already taken the request off its books when the relay's hook deadline (settle,
    10 s) cut the ledger commit while it waited for the ledger's lock, so the reservation stayed
    held for good and the request was never billed. The commit is now shielded (the ledger
    never awaits under its lock, so only CPU contention can delay it)."""
    upstream = ScriptedUpstream([1.0, *body_steps(**USAGE)], content_type="application/json")
    p = build_paid(enclave_key, upstream)
    await p.setup()
    mock_clock.autojump_threshold = 0
    sig = await p.sign()
    results: list[ASGIResult] = []

    async def hog_the_ledger() -> None:
        await trio.sleep(0.5)  # after admission, before the relay's hook
        async with p.ledger.lock:
            await trio.sleep(15.0)  # longer than the hook's 10 s deadline

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hog_the_ledger)
        results.append(await post(p, chat(), {PAYMENT_SIGNATURE: sig}))
    assert results[0].status == 200
    assert p.ledger.status()["reserved"] == 0, "the reservation stayed held"
    want = p.cost(USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert p.ledger.total_charged == want > 0 and p.meter.charged_requests == 1
