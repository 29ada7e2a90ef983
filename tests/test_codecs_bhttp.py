"""Binary HTTP (RFC 9292): the RFC's examples as bytes, the decoder rows of the adversarial table
(spec note ohttp.md §5), limits, and Hypothesis round trips / "only typed errors" properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.codecs.bhttp import (
    BHTTPError,
    BHTTPRequest,
    BHTTPResponse,
    InvalidControlData,
    InvalidField,
    InvalidFraming,
    InvalidPadding,
    InvalidStatus,
    LimitExceeded,
    Limits,
    Truncated,
    decode_message,
    decode_request,
    decode_response,
    decode_varint,
    encode_content_chunk,
    encode_request,
    encode_response,
    encode_response_end,
    encode_response_head,
    encode_varint,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def hexdump(text: str) -> bytes:
    """The RFC's hex-dump figures: hex words on the left, ASCII on the right (dropped)."""
    return bytes.fromhex("".join(line[:35] for line in text.strip().splitlines()))


# RFC 9292 §5.1, "Known-Length Binary Encoding of Request"
RFC_KNOWN_REQUEST = hexdump("""
00034745 54056874 74707300 0a2f6865  ..GET.https../he
6c6c6f2e 74787440 6c0a7573 65722d61  llo.txt@l.user-a
67656e74 34637572 6c2f372e 31362e33  gent4curl/7.16.3
206c6962 6375726c 2f372e31 362e3320   libcurl/7.16.3
4f70656e 53534c2f 302e392e 376c207a  OpenSSL/0.9.7l z
6c69622f 312e322e 3304686f 73740f77  lib/1.2.3.host.w
77772e65 78616d70 6c652e63 6f6d0f61  ww.example.com.a
63636570 742d6c61 6e677561 67650665  ccept-language.e
6e2c206d 690000                      n, mi..
""")

# RFC 9292 §5.1, "Indefinite-Length Binary Encoding of Request" (10 bytes of padding)
RFC_INDETERMINATE_REQUEST = hexdump("""
02034745 54056874 74707300 0a2f6865  ..GET.https../he
6c6c6f2e 7478740a 75736572 2d616765  llo.txt.user-age
6e743463 75726c2f 372e3136 2e33206c  nt4curl/7.16.3 l
69626375 726c2f37 2e31362e 33204f70  ibcurl/7.16.3 Op
656e5353 4c2f302e 392e376c 207a6c69  enSSL/0.9.7l zli
622f312e 322e3304 686f7374 0f777777  b/1.2.3.host.www
2e657861 6d706c65 2e636f6d 0f616363  .example.com.acc
6570742d 6c616e67 75616765 06656e2c  ept-language.en,
206d6900 00000000 00000000 00000000   mi.............
""")

# RFC 9292 §5.2, "Binary Response including Informational Responses"
RFC_INDETERMINATE_RESPONSE = hexdump("""
03406607 72756e6e 696e670a 22736c65  .@f.running."sle
65702031 35220040 67046c69 6e6b233c  ep 15".@g.link#<
2f737479 6c652e63 73733e3b 2072656c  /style.css>; rel
3d707265 6c6f6164 3b206173 3d737479  =preload; as=sty
6c65046c 696e6b24 3c2f7363 72697074  le.link$</script
2e6a733e 3b207265 6c3d7072 656c6f61  .js>; rel=preloa
643b2061 733d7363 72697074 0040c804  d; as=script.@..
64617465 1d4d6f6e 2c203237 204a756c  date.Mon, 27 Jul
20323030 39203132 3a32383a 35332047   2009 12:28:53 G
4d540673 65727665 72064170 61636865  MT.server.Apache
0d6c6173 742d6d6f 64696669 65641d57  .last-modified.W
65642c20 3232204a 756c2032 30303920  ed, 22 Jul 2009
31393a31 353a3536 20474d54 04657461  19:15:56 GMT.eta
67142233 34616133 38372d64 2d313536  g."34aa387-d-156
38656230 30220d61 63636570 742d7261  8eb00".accept-ra
6e676573 05627974 65730e63 6f6e7465  nges.bytes.conte
6e742d6c 656e6774 68023531 04766172  nt-length.51.var
790f4163 63657074 2d456e63 6f64696e  y.Accept-Encodin
670c636f 6e74656e 742d7479 70650a74  g.content-type.t
6578742f 706c6169 6e003348 656c6c6f  ext/plain.3Hello
20576f72 6c642120 4d792063 6f6e7465   World! My conte
6e742069 6e636c75 64657320 61207472  nt includes a tr
61696c69 6e672043 524c462e 0d0a0000  ailing CRLF.....
""")

