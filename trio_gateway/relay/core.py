"""The relay core: owns the upstream call, every deadline, signing and the metering hook.

Who owns what (one request):

    ASGI request task (quart-trio; cancelled on http.disconnect)
    └── response nursery (relay.asgi.RelayHTTPConnection._send_response)
        ├── [body]  consumer: channel → ASGI ``send`` (Hypercorn's socket write)
        └── Relay.run                       ← this module; returns only after the hook ran
            └── pump nursery (Relay._run)
                ├── [body]  Relay._consume: events → client bytes, deadlines, keep-alive
                └── Relay._pump: the httpx stream; the only task that touches the upstream

* Channels are zero-buffer: the pump cannot run ahead of the relay, the relay cannot run ahead
  of the client. Nothing here ``yield``s across a nursery or cancel scope.
* What cancels the upstream: the client leaving (quart-trio cancels the request task, the
  cancellation reaches the pump inside httpx, which closes the TCP connection because an
  HTTP/1.1 stream that was not read to the end is never pooled); a deadline (first byte, idle,
  total: the relay cancels the pump nursery); a client that stops reading (``client_stall``
  around every hand-off to the consumer); an upstream error.
* Shielded, each with its own deadline: signing (``sign``; on overrun no final event is sent,
  never an unsigned one) and the metering hook (``settle``; runs exactly once, in ``finally``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    Finish,
    PumpEvent,
    Start,
    TextDelta,
    ToolCallDelta,
    UpstreamFailed,
    UpstreamOpened,
    UsageReport,
)
from .metering import Meter, Outcome, RequestRecord

log = logging.getLogger("trio_gateway.relay")

MAX_UPSTREAM_BODY = 32 << 20
MAX_UPSTREAM_ERROR_BODY = 64 << 10

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

    @property
    def stream(self) -> bool:
        return self.call.stream


@dataclass
class _Progress:
    started: bool = False
    first_delta: bool = True


class Relay:
    def __init__(
        self, client: httpx.AsyncClient, signer: Signer, meter: Meter, deadlines: Deadlines
    ) -> None:
        self.client = client
        self.signer = signer
        self.meter = meter
        self.d = deadlines

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

    async def _run(self, job: RelayJob, out: trio.MemorySendChannel[Emit], prog: _Progress) -> None:
        answer = Answer()
        failure: GatewayError | _ClientStalled | None = None
        async with trio.open_nursery() as nursery:
            events_send, events_recv = trio.open_memory_channel[PumpEvent](0)
            nursery.start_soon(self._pump, job, events_send)
            try:
                with trio.move_on_after(self.d.total) as total:
                    await self._consume(job, events_recv, out, prog, answer)
                if total.cancelled_caught:
                    failure = UpstreamTimeout("the provider did not finish in time", code="total")
            except (GatewayError, _ClientStalled) as exc:
                failure = exc
            nursery.cancel_scope.cancel()  # normally the pump has already finished
        if failure is not None:
            raise failure

        sig = await self._sign(job, answer)
        if job.stream:
            if not prog.started:
                await self._start_stream(out, prog)
            await self._emit(out, job.renderer.final(answer, sig))
            job.record.outcome = Outcome.COMPLETE
            await self._emit(out, DONE)
        else:
            body = job.renderer.body(answer, sig)
            await self._emit(out, Start(200, json_headers(len(body))))
            prog.started = True
            await self._emit(out, body)
            job.record.outcome = Outcome.COMPLETE

    # -- the upstream side ----------------------------------------------------------------------

    async def _pump(self, job: RelayJob, send: trio.MemorySendChannel[PumpEvent]) -> None:
        """The only task that touches the upstream connection. Never raises: failures travel
        to the relay as ``UpstreamFailed`` so they surface as one clean error, not a group."""
        call = job.call
        async with send:
            try:
                async with self.client.stream(
                    call.method, call.url, headers=call.headers, content=call.body
                ) as resp:
                    job.record.upstream_status = resp.status_code
                    if resp.status_code >= 400:
                        body = await _read_capped(resp, MAX_UPSTREAM_ERROR_BODY)
                        await send.send(UpstreamFailed(job.provider.error(resp.status_code, body)))
                        return
                    await send.send(UpstreamOpened())
                    if call.stream:
                        parser = job.provider.stream_parser(job.kind)
                        async for chunk in resp.aiter_bytes():
                            for ev in parser.feed(chunk):
                                await send.send(ev)
                        for ev in parser.close():
                            await send.send(ev)
                    else:
                        body = await _read_capped(resp, MAX_UPSTREAM_BODY)
                        for ev in job.provider.parse_body(job.kind, body):
                            await send.send(ev)
            except GatewayError as err:
                await send.send(UpstreamFailed(err))
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.PoolTimeout):
                    timeout = UpstreamTimeout("no upstream connection free in time", code="pool")
                else:
                    timeout = UpstreamTimeout("the provider did not answer in time", code="connect")
                await send.send(UpstreamFailed(timeout))
            except httpx.HTTPError as exc:
                log.warning("upstream transport error %s", type(exc).__name__)
                await send.send(
                    UpstreamFailed(
                        UpstreamError("the provider connection failed", code="transport")
                    )
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("unparseable provider answer %s", type(exc).__name__)
                await send.send(UpstreamFailed(UpstreamError("malformed answer from the provider")))

    async def _consume(
        self,
        job: RelayJob,
        events: trio.MemoryReceiveChannel[PumpEvent],
        out: trio.MemorySendChannel[Emit],
        prog: _Progress,
        answer: Answer,
    ) -> None:
        d = self.d
        rec = job.record
        now = trio.current_time
        # A non-streamed upstream answer arrives in one piece at the end: only ``total`` bounds it.
        first_deadline = now() + d.first_byte if job.stream else float("inf")
        last_event: float | None = None
        keepalive_at = now() + d.keepalive if job.stream else float("inf")
        while True:
            upstream_deadline = first_deadline if last_event is None else last_event + d.idle
            ev: PumpEvent | None = None
            with trio.move_on_at(min(upstream_deadline, keepalive_at)):
                try:
                    ev = await events.receive()
                except trio.EndOfChannel:
                    return
            if ev is None:
                if now() >= upstream_deadline:
                    which = "first_byte" if last_event is None else "idle"
                    raise UpstreamTimeout("the provider went silent", code=which)
                if not prog.started:
                    await self._start_stream(out, prog)
                await self._emit(out, encode_comment("keep-alive"))
                keepalive_at = now() + d.keepalive
                continue
            if isinstance(ev, UpstreamFailed):
                raise ev.error
            if isinstance(ev, UpstreamOpened):
                if job.stream and not prog.started:
                    await self._start_stream(out, prog)
                continue
            last_event = now()
            answer.add(ev)
            if isinstance(ev, (TextDelta, ToolCallDelta)) and job.stream:
                if not prog.started:
                    await self._start_stream(out, prog)
                await self._emit(out, job.renderer.delta(ev, prog.first_delta))
                prog.first_delta = False
                rec.delivered_events += 1
                rec.delivered_chars += len(ev.text if isinstance(ev, TextDelta) else ev.arguments)
                keepalive_at = now() + d.keepalive
            elif isinstance(ev, UsageReport):
                rec.usage = ev
            elif isinstance(ev, Finish):
                pass

    # -- the client side ------------------------------------------------------------------------

    async def _emit(self, out: trio.MemorySendChannel[Emit], item: Emit) -> None:
        """Hand one item to the consumer; a client that does not take it in time is cut."""
        with trio.move_on_after(self.d.client_stall) as cs:
            await out.send(item)
        if cs.cancelled_caught:
            raise _ClientStalled

    async def _start_stream(self, out: trio.MemorySendChannel[Emit], prog: _Progress) -> None:
        await self._emit(out, Start(200, SSE_HEADERS))
        prog.started = True

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
                await self._emit(out, error_event(err.body()))
            else:
                data = json_bytes(err.body())
                await self._emit(out, Start(err.status, json_headers(len(data))))
                prog.started = True
                await self._emit(out, data)
        except (_ClientStalled, trio.BrokenResourceError):
            pass


async def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        if len(buf) > cap:
            raise UpstreamError("the provider answer is too large", code="too_large")
    return bytes(buf)


def _outcome_for(err: GatewayError) -> Outcome:
    if isinstance(err, SigningFailed):
        return Outcome.SIGNING_FAILED
    if isinstance(err, UpstreamTimeout):
        return Outcome.UPSTREAM_TIMEOUT
    if isinstance(err, GatewayError) and err.source == "provider":
        return Outcome.UPSTREAM_ERROR
    return Outcome.GATEWAY_ERROR
