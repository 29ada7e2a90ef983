"""Binary HTTP messages (RFC 9292), sans-IO.

Strategy: the decoder walks one in-memory ``bytes`` with a ``_Reader`` that owns the offset. Every
length is compared with what remains (and with ``Limits``) *before* anything is sliced, so a
declared length of 2^62 costs nothing. The message layout is a flat loop, never recursion: the
framing indicator picks one of four entries in ``_DECODERS`` (known/indeterminate x request/
response); the known-length and indeterminate-length field sections and content are read by small
functions chosen from the ``_SECTION`` / ``_CONTENT`` tables. Truncation (§3.8) is honoured only at
section boundaries: if the input ends exactly where a header section, content or trailer section
would start, the rest of the message is empty. Trailing bytes must be zero padding.

Everything that goes wrong raises a ``BHTTPError`` subclass (a ``ValueError``); nothing else leaks.
Encoders validate what they write with the same rules, emit lowercase names and never truncate.
``encode_response_head`` / ``encode_content_chunk`` / ``encode_response_end`` emit an
indeterminate-length response piece by piece for streaming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "BHTTPError",
    "BHTTPRequest",
    "BHTTPResponse",
    "Fields",
    "InvalidControlData",
    "InvalidField",
    "InvalidFraming",
    "InvalidPadding",
    "InvalidStatus",
    "LimitExceeded",
    "Limits",
    "Truncated",
    "decode_message",
    "decode_request",
    "decode_response",
    "decode_varint",
    "encode_content_chunk",
    "encode_request",
    "encode_response",
    "encode_response_end",
    "encode_response_head",
    "encode_varint",
]

Fields = tuple[tuple[bytes, bytes], ...]

VARINT_MAX = (1 << 62) - 1

KNOWN_REQUEST, KNOWN_RESPONSE, INDETERMINATE_REQUEST, INDETERMINATE_RESPONSE = 0, 1, 2, 3


class BHTTPError(ValueError):
    """The bytes are not a Binary HTTP message we accept (RFC 9292 §4: invalid, do not process)."""


class Truncated(BHTTPError):
    """The input ended inside a varint, control data, a section or content."""


class InvalidFraming(BHTTPError):
    """Unknown framing indicator, or a request where a response was expected (or vice versa)."""


class InvalidControlData(BHTTPError):
    """Method, scheme, authority or path is not acceptable."""


class InvalidStatus(BHTTPError):
    """A status outside 100..599, or an informational status where a final one is required."""


class InvalidField(BHTTPError):
    """A field name or value that would make the message malformed (RFC 9113 §8.2.1)."""


class InvalidPadding(BHTTPError):
    """Non-zero bytes after the end of the message."""


class LimitExceeded(BHTTPError):
    """A count or size above the configured ``Limits``."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps applied while decoding. The defaults suit an LLM API request or response."""

    max_fields: int = 256  # field lines across all sections of one message
    max_section_bytes: int = 64 << 10  # encoded bytes of one field section
    max_content_bytes: int = 16 << 20
    max_name_length: int = 256
    max_value_length: int = 16 << 10  # also caps each control-data string
    max_informational: int = 8  # 1xx responses before the final one


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class BHTTPRequest:
    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()


@dataclass(frozen=True, slots=True)
class BHTTPResponse:
    status: int
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()
    informational: tuple[tuple[int, Fields], ...] = ()


# --- varints (RFC 9000 §16) -------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Minimal-length QUIC varint."""
    if value < 0 or value > VARINT_MAX:
        raise ValueError(f"varint out of range: {value}")
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | bytearray, pos: int = 0) -> tuple[int, int]:
    """Return ``(value, next_pos)``. Non-minimal encodings are valid. Raises ``Truncated``."""
    if pos >= len(data):
        raise Truncated("varint: no bytes")
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > len(data):
        raise Truncated("varint: truncated")
    value = first & 0x3F
    for b in data[pos + 1 : pos + size]:
        value = (value << 8) | b
    return value, pos + size


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def varint(self) -> int:
        value, self.pos = decode_varint(self.data, self.pos)
        return value

    def take(self, n: int) -> bytes:
        if n > self.remaining():
            raise Truncated(f"declared length {n} runs past the end")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def prefixed(self, cap: int, what: str) -> bytes:
        n = self.varint()
        if n > cap:
            raise LimitExceeded(f"{what} longer than {cap} bytes")
        return self.take(n)


# --- validation ---------------------------------------------------------------------------------

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VCHAR = frozenset(range(0x21, 0x7F))
_BAD_VALUE = frozenset(b"\x00\r\n")
_EDGE_WS = frozenset(b" \t")


def _check_name(name: bytes) -> bytes:
    if not name or not _TCHAR.issuperset(name):
        raise InvalidField("invalid field name")  # includes pseudo-fields (':' is not a tchar)
    return name.lower()


