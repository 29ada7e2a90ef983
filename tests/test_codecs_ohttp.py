"""OHTTP (RFC 9458) and chunked OHTTP (draft-ietf-ohai-chunked-ohttp-08) codecs: both appendix
vectors byte for byte, the outer/chunked rows of the adversarial table (spec note ohttp.md §5)
with their status from ``ERROR_STATUS``, key-configuration lists, and Hypothesis properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_gateway.codecs.bhttp import decode_request
from trio_gateway.codecs.chunked_ohttp import (
    CHUNKED_REQUEST_LABEL,
    ChunkedRequestDecoder,
    ChunkedRequestSealer,
    ChunkedResponseDecoder,
    ChunkedResponseSealer,
    ChunkedStateError,
    ChunkTooLarge,
    TruncatedChunks,
    decapsulate_chunked_request,
)
from trio_gateway.codecs.ohttp import (
    AEAD_AES_128_GCM,
    AEAD_CHACHA20_POLY1305,
    ERROR_STATUS,
    KDF_HKDF_SHA256,
    KEM_X25519,
    OHTTP_KEY_PROBLEM,
    PROBLEM_TYPE,
    SUPPORTED_SUITES,
    DecryptionFailed,
    KeyConfig,
    KeyMismatch,
    MalformedKeyConfig,
    MalformedRequest,
    MalformedResponse,
    OHTTPError,
    OHTTPServerKey,
    UnknownKeyId,
    UnsupportedSuite,
    decapsulate_request,
    decode_key_configs,
    encapsulate_request,
    encode_key_configs,
    error_status,
    setup_sender,
)

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- RFC 9458 Appendix A ----------------------------------------------------------------------
A_SKR = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
A_CONFIG = bytes.fromhex(
    "01002031e1f05a740102115220e9af918f738674aec95f54db6e04eb705aae8e79815500080001000100010003"
)
A_REQUEST = bytes.fromhex("00034745540568747470730b6578616d706c652e636f6d012f")
A_SKE = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
A_ENC_REQUEST = bytes.fromhex(
    "010020000100014b28f881333e7c164ffc499ad9796f877f4e1051ee6d31bad1"
    "9dec96c208b4726374e469135906992e1268c594d2a10c695d858c40a026e796"
    "5e7d86b83dd440b2c0185204b4d63525"
)
A_RESPONSE = bytes.fromhex("0140c8")
A_RESPONSE_NONCE = bytes.fromhex("c789e7151fcba46158ca84b04464910d")
A_ENC_RESPONSE = bytes.fromhex(
    "c789e7151fcba46158ca84b04464910d86f9013e404feea014e7be4a441f234f857fbd"
)

# --- draft-ietf-ohai-chunked-ohttp-08 Appendix A ("Example") -----------------------------------
C_SKR = bytes.fromhex("1c190d72acdbe4dbc69e680503bb781a932c70a12c8f3754434c67d8640d8698")
C_CONFIG = bytes.fromhex(
    "010020668eb21aace159803974a4c67f08b4152d29bed10735fd08f98ccdd6fe09570800080001000100010003"
)
C_SKE = bytes.fromhex("b26d565f3f875ed480d1abced3d665159650c99174fd0b124ac4bda0c64ae324")
C_CHUNKS = [
    bytes.fromhex("01002000010001"),
    bytes.fromhex("8811eb457e100811c40a0aa71340a1b81d804bb986f736f2f566a7199761a032"),
    bytes.fromhex("1c2ad24942d4d692563012f2980c8fef437a336b9b2fc938ef77a5834f"),
    bytes.fromhex("1d2e33d8fd25577afe31bd1c79d094f76b6250ae6549b473ecd950501311"),
    bytes.fromhex("001c6c1395d0ef7c1022297966307b8a7f"),
]
C_ENC_REQUEST = b"".join(C_CHUNKS)
C_RESPONSE_NONCE = bytes.fromhex("bcce7f4cb921309ba5d62edf1769ef09")
C_RESPONSE_CHUNKS = [
    C_RESPONSE_NONCE,
    bytes.fromhex("1179bf1cc87fa0e2c02de4546945aa3d1e48"),
    bytes.fromhex("12b348b5bd4c594c16b6170b07b475845d1f32"),
    bytes.fromhex("00ed9d8a796617a5b27265f4d73247f639"),
]
C_ENC_RESPONSE = b"".join(C_RESPONSE_CHUNKS)

KEY_A = OHTTPServerKey.from_private_bytes(1, A_SKR)
KEYS = {1: KEY_A}
KEY_C = OHTTPServerKey.from_private_bytes(1, C_SKR)


def test_rfc9458_key_config() -> None:
    assert KEY_A.config.encode() == A_CONFIG
    assert len(A_CONFIG) == 45
    listed = len(A_CONFIG).to_bytes(2, "big") + A_CONFIG
    assert encode_key_configs([KEY_A.config]) == listed
    assert decode_key_configs(listed) == (KEY_A.config,)


def test_rfc9458_encapsulated_request_byte_exact() -> None:
    enc_request, _ = encapsulate_request(KEY_A.config, A_REQUEST, ephemeral_key=A_SKE)
    assert enc_request == A_ENC_REQUEST
    assert len(A_ENC_REQUEST) == 80  # the RFC's prose says 78; the hex is 80 (ohttp.md §7)


def test_rfc9458_decapsulation() -> None:
    plaintext, _ = decapsulate_request(KEYS, A_ENC_REQUEST)
    assert plaintext == A_REQUEST
    req = decode_request(plaintext)
    assert (req.method, req.scheme, req.authority, req.path) == ("GET", "https", "example.com", "/")


def test_rfc9458_response_byte_exact() -> None:
    _, ctx = decapsulate_request(KEYS, A_ENC_REQUEST)
    assert ctx.seal_response(A_RESPONSE, response_nonce=A_RESPONSE_NONCE) == A_ENC_RESPONSE
    _, client = encapsulate_request(KEY_A.config, A_REQUEST, ephemeral_key=A_SKE)
    assert client.open_response(A_ENC_RESPONSE) == A_RESPONSE


def test_random_response_nonces_differ() -> None:
    _, ctx = decapsulate_request(KEYS, A_ENC_REQUEST)
    a, b = ctx.seal_response(A_RESPONSE), ctx.seal_response(A_RESPONSE)
    assert len(a) == 16 + 3 + 16 and a[:16] != b[:16]
    with pytest.raises(ValueError):
        ctx.seal_response(A_RESPONSE, response_nonce=bytes(12))  # must be max(Nn, Nk) = 16


def test_chunked_draft08_key_config() -> None:
    assert KEY_C.config.encode() == C_CONFIG


def test_chunked_draft08_request_byte_exact() -> None:
    sealer = ChunkedRequestSealer(KEY_C.config, ephemeral_key=C_SKE)
    wire = [
        sealer.seal_chunk(A_REQUEST[:12]),
        sealer.seal_chunk(A_REQUEST[12:]),
        sealer.seal_final(),
    ]
    assert wire == [C_CHUNKS[0] + C_CHUNKS[1] + C_CHUNKS[2], C_CHUNKS[3], C_CHUNKS[4]]


def test_chunked_draft08_request_decapsulation() -> None:
    dec = ChunkedRequestDecoder({1: KEY_C})
    got = [dec.feed(bytes([b])) for b in C_ENC_REQUEST]  # one byte at a time
    assert [c for part in got for c in part] == [A_REQUEST[:12], A_REQUEST[12:]]
    assert dec.close() == b""
    assert decapsulate_chunked_request({1: KEY_C}, C_ENC_REQUEST)[0] == A_REQUEST


def test_chunked_draft08_response_byte_exact() -> None:
    _, ctx = decapsulate_chunked_request({1: KEY_C}, C_ENC_REQUEST)
    sealer = ChunkedResponseSealer(ctx, response_nonce=C_RESPONSE_NONCE)
    wire = [
        sealer.start(),
        sealer.seal_chunk(b"\x01"),
        sealer.seal_chunk(b"\x40\xc8"),
        sealer.seal_final(),
    ]
    assert wire == C_RESPONSE_CHUNKS
    client = ChunkedRequestSealer(KEY_C.config, ephemeral_key=C_SKE)
    client.seal_final(A_REQUEST)  # same ephemeral key -> same HPKE context as the vector
    dec = client.response_decoder()
    assert dec.feed(C_ENC_RESPONSE) == [b"\x01", b"\x40\xc8"]
    assert dec.close() == b""


# --- key configuration lists -----------------------------------------------------------------


def _listed(*raw: bytes) -> bytes:
    return b"".join(len(r).to_bytes(2, "big") + r for r in raw)


def test_key_config_list_skips_unsupported_kems() -> None:
    p256 = KeyConfig(7, 0x0010, b"\x04" + bytes(64), ((1, 1),)).encode()
    unknown = b"\x09\x12\x34whatever"
    assert decode_key_configs(_listed(p256, A_CONFIG, unknown)) == (KEY_A.config,)
    assert decode_key_configs(_listed(p256)) == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",  # truncated length prefix
        _listed(A_CONFIG)[:-1],  # runs past the end
        _listed(A_CONFIG) + b"\x00",  # trailing half prefix
        _listed(A_CONFIG[:-1]),  # algorithms shorter than declared
        _listed(A_CONFIG[:-4] + b"\x00\x00"),  # zero-length algorithms
        _listed(A_CONFIG[:35] + b"\x00\x06" + A_CONFIG[37:43]),  # not a multiple of 4
        _listed(A_CONFIG + b"\x00"),  # trailing byte inside the entry
        _listed(A_CONFIG[:20]),  # public key truncated
        _listed(b"\x01\x00"),  # no room for the kem id
        _listed(A_CONFIG, A_CONFIG[:20]),  # one bad entry discards the whole list
    ],
)
def test_key_config_list_malformed(data: bytes) -> None:
    with pytest.raises(MalformedKeyConfig):
        decode_key_configs(data)


def test_server_key_never_accepts_export_only_or_unsupported_suites() -> None:
    for bad in ({(1, 0xFFFF)}, {(1, 2)}, {(2, 1)}, set()):
        with pytest.raises(ValueError):
            OHTTPServerKey.from_private_bytes(1, A_SKR, frozenset(bad))
    with pytest.raises(ValueError):
        OHTTPServerKey.from_private_bytes(256, A_SKR)


def test_server_key_repr_hides_private_key() -> None:
    key = OHTTPServerKey.generate(5)
    assert "private" not in repr(key) and A_SKR.hex() not in repr(KEY_A)
    assert key.config.kem_id == KEM_X25519 and set(key.config.suites) == SUPPORTED_SUITES


# --- adversarial table: outer rows -------------------------------------------------------------


def _with_header(hdr: str, rest: bytes = A_ENC_REQUEST[7:]) -> bytes:
    return bytes.fromhex(hdr) + rest


def _flip(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("row", "data", "error", "status"),
    [
        ("1 empty body", b"", MalformedRequest, 400),
        ("1 six bytes", A_ENC_REQUEST[:6], MalformedRequest, 400),
        ("2 header only", A_ENC_REQUEST[:7], MalformedRequest, 400),
        ("2 enc 31 bytes", A_ENC_REQUEST[:38], MalformedRequest, 400),
        ("3 empty ciphertext", A_ENC_REQUEST[:39], MalformedRequest, 400),
        ("3 ciphertext 15 bytes", A_ENC_REQUEST[: 39 + 15], MalformedRequest, 400),
        ("4 unknown key_id", _with_header("02002000010001"), UnknownKeyId, 422),
        ("5 kem 0x0010", _with_header("01001000010001"), UnsupportedSuite, 422),
        ("6 AES-256-GCM", _with_header("01002000010002"), UnsupportedSuite, 422),
        ("6 HKDF-SHA384", _with_header("01002000020001"), UnsupportedSuite, 422),
        ("6 export-only", _with_header("0100200001ffff"), UnsupportedSuite, 422),
        ("6 aead 0x1234", _with_header("01002000011234"), UnsupportedSuite, 422),
        ("7 flipped ciphertext", _flip(A_ENC_REQUEST, 50), DecryptionFailed, 422),
        ("7 flipped tag", _flip(A_ENC_REQUEST, 79), DecryptionFailed, 422),
        ("7 flipped enc", _flip(A_ENC_REQUEST, 10), DecryptionFailed, 422),
        (
            "7 header names the other offered aead",
            _with_header("01002000010003"),
            DecryptionFailed,
            422,
        ),
        ("7 truncated tag", A_ENC_REQUEST[:-1], DecryptionFailed, 422),
        (
            "8 all-zero enc",
            A_ENC_REQUEST[:7] + bytes(32) + A_ENC_REQUEST[39:],
            DecryptionFailed,
            422,
        ),
        (
            "8 low-order enc (u=1)",
            A_ENC_REQUEST[:7] + b"\x01" + bytes(31) + A_ENC_REQUEST[39:],
            DecryptionFailed,
            422,
        ),
        ("37 chunked-req sent as ohttp-req", C_ENC_REQUEST, DecryptionFailed, 422),
    ],
)
def test_adversarial_outer(row: str, data: bytes, error: type[OHTTPError], status: int) -> None:
    keys = {1: KEY_C} if row.startswith("37") else KEYS
    with pytest.raises(error) as info:
        decapsulate_request(keys, data)
    assert error_status(info.value) == status
    if status == 422 and error is DecryptionFailed:
        assert str(info.value) == "decryption failed"  # identical for every decryption failure
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_sealed_with_chunked_label_fails_like_any_decryption_error() -> None:  # row 7
    client = setup_sender(KEY_A.config, (KDF_HKDF_SHA256, AEAD_AES_128_GCM), CHUNKED_REQUEST_LABEL)
    with pytest.raises(DecryptionFailed):
        decapsulate_request(KEYS, client.header + client.seal(A_REQUEST))


def test_ohttp_req_sent_as_chunked_req() -> None:  # row 37, the other way round
    # The chunk framing is read before anything is opened, so a plain request can fail there
    # (here 0x6374 declares a 9076-byte chunk: truncation, 400) or at the first open (422).
    with pytest.raises((DecryptionFailed, TruncatedChunks)) as info:
        decapsulate_chunked_request(KEYS, A_ENC_REQUEST)
    assert error_status(info.value) in (400, 422)
    short = A_ENC_REQUEST[:39] + b"\x20" + A_ENC_REQUEST[40:]  # a length that fits: AEAD fails
    with pytest.raises(DecryptionFailed):
        decapsulate_chunked_request(KEYS, short)


def test_key_problem_type_and_status_table() -> None:
    assert error_status(UnknownKeyId("x")) == error_status(UnsupportedSuite("x")) == 422
    assert PROBLEM_TYPE[KeyMismatch] == OHTTP_KEY_PROBLEM
    assert error_status(TruncatedChunks("x")) == error_status(ChunkTooLarge("x")) == 400
    assert error_status(RuntimeError("anything else")) == 400  # never a 5xx for attacker bytes
    assert all(400 <= s < 500 for s in ERROR_STATUS.values())


def test_suite_not_offered_by_this_key() -> None:
    aes_only = OHTTPServerKey.from_private_bytes(1, A_SKR, frozenset({(1, 1)}))
    enc, _ = encapsulate_request(KEY_A.config, A_REQUEST, suite=(1, AEAD_CHACHA20_POLY1305))
    with pytest.raises(UnsupportedSuite):
        decapsulate_request({1: aes_only}, enc)
    assert decapsulate_request(KEYS, enc)[0] == A_REQUEST


def test_client_rejects_short_or_tampered_response() -> None:
    _, client = encapsulate_request(KEY_A.config, A_REQUEST, ephemeral_key=A_SKE)
    with pytest.raises(MalformedResponse):
        client.open_response(A_ENC_RESPONSE[:31])
    with pytest.raises(DecryptionFailed):
        client.open_response(_flip(A_ENC_RESPONSE, 20))
    with pytest.raises(DecryptionFailed):
        client.open_response(_flip(A_ENC_RESPONSE, 0))  # the nonce feeds the key schedule


# --- adversarial table: chunked rows ------------------------------------------------------------


def _chunked_request(*parts: bytes, final: bytes = b"") -> bytes:
    sealer = ChunkedRequestSealer(KEY_A.config)
    return b"".join(sealer.seal_chunk(p) for p in parts) + sealer.seal_final(final)


def test_chunked_missing_final_chunk() -> None:  # row 33
    with pytest.raises(TruncatedChunks) as info:
        decapsulate_chunked_request({1: KEY_C}, C_ENC_REQUEST[: -len(C_CHUNKS[4])])
    assert error_status(info.value) == 400
    with pytest.raises(TruncatedChunks):  # cut inside a chunk
        decapsulate_chunked_request({1: KEY_C}, C_ENC_REQUEST[: -20 - len(C_CHUNKS[4])])
    with pytest.raises(MalformedRequest):  # cut inside the header
        decapsulate_chunked_request({1: KEY_C}, C_ENC_REQUEST[:20])


def test_chunked_chunk_too_large_or_past_end() -> None:  # row 34
    sealer = ChunkedRequestSealer(KEY_A.config)
    wire = sealer.seal_chunk(b"x" * 100) + sealer.seal_final()
    with pytest.raises(ChunkTooLarge):
        decapsulate_chunked_request(KEYS, wire, max_chunk=64)
    with pytest.raises(ChunkTooLarge):  # declared length above the cap, body not even sent
        ChunkedRequestDecoder(KEYS).feed(wire[:39] + b"\x80\x01\x00\x00")
    with pytest.raises(ChunkTooLarge):
        decapsulate_chunked_request(
            KEYS,
            ChunkedRequestSealer(KEY_A.config).seal_final(b"x" * 100)[:39] + b"\x00" + bytes(200),
            max_chunk=64,
        )
    with pytest.raises(TruncatedChunks):  # length past the end of the stream
        decapsulate_chunked_request(KEYS, wire[:39] + b"\x30" + bytes(10))
    assert decapsulate_chunked_request(KEYS, _chunked_request(b"y" * 16384))[0] == b"y" * 16384


def test_chunked_sealer_splits_at_max_chunk() -> None:
    wire = _chunked_request(b"a" * 40000, final=b"b" * 20000)
    dec = ChunkedRequestDecoder(KEYS)
    chunks = dec.feed(wire)
    assert [len(c) for c in chunks] == [16384, 16384, 7232, 3616]
    assert len(dec.close()) == 16384
    assert decapsulate_chunked_request(KEYS, wire)[0] == b"a" * 40000 + b"b" * 20000


def test_chunked_empty_reordered_duplicated_flipped() -> None:  # row 35
    def decap(wire: bytes) -> None:
        with pytest.raises(DecryptionFailed) as info:
            decapsulate_chunked_request(KEYS, wire)
        assert error_status(info.value) == 422

    s = ChunkedRequestSealer(KEY_A.config)
    hdr, c0 = s.client.header, s.client.seal(b"")  # empty non-final chunk
    decap(hdr + bytes([len(c0)]) + c0 + b"\x00" + s.client.seal(b"", b"final"))

    s = ChunkedRequestSealer(KEY_A.config)
    one, two, fin = s.seal_chunk(b"one"), s.seal_chunk(b"two"), s.seal_final(b"")
    hdr, one = one[:39], one[39:]
    decap(hdr + two + one + fin)  # reordered
    decap(hdr + one + one + two + fin)  # duplicated
    decap(hdr + one + b"\x00" + two[1:])  # a non-final chunk presented as final

    s = ChunkedRequestSealer(KEY_A.config)
    one = s.seal_chunk(b"one")
    decap(one + b"\x00" + s.client.seal(b"end"))  # final chunk sealed without the "final" AAD


def test_chunked_reader_is_poisoned_after_an_error() -> None:
    dec = ChunkedRequestDecoder(KEYS)
    with pytest.raises(DecryptionFailed):
        dec.feed(A_ENC_REQUEST[:39] + b"\x11" + bytes(17))
    with pytest.raises(ChunkedStateError):
        dec.feed(b"")
    with pytest.raises(ChunkedStateError):
        dec.close()


def test_chunked_response_truncation_is_detected() -> None:  # rows 33/36 from the client's side
    sealer = ChunkedRequestSealer(KEY_A.config)
    _, ctx = decapsulate_chunked_request(KEYS, sealer.seal_final(A_REQUEST))
    out = ChunkedResponseSealer(ctx)
    parts = [out.seal_chunk(b"event 1"), out.seal_chunk(b"event 2")]  # stream aborted: no final
    dec = sealer.response_decoder()
    assert dec.feed(b"".join(parts)) == [b"event 1", b"event 2"]
    with pytest.raises(TruncatedChunks):
        dec.close()
    with pytest.raises(TruncatedChunks):  # ended inside the response nonce
        d2 = sealer.response_decoder()
        d2.feed(parts[0][:5])
        d2.close()
    # a relay that fakes the end with a non-final chunk re-labelled as final
    dec = sealer.response_decoder()
    dec.feed(parts[0])
    dec.feed(b"\x00" + parts[1][1:])
    with pytest.raises(DecryptionFailed):
        dec.close()


def test_chunked_sealer_state() -> None:
    _, ctx = decapsulate_request(KEYS, A_ENC_REQUEST)
    sealer = ChunkedResponseSealer(ctx)
    nonce = sealer.start()
    assert len(nonce) == 16 and sealer.start() == b""
    assert sealer.seal_chunk(b"") == b""
    sealer.seal_final(b"")
    for call in (sealer.start, lambda: sealer.seal_chunk(b"x"), sealer.seal_final):
        with pytest.raises(ChunkedStateError):
            call()


# --- properties -------------------------------------------------------------------------------

suites = st.sampled_from(sorted(SUPPORTED_SUITES))


@given(st.binary(max_size=300), st.binary(max_size=300), suites)
@PROPS
def test_ohttp_round_trip(request_pt: bytes, response_pt: bytes, suite: tuple[int, int]) -> None:
    enc, client = encapsulate_request(KEY_A.config, request_pt, suite=suite)
    plaintext, ctx = decapsulate_request(KEYS, enc)
    assert plaintext == request_pt
    assert client.open_response(ctx.seal_response(response_pt)) == response_pt


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    st.binary(max_size=40),
    st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    suites,
    st.lists(st.integers(0, 10_000), max_size=6),
)
@PROPS
def test_chunked_round_trip(
    req_chunks: list[bytes],
    req_final: bytes,
    resp_chunks: list[bytes],
    suite: tuple[int, int],
    cuts: list[int],
) -> None:
    sealer = ChunkedRequestSealer(KEY_A.config, suite=suite, max_chunk=16)
    wire = b"".join(sealer.seal_chunk(c) for c in req_chunks) + sealer.seal_final(req_final)
    dec = ChunkedRequestDecoder(KEYS, max_chunk=16)
    got = [c for piece in _split(wire, cuts) for c in dec.feed(piece)]
    final = dec.close()
    assert b"".join(got) + final == b"".join(req_chunks) + req_final
    assert dec.response_context is not None
    out = ChunkedResponseSealer(dec.response_context)
    body = b"".join(out.seal_chunk(c) for c in resp_chunks) + out.seal_final(b"end")
    rdec = sealer.response_decoder()
    opened = [c for piece in _split(body, cuts) for c in rdec.feed(piece)]
    assert opened == resp_chunks and rdec.close() == b"end"


@given(st.binary(max_size=120), st.sampled_from([b"", A_ENC_REQUEST[:7], A_ENC_REQUEST[:39]]))
@PROPS
def test_decapsulate_arbitrary_bytes_only_typed_errors(data: bytes, prefix: bytes) -> None:
    with contextlib.suppress(OHTTPError):
        decapsulate_request(KEYS, prefix + data)
    with contextlib.suppress(OHTTPError):
        decapsulate_chunked_request(KEYS, prefix + data)


@given(st.binary(max_size=120), st.lists(st.integers(0, 200), max_size=4))
@PROPS
def test_chunked_response_decoder_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _, client = encapsulate_request(KEY_A.config, b"")
    dec = ChunkedResponseDecoder(client, max_chunk=32)
    with contextlib.suppress(OHTTPError):
        for piece in _split(data, cuts):
            dec.feed(piece)
        dec.close()
    with contextlib.suppress(OHTTPError):
        client.open_response(data)
    with contextlib.suppress(OHTTPError):
        decode_key_configs(data)
