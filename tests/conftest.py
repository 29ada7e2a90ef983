"""Shared test fixtures: settings, app state, a real Hypercorn gateway on loopback, the bench mock
provider as a subprocess, and a minimal ASGI driver for in-process tests.

Real parts wherever a user would meet them: real Hypercorn sockets, real RSA/keccak, the official
``openai`` SDK. Remote providers are the only thing mocked: ``../shared/bench/mock_upstream.py``
(a separate process that records when we close its connections) or ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.trio import serve

from trio_gateway.app import create_app
from trio_gateway.config import Deadlines, Settings
from trio_gateway.server import hypercorn_config, note_operator_endpoint
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRIO_GATEWAY_SHARED", REPO.parent / "shared"))
MOCK_UPSTREAM = SHARED / "bench" / "mock_upstream.py"


@pytest.fixture(scope="session")
def enclave_key() -> EnclaveKey:
    """One RSA key for the session: generation costs ~50 ms, signing is what we test."""
    return EnclaveKey.generate()


def make_settings(**kw: Any) -> Settings:
    deadlines = kw.pop("deadlines", None)
    s = Settings(dev=kw.pop("dev", True), **kw)
    if deadlines is not None:
        s.deadlines = Deadlines(**{**s.deadlines.model_dump(), **deadlines})
    return s


def make_state(
    key: EnclaveKey,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    **settings: Any,
) -> AppState:
    return AppState.build(make_settings(**settings), key=key, transport=transport)


async def start_gateway(nursery: trio.Nursery, state: AppState) -> str:
    """Serve the app with Hypercorn's trio worker on 127.0.0.1:<free port>; return the base URL.
    With ``operator_port`` set (0: any free port), the operator listener is bound too and
    recorded on the state (``state.operator_endpoint``). The server lives in ``nursery``
    (pytest-trio cancels it at teardown)."""
    app = create_app(state)
    s = state.settings
    cfg = hypercorn_config(
        "127.0.0.1",
        0,
        operator=(s.operator_host, s.operator_port) if s.operator_port is not None else None,
        tcp_user_timeout=s.deadlines.client_stall + 0.5,
    )
    cfg.graceful_timeout = 0.5
    binds: list[str] = await nursery.start(partial(serve, app, cfg))
    note_operator_endpoint(state, binds)
    return binds[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MockUpstream:
    """``../shared/bench/mock_upstream.py`` in its own process; ``stats()`` reads its ledger."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    def stats(self, **params: str) -> dict[str, Any]:
        q = "&".join(f"{k}={v}" for k, v in params.items())
        with urllib.request.urlopen(f"{self.url}/_bench/stats?{q}", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def records(self, bench_id: str) -> list[dict[str, Any]]:
        return list(self.stats(id=bench_id, detail="1").get("requests", []))


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    if not MOCK_UPSTREAM.exists():
        pytest.fail(f"{MOCK_UPSTREAM} not found: ../shared must sit beside the repo")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(MOCK_UPSTREAM), "--port", str(port), "--parent-pid", str(os.getpid())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mock upstream did not start")
            time.sleep(0.05)
    try:
        yield MockUpstream(port, proc)
    finally:
        proc.terminate()
        proc.wait(5)
