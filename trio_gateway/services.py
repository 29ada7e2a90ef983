"""Background services (heartbeat, price feed, …) in the app-owned nursery.

A task that raises in the app nursery would take the whole gateway down, so every service runs
under ``supervise``: an exception is logged (type only) and the service restarts after a backoff
that grows to ``max_backoff``; cancellation (shutdown) ends it at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("trio_gateway.services")

Service = Callable[[], Awaitable[None]]


async def supervise(
    name: str, service: Service, *, backoff: float = 1.0, max_backoff: float = 60.0
) -> None:
    delay = backoff
    while True:
        try:
            await service()
            return  # a service that returns is done
        except Exception as exc:
            log.error(
                "service %s failed (%s); restarting in %.1fs", name, type(exc).__name__, delay
            )
        await trio.sleep(delay)
        delay = min(delay * 2, max_backoff)