# RFC 9292 §5.2, "Known-Length Encoding of Response"
RFC_KNOWN_RESPONSE = hexdump("""
0140c800 1d546869 7320636f 6e74656e  .@...This conten
7420636f 6e746169 6e732043 524c462e  t contains CRLF.
0d0a0d07 74726169 6c657204 74657874  ....trailer.text
""")

RFC_REQUEST = BHTTPRequest(
    method="GET",
    scheme="https",
    authority="",
    path="/hello.txt",
    headers=(
        (b"user-agent", b"curl/7.16.3 libcurl/7.16.3 OpenSSL/0.9.7l zlib/1.2.3"),
        (b"host", b"www.example.com"),
        (b"accept-language", b"en, mi"),
    ),
)

# RFC 9458 Appendix A's inner messages: header section (and more) truncated away
RFC9458_REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")


# --- RFC examples ---------------------------------------------------------------------------


def test_rfc9292_known_length_request() -> None:
    assert decode_request(RFC_KNOWN_REQUEST) == RFC_REQUEST
    assert encode_request(RFC_REQUEST) == RFC_KNOWN_REQUEST


def test_rfc9292_known_length_request_truncated_trailers_and_content() -> None:
    # "the last two bytes ... can each be removed without altering the semantics"
    assert decode_request(RFC_KNOWN_REQUEST[:-1]) == RFC_REQUEST
    assert decode_request(RFC_KNOWN_REQUEST[:-2]) == RFC_REQUEST


def test_rfc9292_indeterminate_request_with_padding() -> None:
    assert decode_request(RFC_INDETERMINATE_REQUEST) == RFC_REQUEST
    encoded = encode_request(RFC_REQUEST, known_length=False)
    assert encoded + bytes(10) == RFC_INDETERMINATE_REQUEST  # the RFC's 10 bytes of padding
    # "anything up to 12 bytes can be removed from this message without affecting its meaning"
    for cut in range(13):
        assert decode_request(RFC_INDETERMINATE_REQUEST[: len(RFC_INDETERMINATE_REQUEST) - cut])


def test_rfc9292_indeterminate_response_with_informational() -> None:
    resp = decode_response(RFC_INDETERMINATE_RESPONSE)
    assert resp.informational == (
        (102, ((b"running", b'"sleep 15"'),)),
        (
            103,
            (
                (b"link", b"</style.css>; rel=preload; as=style"),
                (b"link", b"</script.js>; rel=preload; as=script"),
            ),
        ),
    )
    assert resp.status == 200
    assert dict(resp.headers)[b"vary"] == b"Accept-Encoding"
    assert len(resp.headers) == 8
    assert resp.content == b"Hello World! My content includes a trailing CRLF.\r\n"
    assert resp.trailers == ()
    assert encode_response(resp, known_length=False) == RFC_INDETERMINATE_RESPONSE
    assert decode_response(encode_response(resp)) == resp


def test_rfc9292_known_length_response() -> None:
    resp = decode_response(RFC_KNOWN_RESPONSE)
    assert resp == BHTTPResponse(
        status=200, content=b"This content contains CRLF.\r\n", trailers=((b"trailer", b"text"),)
    )
    assert encode_response(resp) == RFC_KNOWN_RESPONSE
    assert decode_response(encode_response(resp, known_length=False)) == resp


