"""The settling meter: a finished RequestRecord becomes exactly one charge on its reservation."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio

from trio_gateway.payments.ledger import SessionLedger
from trio_gateway.payments.meter import SettlingMeter
from trio_gateway.payments.pricing import cost_units, worst_case_cost
from trio_gateway.providers.base import ModelInfo
from trio_gateway.providers.registry import ModelRegistry
from trio_gateway.relay.events import UsageReport
from trio_gateway.relay.metering import Outcome, RequestRecord, UsageLog

PROVIDERS = {"openai", "anthropic", "google", "xai", "bytedance", "nous", "mock"}
REGISTRY = ModelRegistry.load_default(providers=PROVIDERS, dev=True)
PAYER = "0x00000000000000000000000000000000000000aa"
PRICE = Decimal("0.5")
CAP = 10**18  # 1 OPG


def model(name: str) -> ModelInfo:
    info = REGISTRY.resolve(name)
    assert info is not None
    return info


class Fixture:
    def __init__(self, inner: UsageLog | None = None) -> None:
        self.ledger = SessionLedger(clock=lambda: 1_800_000_000.0)
        self.meter = SettlingMeter(self.ledger, inner=inner)

    async def admit(
        self, rid: str, name: str = "gpt-4.1", size: int = 4000, max_tokens: int = 1000
    ) -> int:
        if self.ledger.get("s") is None:
            await self.ledger.open_session("s", PAYER, CAP, 1_800_003_600.0)
        m = model(name)
        worst = worst_case_cost(m, -(-size // 4), max_tokens, PRICE)
        r = await self.ledger.reserve("s", PAYER, worst)
        self.meter.register(rid, r, m, size, PRICE)
        return worst

    @property
    def charged(self) -> int:
        s = self.ledger.get("s")
        assert s is not None
        return s.charged


def record(rid: str, outcome: Outcome, name: str = "gpt-4.1", **kw: object) -> RequestRecord:
    r = RequestRecord(rid, name, "openai", True, 0.0, outcome=outcome)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


async def test_usage_present_is_charged_at_the_quoted_price() -> None:
    f = Fixture()
    await f.admit("r1")
    await f.meter.finish(record("r1", Outcome.COMPLETE, usage=UsageReport(1000, 500)))
    assert f.charged == 12_000_000_000_000_000 == f.meter.charged("r1")  # the §10.3 example
    s = f.ledger.get("s")
    assert s is not None and (s.held, s.in_flight) == (0, 0)


async def test_disconnect_without_usage_is_charged_the_estimate() -> None:
    f = Fixture()
    await f.admit("r1", size=2000)
    rec = record(
        "r1", Outcome.CLIENT_GONE, upstream_status=200, delivered_events=30, delivered_chars=200
    )
    await f.meter.finish(rec)
    # prompt ceil(2000/4)=500, completion max(30, ceil(200/4)=50)=50
    assert f.charged == cost_units(model("gpt-4.1"), 500, 50, PRICE) > 0
    assert f.meter.estimated_requests == 1


async def test_images_are_charged_per_image() -> None:
    f = Fixture()
    await f.admit("r1", name="gemini-2.5-flash-image", size=40, max_tokens=100)
    rec = record(
        "r1", Outcome.COMPLETE, name="gemini-2.5-flash-image", usage=UsageReport(10, 20), images=1
    )
    await f.meter.finish(rec)
    m = model("gemini-2.5-flash-image")
    assert f.charged == cost_units(m, 10, 20, PRICE, images=1)
    assert f.charged > cost_units(m, 10, 20, PRICE) + 7 * 10**16  # $0.039 / $0.5


async def test_double_finish_is_charged_once() -> None:
    usage_log = UsageLog()
    f = Fixture(inner=usage_log)
    await f.admit("r1")
    rec = record("r1", Outcome.COMPLETE, usage=UsageReport(100, 50))
    await f.meter.finish(rec)
    first = f.charged
    await f.meter.finish(rec)
    assert f.charged == first > 0
    assert f.meter.duplicates == 1
    assert f.meter.charged_requests == 1
    assert usage_log.prompt_tokens == 100  # the inner meter is fed (and dedupes) too


async def test_concurrent_finishes_charge_once() -> None:
    f = Fixture()
    await f.admit("r1")
    rec = record("r1", Outcome.COMPLETE, usage=UsageReport(100, 50))
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(f.meter.finish, rec)
    assert f.charged == cost_units(model("gpt-4.1"), 100, 50, PRICE)
    assert f.meter.duplicates == 9


async def test_unregistered_requests_are_counted_not_charged() -> None:
    f = Fixture()
    await f.meter.finish(record("free", Outcome.COMPLETE, usage=UsageReport(1, 1)))
    assert f.meter.unmetered == 1
    assert f.meter.charged_total == 0


async def test_unpriceable_record_is_charged_the_reservation_never_free() -> None:
    f = Fixture()
    worst = await f.admit("r1")
    rec = record("r1", Outcome.COMPLETE, usage=UsageReport(100, 50), images=1)  # no image price
    await f.meter.finish(rec)  # must not raise
    assert f.charged == worst
    assert f.meter.errors == 1


async def test_finish_never_raises_even_if_the_ledger_does() -> None:
    f = Fixture()
    await f.admit("r1")

    async def broken(*args: object) -> None:
        raise RuntimeError("ledger down")

    f.ledger.commit = broken  # type: ignore[assignment, method-assign]
    await f.meter.finish(record("r1", Outcome.COMPLETE, usage=UsageReport(1, 1)))
    assert f.meter.errors == 1


async def test_abandon_releases_and_register_validates() -> None:
    f = Fixture()
    await f.admit("r1")
    await f.meter.abandon("r1")
    s = f.ledger.get("s")
    assert s is not None and (s.held, s.in_flight, s.charged) == (0, 0, 0)
    await f.admit("r2")
    r = await f.ledger.reserve("s", PAYER, 1)
    with pytest.raises(ValueError, match="already metered"):
        f.meter.register("r2", r, model("gpt-4.1"), 1, PRICE)
    with pytest.raises(ValueError):
        f.meter.register("r3", r, model("gpt-4.1"), 1, Decimal(0))


async def test_finish_runs_in_a_cancelled_shielded_scope() -> None:
    """The relay calls finish from a ``finally`` after the client is gone."""
    f = Fixture()
    await f.admit("r1")
    rec = record("r1", Outcome.CLIENT_GONE, upstream_status=200, delivered_events=4)
    with trio.CancelScope() as outer:
        outer.cancel()
        with trio.move_on_after(5, shield=True):
            await f.meter.finish(rec)
    assert f.charged == cost_units(model("gpt-4.1"), 1000, 4, PRICE)
