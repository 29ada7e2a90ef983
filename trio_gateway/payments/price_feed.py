"""The asset's USD price (OPG/USD) from a CoinGecko-compatible endpoint, as an app-nursery service.

Reference behaviour (§11.2), minus the threads: fetch at once, then every ``refresh_interval``;
each cycle tries up to ``attempts`` times with a growing backoff, and a 429 ends the cycle (the
endpoint asked us to back off). A failed cycle keeps the last good price. ``price()`` raises
``PriceUnavailable`` (the pricing gate's 503) when there never was a price or the last good one
is older than ``max_age`` (4 h). The reference's fixed $0.10 before a cut-over date is not
reproduced.

The response is ``{"<contract address, lower-cased>": {"usd": <number>}}``; the number must be
finite and > 0 and is read as ``Decimal(str(value))``; ``{}`` (a listed token without a price)
and a missing entry are errors.

All state lives on the ``PriceFeed`` instance; the HTTP client is injected (tests use
``httpx.MockTransport``) and time is trio's (tests use ``MockClock``), except the wall-clock
timestamp shown on ``/health``, which comes from the injectable ``wall_clock``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

import httpx
import trio

from ..relay.wire import BodyTooLarge, read_capped

log = logging.getLogger("trio_gateway.payments.price_feed")

COINGECKO_API = "https://api.coingecko.com/api/v3"
DEFAULT_REFRESH_INTERVAL = 300.0
DEFAULT_MAX_AGE = 4 * 3600.0
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF = 10.0
DEFAULT_TIMEOUT = 10.0
MAX_BODY = 64 * 1024


class PriceUnavailable(Exception):
    """No usable price: never fetched, or the last good one is too old."""


class PriceFetchError(Exception):
    """One fetch attempt failed; ``retry`` is False when the cycle must stop (HTTP 429)."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


def coingecko_token_price_url(
    contract_address: str, *, platform: str = "base", base_url: str = COINGECKO_API
) -> str:
    """The reference's URL shape: ``/simple/token_price/<platform>?contract_addresses=…``."""
    query = urlencode({"contract_addresses": contract_address, "vs_currencies": "usd"})
    return f"{base_url.rstrip('/')}/simple/token_price/{platform}?{query}"


def parse_price(body: bytes, contract_address: str) -> Decimal:
    """The USD price for ``contract_address`` out of a CoinGecko ``token_price`` answer."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PriceFetchError("the answer is not JSON") from exc
    if not isinstance(data, dict):
        raise PriceFetchError("the answer is not an object")
    wanted = contract_address.lower()
    entry: Any = data.get(wanted)
    if entry is None:  # tolerate a differently-cased key
        entry = next((v for k, v in data.items() if str(k).lower() == wanted), None)
    if not isinstance(entry, dict) or not entry:
        raise PriceFetchError("no price for the asset in the answer")
    value = entry.get("usd")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PriceFetchError("the usd price is not a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise PriceFetchError("the usd price is not finite")
    try:
        price = Decimal(str(value))
    except InvalidOperation as exc:  # pragma: no cover - str(int|float) always parses
        raise PriceFetchError("the usd price is not a decimal") from exc
    if not price.is_finite() or price <= 0:
        raise PriceFetchError("the usd price must be > 0")
    return price


class PriceFeed:
    def __init__(
        self,
        client: httpx.AsyncClient,
        contract_address: str,
        *,
        url: str | None = None,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        max_age: float = DEFAULT_MAX_AGE,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: float = DEFAULT_BACKOFF,
        timeout: float = DEFAULT_TIMEOUT,
        headers: dict[str, str] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if refresh_interval <= 0 or max_age <= 0 or timeout <= 0 or backoff < 0:
            raise ValueError("intervals must be positive")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.client = client
        self.contract_address = contract_address
        self.url = url or coingecko_token_price_url(contract_address)
        self.refresh_interval = float(refresh_interval)
        self.max_age = float(max_age)
        self.attempts = attempts
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.headers = dict(headers or {})
        self._wall_clock = wall_clock
        self._price: Decimal | None = None
        self._fetched_at: float | None = None  # trio time of the last success
        self._last_success: float | None = None  # wall clock of the last success
        self._last_error: str | None = None
        self.consecutive_failures = 0
        self.total_fetches = 0
        self.total_errors = 0
        self.attempts_made = 0

    # -- the service ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch now, then every ``refresh_interval`` (measured start to start), forever."""
        while True:
            started = trio.current_time()
            await self.refresh()
            await trio.sleep_until(started + self.refresh_interval)

    async def refresh(self) -> bool:
        """One cycle: up to ``attempts`` tries; True when a fresh price was stored."""
        error = "no attempt"
        for attempt in range(self.attempts):
            if attempt:
                await trio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                price = await self._fetch_once()
            except PriceFetchError as exc:
                error = str(exc)
                if not exc.retry:
                    break
                continue
            self._price = price
            self._fetched_at = trio.current_time()
            self._last_success = self._wall_clock()
            self._last_error = None
            self.consecutive_failures = 0
            self.total_fetches += 1
            return True
        self._last_error = error
        self.consecutive_failures += 1
        self.total_errors += 1
        log.warning("price feed cycle failed: %s", error)
        return False

    async def _fetch_once(self) -> Decimal:
        self.attempts_made += 1
        try:
            with trio.fail_after(self.timeout):
                async with self.client.stream("GET", self.url, headers=self.headers) as resp:
                    status = resp.status_code
                    body = b""
                    if status == 200:
                        try:
                            body = await read_capped(resp, MAX_BODY)
                        except BodyTooLarge:
                            raise PriceFetchError("the answer is too large") from None
        except trio.TooSlowError as exc:
            raise PriceFetchError("timed out") from exc
        except httpx.HTTPError as exc:
            raise PriceFetchError(f"transport error ({type(exc).__name__})") from exc
        if status == 429:
            raise PriceFetchError("HTTP 429 (rate limited)", retry=False)
        if status != 200:
            raise PriceFetchError(f"HTTP {status}")
        return parse_price(body, self.contract_address)

    # -- readers ------------------------------------------------------------------------------

    def age(self) -> float | None:
        """Seconds since the last good price (trio time), or None if there never was one."""
        if self._fetched_at is None:
            return None
        return trio.current_time() - self._fetched_at

    def price(self) -> Decimal:
        """The last good price, or ``PriceUnavailable`` if none or older than ``max_age``."""
        age = self.age()
        if self._price is None or age is None:
            raise PriceUnavailable("no price has been fetched yet")
        if age > self.max_age:
            raise PriceUnavailable(f"the price is stale ({int(age)} s old)")
        return self._price

    def status(self) -> dict[str, Any]:
        """The ``/health`` block."""
        age = self.age()
        return {
            "price_usd": str(self._price) if self._price is not None else None,
            "last_success": self._last_success,
            "last_error": self._last_error,
            "consecutive_failures": self.consecutive_failures,
            "total_fetches": self.total_fetches,
            "total_errors": self.total_errors,
            "refresh_interval": self.refresh_interval,
            "age_seconds": round(age, 3) if age is not None else None,
            "stale": age is None or age > self.max_age,
        }