def test_rfc9458_inner_messages() -> None:
    req = decode_request(RFC9458_REQUEST)
    assert (req.method, req.scheme, req.authority, req.path) == ("GET", "https", "example.com", "/")
    assert decode_response(bytes.fromhex("0140c8")) == BHTTPResponse(status=200)


def test_decode_message_dispatches_on_framing() -> None:
    assert isinstance(decode_message(RFC_KNOWN_REQUEST), BHTTPRequest)
    assert isinstance(decode_message(RFC_KNOWN_RESPONSE), BHTTPResponse)


def test_uppercase_names_are_lowercased() -> None:
    msg = encode_request(BHTTPRequest("POST", "https", "a", "/"))[:-3]  # drop the empty sections
    msg += b"\x0e\x0cContent-Type\x00"  # section len 14: name "Content-Type", empty value
    assert decode_request(msg).headers == ((b"content-type", b""),)


def test_repeated_fields_kept_in_order() -> None:  # table row 32: no dict collapse in the codec
    req = BHTTPRequest(
        "POST", "https", "", "/v1", headers=((b"authorization", b"a"), (b"authorization", b"b"))
    )
    for known in (True, False):
        assert decode_request(encode_request(req, known_length=known)).headers == req.headers


def test_streamed_response_pieces_decode() -> None:
    wire = (
        encode_response_head(200, ((b"content-type", b"text/event-stream"),))
        + encode_content_chunk(b"data: 1\n\n")
        + encode_content_chunk(b"")
        + encode_content_chunk(b"data: 2\n\n")
        + encode_response_end()
    )
    assert wire.startswith(b"\x03\x40\xc8")
    assert wire.endswith(b"\x00\x00")
    assert decode_response(wire) == BHTTPResponse(
        200, ((b"content-type", b"text/event-stream"),), b"data: 1\n\ndata: 2\n\n"
    )


# --- varints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("00", 0),
        ("25", 37),
        ("4063", 99),
        ("7bbd", 15293),
        ("9d7f3e7d", 494878333),
        ("c2197c5eff14e88c", 151288809941952652),
        # table row 17: non-minimal encodings are valid
        ("4000", 0),
        ("80000003", 3),
        ("c000000000000005", 5),
    ],
)
def test_varint_decode(raw: str, value: int) -> None:
    data = bytes.fromhex(raw)
    assert decode_varint(data) == (value, len(data))


def test_varint_encode_minimal_and_bounds() -> None:
    assert encode_varint(99) == b"\x40\x63"
    assert encode_varint((1 << 62) - 1) == b"\xff" * 8
    with pytest.raises(ValueError):
        encode_varint(1 << 62)
    with pytest.raises(ValueError):
        encode_varint(-1)


@pytest.mark.parametrize("raw", ["", "40", "c00000", "80", "bf0000"])
def test_varint_truncated(raw: str) -> None:  # table row 14
    with pytest.raises(Truncated):
        decode_varint(bytes.fromhex(raw))


@given(st.integers(0, (1 << 62) - 1))
@PROPS
def test_varint_round_trip(value: int) -> None:
    assert decode_varint(encode_varint(value)) == (value, len(encode_varint(value)))


def test_non_minimal_varints_in_a_message() -> None:  # row 17, inside a whole message
    msg = bytes.fromhex("400080000003") + b"GET" + bytes.fromhex("c000000000000005") + b"https"
    msg += b"\x00" + b"\x40\x01/" + bytes.fromhex("4000")  # authority "", path "/", headers
    req = decode_request(msg)
    assert (req.method, req.scheme, req.authority, req.path) == ("GET", "https", "", "/")


# --- adversarial table rows (inner layer) ----------------------------------------------------

