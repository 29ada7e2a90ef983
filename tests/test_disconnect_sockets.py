"""Real-socket disconnect tests: a client that leaves (or stops reading) must cost us nothing.

Everything a user would meet is real here: Hypercorn's trio worker on a loopback port, the
gateway's relay and its httpx client, and the bench mock provider in its own process
(``mock_upstream``), which records the instant the gateway closes its connection
(``t_peer_closed``, CLOCK_MONOTONIC, comparable with ``time.monotonic()`` here). The client is a
hand-driven trio socket, so each way of leaving is exactly one syscall:

* RST        ``SO_LINGER`` on with linger 0, then ``close()``
* FIN        drain what the kernel already holds, then ``close()`` (a close with unread bytes
             would make the kernel send RST instead)
* half-close ``shutdown(SHUT_WR)``

Each case asserts: the upstream connection was closed early (the mock never completed) within
``CLOSE_WITHIN`` of the client's syscall, the provider saw exactly one request, and the
gateway's metering hook ran exactly once with the expected outcome. The stalled-reader case
asserts the ``client_stall`` deadline frees the upstream while the client is still connected.
"""

from __future__ import annotations

import gc
import json
import socket
import struct
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from tests.conftest import MockUpstream, make_state, start_gateway
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

pytestmark = pytest.mark.socket

MODEL = "gpt-4.1"  # routed to the OpenAI adapter, i.e. to the mock provider
CLOSE_WITHIN = 0.100  # upstream closed at most this long after the client's syscall
RECORD_WAIT = 3.0  # bounded wait for the mock's ledger
SETTLE_WAIT = 2.0  # bounded wait for the metering hook
ACT_AT = 0.300  # "abandon after 300 ms" cases


# -- the gateway --------------------------------------------------------------------------------


async def serve(
    nursery: trio.Nursery,
    key: EnclaveKey,
    mock: MockUpstream,
    deadlines: dict[str, float] | None = None,
) -> tuple[AppState, tuple[str, int]]:
    extra: dict[str, Any] = {"deadlines": deadlines} if deadlines else {}
    state = make_state(
        key, openai_base_url=f"{mock.url}/v1", openai_api_key="sk-test", dev=True, **extra
    )
    assert state.usage_log is not None
    url = urlsplit(await start_gateway(nursery, state))
    assert url.hostname is not None and url.port is not None
    return state, (url.hostname, url.port)


