"""``GET /ohttp-keys``, the signed ``hpke`` block of ``/signing-key`` and ``POST /v1/ohttp``.

The client side is an OHTTP client written here on top of the codecs' client helpers
(``encapsulate_request`` / ``ClientContext.open_response`` / ``ChunkedResponseDecoder``, pyhpke
underneath). End-to-end tests go through a real Hypercorn socket with the dev mock model; the
route-level adversarial rows of ``../shared/spec/ohttp.md`` §5 (9-11, 28-31, 36) and the
disconnect test drive the app in-process (``tests/asgi.py``), where a scripted provider wire
and virtual time make them exact. Signatures are verified independently (``verify_tee``; the
hpke ``signature_hash`` is rebuilt here from the reference's layout, not the gateway's code).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import ValidationError
from quart import request

from tests.asgi import (
    HANG,
    ASGIClient,
    ASGIResult,
    Disconnect,
    ScriptedUpstream,
    keccak,
    oai_chunk,
    oai_text_stream,
    verify_tee,
)
from tests.conftest import make_settings, make_state, start_gateway
from trio_gateway.__main__ import main
from trio_gateway.app import create_app
from trio_gateway.codecs.bhttp import (
    BHTTPRequest,
    BHTTPResponse,
    decode_response,
    decode_varint,
    encode_request,
)
from trio_gateway.codecs.chunked_ohttp import (
    CHUNKED_REQUEST_LABEL,
    ChunkedResponseDecoder,
    TruncatedChunks,
)
from trio_gateway.codecs.ohttp import (
    AEAD_AES_128_GCM,
    AEAD_CHACHA20_POLY1305,
    KDF_HKDF_SHA256,
    OHTTP_KEY_PROBLEM,
    ClientContext,
    KeyConfig,
    decode_key_configs,
    encapsulate_request,
    setup_sender,
)
from trio_gateway.relay.metering import Outcome, RequestRecord
from trio_gateway.signing.keys import EnclaveKey
from trio_gateway.state import AppState

MESSAGES = [{"role": "user", "content": "hi"}]
SUITES = [(KDF_HKDF_SHA256, AEAD_AES_128_GCM), (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305)]
CHAT = "/v1/chat/completions"

# RFC 9458 Appendix A
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


# --- the test client ----------------------------------------------------------------------------


def inner(
    path: str = CHAT,
    body: dict[str, Any] | bytes | None = None,
    *,
    method: str = "POST",
    headers: tuple[tuple[bytes, bytes], ...] | None = None,
    scheme: str = "https",
    authority: str = "gateway.example",
) -> bytes:
    """A known-length BHTTP request, as a client would encapsulate it."""
    content = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    if headers is None:
        headers = ((b"content-type", b"application/json"),) if content else ()
    return encode_request(BHTTPRequest(method, scheme, authority, path, headers, content))


def chat(stream: bool = False, model: str = "trio-mock") -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "stream": stream}


def seal(
    config: KeyConfig, bhttp: bytes, suite: tuple[int, int] = SUITES[0]
) -> tuple[bytes, ClientContext]:
    return encapsulate_request(config, bhttp, suite=suite)


def open_single(client: ClientContext, data: bytes) -> BHTTPResponse:
    return decode_response(client.open_response(data))


def open_chunked(client: ClientContext, data: bytes) -> tuple[list[bytes], bytes]:
    """(non-final chunk plaintexts, final chunk plaintext); TruncatedChunks if no final chunk."""
    dec = ChunkedResponseDecoder(client)
    chunks = dec.feed(data)
    return chunks, dec.close()


def sse_events(content: bytes) -> list[Any]:
    out: list[Any] = []
    for block in content.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                d = line[6:]
                out.append(d if d == "[DONE]" else json.loads(d))
    return out


def header(resp: BHTTPResponse, name: bytes) -> bytes | None:
    return next((v for k, v in resp.headers if k == name), None)


class RecordingMeter:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.called = trio.Event()

    async def finish(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.called.set()


class InProcess:
    """The app in-process (ASGI driver), its state, and the primary key config."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.app = create_app(state)
        self.client = ASGIClient(self.app)
        self.config = state.ohttp.primary.config

    async def post(self, body: bytes, ctype: str = "message/ohttp-req", **kw: Any) -> ASGIResult:
        with trio.fail_after(60):
            return await self.client.request(
                "POST", "/v1/ohttp", body=body, headers={"content-type": ctype}, **kw
            )

    async def exchange(self, bhttp: bytes, suite: tuple[int, int] = SUITES[0]) -> BHTTPResponse:
        """One non-chunked exchange; asserts the outer answer is a plain sealed 200."""
        enc, client = seal(self.config, bhttp, suite)
        res = await self.post(enc)
        assert res.status == 200, res.body
        assert res.header("content-type") == "message/ohttp-res"
        assert res.header("cache-control") == "private, no-store"
        return open_single(client, res.body)


