"""The gateway's OHTTP (RFC 9458) keys: generated at start-up, rotatable, bound to the enclave key.

* A fresh X25519 key at start-up and at each rotation (DHKEM(X25519, HKDF-SHA256) with
  HKDF-SHA256 and AES-128-GCM or ChaCha20-Poly1305), dedicated to OHTTP (RFC 9458 §6.4: never
  shared with another protocol).
* Rotation (``rotate``): a new key with a new key_id becomes the *primary* (served first, signed in
  ``/signing-key``); the previous keys stay decryptable until their expiry, then disappear.
  Everyone gets the same key list (no per-client configs: that would partition anonymity sets).
* Scheduled rotation (``rotate_every``, set from the settings by ``AppState.build``): every key
  is created with a hard decryption deadline, ``created + rotate_every + overlap``, which a later
  manual ``rotate`` can only shorten. The primary is replaced once it is ``rotate_every`` old --
  checked on every use (``active``, ``primary``, ``key_list``), so the bound holds even if the
  background ``maintenance`` service is late or dead; the service only makes it happen while
  idle too, dropping expired private keys on time (F12: a memory compromise exposes at most one
  key lifetime of captured requests; Python cannot zeroize, the references are dropped).
* Anti-replay (RFC 9458 §6.5, ``replay``: ``codecs.replay.ReplayCache``, same clock): the route
  admits each decrypted request's ``(key_id, enc)`` once. The cache remembers entries for
  ``window`` seconds, and ``create`` refuses ``rotate_every + overlap > window``: a request can
  only be decrypted while its key lives, i.e. less than ``window`` seconds after any earlier
  copy of it was admitted, so every replay still finds its entry. Without a schedule (the
  ``create()`` default, tests) a key lives forever and a copy sent more than ``window`` seconds
  later is served again. The RFC 9458 test key (``--dev`` only, public) never expires: the same.
* Test-key mode (``--ohttp-rfc9458-test-key``, ``--dev`` only): the RFC 9458 Appendix A private
  key is served as key_id 1 so published vectors can be replayed against a running gateway; the
  generated key (still the primary) then gets another key_id. The test key is public knowledge.
* ``hpke_block``: the reference's signed HPKE config (reference-behaviour §16.1)::

      signature_hash = keccak256( keccak256("OPENGRADIENT_TEE_OHTTP_CONFIG_V1")
                                ‖ tee_id (32 bytes)
                                ‖ uint256_be(key_id) ‖ uint256_be(kem_id)
                                ‖ uint256_be(kdf_id) ‖ uint256_be(aead_id)
                                ‖ keccak256(public_key) ‖ keccak256(key_config) )
      signature      = base64(RSASSA-PSS(SHA-256, MGF1-SHA-256, salt 32) over signature_hash)

  ``key_config`` is the primary key's single encoded Key Config (RFC 9458 §3.1, no 2-byte length
  prefix). It lists every suite the key accepts (ours has two, the reference's one), so the hash
  binds all of them; ``kdf_id``/``aead_id`` name the preferred suite (HKDF-SHA256 +
  ChaCha20-Poly1305, the reference's fixed suite). The HPKE key is not in the attestation document;
  this signature by the attested RSA key is what binds it to the enclave.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from .codecs.ohttp import (
    AEAD_CHACHA20_POLY1305,
    KDF_HKDF_SHA256,
    OHTTPServerKey,
    encode_key_configs,
)
from .codecs.replay import ReplayCache
from .signing.hashing import keccak256
from .signing.keys import EnclaveKey

__all__ = [
    "HPKE_DOMAIN",
    "RFC9458_TEST_KEY",
    "OHTTPKeys",
    "hpke_block",
    "hpke_signature_hash",
    "maintenance",
]

HPKE_DOMAIN = b"OPENGRADIENT_TEE_OHTTP_CONFIG_V1"
# RFC 9458 Appendix A skR (public test vector: never a secret, only ever served in --dev).
RFC9458_TEST_KEY = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
RFC9458_TEST_KEY_ID = 1
PREFERRED_SUITE = (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305)


@dataclass
class _Entry:
    key: OHTTPServerKey
    # clock seconds; None: no expiry (an unscheduled primary, the test key)
    expires_at: float | None = None
    created_at: float = 0.0


@dataclass
class OHTTPKeys:
    """key_id -> key; the primary is the newest generated key. Not thread-safe; Trio-only."""

    entries: dict[int, _Entry]
    primary_id: int
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    rotate_every: float | None = None  # None: no scheduled rotation
    overlap: float = 0.0  # a replaced key still decrypts this long (scheduled rotation)
    replay: ReplayCache = field(default_factory=ReplayCache, repr=False)

    @classmethod
    def create(
        cls,
        *,
        rfc9458_test_key: bool = False,
        clock: Callable[[], float] = time.monotonic,
        rotate_every: float | None = None,
        overlap: float = 0.0,
        replay_window: float = 600.0,
        replay_max_entries: int = 1_000_000,
    ) -> OHTTPKeys:
        if rotate_every is not None and not (
            rotate_every > 0
            and 0 <= overlap <= rotate_every
            and rotate_every + overlap <= replay_window
        ):
            raise ValueError(
                "scheduled OHTTP key rotation needs rotate_every > 0, 0 <= overlap <= "
                "rotate_every and rotate_every + overlap <= replay_window (else replays would "
                "outlive the replay cache)"
            )
        keys = cls(
            {},
            -1,
            clock,
            rotate_every,
            overlap,
            ReplayCache(replay_window, replay_max_entries, clock=clock),
        )
        if rfc9458_test_key:
            keys.entries[RFC9458_TEST_KEY_ID] = _Entry(
                OHTTPServerKey.from_private_bytes(RFC9458_TEST_KEY_ID, RFC9458_TEST_KEY)
            )
        keys._new_primary(clock())
        return keys

    def _new_primary(self, now: float) -> OHTTPServerKey:
        key_id = _new_key_id(self.entries)
        lifetime = None if self.rotate_every is None else self.rotate_every + self.overlap
        expires_at = None if lifetime is None else now + lifetime
        entry = _Entry(OHTTPServerKey.generate(key_id), expires_at, now)
        self.entries[key_id] = entry
        self.primary_id = key_id
        return entry.key

    def _prune(self, now: float) -> None:
        for key_id in [
            k
            for k, e in self.entries.items()
            if e.expires_at is not None and e.expires_at <= now and k != self.primary_id
        ]:
            del self.entries[key_id]

    def _retire_primary(self, now: float, overlap: float) -> None:
        old = self.entries[self.primary_id]
        limit = now + overlap
        old.expires_at = limit if old.expires_at is None else min(old.expires_at, limit)

    def maintain(self) -> None:
        """Rotate if the schedule says so, then drop expired keys (and replay entries)."""
        now = self.clock()
        if self.rotate_every is not None and (
            now >= self.entries[self.primary_id].created_at + self.rotate_every
        ):
            self._retire_primary(now, self.overlap)
            self._new_primary(now)
        self._prune(now)
        self.replay.expire()

    def next_due(self) -> float:
        """Seconds until ``maintain`` has something to do (inf: nothing scheduled)."""
        now = self.clock()
        due = [e.expires_at for e in self.entries.values() if e.expires_at is not None]
        if self.rotate_every is not None:
            due.append(self.entries[self.primary_id].created_at + self.rotate_every)
        return max(0.0, min(due) - now) if due else float("inf")

    @property
    def primary(self) -> OHTTPServerKey:
        self.maintain()
        return self.entries[self.primary_id].key

    def active(self) -> Mapping[int, OHTTPServerKey]:
        """The keys a request may use now (rotated if due, expired ones dropped)."""
        self.maintain()
        return {k: e.key for k, e in self.entries.items()}

    def rotate(self, overlap: float | None = None) -> OHTTPServerKey:
        """A new primary key with an unused key_id now; the old primary stays valid ``overlap``
        s (default: the scheduled overlap), never longer than its own deadline. ``overlap``
        should exceed the key list's max-age, so cached lists keep working."""
        now = self.clock()
        self._prune(now)
        self._retire_primary(now, self.overlap if overlap is None else overlap)
        return self._new_primary(now)

    def status(self) -> dict[str, Any]:
        """For ``/health``: key rotation and the replay cache's counters (no key material)."""
        return {
            "keys": len(self.active()),
            "key_rotation_seconds": self.rotate_every,
            "key_overlap_seconds": self.overlap if self.rotate_every is not None else None,
            "replay": self.replay.stats(),
        }

    def key_list(self) -> bytes:
        """``application/ohttp-keys``: the primary first, then the others by key_id."""
        keys = self.active()
        order = [self.primary_id, *sorted(k for k in keys if k != self.primary_id)]
        return encode_key_configs(keys[k].config for k in order)


