"""Outer OHTTP decapsulation (RFC 9458 §4.3) with fixed server keys, and what sits behind it.

Input layout: see ``_fuzzlib``. ``mode % 4`` picks what the payload is:

0. raw ``message/ohttp-req`` bytes -> ``decapsulate_request``; only ``OHTTPError`` may escape.
   If it decrypts (the RFC vector seed does), the plaintext goes to ``decode_request``
   (only ``BHTTPError``) and a response is sealed and opened again.
1. structured: a FuzzedDataProvider builds ``hdr || enc || ct`` from likely values (known and
   unknown key ids, offered and foreign suites, enc of the right length, ct >= 16 bytes), so the
   fuzzer spends its time in HPKE setup and AEAD open rather than in the length checks.
2. plaintext: the payload is encapsulated with a real client key (fixed ephemeral key, mode bit 2
   picks ChaCha20-Poly1305), so the BHTTP decoder behind decryption sees fuzzed bytes. Mode bit 3
   tampers one byte (position/xor from the sizes): that request must NOT decapsulate.
3. client side: ``ClientContext.open_response`` on the payload (only ``OHTTPError``); the RFC
   response vector decrypts and is decoded as a BHTTP response.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports(include=["trio_gateway"]):
    from _fuzzlib import A_SKE, KEY_A, OHTTP_KEYS, parse

    from trio_gateway.codecs.bhttp import BHTTPError, decode_request, decode_response
    from trio_gateway.codecs.ohttp import (
        AEAD_AES_128_GCM,
        AEAD_CHACHA20_POLY1305,
        KDF_HKDF_SHA256,
        KEM_X25519,
        OHTTPError,
        RequestHeader,
        ResponseContext,
        decapsulate_request,
        encapsulate_request,
    )

RFC_REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")
_, RFC_CLIENT = encapsulate_request(KEY_A.config, RFC_REQUEST, ephemeral_key=A_SKE)


def _inner(plaintext: bytes, ctx: ResponseContext) -> None:
    with contextlib.suppress(BHTTPError):
        decode_request(plaintext)
    # sealing must work for any request that opened; fixed nonce: the harness is deterministic
    ctx.seal_response(b"\x01\x40\xc8", response_nonce=bytes(ctx.suite.entropy_len))


def _raw(payload: bytes) -> None:
    try:
        plaintext, ctx = decapsulate_request(OHTTP_KEYS, payload)
    except OHTTPError:
        return
    _inner(plaintext, ctx)


def _structured(payload: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(payload)
    key_id = fdp.PickValueInList([1, 1, 1, 2, 0, fdp.ConsumeIntInRange(0, 255)])
    kem = fdp.PickValueInList([KEM_X25519, KEM_X25519, KEM_X25519, 0x0010, 0x0021])
    kdf = fdp.PickValueInList([KDF_HKDF_SHA256, KDF_HKDF_SHA256, KDF_HKDF_SHA256, 2, 3])
    aead = fdp.PickValueInList(
        [AEAD_AES_128_GCM, AEAD_AES_128_GCM, AEAD_CHACHA20_POLY1305, 2, 0xFFFF, 0x1234]
    )
    hdr = RequestHeader(key_id, kem, kdf, aead).encode()
    enc_len = fdp.PickValueInList([32, 32, 32, 0, 31, 33])
    enc_kind = fdp.ConsumeIntInRange(0, 3)
    if enc_kind == 0:
        enc = bytes(enc_len)  # all-zero enc: a low-order point
    elif enc_kind == 1:
        enc = KEY_A.public_key[:enc_len]
    else:
        enc = fdp.ConsumeBytes(enc_len)
    _raw(hdr + enc + fdp.ConsumeBytes(fdp.remaining_bytes()))


def _plaintext(payload: bytes, mode: int, sizes: tuple[int, ...]) -> None:
    suite = (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305 if mode & 4 else AEAD_AES_128_GCM)
    wire, client = encapsulate_request(KEY_A.config, payload, suite=suite, ephemeral_key=A_SKE)
    if mode & 8:
        pos = int.from_bytes(bytes(sizes[:2]) or b"\x00") % len(wire)
        flip = (sizes[2] if len(sizes) > 2 else 0) or 1
        tampered = bytearray(wire)
        tampered[pos] ^= flip
        try:
            decapsulate_request(OHTTP_KEYS, bytes(tampered))
        except OHTTPError:
            return
        raise AssertionError(f"tampered request (byte {pos} ^ {flip:#x}) decapsulated")
    plaintext, ctx = decapsulate_request(OHTTP_KEYS, wire)
    assert plaintext == payload
    _inner(plaintext, ctx)
    sealed = ctx.seal_response(payload, response_nonce=bytes(ctx.suite.entropy_len))
    assert client.open_response(sealed) == payload


def _client(payload: bytes) -> None:
    try:
        plaintext = RFC_CLIENT.open_response(payload)
    except OHTTPError:
        return
    with contextlib.suppress(BHTTPError):
        decode_response(plaintext)


def TestOneInput(data: bytes) -> None:
    p = parse(data)
    kind = p.mode % 4
    if kind == 0:
        _raw(p.payload)
    elif kind == 1:
        _structured(p.payload)
    elif kind == 2:
        _plaintext(p.payload, p.mode, p.sizes)
    else:
        _client(p.payload)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
