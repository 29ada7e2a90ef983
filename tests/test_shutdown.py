"""Graceful shutdown: drain, the grace period, refusal of new work, exit codes.

Two levels:

* in-process, on virtual time (``autojump_clock``): the relay's drain against a scripted provider
  wire — a stream that finishes inside the grace period is signed as usual; one still running at
  its end gets a final ``shutting_down`` error event (nothing signed, no ``[DONE]``), is metered
  exactly once as ``shutdown`` and its upstream connection is closed; new POSTs get 503;
  ``/health`` says DRAINING; a second signal ends everything at once; the drain never lengthens
  an earlier deadline.
* a real process (``python -m trio_gateway --dev``) and a real SIGTERM: a stream in flight
  completes signed, a new connection is refused, the process exits 0; with a short grace the
  stream ends with the error event; a second SIGTERM cuts the grace; a crash exits 70 and is
  never restarted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.asgi import HANG, Disconnect, ScriptedUpstream, oai_chunk, oai_text_stream, verify_tee
from tests.conftest import free_port
from tests.test_relay import USAGE, Gateway, chat, events, guarded_nursery, streamed_text
from trio_gateway.__main__ import EXIT_CRASHED, serve_until_shutdown
from trio_gateway.relay.metering import Outcome
from trio_gateway.signing.keys import EnclaveKey

# -- in-process, virtual time --------------------------------------------------------------------


def slow_stream(words: list[str], gap: float) -> list[Any]:
    """An OpenAI stream with ``gap`` seconds before each word."""
    script: list[Any] = [oai_chunk({"role": "assistant", "content": ""})]
    for w in words:
        script += [gap, oai_chunk({"content": w})]
    script += [oai_chunk({}, "stop"), oai_chunk(usage=USAGE, choices=False), b"data: [DONE]\n\n"]
    return script


async def test_stream_inside_the_grace_period_completes_signed(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    words = ["a", "b", "c", "d"]
    gw = Gateway(enclave_key, ScriptedUpstream(slow_stream(words, 1.0)))  # 4 s
    results = []
    async with guarded_nursery() as nursery:

        async def client() -> None:
            results.append(await gw.post(chat()))

        nursery.start_soon(client)
        await trio.sleep(1.5)
        assert gw.state.relay.in_flight == 1
        gw.state.begin_shutdown(10.0)
    res = results[0]
    evs = events(res)
    assert evs[-1] == "[DONE]" and streamed_text(evs) == "abcd"
    verify_tee(evs[-2], await gw.public_key(), output="abcd")
    assert gw.meter.only.outcome == Outcome.COMPLETE
    assert gw.state.relay.in_flight == 0


async def test_stream_still_running_at_the_end_of_grace_gets_an_error_event(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream(slow_stream(["a", "b", "c", "d", "e"], 1.0)))
    results = []
    async with guarded_nursery() as nursery:

        async def client() -> None:
            results.append(await gw.post(chat()))

        nursery.start_soon(client)
        await trio.sleep(2.5)  # "a" and "b" delivered
        t_signal = trio.current_time()
        gw.state.begin_shutdown(1.0)
    res = results[0]
    assert res.status == 200 and res.complete
    evs = events(res)
    assert "[DONE]" not in evs and b"tee_" not in res.body, "a cut stream must not look signed"
    err = evs[-1]["error"]
    assert err["code"] == "shutting_down" and err["retryable"] is True
    assert streamed_text(evs) == "abc"  # "c" arrived at 3.0 s, inside the grace period
    rec = gw.meter.only
    assert rec.outcome == Outcome.SHUTDOWN and rec.delivered_events == 3
    assert rec.finished_at == pytest.approx(t_signal + 1.0)
    assert gw.upstream_closed, "the upstream call outlived the grace period"


async def test_non_stream_cut_at_the_end_of_grace_is_503(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream([], head=HANG, content_type="application/json"))
    results = []
    async with guarded_nursery() as nursery:

        async def client() -> None:
            results.append(await gw.post(chat(stream=False)))

        nursery.start_soon(client)
        await trio.sleep(1.0)
        gw.state.begin_shutdown(2.0)
    res = results[0]
    assert res.status == 503 and res.header("retry-after") == "1"
    assert res.json()["error"]["code"] == "shutting_down"
    assert gw.meter.only.outcome == Outcome.SHUTDOWN
    assert gw.upstream.log.head_cancelled == 1


async def test_draining_refuses_new_work_and_health_says_so(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream(oai_text_stream(["x"])))
    h = await gw.client.request("GET", "/health")
    assert h.status == 200 and h.json()["status"] == "OK" and h.json()["draining"] is False
    gw.state.begin_shutdown(30.0)
    res = await gw.post(chat())
    assert res.status == 503 and res.header("retry-after") == "1"
    assert res.json()["error"]["code"] == "shutting_down"
    assert gw.upstream.log.requests == [], "a refused request must not reach the provider"
    assert gw.meter.records == []
    h = await gw.client.request("GET", "/health")
    assert h.status == 503 and h.json()["status"] == "DRAINING"
    assert (await gw.client.request("GET", "/signing-key")).status == 200  # reads still answer


async def test_second_signal_ends_everything_now_and_drain_never_extends(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(
        enclave_key,
        ScriptedUpstream(slow_stream(["a"] * 100, 1.0)),
        deadlines={"total": 5.0},
    )
    results = []
    async with guarded_nursery() as nursery:

        async def client() -> None:
            results.append(await gw.post(chat()))

        nursery.start_soon(client)
        await trio.sleep(1.5)
        gw.state.begin_shutdown(60.0)  # longer than the call's own total: changes nothing
        assert gw.state.relay.drain_deadline == pytest.approx(trio.current_time() + 60.0)
        await trio.sleep(0.5)
        gw.state.begin_shutdown(0.0)  # the second signal
        t_second = trio.current_time()
    rec = gw.meter.only
    assert rec.outcome == Outcome.SHUTDOWN and rec.finished_at == pytest.approx(t_second)
    assert events(results[0])[-1]["error"]["code"] == "shutting_down"
    gw.state.begin_shutdown(60.0)  # a later, longer grace cannot undo the shorter one
    assert gw.state.relay.drain_deadline == pytest.approx(t_second)


async def test_total_deadline_before_the_end_of_grace_is_still_a_timeout(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(
        enclave_key, ScriptedUpstream(slow_stream(["a"] * 100, 1.0)), deadlines={"total": 3.0}
    )
    results = []
    async with guarded_nursery() as nursery:

        async def client() -> None:
            results.append(await gw.post(chat()))

        nursery.start_soon(client)
        await trio.sleep(1.0)
        gw.state.begin_shutdown(30.0)
    assert events(results[0])[-1]["error"]["code"] == "total"
    assert gw.meter.only.outcome == Outcome.UPSTREAM_TIMEOUT


async def test_client_leaving_during_the_drain_is_metered_once(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    gw = Gateway(enclave_key, ScriptedUpstream(slow_stream(["a"] * 20, 1.0)))
    bye = Disconnect()
    async with guarded_nursery() as nursery:
        nursery.start_soon(lambda: gw.post(chat(), disconnect=bye))
        await trio.sleep(1.5)
        gw.state.begin_shutdown(10.0)
        await trio.sleep(1.0)
        bye.set()
    assert gw.meter.only.outcome == Outcome.CLIENT_GONE
    assert gw.upstream_closed


# -- the real process ---------------------------------------------------------------------------


class GatewayProcess:
    """``python -m trio_gateway --dev`` on a free port, its log captured."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_gateway", "--dev", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"gateway did not start: {self.output()}") from None
                time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, limit: float) -> int:
        return self.proc.wait(timeout=limit)

    async def exit(self, limit: float = 15) -> tuple[int, str]:
        """Wait for the process to end: (exit code, its whole log)."""
        code = await trio.to_thread.run_sync(self.wait, limit)
        return code, self.output()

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        return out.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stream_body(max_tokens: int = 60) -> dict[str, Any]:
    return {
        "model": "trio-mock",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "count slowly"}],
    }


