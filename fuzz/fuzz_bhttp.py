"""Binary HTTP (RFC 9292) decoding: requests and responses, known and indeterminate length.

The input is one raw message (its first varint picks request/response and the framing). Checks:
  * ``decode_message`` / ``decode_request`` / ``decode_response`` raise only ``BHTTPError``, and
    exactly one of request/response accepts what ``decode_message`` accepts;
  * tighter ``Limits`` never accept more: with ``SMALL_LIMITS`` the result is either the same value
    or a ``BHTTPError``;
  * round trip: whatever decodes re-encodes in *both* framings and decodes to the same value.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["trio_gateway"]):
    from _fuzzlib import SMALL_LIMITS

    from trio_gateway.codecs.bhttp import (
        BHTTPError,
        BHTTPRequest,
        BHTTPResponse,
        decode_message,
        decode_request,
        decode_response,
        encode_request,
        encode_response,
    )


def _reencode(msg: BHTTPRequest | BHTTPResponse, known: bool) -> bytes:
    if isinstance(msg, BHTTPRequest):
        return encode_request(msg, known_length=known)
    return encode_response(msg, known_length=known)


def TestOneInput(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except BHTTPError:
        msg = None
    try:
        req: BHTTPRequest | None = decode_request(data)
    except BHTTPError:
        req = None
    try:
        resp: BHTTPResponse | None = decode_response(data)
    except BHTTPError:
        resp = None
    assert msg == (req if req is not None else resp), (msg, req, resp)
    assert req is None or resp is None

    try:
        small = decode_message(data, SMALL_LIMITS)
    except BHTTPError:
        small = None
    assert small is None or small == msg, "tighter limits accepted something different"

    if msg is None:
        return
    for known in (True, False):
        wire = _reencode(msg, known)  # the decoder's output must be encodable: no exception
        again = decode_message(wire)  # ... and decodable: no BHTTPError either
        assert again == msg, (known, msg, again)
        assert _reencode(again, known) == wire


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