def _check_value(value: bytes) -> bytes:
    if value and (
        not _BAD_VALUE.isdisjoint(value) or value[0] in _EDGE_WS or value[-1] in _EDGE_WS
    ):
        raise InvalidField("invalid field value")
    return value


def _check_control(value: bytes, what: str, *, token: bool = False) -> str:
    allowed = _TCHAR if token else _VCHAR
    if (token and not value) or not allowed.issuperset(value):
        raise InvalidControlData(f"invalid {what}")
    return value.decode("ascii")  # safe: every byte checked to be ASCII above


# --- decoding -----------------------------------------------------------------------------------


class _Budget:
    """Field lines left for the whole message (``max_fields`` is per message, not per section)."""

    __slots__ = ("fields",)

    def __init__(self, limits: Limits) -> None:
        self.fields = limits.max_fields

    def spend(self) -> None:
        self.fields -= 1
        if self.fields < 0:
            raise LimitExceeded("too many field lines")


def _field_line(r: _Reader, limits: Limits, budget: _Budget, name_len: int) -> tuple[bytes, bytes]:
    if name_len == 0:
        raise InvalidField("empty field name")
    if name_len > limits.max_name_length:
        raise LimitExceeded("field name too long")
    name = _check_name(r.take(name_len))
    value = _check_value(r.prefixed(limits.max_value_length, "field value"))
    budget.spend()
    return name, value


def _known_section(r: _Reader, limits: Limits, budget: _Budget) -> Fields:
    sub = _Reader(r.prefixed(limits.max_section_bytes, "field section"))
    lines: list[tuple[bytes, bytes]] = []
    while not sub.at_end():
        lines.append(_field_line(sub, limits, budget, sub.varint()))
    return tuple(lines)


def _indeterminate_section(r: _Reader, limits: Limits, budget: _Budget) -> Fields:
    lines: list[tuple[bytes, bytes]] = []
    start = r.pos
    while (name_len := r.varint()) != 0:
        lines.append(_field_line(r, limits, budget, name_len))
        if r.pos - start > limits.max_section_bytes:
            raise LimitExceeded("field section too large")
    return tuple(lines)


def _known_content(r: _Reader, limits: Limits) -> bytes:
    return r.prefixed(limits.max_content_bytes, "content")


def _indeterminate_content(r: _Reader, limits: Limits) -> bytes:
    chunks: list[bytes] = []
    left = limits.max_content_bytes
    while (n := r.varint()) != 0:
        if n > left:
            raise LimitExceeded(f"content longer than {limits.max_content_bytes} bytes")
        chunks.append(r.take(n))
        left -= n
    return b"".join(chunks)


_SectionReader = Callable[[_Reader, Limits, _Budget], Fields]
_ContentReader = Callable[[_Reader, Limits], bytes]

# indexed by "is indeterminate"
_SECTION: dict[bool, _SectionReader] = {False: _known_section, True: _indeterminate_section}
_CONTENT: dict[bool, _ContentReader] = {False: _known_content, True: _indeterminate_content}


def _body(
    r: _Reader, limits: Limits, budget: _Budget, indeterminate: bool
) -> tuple[Fields, bytes, Fields]:
    """Header section, content, trailers; each may be truncated away at its start (§3.8)."""
    section, content_reader = _SECTION[indeterminate], _CONTENT[indeterminate]
    headers: Fields = ()
    content = b""
    trailers: Fields = ()
    if not r.at_end():
        headers = section(r, limits, budget)
    if not r.at_end():
        content = content_reader(r, limits)
    if not r.at_end():
        trailers = section(r, limits, budget)
    if r.data.count(0, r.pos) != r.remaining():
        raise InvalidPadding("non-zero bytes after the message")
    return headers, content, trailers


def _request(r: _Reader, limits: Limits, indeterminate: bool) -> BHTTPRequest:
    cap = limits.max_value_length
    method = _check_control(r.prefixed(cap, "method"), "method", token=True)
    scheme = _check_control(r.prefixed(cap, "scheme"), "scheme")
    authority = _check_control(r.prefixed(cap, "authority"), "authority")
    path = _check_control(r.prefixed(cap, "path"), "path")
    headers, content, trailers = _body(r, limits, _Budget(limits), indeterminate)
    return BHTTPRequest(method, scheme, authority, path, headers, content, trailers)