def request_bytes(host: str, port: int, *, stream: bool, **knobs: object) -> tuple[str, bytes]:
    """A hand-made HTTP/1.1 request; the mock's knobs ride inside the user message."""
    bench_id = f"disc-{uuid.uuid4().hex[:12]}"
    text = " ".join([f"bench-id={bench_id}", *(f"bench-{k}={v}" for k, v in knobs.items())])
    body = json.dumps(
        {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": text}]}
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\n"
        f"host: {host}:{port}\r\n"
        f"content-type: application/json\r\n"
        f"accept: {'text/event-stream' if stream else 'application/json'}\r\n"
        f"content-length: {len(body)}\r\n"
        f"\r\n"
    ).encode()
    return bench_id, head + body


# -- the client ---------------------------------------------------------------------------------


class RawClient:
    """A trio socket over a stdlib socket we keep a handle on: async I/O through trio, and the
    final act (drain + close) as plain non-blocking syscalls with no checkpoint in between."""

    def __init__(self, *, rcvbuf: int | None = None) -> None:
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window is small from the start
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock = trio.socket.from_stdlib_socket(self.raw)  # sets it non-blocking
        self.buf = bytearray()
        self.eof = False

    async def connect(self, addr: tuple[str, int]) -> None:
        await self.sock.connect(addr)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = await self.sock.send(view)
            view = view[n:]

    async def read_until(self, done: Callable[[bytes], bool], limit: float) -> None:
        with trio.fail_after(limit):
            while not done(bytes(self.buf)):
                data = await self.sock.recv(65536)
                if not data:
                    raise AssertionError(f"gateway closed early; got {bytes(self.buf)[:400]!r}")
                self.buf += data

    async def read_to_eof(self, limit: float) -> None:
        with trio.fail_after(limit):
            while data := await self.sock.recv(65536):
                self.buf += data

    async def expect_silence_until(self, t: float) -> None:
        """Wait until trio time ``t`` (``trio.current_time()``, not ``time.monotonic()``: trio's
        clock has its own offset), failing on any byte from the gateway."""
        with trio.move_on_at(t):
            data = await self.sock.recv(65536)
            raise AssertionError(f"unexpected bytes from the gateway: {data[:400]!r}")

    def drain(self) -> None:
        while True:
            try:
                data = self.raw.recv(65536)
            except BlockingIOError:
                return
            if not data:
                self.eof = True
                return
            self.buf += data

    def act(self, how: str) -> float:
        """Leave the way ``how`` says; returns ``time.monotonic()`` taken right before the act."""
        if how == "rst":
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t = time.monotonic()
            self.sock.close()
        elif how == "fin":
            self.drain()
            t = time.monotonic()
            self.sock.close()
        elif how == "half_close":
            t = time.monotonic()
            self.sock.shutdown(socket.SHUT_WR)
        else:
            raise ValueError(how)
        return t

    def close(self) -> None:
        self.sock.close()


def head_complete(buf: bytes) -> bool:
    return b"\r\n\r\n" in buf


def status_of(buf: bytes) -> int:
    return int(buf.split(b"\r\n", 1)[0].split()[1])


def content_chunks(buf: bytes) -> int:
    return buf.count(b'"content":"')


# -- what the provider and the meter saw --------------------------------------------------------


async def upstream_records(mock: MockUpstream, bench_id: str) -> list[dict[str, Any]]:
    stats = await trio.to_thread.run_sync(partial(mock.stats, id=bench_id, detail="1"))
    return list(stats["requests"])  # the mock's ledger key (MockUpstream.records() reads "records")


async def upstream_closed(
    mock: MockUpstream, bench_id: str, limit: float = RECORD_WAIT
) -> dict[str, Any]:
    """The mock's record once it saw our connection close; fails after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    recs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        recs = await upstream_records(mock, bench_id)
        if recs and all(r["t_peer_closed"] is not None for r in recs):
            break
        await trio.sleep(0.01)
    else:
        pytest.fail(f"upstream connection not closed {limit}s later: {_brief(recs)}")
    assert len(recs) == 1, f"the provider saw {len(recs)} requests: {_brief(recs)}"
    return recs[0]


def _brief(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("attempt", "stream", "tokens", "chunks_written", "completed", "t_start",
            "t_first_chunk", "t_peer_closed", "closed_early", "close_kind")  # fmt: skip
    return [{k: r.get(k) for k in keep} for r in recs]


def assert_cut_early(rec: dict[str, Any], t_action: float, *, within: float) -> float:
    """The upstream saw its connection close after the client acted, within ``within`` s, and
    did not run to completion. Returns the latency in seconds."""
    latency: float = rec["t_peer_closed"] - t_action
    assert rec["closed_early"] is True, _brief([rec])
    assert rec["completed"] is False and rec["t_complete"] is None, _brief([rec])
    assert rec["chunks_written"] < rec["tokens"], _brief([rec])
    assert latency >= 0, f"upstream closed {-latency * 1e3:.1f} ms BEFORE the client acted"
    assert latency <= within, (
        f"upstream closed {latency * 1e3:.1f} ms after the client acted (limit "
        f"{within * 1e3:.0f} ms): {_brief([rec])}"
    )
    return latency


async def assert_metered_once(state: AppState, expected: dict[str, int]) -> None:
    """The shielded metering hook runs right after the cancel: wait for it (bounded), give a
    wrong second call room to happen, then demand exactly ``expected`` and no duplicates."""
    log = state.usage_log
    assert log is not None
    want = sum(expected.values())
    for _ in range(int(SETTLE_WAIT / 0.005)):  # the meter has no event to wait on: poll, bounded
        if sum(log.by_outcome.values()) >= want:
            break
        await trio.sleep(0.005)
    await trio.sleep(0.05)
    assert log.by_outcome == expected
    assert log.duplicates == 0


def report(request: pytest.FixtureRequest, latency: float) -> None:
    """Print the measured latency (visible with ``-s``), then collect garbage now: an async
    generator the request left un-exhausted is then reported (as an error, under ``-W error``)
    against this test rather than whichever test happens to trigger the next GC cycle."""
    print(f"\n[close-latency] {request.node.name}: {latency * 1e3:.2f} ms")
    gc.collect()


# -- 1. streaming, mid-stream --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["rst", "fin", "half_close"])
async def test_mid_stream(
    how: str,
    nursery: trio.Nursery,
    enclave_key: EnclaveKey,
    mock_upstream: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    state, addr = await serve(nursery, enclave_key, mock_upstream)
    bench_id, req = request_bytes(*addr, stream=True, tokens=200, delay_ms=20, ttft_ms=20)
    client = RawClient()
    try:
        await client.connect(addr)
        await client.send_all(req)
        await client.read_until(lambda b: head_complete(b) and content_chunks(b) >= 5, 5.0)
        assert status_of(bytes(client.buf)) == 200
        t_action = client.act(how)
        rec = await upstream_closed(mock_upstream, bench_id)
        latency = assert_cut_early(rec, t_action, within=CLOSE_WITHIN)
        await assert_metered_once(state, {"client_gone": 1})
        if how == "half_close":  # the gateway treats it as a disconnect and lets go of the socket
            await client.read_to_eof(2.0)
    finally:
        client.close()
    report(request, latency)


# -- 2. streaming, before the first token ------------------------------------------------------


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("hold", [0, 1], ids=["head_sent", "hold_headers"])
async def test_before_first_token(
    hold: int,
    how: str,
    nursery: trio.Nursery,
    enclave_key: EnclaveKey,
    mock_upstream: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    state, addr = await serve(nursery, enclave_key, mock_upstream)
    bench_id, req = request_bytes(
        *addr, stream=True, tokens=50, delay_ms=20, ttft_ms=3000, hold_headers=hold
    )
    client = RawClient()
    try:
        await client.connect(addr)
        t_sent = trio.current_time()
        await client.send_all(req)
        if not hold:  # the provider answered its head at once: so does the gateway
            await client.read_until(head_complete, 1.0)
            head = bytes(client.buf)
            assert status_of(head) == 200 and b"text/event-stream" in head.lower()
        # nothing more may come before the first token (keep-alive is 15 s by default)
        await client.expect_silence_until(t_sent + ACT_AT)
        t_action = client.act(how)
        rec = await upstream_closed(mock_upstream, bench_id)
        assert rec["t_first_chunk"] is None and rec["chunks_written"] == 0, _brief([rec])
        latency = assert_cut_early(rec, t_action, within=CLOSE_WITHIN)
        await assert_metered_once(state, {"client_gone": 1})
    finally:
        client.close()
    report(request, latency)


# -- 3. non-streaming, abandoned during a long generation ---------------------------------------


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("hold", [0, 1], ids=["plain", "hold_headers"])
async def test_non_streaming(
    hold: int,
    how: str,
    nursery: trio.Nursery,
    enclave_key: EnclaveKey,
    mock_upstream: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    state, addr = await serve(nursery, enclave_key, mock_upstream)
    # 2000 tokens x 5 ms: a 10 s generation, answered in one piece at the end
    bench_id, req = request_bytes(
        *addr, stream=False, tokens=2000, delay_ms=5, ttft_ms=50, hold_headers=hold
    )
    client = RawClient()
    try:
        await client.connect(addr)
        t_sent = trio.current_time()
        await client.send_all(req)
        await client.expect_silence_until(t_sent + ACT_AT)
        t_action = client.act(how)
        rec = await upstream_closed(mock_upstream, bench_id)
        assert rec["stream"] is False and rec["t_first_chunk"] is None, _brief([rec])
        latency = assert_cut_early(rec, t_action, within=CLOSE_WITHIN)
        await assert_metered_once(state, {"client_gone": 1})
    finally:
        client.close()
    report(request, latency)


# -- 4. a client that never reads ---------------------------------------------------------------

STALL = 0.5


async def test_stalled_reader(
    nursery: trio.Nursery,
    enclave_key: EnclaveKey,
    mock_upstream: MockUpstream,
    request: pytest.FixtureRequest,
) -> None:
    # keepalive (default 15 s) < idle (default 120 s): a valid combination with a short stall
    state, addr = await serve(nursery, enclave_key, mock_upstream, {"client_stall": STALL})
    tokens = 20_000  # ~150 bytes each, one every 0.25 ms: 5 s of generation, ~3 MB
    bench_id, req = request_bytes(*addr, stream=True, tokens=tokens, delay_ms=0.25, ttft_ms=0)
    client = RawClient(rcvbuf=4096)
    try:
        await client.connect(addr)
        await client.send_all(req)
        t_action = time.monotonic()  # the client never reads: it stopped reading from the start
        rec = await upstream_closed(mock_upstream, bench_id, limit=STALL + RECORD_WAIT)
        latency = assert_cut_early(rec, t_action, within=STALL + 1.0)
        # the stall deadline starts only once a hand-off blocks: nothing can cut it sooner
        assert latency >= STALL, f"upstream closed after {latency * 1e3:.1f} ms, before the stall"
        await assert_metered_once(state, {"client_stalled": 1})
        # The client is still connected and still not reading. Hypercorn's write is shielded
        # with no timeout, so only TCP_USER_TIMEOUT (client_stall + 0.5 s here, set on the
        # listening socket) frees it: the kernel aborts the connection, the write fails and
        # Hypercorn closes its end. Without it the connection stays ESTABLISHED for as long as
        # the client keeps its window shut (measured: > 10 s).
        gport, cport = addr[1], client.raw.getsockname()[1]
        assert _server_side_state(gport, cport) is not None, "connection gone too early"
        t_freed = await _wait_server_side_gone(gport, cport, limit=STALL + 0.5 + 3.0)
        assert t_freed - t_action >= STALL, "aborted before the relay's own stall deadline"
        await assert_metered_once(state, {"client_stalled": 1})  # never a second time
    finally:
        client.close()
    report(request, latency)


def _server_side_state(gport: int, cport: int) -> str | None:
    """The TCP state (hex, /proc/net/tcp) of the gateway's end of one connection, or None."""
    with open("/proc/net/tcp") as fh:
        lines = fh.read().splitlines()[1:]
    for line in lines:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == gport and int(f[2].rsplit(":", 1)[1], 16) == cport:
            return f[3]
    return None


async def _wait_server_side_gone(gport: int, cport: int, *, limit: float) -> float:
    with trio.fail_after(limit):
        while _server_side_state(gport, cport) is not None:  # noqa: ASYNC110 - polling the kernel
            await trio.sleep(0.02)
    return time.monotonic()
