"""Pricing: the reference's pinned costs (§10.3, §11.3), exact ceiling, worst case, and the
disconnect estimate."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_gateway.payments.pricing import (
    PricingError,
    TokenCounts,
    billable_tokens,
    cost_units,
    estimate_completion_tokens,
    estimate_prompt_tokens,
    record_cost,
    to_units,
    usd_cost,
    worst_case_cost,
)
from trio_gateway.providers.base import ModelInfo
from trio_gateway.providers.registry import ModelRegistry
from trio_gateway.relay.events import UsageReport
from trio_gateway.relay.metering import Outcome, RequestRecord

PROVIDERS = {"openai", "anthropic", "google", "xai", "bytedance", "nous", "mock"}
REGISTRY = ModelRegistry.load_default(providers=PROVIDERS, dev=True)
ONE = Decimal(1)


def model(name: str) -> ModelInfo:
    info = REGISTRY.resolve(name)
    assert info is not None, name
    return info


@pytest.mark.parametrize(
    ("name", "prompt", "completion", "expected"),
    [
        ("gpt-4.1", 1000, 500, 6 * 10**15),
        ("gpt-5-mini", 1000, 500, 125 * 10**13),
        ("claude-sonnet-4-5", 1000, 500, 105 * 10**14),
        ("claude-haiku-4-5", 0, 1, 5 * 10**12),
        ("gemini-2.5-flash-lite", 1, 0, 10**11),
    ],
)
def test_reference_pinned_values_at_one_dollar(
    name: str, prompt: int, completion: int, expected: int
) -> None:
    assert cost_units(model(name), prompt, completion, ONE) == expected


def test_reference_worked_example_at_fifty_cents() -> None:
    half = Decimal("0.5")
    assert cost_units(model("gpt-4.1"), 1000, 500, half) == 12_000_000_000_000_000
    assert cost_units(model("gpt-4.1"), 10, 5, half) == 120_000_000_000_000


def test_lookup_is_case_insensitive_and_by_alias() -> None:
    a = cost_units(model(" GPT-4.1 "), 1000, 500, ONE)
    b = cost_units(model("gpt-4.1-2025-04-14"), 1000, 500, ONE)
    assert a == b == 6 * 10**15


def test_ceiling_rounds_up_to_the_next_unit() -> None:
    # $0.000001 / $3 = 333333333333.33... units -> ceil
    m = model("claude-haiku-4-5")  # input 1e-6
    assert cost_units(m, 1, 0, Decimal(3)) == 333_333_333_334
    assert to_units(Decimal("1e-30"), ONE) == 1  # any positive cost is at least one unit


def test_negatives_clamp_and_zero_is_free() -> None:
    m = model("gpt-4.1")
    assert cost_units(m, -5, -7, ONE) == 0
    assert cost_units(m, 1000, -500, ONE) == cost_units(m, 1000, 0, ONE)
    assert to_units(Decimal(-1), ONE) == 0


@pytest.mark.parametrize("price", [Decimal(0), Decimal(-1), Decimal("NaN"), Decimal("Infinity")])
def test_bad_price_is_refused(price: Decimal) -> None:
    with pytest.raises(PricingError):
        cost_units(model("gpt-4.1"), 1, 1, price)


def test_bad_registry_price_is_refused() -> None:
    bad = ModelInfo("x", "openai", "x", input_usd="abc", output_usd="0.1")
    with pytest.raises(PricingError):
        cost_units(bad, 1, 0, ONE)


def test_images_at_image_usd() -> None:
    m = model("gemini-2.5-flash-image")  # image_usd 0.039
    assert usd_cost(m, 0, 0, images=2) == Decimal("0.078")
    assert cost_units(m, 0, 0, ONE, images=2) == 78 * 10**15
    with pytest.raises(PricingError):  # a chat model has no image price
        cost_units(model("gpt-4.1"), 0, 0, ONE, images=1)


@given(
    st.integers(0, 10**7),
    st.integers(0, 10**7),
    st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(10**6), places=8),
    st.integers(0, 24),
)
def test_units_are_the_exact_rational_ceiling(
    prompt: int, completion: int, price: Decimal, decimals: int
) -> None:
    m = model("gpt-5-mini")
    usd = Fraction(prompt) * Fraction(m.input_usd) + Fraction(completion) * Fraction(m.output_usd)
    exact = math.ceil(usd / Fraction(price) * 10**decimals)
    assert cost_units(m, prompt, completion, price, decimals=decimals) == exact


def test_ceiling_is_exact_beyond_28_significant_digits() -> None:
    # 2.5 / 3 * 10**30 = 833...333.33: a 28-digit context would round up to ...3400
    m = model("gpt-5-mini")
    usd = usd_cost(m, 10_000_000, 0)
    assert usd == Decimal("2.5")
    assert to_units(usd, Decimal(3), decimals=30) == int("8" + "3" * 28 + "4")


def test_worst_case_caps_max_tokens_at_the_model_limit() -> None:
    m = model("gpt-4.1")  # max_output 32768
    assert m.max_output == 32768
    assert worst_case_cost(m, 100, 1000, ONE) == cost_units(m, 100, 1000, ONE)
    assert worst_case_cost(m, 100, None, ONE) == cost_units(m, 100, 32768, ONE)
    assert worst_case_cost(m, 100, 10**9, ONE) == cost_units(m, 100, 32768, ONE)
    unbounded = ModelInfo("u", "openai", "u", input_usd="0.000001", output_usd="0.000001")
    assert worst_case_cost(unbounded, 1, 7, ONE) == cost_units(unbounded, 1, 7, ONE)
    with pytest.raises(PricingError):
        worst_case_cost(unbounded, 1, None, ONE)


def test_worst_case_for_image_models_includes_an_image() -> None:
    m = model("gemini-2.5-flash-image")
    tokens_only = cost_units(m, 10, m.max_output or 0, ONE)
    assert worst_case_cost(m, 10, None, ONE) == tokens_only + 39 * 10**15
    assert worst_case_cost(m, 10, None, ONE, images=0) == tokens_only


# -- the disconnect estimate ------------------------------------------------------------------


def rec(outcome: Outcome, **kw: object) -> RequestRecord:
    r = RequestRecord("rid", "gpt-4.1", "openai", True, 0.0, outcome=outcome)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_estimate_rules() -> None:
    assert estimate_prompt_tokens(0) == 0
    assert estimate_prompt_tokens(1) == 1
    assert estimate_prompt_tokens(401) == 101
    # events dominate for short deltas, chars for long ones
    assert estimate_completion_tokens(10, 12) == 10
    assert estimate_completion_tokens(10, 81) == 21
    assert estimate_completion_tokens(-1, -1) == 0


def test_complete_uses_provider_usage_exactly() -> None:
    r = rec(Outcome.COMPLETE, usage=UsageReport(1000, 500), delivered_events=3, delivered_chars=9)
    assert billable_tokens(r, 99_999) == TokenCounts(1000, 500, 0, estimated=False)


def test_complete_without_usage_is_estimated() -> None:
    r = rec(Outcome.COMPLETE, delivered_events=7, delivered_chars=100, upstream_status=200)
    assert billable_tokens(r, 400) == TokenCounts(100, 25, 0, estimated=True)


def test_client_gone_mid_stream_without_usage_pays_prompt_and_delivered() -> None:
    r = rec(Outcome.CLIENT_GONE, delivered_events=40, delivered_chars=120, upstream_status=200)
    counts = billable_tokens(r, 2000)
    assert counts == TokenCounts(500, 40, 0, estimated=True)
    cost, _ = record_cost(r, model("gpt-4.1"), 2000, ONE)
    assert cost == cost_units(model("gpt-4.1"), 500, 40, ONE) > 0


def test_client_gone_uses_delivered_not_partial_usage() -> None:
    # Anthropic's message_start: input known, output_tokens 1, before any text
    r = rec(
        Outcome.CLIENT_GONE,
        usage=UsageReport(300, 1),
        delivered_events=20,
        delivered_chars=200,
        upstream_status=200,
    )
    assert billable_tokens(r, 4000) == TokenCounts(300, 50, 0, estimated=True)


def test_client_gone_before_first_token_pays_the_prompt_once_accepted() -> None:
    accepted = rec(Outcome.CLIENT_GONE, upstream_status=200)
    assert billable_tokens(accepted, 800) == TokenCounts(200, 0, 0, estimated=True)
    not_sent = rec(Outcome.CLIENT_GONE)  # gone before the provider answered its head
    assert billable_tokens(not_sent, 800) == TokenCounts(0, 0, 0, estimated=True)
    stalled = rec(Outcome.CLIENT_STALLED, upstream_status=200, delivered_events=2)
    assert billable_tokens(stalled, 8) == TokenCounts(2, 2, 0, estimated=True)


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.UPSTREAM_ERROR,
        Outcome.UPSTREAM_TIMEOUT,
        Outcome.SIGNING_FAILED,
        Outcome.GATEWAY_ERROR,
    ],
)
def test_errors_charge_only_what_was_delivered(outcome: Outcome) -> None:
    nothing = rec(outcome, upstream_status=200, usage=UsageReport(100, 50), images=1)
    assert billable_tokens(nothing, 4000) == TokenCounts(0, 0, 0, estimated=True)
    prefix = rec(outcome, upstream_status=200, delivered_events=5, delivered_chars=8)
    assert billable_tokens(prefix, 40) == TokenCounts(10, 5, 0, estimated=True)


def test_images_are_billed_on_delivery_and_after_a_hang_up() -> None:
    m = model("gemini-2.5-flash-image")
    done = rec(Outcome.COMPLETE, usage=UsageReport(10, 20), images=2)
    cost, counts = record_cost(done, m, 0, ONE)
    assert counts.images == 2
    assert cost == cost_units(m, 10, 20, ONE, images=2)
    gone = rec(Outcome.CLIENT_GONE, upstream_status=200, images=1, stream=False)
    cost, counts = record_cost(gone, m, 40, ONE)
    assert counts == TokenCounts(10, 0, 1, estimated=True)
    assert cost == cost_units(m, 10, 0, ONE, images=1)
