"""OHTTP anti-replay (RFC 9458 §6.5, SECURITY.md F3): a copy of an encapsulated request is
refused after decryption and before any dispatch or payment work.

* ``ReplayCache`` alone (``codecs/replay.py``): window expiry on an injected clock, key_id
  separation, a full cache failing closed (nothing evicted early), a clock that goes back.
* ``OHTTPKeys`` scheduled rotation: no key is accepted longer than the replay window, so a copy
  sent at *any* later time is refused -- by the cache while the key lives, by the key's absence
  after (a property checked over a grid of send/replay times, with real HPKE).
* Through the app: a replayed request (stream and non-stream) gets a sealed inner 400
  ``replayed_request`` and never reaches the provider, the meter or the inner handler; a new
  ``enc`` is served; garbage never fills the cache; a full cache answers a sealed 503 and keeps
  refusing the replays it remembers; ``/health`` counts it all.
* Paid (loopback facilitator world, real sockets): one encapsulated paid request posted three
  times is served and charged once, and only that is paid on chain.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from quart import request

from tests.asgi import ScriptedUpstream, oai_text_stream
from tests.conftest import make_settings, make_state
from tests.test_ohttp_route import (
    CHAT,
    InProcess,
    RecordingMeter,
    chat,
    inner,
    open_chunked,
    open_single,
    seal,
)
from tests.test_payments_x402 import World
from tests.test_payments_x402 import chat as paid_chat
from tests.test_payments_x402 import facilitator as facilitator  # the fixtures (re-exported)
from tests.test_payments_x402 import world as world
from trio_gateway.codecs.bhttp import BHTTPRequest, decode_response, encode_request
from trio_gateway.codecs.ohttp import (
    DecryptionFailed,
    KeyMismatch,
    decapsulate_request,
    decode_key_configs,
    encapsulate_request,
)
from trio_gateway.codecs.replay import Admission, ReplayCache
from trio_gateway.ohttp_keys import OHTTPKeys, maintenance
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

ENC_A = bytes(range(32))
ENC_B = bytes(range(1, 33))


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the cache alone ----------------------------------------------------------------------------


def test_cache_remembers_for_the_window_then_forgets() -> None:
    clock = Clock()
    cache = ReplayCache(window=600, max_entries=10, clock=clock, buckets=60)  # 10 s slots
    assert cache.admit(1, ENC_A) is Admission.FRESH
    assert cache.admit(1, ENC_A) is Admission.REPLAY
    clock.now += 599.999
    assert cache.admit(1, ENC_A) is Admission.REPLAY  # still inside its window
    clock.now += 0.001  # exactly window after admission: forgotten
    assert cache.admit(1, ENC_A) is Admission.FRESH
    assert len(cache) == 1
    # a slot is dropped once its *newest* entry is window old: never earlier for any entry
    clock.now = 2000.0
    assert cache.admit(2, ENC_A) is Admission.FRESH
    clock.now = 2005.0  # same 10 s slot
    assert cache.admit(2, ENC_B) is Admission.FRESH
    clock.now = 2604.9
    assert cache.admit(2, ENC_A) is Admission.REPLAY  # > window old, kept with its slot
    clock.now = 2605.0
    assert cache.admit(2, ENC_A) is Admission.FRESH and cache.admit(2, ENC_B) is Admission.FRESH
    assert (cache.admitted, cache.replays, cache.refused_full) == (6, 3, 0)


def test_cache_separates_key_ids() -> None:
    cache = ReplayCache(window=60, max_entries=10, clock=Clock())
    assert cache.admit(1, ENC_A) is Admission.FRESH
    assert cache.admit(2, ENC_A) is Admission.FRESH  # same enc under another key: not a copy
    assert cache.admit(1, ENC_A) is Admission.REPLAY
    assert cache.admit(2, ENC_A) is Admission.REPLAY
    assert cache.admit(1, ENC_B) is Admission.FRESH


def test_full_cache_fails_closed_without_evicting() -> None:
    clock = Clock()
    cache = ReplayCache(window=60, max_entries=3, clock=clock, buckets=6)  # 10 s slots
    encs = [bytes([i]) * 32 for i in range(6)]
    assert cache.admit(1, encs[0]) is Admission.FRESH
    clock.now += 20
    assert cache.admit(1, encs[1]) is Admission.FRESH
    assert cache.admit(1, encs[2]) is Admission.FRESH
    # full: a new request is refused, every remembered one is still a replay
    assert cache.admit(1, encs[3]) is Admission.FULL
    assert cache.admit(1, encs[4]) is Admission.FULL
    assert [cache.admit(1, e) for e in encs[:3]] == [Admission.REPLAY] * 3
    assert (cache.full_streak, cache.refused_full, len(cache)) == (2, 2, 3)
    assert cache.retry_after() == pytest.approx(40)  # the oldest slot: admitted 20 s ago
    stats = cache.stats()
    assert stats["full"] is True and stats["entries"] == 3 and stats["refused_full"] == 2
    # room again only when the oldest entry's window has passed; refused ones were not kept
    clock.now += 39.9
    assert cache.admit(1, encs[3]) is Admission.FULL
    clock.now += 0.1
    assert cache.admit(1, encs[3]) is Admission.FRESH
    assert cache.full_streak == 0
    assert cache.admit(1, encs[0]) is Admission.FULL  # expired: new again, and no room
    assert cache.admit(1, encs[1]) is Admission.REPLAY  # still inside its window


def test_cache_clock_going_back_never_shortens_the_window() -> None:
    clock = Clock(1000.0)
    cache = ReplayCache(window=60, max_entries=10, clock=clock, buckets=6)
    cache.admit(1, ENC_A)
    clock.now = 900.0  # back by 100 s
    cache.admit(1, ENC_B)
    clock.now = 1059.0
    assert cache.admit(1, ENC_A) is Admission.REPLAY
    clock.now = 1060.0
    assert cache.admit(1, ENC_A) is Admission.FRESH


@pytest.mark.parametrize("kw", [{"window": 0}, {"window": -1}, {"max_entries": 0}, {"buckets": 0}])
def test_cache_rejects_bad_parameters(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ReplayCache(**kw)


# --- scheduled rotation bounds every key's lifetime by the window -------------------------------


def _scheduled(clock: Clock, **kw: Any) -> OHTTPKeys:
    return OHTTPKeys.create(clock=clock, rotate_every=48.0, overlap=12.0, replay_window=60.0, **kw)


def test_scheduled_rotation_and_expiry() -> None:
    clock = Clock(0.0)
    keys = _scheduled(clock)
    first = keys.primary.key_id
    clock.now = 47.9
    assert keys.primary.key_id == first and set(keys.active()) == {first}
    clock.now = 48.0  # rotation due: checked on use, no service needed
    second = keys.primary.key_id
    assert second != first and set(keys.active()) == {first, second}
    assert [c.key_id for c in decode_key_configs(keys.key_list())] == [second, first]
    clock.now = 59.9
    assert first in keys.active()
    clock.now = 60.0  # created at 0, 48 + 12 later: gone
    assert set(keys.active()) == {second}
    # a late first use after a long idle period rotates once and drops what expired meanwhile
    clock.now = 10_000.0
    third = keys.primary.key_id
    assert set(keys.active()) == {third} and keys.entries[third].created_at == 10_000.0
    for entry in keys.entries.values():
        assert entry.expires_at is not None and entry.expires_at - entry.created_at <= 60.0
    # a manual rotation can shorten a key's life, never extend it
    keys.rotate(overlap=1000.0)
    assert keys.entries[third].expires_at == 10_060.0
    status = keys.status()
    assert status["keys"] == 2 and status["key_rotation_seconds"] == 48.0
    assert status["replay"]["window_seconds"] == 60.0


@pytest.mark.parametrize(
    ("rotate_every", "overlap"), [(50.0, 11.0), (61.0, 0.0), (10.0, 20.0), (0.0, 0.0)]
)
def test_rotation_longer_than_the_window_is_refused(rotate_every: float, overlap: float) -> None:
    with pytest.raises(ValueError, match="replay_window"):
        OHTTPKeys.create(rotate_every=rotate_every, overlap=overlap, replay_window=60.0)


def test_settings_keep_rotation_inside_the_window(enclave_key: EnclaveKey) -> None:
    state = make_state(enclave_key)
    assert state.ohttp.rotate_every == 480.0 and state.ohttp.overlap == 120.0
    assert "ohttp_keys" in state.services
    for bad in (
        {"ohttp_key_overlap": 30.0},  # not above ohttp_keys_max_age (60)
        {"ohttp_key_overlap": 400.0},  # more than half the window
        {"ohttp_replay_window": 200.0},
    ):
        with pytest.raises(ValueError, match="ohttp_key_overlap"):
            make_settings(**bad)


def _served_copies(make_keys: Any, sends: list[float]) -> list[float]:
    """For each send time t0 and each key a client may hold then (the primary, or a cached
    older one): seal a fresh request at t0, then replay it every 0.75 s for 120 s. Returns the
    delays at which a copy was *served* (should be none). The key set lives through the time
    before t0 request by request, so rotations happen when they would in production."""
    served: list[float] = []
    body = inner("/health", method="GET")
    for t0 in sends:
        for which in (0, 1):
            clock = Clock(0.0)
            keys: OHTTPKeys = make_keys(clock)
            while clock.now < t0:
                keys.active()
                clock.now = min(t0, clock.now + 1.0)
            held = sorted(keys.active().values(), key=lambda k: keys.entries[k.key_id].created_at)
            if which >= len(held):
                continue
            enc, _ = encapsulate_request(held[-1 - which].config, body)
            for step in range(160):
                clock.now = t0 + step * 0.75
                try:
                    _, ctx = decapsulate_request(keys.active(), enc)
                except (KeyMismatch, DecryptionFailed):
                    continue  # the key is gone (or its key_id now names another key)
                verdict = keys.replay.admit(enc[0], enc[7 : 7 + ctx.suite.nenc])
                if step == 0:
                    assert verdict is Admission.FRESH
                elif verdict is not Admission.REPLAY:
                    served.append(step * 0.75)
    return served


def test_no_replay_is_ever_served_with_scheduled_rotation() -> None:
    sends = [0.0, 13.0, 47.9, 48.0, 59.5, 95.0, 130.0]
    assert _served_copies(_scheduled, sends) == []


def test_without_rotation_a_copy_after_the_window_is_served() -> None:
    """The documented limit that scheduled rotation closes (and proof the check can fail)."""

    def unscheduled(clock: Clock) -> OHTTPKeys:
        return OHTTPKeys.create(clock=clock, replay_window=60.0)

    served = _served_copies(unscheduled, [0.0])
    assert served and min(served) == 60.0


async def test_maintenance_service_rotates_and_forgets_while_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keys = OHTTPKeys.create(
        clock=trio.current_time, rotate_every=48.0, overlap=12.0, replay_window=60.0
    )
    first = keys.primary_id
    keys.replay.admit(first, ENC_A)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(maintenance, keys)
        await trio.sleep(48.5)  # no request: the service rotated on its own
        assert keys.primary_id != first and set(keys.entries) == {first, keys.primary_id}
        await trio.sleep(12.0)  # the old private key and the replay entry are dropped
        assert set(keys.entries) == {keys.primary_id}
        assert len(keys.replay) == 0
        nursery.cancel_scope.cancel()


# --- through the app ----------------------------------------------------------------------------


def _completion() -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-4.1-2025-04-14",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


class Scripted:
    """The app with a scripted provider, a recording meter and a count of inner dispatches."""

    def __init__(self, key: EnclaveKey, stream: bool, **settings: Any) -> None:
        self.up = (
            ScriptedUpstream(oai_text_stream(["a", "b"]))
            if stream
            else ScriptedUpstream([_completion()], content_type="application/json")
        )
        self.meter = RecordingMeter()
        state = AppState.build(
            make_settings(openai_api_key="sk-x", **settings),
            key=key,
            meter=self.meter,
            transport=self.up,
        )
        self.gw = InProcess(state)
        self.dispatched: list[str] = []

        @self.gw.app.before_request
        async def _count() -> None:
            if request.path != "/v1/ohttp":
                self.dispatched.append(request.path)

    async def health(self) -> dict[str, Any]:
        res = await self.gw.client.request("GET", "/health")
        self.dispatched.remove("/health")
        body: dict[str, Any] = res.json()["ohttp"]
        return body


def _refused(client: Any, res: Any, status: int = 400) -> dict[str, Any]:
    """The outer answer is a plain sealed 200; the inner one is the refusal."""
    assert res.status == 200 and res.header("content-type") == "message/ohttp-res"
    resp = open_single(client, res.body)
    assert resp.status == status
    err: dict[str, Any] = json.loads(resp.content)["error"]
    return err


def _served(client: Any, res: Any, stream: bool) -> int:
    """The inner status of an answer that was served (chunked for streams)."""
    assert res.status == 200
    if stream:
        assert res.header("content-type") == "message/ohttp-chunked-res"
        chunks, final = open_chunked(client, res.body)
        return decode_response(b"".join(chunks) + final).status
    return open_single(client, res.body).status


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_replay_is_refused_before_dispatch(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, stream: bool
) -> None:
    app = Scripted(enclave_key, stream)
    gw = app.gw
    enc, client = seal(gw.config, inner(CHAT, chat(stream=stream, model="gpt-4.1")))
    assert _served(client, await gw.post(enc), stream) == 200
    assert len(app.up.log.requests) == 1 and len(app.meter.records) == 1
    assert app.dispatched == [CHAT]

    for _ in range(2):  # the relay sends it again, twice
        err = _refused(client, await gw.post(enc))
        assert err["code"] == "replayed_request"
    assert len(app.up.log.requests) == 1  # never reached the provider
    assert len(app.meter.records) == 1  # nothing metered (nor charged)
    assert app.dispatched == [CHAT]  # the inner handler never ran

    # the same request with a new enc (what a client's retry is) is served
    enc2, client2 = seal(gw.config, inner(CHAT, chat(stream=stream, model="gpt-4.1")))
    assert enc2[7:39] != enc[7:39]
    assert _served(client2, await gw.post(enc2), stream) == 200
    assert len(app.up.log.requests) == 2 and len(app.meter.records) == 2

    replay = (await app.health())["replay"]
    assert replay["admitted"] == 2 and replay["replays_refused"] == 2
    assert replay["entries"] == 2 and replay["full"] is False


async def test_replay_refused_whatever_the_first_answer_was(gw: InProcess) -> None:
    """Entries are recorded before BHTTP decoding: a copy of an invalid or 404 request is a
    replay too (so replays cannot probe which inner requests are valid)."""
    for bhttp in (b"\x04", inner("/v1/keys", method="GET"), inner("/health", method="GET")):
        enc, client = seal(gw.config, bhttp)
        assert (await gw.post(enc)).status == 200
        assert _refused(client, await gw.post(enc))["code"] == "replayed_request"


async def test_garbage_never_fills_the_cache_and_full_fails_closed(
    enclave_key: EnclaveKey,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Scripted(enclave_key, stream=False, ohttp_replay_max_entries=2)
    gw = app.gw
    enc, _ = seal(gw.config, inner(CHAT, chat(model="gpt-4.1")))
    for bad in (
        enc[:-1] + bytes([enc[-1] ^ 1]),  # tag
        enc[:7] + bytes(32) + enc[39:],  # all-zero enc
        enc[:10] + bytes([enc[10] ^ 1]) + enc[11:],  # another enc, same ciphertext
        enc[:20],  # truncated
    ):
        assert (await gw.post(bad)).status in (400, 422)
    assert len(gw.state.ohttp.replay) == 0  # only requests that decrypt are remembered

    a, client_a = seal(gw.config, inner("/health", method="GET"))
    b, _ = seal(gw.config, inner("/health", method="GET"))
    assert (await gw.post(a)).status == (await gw.post(b)).status == 200
    caplog.set_level(logging.ERROR, logger="trio_gateway.ohttp")
    for _ in range(3):  # full: new requests refused, sealed, nothing dispatched
        c, client_c = seal(gw.config, inner(CHAT, chat(model="gpt-4.1")))
        res = await gw.post(c)
        err = _refused(client_c, res, 503)
        assert err["code"] == "replay_cache_full" and err["type"] == "service_unavailable"
        retry = dict(open_single(client_c, res.body).headers)[b"retry-after"]
        assert 1 <= int(retry) <= 600  # until the oldest entry's window has passed
    assert len(app.up.log.requests) == 0
    # ... and the remembered ones are still refused as replays: nothing was evicted
    assert _refused(client_a, await gw.post(a))["code"] == "replayed_request"
    full_logs = [r for r in caplog.records if "replay cache full" in r.getMessage()]
    assert len(full_logs) == 1  # once per full period, not once per request
    replay = (await app.health())["replay"]
    assert replay["full"] is True and replay["refused_full"] == 3
    assert replay["replays_refused"] == 1 and replay["max_entries"] == 2


async def test_replay_after_the_window_meets_an_expired_key(enclave_key: EnclaveKey) -> None:
    """Through the app: inside the window the cache refuses a copy; after it the key is gone."""
    clock = Clock(0.0)
    state = make_state(enclave_key, mock_token_delay_ms=0)
    state.ohttp = _scheduled(clock)
    gw = InProcess(state)
    enc, client = seal(gw.config, inner("/health", method="GET"))
    assert open_single(client, (await gw.post(enc)).body).status == 200
    clock.now = 59.9  # the key rotated at 48 but still decrypts; the cache remembers
    assert _refused(client, await gw.post(enc))["code"] == "replayed_request"
    clock.now = 60.0
    res = await gw.post(enc)
    assert res.status == 422 and res.header("content-type") == "application/problem+json"


async def test_chunked_requests_are_not_accepted(gw: InProcess) -> None:
    """There is no second decapsulation path to protect: chunked requests are refused (415)
    before any decryption, however often they are sent."""
    dispatched: list[str] = []

    @gw.app.before_request
    async def _count() -> None:
        if request.path != "/v1/ohttp":
            dispatched.append(request.path)

    enc, _ = seal(gw.config, inner("/health", method="GET"))
    for _ in range(2):
        assert (await gw.post(enc, "message/ohttp-chunked-req")).status == 415
    assert dispatched == [] and len(gw.state.ohttp.replay) == 0


@pytest.fixture
def gw(enclave_key: EnclaveKey) -> InProcess:
    return InProcess(make_state(enclave_key, mock_token_delay_ms=0))


# --- paid: the F3 scenario ----------------------------------------------------------------------


@pytest.mark.socket
async def test_paid_replay_is_charged_once(world: World) -> None:
    """SECURITY.md F3 as reported: one encapsulated paid request posted three times. Before the
    fix: three 200s and three charges on the victim's session. Now: one."""
    async with httpx.AsyncClient(base_url=world.base, timeout=10) as http:
        r = await http.post("/v1/chat/completions", json=paid_chat(max_tokens=20))
        assert r.status_code == 402
        sig = await world.sign(r.headers["PAYMENT-REQUIRED"])
        (config, *_) = decode_key_configs((await http.get("/ohttp-keys")).content)
        fields = ((b"content-type", b"application/json"), (b"payment-signature", sig.encode()))
        body = json.dumps(paid_chat("through a relay", max_tokens=20)).encode()
        enc, client = encapsulate_request(
            config, encode_request(BHTTPRequest("POST", "https", "gw", CHAT, fields, body))
        )
        answers = [
            await http.post("/v1/ohttp", content=enc, headers={"content-type": "message/ohttp-req"})
            for _ in range(3)
        ]
        health = (await http.get("/health")).json()["ohttp"]["replay"]
    assert [a.status_code for a in answers] == [200, 200, 200]  # all sealed
    first = decode_response(client.open_response(answers[0].content))
    assert first.status == 200, first.content
    usage = json.loads(first.content)["usage"]
    for a in answers[1:]:
        resp = decode_response(client.open_response(a.content))
        assert resp.status == 400
        assert json.loads(resp.content)["error"]["code"] == "replayed_request"
        assert not any(k == b"x-upto-session" for k, _ in resp.headers)
    assert health["replays_refused"] == 2
    await world.settled()
    meter = world.gate.meter
    assert meter.charged_requests == 1 and meter.duplicates == 0
    assert world.paid == world.cost(usage) > 0  # only the one answer is paid for
    assert world.fac.calls["verify"] == 1 and world.fac.calls["settle"] == 1
