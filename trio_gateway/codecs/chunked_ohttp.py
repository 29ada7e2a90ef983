"""Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp-08), sans-IO.

Strategy: both directions are "a fixed prefix, then ``varint(len >= 1) || sealed`` chunks, then
``0x00`` and a final sealed chunk that runs to the end of the stream". ``_ChunkReader.feed``
appends to a buffer and runs the step for the current state from ``_STEPS`` (prefix -> chunks ->
final) until a step needs more bytes; each opened non-final chunk is returned as plaintext.
``close()`` is the end of the stream: only there can the final chunk (AAD ``"final"``) be opened,
and a stream that ends anywhere else is ``TruncatedChunks`` -- never a complete message.
Any error poisons the reader (HPKE sequence numbers advance even on failure, so there is no
recovering); lengths are checked against ``max_chunk`` before bytes are buffered for them.

* gateway: ``ChunkedRequestDecoder`` (``message/ohttp-chunked-req``, HPKE context sequence
  numbers order the chunks) and ``ChunkedResponseSealer`` (``message/ohttp-chunked-res``: the
  response nonce, then chunks sealed with ``aead_nonce XOR counter``, then the final chunk).
* client (tests, fuzz seeds): ``ChunkedRequestSealer`` and ``ChunkedResponseDecoder``.

Empty non-final chunks are a decryption error on receipt and are never produced: the sealers
split plaintext into pieces of at most ``max_chunk`` bytes and emit nothing for empty input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from pyhpke.context_interface import ContextInterface

from .bhttp import Truncated, decode_varint, encode_varint
from .ohttp import (
    AEAD,
    AEAD_AES_128_GCM,
    HEADER_LEN,
    KDF_HKDF_SHA256,
    ClientContext,
    DecryptionFailed,
    KeyConfig,
    MalformedRequest,
    OHTTPServerKey,
    RequestHeader,
    ResponseContext,
    Suite,
    hpke_open,
    select_key,
    setup_recipient,
    setup_sender,
)

__all__ = [
    "CHUNKED_REQUEST_LABEL",
    "CHUNKED_RESPONSE_LABEL",
    "FINAL_AAD",
    "MAX_CHUNK",
    "ChunkTooLarge",
    "ChunkedRequestDecoder",
    "ChunkedRequestSealer",
    "ChunkedResponseDecoder",
    "ChunkedResponseSealer",
    "ChunkedStateError",
    "TruncatedChunks",
    "decapsulate_chunked_request",
]

CHUNKED_REQUEST_LABEL = b"message/bhttp chunked request"
CHUNKED_RESPONSE_LABEL = b"message/bhttp chunked response"
FINAL_AAD = b"final"
MAX_CHUNK = 1 << 14  # plaintext bytes per chunk every implementation MUST accept


class TruncatedChunks(MalformedRequest):
    """The stream ended before an authenticated final chunk (inside a chunk, or between chunks)."""


class ChunkTooLarge(MalformedRequest):
    """A chunk (or the final chunk) longer than this side accepts."""


class ChunkedStateError(RuntimeError):
    """Misuse of a sealer/reader: used after it finished or failed. A bug, not attacker input."""


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# --- readers ------------------------------------------------------------------------------------

_PREFIX, _CHUNKS, _FINAL, _DONE, _FAILED = "prefix", "chunks", "final", "done", "failed"


class _ChunkReader:
    """Shared machinery; subclasses parse their prefix and open one chunk."""

    def __init__(self, max_chunk: int, tag_len: int) -> None:
        self._buf = bytearray()
        self._state = _PREFIX
        self._max_sealed = max_chunk + tag_len

    # subclass hooks
    def _prefix(self) -> bool:
        raise NotImplementedError

    def _open(self, ciphertext: bytes, final: bool) -> bytes:
        raise NotImplementedError

    def _step_prefix(self, out: list[bytes]) -> bool:
        return self._prefix()

    def _step_chunk(self, out: list[bytes]) -> bool:
        try:
            length, start = decode_varint(self._buf)
        except Truncated:
            return False
        if length == 0:
            del self._buf[:start]
            self._state = _FINAL
            return True
        if length > self._max_sealed:
            raise ChunkTooLarge(f"chunk of {length} bytes")
        if len(self._buf) - start < length:
            return False
        ct = bytes(self._buf[start : start + length])
        del self._buf[: start + length]
        plaintext = self._open(ct, False)
        if not plaintext:
            raise DecryptionFailed()  # draft-08 §5: an empty non-final chunk
        out.append(plaintext)
        return True

    def _step_final(self, out: list[bytes]) -> bool:
        if len(self._buf) > self._max_sealed:
            raise ChunkTooLarge("final chunk too large")
        return False

    _STEPS: Mapping[str, Callable[[_ChunkReader, list[bytes]], bool]] = {
        _PREFIX: _step_prefix,
        _CHUNKS: _step_chunk,
        _FINAL: _step_final,
    }

    def _live(self) -> None:
        if self._state in (_DONE, _FAILED):
            raise ChunkedStateError(f"reader is {self._state}")

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the plaintext of every non-final chunk it completed."""
        self._live()
        self._buf += data
        out: list[bytes] = []
        try:
            while self._STEPS[self._state](self, out):
                pass
        except BaseException:
            self._state = _FAILED
            raise
        return out

    def close(self) -> bytes:
        """End of stream: open and return the final chunk, or raise ``TruncatedChunks``."""
        self._live()
        state, self._state = self._state, _FAILED
        if state != _FINAL:
            raise TruncatedChunks("stream ended without a final chunk")
        plaintext = self._open(bytes(self._buf), True)
        self._buf.clear()
        self._state = _DONE
        return plaintext


