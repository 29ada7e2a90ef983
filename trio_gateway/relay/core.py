"""The relay core: owns the upstream call, every deadline, signing and the metering hook.

Who owns what (one request):

    ASGI request task (quart-trio; cancelled on http.disconnect)
    └── response nursery (relay.asgi.RelayHTTPConnection._send_response)
        ├── [body]  consumer: channel → ASGI ``send`` (Hypercorn's socket write)
        └── Relay.run                          ← this module; returns only after the hook ran
            └── relay nursery (Relay._run)
                ├── [body]  Relay._upstream: the httpx stream → parse → render → channel
                └── Relay._keepalive (streams only): an SSE comment after a silence

* The channel to the consumer is zero-buffer: the relay cannot run ahead of the client, and a
  client that stops reading is noticed as a hand-off that does not complete (``client_stall``).
  The consumer is a separate task because Hypercorn's socket write is shielded and has no
  timeout: only the relay side of the hand-off can give up. Nothing here ``yield``s across a
  nursery or cancel scope.
* Per upstream read, all the events it completed are rendered and handed over as one item: one
  task switch and one socket write per read, however many tokens it carried.
* What cancels the upstream: the client leaving (quart-trio cancels the request task; the
  cancellation reaches ``_upstream`` inside httpx, which closes the TCP connection because an
  HTTP/1.1 stream that was not read to the end is never pooled); a deadline (first byte, idle,
  total); a stalled client; an upstream error.
* Graceful shutdown (``Relay.drain``): every running and later upstream call gets the end of
  the grace period as its ``total`` deadline; a call still running then ends like any deadline
  does, with ``ShuttingDown`` (503 or a final error event, billed for what was delivered).
* Shielded, each with its own deadline: signing (``sign``; on overrun no final event is sent,
  never an unsigned one) and the metering hook (``settle``; exactly once, in ``finally``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import httpx
import trio

from ..api.errors import GatewayError, Unavailable, UpstreamError, UpstreamTimeout
from ..api.render import DONE, Renderer, error_event, json_bytes
from ..codecs.sse import encode_comment
from ..config import Deadlines
from ..providers.base import Kind, Provider, UpstreamCall
from ..signing.keys import Signature
from .accumulate import Answer
from .events import (
    Emit,
    ImageOutput,
    ProviderEvent,
    Start,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from .metering import Meter, Outcome, RequestRecord
from .wire import BodyTooLarge, end_body_iterators, read_capped

log = logging.getLogger("trio_gateway.relay")

MAX_UPSTREAM_BODY = 32 << 20
MAX_UPSTREAM_ERROR_BODY = 64 << 10
KEEPALIVE = encode_comment("keep-alive")

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


def json_headers(length: int) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"content-type", b"application/json"), (b"content-length", str(length).encode()))


class Signer(Protocol):
    async def sign(self, request_bytes: bytes, output_content: str) -> Signature: ...


class SigningFailed(Unavailable):
    def __init__(self) -> None:
        super().__init__("the answer could not be signed in time", code="signing_unavailable")


class ShuttingDown(Unavailable):
    """The gateway received SIGTERM: new work is refused, and work still running at the end of
    the grace period is ended with this. Retryable on another instance."""

    headers = {"Retry-After": "1"}

    def __init__(self) -> None:
        super().__init__(
            "the gateway is shutting down; retry the request",
            code="shutting_down",
            source="gateway",
            retryable=True,
        )


class _ClientStalled(Exception):
    pass


@dataclass
class RelayJob:
    record: RequestRecord
    provider: Provider
    kind: Kind
    call: UpstreamCall
    renderer: Renderer
    request_bytes: bytes
    stream: bool  # the client asked for SSE (the upstream may still answer in one piece)


@dataclass
class _Progress:
    started: bool = False  # a Start went (or is going) to the consumer
    first_delta: bool = True
    last_sent: float = field(default_factory=trio.current_time)


class Relay:
    def __init__(
        self, client: httpx.AsyncClient, signer: Signer, meter: Meter, deadlines: Deadlines
    ) -> None:
        self.client = client
        self.signer = signer
        self.meter = meter
        self.d = deadlines
        self.drain_deadline: float | None = None  # set by drain(): the end of the grace period
        self._total_scopes: set[trio.CancelScope] = set()  # running upstream calls

    def drain(self, grace: float) -> None:
        """Graceful shutdown: running and later upstream calls end at the latest ``grace``
        seconds from now (a second call can only bring the end closer). No await: safe from
        a signal handler task."""
        end = trio.current_time() + max(0.0, grace)
        if self.drain_deadline is not None:
            end = min(end, self.drain_deadline)
        self.drain_deadline = end
        for scope in self._total_scopes:
            scope.deadline = min(scope.deadline, end)

    @property
    def in_flight(self) -> int:
        return len(self._total_scopes)

    # -- entry point: one call per request, in the request's response nursery -------------------

    async def run(self, job: RelayJob, out: trio.MemorySendChannel[Emit]) -> None:
        rec = job.record
        prog = _Progress()
        try:
            async with out:
                try:
                    await self._run(job, out, prog)
                except _ClientStalled:
                    rec.outcome = Outcome.CLIENT_STALLED
                except GatewayError as err:
                    rec.outcome = _outcome_for(err)
                    await self._send_error(out, err, prog)
                except Exception as exc:  # a bug of ours: answer cleanly, log the type only
                    log.error("relay failure %s rid=%s", type(exc).__name__, rec.request_id)
                    rec.outcome = Outcome.GATEWAY_ERROR
                    await self._send_error(out, GatewayError("internal gateway error"), prog)
        finally:
            if rec.outcome is None:
                rec.outcome = Outcome.CLIENT_GONE
            rec.finished_at = trio.current_time()
            # THE metering hook: exactly once, shielded, bounded.
            with trio.move_on_after(self.d.settle, shield=True) as cs:
                try:
                    await self.meter.finish(rec)
                except Exception as exc:
                    log.error("metering hook failed %s rid=%s", type(exc).__name__, rec.request_id)
            if cs.cancelled_caught:
                log.error("metering hook overran its deadline rid=%s", rec.request_id)
            # one line per request: identifiers and counts only, never content
            log.info(
                "rid=%s model=%s stream=%s outcome=%s upstream=%s events=%d ms=%.1f",
                rec.request_id,
                rec.model,
                rec.stream,
                rec.outcome,
                rec.upstream_status,
                rec.delivered_events,
                (rec.finished_at - rec.started_at) * 1000,
            )

    async def _run(self, job: RelayJob, out: trio.MemorySendChannel[Emit], prog: _Progress) -> None:
        answer = Answer()
        failure: GatewayError | _ClientStalled | None = None
        try:
            async with trio.open_nursery() as nursery:
                if job.stream:
                    nursery.start_soon(self._keepalive, out.clone(), prog)
                try:
                    with trio.move_on_after(self.d.total) as total:
                        if self.drain_deadline is not None:
                            total.deadline = min(total.deadline, self.drain_deadline)
                        self._total_scopes.add(total)
                        try:
                            await self._upstream(job, out, prog, answer)
                        finally:
                            self._total_scopes.discard(total)
                    if total.cancelled_caught:
                        if (
                            self.drain_deadline is not None
                            and total.deadline >= self.drain_deadline
                        ):
                            failure = ShuttingDown()
                        else:
                            failure = UpstreamTimeout(
                                "the provider did not finish in time", code="total"
                            )
                except (GatewayError, _ClientStalled) as exc:
                    failure = exc
                nursery.cancel_scope.cancel()  # the keep-alive task has nothing left to guard
        except* _ClientStalled:  # raised by the keep-alive task
            failure = _ClientStalled()
        if failure is not None:
            raise failure

        sig = await self._sign(job, answer)
        if job.stream:
            if not prog.started:
                await self._start_stream(out, prog)
            await self._emit(out, job.renderer.final(answer, sig) + DONE, prog)
        else:
            body = job.renderer.body(answer, sig)
            await self._emit(out, Start(200, json_headers(len(body)), body), prog)
            prog.started = True
        job.record.outcome = Outcome.COMPLETE

    # -- the upstream side ----------------------------------------------------------------------

    async def _upstream(
        self, job: RelayJob, out: trio.MemorySendChannel[Emit], prog: _Progress, answer: Answer
    ) -> None:
        """The only code that touches the upstream connection."""
        call, rec, d = job.call, job.record, self.d
        # first byte, then idle between reads; a non-streamed answer arrives in one piece at the
        # end, so only ``total`` bounds it.
        watchdog = trio.CancelScope(
            deadline=trio.current_time() + d.first_byte if call.stream else math.inf
        )
        seen_bytes = False
        try:
            with watchdog:
                async with self.client.stream(
                    call.method, call.url, headers=call.headers, content=call.body
                ) as resp:
                    rec.upstream_status = resp.status_code
                    if resp.status_code >= 400:
                        body = await _read_capped(resp, MAX_UPSTREAM_ERROR_BODY)
                        raise job.provider.error(resp.status_code, body)
                    if not call.stream:
                        body = await _read_capped(resp, MAX_UPSTREAM_BODY)
                        await self._relay(
                            job,
                            job.provider.parse_body(job.kind, call, body),
                            out,
                            prog,
                            answer,
                            watchdog,
                        )
                        return
                    if not prog.started:
                        await self._start_stream(out, prog)
                    parser = job.provider.stream_parser(job.kind, call)
                    chunks = resp.aiter_bytes()
                    try:
                        async for chunk in chunks:
                            seen_bytes = True
                            events = parser.feed(chunk)
                            await self._relay(job, events, out, prog, answer, watchdog)
                        await self._relay(job, parser.close(), out, prog, answer, watchdog)
                    except BaseException:
                        await end_body_iterators(resp, chunks)
                        raise
        except httpx.PoolTimeout:
            raise UpstreamTimeout("no upstream connection free in time", code="pool") from None
        except httpx.TimeoutException:
            raise UpstreamTimeout("the provider did not answer in time", code="connect") from None
        except httpx.HTTPError as exc:
            log.warning("upstream transport error %s rid=%s", type(exc).__name__, rec.request_id)
            raise UpstreamError("the provider connection failed", code="transport") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("unparseable provider answer %s rid=%s", type(exc).__name__, rec.request_id)
            raise UpstreamError("malformed answer from the provider") from None
        if watchdog.cancelled_caught:
            which = "idle" if seen_bytes else "first_byte"
            raise UpstreamTimeout("the provider went silent", code=which)

    async def _relay(
        self,
        job: RelayJob,
        events: Iterable[ProviderEvent],
        out: trio.MemorySendChannel[Emit],
        prog: _Progress,
        answer: Answer,
        watchdog: trio.CancelScope,
    ) -> None:
        """Fold one read's events into the answer and hand the client their chunks, together."""
        parts: list[bytes] = []
        chars = 0
        for ev in events:
            answer.add(ev)
            if isinstance(ev, (TextDelta, ToolCallDelta)):
                if job.stream:
                    parts.append(job.renderer.delta(ev, prog.first_delta))
                    prog.first_delta = False
                    chars += len(ev.text if isinstance(ev, TextDelta) else ev.arguments)
            elif isinstance(ev, UsageReport):
                job.record.usage = ev
            elif isinstance(ev, ImageOutput):
                job.record.images += 1
        if job.stream:
            # the idle deadline is about the provider: the hand-off has its own (client_stall)
            watchdog.deadline = math.inf
            if parts and not prog.started:
                await self._start_stream(out, prog)
            if parts:
                await self._emit(out, parts[0] if len(parts) == 1 else b"".join(parts), prog)
                job.record.delivered_events += len(parts)
                job.record.delivered_chars += chars
            watchdog.deadline = trio.current_time() + self.d.idle

    async def _keepalive(self, out: trio.MemorySendChannel[Emit], prog: _Progress) -> None:
        """An SSE comment whenever nothing was sent for ``keepalive`` seconds (also before the
        provider's head arrives, which starts the stream early)."""
        async with out:
            while True:
                due = prog.last_sent + self.d.keepalive
                if trio.current_time() < due:
                    await trio.sleep_until(due)
                    continue
                if not prog.started:
                    await self._start_stream(out, prog)
                await self._emit(out, KEEPALIVE, prog)

    # -- the client side ------------------------------------------------------------------------

    async def _emit(self, out: trio.MemorySendChannel[Emit], item: Emit, prog: _Progress) -> None:
        """Hand one item to the consumer; a client that does not take it in time is cut."""
        with trio.move_on_after(self.d.client_stall) as cs:
            await out.send(item)
        if cs.cancelled_caught:
            raise _ClientStalled
        prog.last_sent = trio.current_time()

    async def _start_stream(self, out: trio.MemorySendChannel[Emit], prog: _Progress) -> None:
        prog.started = True  # before the await: the keep-alive task must not start it twice
        await self._emit(out, Start(200, SSE_HEADERS), prog)

    async def _sign(self, job: RelayJob, answer: Answer) -> Signature:
        sig: Signature | None = None
        with trio.move_on_after(self.d.sign, shield=True):
            sig = await self.signer.sign(job.request_bytes, answer.output_content())
        if sig is None:
            raise SigningFailed
        job.record.signed = True
        return sig

    async def _send_error(
        self, out: trio.MemorySendChannel[Emit], err: GatewayError, prog: _Progress
    ) -> None:
        try:
            if prog.started:  # mid-stream: an error event, no [DONE], nothing signed
                await self._emit(out, error_event(err.body()), prog)
            else:
                data = json_bytes(err.body())
                extra = tuple(
                    (k.lower().encode(), v.encode())
                    for k, v in getattr(err, "headers", {}).items()  # e.g. Retry-After
                )
                prog.started = True
                head = json_headers(len(data)) + extra
                await self._emit(out, Start(err.status, head, data), prog)
        except (_ClientStalled, trio.BrokenResourceError):
            pass


async def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    try:
        return await read_capped(resp, cap)
    except BodyTooLarge:
        raise UpstreamError("the provider answer is too large", code="too_large") from None


def _outcome_for(err: GatewayError) -> Outcome:
    if isinstance(err, ShuttingDown):
        return Outcome.SHUTDOWN
    if isinstance(err, SigningFailed):
        return Outcome.SIGNING_FAILED
    if isinstance(err, UpstreamTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if err.source == "provider":
        return Outcome.UPSTREAM_ERROR
    return Outcome.GATEWAY_ERROR
