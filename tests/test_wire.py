"""The corked upstream wire: a request leaves in one write; reads flush; cork limit respected."""

from __future__ import annotations

from typing import Any

import trio

from trio_gateway.relay.wire import CORK_LIMIT, CorkedStream


class FakeStream:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b"HTTP/1.1 200 OK\r\n"

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(buffer)

    async def aclose(self) -> None:
        self.closed = True

    def get_extra_info(self, info: str) -> Any:
        return info


async def test_head_and_body_leave_in_one_write() -> None:
    inner = FakeStream()
    s = CorkedStream(inner)  # type: ignore[arg-type]
    await s.write(b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n")
    await s.write(b"{}")
    await s.write(b"")
    assert inner.writes == []
    assert await s.read(100) == b"HTTP/1.1 200 OK\r\n"
    assert inner.writes == [b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}"]
    await s.read(100)
    assert len(inner.writes) == 1
    assert s.get_extra_info("x") == "x"


async def test_large_bodies_are_not_held_back() -> None:
    inner = FakeStream()
    s = CorkedStream(inner)  # type: ignore[arg-type]
    await s.write(b"h" * 100)
    await s.write(b"b" * CORK_LIMIT)
    assert len(inner.writes) == 1 and len(inner.writes[0]) == CORK_LIMIT + 100
    await s.write(b"tail")
    await s.aclose()
    assert inner.closed and len(inner.writes) == 1  # a closed connection sends nothing more
