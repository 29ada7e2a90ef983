"""The upstream wire: one process-wide ``httpx.AsyncClient`` over HTTP/1.1, with corked writes.

httpcore writes a request in two syscalls (head, then body). On a busy gateway each loopback or
LAN write is a packet, a wake-up of the peer and, measured with py-spy on the bench (gateway
pinned to one core), about a fifth of the gateway's CPU per non-streamed request. ``CorkedStream``
holds writes until the connection is next read (an HTTP/1.1 client always reads after it has
written the whole request) or the buffer passes 64 KiB, so a typical request leaves in one write.
Nothing else changes: connect, TLS, reads, cancellation and close are httpcore's (trio backend).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx
import trio

CORK_LIMIT = 64 << 10


class CorkedStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._timeout: float | None = None

    async def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            await self._inner.write(data, self._timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._pending.append(buffer)
        self._pending_len += len(buffer)
        self._timeout = timeout
        if self._pending_len >= CORK_LIMIT:
            await self._flush()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        await self._flush()
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._pending.clear()
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        await self._flush()
        return CorkedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CorkedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return CorkedStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return CorkedStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class UpstreamTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, HTTP/1.1 only, on a connection pool with the corked backend.

    A cancelled HTTP/2 stream is never reset by httpcore (httpcore#943), so the upstream would
    keep generating for a client that left: HTTP/2 is off on purpose.
    """

    def __init__(self, *, limits: httpx.Limits) -> None:
        super().__init__(http1=True, http2=False, limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=CorkedBackend(),
        )


# -- reading a response body that may be cut short --------------------------------------------


class BodyTooLarge(Exception):
    pass


async def read_capped(resp: httpx.Response, cap: int) -> bytes:
    """The whole body of a streamed response, at most ``cap`` bytes (``BodyTooLarge`` above;
    the connection is then closed and the iterators ended, see ``end_body_iterators``)."""
    buf = bytearray()
    chunks = resp.aiter_bytes()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > cap:
            await end_body_iterators(resp, chunks)
            raise BodyTooLarge(cap)
    return bytes(buf)


async def end_body_iterators(resp: httpx.Response, chunks: AsyncIterator[bytes]) -> None:
    """httpx's body iterators are a chain of nested async generators (encode/httpx#3686).
    Stopped between two chunks (a cancelled hand-off, a parse error, a size cap), every layer
    stays suspended at a ``yield`` and would be garbage-collected un-exhausted (trio warns; an
    error under ``-W error``). ``aclose()`` on the outer one ends only that layer. So: close the
    connection first (the upstream sees it at once), then step the chain, so the read error runs
    through every layer and ends it. Shielded and bounded: this runs while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        await resp.aclose()
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            async for _ in chunks:
                pass