async def read_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], first: trio.Event
) -> list[str]:
    data: list[str] = []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                first.set()
    return data


async def sigterm_during_a_stream(gp: GatewayProcess, *, twice: bool = False) -> list[str]:
    first = trio.Event()
    out: list[list[str]] = []
    async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

        async def reader() -> None:
            out.append(await read_stream(client, gp.url, stream_body(), first))

        nursery.start_soon(reader)
        with trio.fail_after(10):
            await first.wait()
        gp.signal()
        await trio.sleep(0.3)
        # no new connection is accepted once the drain began (listener closed or never
        # accepting): a fresh client fails or gets 503
        async with httpx.AsyncClient(timeout=2) as fresh:
            try:
                r = await fresh.get(f"{gp.url}/health")
                assert r.status_code == 503, r.text
            except httpx.TransportError:
                pass
        if twice:
            gp.signal()
    return out[0]


@pytest.mark.socket
async def test_sigterm_lets_a_stream_finish_signed_then_exits_0() -> None:
    gp = GatewayProcess("--mock-token-delay-ms", "40", "--shutdown-grace", "20")
    try:
        data = await sigterm_during_a_stream(gp)
        assert data[-1] == "[DONE]", data[-3:]
        final = json.loads(data[-2])
        text = "".join(
            (json.loads(d)["choices"][0]["delta"].get("content") or "") for d in data[:-2]
        )
        assert final["tee_signature"] and final["choices"][0]["finish_reason"] == "length"
        assert text, "nothing streamed"
        code, log = await gp.exit()
        assert code == 0, log
        assert "draining (1 in flight, grace 20s)" in log and "shut down" in log, log
        assert "outcome=complete" in log, log
    finally:
        gp.close()


