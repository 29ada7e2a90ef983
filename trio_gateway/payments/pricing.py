"""Cost in token base units: the reference's formula, exact, plus the disconnect estimate.

Reference (§11.3)::

    usd  = in_tok * input_usd + out_tok * output_usd  (+ images * image_usd, §16.2)
    cost = max(0, ceil(usd / price * 10**decimals))

Prices come from the registry entry (``ModelInfo``: decimal strings, USD per token / per image),
never from the provider's answer. The arithmetic is ``Decimal`` with ``ROUND_CEILING`` in a local
context wide enough that the result equals the exact rational ceiling (no rounding below the
integer unit can ever go down: the operator is never under-charged by rounding, the client never
over-charged by more than one base unit).

The disconnect estimate
-----------------------
When the provider's usage never arrived (the client hung up mid-stream, the upstream broke), the
record still says what was handed to the client. ``billable_tokens`` then uses:

* completion tokens = ``max(delivered_events, ceil(delivered_chars / 4))``: each content/tool
  delta is at least one token, and ~4 characters per token is the usual BPE average for English
  (so the larger of the two is a lower-biased but never-zero estimate);
* prompt tokens = ``ceil(len(canonical request bytes) / 4)``: the same 4-bytes-per-token rule on
  the canonical request (JSON overhead makes it slightly generous for text, which pays for the
  chat template tokens the byte count cannot see).

Which tokens are charged depends on the outcome (see ``billable_tokens``): the client pays for
what it received, plus the prompt when it walked away after the provider accepted the request;
an error before anything was delivered is free, like the reference's "non-2xx is not charged".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation, localcontext

from ..providers.base import ModelInfo
from ..relay.metering import Outcome, RequestRecord

OPG_DECIMALS = 18
CHARS_PER_TOKEN = 4
BYTES_PER_TOKEN = 4

# outcomes the client caused (it walked away): the prompt the provider already processed is due
_CLIENT_LEFT = frozenset({Outcome.CLIENT_GONE, Outcome.CLIENT_STALLED})


class PricingError(ValueError):
    """A cost cannot be computed (bad price, bad registry entry, unbounded worst case)."""


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt_tokens: int
    completion_tokens: int
    images: int = 0
    estimated: bool = False  # True when any count came from the disconnect estimate


def _dec(value: str | None, what: str) -> Decimal:
    if value is None:
        raise PricingError(f"{what} is not set")
    try:
        d = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise PricingError(f"{what} is not a decimal") from exc
    if not d.is_finite() or d < 0:
        raise PricingError(f"{what} must be finite and >= 0")
    return d


def check_price(price_usd: Decimal) -> Decimal:
    if not isinstance(price_usd, Decimal):
        raise PricingError("the asset price must be a Decimal")
    if not price_usd.is_finite() or price_usd <= 0:
        raise PricingError("the asset price must be finite and > 0")
    return price_usd


def usd_cost(
    model: ModelInfo, prompt_tokens: int, completion_tokens: int, images: int = 0
) -> Decimal:
    """USD for the given counts at the model's registry prices (negative counts clamp to 0)."""
    in_tok = max(0, int(prompt_tokens))
    out_tok = max(0, int(completion_tokens))
    n_img = max(0, int(images))
    usd = in_tok * _dec(model.input_usd, f"{model.name}.input_usd")
    usd += out_tok * _dec(model.output_usd, f"{model.name}.output_usd")
    if n_img:
        usd += n_img * _dec(model.image_usd, f"{model.name}.image_usd")
    return usd


def to_units(usd: Decimal, price_usd: Decimal, decimals: int = OPG_DECIMALS) -> int:
    """``max(0, ceil(usd / price * 10**decimals))``, exactly."""
    check_price(price_usd)
    if decimals < 0:
        raise PricingError("decimals must be >= 0")
    if not usd.is_finite():
        raise PricingError("usd must be finite")
    if usd <= 0:
        return 0
    # Enough digits for the integer part plus one: the ceiling-rounded quotient is then never
    # below the exact value and never reaches the next integer, so the ceiling is exact.
    digits = usd.adjusted() - price_usd.adjusted() + decimals + 40
    with localcontext() as ctx:
        ctx.prec = max(digits, 28)
        ctx.rounding = ROUND_CEILING
        q = usd.scaleb(decimals) / price_usd
        return max(0, int(q.to_integral_value(rounding=ROUND_CEILING)))


