"""Signing vectors: canonical request bytes, keccak, msg hash, RSA-PSS, tee_id.

The canonical strings below are written out by hand from the reference's documented rules
(shared/spec/reference-behaviour.md §3): they are the independent side of the cross-check.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from trio_gateway.signing.canonical import (
    chat_request_bytes,
    completion_request_bytes,
    tool_calls_output,
)
from trio_gateway.signing.hashing import keccak256, tee_msg_hash
from trio_gateway.signing.keys import EnclaveKey


def verify(pem: str, sig_b64: str, msg: bytes) -> None:
    pub = serialization.load_pem_public_key(pem.encode())
    pub.verify(  # type: ignore[union-attr, call-arg]
        base64.b64decode(sig_b64),
        msg,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),  # type: ignore[arg-type]
        hashes.SHA256(),  # type: ignore[arg-type]
    )


# -- keccak: Ethereum's Keccak-256, not SHA3-256 ---------------------------------------------------

KECCAK_VECTORS = [
    (b"", "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"),
    (b"abc", "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"),
]


@pytest.mark.parametrize(("data", "digest"), KECCAK_VECTORS)
def test_keccak_known_answers(data: bytes, digest: str) -> None:
    assert keccak256(data).hex() == digest
    assert keccak256(data) != hashlib.sha3_256(data).digest()


def test_msg_hash_layout() -> None:
    a, b = keccak256(b"in"), keccak256(b"out")
    ts = 1_700_000_000
    assert tee_msg_hash(a, b, ts) == keccak256(a + b + ts.to_bytes(32, "big"))
    assert len(a + b + ts.to_bytes(32, "big")) == 96
    assert tee_msg_hash(a, b, ts) != tee_msg_hash(a, b, ts + 1)
    assert tee_msg_hash(a, b, ts) != tee_msg_hash(b, a, ts)
    with pytest.raises(ValueError):
        tee_msg_hash(a[:31], b, ts)


# -- canonical request bytes (§3.2) ------------------------------------------------------------

CHAT_VECTORS = [
    # omitted temperature hashes as 0.0; stream is never hashed; non-ASCII escaped
    (
        {"model": "gpt-4.1", "messages": [{"role": "user", "content": "é"}], "stream": True},
        '{"messages": [{"content": "\\u00e9", "role": "user"}], "model": "gpt-4.1", '
        '"temperature": 0.0}',
    ),
    # model as sent (not normalised); integer temperature becomes a float; max_tokens kept
    (
        {
            "model": "GPT-4.1",
            "messages": [{"role": "system", "content": "be brief"}],
            "temperature": 1,
            "max_tokens": 5,
            "seed": 7,
            "top_p": 0.5,
            "tool_choice": "auto",
            "user": "u",
        },
        '{"max_tokens": 5, "messages": [{"content": "be brief", "role": "system"}], '
        '"model": "GPT-4.1", "temperature": 1.0}',
    ),
    # a user list is hashed as Python's repr of the parsed JSON; name dropped
    (
        {
            "model": "m",
            "messages": [
                {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hi"}]}
            ],
        },
        '{"messages": [{"content": "[{\'type\': \'text\', \'text\': \'hi\'}]", "role": "user"}], '
        '"model": "m", "temperature": 0.0}',
    ),
    # assistant tool calls, tool results; stop/tools/response_format only when truthy
    (
        {
            "model": "m",
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ],
            "stop": [],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": 1.5}}}],
            "response_format": {"type": "text"},
        },
        '{"messages": [{"content": "", "role": "assistant", "tool_calls": [{"function": '
        '{"arguments": "{}", "name": "f"}, "id": "c1", "type": "function"}]}, {"content": "42", '
        '"role": "tool", "tool_call_id": "c1"}], "model": "m", "response_format": {"type": '
        '"text"}, "temperature": 0.0, "tools": [{"function": {"name": "f", "parameters": {"a": '
        '1.5}}, "type": "function"}]}',
    ),
]


@pytest.mark.parametrize(("raw", "expected"), CHAT_VECTORS)
def test_chat_canonical_vectors(raw: dict[str, object], expected: str) -> None:
    assert chat_request_bytes(raw) == expected.encode()


def test_completion_canonical_defaults() -> None:
    # the reference hashes *and runs* temperature 1.0 and max_tokens 16 when omitted
    raw = {"model": "m", "prompt": "Zürich", "stream": True}
    assert completion_request_bytes(raw) == (
        b'{"max_tokens": 16, "model": "m", "prompt": "Z\\u00fcrich", "temperature": 1.0}'
    )
    raw2 = {"model": "m", "prompt": "x", "temperature": 0.2, "max_tokens": 3, "stop": "\n"}
    assert completion_request_bytes(raw2) == (
        b'{"max_tokens": 3, "model": "m", "prompt": "x", "stop": "\\n", "temperature": 0.2}'
    )


def test_tool_call_output_matches_reference_example() -> None:
    # reference §3.3: args {"city":"Zürich"} -> arguments string {"city": "Z\u00fcrich"}
    args = json.dumps({"city": "Zürich"})
    assert args == '{"city": "Z\\u00fcrich"}'
    out = tool_calls_output(
        [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": args}}]
    )
    assert out == (
        '[{"function": {"arguments": "{\\"city\\": \\"Z\\\\u00fcrich\\"}", "name": "weather"}, '
        '"id": "call_1", "type": "function"}]'
    )


# -- the key -----------------------------------------------------------------------------------


def test_tee_id_is_keccak_of_der_from_pem(enclave_key: EnclaveKey) -> None:
    body = "".join(
        line for line in enclave_key.public_pem.splitlines() if not line.startswith("-----")
    )
    der = base64.b64decode(body)
    assert enclave_key.tee_id == "0x" + keccak256(der).hex()
    assert len(enclave_key.tee_id) == 66
    pub = serialization.load_pem_public_key(enclave_key.public_pem.encode())
    assert pub.key_size == 2048  # type: ignore[union-attr]
    assert enclave_key.nitriding_hash == hashlib.sha256(der).digest()
    assert "PRIVATE" not in repr(enclave_key)


def test_sign_answer_round_trip_and_randomised(enclave_key: EnclaveKey) -> None:
    req = chat_request_bytes({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    s1 = enclave_key.sign_answer(req, "hello", 1_795_000_000)
    s2 = enclave_key.sign_answer(req, "hello", 1_795_000_000)
    assert s1.signature != s2.signature  # PSS salt
    assert len(s1.signature) == 344
    f = s1.fields()
    assert f["tee_request_hash"] == keccak256(req).hex()
    assert f["tee_output_hash"] == keccak256(b"hello").hex()
    assert f["tee_timestamp"] == 1_795_000_000
    assert f["tee_id"] == enclave_key.tee_id
    # independent verification, as a client does it: rebuild msg hash from the hex fields
    msg = keccak256(
        bytes.fromhex(str(f["tee_request_hash"]))
        + bytes.fromhex(str(f["tee_output_hash"]))
        + int(f["tee_timestamp"]).to_bytes(32, "big")
    )
    verify(enclave_key.public_pem, str(f["tee_signature"]), msg)
    verify(enclave_key.public_pem, s2.signature, msg)
    with pytest.raises(InvalidSignature):
        verify(enclave_key.public_pem, s1.signature, keccak256(msg))


def test_two_keys_differ() -> None:
    a, b = EnclaveKey.generate(), EnclaveKey.generate()
    assert a.tee_id != b.tee_id and a.public_pem != b.public_pem
