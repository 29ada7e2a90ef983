"""The session ledger: reservations, refusal, saturation, deadline margins, settlement
bookkeeping, bounded memory, concurrency under trio, and a Hypothesis model check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gateway.payments.ledger import (
    DueSettlement,
    InsufficientBudget,
    LedgerFull,
    PayerLimit,
    PayerMismatch,
    Reservation,
    SessionClosed,
    SessionConflict,
    SessionExpiring,
    SessionLedger,
    State,
    UnknownSession,
)

PAYER = "0xAbC0000000000000000000000000000000000001"
OTHER = "0x0000000000000000000000000000000000000002"
T0 = 1_800_000_000.0
HOUR = 3600.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None, **kw: float) -> tuple[SessionLedger, Clock]:
    c = clock or Clock()
    return SessionLedger(clock=c, **kw), c  # type: ignore[arg-type]


async def opened(cap: int = 1000, deadline: float = T0 + HOUR) -> SessionLedger:
    ledger, _ = make()
    await ledger.open_session("s1", PAYER, cap, deadline)
    return ledger


# -- reserve / commit / release -----------------------------------------------------------------


async def test_commit_charges_actual_and_frees_the_rest() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 600)
    s = ledger.get("s1")
    assert s is not None
    assert (s.held, s.remaining, s.in_flight) == (600, 400, 1)
    charge = await ledger.commit(r, 250)
    assert (charge.amount, charge.saturated, charge.duplicate) == (250, False, False)
    assert (s.charged, s.held, s.remaining, s.in_flight) == (250, 0, 750, 0)


async def test_release_frees_everything_and_is_idempotent() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 600)
    await ledger.release(r)
    await ledger.release(r)
    s = ledger.get("s1")
    assert s is not None
    assert (s.charged, s.held, s.in_flight) == (0, 0, 0)
    again = await ledger.commit(r, 100)  # a released reservation charges nothing
    assert again.duplicate and again.amount == 0
    assert s.charged == 0


async def test_double_commit_charges_once() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 500)
    await ledger.commit(r, 300)
    second = await ledger.commit(r, 300)
    assert second.duplicate and second.amount == 300
    s = ledger.get("s1")
    assert s is not None and s.charged == 300
    assert ledger.duplicate_commits == 1


async def test_context_manager_releases_unless_committed() -> None:
    ledger = await opened(1000)
    async with ledger.reserve("s1", PAYER, 400) as r:
        assert ledger.get("s1").held == 400  # type: ignore[union-attr]
    assert r.released and ledger.get("s1").held == 0  # type: ignore[union-attr]
    async with ledger.reserve("s1", PAYER, 400) as r2:
        await ledger.commit(r2, 123)
    s = ledger.get("s1")
    assert s is not None and (s.charged, s.held, s.in_flight) == (123, 0, 0)


async def test_context_manager_releases_even_when_cancelled() -> None:
    ledger = await opened(1000)
    with trio.CancelScope() as scope:
        async with ledger.reserve("s1", PAYER, 400):
            scope.cancel()
            await trio.sleep(1)
    assert scope.cancelled_caught
    s = ledger.get("s1")
    assert s is not None and (s.held, s.in_flight) == (0, 0)


async def test_refuses_when_remaining_cannot_cover_the_worst_case() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 700)
    with pytest.raises(InsufficientBudget) as info:
        await ledger.reserve("s1", PAYER, 301)
    assert (info.value.remaining, info.value.needed) == (300, 301)
    await ledger.reserve("s1", PAYER, 300)  # exactly the remainder is fine
    await ledger.commit(r, 700)
    with pytest.raises(InsufficientBudget):
        await ledger.reserve("s1", PAYER, 1)
    assert ledger.refusals == 2


async def test_payer_binding_and_unknown_sessions() -> None:
    ledger = await opened(1000)
    await ledger.reserve("s1", PAYER.lower(), 1)  # addresses compare case-insensitively
    with pytest.raises(PayerMismatch):
        await ledger.reserve("s1", OTHER, 1)
    with pytest.raises(UnknownSession):
        await ledger.reserve("nope", PAYER, 1)


async def test_open_is_idempotent_for_the_same_terms_only() -> None:
    ledger = await opened(1000)
    s = await ledger.open_session("s1", PAYER.upper().replace("0X", "0x"), 1000, T0 + HOUR)
    assert s is ledger.get("s1")
    with pytest.raises(SessionConflict):
        await ledger.open_session("s1", PAYER, 999, T0 + HOUR)
    with pytest.raises(SessionConflict):
        await ledger.open_session("s1", OTHER, 1000, T0 + HOUR)


async def test_amounts_must_be_ints() -> None:
    ledger = await opened(1000)
    with pytest.raises(TypeError):
        await ledger.reserve("s1", PAYER, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await ledger.open_session("s2", PAYER, True, T0 + HOUR)
    with pytest.raises(ValueError):
        await ledger.reserve("s1", PAYER, -1)
    r = await ledger.reserve("s1", PAYER, 10)
    assert (await ledger.commit(r, -5)).amount == 0  # negatives clamp


# -- saturation -----------------------------------------------------------------------------------


async def test_overrun_within_headroom_is_charged_in_full() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 100)
    charge = await ledger.commit(r, 300)  # the estimate was low: still billed, from headroom
    assert (charge.amount, charge.saturated) == (300, False)
    s = ledger.get("s1")
    assert s is not None and not s.exhausted


async def test_a_charge_crossing_the_cap_saturates_and_is_due() -> None:
    ledger = await opened(1000)
    a = await ledger.reserve("s1", PAYER, 500)
    b = await ledger.reserve("s1", PAYER, 200)
    charge = await ledger.commit(a, 900)  # headroom is 1000 - 200 held by b
    assert (charge.amount, charge.requested, charge.saturated) == (800, 900, True)
    s = ledger.get("s1")
    assert s is not None and s.exhausted and s.charged == 800
    with pytest.raises(SessionClosed):  # exhausted: no more serving
        await ledger.reserve("s1", PAYER, 0)
    assert await ledger.due_for_settlement() == []  # b still in flight
    await ledger.commit(b, 200)
    assert s.charged == 1000
    due = await ledger.due_for_settlement()
    assert due == [DueSettlement("s1", PAYER.lower(), 1000, "exhausted", T0 + HOUR)]
    assert ledger.saturations == 1


async def test_reaching_the_cap_exactly_exhausts() -> None:
    ledger = await opened(1000)
    r = await ledger.reserve("s1", PAYER, 1000)
    await ledger.commit(r, 1000)
    due = await ledger.due_for_settlement()
    assert [d.reason for d in due] == ["exhausted"]


# -- deadline margins, idle, zero-cost ------------------------------------------------------------


async def test_serve_margin_refuses_new_reservations() -> None:
    ledger, clock = make()
    await ledger.open_session("s1", PAYER, 1000, T0 + 1000)
    clock.now = T0 + 1000 - 421
    r = await ledger.reserve("s1", PAYER, 10)
    clock.now = T0 + 1000 - 420
    with pytest.raises(SessionExpiring):
        await ledger.reserve("s1", PAYER, 10)
    await ledger.commit(r, 5)  # a request admitted in time still commits
    assert ledger.get("s1").charged == 5  # type: ignore[union-attr]
    assert await ledger.due_for_settlement() == []  # not yet within the settle margin


async def test_opening_within_the_serve_margin_is_refused() -> None:
    ledger, _ = make()
    with pytest.raises(SessionExpiring):
        await ledger.open_session("s1", PAYER, 1000, T0 + 420)


async def test_settle_margin_makes_a_session_due_even_with_requests_in_flight() -> None:
    ledger, clock = make()
    await ledger.open_session("s1", PAYER, 1000, T0 + 1000)
    r1 = await ledger.reserve("s1", PAYER, 100)
    await ledger.commit(r1, 40)
    r2 = await ledger.reserve("s1", PAYER, 100)  # a long stream
    clock.now = T0 + 1000 - 121
    assert await ledger.due_for_settlement() == []
    clock.now = T0 + 1000 - 120
    due = await ledger.due_for_settlement()
    assert [(d.session_id, d.amount, d.reason) for d in due] == [("s1", 40, "deadline")]
    late = await ledger.commit(r2, 60)  # too late: counted, not billed
    assert late.late and late.amount == 0
    assert ledger.total_late_unbilled == 60
    assert await ledger.mark_settled("s1", 40) is True


async def test_idle_sessions_are_due_after_the_idle_timeout() -> None:
    ledger, clock = make(idle_timeout=100)
    await ledger.open_session("s1", PAYER, 1000, T0 + HOUR)
    r = await ledger.reserve("s1", PAYER, 100)
    clock.now += 500
    assert await ledger.due_for_settlement() == []  # in flight is not idle
    await ledger.commit(r, 10)
    clock.now += 99
    assert await ledger.due_for_settlement() == []
    clock.now += 1
    due = await ledger.due_for_settlement()
    assert [(d.amount, d.reason) for d in due] == [(10, "idle")]
    assert await ledger.due_for_settlement() == []  # handed out once
    with pytest.raises(SessionClosed):
        await ledger.reserve("s1", PAYER, 1)


async def test_zero_cost_sessions_are_dropped_not_settled() -> None:
    ledger, clock = make(idle_timeout=100)
    await ledger.open_session("s1", PAYER, 1000, T0 + HOUR)
    r = await ledger.reserve("s1", PAYER, 100)
    await ledger.commit(r, 0)  # e.g. an error before anything was delivered
    await ledger.open_session("s2", PAYER, 1000, T0 + HOUR)  # never used
    clock.now += 100
    assert await ledger.due_for_settlement() == []
    assert len(ledger) == 0
    assert ledger.state_of("s1") is State.DROPPED
    assert ledger.dropped == 2
    with pytest.raises(SessionClosed):  # a dropped id is not re-opened
        await ledger.open_session("s1", PAYER, 1000, T0 + HOUR)


async def test_unsettled_sessions_are_abandoned_near_the_deadline() -> None:
    ledger, clock = make()
    await ledger.open_session("s1", PAYER, 1000, T0 + 1000)
    r = await ledger.reserve("s1", PAYER, 100)
    await ledger.commit(r, 70)
    clock.now = T0 + 1000 - 120
    (due,) = await ledger.due_for_settlement()
    assert due.amount == 70
    clock.now = T0 + 1000 - 20
    assert await ledger.due_for_settlement() == []  # claimed: its settle is in flight
    await ledger.settle_failed("s1")
    assert await ledger.due_for_settlement() == []  # within 30 s: abandoned
    assert ledger.state_of("s1") is State.ABANDONED
    assert (ledger.total_lost, ledger.abandoned) == (70, 1)


# -- settlement bookkeeping -----------------------------------------------------------------------


async def test_mark_settled_is_idempotent_and_failures_are_retried() -> None:
    ledger, clock = make(idle_timeout=100)
    await ledger.open_session("s1", PAYER, 1000, T0 + HOUR)
    r = await ledger.reserve("s1", PAYER, 100)
    await ledger.commit(r, 99)
    clock.now += 100
    (due,) = await ledger.due_for_settlement()
    await ledger.settle_failed("s1")  # facilitator down
    (again,) = await ledger.due_for_settlement()
    assert again.amount == due.amount == 99
    assert ledger.get("s1").settle_attempts == 2  # type: ignore[union-attr]
    assert await ledger.mark_settled("s1", 99) is True
    assert await ledger.mark_settled("s1", 99) is False
    assert (ledger.total_settled, ledger.duplicate_settles) == (99, 1)
    assert ledger.state_of("s1") is State.SETTLED
    with pytest.raises(SessionClosed):
        await ledger.reserve("s1", PAYER, 1)
    with pytest.raises(UnknownSession):
        await ledger.mark_settled("never", 1)


async def test_close_all_hands_out_every_debt_and_drops_the_rest() -> None:
    ledger, _ = make()
    for sid, charge in (("a", 5), ("b", 0), ("c", 7)):
        await ledger.open_session(sid, PAYER, 100, T0 + HOUR)
        r = await ledger.reserve(sid, PAYER, 10)
        await ledger.commit(r, charge)
    due = await ledger.close_all()
    assert sorted((d.session_id, d.amount, d.reason) for d in due) == [
        ("a", 5, "shutdown"),
        ("c", 7, "shutdown"),
    ]
    assert ledger.state_of("b") is State.DROPPED


# -- bounded memory -------------------------------------------------------------------------------


async def test_bounded_memory_evicts_oldest_idle_zero_cost_first() -> None:
    ledger, clock = make(max_sessions=3)
    for i, sid in enumerate(("old-paid", "old-free", "busy")):
        clock.now = T0 + i
        await ledger.open_session(sid, PAYER, 100, T0 + HOUR)
    r = await ledger.reserve("old-paid", PAYER, 10)
    await ledger.commit(r, 10)
    await ledger.reserve("busy", PAYER, 10)  # in flight: never evicted
    await ledger.open_session("new1", PAYER, 100, T0 + HOUR)
    assert ledger.state_of("old-free") is State.DROPPED  # zero-cost goes first
    assert ledger.state_of("old-paid") is State.OPEN
    r = await ledger.reserve("new1", PAYER, 10)
    await ledger.commit(r, 1)  # new1 now owes, and is more recently active than old-paid
    await ledger.open_session("new2", PAYER, 100, T0 + HOUR)
    assert ledger.state_of("old-paid") is State.SETTLING  # then the oldest debt, queued
    assert ledger.open_sessions == 3
    due = await ledger.due_for_settlement()
    assert [(d.session_id, d.reason) for d in due] == [("old-paid", "evicted")]


async def test_ledger_full_when_nothing_is_evictable() -> None:
    ledger, _ = make(max_sessions=2)
    for sid in ("a", "b"):
        await ledger.open_session(sid, PAYER, 100, T0 + HOUR)
        await ledger.reserve(sid, PAYER, 1)
    with pytest.raises(LedgerFull):
        await ledger.open_session("c", PAYER, 100, T0 + HOUR)


async def test_tombstones_are_bounded() -> None:
    ledger, clock = make(max_tombstones=5, idle_timeout=1)
    for i in range(20):
        await ledger.open_session(f"s{i}", PAYER, 100, T0 + HOUR)
    clock.now += 1
    await ledger.due_for_settlement()
    assert len(ledger._tombstones) == 5
    assert ledger.state_of("s19") is State.DROPPED
    assert ledger.state_of("s0") is None


# -- concurrency ----------------------------------------------------------------------------------


async def test_many_concurrent_reservations_never_overspend() -> None:
    ledger = await opened(cap=10_000)
    admitted: list[int] = []
    committed: list[int] = []
    refused = 0
    s = ledger.get("s1")
    assert s is not None

    async def request(i: int) -> None:
        nonlocal refused
        worst = 100 + (i % 7) * 50
        try:
            async with ledger.reserve("s1", PAYER, worst) as r:
                admitted.append(worst)
                assert s.charged + s.held <= s.cap  # never promised more than the cap
                await trio.sleep(0.001 * (i % 5))  # the upstream call
                if i % 4:
                    charge = await ledger.commit(r, worst - (i % 3) * 10)
                    committed.append(charge.amount)
        except InsufficientBudget as exc:
            assert exc.needed > exc.remaining
            refused += 1

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(request, i)
    assert s.charged <= s.cap
    assert (s.held, s.in_flight) == (0, 0)
    assert refused > 0 and len(admitted) + refused == 500
    assert s.charged == ledger.total_charged == sum(committed)


# -- property: any sequence of operations -------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 400)),
        st.tuples(st.just("commit"), st.integers(0, 20), st.integers(-50, 800)),
        st.tuples(st.just("release"), st.integers(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1000), ops)
def test_property_cap_is_never_exceeded(cap: int, program: list[tuple[int | str, ...]]) -> None:
    async def main() -> None:
        ledger, _ = make()
        await ledger.open_session("s", PAYER, cap, T0 + HOUR)
        live: list[Reservation] = []
        done: list[Reservation] = []
        for op in program:
            s = ledger.get("s")
            assert s is not None
            if op[0] == "reserve":
                amount = int(op[1])
                before = s.remaining
                try:
                    live.append(await ledger.reserve("s", PAYER, amount))
                    assert amount <= before
                except InsufficientBudget:
                    assert amount > before
                except SessionClosed:
                    assert s.exhausted
            elif op[0] == "commit" and live:
                r = live.pop(int(op[1]) % len(live))
                actual = int(op[2])
                headroom = s.cap - s.charged - s.held + r.amount
                charge = await ledger.commit(r, actual)
                assert 0 <= charge.amount <= max(0, actual)
                if actual <= r.amount:  # within the reservation: charged exactly
                    assert charge.amount == max(0, actual)
                    assert charge.amount <= r.amount
                assert charge.amount <= headroom  # beyond it: only up to the cap (saturation)
                assert charge.saturated == (charge.amount < max(0, actual))
                done.append(r)
            elif op[0] == "release" and live:
                r = live.pop(int(op[1]) % len(live))
                await ledger.release(r)
                done.append(r)
            assert 0 <= s.charged <= s.cap
            assert s.held == sum(r.amount for r in live) >= 0
            assert s.charged + s.held <= s.cap
            assert s.charged == sum(r.charged or 0 for r in done)
            assert s.in_flight == len(live)

    trio.run(main)


async def test_orphaned_reservation_is_released_after_the_relay_could_have_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client that leaves between admission and the response starting never reaches the
    relay, so its metering hook never runs: the reservation is released once it is older than
    any relay can live, and a live one is left alone."""
    from decimal import Decimal

    from trio_gateway.payments.meter import SettlingMeter
    from trio_gateway.providers.base import ModelInfo

    model = ModelInfo("m", "openai", "m", "0.000002", "0.000008")
    ledger = SessionLedger(clock=Clock())
    await ledger.open_session("s", PAYER, 10**18, T0 + HOUR)
    meter = SettlingMeter(ledger)
    meter.register("rid-orphan", await ledger.reserve("s", PAYER, 10**15), model, 100, Decimal(1))
    await trio.sleep(100)
    meter.register("rid-live", await ledger.reserve("s", PAYER, 10**15), model, 100, Decimal(1))
    assert ledger.status()["reserved"] == 2 * 10**15
    assert await meter.reap_orphans(max_age=50) == 1
    assert ledger.status()["reserved"] == 10**15
    assert meter.orphans_reaped == 1
    assert await meter.reap_orphans(max_age=50) == 0