class ChunkedRequestDecoder(_ChunkReader):
    """Gateway side of ``message/ohttp-chunked-req``."""

    def __init__(self, keys: Mapping[int, OHTTPServerKey], *, max_chunk: int = MAX_CHUNK) -> None:
        super().__init__(max_chunk, 16)  # Nt is 16 for every AEAD we accept
        self._keys = keys
        self._ctx: ContextInterface | None = None
        self.response_context: ResponseContext | None = None

    def _prefix(self) -> bool:
        if len(self._buf) < HEADER_LEN:
            return False
        hdr = RequestHeader.decode(bytes(self._buf[:HEADER_LEN]))
        key, suite = select_key(self._keys, hdr)  # fails as soon as 7 bytes are in
        end = HEADER_LEN + suite.nenc
        if len(self._buf) < end:
            return False
        enc = bytes(self._buf[HEADER_LEN:end])
        self.response_context, self._ctx = setup_recipient(
            key, suite, hdr, enc, CHUNKED_REQUEST_LABEL
        )
        del self._buf[:end]
        self._state = _CHUNKS
        return True

    def _open(self, ciphertext: bytes, final: bool) -> bytes:
        if self._ctx is None:  # pragma: no cover - _CHUNKS is only reached after _prefix
            raise ChunkedStateError("no HPKE context")
        return hpke_open(self._ctx, ciphertext, FINAL_AAD if final else b"")

    def close(self) -> bytes:
        if self._state == _PREFIX:
            self._state = _FAILED
            raise MalformedRequest("header or encapsulated key truncated")
        return super().close()


def decapsulate_chunked_request(
    keys: Mapping[int, OHTTPServerKey], data: bytes, *, max_chunk: int = MAX_CHUNK
) -> tuple[bytes, ResponseContext]:
    """A whole ``message/ohttp-chunked-req`` body -> (joined plaintext, response context)."""
    dec = ChunkedRequestDecoder(keys, max_chunk=max_chunk)
    parts = dec.feed(bytes(data))
    parts.append(dec.close())
    if dec.response_context is None:  # pragma: no cover - close() succeeded, so it is set
        raise ChunkedStateError("no response context")
    return b"".join(parts), dec.response_context


class ChunkedResponseDecoder(_ChunkReader):
    """Client side of ``message/ohttp-chunked-res``."""

    def __init__(self, client: ClientContext, *, max_chunk: int = MAX_CHUNK) -> None:
        super().__init__(max_chunk, client.suite.nt)
        self._client = client
        self._aead: AEAD | None = None
        self._nonce = 0
        self._counter = 0

    def _prefix(self) -> bool:
        n = self._client.suite.entropy_len
        if len(self._buf) < n:
            return False
        aead, nonce = self._client.response_aead(CHUNKED_RESPONSE_LABEL, bytes(self._buf[:n]))
        self._aead, self._nonce = aead, int.from_bytes(nonce)
        del self._buf[:n]
        self._state = _CHUNKS
        return True

    def _open(self, ciphertext: bytes, final: bool) -> bytes:
        if self._aead is None:  # pragma: no cover
            raise ChunkedStateError("no AEAD")
        nn = self._client.suite.nn
        if self._counter >= 256**nn:  # pragma: no cover - unreachable in practice
            raise DecryptionFailed()
        nonce = (self._nonce ^ self._counter).to_bytes(nn)
        self._counter += 1
        return self._aead.open(nonce, FINAL_AAD if final else b"", ciphertext)

    def close(self) -> bytes:
        if self._state == _PREFIX:
            self._state = _FAILED
            raise TruncatedChunks("stream ended inside the response nonce")
        return super().close()