CONTROL = b"\x03GET\x05https\x00\x01/"


@pytest.mark.parametrize(
    ("row", "raw", "error"),
    [
        ("12 empty plaintext", b"", Truncated),
        ("13 framing 4", b"\x04" + CONTROL, InvalidFraming),
        ("13 framing 40 04", b"\x40\x04" + CONTROL, InvalidFraming),
        ("13 framing 2^62-1", b"\xff" * 8, InvalidFraming),
        ("14 truncated varint 40", b"\x00\x40", Truncated),
        ("14 truncated varint c0 00 00", b"\x00\x03GET\xc0\x00\x00", Truncated),
        ("15 method len 10, 3 bytes", b"\x00\x0aGET", Truncated),
        ("15 section len 16, 4 bytes", b"\x00" + CONTROL + b"\x10\x01a\x01b", Truncated),
        ("16 huge method length", b"\x00" + b"\xff" * 8, BHTTPError),
        ("16 huge section length", b"\x00" + CONTROL + b"\xff" * 8, BHTTPError),
        ("16 huge content length", b"\x00" + CONTROL + b"\x00" + b"\xff" * 8, BHTTPError),
        ("16 huge indeterminate chunk", b"\x02" + CONTROL + b"\x00" + b"\xff" * 8, BHTTPError),
        ("18 framing only", b"\x00", Truncated),
        ("18 method only", b"\x00\x03GET", Truncated),
        ("18 empty method", b"\x00\x00\x05https\x00\x01/", InvalidControlData),
        ("19 zero-length name", b"\x00" + CONTROL + b"\x02\x00\x00", InvalidField),
        ("19 value crosses section end", b"\x00" + CONTROL + b"\x04\x01a\x05abcde", Truncated),
        ("19 name crosses section end", b"\x00" + CONTROL + b"\x02\x05ab", Truncated),
        ("20 section without terminator", b"\x02" + CONTROL + b"\x01a\x01b", Truncated),
        ("20 content without terminator", b"\x02" + CONTROL + b"\x00\x03abc", Truncated),
        ("20 trailers without terminator", b"\x02" + CONTROL + b"\x00\x00\x01a\x01b", Truncated),
        ("22 non-zero padding", b"\x00" + CONTROL + b"\x00\x00\x00\x00\x01", InvalidPadding),
        ("22 trailing garbage (indet.)", b"\x02" + CONTROL + b"\x00\x00\x00x", InvalidPadding),
        ("24 pseudo-field :path", b"\x00" + CONTROL + b"\x08\x05:path\x01/", InvalidField),
        ("24 space in name", b"\x00" + CONTROL + b"\x05\x03a b\x00", InvalidField),
        ("24 ( in name", b"\x00" + CONTROL + b"\x05\x03a(b\x00", InvalidField),
        ("24 0x80 in name", b"\x00" + CONTROL + b"\x05\x03a\x80b\x00", InvalidField),
        ("25 NUL in value", b"\x00" + CONTROL + b"\x05\x01a\x02x\x00", InvalidField),
        ("25 CR in value", b"\x00" + CONTROL + b"\x05\x01a\x02x\r", InvalidField),
        ("25 LF in value", b"\x00" + CONTROL + b"\x05\x01a\x02\nx", InvalidField),
        ("25 leading SP", b"\x00" + CONTROL + b"\x05\x01a\x02 x", InvalidField),
        ("25 trailing HTAB", b"\x00" + CONTROL + b"\x05\x01a\x02x\t", InvalidField),
        ("control data with space", b"\x00\x03GET\x05https\x00\x03/ x", InvalidControlData),
        ("control data non-ASCII", b"\x00\x03GET\x05https\x00\x02/\xff", InvalidControlData),
    ],
)
def test_adversarial_request(row: str, raw: bytes, error: type[BHTTPError]) -> None:
    with pytest.raises(error):
        decode_request(raw)