@pytest.fixture
def gw(enclave_key: EnclaveKey) -> InProcess:
    return InProcess(make_state(enclave_key, mock_token_delay_ms=0))


# --- key configuration and its signature ------------------------------------------------------


async def test_key_config_fetch_and_parse(gw: InProcess) -> None:
    res = await gw.client.request("GET", "/ohttp-keys")
    assert res.status == 200
    assert res.header("content-type") == "application/ohttp-keys"
    assert res.header("cache-control") == "public, max-age=60"
    (n,) = struct.unpack_from("!H", res.body)
    assert n == len(res.body) - 2 == 45  # one config: 1+2+32+2+8
    (config,) = decode_key_configs(res.body)
    assert config.key_id == gw.state.ohttp.primary_id
    assert config.kem_id == 0x0020 and len(config.public_key) == 32
    assert set(config.suites) == set(SUITES)


async def test_signing_key_hpke_block_verifies(gw: InProcess) -> None:
    sk = (await gw.client.request("GET", "/signing-key")).json()
    hpke = sk["hpke"]
    (config,) = decode_key_configs((await gw.client.request("GET", "/ohttp-keys")).body)
    raw_config = base64.b64decode(hpke["key_config"], validate=True)
    assert raw_config == config.encode()
    assert hpke["key_id"] == config.key_id and hpke["kem_id"] == 0x20
    assert (hpke["kdf_id"], hpke["aead_id"]) == (1, 3)  # the reference's fixed suite
    assert bytes.fromhex(hpke["public_key"]) == config.public_key
    assert hpke["tee_id"] == sk["tee_id"]

    # reference-behaviour.md §16.1, rebuilt from scratch
    def u256(v: int) -> bytes:
        return v.to_bytes(32, "big")

    expected = keccak(
        keccak(b"OPENGRADIENT_TEE_OHTTP_CONFIG_V1")
        + bytes.fromhex(sk["tee_id"][2:])
        + u256(config.key_id)
        + u256(0x20)
        + u256(1)
        + u256(3)
        + keccak(config.public_key)
        + keccak(raw_config)
    )
    assert hpke["signature_hash"] == expected.hex()
    pub = serialization.load_pem_public_key(sk["public_key"].encode())
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(
        base64.b64decode(hpke["signature"], validate=True),
        expected,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


def test_key_rotation_overlap() -> None:
    from trio_gateway.ohttp_keys import OHTTPKeys

    now = [1000.0]
    keys = OHTTPKeys.create(clock=lambda: now[0])
    old = keys.primary
    new = keys.rotate(overlap=120)
    assert new.key_id != old.key_id and keys.primary is new
    assert set(keys.active()) == {old.key_id, new.key_id}
    assert [c.key_id for c in decode_key_configs(keys.key_list())] == [new.key_id, old.key_id]
    now[0] += 121
    assert set(keys.active()) == {new.key_id}


def test_test_key_refused_outside_dev(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="only allowed with --dev"):
        make_settings(dev=False, ohttp_rfc9458_test_key=True)
    assert main(["--ohttp-rfc9458-test-key"]) == 2
    assert "only allowed with --dev" in capsys.readouterr().err


# --- end to end over a real socket --------------------------------------------------------------


async def _fetch_config(http: httpx.AsyncClient) -> KeyConfig:
    r = await http.get("/ohttp-keys")
    assert r.status_code == 200 and r.headers["content-type"] == "application/ohttp-keys"
    return decode_key_configs(r.content)[0]


@pytest.mark.socket
@pytest.mark.parametrize("suite", SUITES, ids=["aes128gcm", "chacha20poly1305"])
async def test_non_stream_chat_over_socket(
    nursery: trio.Nursery, enclave_key: EnclaveKey, suite: tuple[int, int]
) -> None:
    state = make_state(enclave_key, mock_token_delay_ms=0)
    base = await start_gateway(nursery, state)
    async with httpx.AsyncClient(base_url=base) as http:
        config = await _fetch_config(http)
        pem = (await http.get("/signing-key")).json()["public_key"]
        enc, client = seal(config, inner(body=chat()), suite)
        r = await http.post("/v1/ohttp", content=enc, headers={"content-type": "message/ohttp-req"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "message/ohttp-res"
    assert r.headers["cache-control"] == "private, no-store"
    assert "x-request-id" not in r.headers  # nothing about the inner answer outside
    resp = open_single(client, r.content)
    assert resp.status == 200
    assert header(resp, b"content-type") == b"application/json"
    assert (header(resp, b"x-request-id") or b"").startswith(b"chatcmpl-")
    answer = json.loads(resp.content)
    assert answer["object"] == "chat.completion" and answer["model"] == "trio-mock"
    verify_tee(answer, pem, answer["choices"][0]["message"]["content"])


@pytest.mark.socket
async def test_stream_chat_chunked_over_socket(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    state = make_state(enclave_key, mock_token_delay_ms=0)
    base = await start_gateway(nursery, state)
    async with httpx.AsyncClient(base_url=base) as http:
        config = await _fetch_config(http)
        pem = (await http.get("/signing-key")).json()["public_key"]
        plain = await http.post(CHAT, json=chat(stream=True))
        enc, client = seal(config, inner(body=chat(stream=True)))
        dec = ChunkedResponseDecoder(client)
        chunks: list[bytes] = []
        async with http.stream(
            "POST", "/v1/ohttp", content=enc, headers={"content-type": "message/ohttp-req"}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "message/ohttp-chunked-res"
            assert r.headers["incremental"] == "?1"
            async for data in r.aiter_raw():
                chunks += dec.feed(data)
    final = dec.close()  # the authenticated final chunk is there
    assert final == b"\x00\x00"  # end of content, empty trailers
    head = decode_response(chunks[0] + b"\x00\x00")  # the head chunk alone is a whole message
    assert head.status == 200
    assert header(head, b"content-type") == b"text/event-stream; charset=utf-8"
    # every further chunk is exactly one BHTTP content chunk holding whole SSE events
    for c in chunks[1:]:
        n, start = decode_varint(c)
        assert n == len(c) - start and c.endswith(b"\n\n")
    resp = decode_response(b"".join(chunks) + final)
    evs = sse_events(resp.content)
    assert evs[-1] == "[DONE]" and evs.count("[DONE]") == 1
    plain_evs = sse_events(plain.content)
    assert len(evs) == len(plain_evs)

    def text(e: list[Any]) -> str:
        return "".join(
            x["choices"][0]["delta"].get("content") or ""
            for x in e
            if isinstance(x, dict) and x.get("choices")
        )

    assert text(evs) == text(plain_evs) != ""
    verify_tee(evs[-2], pem, text(evs))


async def test_rfc9458_appendix_a_replayed(enclave_key: EnclaveKey) -> None:
    gw = InProcess(make_state(enclave_key, ohttp_rfc9458_test_key=True))
    listed = decode_key_configs((await gw.client.request("GET", "/ohttp-keys")).body)
    assert [c.key_id for c in listed][1:] == [1] and listed[0].key_id != 1
    assert listed[1].encode() == A_CONFIG
    # the published bytes, reproduced with the RFC's ephemeral key (so we can open the answer)
    enc, client = encapsulate_request(listed[1], A_REQUEST, ephemeral_key=A_SKE)
    assert enc == A_ENC_REQUEST
    res = await gw.post(A_ENC_REQUEST)
    assert res.status == 200 and res.header("content-type") == "message/ohttp-res"
    resp = open_single(client, res.body)
    assert resp.status == 404  # GET https://example.com/ is not the gateway's API: no relay


# --- outer errors (in the clear) ----------------------------------------------------------------


def _tamper(enc: bytes, i: int) -> bytes:
    return enc[:i] + bytes([enc[i] ^ 1]) + enc[i + 1 :]


async def test_decryption_failures_have_identical_bodies(gw: InProcess) -> None:
    enc, _ = seal(gw.config, inner(body=chat()))
    chunked_label = setup_sender(gw.config, SUITES[0], CHUNKED_REQUEST_LABEL)
    cases = {
        "flipped ciphertext": _tamper(enc, 7 + 32 + 2),
        "flipped tag": _tamper(enc, len(enc) - 1),
        "flipped enc": _tamper(enc, 10),
        "all-zero enc": enc[:7] + bytes(32) + enc[39:],
        "low-order enc": enc[:7] + (1).to_bytes(32, "little") + enc[39:],
        "chunked label": chunked_label.header + chunked_label.seal(inner(body=chat())),
    }
    bodies = set()
    for name, data in cases.items():
        res = await gw.post(data)
        assert res.status == 422, name
        assert res.header("content-type") == "application/problem+json", name
        bodies.add(res.body)
    assert len(bodies) == 1
    assert json.loads(bodies.pop()) == {
        "type": "about:blank",
        "title": "decryption failed",
        "status": 422,
    }


async def test_framing_and_key_errors(gw: InProcess) -> None:
    enc, _ = seal(gw.config, inner(body=chat()))
    res = await gw.post(enc[:5])  # shorter than the header
    assert res.status == 400 and res.json()["title"] == "malformed encapsulated request"
    res = await gw.post(enc[:20])  # enc truncated
    assert res.status == 400
    res = await gw.post(enc[: 7 + 32 + 10])  # ciphertext shorter than the tag
    assert res.status == 400
    wrong_id = bytes([(gw.config.key_id + 1) % 256]) + enc[1:]
    res = await gw.post(wrong_id)
    assert res.status == 422 and res.json()["type"] == OHTTP_KEY_PROBLEM
    for aead in (b"\x00\x02", b"\xff\xff"):  # AES-256-GCM, export-only: not offered
        res = await gw.post(enc[:5] + aead + enc[7:])
        assert res.status == 422 and res.json()["type"] == OHTTP_KEY_PROBLEM
    res = await gw.post(b"")
    assert res.status == 400


async def test_row10_wrong_content_type_and_methods(gw: InProcess) -> None:
    enc, _ = seal(gw.config, inner(body=chat()))
    for ctype in ("application/json", "message/ohttp-res", "message/ohttp-chunked-req"):
        res = await gw.post(enc, ctype)
        assert res.status == 415 and res.header("content-type") == "application/problem+json"
    for method in ("GET", "HEAD", "PUT"):
        res = await gw.client.request(method, "/v1/ohttp")
        assert res.status == 405
        assert "POST" in (res.header("allow") or "")


async def test_row9_body_cap_by_content_length(enclave_key: EnclaveKey) -> None:
    gw = InProcess(make_state(enclave_key, max_body_bytes=1024, mock_token_delay_ms=0))
    enc, _ = seal(gw.config, inner(body={**chat(), "pad": "x" * 2000}))
    res = await gw.post(enc)
    assert res.status == 413 and res.header("content-type") == "application/problem+json"
    ok, _ = seal(gw.config, inner(body=chat()))
    assert (await gw.post(ok)).status == 200


@pytest.mark.socket
async def test_row9_body_cap_while_reading_chunked_upload(
    nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    """No Content-Length (chunked upload): the cap is counted while reading."""
    state = make_state(enclave_key, max_body_bytes=1024)
    base = await start_gateway(nursery, state)
    enc, _ = seal(state.ohttp.primary.config, inner(body={**chat(), "pad": "x" * 4000}))

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(enc), 500):
            yield enc[i : i + 500]

    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post(
            "/v1/ohttp", content=body(), headers={"content-type": "message/ohttp-req"}
        )
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"


async def test_row9_slow_body_times_out(
    gw: InProcess, autojump_clock: trio.testing.MockClock
) -> None:
    """Slowloris: part of the body, then nothing: 408 after BODY_TIMEOUT (60 s virtual)."""
    sent: list[dict[str, Any]] = []
    stage = 0

    async def receive() -> dict[str, Any]:
        nonlocal stage
        stage += 1
        if stage == 1:
            return {"type": "http.request", "body": b"\x01\x00", "more_body": True}
        await trio.sleep_forever()
        raise AssertionError

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/ohttp",
        "raw_path": b"/v1/ohttp",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"message/ohttp-req")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    t0 = trio.current_time()
    with trio.fail_after(600):
        app: Any = gw.app  # the ASGI callable, driven by hand
        await app(scope, receive, send)
    assert sent[0]["status"] == 408
    assert trio.current_time() - t0 == pytest.approx(60)


async def test_row11_replay_is_refused_sealed_with_fresh_nonces(gw: InProcess) -> None:
    """A copy of a request is refused inside the encapsulation (more: test_ohttp_replay.py)."""
    enc, client = seal(gw.config, inner("/health", method="GET"))
    a, b = await gw.post(enc), await gw.post(enc)
    assert a.status == b.status == 200
    assert a.body[:16] != b.body[:16]  # a fresh response nonce every time
    assert open_single(client, a.body).status == 200
    refused = open_single(client, b.body)
    assert refused.status == 400
    assert json.loads(refused.content)["error"]["code"] == "replayed_request"


# --- inner errors (sealed) ----------------------------------------------------------------------


async def test_invalid_bhttp_is_a_sealed_400(gw: InProcess) -> None:
    for bad in (b"", b"\x01\x40\xc8", b"\x04", b"\x00\x03GE", inner() + b"\x01"):
        resp = await gw.exchange(bad)
        assert resp.status == 400


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1/keys",
        "/v1/ohttp",
        "/ohttp-keys",
        "/openapi.json",
        "/v1/models/",
        "/V1/models",
        "/health/../v1/keys",
        "//health",
        "*",
        "http://evil.example/v1/models",
    ],
)
async def test_row30_not_allow_listed_is_a_sealed_404(gw: InProcess, path: str) -> None:
    resp = await gw.exchange(inner(path, method="GET"))
    assert resp.status == 404
    assert json.loads(resp.content)["error"]["code"] == "not_found"


async def test_row30_methods_schemes_upgrade(gw: InProcess) -> None:
    assert (await gw.exchange(inner(CHAT, method="CONNECT"))).status == 405
    assert (await gw.exchange(inner(CHAT, method="GET"))).status == 405
    assert (await gw.exchange(inner("/v1/models", method="DELETE"))).status == 405
    assert (await gw.exchange(inner("/v1/models", method="GET", scheme="ftp"))).status == 400
    upgrade = ((b"upgrade", b"websocket"), (b"connection", b"upgrade"))
    ok = await gw.exchange(inner("/v1/models", method="GET", headers=upgrade))
    assert ok.status == 200 and json.loads(ok.content)["object"] == "list"
    # the allow-listed API works through OHTTP, query string aside
    for path in ("/health", "/signing-key", "/v1/models?x=1"):
        assert (await gw.exchange(inner(path, method="GET"))).status == 200


async def test_row28_hop_by_hop_stripped_and_content_length_recomputed(gw: InProcess) -> None:
    seen: list[dict[str, str]] = []

    @gw.app.before_request
    async def _record() -> None:
        if request.path == CHAT:
            seen.append({k.lower(): v for k, v in request.headers.items()})

    body = json.dumps(chat()).encode()
    fields = (
        (b"content-type", b"application/json"),
        (b"content-length", b"5"),  # a lie: recomputed, never trusted
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"keep-alive, x-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-hop", b"named by connection"),
        (b"te", b"trailers"),
        (b"proxy-authorization", b"Basic eA=="),
        (b"host", b"ignored.example"),
        (b"x-payment", b"inner-header-kept"),
    )
    resp = await gw.exchange(inner(CHAT, body, headers=fields, authority="api.example"))
    assert resp.status == 200, resp.content
    (h,) = seen
    for gone in ("transfer-encoding", "connection", "keep-alive", "x-hop", "te"):
        assert gone not in h
    assert "proxy-authorization" not in h
    assert h["content-length"] == str(len(body))
    assert h["host"] == "api.example"  # the authority, not the Host field
    assert h["x-payment"] == "inner-header-kept"  # the inner request's own headers
    assert "authorization" not in h  # nothing added


async def test_row29_expect_is_a_sealed_417(gw: InProcess) -> None:
    fields = ((b"content-type", b"application/json"), (b"expect", b"100-continue"))
    assert (await gw.exchange(inner(CHAT, chat(), headers=fields))).status == 417


async def test_row31_invalid_json_is_the_apps_400(gw: InProcess) -> None:
    resp = await gw.exchange(
        inner(CHAT, b"{not json", headers=((b"content-type", b"application/json"),))
    )
    assert resp.status == 400
    assert json.loads(resp.content)["error"]["code"] == "invalid_json"
    resp = await gw.exchange(inner(CHAT, {"model": "nope", "messages": MESSAGES}))
    assert resp.status == 404
    resp = await gw.exchange(inner(CHAT, b"{}", headers=((b"content-type", b"text/plain"),)))
    assert resp.status == 415


async def test_stream_request_rejected_before_relay_is_single_sealed(gw: InProcess) -> None:
    resp = await gw.exchange(inner(CHAT, {**chat(stream=True), "temperature": 7}))
    assert resp.status == 400


# --- streams: failure after the 200, disconnects ------------------------------------------------


def _scripted(key: EnclaveKey, up: ScriptedUpstream) -> tuple[InProcess, RecordingMeter]:
    meter = RecordingMeter()
    state = AppState.build(make_settings(openai_api_key="sk-x"), key=key, meter=meter, transport=up)
    return InProcess(state), meter


async def test_row36_failure_after_200_ends_without_final_chunk(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    script = [*oai_text_stream(["a", "b"])[:3], httpx.ReadError("gone")]
    gw, meter = _scripted(enclave_key, ScriptedUpstream(script))
    enc, client = seal(gw.config, inner(CHAT, chat(stream=True, model="gpt-4.1")))
    res = await gw.post(enc)
    assert res.status == 200 and res.complete
    assert res.header("content-type") == "message/ohttp-chunked-res"
    dec = ChunkedResponseDecoder(client)
    chunks = dec.feed(res.body)
    with pytest.raises(TruncatedChunks):
        dec.close()  # no authenticated final chunk: the client sees truncation
    partial = decode_response(b"".join(chunks) + b"\x00\x00")  # what arrived, as a message
    assert partial.status == 200
    assert b"tee_signature" not in partial.content and b"[DONE]" not in partial.content
    assert meter.records[0].outcome == Outcome.UPSTREAM_ERROR


async def test_stream_upstream_error_before_start_is_complete(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock
) -> None:
    """An upstream 4xx before the stream started is a whole inner response: final chunk sent."""
    up = ScriptedUpstream(
        [b'{"error": {"message": "bad"}}'], status=400, content_type="application/json"
    )
    gw, _ = _scripted(enclave_key, up)
    enc, client = seal(gw.config, inner(CHAT, chat(stream=True, model="gpt-4.1")))
    res = await gw.post(enc)
    assert res.header("content-type") == "message/ohttp-chunked-res"
    chunks, final = open_chunked(client, res.body)
    resp = decode_response(b"".join(chunks) + final)
    assert resp.status == 400 and json.loads(resp.content)["error"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_outer_disconnect_cancels_upstream_and_meters_once(
    enclave_key: EnclaveKey, autojump_clock: trio.testing.MockClock, stream: bool
) -> None:
    script: list[Any] = (
        [oai_chunk({"role": "assistant", "content": ""}), oai_chunk({"content": "x"}), HANG]
        if stream
        else [HANG]
    )
    up = ScriptedUpstream(
        script, content_type="text/event-stream" if stream else "application/json"
    )
    gw, meter = _scripted(enclave_key, up)
    enc, client = seal(gw.config, inner(CHAT, chat(stream=stream, model="gpt-4.1")))
    gone = Disconnect()
    res = ASGIResult()
    with trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: gw.post(enc, disconnect=gone, result=res))
            await trio.testing.wait_all_tasks_blocked()
            assert up.log.opened == 1 and not meter.records
            if stream:  # the head and the first token went out, sealed
                dec = ChunkedResponseDecoder(client)
                got = dec.feed(res.body)
                assert len(got) == 2 and b'"x"' in got[1]
            gone.set()
            await meter.called.wait()
    assert up.log.closed == 1 and up.log.exhausted == 0  # upstream closed, not read to the end
    assert len(meter.records) == 1 and meter.records[0].outcome == Outcome.CLIENT_GONE
    await trio.testing.wait_all_tasks_blocked()
    assert len(meter.records) == 1
    assert not res.complete
