"""The OPG/USD price feed: httpx.MockTransport for the endpoint, trio's MockClock for time."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio
import trio.testing

from trio_gateway.payments.price_feed import (
    PriceFeed,
    PriceFetchError,
    PriceUnavailable,
    coingecko_token_price_url,
    parse_price,
)
from trio_gateway.services import supervise

OPG = "0xFbC2051AE2265686a469421b2C5A2D5462FbF5eB"
URL = "https://prices.test/api/v3/simple/token_price/base?contract_addresses=x&vs_currencies=usd"


def answer(price: object) -> httpx.Response:
    return httpx.Response(200, json={OPG.lower(): {"usd": price}})


class Endpoint:
    """Scripted answers, one per request; records the trio time of each request."""

    def __init__(self, *script: httpx.Response | Callable[[], httpx.Response]) -> None:
        self.script = list(script)
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return item() if callable(item) else item


def make_feed(endpoint: Endpoint, **kw: object) -> PriceFeed:
    client = httpx.AsyncClient(transport=httpx.MockTransport(endpoint))
    return PriceFeed(client, OPG, url=URL, wall_clock=lambda: 1_700_000_000.0, **kw)  # type: ignore[arg-type]


def test_url_shape_is_the_references() -> None:
    url = coingecko_token_price_url(OPG)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "api.coingecko.com")
    assert parts.path == "/api/v3/simple/token_price/base"
    assert parse_qs(parts.query) == {"contract_addresses": [OPG], "vs_currencies": ["usd"]}


@pytest.mark.parametrize(
    "body",
    [
        b"{}",  # listed token without a price
        json.dumps({OPG.lower(): {}}).encode(),
        json.dumps({OPG.lower(): {"usd": 0}}).encode(),
        json.dumps({OPG.lower(): {"usd": -1.5}}).encode(),
        json.dumps({OPG.lower(): {"usd": "0.5"}}).encode(),
        json.dumps({OPG.lower(): {"usd": True}}).encode(),
        b'{"0xfbc2051ae2265686a469421b2c5a2d5462fbf5eb": {"usd": Infinity}}',
        json.dumps({"0xother": {"usd": 1}}).encode(),
        b"[1]",
        b"not json",
    ],
)
def test_parse_rejects(body: bytes) -> None:
    with pytest.raises(PriceFetchError):
        parse_price(body, OPG)


def test_parse_accepts_lower_cased_key_as_decimal_of_str() -> None:
    body = json.dumps({OPG.lower(): {"usd": 0.1}}).encode()
    assert parse_price(body, OPG) == Decimal("0.1")  # not the binary float 0.1000000000000000055
    assert parse_price(json.dumps({OPG: {"usd": 2}}).encode(), OPG) == Decimal(2)


async def test_happy_path_fetches_at_once_then_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    prices = iter(["0.5", "0.25", "2"])
    endpoint = Endpoint(lambda: answer(float(next(prices))))
    feed = make_feed(endpoint, refresh_interval=300)
    with pytest.raises(PriceUnavailable):
        feed.price()
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run)
        await trio.sleep(1)
        assert feed.price() == Decimal("0.5")
        await trio.sleep(300)
        assert feed.price() == Decimal("0.25")
        await trio.sleep(300)
        assert feed.price() == Decimal(2)
        nursery.cancel_scope.cancel()
    assert [t - t0 for t in endpoint.times] == [0, 300, 600]
    st = feed.status()
    assert st["total_fetches"] == 3
    assert st["total_errors"] == 0
    assert st["consecutive_failures"] == 0


async def test_retries_with_backoff_then_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    endpoint = Endpoint(httpx.Response(503), httpx.Response(502), answer(0.75))
    feed = make_feed(endpoint, backoff=10)
    t0 = trio.current_time()
    assert await feed.refresh() is True
    assert [t - t0 for t in endpoint.times] == [0, 10, 30]  # 10 s, then 20 s
    assert feed.price() == Decimal("0.75")
    assert feed.status()["total_errors"] == 0


async def test_three_failures_keep_the_last_good_price(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint = Endpoint(answer(1.5), httpx.Response(500))
    feed = make_feed(endpoint)
    assert await feed.refresh() is True
    assert await feed.refresh() is False
    assert len(endpoint.times) == 1 + 3
    assert feed.price() == Decimal("1.5")
    st = feed.status()
    assert st["last_error"] == "HTTP 500"
    assert (st["consecutive_failures"], st["total_errors"], st["total_fetches"]) == (1, 1, 1)


async def test_429_ends_the_cycle_without_retrying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    endpoint = Endpoint(httpx.Response(429), answer(1))
    feed = make_feed(endpoint)
    assert await feed.refresh() is False
    assert len(endpoint.times) == 1
    assert "429" in str(feed.status()["last_error"])
    assert await feed.refresh() is True  # the next cycle tries again


async def test_transport_errors_and_timeouts_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused", request=request)
        if calls == 2:
            await trio.sleep(3600)  # a hung endpoint: cut by the feed's own timeout
        return answer(3)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    feed = PriceFeed(client, OPG, url=URL, timeout=5, backoff=1)
    t0 = trio.current_time()
    assert await feed.refresh() is True
    assert calls == 3
    assert trio.current_time() - t0 == pytest.approx(1 + 5 + 2)
    assert feed.price() == Decimal(3)


async def test_stale_price_becomes_unavailable(autojump_clock: trio.testing.MockClock) -> None:
    endpoint = Endpoint(answer(0.5), httpx.Response(503))
    feed = make_feed(endpoint, refresh_interval=300, max_age=4 * 3600)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed.run)
        await trio.sleep(4 * 3600 - 1)
        assert feed.price() == Decimal("0.5")  # failures since, but still fresh enough
        assert feed.status()["stale"] is False
        await trio.sleep(2)
        with pytest.raises(PriceUnavailable, match="stale"):
            feed.price()
        nursery.cancel_scope.cancel()
    st = feed.status()
    assert st["stale"] is True
    # a failed cycle every 300 s since t=300; the one started at 4 h was cut mid-retry
    assert st["consecutive_failures"] == 47
    assert st["price_usd"] == "0.5"


async def test_status_shape(autojump_clock: trio.testing.MockClock) -> None:
    feed = make_feed(Endpoint(answer(0.5)), refresh_interval=120)
    st = feed.status()
    assert st == {
        "price_usd": None,
        "last_success": None,
        "last_error": None,
        "consecutive_failures": 0,
        "total_fetches": 0,
        "total_errors": 0,
        "refresh_interval": 120.0,
        "age_seconds": None,
        "stale": True,
    }
    await feed.refresh()
    await trio.sleep(7)
    st = feed.status()
    assert st["price_usd"] == "0.5"
    assert st["last_success"] == 1_700_000_000.0
    assert st["age_seconds"] == 7
    assert st["stale"] is False
    json.dumps(st)  # /health can serialise it


async def test_runs_under_supervise_and_stops_on_cancel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    feed = make_feed(Endpoint(answer(0.5)), refresh_interval=60)
    with trio.move_on_after(600):
        await supervise("price_feed", feed.run)
    assert feed.total_fetches == 10


def test_two_feeds_share_no_state() -> None:
    a = make_feed(Endpoint(answer(1)))
    b = make_feed(Endpoint(answer(2)))
    a.total_fetches = 5
    assert b.total_fetches == 0
    assert a.status() is not b.status()


async def test_oversized_answer_over_a_real_socket_is_refused_cleanly() -> None:
    """A price endpoint that sends far more than the cap: the fetch fails as "too large", the
    connection is closed at once and httpx's nested body iterators are ended (an abandoned one
    would be a warning, an error under -W error). A real loopback server, not MockTransport, so
    httpcore's own iterator chain is the one being cut."""
    closed = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
            with trio.move_on_after(10):
                while True:
                    await stream.send_all(b"x" * 16384)
        except trio.BrokenResourceError:
            closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, server, 0)
        port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient() as client:
            feed = PriceFeed(client, OPG, url=f"http://127.0.0.1:{port}/price", attempts=1)
            assert await feed.refresh() is False
            assert "too large" in (feed.status()["last_error"] or "")
        with trio.fail_after(5):
            await closed.wait()  # the gateway hung up on the endpoint
        gc.collect()
        nursery.cancel_scope.cancel()
