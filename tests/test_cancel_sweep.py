"""Cancel at every checkpoint: the relay + signing + metering path under systematic cancellation.

For one request through the real app (route → relay → OpenAI adapter → scripted provider wire →
signer → meter), a ``trio.abc.Instrument`` counts the scheduler steps of the request's tasks
and cancels the request's scope right after step k; the task that was about to block gets
``Cancelled`` at exactly that checkpoint. k sweeps 1, 2, … until a run completes without the
cancel firing (the uncancelled run, which must itself end signed and complete; the sweep is
capped at k = 2000). Variants: streaming, non-streaming, a stream whose provider connection
breaks mid-way; each behind a Hypercorn-like server model (its body write yields) and the
first two also behind the bare driver (nothing yields); each under 3 scheduler seeds, all
under ``MockClock(autojump_threshold=0)``.

Scheduler seeds use only public API: importing Hypothesis loads trio's Hypothesis plugin (trio
registers its scheduler RNG with ``hypothesis.register_random`` and switches to its deterministic
shuffle), and drawing ``st.random_module()`` seeds every registered RNG. One draw per seed, then
the whole k-sweep runs on that RNG stream, so each seed explores different interleavings. (Not
bit-for-bit reproducible: trio breaks ties between equal deadlines by ``id()``, which varies
from process to process; a failure report names the seed and k to start from.)

Invariants checked after every run:

* I1: if the relay started, the meter's ``finish()`` was called exactly once and ran to the end
  (shielded); if it never started, the meter was not called.
* I2: a final stream event (``finish_reason`` set or any ``tee_*`` field) or a 200 body carries
  ``tee_signature``, it verifies against the enclave key (independent RSA-PSS/keccak check), and
  its output hash covers exactly the text the client received; ``[DONE]`` only after it.
* I3: every upstream body that was handed out was closed.
* I4: billing agrees with delivery: the outcome is ``complete`` iff the signed answer was
  handed to the server's ``send`` (and always when the client received it), ``client_gone``
  otherwise (never an error: cancellation is not a failure). With the bare driver, whose
  ``send`` never yields, handed == received; the Hypercorn-like server model may still drop
  a handed final when the cancellation lands inside its write.
* I5: no async generator is left un-exhausted for the garbage collector (httpx's body
  iterators, when a read is cut; trio warns, an error under ``-W error``).
* I0: cancellation never escapes as anything but a caught ``Cancelled`` (no stray exception),
  and the request ends (a virtual-time guard turns a hang into a finding).

``test_injector_catches_planted_bugs`` proves each check can fail: a small stand-alone relay
(``MiniRelay``) with an unshielded metering ``finally`` (I1), a double settle that only a
cancel at the right moment exposes (I1), an upstream leaked on cancellation (I3), httpx
iterators abandoned between two reads (I5), and the real relay with a signer that signs the
wrong text (I2) are each caught; ``MiniRelay`` without a planted bug passes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import hypothesis  # noqa: F401  (loads trio's Hypothesis plugin: deterministic scheduling)
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.asgi import (
    ASGIClient,
    ASGIResult,
    ScriptedUpstream,
    UpstreamLog,
    oai_text_stream,
    verify_tee,
)
from tests.conftest import make_settings
from trio_gateway.api.render import DONE
from trio_gateway.app import create_app
from trio_gateway.relay.accumulate import Answer
from trio_gateway.relay.core import SSE_HEADERS, Relay, RelayJob
from trio_gateway.relay.events import Emit, Start, TextDelta, ToolCallDelta, UsageReport
from trio_gateway.relay.metering import Outcome, RequestRecord
from trio_gateway.signing.keys import EnclaveKey, Signature
from trio_gateway.state import AppState, KeySigner

MAX_K = 2000
GUARD = 3600  # virtual seconds: a request that never ends is a finding, not a hung test
SEEDS = 3
WORDS = ["Struct", "ured ", "concur", "rency ", "in ", "trio"]
TEXT = "".join(WORDS)
USAGE = {"prompt_tokens": 7, "completion_tokens": 4}


def _stream_script() -> list[Any]:
    # Some chunks back to back (the next read completes while the server is still writing the
    # previous one, so the relay's hand-off blocks between two reads), some after a gap (timers
    # in play); one gap (20 s) is longer than the keep-alive interval (15 s) and shorter than
    # idle (120 s), so a keep-alive comment goes out mid-stream.
    gaps = {0: 0.5, 4: 20.0, 7: 0.25}
    steps: list[Any] = []
    for i, c in enumerate(oai_text_stream(WORDS, usage=USAGE)):
        if i in gaps:
            steps.append(gaps[i])
        steps.append(c)
    return steps


def _broken_stream_script() -> list[Any]:
    # Two deltas, then the provider connection breaks: the error path under cancellation.
    chunks = oai_text_stream(WORDS)
    return [0.5, *chunks[:3], 0.25, httpx.RemoteProtocolError("peer closed connection")]


def _body_script() -> list[Any]:
    body = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4.1-2025-04-14",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {**USAGE, "total_tokens": 11},
    }
    raw = json.dumps(body).encode()
    return [1.0, raw[:40], 0.25, raw[40:]]


# -- the parts under observation --------------------------------------------------------------


class CountingMeter:
    """Records every ``finish()`` call and whether it ran to its end (it awaits, so an
    unshielded call can be cancelled half-way, like a real settlement round-trip)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[RequestRecord] = []
        self.completed = 0

    async def finish(self, record: RequestRecord) -> None:
        self.calls.append(record)
        await trio.sleep(0.05)  # the settlement round-trip
        self.completed += 1


