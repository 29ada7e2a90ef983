"""Oblivious HTTP gateway (RFC 9458 + RFC 9292, chunked OHTTP draft-08 for streams).

``GET /ohttp-keys``: the key list (``application/ohttp-keys``), the same for every client.

``POST /v1/ohttp``, in order (spec note ``ohttp.md`` §1.5, §5, §6):

1. Outer checks, answered in the clear as ``application/problem+json``: method (405, Quart's
   routing), Content-Type ``message/ohttp-req`` (415), body cap ``max_body_bytes`` by
   Content-Length and while reading (413), body read timeout (408), then decapsulation: framing
   400, key/suite mismatch 422 (problem type ``ohttp-key``), every HPKE failure 422 with one
   identical body. Never a 5xx for attacker bytes: anything unexpected here is a 400.
2. After decapsulation everything is answered *inside* the encapsulation (outer 200): a replay
   400 ``replayed_request`` (or 503 ``replay_cache_full``, see Replays below); invalid BHTTP
   400; ``Expect`` 417; scheme other than http/https 400; a path outside the gateway's own API
   (``ALLOWED_PATHS``, matched exactly, query string aside) 404 -- never an open relay; an
   unexpected exception 500.
3. Dispatch: the inner message becomes a Quart request (its own method, path, query, headers and
   body; hop-by-hop fields dropped, Content-Length recomputed, Host taken from the authority) and
   goes through ``app.handle_request`` -- the same routing, handlers, error handlers and hooks as
   a plain request, with the inner headers (payment/auth later) and no added credentials. The
   authority is only used as Host: whatever it names, the request is served by this gateway.
4. Answers: a plain response is encoded as a known-length BHTTP response and sealed
   (``message/ohttp-res``). A relay answer (inference) is re-wrapped as a ``RelayResponse`` with a
   sealing ``Framing`` and run by ``RelayHTTPConnection`` in the outer request's task, so the
   outer client leaving cancels the upstream exactly like plain HTTP. Non-streamed: sealed whole
   at the end. Streamed (``"stream": true``): ``message/ohttp-chunked-res`` -- the response nonce,
   the indeterminate-length BHTTP head as the first sealed chunk, one sealed chunk per item the
   relay emits (one SSE read, keep-alive comments included), and the final chunk (``00 00``: end
   of content, empty trailers) only if the relay completed: a failure after the outer 200 ends
   the body without it, so the client sees truncation.

Replays (RFC 9458 §6.5) are refused. A legitimate client never reuses its HPKE ephemeral key
``enc``, so right after a request decrypted -- before BHTTP decoding, dispatch or any payment
work -- its ``(key_id, enc)`` is admitted once by ``OHTTPKeys.replay`` (``codecs/replay.py``).
A copy (a relay replaying it, or anyone who captured it) gets a sealed inner 400
``replayed_request`` and nothing is dispatched or charged: an encapsulated answer, as the RFC
requires for errors found after decapsulation, so the client can authenticate it. The cache
remembers entries for ``ohttp_replay_window`` seconds and keys rotate so that none is accepted
longer than that (``ohttp_keys.py``), which makes the window complete. It is bounded
(``ohttp_replay_max_entries``) and fails closed: when full, new requests get a sealed 503
``replay_cache_full`` (``Retry-After``) rather than evicting entries still in their window;
``/health`` shows the counters. Chunked *requests* (``message/ohttp-chunked-req``) are not
accepted (415), so this is the only decapsulation path; one that accepts them must call
``_admit`` after the first chunk authenticates. Every answer uses a fresh response nonce. Logs
carry the key_id, sizes and error classes only: never plaintext, ``enc``, inner headers or paths.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from quart import Blueprint, Response, current_app, request
from quart_schema import tag
from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge

from ..api.errors import error_body
from ..api.render import json_bytes
from ..codecs.bhttp import (
    BHTTPError,
    BHTTPRequest,
    BHTTPResponse,
    Fields,
    decode_request,
    encode_content_chunk,
    encode_response,
    encode_response_end,
    encode_response_head,
)
from ..codecs.chunked_ohttp import ChunkedResponseSealer
from ..codecs.ohttp import (
    HEADER_LEN,
    PROBLEM_TYPE,
    DecryptionFailed,
    KeyMismatch,
    MalformedRequest,
    OHTTPError,
    ResponseContext,
    decapsulate_request,
    error_status,
)
from ..codecs.replay import Admission
from ..relay.asgi import Framing, Head, Out, RelayResponse
from ..relay.events import Start
from ..relay.metering import Outcome
from . import app_state

log = logging.getLogger("trio_gateway.ohttp")
bp = Blueprint("ohttp", __name__)

REQUEST_TYPE = "message/ohttp-req"
RESPONSE_TYPE = "message/ohttp-res"
CHUNKED_RESPONSE_TYPE = "message/ohttp-chunked-res"
KEYS_TYPE = "application/ohttp-keys"

ALLOWED_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/signing-key"}
)
# Connection-specific fields (RFC 9110 §7.6.1) and fields we set ourselves.
_DROP_REQUEST = frozenset(
    {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer", "host"}
    | {"content-length", "remote-addr"}
)
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer"}
    | {"content-length"}
)
_OUTER_NO_STORE = (b"cache-control", b"private, no-store")

# One body per outer error class; every decryption failure shares the DecryptionFailed one.
_PROBLEM_TITLES: dict[type[OHTTPError], str] = {
    MalformedRequest: "malformed encapsulated request",
    KeyMismatch: "unknown key configuration",
    DecryptionFailed: "decryption failed",
}


# --- outer answers --------------------------------------------------------------------------


def problem(status: int, title: str, type_: str = "about:blank") -> Response:
    body = json_bytes({"type": type_, "title": title, "status": status})
    resp = Response(body, status=status, content_type="application/problem+json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def outer_error(exc: BaseException) -> Response:
    status = error_status(exc)
    for cls in type(exc).__mro__:
        if cls in _PROBLEM_TITLES:
            return problem(status, _PROBLEM_TITLES[cls], PROBLEM_TYPE.get(cls, "about:blank"))
    return problem(status, "malformed encapsulated request")


class _BodyTooLarge(Exception):
    pass


async def _read_body(cap: int) -> bytes | Response:
    """The outer body with our own cap (413 at cap+1 bytes) and read timeout (408)."""
    if request.content_length is not None and request.content_length > cap:
        return problem(413, "encapsulated request too large")
    buf = bytearray()
    timeout = current_app.config.get("BODY_TIMEOUT") or float("inf")
    try:
        with trio.move_on_after(timeout) as cs:
            async for chunk in request.body:
                buf += chunk
                if len(buf) > cap:
                    raise _BodyTooLarge
    except (_BodyTooLarge, RequestEntityTooLarge):
        return problem(413, "encapsulated request too large")
    if cs.cancelled_caught:
        return problem(408, "request body timeout")
    return bytes(buf)


# --- inner answers --------------------------------------------------------------------------


def _response_fields(headers: Any) -> Fields:
    """Fields for the inner BHTTP response: lowercase names, no connection-specific fields."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        k = (name.decode("latin1") if isinstance(name, bytes) else name).lower()
        if k in _DROP_RESPONSE or k.startswith("proxy-"):
            continue
        v = value if isinstance(value, bytes) else value.encode("latin1")
        out.append((k.encode("latin1"), v.strip()))
    return tuple(out)