@pytest.mark.parametrize("framing", [b"\x01", b"\x03"])
def test_response_framing_in_request_rejected(framing: bytes) -> None:  # row 13
    with pytest.raises(InvalidFraming):
        decode_request(framing + b"\x40\xc8")


def test_request_framing_in_response_rejected() -> None:
    with pytest.raises(InvalidFraming):
        decode_response(RFC_KNOWN_REQUEST)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x00" + CONTROL, id="21 truncated before headers (known)"),
        pytest.param(b"\x02" + CONTROL, id="21 truncated before headers (indet.)"),
        pytest.param(b"\x02" + CONTROL + b"\x00", id="21 truncated before content"),
        pytest.param(b"\x02" + CONTROL + b"\x00\x00", id="21 truncated before trailers"),
        pytest.param(b"\x00" + CONTROL + bytes(100), id="23 100 bytes zero padding"),
        pytest.param(b"\x02" + CONTROL + bytes(10), id="23 10 bytes zero padding"),
        pytest.param(b"\x00" + CONTROL + b"\x00\x00\x04\x01a\x01b", id="empty content, trailers"),
    ],
)
def test_accepted_truncation_and_padding(raw: bytes) -> None:  # rows 21, 23
    req = decode_request(raw)
    assert (req.method, req.path, req.content) == ("GET", "/", b"")


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x01\x40\x63", InvalidStatus),  # 99
        (b"\x01\x42\x58", InvalidStatus),  # 600
        (b"\x01\x00", InvalidStatus),
        (b"\x01\x40\x64\x00", Truncated),  # row 26: 1xx then EOF
        (b"\x03\x40\x67\x00", Truncated),
        (b"\x01", Truncated),
    ],
)
def test_adversarial_response_status(raw: bytes, error: type[BHTTPError]) -> None:  # row 26
    with pytest.raises(error):
        decode_response(raw)


@pytest.mark.parametrize("status", [99, 100, 199, 600, 0])
def test_encoder_never_emits_a_bad_final_status(status: int) -> None:
    with pytest.raises(InvalidStatus):
        encode_response(BHTTPResponse(status))
    with pytest.raises(InvalidStatus):
        encode_response_head(status)


def test_encoder_rejects_bad_fields_and_control_data() -> None:
    with pytest.raises(InvalidField):
        encode_request(BHTTPRequest("GET", "https", "", "/", headers=((b"x", b"a\r\nb"),)))
    with pytest.raises(InvalidField):
        encode_request(BHTTPRequest("GET", "https", "", "/", headers=((b":path", b"/"),)))
    with pytest.raises(InvalidControlData):
        encode_request(BHTTPRequest("G T", "https", "", "/"))
    with pytest.raises(InvalidStatus):
        encode_response(BHTTPResponse(200, informational=((200, ()),)))


# --- limits (row 27) -------------------------------------------------------------------------


def _many_fields(n: int, known: bool) -> bytes:
    req = BHTTPRequest("GET", "https", "", "/", headers=tuple((b"a", b"b") for _ in range(n)))
    return encode_request(req, known_length=known)


@pytest.mark.parametrize("known", [True, False])
def test_limit_field_count(known: bool) -> None:
    assert len(decode_request(_many_fields(10, known), Limits(max_fields=10)).headers) == 10
    with pytest.raises(LimitExceeded):
        decode_request(_many_fields(11, known), Limits(max_fields=10))
    with pytest.raises(LimitExceeded):  # thousands of tiny lines, default limits
        decode_request(_many_fields(5000, known))


@pytest.mark.parametrize("known", [True, False])
def test_limit_section_bytes(known: bool) -> None:
    req = BHTTPRequest("GET", "https", "", "/", headers=((b"x", b"v" * 100),) * 3)
    with pytest.raises(LimitExceeded):
        decode_request(encode_request(req, known_length=known), Limits(max_section_bytes=200))


