"""Oblivious HTTP (RFC 9458), sans-IO: key configurations, request decapsulation, response sealing.

Strategy: HPKE comes from pyhpke, but only through the small ``_Suite`` table below. A suite is
looked up by the (kem, kdf, aead) numbers *we* configured, never by building pyhpke enums from
attacker bytes, so Export-only (0xFFFF) and unknown ids cannot reach pyhpke at all.
``decapsulate_request`` works in the order the error policy needs (spec note §1.5, §5):

  1. 7-byte header present?                      -> ``MalformedRequest``  (outer 400)
  2. key_id known, kem and (kdf, aead) offered?   -> ``UnknownKeyId`` / ``UnsupportedSuite`` (422)
  3. ``enc`` is Nenc bytes, ciphertext >= Nt?     -> ``MalformedRequest``  (outer 400)
  4. HPKE setup + open                            -> ``DecryptionFailed``  (422, one for all)

Every exception pyhpke or ``cryptography`` can raise during step 4 (bad point, low-order ``enc``,
tag failure, wrong label) becomes the same ``DecryptionFailed`` with no chained cause, so neither
the answer nor a log line distinguishes them. ``ERROR_STATUS`` maps error classes to outer status.

The response side (§4.4) is ``ResponseContext.seal_response``; ``derive_response_aead`` is shared
with the chunked codec, which differs only in its labels and per-chunk nonces. The client half
(``encapsulate_request``, ``ClientContext.open_response``) exists for tests, fuzz seeds and the
end-to-end client; a fixed ephemeral key reproduces published vectors. Nothing here logs.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey, KEMKeyPair
from pyhpke.aead_key_interface import AEADKeyInterface
from pyhpke.context_interface import ContextInterface
from pyhpke.kem_key_interface import KEMKeyInterface

__all__ = [
    "AEAD",
    "AEAD_AES_128_GCM",
    "AEAD_AES_256_GCM",
    "AEAD_CHACHA20_POLY1305",
    "AEAD_EXPORT_ONLY",
    "ERROR_STATUS",
    "HEADER_LEN",
    "KDF_HKDF_SHA256",
    "KEM_X25519",
    "OHTTP_KEY_PROBLEM",
    "PROBLEM_TYPE",
    "REQUEST_LABEL",
    "RESPONSE_LABEL",
    "SUPPORTED_SUITES",
    "ClientContext",
    "DecryptionFailed",
    "KeyConfig",
    "KeyMismatch",
    "MalformedKeyConfig",
    "MalformedRequest",
    "MalformedResponse",
    "OHTTPError",
    "OHTTPServerKey",
    "RequestHeader",
    "ResponseContext",
    "UnknownKeyId",
    "UnsupportedSuite",
    "decapsulate_request",
    "decode_key_configs",
    "derive_response_aead",
    "encapsulate_request",
    "encode_key_configs",
    "error_status",
    "hpke_open",
    "select_key",
    "setup_recipient",
    "setup_sender",
]

KEM_X25519 = 0x0020
KDF_HKDF_SHA256 = 0x0001
AEAD_AES_128_GCM = 0x0001
AEAD_AES_256_GCM = 0x0002
AEAD_CHACHA20_POLY1305 = 0x0003
AEAD_EXPORT_ONLY = 0xFFFF

REQUEST_LABEL = b"message/bhttp request"
RESPONSE_LABEL = b"message/bhttp response"
OHTTP_KEY_PROBLEM = "https://iana.org/assignments/http-problem-types#ohttp-key"

Suite = tuple[int, int]  # (kdf_id, aead_id)
SUPPORTED_SUITES: frozenset[Suite] = frozenset(
    {(KDF_HKDF_SHA256, AEAD_AES_128_GCM), (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305)}
)
HEADER_LEN = 7

# Npk for every KEM registered in RFC 9180, only to walk foreign configs in a key list.
_KEM_NPK: Mapping[int, int] = {0x0010: 65, 0x0011: 97, 0x0012: 133, 0x0020: 32, 0x0021: 56}


# --- errors -------------------------------------------------------------------------------------


class OHTTPError(ValueError):
    """An encapsulated message or key configuration we will not process."""


class MalformedRequest(OHTTPError):
    """Too short for its header, ``enc`` or AEAD tag: framing, found before any HPKE work."""


class KeyMismatch(OHTTPError):
    """The request names a key configuration this gateway does not offer (§6.4)."""


class UnknownKeyId(KeyMismatch):
    pass


class UnsupportedSuite(KeyMismatch):
    """KEM differs from the key's, or (kdf, aead) is not offered with that key."""