def _seal_single(ctx: ResponseContext, status: int, fields: Fields, content: bytes) -> bytes:
    try:
        plaintext = encode_response(BHTTPResponse(status, fields, content))
    except BHTTPError:  # a field our own app produced that BHTTP cannot carry: never expected
        log.error("inner response not encodable as BHTTP")
        body = json_bytes(error_body(500, "internal gateway error", "server_error"))
        plaintext = encode_response(
            BHTTPResponse(500, ((b"content-type", b"application/json"),), body)
        )
    return ctx.seal_response(plaintext)


def _single_headers(length: int) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"content-type", RESPONSE_TYPE.encode()),
        _OUTER_NO_STORE,
        (b"content-length", str(length).encode()),
    )


def sealed(ctx: ResponseContext, status: int, fields: Fields, content: bytes) -> Response:
    """A whole inner response, sealed, as the outer 200 ``message/ohttp-res``."""
    data = _seal_single(ctx, status, fields, content)
    resp = Response(data, status=200, content_type=RESPONSE_TYPE)
    resp.headers["Cache-Control"] = "private, no-store"
    return resp


def sealed_error(
    ctx: ResponseContext,
    status: int,
    message: str,
    code: str | None,
    type_: str = "invalid_request_error",
    extra: Fields = (),
) -> Response:
    body = json_bytes(error_body(status, message, type_, code))
    return sealed(ctx, status, ((b"content-type", b"application/json"), *extra), body)