class AwaitingSigner:
    """The real key signer behind an await (a checkpoint inside the shielded signing step)."""

    def __init__(self, key: EnclaveKey) -> None:
        self.inner = KeySigner(key)

    async def sign(self, request_bytes: bytes, output_content: str) -> Signature:
        await trio.sleep(0.01)
        return await self.inner.sign(request_bytes, output_content)


# -- planted bugs (each must be caught by the sweep) ------------------------------------------


class MiniRelay:
    """A deliberately small stand-alone relay (streams only), correct unless a flag plants a
    bug; it stands in for ``state.relay`` so the planted bugs do not depend on the real relay's
    private structure. ``MiniRelay()`` itself passes the sweep (``test_mini_relay_is_clean``).

    * ``unshielded_settle``: the metering hook in a plain ``finally``: a cancelled request is
      never settled (I1: finish() starts but never completes).
    * ``double_settle``: settles eagerly once the signed final is out, and again in ``finally``
      unless the eager settle was recorded; the flag is set after the await, so a cancel landing
      during that round-trip bills twice (I1). Invisible without cancellation.
    * ``leak_upstream``: closes the provider response only when the body was read to the end:
      a cancelled request leaks the connection (I3).
    * ``plain_iteration``: iterates httpx's ``aiter_bytes()`` (a chain of async generators)
      and never ends it when cut between two reads (I5).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        signer: Any,
        meter: CountingMeter,
        *,
        unshielded_settle: bool = False,
        double_settle: bool = False,
        leak_upstream: bool = False,
        plain_iteration: bool = False,
    ) -> None:
        self.client = client
        self.signer = signer
        self.meter = meter
        self.unshielded_settle = unshielded_settle
        self.double_settle = double_settle
        self.leak_upstream = leak_upstream
        self.plain_iteration = plain_iteration

    async def run(self, job: RelayJob, out: trio.MemorySendChannel[Emit]) -> None:
        rec = job.record
        settled = False
        try:
            async with out:
                await self._answer(job, out)
                if self.double_settle:
                    await self.meter.finish(rec)
                    settled = True
        finally:
            if rec.outcome is None:
                rec.outcome = Outcome.CLIENT_GONE
            if not settled:
                if self.unshielded_settle:
                    await self.meter.finish(rec)
                else:
                    with trio.CancelScope(shield=True):
                        await self.meter.finish(rec)

    async def _answer(self, job: RelayJob, out: trio.MemorySendChannel[Emit]) -> None:
        call = job.call
        request = self.client.build_request(
            call.method, call.url, headers=call.headers, content=call.body
        )
        resp = await self.client.send(request, stream=True)
        try:
            await out.send(Start(200, SSE_HEADERS))
            answer = Answer()
            parser = job.provider.stream_parser(job.kind, job.call)
            first = True
            # correct: one generator layer over the scripted (class-based) body, closed when
            # cut, so nothing is left un-exhausted for the garbage collector
            body = (
                resp.aiter_bytes()
                if self.plain_iteration
                else aiter(cast(httpx.AsyncByteStream, resp.stream))
            )
            async with contextlib.AsyncExitStack() as stack:
                if not self.plain_iteration:
                    await stack.enter_async_context(contextlib.aclosing(body))  # type: ignore[type-var]
                async for chunk in body:
                    for ev in parser.feed(chunk):
                        answer.add(ev)
                        if isinstance(ev, UsageReport):
                            job.record.usage = ev
                        elif isinstance(ev, (TextDelta, ToolCallDelta)):
                            await out.send(job.renderer.delta(ev, first))
                            first = False
            parser.close()
            with trio.CancelScope(shield=True):
                sig = await self.signer.sign(job.request_bytes, answer.output_content())
            job.record.signed = True
            await out.send(job.renderer.final(answer, sig) + DONE)
            job.record.outcome = Outcome.COMPLETE
        finally:
            if not self.leak_upstream:
                with trio.CancelScope(shield=True):
                    await resp.aclose()
        if self.leak_upstream:
            await resp.aclose()


class TruncatingSigner(AwaitingSigner):
    """BUG: signs the output minus its last character (I2: the hash does not cover the text)."""

    async def sign(self, request_bytes: bytes, output_content: str) -> Signature:
        return await super().sign(request_bytes, output_content[:-1])


# -- the harness ------------------------------------------------------------------------------


@dataclass
class Rig:
    """One app, reused across the sweep's runs (each run is its own ``trio.run``)."""

    key: EnclaveKey
    stream: bool
    breaks: bool  # the upstream breaks mid-stream: the uncancelled run ends in an error event
    client: ASGIClient
    upstream: ScriptedUpstream
    meter: CountingMeter
    entered: list[str] = field(default_factory=list)
    handed: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.upstream.log = UpstreamLog()
        self.meter.reset()
        self.entered.clear()
        self.handed.clear()

    @property
    def body(self) -> dict[str, Any]:
        return {
            "model": "gpt-4.1",
            "stream": self.stream,
            "messages": [{"role": "user", "content": "tell me about trio"}],
        }


