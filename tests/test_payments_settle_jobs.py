"""Asynchronous settle jobs (reference §16.4): a facilitator that answers a settle with ``202`` +
``jobId`` has not settled anything yet. The gateway polls ``GET /settle/<jobId>`` until the job
is final; ``succeeded`` settles (with the job's transaction), ``failed``/``not_found`` keep the
debt and re-drive the settle, and a job still pending at the settle deadline is polled again on
the next round (never settled twice).

End to end on the real gateway, with ``test_payments_x402``'s loopback facilitator (real
signatures, in-memory chain) extended with settle jobs: a job executes on the chain only when its
script reaches ``succeeded``, so the chain balance proves "paid exactly once".
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from x402.http.clients.httpx import x402HttpxClient
from x402.schemas import PaymentRequirements, parse_payment_payload

from trio_gateway.payments.settle_jobs import (
    JobAwareFacilitatorClient,
    JobState,
    JobStatus,
    accepted_job,
    parse_job_status,
    poll_settle_job,
)

from .test_payments_x402 import NETWORK, Facilitator, FakeChain, World, _Handler, chat
from .test_payments_x402 import world as world  # the fixture (explicit re-export)

pytestmark = pytest.mark.socket


class _JobHandler(_Handler):
    """``/settle`` answers 202 + jobId while ``server.scripts`` has scripts; each job walks its
    script (one state per status poll, the last one repeating)."""

    def do_GET(self) -> None:
        srv: Any = self.server
        if not self.path.startswith("/settle/"):
            return super().do_GET()
        job_id = self.path.removeprefix("/settle/")
        with srv.jobs_lock:
            srv.calls["status"] = srv.calls.get("status", 0) + 1
            job = srv.jobs.get(job_id)
            if job is None:
                return self._send(404, {"jobId": job_id, "status": "not_found"})
            script = job["script"]
            state = script.pop(0) if len(script) > 1 else script[0]
            if state == "not_found":
                del srv.jobs[job_id]
                return self._send(404, {"jobId": job_id, "status": "not_found"})
            if state == "succeeded" and job["tx"] is None:  # the job lands on the chain now
                res = srv.core.settle(job["payload"], job["reqs"])
                assert res.success, res
                job["tx"] = res.transaction
                srv.executed += 1
            body = {"jobId": job_id, "status": state}
            if state == "succeeded":
                body["transaction"] = job["tx"]
            if state == "failed":
                body["errorReason"] = "gas_estimation_failed"
            return self._send(200, body)

    def do_POST(self) -> None:
        srv: Any = self.server
        if self.path.strip("/") != "settle" or not srv.scripts:
            return super().do_POST()
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with srv.jobs_lock:
            srv.calls["settle"] = srv.calls.get("settle", 0) + 1
            job_id = uuid.uuid4().hex
            srv.jobs[job_id] = {
                "payload": parse_payment_payload(req["paymentPayload"]),
                "reqs": PaymentRequirements.model_validate(req["paymentRequirements"]),
                "script": list(srv.scripts.pop(0)),
                "tx": None,
            }
        self._send(202, {"jobId": job_id, "status": "pending"})


@pytest.fixture
def facilitator() -> Iterator[tuple[FakeChain, Facilitator]]:
    """``test_payments_x402``'s facilitator, with settle jobs (overrides its fixture here)."""
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme

    chain = FakeChain()
    core = x402FacilitatorSync()
    core.register([NETWORK], UptoEvmFacilitatorScheme(chain))
    fac: Any = Facilitator(("127.0.0.1", 0), _JobHandler)
    fac.core, fac.calls, fac.down, fac.verify_delay = core, {}, False, 0.0
    fac.scripts, fac.jobs, fac.jobs_lock, fac.executed = [], {}, threading.Lock(), 0
    fac.url = f"http://127.0.0.1:{fac.server_address[1]}"
    thread = threading.Thread(target=fac.serve_forever, daemon=True)
    thread.start()
    try:
        yield chain, fac
    finally:
        fac.shutdown()
        fac.server_close()
        thread.join(5)


async def _pay_once(world: World) -> int:
    """One paid request through the SDK client; returns its cost."""
    async with x402HttpxClient(world.client(), base_url=world.base, timeout=10) as payer:
        r = await payer.post("/v1/chat/completions", json=chat(max_tokens=20))
    assert r.status_code == 200, r.text
    return world.cost(r.json()["usage"])


def _assert_settled_once(world: World, cost: int) -> None:
    fac: Any = world.fac
    assert world.paid == cost > 0  # the chain moved exactly the delivered cost, once
    assert fac.executed == 1
    assert world.gate.ledger.total_settled == cost
    assert world.gate.ledger.duplicate_settles == 0
    assert world.gate.stats.settles == 1 and world.gate.stats.settled_units == cost
    assert world.gate.meter.duplicates == 0
    assert world.gate._jobs == {}
    (job,) = [j for j in fac.jobs.values() if j["tx"] is not None]
    assert world.gate.last_settle_tx == job["tx"]


