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


class ServiceHost:
    """The app's background services (price feed, reconciler, heartbeat, …) in one nursery of
    their own, hosted by a single task in the app nursery. Shutdown stops them all and waits
    until they have ended *before* settling sessions and closing HTTP clients, so no service
    is still using a client that is being closed (quart-trio would otherwise leave them running
    through ``after_serving`` until its background-task deadline)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._started = True
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._done.set()

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def start(self, name: str, service: Service) -> None:
        if self._nursery is None:
            raise RuntimeError("the service host is not running")
        self._nursery.start_soon(supervise, name, service, name=f"service:{name}")

    async def stop(self, grace: float = 5.0) -> bool:
        """Cancel every service; True once all have ended (within ``grace`` seconds)."""
        if not self._started:
            return True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        with trio.move_on_after(grace):
            await self._done.wait()
        return self._done.is_set()