def _response(r: _Reader, limits: Limits, indeterminate: bool) -> BHTTPResponse:
    budget = _Budget(limits)
    informational: list[tuple[int, Fields]] = []
    while True:
        status = r.varint()  # a 1xx followed by EOF lands here and raises Truncated
        if 200 <= status <= 599:
            break
        if not 100 <= status <= 199:
            raise InvalidStatus(f"status {status} out of range")
        if len(informational) >= limits.max_informational:
            raise LimitExceeded("too many informational responses")
        informational.append((status, _SECTION[indeterminate](r, limits, budget)))
    headers, content, trailers = _body(r, limits, budget, indeterminate)
    return BHTTPResponse(status, headers, content, trailers, tuple(informational))


_Message = BHTTPRequest | BHTTPResponse
_DECODERS: dict[int, Callable[[_Reader, Limits], _Message]] = {
    KNOWN_REQUEST: lambda r, lim: _request(r, lim, False),
    KNOWN_RESPONSE: lambda r, lim: _response(r, lim, False),
    INDETERMINATE_REQUEST: lambda r, lim: _request(r, lim, True),
    INDETERMINATE_RESPONSE: lambda r, lim: _response(r, lim, True),
}


def decode_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> _Message:
    """Decode a request or a response, whichever the framing indicator says."""
    r = _Reader(bytes(data))
    framing = r.varint()
    decoder = _DECODERS.get(framing)
    if decoder is None:
        raise InvalidFraming(f"unknown framing indicator {framing}")
    return decoder(r, limits)


def decode_request(data: bytes, limits: Limits = DEFAULT_LIMITS) -> BHTTPRequest:
    msg = decode_message(data, limits)
    if not isinstance(msg, BHTTPRequest):
        raise InvalidFraming("expected a request, got a response")
    return msg


def decode_response(data: bytes, limits: Limits = DEFAULT_LIMITS) -> BHTTPResponse:
    msg = decode_message(data, limits)
    if not isinstance(msg, BHTTPResponse):
        raise InvalidFraming("expected a response, got a request")
    return msg


# --- encoding -----------------------------------------------------------------------------------


def _prefixed(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _lines(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(
        _prefixed(_check_name(name)) + _prefixed(_check_value(value)) for name, value in fields
    )


def _encode_section(fields: Fields, indeterminate: bool) -> bytes:
    lines = _lines(fields)
    return lines + b"\x00" if indeterminate else _prefixed(lines)


def _encode_content(content: bytes, indeterminate: bool) -> bytes:
    if not indeterminate:
        return _prefixed(content)
    return (_prefixed(content) if content else b"") + b"\x00"


def _encode_body(headers: Fields, content: bytes, trailers: Fields, indeterminate: bool) -> bytes:
    return (
        _encode_section(headers, indeterminate)
        + _encode_content(content, indeterminate)
        + _encode_section(trailers, indeterminate)
    )


def encode_request(req: BHTTPRequest, *, known_length: bool = True) -> bytes:
    control = (
        _prefixed(_check_control(req.method.encode(), "method", token=True).encode())
        + _prefixed(_check_control(req.scheme.encode(), "scheme").encode())
        + _prefixed(_check_control(req.authority.encode(), "authority").encode())
        + _prefixed(_check_control(req.path.encode(), "path").encode())
    )
    framing = KNOWN_REQUEST if known_length else INDETERMINATE_REQUEST
    body = _encode_body(req.headers, req.content, req.trailers, not known_length)
    return encode_varint(framing) + control + body


def _final_status(status: int) -> bytes:
    if not 200 <= status <= 599:
        raise InvalidStatus(f"final status {status} out of range")
    return encode_varint(status)


def _informational(informational: Iterable[tuple[int, Fields]], indeterminate: bool) -> bytes:
    out = b""
    for status, fields in informational:
        if not 100 <= status <= 199:
            raise InvalidStatus(f"informational status {status} out of range")
        out += encode_varint(status) + _encode_section(fields, indeterminate)
    return out


def encode_response(resp: BHTTPResponse, *, known_length: bool = True) -> bytes:
    framing = KNOWN_RESPONSE if known_length else INDETERMINATE_RESPONSE
    return (
        encode_varint(framing)
        + _informational(resp.informational, not known_length)
        + _final_status(resp.status)
        + _encode_body(resp.headers, resp.content, resp.trailers, not known_length)
    )


def encode_response_head(
    status: int, headers: Fields = (), informational: Iterable[tuple[int, Fields]] = ()
) -> bytes:
    """Start of a streamed indeterminate-length response: framing, status and header section."""
    return (
        encode_varint(INDETERMINATE_RESPONSE)
        + _informational(informational, True)
        + _final_status(status)
        + _encode_section(headers, True)
    )


def encode_content_chunk(data: bytes) -> bytes:
    """One indeterminate-length content chunk; empty data encodes to nothing (0 ends content)."""
    return _prefixed(data) if data else b""


def encode_response_end(trailers: Fields = ()) -> bytes:
    """Content terminator plus the trailer section of a streamed response."""
    return b"\x00" + _encode_section(trailers, True)