class SingleSealing(Framing):
    """A relay answer as one ``message/ohttp-res``, written when the relay has finished."""

    def __init__(self, ctx: ResponseContext, extra: Fields) -> None:
        self._ctx = ctx
        self._extra = extra
        self._start: Start | None = None
        self._body = bytearray()

    def start(self, item: Start) -> list[Out]:
        self._start = item
        self._body += item.body
        return []

    def data(self, item: bytes) -> list[Out]:
        self._body += item
        return []

    def end(self, outcome: Outcome | None) -> list[Out]:
        if self._start is None:
            return []
        fields = _response_fields(self._start.headers) + self._extra
        data = _seal_single(self._ctx, self._start.status, fields, bytes(self._body))
        return [Head(200, _single_headers(len(data))), data]


class ChunkedSealing(Framing):
    """A relay answer as ``message/ohttp-chunked-res``: nonce, head chunk, a chunk per item,
    then the final chunk -- unless a streamed (200) answer failed after its head."""

    HEADERS = (
        (b"content-type", CHUNKED_RESPONSE_TYPE.encode()),
        _OUTER_NO_STORE,
        (b"incremental", b"?1"),
        (b"x-accel-buffering", b"no"),
    )

    def __init__(self, ctx: ResponseContext, extra: Fields) -> None:
        self._sealer = ChunkedResponseSealer(ctx)
        self._extra = extra
        self._status: int | None = None

    def start(self, item: Start) -> list[Out]:
        self._status = item.status
        try:
            head = encode_response_head(item.status, _response_fields(item.headers) + self._extra)
        except BHTTPError:  # never expected (our own fields); still a sealed answer, not a 5xx
            log.error("inner response head not encodable as BHTTP")
            head = encode_response_head(item.status)
        out: list[Out] = [Head(200, self.HEADERS), self._sealer.start()]
        out.append(self._sealer.seal_chunk(head))
        if item.body:
            out.append(self._sealer.seal_chunk(encode_content_chunk(item.body)))
        return out

    def data(self, item: bytes) -> list[Out]:
        return [self._sealer.seal_chunk(encode_content_chunk(item))]

    def end(self, outcome: Outcome | None) -> list[Out]:
        if self._status is None:
            return []
        if self._status == 200 and outcome is not Outcome.COMPLETE:
            log.info("ohttp stream ended without final chunk (%s)", outcome)
            return []
        return [self._sealer.seal_final(encode_response_end())]


# --- the inner request ----------------------------------------------------------------------


async def _no_push(path: str, headers: Headers) -> None:
    return None


def _inner_request(msg: BHTTPRequest) -> Any:
    """A Quart request for the inner message, in a scope derived from the outer one."""
    path, _, query = msg.path.partition("?")
    connection_named: set[str] = set()
    for field_name, field_value in msg.headers:
        if field_name.lower() == b"connection":
            connection_named |= {
                t.strip().lower() for t in field_value.decode("latin1").split(",") if t.strip()
            }
    headers = Headers()
    outer = request.scope
    headers["Remote-Addr"] = (outer.get("client") or ["<local>"])[0]
    host = msg.authority
    for raw_name, raw_value in msg.headers:
        name = raw_name.decode("latin1").lower()
        value = raw_value.decode("latin1")
        if name == "host" and not host:
            host = value
        if name in _DROP_REQUEST or name in connection_named or name.startswith("proxy-"):
            continue
        headers.add(name, value)
    headers["Host"] = host or request.host
    if msg.content or msg.method not in ("GET", "HEAD"):
        headers["Content-Length"] = str(len(msg.content))
    scope = {
        **outer,
        "method": msg.method,
        "scheme": msg.scheme,
        "path": path,
        "raw_path": path.encode("latin1"),
        "query_string": query.encode("latin1"),
        "root_path": "",
        "headers": [
            (k.lower().encode("latin1"), v.encode("latin1"))
            for k, v in headers.items()
            if k != "Remote-Addr"
        ],
    }
    app = current_app
    req = app.request_class(
        msg.method,
        msg.scheme,
        path,
        query.encode("latin1"),
        headers,
        "",
        "1.1",
        scope,  # type: ignore[arg-type]
        max_content_length=app.config["MAX_CONTENT_LENGTH"],
        body_timeout=app.config["BODY_TIMEOUT"],
        send_push_promise=_no_push,
    )
    req.body.set_result(msg.content)
    return req


