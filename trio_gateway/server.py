"""Serving: Hypercorn's trio worker, signal handling, nitriding registration after bind."""

from __future__ import annotations

import logging
import signal
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .app import create_app
from .signing.nitriding import register_with_nitriding
from .state import AppState

log = logging.getLogger("trio_gateway.server")


def hypercorn_config(host: str, port: int) -> Config:
    cfg = Config()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn.error")
    cfg.keep_alive_timeout = 75  # above typical proxy idle timeouts (nitriding's Go proxy: 60 s)
    cfg.graceful_timeout = 10
    cfg.backlog = 2048
    cfg.h11_max_incomplete_size = 64 * 1024  # request line + headers cap
    cfg.include_server_header = False
    return cfg


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for sig in signals:
            log.info("received %s: shutting down", signal.Signals(sig).name)
            return


async def run_server(
    state: AppState, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    s = state.settings
    app = create_app(state)
    cfg = hypercorn_config(s.host, s.port)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(serve, app, cfg, shutdown_trigger=_until_signal)
        )
        for b in binds:
            log.info("listening on %s", b)
        if s.nitriding:
            await register_with_nitriding(
                state.client, str(s.nitriding_url), state.key, deadline=s.nitriding_timeout
            )
        else:
            log.info("nitriding registration skipped")
        task_status.started(binds)
