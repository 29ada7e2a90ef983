"""Chunked OHTTP (draft-ietf-ohai-chunked-ohttp-08): both stream decoders fed in fuzzed pieces.

Input layout: see ``_fuzzlib``. ``mode % 4`` picks what the payload is:

0. raw ``message/ohttp-chunked-req`` bytes -> ``ChunkedRequestDecoder.feed`` per piece, then
   ``close()``; only ``OHTTPError`` may escape (``ChunkedStateError`` is a crash: the harness
   never touches a failed decoder). Piecewise and whole-body (``decapsulate_chunked_request``)
   decoding must agree: same plaintext, or the same error class. Decrypted plaintext goes to
   ``decode_request``. Bit 4: ``max_chunk`` 64, so oversized (final) chunks are reachable.
1. plaintext: the payload, cut by the sizes, is sealed with ``ChunkedRequestSealer`` (fixed
   ephemeral key; bit 2: ChaCha20-Poly1305; bit 4: max_chunk 64) and decoded in pieces cut the
   other way; it must round-trip. Bit 3 tampers one byte: then decoding must fail. Bit 5 slips
   a validly sealed *empty* non-final chunk in before the final one: ``DecryptionFailed``.
2. raw ``message/ohttp-chunked-res`` bytes -> ``ChunkedResponseDecoder`` (client of the draft's
   vector) per piece, then ``close()``; only ``OHTTPError``. Bit 4 as in mode 0.
3. plaintext: sealed with ``ChunkedResponseSealer`` and decoded again (bits as in mode 1).
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["trio_gateway"]):
    from _fuzzlib import C_SKE, CHUNKED_KEYS, KEY_C, cut, parse

    from trio_gateway.codecs.bhttp import BHTTPError, decode_request, encode_varint
    from trio_gateway.codecs.chunked_ohttp import (
        MAX_CHUNK,
        ChunkedRequestDecoder,
        ChunkedRequestSealer,
        ChunkedResponseDecoder,
        ChunkedResponseSealer,
        decapsulate_chunked_request,
    )
    from trio_gateway.codecs.ohttp import (
        AEAD_AES_128_GCM,
        AEAD_CHACHA20_POLY1305,
        KDF_HKDF_SHA256,
        DecryptionFailed,
        OHTTPError,
    )

C_ENC_REQUEST = bytes.fromhex(
    "01002000010001"
    "8811eb457e100811c40a0aa71340a1b81d804bb986f736f2f566a7199761a032"
    "1c2ad24942d4d692563012f2980c8fef437a336b9b2fc938ef77a5834f"
    "1d2e33d8fd25577afe31bd1c79d094f76b6250ae6549b473ecd950501311"
    "001c6c1395d0ef7c1022297966307b8a7f"
)
C_RESPONSE_NONCE = bytes.fromhex("bcce7f4cb921309ba5d62edf1769ef09")
_, RESPONSE_CTX = decapsulate_chunked_request(CHUNKED_KEYS, C_ENC_REQUEST)
CLIENT = ChunkedRequestSealer(KEY_C.config, ephemeral_key=C_SKE).client  # the vector's client


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except OHTTPError as exc:
        return type(exc)


def _feed_request(pieces: list[bytes], max_chunk: int = MAX_CHUNK) -> bytes:
    dec = ChunkedRequestDecoder(CHUNKED_KEYS, max_chunk=max_chunk)
    out = [pt for piece in pieces for pt in dec.feed(piece)]
    out.append(dec.close())
    assert dec.response_context is not None
    return b"".join(out)


def _feed_response(pieces: list[bytes], max_chunk: int = MAX_CHUNK) -> bytes:
    dec = ChunkedResponseDecoder(CLIENT, max_chunk=max_chunk)
    out = [pt for piece in pieces for pt in dec.feed(piece)]
    out.append(dec.close())
    return b"".join(out)


def _raw_request(pieces: list[bytes], payload: bytes, max_chunk: int) -> None:
    got = _outcome(_feed_request, pieces, max_chunk)
    whole = _outcome(
        lambda: decapsulate_chunked_request(CHUNKED_KEYS, payload, max_chunk=max_chunk)[0]
    )
    assert got == whole, (got, whole)
    if isinstance(got, bytes):
        with contextlib.suppress(BHTTPError):
            decode_request(got)


def _raw_response(pieces: list[bytes], max_chunk: int) -> None:
    _outcome(_feed_response, pieces, max_chunk)


def _tamper(wire: bytes, sizes: tuple[int, ...]) -> bytes:
    pos = int.from_bytes(bytes(sizes[:2]) or b"\x00") % len(wire)
    out = bytearray(wire)
    out[pos] ^= (sizes[2] if len(sizes) > 2 else 0) or 1
    return bytes(out)


def _sealed(payload: bytes, mode: int, sizes: tuple[int, ...], request: bool) -> None:
    suite = (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305 if mode & 4 else AEAD_AES_128_GCM)
    max_chunk = 64 if mode & 16 else MAX_CHUNK
    parts = list(cut(payload, sizes))
    sealer: ChunkedRequestSealer | ChunkedResponseSealer
    if request:
        sealer = ChunkedRequestSealer(
            KEY_C.config, suite=suite, ephemeral_key=C_SKE, max_chunk=max_chunk
        )
    else:
        sealer = ChunkedResponseSealer(
            RESPONSE_CTX, response_nonce=C_RESPONSE_NONCE, max_chunk=max_chunk
        )  # fixed nonce: the harness must be deterministic
    wire = b"".join(sealer.seal_chunk(part) for part in [b"", *parts[:-1]])
    feed = _feed_request if request else _feed_response
    split = tuple(reversed(sizes))
    if request and mode & 32 and isinstance(sealer, ChunkedRequestSealer):
        empty = sealer.client.seal(b"")  # a validly sealed, empty, non-final chunk
        wire += encode_varint(len(empty)) + empty + sealer.seal_final(parts[-1])
        got = _outcome(feed, list(cut(wire, split)), max_chunk)
        assert got is DecryptionFailed, got
        return
    wire += sealer.seal_final(parts[-1])
    if mode & 8:
        bad = _tamper(wire, sizes)
        got = _outcome(feed, list(cut(bad, split)), max_chunk)
        assert not isinstance(got, bytes), "tampered chunked message decoded"
        return
    assert feed(list(cut(wire, split)), max_chunk) == payload


def TestOneInput(data: bytes) -> None:
    p = parse(data)
    kind = p.mode % 4
    max_chunk = 64 if p.mode & 16 else MAX_CHUNK
    if kind == 0:
        _raw_request(p.split(), p.payload, max_chunk)
    elif kind == 1:
        _sealed(p.payload, p.mode, p.sizes, request=True)
    elif kind == 2:
        _raw_response(p.split(), max_chunk)
    else:
        _sealed(p.payload, p.mode, p.sizes, request=False)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