def build_rig(
    key: EnclaveKey,
    *,
    stream: bool,
    breaks: bool = False,
    yielding_send: bool = True,
    mini: dict[str, bool] | None = None,
    signer_cls: Callable[[EnclaveKey], Any] = AwaitingSigner,
) -> Rig:
    """The real app with the real ``Relay`` (or, with ``mini``, a ``MiniRelay(**mini)``),
    behind a server whose ``send`` yields after taking each message (``yielding_send``, like
    Hypercorn's socket write) or returns at once (the bare driver)."""
    if breaks:
        upstream = ScriptedUpstream(_broken_stream_script())
    elif stream:
        upstream = ScriptedUpstream(_stream_script())
    else:
        upstream = ScriptedUpstream(_body_script(), content_type="application/json")
    meter = CountingMeter()
    state = AppState.build(
        make_settings(openai_api_key="sk-x"), key=key, meter=meter, transport=upstream
    )
    relay: Relay | MiniRelay
    if mini is None:
        relay = Relay(state.client, signer_cls(key), meter, state.settings.deadlines)
    else:
        relay = MiniRelay(state.client, signer_cls(key), meter, **mini)
    rig = Rig(key, stream, breaks, ASGIClient(None), upstream, meter)
    rig.client = ASGIClient(server(create_app(state), rig, yielding=yielding_send))

    real_run = relay.run

    async def run(job: RelayJob, out: trio.MemorySendChannel[Emit]) -> None:
        rig.entered.append(job.record.request_id)  # same step as entering Relay.run's try
        await real_run(job, out)

    relay.run = run  # type: ignore[method-assign]
    state.relay = relay  # type: ignore[assignment]
    return rig


