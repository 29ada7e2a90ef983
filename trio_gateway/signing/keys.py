"""The enclave key: RSA-2048 made at start, never leaves the process, never logged.

``tee_id`` = keccak256(DER SubjectPublicKeyInfo), shown with ``0x``. Signatures are RSASSA-PSS
with SHA-256, MGF1-SHA-256 and a 32-byte salt over the 32-byte message hash (which PSS hashes
again: the on-chain verifier's "double hash"), base64 with padding.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .hashing import keccak256, tee_msg_hash

PSS_SALT_LENGTH = 32


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)


@dataclass(frozen=True, slots=True)
class Signature:
    """The five ``tee_*`` fields of a signed answer."""

    signature: str  # base64
    request_hash: bytes
    output_hash: bytes
    timestamp: int
    tee_id: str

    def fields(self) -> dict[str, str | int]:
        return {
            "tee_signature": self.signature,
            "tee_request_hash": self.request_hash.hex(),
            "tee_output_hash": self.output_hash.hex(),
            "tee_timestamp": self.timestamp,
            "tee_id": self.tee_id,
        }


class EnclaveKey:
    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._key = private_key
        pub = private_key.public_key()
        self.public_der = pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_pem = pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self.tee_id = "0x" + keccak256(self.public_der).hex()

    @classmethod
    def generate(cls) -> EnclaveKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def __repr__(self) -> str:  # never print key material
        return f"EnclaveKey(tee_id={self.tee_id})"

    @property
    def nitriding_hash(self) -> bytes:
        """What nitriding binds into attestation user_data: SHA-256 of the DER public key."""
        return hashlib.sha256(self.public_der).digest()

    def sign_raw(self, message: bytes) -> bytes:
        return self._key.sign(message, _pss(), hashes.SHA256())

    def sign_answer(self, request_bytes: bytes, output_content: str, timestamp: int) -> Signature:
        """Sign an answer the reference's way. CPU only (~0.3 ms), no checkpoint inside."""
        in_h = keccak256(request_bytes)
        out_h = keccak256(output_content.encode("utf-8"))
        sig = self.sign_raw(tee_msg_hash(in_h, out_h, timestamp))
        return Signature(base64.b64encode(sig).decode(), in_h, out_h, timestamp, self.tee_id)