# -- credit per payer (SECURITY F9) ---------------------------------------------------------------


async def test_payer_limit_bounds_credit_across_all_of_a_payers_sessions() -> None:
    """A permit is not escrow: one wallet could sign many permits and run a cap on each. With
    ``payer_limit`` the payer's charged + held across its live sessions stays within it, until
    settlement frees it; other payers are not affected."""
    ledger, clock = make(payer_limit=1000)  # type: ignore[arg-type]
    await ledger.open_session("s1", PAYER, 1000, T0 + HOUR)
    await ledger.open_session("s2", PAYER, 1000, T0 + HOUR)
    await ledger.open_session("o1", OTHER, 1000, T0 + HOUR)
    a = await ledger.reserve("s1", PAYER, 600)
    await ledger.commit(a, 600)
    held = await ledger.reserve("s2", PAYER.upper().replace("0X", "0x"), 300)  # case-blind
    assert ledger.outstanding(PAYER) == 900
    with pytest.raises(PayerLimit) as exc:
        await ledger.reserve("s2", PAYER, 200)  # s2 alone has 700 left, the payer only 100
    assert exc.value.remaining == 100 and ledger.payer_refusals == 1
    assert isinstance(exc.value, InsufficientBudget)  # the gate answers 402 either way
    await ledger.reserve("o1", OTHER, 1000)  # another payer: its own bound
    await ledger.release(held)
    assert ledger.outstanding(PAYER) == 600
    keep = await ledger.reserve("s2", PAYER, 100)  # in flight: s2 is not idle
    # settlement of s1 frees the payer's credit
    clock.now += ledger.idle_timeout + 1
    due = await ledger.due_for_settlement()
    assert [d.session_id for d in due] == ["s1"]
    await ledger.mark_settled("s1", 600)
    assert ledger.outstanding(PAYER) == 100
    await ledger.reserve("s2", PAYER, 800)
    await ledger.open_session("s3", PAYER, 1000, T0 + HOUR)  # a fresh permit does not help
    with pytest.raises(PayerLimit):
        await ledger.reserve("s3", PAYER, 200)
    await ledger.reserve("s3", PAYER, 100)
    await ledger.release(keep)


async def test_no_payer_limit_by_default_in_the_ledger_but_the_gate_sets_the_cap() -> None:
    ledger, _ = make()
    assert ledger.payer_limit is None
    from tests.conftest import make_state
    from trio_gateway.payments.x402_gate import PaymentSettings
    from trio_gateway.signing.keys import EnclaveKey

    state = make_state(EnclaveKey.generate())
    gate = state.build_payment_gate(
        PaymentSettings(facilitator_url="http://f.invalid", pay_to=PAYER, session_cap=12345)
    )
    try:
        assert gate.ledger.payer_limit == 12345
    finally:
        await gate.aclose()
        await gate.feed.client.aclose()