class DecryptionFailed(OHTTPError):
    """Any HPKE/AEAD failure. Deliberately one class with one message: no oracle."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


class MalformedKeyConfig(OHTTPError):
    """An ``application/ohttp-keys`` body that must be discarded as a whole."""


class MalformedResponse(OHTTPError):
    """(client side) an encapsulated response too short to hold nonce and tag."""


# Outer HTTP status for errors raised before/while removing the encapsulation. BHTTP errors
# (``bhttp.BHTTPError``) are found after decapsulation and answered *inside* it with 400.
ERROR_STATUS: Mapping[type[OHTTPError], int] = {
    MalformedRequest: 400,
    KeyMismatch: 422,
    DecryptionFailed: 422,
    MalformedKeyConfig: 400,
    MalformedResponse: 400,
}
PROBLEM_TYPE: Mapping[type[OHTTPError], str] = {KeyMismatch: OHTTP_KEY_PROBLEM}


def error_status(exc: BaseException, default: int = 400) -> int:
    """Status for ``exc`` via its MRO; anything unknown before decapsulation is a 4xx, never 5xx."""
    for cls in type(exc).__mro__:
        status = ERROR_STATUS.get(cls)
        if status is not None:
            return status
    return default


# --- the pyhpke wrapper -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Suite:
    kem_id: int
    kdf_id: int
    aead_id: int
    cs: CipherSuite = field(repr=False, compare=False)

    @property
    def nenc(self) -> int:
        return _KEM_NPK[self.kem_id]  # Nenc == Npk for the DHKEMs

    @property
    def nk(self) -> int:
        return int(self.cs.aead.key_size)

    @property
    def nn(self) -> int:
        return int(self.cs.aead.nonce_size)

    @property
    def nt(self) -> int:
        return int(self.cs.aead.tag_size)

    @property
    def entropy_len(self) -> int:
        return max(self.nn, self.nk)


def _build_suites() -> Mapping[tuple[int, int, int], _Suite]:
    table: dict[tuple[int, int, int], _Suite] = {}
    for kdf_id, aead_id in SUPPORTED_SUITES:
        cs = CipherSuite.new(KEMId(KEM_X25519), KDFId(kdf_id), AEADId(aead_id))
        table[KEM_X25519, kdf_id, aead_id] = _Suite(KEM_X25519, kdf_id, aead_id, cs)
    return table


_SUITES = _build_suites()  # immutable after import; keys are our own numbers only


def _suite(kem_id: int, kdf_id: int, aead_id: int) -> _Suite:
    s = _SUITES.get((kem_id, kdf_id, aead_id))
    if s is None:
        raise UnsupportedSuite(f"unsupported suite kem={kem_id} kdf={kdf_id} aead={aead_id}")
    return s


def _x25519_private(raw: bytes) -> tuple[KEMKeyInterface, bytes]:
    cs = _SUITES[KEM_X25519, KDF_HKDF_SHA256, AEAD_AES_128_GCM].cs
    sk = cs.kem.deserialize_private_key(raw)
    pk = KEMKey.from_pyca_cryptography_key(sk.raw.public_key()).to_public_bytes()
    return sk, pk


class AEAD:
    """A raw AEAD key (the response direction does not use an HPKE context)."""

    __slots__ = ("_key",)

    def __init__(self, key: AEADKeyInterface) -> None:
        self._key = key

    def seal(self, nonce: bytes, aad: bytes, plaintext: bytes) -> bytes:
        return self._key.seal(plaintext, nonce, aad)

    def open(self, nonce: bytes, aad: bytes, ciphertext: bytes) -> bytes:
        try:
            return self._key.open(ciphertext, nonce, aad)
        except Exception:  # cryptography's InvalidTag, or ValueError on odd input
            raise DecryptionFailed() from None


def derive_response_aead(
    suite: _Suite, ctx: ContextInterface, enc: bytes, response_nonce: bytes, label: bytes
) -> tuple[AEAD, bytes]:
    """RFC 9458 §4.4: (AEAD keyed with aead_key, aead_nonce) for one response."""
    secret = ctx.export(label, suite.entropy_len)
    prk = suite.cs.kdf.extract(enc + response_nonce, secret)
    key = suite.cs.kdf.expand(prk, b"key", suite.nk)
    nonce = suite.cs.kdf.expand(prk, b"nonce", suite.nn)
    return AEAD(suite.cs.aead.import_key(key)), nonce


# --- key configuration (§3) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyConfig:
    key_id: int
    kem_id: int
    public_key: bytes
    suites: tuple[Suite, ...]

    def encode(self) -> bytes:
        if not 0 <= self.key_id <= 0xFF or not self.suites:
            raise ValueError("key_id must fit one byte and at least one suite is required")
        algs = b"".join(struct.pack("!HH", kdf, aead) for kdf, aead in self.suites)
        return (
            struct.pack("!BH", self.key_id, self.kem_id)
            + self.public_key
            + struct.pack("!H", len(algs))
            + algs
        )


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """``application/ohttp-keys``: each config prefixed by its 2-byte length."""
    out = b""
    for config in configs:
        raw = config.encode()
        out += struct.pack("!H", len(raw)) + raw
    return out


def _decode_one_config(raw: bytes) -> KeyConfig | None:
    """One length-delimited config, or None for a KEM we cannot use (skipped, not an error)."""
    if len(raw) < 3:
        raise MalformedKeyConfig("key config shorter than its header")
    key_id, kem_id = struct.unpack_from("!BH", raw)
    if kem_id != KEM_X25519:
        return None
    npk = _KEM_NPK[kem_id]
    if len(raw) < 3 + npk + 2:
        raise MalformedKeyConfig("key config truncated")
    (algs_len,) = struct.unpack_from("!H", raw, 3 + npk)
    algs = raw[3 + npk + 2 :]
    if algs_len != len(algs) or algs_len == 0 or algs_len % 4:
        raise MalformedKeyConfig("bad symmetric algorithms length")
    suites = tuple(struct.iter_unpack("!HH", algs))
    return KeyConfig(key_id, kem_id, raw[3 : 3 + npk], suites)


def decode_key_configs(data: bytes) -> tuple[KeyConfig, ...]:
    """Decode ``application/ohttp-keys``. Any malformed entry discards the whole list (§3.2)."""
    data = bytes(data)
    if not data:
        raise MalformedKeyConfig("empty key configuration list")
    configs: list[KeyConfig] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            raise MalformedKeyConfig("truncated length prefix")
        (n,) = struct.unpack_from("!H", data, pos)
        if pos + 2 + n > len(data):
            raise MalformedKeyConfig("key config runs past the end")
        config = _decode_one_config(data[pos + 2 : pos + 2 + n])
        if config is not None:
            configs.append(config)
        pos += 2 + n
    return tuple(configs)


@dataclass(frozen=True, slots=True)
class OHTTPServerKey:
    """The gateway's X25519 key for one key_id. The private half never appears in ``repr``."""

    key_id: int
    public_key: bytes
    private_key: KEMKeyInterface = field(repr=False, compare=False)
    suites: frozenset[Suite] = SUPPORTED_SUITES
    kem_id: int = KEM_X25519

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 0xFF:
            raise ValueError("key_id must fit one byte")
        if not self.suites or not self.suites <= SUPPORTED_SUITES:
            raise ValueError(f"suites must be a non-empty subset of {sorted(SUPPORTED_SUITES)}")

    @classmethod
    def from_private_bytes(
        cls, key_id: int, raw: bytes, suites: frozenset[Suite] = SUPPORTED_SUITES
    ) -> OHTTPServerKey:
        sk, pk = _x25519_private(bytes(raw))
        return cls(key_id, pk, sk, frozenset(suites))

    @classmethod
    def generate(cls, key_id: int, suites: frozenset[Suite] = SUPPORTED_SUITES) -> OHTTPServerKey:
        cs = _SUITES[KEM_X25519, KDF_HKDF_SHA256, AEAD_AES_128_GCM].cs
        kp = cs.kem.derive_key_pair(os.urandom(32))
        return cls(key_id, kp.public_key.to_public_bytes(), kp.private_key, frozenset(suites))

    @property
    def config(self) -> KeyConfig:
        return KeyConfig(self.key_id, self.kem_id, self.public_key, tuple(sorted(self.suites)))