@pytest.mark.socket
async def test_sigterm_with_a_short_grace_cuts_the_stream_with_an_error_event() -> None:
    gp = GatewayProcess("--mock-token-delay-ms", "100", "--shutdown-grace", "0.5")
    try:
        t0 = time.monotonic()
        data = await sigterm_during_a_stream(gp)
        assert "[DONE]" not in data
        assert json.loads(data[-1])["error"]["code"] == "shutting_down"
        code, log = await gp.exit()
        assert code == 0, log
        assert time.monotonic() - t0 < 10, "shutdown took longer than grace + margins"
        assert "outcome=shutdown" in log, log
    finally:
        gp.close()


@pytest.mark.socket
async def test_second_sigterm_ends_the_grace_period_now() -> None:
    gp = GatewayProcess("--mock-token-delay-ms", "100", "--shutdown-grace", "60")
    try:
        t0 = time.monotonic()
        data = await sigterm_during_a_stream(gp, twice=True)
        assert json.loads(data[-1])["error"]["code"] == "shutting_down"
        code, log = await gp.exit()
        assert code == 0, log
        assert time.monotonic() - t0 < 10, "the second signal did not cut the 60 s grace"
        assert "ending in-flight requests now" in log
    finally:
        gp.close()


def test_a_crash_exits_70_and_is_not_restarted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    async def crashing_server(state: object) -> None:
        calls.append(state)
        async with trio.open_nursery() as nursery:

            async def task() -> None:
                raise RuntimeError("secret prompt text")  # must not reach the log

            nursery.start_soon(task)

    monkeypatch.setattr("trio_gateway.__main__.run_server", crashing_server)
    log = logging.getLogger("test.crash")
    with caplog.at_level(logging.CRITICAL, logger="test.crash"):
        code = serve_until_shutdown(object(), log)  # type: ignore[arg-type]
    assert code == EXIT_CRASHED and len(calls) == 1, "the server was run again after a crash"
    assert "RuntimeError" in caplog.text and "secret prompt" not in caplog.text