def server(app: Any, rig: Rig, *, yielding: bool) -> Any:
    """The app behind a model of the server's ``send``. Every message handed to it is logged
    (``rig.handed``: what the relay's "handed to the server" means). With ``yielding``, a body
    write behaves like Hypercorn's: a cancellation point before the write (its send lock), the
    write, then a shielded moment (the write taking time); ``http.response.start`` is only
    stored. While the server
    yields, the relay's next hand-off blocks, so cancellation also lands between two upstream
    reads. Without it, the bare driver: nothing yields, handed == received."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        async def server_send(msg: dict[str, Any]) -> None:
            rig.handed.append(msg)
            if yielding and msg["type"] == "http.response.body":
                await trio.lowlevel.checkpoint_if_cancelled()
                await send(msg)
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.001)  # the socket write takes a moment
            else:
                await send(msg)

        await app(scope, receive, server_send)

    return wrapped


def _descends(task: trio.lowlevel.Task, root: trio.lowlevel.Task) -> bool:
    t: trio.lowlevel.Task | None = task
    while t is not None:
        if t is root:
            return True
        nursery = t.parent_nursery
        t = nursery.parent_task if nursery is not None else None
    return False


class CancelAtStep(trio.abc.Instrument):
    """Cancel ``scope`` right after the k-th scheduler step of ``root`` and its descendants."""

    def __init__(self, k: int, root: trio.lowlevel.Task, scope: trio.CancelScope) -> None:
        self.k = k
        self.root = root
        self.scope = scope
        self.steps = 0
        self.fired = False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.fired or not _descends(task, self.root):
            return
        self.steps += 1
        if self.steps == self.k:
            self.fired = True
            self.scope.cancel()


@dataclass
class RunResult:
    k: int
    fired: bool
    steps: int
    violations: list[str]
    res: ASGIResult


def run_case(rig: Rig, k: int) -> RunResult:
    rig.reset()
    res = ASGIResult()
    escaped: list[BaseException] = []
    inj: CancelAtStep | None = None

    async def main() -> None:
        nonlocal inj
        root = trio.lowlevel.current_task()
        with trio.move_on_after(GUARD) as guard, trio.CancelScope() as scope:
            inj = CancelAtStep(k, root, scope)
            trio.lowlevel.add_instrument(inj)
            try:
                await rig.client.request("POST", "/v1/chat/completions", body=rig.body, result=res)
            except BaseException as exc:  # I0: anything but Cancelled (grouped or not) is a finding
                if isinstance(exc, trio.Cancelled):
                    raise
                # (keep no reference to the split-off part: its tracebacks would keep the
                # request's frames, and any generator they hold, alive past the I5 check)
                if isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None:
                    raise
                escaped.append(exc)
            finally:
                trio.lowlevel.remove_instrument(inj)
        if guard.cancelled_caught:
            escaped.append(TimeoutError(f"the request did not end within {GUARD} virtual s"))
        gc.collect(1)  # inside the run: trio warns about async generators left un-exhausted

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    abandoned = [
        str(w.message).split(" was ")[0] for w in caught if "Async generator" in str(w.message)
    ]
    assert inj is not None
    violations = check_invariants(rig, res, escaped, inj.fired)
    violations += [f"I5 abandoned un-exhausted: {a}" for a in abandoned]
    return RunResult(k, inj.fired, inj.steps, violations, res)


def _delivered(rig: Rig, res: ASGIResult) -> tuple[bool, list[str]]:
    """(signed answer delivered?, I2 violations) from what the client received."""
    errs: list[str] = []
    pem = rig.key.public_pem
    if not rig.stream:
        if res.status is None or not res.body:
            return False, errs
        obj = json.loads(res.body)
        if res.status != 200:
            if any(k.startswith("tee_") for k in obj):
                errs.append("I2 error body carries tee fields")
            return False, errs
        if "tee_signature" not in obj:
            errs.append("I2 200 body without tee_signature")
            return False, errs
        try:
            verify_tee(obj, pem, output=obj["choices"][0]["message"]["content"])
        except Exception as exc:
            errs.append(f"I2 body signature does not verify: {type(exc).__name__}")
        return True, errs

    signed = False
    text = ""
    comments = res.body.count(b": keep-alive\n\n")
    if comments and not rig.breaks and res.complete and comments != 1:
        errs.append(f"I2 expected one keep-alive comment, got {comments}")
    for data in res.sse_data():
        if data == "[DONE]":
            if not signed:
                errs.append("I2 [DONE] without a signed final event")
            continue
        obj = json.loads(data)
        if "error" in obj:
            if any(k.startswith("tee_") for k in obj):
                errs.append("I2 error event carries tee fields")
            if signed:
                errs.append("I2 error event after the signed final")
            continue
        choice = obj["choices"][0]
        text += choice["delta"].get("content") or ""
        is_final = choice["finish_reason"] is not None or any(k.startswith("tee_") for k in obj)
        if not is_final:
            continue
        if "tee_signature" not in obj:
            errs.append("I2 final event without tee_signature")
            continue
        try:
            verify_tee(obj, pem, output=text)
        except Exception as exc:
            errs.append(f"I2 final signature does not verify/cover the text: {type(exc).__name__}")
        signed = True
    return signed, errs


def check_invariants(
    rig: Rig, res: ASGIResult, escaped: list[BaseException], fired: bool
) -> list[str]:
    errs = [f"I0 request raised {type(e).__name__}: {e!r}"[:200] for e in escaped]
    m = rig.meter
    if rig.entered:
        if len(m.calls) != 1 or m.completed != 1:
            errs.append(f"I1 meter calls={len(m.calls)} completed={m.completed}")
    elif m.calls:
        errs.append(f"I1 meter called {len(m.calls)}x but the relay never started")
    signed, i2 = _delivered(rig, res)
    errs += i2
    log = rig.upstream.log
    if log.opened != log.closed:
        errs.append(f"I3 upstream bodies opened={log.opened} closed={log.closed}")
    if m.calls:
        rec = m.calls[-1]
        handed = any(
            b"tee_signature" in msg.get("body", b"")
            for msg in rig.handed
            if msg["type"] == "http.response.body"
        )
        if signed or handed:
            # "complete" = the signed answer was handed to the server; a cancellation inside
            # the server's write of it (the client leaving right then) may still drop it
            allowed = {Outcome.COMPLETE}
        elif rig.breaks:
            allowed = {Outcome.CLIENT_GONE, Outcome.UPSTREAM_ERROR}
        else:
            allowed = {Outcome.CLIENT_GONE}
        if rec.outcome not in allowed:
            errs.append(
                f"I4 outcome={rec.outcome} but signed answer delivered={signed} handed={handed}"
            )
        if rec.outcome == Outcome.COMPLETE and rec.usage is None:
            errs.append("I4 complete without the provider's usage in the metering record")
    if not fired:  # the uncancelled run: the script's own ending
        if rig.breaks:
            if signed or not res.sse_data() or "error" not in res.sse_data()[-1]:
                errs.append("uncancelled broken stream did not end in an error event")
        elif not signed:
            errs.append("uncancelled run did not deliver a signed answer")
    return errs


@dataclass
class Sweep:
    cases: int = 0
    completed_at: list[int] = field(default_factory=list)  # k of each seed's uncancelled run
    violations: Counter[str] = field(default_factory=Counter)
    first: dict[str, tuple[int, int]] = field(default_factory=dict)  # violation → (seed#, k)
    seeds: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (
            f"seeds={self.seeds} cases={self.cases} uncancelled-at-k={self.completed_at} "
            f"violations={dict(self.violations) or 'none'} first(seed#,k)={self.first}"
        )


def sweep(rig: Rig, seeds: int = SEEDS) -> Sweep:
    out = Sweep()
    seed_no = 0

    def one_seed(seed: object) -> None:
        nonlocal seed_no
        out.seeds.append(repr(seed))
        for k in range(1, MAX_K + 1):
            r = run_case(rig, k)
            out.cases += 1
            for v in r.violations:
                key = v.split(":")[0]
                out.violations[key] += 1
                out.first.setdefault(key, (seed_no, k))
            if not r.fired:
                out.completed_at.append(k)
                break
        else:
            out.violations[f"sweep did not finish within k={MAX_K}"] += 1
        seed_no += 1

    @settings(
        max_examples=seeds,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.random_module())
    def seeded(seed: object) -> None:
        one_seed(seed)

    seeded()
    return out


# -- the tests ----------------------------------------------------------------------------------


VARIANTS: dict[str, dict[str, Any]] = {
    "stream": {"stream": True},
    "nonstream": {"stream": False},
    "stream_upstream_breaks": {"stream": True, "breaks": True},
    "stream_instant_send": {"stream": True, "yielding_send": False},
    "nonstream_instant_send": {"stream": False, "yielding_send": False},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cancel_at_every_checkpoint(enclave_key: EnclaveKey, variant: str) -> None:
    t0 = time.perf_counter()
    result = sweep(build_rig(enclave_key, **VARIANTS[variant]))
    print(f"\nsweep {variant}: {result.report()} wall={time.perf_counter() - t0:.2f}s")
    assert len(result.completed_at) == SEEDS, result.report()
    assert result.cases > 3 * SEEDS, "the sweep did not cancel anything"
    assert not result.violations, result.report()


PLANTED: dict[str, tuple[dict[str, Any], str]] = {
    "unshielded_finally": ({"mini": {"unshielded_settle": True}}, "I1"),
    "double_settle": ({"mini": {"double_settle": True}}, "I1"),
    "leaky_upstream": ({"mini": {"leak_upstream": True}}, "I3"),
    "abandoned_iterators": ({"mini": {"plain_iteration": True}}, "I5"),
    "wrong_signature": ({"signer_cls": TruncatingSigner}, "I2"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_injector_catches_planted_bugs(enclave_key: EnclaveKey, bug: str) -> None:
    kw, invariant = PLANTED[bug]
    result = sweep(build_rig(enclave_key, stream=True, **kw), seeds=1)
    print(f"\nplanted {bug}: {result.report()}")
    assert any(v.startswith(invariant) for v in result.violations), result.report()


def test_mini_relay_is_clean(enclave_key: EnclaveKey) -> None:
    """The planted-bug relay without a bug passes: the failures above are the bugs'."""
    result = sweep(build_rig(enclave_key, stream=True, mini={}), seeds=1)
    assert len(result.completed_at) == 1 and result.cases > 3, result.report()
    assert not result.violations, result.report()


def test_uncancelled_runs_are_clean(enclave_key: EnclaveKey) -> None:
    """The harness itself: with k beyond the last step, both variants complete and check clean
    (so a clean sweep is not an artefact of a harness that never delivers anything)."""
    for stream in (True, False):
        rig = build_rig(enclave_key, stream=stream)
        r = run_case(rig, 10**9)
        assert not r.fired and r.steps > 10
        assert r.violations == []
        assert rig.meter.calls[0].outcome == Outcome.COMPLETE
        assert rig.meter.calls[0].signed
        assert rig.upstream.log.exhausted == 1
        if stream:  # the script's 20 s gap is covered by exactly one keep-alive comment
            assert r.res.body.count(b": keep-alive\n\n") == 1