def cost_units(
    model: ModelInfo,
    prompt_tokens: int,
    completion_tokens: int,
    price_usd: Decimal,
    *,
    images: int = 0,
    decimals: int = OPG_DECIMALS,
) -> int:
    """The charge, in token base units, for these counts at ``price_usd`` per whole token."""
    return to_units(usd_cost(model, prompt_tokens, completion_tokens, images), price_usd, decimals)


def worst_case_cost(
    model: ModelInfo,
    prompt_tokens_estimate: int,
    max_output: int | None,
    price_usd: Decimal,
    *,
    images: int | None = None,
    decimals: int = OPG_DECIMALS,
) -> int:
    """What to reserve before running a request.

    ``max_output`` is the client's ``max_tokens`` (``None``: the model's ``max_output``), capped
    by the model's ``max_output``; without either the worst case is unbounded → ``PricingError``
    (the gate must then answer 400). ``images`` defaults to 1 for image models (the request's
    ``n`` should be passed when it has one), 0 otherwise.
    """
    limit = model.max_output
    if max_output is None:
        out = limit
    else:
        out = max(0, int(max_output)) if limit is None else min(max(0, int(max_output)), limit)
    if out is None:
        raise PricingError(f"{model.name}: no output bound (max_tokens or max_output)")
    if images is None:
        images = 1 if model.mode != "chat" and model.image_usd is not None else 0
    return cost_units(
        model, prompt_tokens_estimate, out, price_usd, images=images, decimals=decimals
    )


def estimate_prompt_tokens(request_size: int) -> int:
    """Prompt tokens from the canonical request size: ``ceil(bytes / 4)``."""
    return math.ceil(max(0, int(request_size)) / BYTES_PER_TOKEN)


def estimate_completion_tokens(delivered_events: int, delivered_chars: int) -> int:
    """Completion tokens from what was delivered: ``max(events, ceil(chars / 4))``."""
    events = max(0, int(delivered_events))
    chars = max(0, int(delivered_chars))
    return max(events, math.ceil(chars / CHARS_PER_TOKEN))


def billable_tokens(record: RequestRecord, request_size: int) -> TokenCounts:
    """The counts to charge for one finished request.

    * ``COMPLETE``: the provider's usage as reported (the reference's rule); without usage, the
      estimate (prompt from ``request_size``, completion from what was delivered).
    * The client left (``CLIENT_GONE`` / ``CLIENT_STALLED``): completion = what was delivered
      (the estimate, not the usage: usage on a cut stream is partial, e.g. Anthropic's
      ``message_start`` says 1 output token; and a non-streamed answer the client never got was
      not delivered); prompt = the provider's prompt count if it arrived, else the estimate, but
      only if the provider accepted the request (2xx head) or something was delivered.
    * An error (upstream, signing, gateway): what was delivered before it, plus the prompt if
      anything was delivered; nothing delivered → nothing charged.

    Images (generated, counted by the relay as parsed) are charged on completion and when the
    client left (the provider billed them); never after an error (they go out in the final,
    signed frame or body, which an error replaces).
    """
    outcome = record.outcome
    usage = record.usage
    delivered = estimate_completion_tokens(record.delivered_events, record.delivered_chars)
    images = max(0, record.images)
    if outcome == Outcome.COMPLETE or outcome is None:
        if usage is not None:
            return TokenCounts(max(0, usage.prompt_tokens), max(0, usage.completion_tokens), images)
        return TokenCounts(estimate_prompt_tokens(request_size), delivered, images, True)
    accepted = record.upstream_status is not None and 200 <= record.upstream_status < 300
    if outcome in _CLIENT_LEFT:
        charge_prompt = accepted or delivered > 0 or images > 0
    else:  # an error: images travel in the final (signed) frame or body, never delivered
        charge_prompt = delivered > 0
        images = 0
    prompt = 0
    if charge_prompt:
        if usage is not None and usage.prompt_tokens > 0:
            prompt = usage.prompt_tokens
        else:
            prompt = estimate_prompt_tokens(request_size)
    return TokenCounts(prompt, delivered, images, estimated=True)


def record_cost(
    record: RequestRecord,
    model: ModelInfo,
    request_size: int,
    price_usd: Decimal,
    *,
    decimals: int = OPG_DECIMALS,
) -> tuple[int, TokenCounts]:
    """(charge in base units, the counts it was computed from) for a finished request."""
    counts = billable_tokens(record, request_size)
    cost = cost_units(
        model,
        counts.prompt_tokens,
        counts.completion_tokens,
        price_usd,
        images=counts.images,
        decimals=decimals,
    )
    return cost, counts
