"""Write the seed corpus under fuzz/corpus/<harness>/ from the test vectors (RFC 9292, RFC 9458
Appendix A, draft-ietf-ohai-chunked-ohttp-08 Appendix A) and a few adversarial-table rows.

Run from the repository root: ``.venv/bin/python fuzz/make_corpus.py``. Existing seed files of
the same name are overwritten; nothing else in the corpus directories is touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
sys.path[:0] = [str(FUZZ.parent), str(FUZZ)]

from _fuzzlib import CHUNKED_KEYS, seed  # noqa: E402

from tests.test_codecs_bhttp import (  # noqa: E402
    RFC9458_REQUEST,
    RFC_INDETERMINATE_REQUEST,
    RFC_INDETERMINATE_RESPONSE,
    RFC_KNOWN_REQUEST,
    RFC_KNOWN_RESPONSE,
)
from tests.test_codecs_ohttp import (  # noqa: E402
    A_CONFIG,
    A_ENC_REQUEST,
    A_ENC_RESPONSE,
    A_REQUEST,
    A_RESPONSE,
    C_CHUNKS,
    C_CONFIG,
    C_ENC_REQUEST,
    C_ENC_RESPONSE,
    C_RESPONSE_CHUNKS,
)
from trio_gateway.codecs.chunked_ohttp import decapsulate_chunked_request  # noqa: E402

CONTROL = b"\x03GET\x05https\x00\x01/"


def _listed(*configs: bytes) -> bytes:
    return b"".join(len(c).to_bytes(2, "big") + c for c in configs)


def corpus() -> dict[str, dict[str, bytes]]:
    c_plain, _ = decapsulate_chunked_request(CHUNKED_KEYS, C_ENC_REQUEST)
    c_resp_plain = b"".join(
        [b"\x03\x40\xc8\x00\x03abc", b"\x00\x00"]
    )  # an indeterminate response, like the draft's
    chunk_sizes = tuple(len(c) for c in C_CHUNKS)
    resp_sizes = tuple(len(c) for c in C_RESPONSE_CHUNKS)
    p256 = b"\x07\x00\x10" + b"\x04" * 65 + b"\x00\x04\x00\x01\x00\x01"
    sse_chat = (
        b'data: {"id":"c1","choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b"event: ping\r\ndata: a\rdata:b\n\n: keep-alive\n\nid: 7\ndata: [DONE]\n\n"
    )
    return {
        "bhttp": {
            "rfc9292-known-request": RFC_KNOWN_REQUEST,
            "rfc9292-indeterminate-request": RFC_INDETERMINATE_REQUEST,
            "rfc9292-indeterminate-response": RFC_INDETERMINATE_RESPONSE,
            "rfc9292-known-response": RFC_KNOWN_RESPONSE,
            "rfc9458-request": RFC9458_REQUEST,
            "rfc9458-response": A_RESPONSE,
            "non-minimal-varints": bytes.fromhex("400080000003")
            + b"GET"
            + bytes.fromhex("c000000000000005")
            + b"https\x00\x40\x01/\x40\x00",
            "known-fields-trailers": b"\x00" + CONTROL + b"\x04\x01a\x01b\x00\x04\x01c\x01d",
            "indeterminate-content": b"\x02" + CONTROL + b"\x01a\x01b\x00\x03abc\x00\x00" * 1,
            "informational-known": b"\x01\x40\x64\x00\x40\x67\x04\x01l\x01x\x40\xc8\x00\x00",
        },
        "keyconfig": {
            "rfc9458": _listed(A_CONFIG),
            "draft08-and-rfc9458": _listed(C_CONFIG, A_CONFIG),
            "p256-then-x25519": _listed(p256, A_CONFIG),
        },
        "ohttp_request": {
            "raw-rfc9458": seed(0, A_ENC_REQUEST),
            "structured": seed(1, bytes(range(64))),
            "plaintext-rfc9458": seed(2, A_REQUEST),
            "plaintext-rfc9292-chacha": seed(6, RFC_KNOWN_REQUEST),
            "plaintext-tampered": seed(10, A_REQUEST, (0, 9, 0x40)),
            "client-rfc9458-response": seed(3, A_ENC_RESPONSE),
        },
        "chunked": {
            "raw-draft08-request": seed(0, C_ENC_REQUEST),
            "raw-draft08-request-chunks": seed(0, C_ENC_REQUEST, chunk_sizes),
            "plaintext-request": seed(1, c_plain, (5, 9)),
            "plaintext-request-small-chacha": seed(1 | 4 | 16, RFC_KNOWN_REQUEST, (70, 0, 3)),
            "plaintext-request-tampered": seed(1 | 8, c_plain, (0, 30, 1)),
            "raw-draft08-request-max-chunk-64": seed(16, C_ENC_REQUEST, chunk_sizes),
            "plaintext-request-empty-chunk": seed(1 | 32, c_plain, (9,)),
            "raw-draft08-response": seed(2, C_ENC_RESPONSE, resp_sizes),
            "plaintext-response": seed(3, c_resp_plain, (4,)),
            "plaintext-response-tampered": seed(3 | 8, c_resp_plain, (0, 3, 0x80)),
        },
        "sse": {
            "chat-stream": seed(0, sse_chat, (3, 1, 40, 0, 7)),
            "bom-split": seed(0, b"\xef\xbb\xbfdata: x\n\n\n\n", (2,)),
            "cr-at-boundary": seed(0, b"data: a\r\n\r\n", (8, 2)),
            "small-caps": seed(1, b"data: 123456\ndata: 123456\n\n" + b"data: " + b"x" * 70),
        },
    }


def main() -> None:
    for harness, seeds in corpus().items():
        out = FUZZ / "corpus" / harness
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (out / name).write_bytes(data)
        print(f"{harness}: {len(seeds)} seeds -> {out.relative_to(FUZZ.parent)}")


if __name__ == "__main__":
    main()
