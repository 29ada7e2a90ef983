"""The ASGI side of the relay: a response kind whose body is produced by a task, not a generator.

A view returns ``RelayResponse(relay, job)``. quart-trio runs ``_send_response`` inside the ASGI
request task, which it cancels on ``http.disconnect``; here we open the response nursery in that
task, start ``Relay.run`` in it, and copy what it emits to the server. No generator, so no
``yield`` inside a nursery or cancel scope (the PEP 789 hazard), and the upstream is structurally
owned by the request. Status and headers come from the relay (``Start``), so an upstream failure
before the first byte is still a proper HTTP error; headers added by ``after_request`` hooks on
the Quart response are kept.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import ASGISendCallable
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection

from .core import Relay, RelayJob
from .events import Emit, Start

_RELAY_OWNED = frozenset({b"content-type", b"content-length"})


class RelayResponse(Response):
    def __init__(self, relay: Relay, job: RelayJob) -> None:
        super().__init__(b"")
        self.relay = relay
        self.job = job
        self.timeout = None  # our own deadlines apply, never Quart's RESPONSE_TIMEOUT


class RelayHTTPConnection(TrioASGIHTTPConnection):
    async def _send_response(self, send: ASGISendCallable, response: Any) -> None:
        if not isinstance(response, RelayResponse):
            await super()._send_response(send, response)
            return
        extra = [
            (k.lower().encode("latin1"), v.encode("latin1"))
            for k, v in response.headers.items()
            if k.lower().encode("latin1") not in _RELAY_OWNED
        ]
        started = False
        send_chan, recv_chan = trio.open_memory_channel[Emit](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(response.relay.run, response.job, send_chan)
            async with recv_chan:
                async for item in recv_chan:
                    if isinstance(item, Start):
                        await send(
                            {
                                "type": "http.response.start",
                                "status": item.status,
                                "headers": [*item.headers, *extra],
                            }
                        )
                        started = True
                        if item.body:
                            await send(
                                {"type": "http.response.body", "body": item.body, "more_body": True}
                            )
                    elif started:
                        await send({"type": "http.response.body", "body": item, "more_body": True})
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