# --- requests (§4.1, §4.3) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHeader:
    key_id: int
    kem_id: int
    kdf_id: int
    aead_id: int

    def encode(self) -> bytes:
        return struct.pack("!BHHH", self.key_id, self.kem_id, self.kdf_id, self.aead_id)

    @classmethod
    def decode(cls, data: bytes) -> RequestHeader:
        if len(data) < HEADER_LEN:
            raise MalformedRequest("shorter than the 7-byte request header")
        return cls(*struct.unpack_from("!BHHH", data))


class ResponseContext:
    """What the gateway keeps from a decapsulated request to seal its response."""

    __slots__ = ("_ctx", "_enc", "_suite")

    def __init__(self, suite: _Suite, enc: bytes, ctx: ContextInterface) -> None:
        self._suite = suite
        self._enc = enc
        self._ctx = ctx

    def __repr__(self) -> str:  # never show enc or key material
        s = self._suite
        return f"ResponseContext(kdf={s.kdf_id}, aead={s.aead_id})"

    @property
    def suite(self) -> _Suite:
        return self._suite

    def new_nonce(self, response_nonce: bytes | None = None) -> bytes:
        """A fresh random response nonce of max(Nn, Nk) bytes, or the given one (tests only)."""
        n = self._suite.entropy_len
        if response_nonce is None:
            return os.urandom(n)
        if len(response_nonce) != n:
            raise ValueError(f"response nonce must be {n} bytes")
        return bytes(response_nonce)

    def response_aead(self, label: bytes, response_nonce: bytes) -> tuple[AEAD, bytes]:
        return derive_response_aead(self._suite, self._ctx, self._enc, response_nonce, label)

    def seal_response(self, plaintext: bytes, *, response_nonce: bytes | None = None) -> bytes:
        """``message/ohttp-res``: response_nonce || Seal(aead_key, aead_nonce, "", plaintext)."""
        nonce = self.new_nonce(response_nonce)
        aead, aead_nonce = self.response_aead(RESPONSE_LABEL, nonce)
        return nonce + aead.seal(aead_nonce, b"", plaintext)


