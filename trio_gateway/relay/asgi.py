"""The ASGI side of the relay: a response kind whose body is produced by a task, not a generator.

A view returns ``RelayResponse(relay, job)``. quart-trio runs ``_send_response`` inside the ASGI
request task, which it cancels on ``http.disconnect``; here we open the response nursery in that
task, start ``Relay.run`` in it, and copy what it emits to the server. No generator, so no
``yield`` inside a nursery or cancel scope (the PEP 789 hazard), and the upstream is structurally
owned by the request. Status and headers come from the relay (``Start``), so an upstream failure
before the first byte is still a proper HTTP error; headers added by ``after_request`` hooks on
the Quart response are kept.

What the consumer writes is decided by the response's ``Framing``: the default passes the relay's
items through as they are; another framing (the OHTTP gateway's sealing one) turns each item into
other bytes, may hold them back (a single sealed message is written at the end) and sees the
job's outcome at the end (a chunked OHTTP stream gets its final chunk only on success). Either
way the relay runs in the same task tree, so a disconnect cancels the upstream the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.typing import ASGISendCallable
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection

from .core import Relay, RelayJob
from .events import Emit, Start
from .metering import Outcome

_RELAY_OWNED = frozenset({b"content-type", b"content-length"})


@dataclass(frozen=True, slots=True)
class Head:
    """Write ``http.response.start`` (the response's own extra headers are appended)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()


Out = Head | bytes


class Framing:
    """Turns what the relay emits into what is written. This default writes it unchanged.
    Methods run in the consumer task, must not block and should not raise: an exception here
    cancels the relay like a client that left."""

    def start(self, item: Start) -> list[Out]:
        return [Head(item.status, item.headers), item.body]

    def data(self, item: bytes) -> list[Out]:
        return [item]

    def end(self, outcome: Outcome | None) -> list[Out]:
        """The relay finished (its channel closed) with ``outcome``; not called on cancel."""
        return []


PLAIN = Framing()


class RelayResponse(Response):
    def __init__(self, relay: Relay, job: RelayJob, framing: Framing = PLAIN) -> None:
        super().__init__(b"")
        self.relay = relay
        self.job = job
        self.framing = framing
        self.timeout = None  # our own deadlines apply, never Quart's RESPONSE_TIMEOUT


# The last ``send`` of a response: Hypercorn ends the message and, for a client that asked for
# ``Connection: close`` (or HTTP/1.0), closes the connection inside this very call. quart-trio
# cancels the request task as soon as the server reports the client gone, which happens during
# that same close, so the close itself was cancelled halfway and the socket stayed open until
# the client hung up (measured: for ever, for a client that waits for EOF). Shielded, bounded.
FINAL_SEND_BOUND = 5.0


def _shield_final_send(send: ASGISendCallable) -> ASGISendCallable:
    async def wrapped(message: Any) -> None:
        if message.get("type") == "http.response.body" and not message.get("more_body", False):
            with trio.move_on_after(FINAL_SEND_BOUND, shield=True):
                await send(message)
        else:
            await send(message)

    return wrapped


# ``request.scope[ADMITTED]``: a list the connection puts in every request's scope; a paid route
# appends the request id whose reservation it holds. The relay's metering hook consumes the
# reservation; if the request ends before the relay ever ran (the route failed, or the client
# left while Quart was still finishing the response object), ``handle_request`` frees it at once
# instead of leaving it to the orphan reaper (20 minutes later). An OHTTP inner request's scope is
# copied from the outer one, so it shares the list.
ADMITTED = "trio_gateway.admitted"


class RelayHTTPConnection(TrioASGIHTTPConnection):
    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, send: ASGISendCallable
    ) -> None:
        admitted: list[str] = []
        request.scope[ADMITTED] = admitted
        try:
            await super().handle_request(nursery, request, send)
        finally:
            gate = self.app.extensions["trio_gateway"].payments
            if admitted and gate is not None:
                # a no-op for each one the relay ran: its hook already finished it
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    for rid in admitted:
                        await gate.abandon(rid)

    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        send = _shield_final_send(send)
        if not isinstance(response, RelayResponse):
            await super()._send_response(send, response)
            return
        extra = [
            (k.lower().encode("latin1"), v.encode("latin1"))
            for k, v in response.headers.items()
            if k.lower().encode("latin1") not in _RELAY_OWNED
        ]
        started = False
        framing = response.framing

        async def write(outs: list[Out]) -> None:
            nonlocal started
            for out in outs:
                if isinstance(out, Head):
                    await send(
                        {
                            "type": "http.response.start",
                            "status": out.status,
                            "headers": [*out.headers, *extra],
                        }
                    )
                    started = True
                elif started and out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})

        send_chan, recv_chan = trio.open_memory_channel[Emit](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(response.relay.run, response.job, send_chan)
            async with recv_chan:
                async for item in recv_chan:
                    await write(
                        framing.start(item) if isinstance(item, Start) else framing.data(item)
                    )
            # the relay's channel is closed, so its outcome is set (the hook may still run)
            await write(framing.end(response.job.record.outcome))
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
