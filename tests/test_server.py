"""Start-up pieces: CLI and settings validation, nitriding registration, supervised services,
and the real server with its lifespan."""

from __future__ import annotations

import base64
import hashlib
import itertools
import subprocess
import sys

import httpx
import pytest
import trio

from tests.conftest import REPO, make_state, start_gateway
from trio_gateway.__main__ import parse_args, settings_from_args
from trio_gateway.services import supervise
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.signing.nitriding import NitridingError, register_with_nitriding


def test_cli_flags_become_settings() -> None:
    s = settings_from_args(
        parse_args(
            ["--dev", "--port", "9001", "--client-stall-timeout", "3", "--idle-timeout", "20"]
        )
    )
    assert s.dev and s.port == 9001 and not s.nitriding
    assert s.deadlines.client_stall == 3 and s.deadlines.idle == 20
    assert s.deadlines.total == 900


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "port"),
        (["--dev", "--keepalive-timeout", "500"], "keepalive"),
        (["--dev", "--idle-timeout", "-1"], "idle"),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(argv: list[str], needle: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trio_gateway", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "invalid settings" in r.stderr and needle in r.stderr
    assert "Traceback" not in r.stderr


def test_help_documents_the_flags() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trio_gateway", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    for flag in ("--dev", "--host", "--port", "--client-stall-timeout", "--no-nitriding"):
        assert flag in r.stdout


def test_env_key_ignored_outside_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    s = settings_from_args(parse_args([]))
    assert s.openai_api_key is None and s.env_keys_ignored
    d = settings_from_args(parse_args(["--dev"]))
    assert d.openai_api_key == "sk-env"


# -- nitriding ----------------------------------------------------------------------------------


async def test_nitriding_registration_retries_then_succeeds(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[tuple[str, bytes]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.path, req.content))
        if len(seen) == 1:
            return httpx.Response(503)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await register_with_nitriding(client, "http://nitriding:8080/", enclave_key, deadline=5)
    expected = base64.b64encode(hashlib.sha256(enclave_key.public_der).digest())
    assert seen == [
        ("/enclave/hash", expected),
        ("/enclave/hash", expected),
        ("/enclave/ready", b""),
    ]


async def test_nitriding_unreachable_fails_within_deadline(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    start = trio.current_time()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(NitridingError, match="--no-nitriding"):
            await register_with_nitriding(client, "http://n:8080", enclave_key, deadline=3)
    assert trio.current_time() - start == pytest.approx(3, abs=0.01)


# -- services -----------------------------------------------------------------------------------


async def test_supervised_service_restarts_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise RuntimeError("boom")

    await supervise("flaky", flaky, backoff=1, max_backoff=2)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(runs)]
    assert gaps == [1, 2, 2]


async def test_real_server_runs_services_and_survives_their_failure(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    st = make_state(enclave_key)
    ticks = trio.Event()
    calls = 0

    async def service() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first run fails")
        ticks.set()
        await trio.sleep_forever()

    st.services["test"] = service
    url = await start_gateway(nursery, st)
    with trio.fail_after(5):
        await ticks.wait()
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{url}/health")
    assert r.status_code == 200 and r.json()["status"] == "OK"