def _admit(key_id: int, enc: bytes, ctx: ResponseContext) -> Response | None:
    """Anti-replay for a request that decrypted: None to go on, else the sealed refusal."""
    cache = app_state().ohttp.replay
    verdict = cache.admit(key_id, enc)
    if verdict is Admission.FRESH:
        return None
    if verdict is Admission.REPLAY:
        log.warning("ohttp replay refused key_id=%d (replays=%d)", key_id, cache.replays)
        return sealed_error(
            ctx, 400, "This encapsulated request was already received.", "replayed_request"
        )
    retry = max(1, math.ceil(cache.retry_after()))
    if cache.full_streak == 1:  # once per full period; /health counts every refusal
        log.error(
            "ohttp replay cache full (%d entries): refusing new OHTTP requests for ~%ds",
            cache.max_entries,
            retry,
        )
    return sealed_error(
        ctx,
        503,
        "The gateway cannot accept more OHTTP requests right now.",
        "replay_cache_full",
        "service_unavailable",
        ((b"retry-after", str(retry).encode()),),
    )


async def _dispatch(ctx: ResponseContext, plaintext: bytes) -> Response:
    try:
        msg = decode_request(plaintext)
    except BHTTPError as exc:
        log.info("ohttp inner rejected: %s", type(exc).__name__)
        return sealed_error(ctx, 400, "The encapsulated request is not valid Binary HTTP.", None)
    if any(name.lower() == b"expect" for name, _ in msg.headers):
        return sealed_error(ctx, 417, "Expect is not supported through OHTTP.", None)
    if msg.scheme not in ("https", "http"):
        return sealed_error(ctx, 400, "Unsupported scheme.", None)
    if msg.path.partition("?")[0] not in ALLOWED_PATHS:
        return sealed_error(
            ctx, 404, "Unknown request URL. Please check the URL and method.", "not_found"
        )
    inner = await current_app.handle_request(_inner_request(msg))
    if isinstance(inner, RelayResponse):
        extra = _response_fields(
            (k, v)
            for k, v in inner.headers.items()
            if k.lower() not in ("content-type", "content-length")
        )
        framing: Framing = (
            ChunkedSealing(ctx, extra) if inner.job.stream else SingleSealing(ctx, extra)
        )
        return RelayResponse(inner.relay, inner.job, framing)
    if not isinstance(inner, Response):  # a bare werkzeug response: none of our routes
        raise TypeError("unexpected inner response type")
    content = await inner.get_data(as_text=False)
    return sealed(ctx, inner.status_code, _response_fields(inner.headers.items()), content)


# --- routes ---------------------------------------------------------------------------------


@bp.get("/ohttp-keys")
@tag(["ohttp"])
async def ohttp_keys() -> Response:
    """The OHTTP key configurations (RFC 9458 §3.2), primary first. The primary key's config is
    also in ``/signing-key`` (``hpke``), signed by the enclave key."""
    st = app_state()
    resp = Response(st.ohttp.key_list(), content_type=KEYS_TYPE)
    resp.headers["Cache-Control"] = f"public, max-age={st.settings.ohttp_keys_max_age}"
    return resp


@bp.post("/v1/ohttp")
@tag(["ohttp"])
async def ohttp_gateway() -> Response:
    """Oblivious HTTP gateway: an encapsulated ``/v1/chat/completions`` (or other gateway API)
    request in, the encapsulated answer out (chunked OHTTP for streams)."""
    st = app_state()
    if (request.mimetype or "").lower() != REQUEST_TYPE:
        return problem(415, f"Content-Type must be {REQUEST_TYPE}")
    body = await _read_body(st.settings.max_body_bytes)
    if isinstance(body, Response):
        return body
    try:
        plaintext, ctx = decapsulate_request(st.ohttp.active(), body)
    except Exception as exc:  # OHTTPError; anything else is still the attacker's bytes: 4xx
        log.info("ohttp outer rejected: %s size=%d", type(exc).__name__, len(body))
        return outer_error(exc)
    log.debug("ohttp key_id=%d size=%d", body[0], len(body))
    try:
        refused = _admit(body[0], body[HEADER_LEN : HEADER_LEN + ctx.suite.nenc], ctx)
        if refused is not None:
            return refused
        return await _dispatch(ctx, plaintext)
    except Exception as exc:  # after decapsulation: sealed 500, never an outer 5xx
        log.error("ohttp inner failure %s", type(exc).__name__)
        body_500 = json_bytes(error_body(500, "internal gateway error", "server_error"))
        return sealed(ctx, 500, ((b"content-type", b"application/json"),), body_500)