def select_key(
    keys: Mapping[int, OHTTPServerKey], hdr: RequestHeader
) -> tuple[OHTTPServerKey, _Suite]:
    """Step 2: the key for ``hdr.key_id`` and the suite, if this key offers it."""
    key = keys.get(hdr.key_id)
    if key is None:
        raise UnknownKeyId(f"unknown key_id {hdr.key_id}")
    if hdr.kem_id != key.kem_id or (hdr.kdf_id, hdr.aead_id) not in key.suites:
        raise UnsupportedSuite("kem/kdf/aead not offered with this key")
    return key, _suite(hdr.kem_id, hdr.kdf_id, hdr.aead_id)


def setup_recipient(
    key: OHTTPServerKey, suite: _Suite, hdr: RequestHeader, enc: bytes, label: bytes
) -> tuple[ResponseContext, ContextInterface]:
    """Step 4 up to Open: SetupBaseR with ``info = label || 0 || hdr``. ``enc`` is Nenc bytes."""
    info = label + b"\x00" + hdr.encode()
    try:
        ctx = suite.cs.create_recipient_context(enc, key.private_key, info)
    except Exception:  # ValueError for low-order / all-zero enc, PyHPKEError otherwise
        raise DecryptionFailed() from None
    return ResponseContext(suite, enc, ctx), ctx


