"""Serving: Hypercorn's trio worker, signals and graceful shutdown, nitriding registration.

Shutdown (SIGTERM or SIGINT), in order:

1. ``AppState.begin_shutdown``: new POSTs get 503 ``shutting_down``; the relay gives every running
   upstream call the end of the grace period (``shutdown_grace``) as its deadline.
2. Hypercorn stops accepting connections, closes idle keep-alive ones, and lets running requests
   finish; it cancels what is left a little after the grace period (the relay's shielded signing
   and metering still complete: they have their own bounds).
3. after_serving: every open payment session is settled (shielded, bounded), clients closed.
4. ``trio.run`` returns and the process exits 0.

A second signal shortens the grace period to zero. A crash is never papered over: there is one
process with one key, nothing respawns it (``__main__`` exits non-zero and ``scripts/start.sh``
takes the enclave down with it).
"""

from __future__ import annotations

import logging
import signal
import socket

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import serve

from .app import create_app
from .payments.x402_gate import PaymentSettings
from .signing.nitriding import register_with_nitriding
from .state import AppState

log = logging.getLogger("trio_gateway.server")

# Beyond the grace period: the relay's final hand-off and signing, then Hypercorn cancels.
SHUTDOWN_MARGIN = 5.0
# A stalled reader's connection is aborted by the kernel this long after the relay gave up on it.
STALL_MARGIN = 5.0


class GatewayConfig(Config):
    """Hypercorn's config, plus TCP_USER_TIMEOUT on the listening sockets (accepted connections
    inherit it). Hypercorn's socket write is shielded and has no timeout, so a client that stops
    reading would pin its connection (and the task writing to it) for as long as the peer keeps
    the TCP window shut. With TCP_USER_TIMEOUT the kernel aborts a connection whose queued data
    could not be delivered (unacknowledged, or stuck behind a zero window) for that long: the
    write fails, Hypercorn closes the connection. The relay's own ``client_stall`` deadline has
    already freed the upstream by then."""

    tcp_user_timeout: float | None = None

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        if self.tcp_user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            ms = int(self.tcp_user_timeout * 1000)
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
        return sockets


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hypercorn_config(
    host: str,
    port: int,
    *,
    operator: tuple[str, int] | None = None,
    shutdown_grace: float = 30.0,
    tcp_user_timeout: float | None = None,
    lifespan_shutdown: float = 60.0,
) -> GatewayConfig:
    cfg = GatewayConfig()
    cfg.bind = [_bind(host, port)]
    if operator is not None:  # second, so that it is the second of the reported binds
        cfg.bind.append(_bind(*operator))
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.keep_alive_timeout = 75  # above typical proxy idle timeouts (nitriding's Go proxy: 60 s)
    cfg.graceful_timeout = shutdown_grace + SHUTDOWN_MARGIN
    cfg.backlog = 2048
    cfg.h11_max_incomplete_size = 64 * 1024  # request line + headers cap
    cfg.include_server_header = False
    cfg.tcp_user_timeout = tcp_user_timeout
    # after_serving stops the services (up to the settle deadline + 2 s) and settles every open
    # session (bounded in all by the payment shutdown timeout, 30 s): Hypercorn's 60 s default
    # for the lifespan shutdown could cut a clean drain short (SECURITY F18)
    cfg.shutdown_timeout = max(cfg.shutdown_timeout, lifespan_shutdown)
    return cfg


def note_operator_endpoint(state: AppState, binds: list[str]) -> None:
    """Record where the operator listener ended up (its port may have been 0). Hypercorn reports
    binds in ``cfg.bind`` order: the public listener first, the operator listener second."""
    s = state.settings
    if s.operator_port is None:
        return
    if len(binds) != 2:
        raise RuntimeError(f"expected the public and the operator listener, got {binds}")
    state.operator_endpoint = (s.operator_host, int(binds[1].rsplit(":", 1)[1]))


async def _watch_signals(
    state: AppState, stop: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """First signal: drain with the configured grace. Second: drain now."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for sig in signals:
            name = signal.Signals(sig).name
            if not stop.is_set():
                grace = state.settings.shutdown_grace
                log.info(
                    "received %s: draining (%d in flight, grace %.0fs)",
                    name,
                    state.relay.in_flight,
                    grace,
                )
                state.begin_shutdown(grace)
                stop.set()
            else:
                log.warning("received %s again: ending in-flight requests now", name)
                state.begin_shutdown(0.0)


async def run_server(
    state: AppState, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    s = state.settings
    app = create_app(state)
    cfg = hypercorn_config(
        s.host,
        s.port,
        operator=(s.operator_host, s.operator_port) if s.operator_port is not None else None,
        shutdown_grace=s.shutdown_grace,
        # after the relay's own stall deadline, so that one fires first and meters the request
        tcp_user_timeout=s.deadlines.client_stall + STALL_MARGIN,
        # services (settle deadline + 2 s), then the payment shutdown (30 s), plus a margin
        lifespan_shutdown=s.deadlines.settle + 2.0 + PaymentSettings.shutdown_timeout + 15.0,
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, state, stop)

        async def _serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, cfg, shutdown_trigger=stop.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # the signal watcher has nothing left to do

        binds: list[str] = await nursery.start(_serve)
        note_operator_endpoint(state, binds)
        for b in binds:
            log.info("listening on %s", b)
        if state.operator_endpoint is not None:
            log.info("operator listener (POST /v1/keys) on port %d", state.operator_endpoint[1])
        elif not s.dev:
            log.warning(
                "no --operator-port: POST /v1/keys is accepted from loopback peers that did not "
                "come through a proxy; in an enclave, run with an operator listener"
            )
        if s.nitriding:
            await register_with_nitriding(
                state.client, str(s.nitriding_url), state.key, deadline=s.nitriding_timeout
            )
        else:
            log.info("nitriding registration skipped")
        task_status.started(binds)
    log.info("shut down")
