"""A client that asks for ``Connection: close`` (or speaks HTTP/1.0) gets its connection closed
after the answer, over a real Hypercorn socket.

Found by the soak run: quart-trio cancels the request task as soon as Hypercorn reports the
client gone, and Hypercorn reports it from inside the last ``send`` of the answer, halfway
through closing the socket; the close was abandoned and the connection stayed open until the
client hung up, so a client waiting for EOF waited for ever and the gateway kept the fd.
``relay.asgi._shield_final_send`` shields that last send (bounded)."""

from __future__ import annotations

import json

import pytest
import trio

from tests.conftest import make_state, start_gateway
from trio_gateway.signing.keys import EnclaveKey

pytestmark = pytest.mark.socket


def chat(model: str = "trio-mock", stream: bool = False) -> bytes:
    return json.dumps(
        {
            "model": model,
            "stream": stream,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()


def post(body: bytes, version: str = "1.1", close: bool = True) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/{version}\r\nhost: gw\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
    )
    if close:
        head += "connection: close\r\n"
    return (head + "\r\n").encode() + body


async def read_to_eof(port: int, request: bytes, limit: float = 5.0) -> bytes:
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        await sock.send(request)
        buf = bytearray()
        with trio.fail_after(limit):  # no EOF from the gateway: the bug
            while chunk := await sock.recv(65536):
                buf += chunk
        return bytes(buf)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (post(chat()), b"200"),
        (post(chat(stream=True)), b"200"),
        (post(chat(model="no-such-model")), b"404"),
        (post(b"{not json"), b"400"),
        (post(chat(), version="1.0", close=False), b"200"),
        (b"GET /health HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n", b"200"),
    ],
    ids=["non-stream", "stream", "unknown-model", "bad-json", "http10", "health"],
)
async def test_connection_close_is_honoured(
    request_bytes: bytes, status: bytes, nursery: trio.Nursery, enclave_key: EnclaveKey
) -> None:
    state = make_state(enclave_key, mock_token_delay_ms=0)
    url = await start_gateway(nursery, state)
    port = int(url.rsplit(":", 1)[1])
    answer = await read_to_eof(port, request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer[:200]
    if b'stream": true' in request_bytes:
        assert answer.rstrip().endswith(b"0"), "chunked stream not terminated"
        assert b"data: [DONE]" in answer


async def test_keep_alive_is_still_kept(nursery: trio.Nursery, enclave_key: EnclaveKey) -> None:
    """The shielded last send must not close connections the client wants to keep."""
    state = make_state(enclave_key, mock_token_delay_ms=0)
    url = await start_gateway(nursery, state)
    port = int(url.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        for _ in range(3):
            await sock.send(post(chat(), close=False))
            buf = bytearray()
            with trio.fail_after(5):
                while b"tee_signature" not in buf or not buf.rstrip().endswith(b"}"):
                    chunk = await sock.recv(65536)
                    assert chunk, "the gateway closed a keep-alive connection"
                    buf += chunk
            assert buf.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
