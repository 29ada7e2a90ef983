"""Shared by the atheris harnesses: the fixed keys (those of the published vectors, so the seed
corpus decrypts) and the input layout used by the harnesses that feed a decoder in pieces.

Layout of a "pieces" input: ``mode || k || size_1 .. size_k || payload`` where ``k`` is the low
nibble of the second byte. The payload is cut into pieces of ``size_i`` bytes (0 is allowed: an
empty ``feed``); whatever is left is the last piece. Seeds are ``mode || 00 || vector``.

Import this module inside ``atheris.instrument_imports()`` *after* the codecs, or standalone
(make_corpus.py); it holds no state that depends on the fuzzer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trio_gateway.codecs.bhttp import Limits
from trio_gateway.codecs.ohttp import (
    AEAD_CHACHA20_POLY1305,
    KDF_HKDF_SHA256,
    OHTTPServerKey,
)

# RFC 9458 Appendix A: the gateway's private key and the client's ephemeral key.
A_SKR = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
A_SKE = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
# draft-ietf-ohai-chunked-ohttp-08 Appendix A.
C_SKR = bytes.fromhex("1c190d72acdbe4dbc69e680503bb781a932c70a12c8f3754434c67d8640d8698")
C_SKE = bytes.fromhex("b26d565f3f875ed480d1abced3d665159650c99174fd0b124ac4bda0c64ae324")

KEY_A = OHTTPServerKey.from_private_bytes(1, A_SKR)
KEY_C = OHTTPServerKey.from_private_bytes(1, C_SKR)
# A second key id that offers ChaCha20-Poly1305 only: reaches UnsupportedSuite with a known id.
KEY_CHACHA = OHTTPServerKey.from_private_bytes(
    2, C_SKR, frozenset({(KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305)})
)
OHTTP_KEYS = {1: KEY_A, 2: KEY_CHACHA}
CHUNKED_KEYS = {1: KEY_C, 2: KEY_CHACHA}

# Small caps so that short fuzz inputs reach every LimitExceeded / SSEError branch.
SMALL_LIMITS = Limits(
    max_fields=6,
    max_section_bytes=96,
    max_content_bytes=128,
    max_name_length=16,
    max_value_length=48,
    max_informational=2,
)


@dataclass(frozen=True, slots=True)
class Pieces:
    mode: int
    sizes: tuple[int, ...]
    payload: bytes

    def split(self, data: bytes | None = None, sizes: tuple[int, ...] | None = None) -> list[bytes]:
        return list(
            cut(self.payload if data is None else data, self.sizes if sizes is None else sizes)
        )


def parse(data: bytes) -> Pieces:
    if len(data) < 2:
        return Pieces(data[0] if data else 0, (), b"")
    k = data[1] & 0x0F
    sizes = tuple(data[2 : 2 + k])
    return Pieces(data[0], sizes, data[2 + k :])


def cut(data: bytes, sizes: tuple[int, ...]) -> Iterator[bytes]:
    pos = 0
    for size in sizes:
        yield data[pos : pos + size]
        pos += size
    yield data[pos:]


def seed(mode: int, payload: bytes, sizes: tuple[int, ...] = ()) -> bytes:
    return bytes([mode, len(sizes)]) + bytes(sizes) + payload