@pytest.mark.parametrize("known", [True, False])
def test_limit_content_and_name_and_value(known: bool) -> None:
    big = encode_request(
        BHTTPRequest("POST", "https", "", "/", content=b"x" * 101), known_length=known
    )
    with pytest.raises(LimitExceeded):
        decode_request(big, Limits(max_content_bytes=100))
    assert decode_request(big, Limits(max_content_bytes=101)).content == b"x" * 101
    name = encode_request(
        BHTTPRequest("GET", "h", "", "/", headers=((b"n" * 9, b""),)), known_length=known
    )
    with pytest.raises(LimitExceeded):
        decode_request(name, Limits(max_name_length=8))
    value = encode_request(
        BHTTPRequest("GET", "h", "", "/", headers=((b"n", b"v" * 9),)), known_length=known
    )
    with pytest.raises(LimitExceeded):
        decode_request(value, Limits(max_value_length=8))
    with pytest.raises(LimitExceeded):
        decode_request(
            encode_request(BHTTPRequest("GET", "h", "", "/" * 9)), Limits(max_value_length=8)
        )


def test_limit_indeterminate_content_across_chunks() -> None:
    raw = b"\x02" + CONTROL + b"\x00" + b"\x32" + b"x" * 50 + b"\x33" + b"y" * 51 + b"\x00\x00"
    assert len(decode_request(raw, Limits(max_content_bytes=101)).content) == 101
    with pytest.raises(LimitExceeded):
        decode_request(raw, Limits(max_content_bytes=100))


def test_limit_informational_count() -> None:
    resp = BHTTPResponse(200, informational=((103, ()),) * 9)
    with pytest.raises(LimitExceeded):
        decode_response(encode_response(resp))
    assert (
        len(decode_response(encode_response(resp), Limits(max_informational=9)).informational) == 9
    )


# --- properties -------------------------------------------------------------------------------

TCHAR_LOWER = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
names = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(TCHAR_LOWER[x % len(TCHAR_LOWER)] for x in b)
)
values = st.binary(max_size=24).map(
    lambda b: bytes(c for c in b if c not in b"\0\r\n").strip(b" \t")
)
fields = st.lists(st.tuples(names, values), max_size=6).map(tuple)
vchar = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=16)
tokens = st.text(alphabet=TCHAR_LOWER.decode() + "GETPOS", min_size=1, max_size=8)

requests = st.builds(
    BHTTPRequest,
    method=tokens,
    scheme=vchar,
    authority=vchar,
    path=vchar,
    headers=fields,
    content=st.binary(max_size=64),
    trailers=fields,
)
responses = st.builds(
    BHTTPResponse,
    status=st.integers(200, 599),
    headers=fields,
    content=st.binary(max_size=64),
    trailers=fields,
    informational=st.lists(st.tuples(st.integers(100, 199), fields), max_size=3).map(tuple),
)


@given(requests, st.booleans(), st.integers(0, 20))
@PROPS
def test_request_round_trip(req: BHTTPRequest, known: bool, padding: int) -> None:
    assert decode_request(encode_request(req, known_length=known) + bytes(padding)) == req


@given(responses, st.booleans(), st.integers(0, 20))
@PROPS
def test_response_round_trip(resp: BHTTPResponse, known: bool, padding: int) -> None:
    assert decode_response(encode_response(resp, known_length=known) + bytes(padding)) == resp


@given(st.binary(max_size=200))
@PROPS
def test_arbitrary_bytes_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(BHTTPError):
        decode_message(data, Limits(max_fields=8, max_content_bytes=64))


@given(st.one_of(requests.map(encode_request), responses.map(encode_response)), st.data())
@PROPS
def test_mutated_messages_only_typed_errors(wire: bytes, data: st.DataObject) -> None:
    buf = bytearray(wire)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos:]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=9))
    with contextlib.suppress(BHTTPError):
        decode_message(bytes(buf))