async def test_job_pending_then_succeeded(world: World) -> None:
    fac: Any = world.fac
    fac.scripts.append(["pending", "pending", "succeeded"])
    cost = await _pay_once(world)
    await world.settled()
    _assert_settled_once(world, cost)
    assert fac.calls["settle"] == 1 and fac.calls["status"] == 3
    assert world.gate.stats.settle_jobs == 1 and world.gate.stats.settle_failures == 0
    health = world.gate.status()["facilitator"]
    assert health["settle_jobs"] == 1 and health["settle_jobs_pending"] == 0


async def test_failed_job_keeps_the_debt_and_is_redriven(world: World) -> None:
    fac: Any = world.fac
    fac.scripts += [["pending", "failed"], ["pending", "succeeded"]]
    cost = await _pay_once(world)
    await world.settled()
    _assert_settled_once(world, cost)
    assert fac.calls["settle"] == 2  # the failed job re-driven once
    s = world.gate.stats
    assert s.settle_jobs == 2 and s.settle_jobs_failed == 1 and s.settle_failures == 1
    assert "settle_job_failed" in (world.gate.last_settle_error or "")


async def test_not_found_job_keeps_the_debt_and_is_redriven(world: World) -> None:
    fac: Any = world.fac
    fac.scripts += [["pending", "not_found"], ["succeeded"]]
    cost = await _pay_once(world)
    await world.settled()
    _assert_settled_once(world, cost)
    assert fac.calls["settle"] == 2
    assert world.gate.stats.settle_jobs_failed == 1


async def test_job_pending_past_the_deadline_is_polled_not_resettled(world: World) -> None:
    fac: Any = world.fac
    gate = world.gate
    gate.settings = dataclasses.replace(gate.settings, settle_timeout=0.25)
    fac.scripts.append(["pending"] * 8 + ["succeeded"])
    cost = await _pay_once(world)
    await world.settled(limit=10.0)
    _assert_settled_once(world, cost)
    assert fac.calls["settle"] == 1  # later rounds polled the same job, never settled again
    assert gate.stats.settle_failures >= 1  # ... after at least one round timed out pending
    assert fac.calls["status"] == 9


async def test_shutdown_waits_for_a_pending_job(world: World) -> None:
    fac: Any = world.fac
    gate = world.gate
    gate.settings = dataclasses.replace(gate.settings, reconcile_interval=60.0)
    fac.scripts.append(["pending", "pending", "succeeded"])
    # stop the reconciler from settling first: the session stays open (idle timeout 0.3 s)
    gate.ledger.idle_timeout = 60.0
    cost = await _pay_once(world)
    await gate.shutdown()
    _assert_settled_once(world, cost)
    assert fac.calls["settle"] == 1


# --- the client and the poller, without the gateway --------------------------------------------


def test_accepted_job_shapes() -> None:
    req = httpx.Request("POST", "http://f/settle")
    assert accepted_job(httpx.Response(202, json={"jobId": "j1"}, request=req)) == "j1"
    assert accepted_job(httpx.Response(202, json={"job_id": 7}, request=req)) == "7"
    loc = httpx.Response(202, headers={"Location": "/settle/j2"}, request=req)
    assert accepted_job(loc) == "j2"
    pending = {"success": False, "jobId": "j3", "status": "pending"}
    assert accepted_job(httpx.Response(200, json=pending, request=req)) == "j3"
    final = {"success": True, "transaction": "0xab", "network": NETWORK, "jobId": "j4"}
    assert accepted_job(httpx.Response(200, json=final, request=req)) is None
    with pytest.raises(ValueError, match="without a job id"):
        accepted_job(httpx.Response(202, json={}, request=req))


def test_parse_job_status() -> None:
    req = httpx.Request("GET", "http://f/settle/j")

    def st(status: int, body: Any) -> JobStatus:
        return parse_job_status(httpx.Response(status, json=body, request=req))

    assert st(404, {}).state is JobState.NOT_FOUND
    assert st(200, {"status": "not_found"}).state is JobState.NOT_FOUND
    assert st(200, {"status": "queued"}).state is JobState.PENDING
    assert st(200, {"status": "succeeded", "transaction": "0x1"}) == JobStatus(
        JobState.SUCCEEDED, "0x1"
    )
    assert st(200, {"status": "succeeded"}).state is JobState.PENDING  # no tx: not proven
    failed = st(200, {"status": "failed", "errorReason": "reverted"})
    assert failed.state is JobState.FAILED and failed.error == "reverted"
    with pytest.raises(ValueError):
        st(500, {})


async def test_poll_backs_off_and_survives_transport_errors() -> None:
    answers: list[Any] = [
        httpx.ConnectError("down"),
        httpx.Response(500),
        httpx.Response(200, json={"status": "pending"}),
        httpx.Response(200, json={"status": "succeeded", "txHash": "0xfe"}),
    ]
    paths = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = JobAwareFacilitatorClient({"url": "http://fac.test"})
    client._http_client = http
    sleeps: list[float] = []

    async def sleep(d: float) -> None:
        sleeps.append(d)
        await trio.lowlevel.checkpoint()

    try:
        status = await poll_settle_job(client, "a/b", sleep=sleep, max_delay=0.3)
    finally:
        await http.aclose()
    assert status == JobStatus(JobState.SUCCEEDED, "0xfe")
    assert paths == ["/settle/a%2Fb"] * 4
    assert sleeps == [0.1, 0.2, 0.3]