def _new_key_id(taken: Mapping[int, object]) -> int:
    free = [k for k in range(256) if k not in taken]
    if not free:  # pragma: no cover - 256 live keys would need 256 rotations within one overlap
        raise RuntimeError("no free OHTTP key_id")
    return secrets.choice(free)


def _u256(value: int) -> bytes:
    return value.to_bytes(32, "big")


def hpke_signature_hash(tee_id: str, key: OHTTPServerKey, suite: tuple[int, int]) -> bytes:
    config = key.config.encode()
    kdf_id, aead_id = suite
    return keccak256(
        keccak256(HPKE_DOMAIN)
        + bytes.fromhex(tee_id.removeprefix("0x"))
        + _u256(key.key_id)
        + _u256(key.kem_id)
        + _u256(kdf_id)
        + _u256(aead_id)
        + keccak256(key.public_key)
        + keccak256(config)
    )


def hpke_block(keys: OHTTPKeys, enclave: EnclaveKey) -> dict[str, Any]:
    """The ``hpke`` block of ``/signing-key`` for the primary key (layout in the module doc)."""
    key = keys.primary
    suite = PREFERRED_SUITE if PREFERRED_SUITE in key.suites else min(key.suites)
    digest = hpke_signature_hash(enclave.tee_id, key, suite)
    return {
        "key_id": key.key_id,
        "kem_id": key.kem_id,
        "kdf_id": suite[0],
        "aead_id": suite[1],
        "public_key": key.public_key.hex(),
        "key_config": base64.b64encode(key.config.encode()).decode(),
        "tee_id": enclave.tee_id,
        "signature_hash": digest.hex(),
        "signature": base64.b64encode(enclave.sign_raw(digest)).decode(),
    }


async def maintenance(keys: OHTTPKeys, *, max_sleep: float = 60.0) -> None:
    """The ``ohttp_keys`` service: rotate on schedule and drop expired keys and replay entries
    on time even when no request arrives (requests do the same on their own)."""
    while True:
        keys.maintain()
        await trio.sleep(min(keys.next_due(), max_sleep))
