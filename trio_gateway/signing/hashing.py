"""keccak256 (original Keccak, as in Ethereum; not SHA3-256) and the reference's message hash."""

from __future__ import annotations

from Crypto.Hash import keccak


def keccak256(data: bytes) -> bytes:
    return keccak.new(digest_bits=256, data=data).digest()


def tee_msg_hash(input_hash: bytes, output_hash: bytes, timestamp: int) -> bytes:
    """keccak256(inputHash ‖ outputHash ‖ uint256_be(timestamp)): the 32 bytes that get signed."""
    if len(input_hash) != 32 or len(output_hash) != 32:
        raise ValueError("input and output hashes must be 32 bytes")
    if not 0 <= timestamp < 1 << 256:
        raise ValueError("timestamp out of uint256 range")
    return keccak256(input_hash + output_hash + timestamp.to_bytes(32, "big"))