# --- sealers ------------------------------------------------------------------------------------


class ChunkedResponseSealer:
    """Gateway side of ``message/ohttp-chunked-res``. Every method returns bytes to send as-is;
    the response nonce is prepended to the first output unless ``start()`` already sent it."""

    def __init__(
        self,
        ctx: ResponseContext,
        *,
        response_nonce: bytes | None = None,
        max_chunk: int = MAX_CHUNK,
    ) -> None:
        self._response_nonce = ctx.new_nonce(response_nonce)
        aead, nonce = ctx.response_aead(CHUNKED_RESPONSE_LABEL, self._response_nonce)
        self._aead = aead
        self._nonce = int.from_bytes(nonce)
        self._nn = ctx.suite.nn
        self._counter = 0
        self._max_chunk = max_chunk
        self._started = False
        self._finished = False

    def start(self) -> bytes:
        """The response nonce, once; afterwards ``b""``."""
        if self._finished:
            raise ChunkedStateError("response already finished")
        if self._started:
            return b""
        self._started = True
        return self._response_nonce

    def _seal(self, plaintext: bytes, final: bool) -> bytes:
        if self._counter >= 256**self._nn:  # pragma: no cover - 2^96 chunks
            raise ChunkedStateError("chunk counter exhausted")
        nonce = (self._nonce ^ self._counter).to_bytes(self._nn)
        self._counter += 1
        return self._aead.seal(nonce, FINAL_AAD if final else b"", plaintext)

    def seal_chunk(self, plaintext: bytes) -> bytes:
        """Non-final chunk(s) for ``plaintext``, split at ``max_chunk``; ``b""`` stays empty."""
        out = self.start()
        for piece in _pieces(bytes(plaintext), self._max_chunk):
            ct = self._seal(piece, False)
            out += encode_varint(len(ct)) + ct
        return out

    def seal_final(self, plaintext: bytes = b"") -> bytes:
        """The last output: any leading pieces as non-final chunks, then ``0x00 || final``."""
        plaintext = bytes(plaintext)
        split = max(0, len(plaintext) - self._max_chunk)
        out = self.seal_chunk(plaintext[:split])
        out += b"\x00" + self._seal(plaintext[split:], True)
        self._finished = True
        return out


class ChunkedRequestSealer:
    """Client side of ``message/ohttp-chunked-req`` (tests and the end-to-end client)."""

    def __init__(
        self,
        config: KeyConfig,
        *,
        suite: Suite = (KDF_HKDF_SHA256, AEAD_AES_128_GCM),
        ephemeral_key: bytes | None = None,
        max_chunk: int = MAX_CHUNK,
    ) -> None:
        self.client = setup_sender(config, suite, CHUNKED_REQUEST_LABEL, ephemeral_key)
        self._max_chunk = max_chunk
        self._started = False
        self._finished = False

    def _start(self) -> bytes:
        if self._finished:
            raise ChunkedStateError("request already finished")
        if self._started:
            return b""
        self._started = True
        return self.client.header

    def seal_chunk(self, plaintext: bytes) -> bytes:
        out = self._start()
        for piece in _pieces(bytes(plaintext), self._max_chunk):
            ct = self.client.seal(piece)
            out += encode_varint(len(ct)) + ct
        return out

    def seal_final(self, plaintext: bytes = b"") -> bytes:
        plaintext = bytes(plaintext)
        split = max(0, len(plaintext) - self._max_chunk)
        out = self.seal_chunk(plaintext[:split])
        out += b"\x00" + self.client.seal(plaintext[split:], FINAL_AAD)
        self._finished = True
        return out

    def response_decoder(self, *, max_chunk: int = MAX_CHUNK) -> ChunkedResponseDecoder:
        return ChunkedResponseDecoder(self.client, max_chunk=max_chunk)