def hpke_open(ctx: ContextInterface, ciphertext: bytes, aad: bytes = b"") -> bytes:
    try:
        return ctx.open(ciphertext, aad)
    except Exception:  # pyhpke.OpenError wraps every failure
        raise DecryptionFailed() from None


def decapsulate_request(
    keys: Mapping[int, OHTTPServerKey], data: bytes
) -> tuple[bytes, ResponseContext]:
    """``message/ohttp-req`` -> (BHTTP plaintext, context to seal the response with)."""
    data = bytes(data)
    hdr = RequestHeader.decode(data)
    key, suite = select_key(keys, hdr)
    ct_start = HEADER_LEN + suite.nenc
    if len(data) < ct_start + suite.nt:
        raise MalformedRequest("encapsulated key or ciphertext truncated")
    response_ctx, ctx = setup_recipient(key, suite, hdr, data[HEADER_LEN:ct_start], REQUEST_LABEL)
    return hpke_open(ctx, data[ct_start:]), response_ctx


# --- client side (tests, fuzz seeds, the end-to-end test client) --------------------------------


class ClientContext:
    """The client's half of one exchange: seals more (chunked) and opens the response."""

    __slots__ = ("_ctx", "_enc", "_suite", "header")

    def __init__(self, suite: _Suite, enc: bytes, ctx: ContextInterface, header: bytes) -> None:
        self._suite = suite
        self._enc = enc
        self._ctx = ctx
        self.header = header  # hdr || enc, as sent

    def __repr__(self) -> str:
        return f"ClientContext(kdf={self._suite.kdf_id}, aead={self._suite.aead_id})"

    @property
    def suite(self) -> _Suite:
        return self._suite

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        return self._ctx.seal(plaintext, aad)

    def response_aead(self, label: bytes, response_nonce: bytes) -> tuple[AEAD, bytes]:
        return derive_response_aead(self._suite, self._ctx, self._enc, response_nonce, label)

    def open_response(self, data: bytes) -> bytes:
        n = self._suite.entropy_len
        if len(data) < n + self._suite.nt:
            raise MalformedResponse("encapsulated response too short")
        aead, aead_nonce = self.response_aead(RESPONSE_LABEL, bytes(data[:n]))
        return aead.open(aead_nonce, b"", bytes(data[n:]))


def setup_sender(
    config: KeyConfig,
    suite: Suite,
    label: bytes,
    ephemeral_key: bytes | None = None,
) -> ClientContext:
    """SetupBaseS against ``config``. ``ephemeral_key`` (raw X25519) is for test vectors ONLY."""
    if suite not in config.suites:
        raise UnsupportedSuite("suite not offered by this key config")
    s = _suite(config.kem_id, *suite)
    hdr = RequestHeader(config.key_id, config.kem_id, *suite).encode()
    pk = s.cs.kem.deserialize_public_key(config.public_key)
    eks = None
    if ephemeral_key is not None:
        sk_e, pk_e = _x25519_private(ephemeral_key)
        eks = KEMKeyPair(sk_e, s.cs.kem.deserialize_public_key(pk_e))
    enc, ctx = s.cs.create_sender_context(pk, label + b"\x00" + hdr, eks=eks)
    return ClientContext(s, enc, ctx, hdr + enc)


def encapsulate_request(
    config: KeyConfig,
    plaintext: bytes,
    *,
    suite: Suite = (KDF_HKDF_SHA256, AEAD_AES_128_GCM),
    ephemeral_key: bytes | None = None,
) -> tuple[bytes, ClientContext]:
    """``message/ohttp-req`` for ``plaintext``; keep the context to open the response."""
    client = setup_sender(config, suite, REQUEST_LABEL, ephemeral_key)
    return client.header + client.seal(plaintext), client
