"""A minimal ASGI driver: the app in-process, with exact control over when the client leaves.

quart-trio's test client hangs after a disconnect (shared/spec/trio-stack.md §2.7), so tests that
need disconnects drive the ASGI callable directly, like Hypercorn does: a receive() that yields
the body then blocks until ``disconnect`` is set, and a send() that records every message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass
class ASGIResult:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.decode().lower() == name.lower():
                return v.decode()
        return None

    def sse_data(self) -> list[str]:
        out = []
        for block in self.body.decode().split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data: "):
                    out.append(line[6:])
        return out


class ASGIClient:
    def __init__(self, app: Any, client: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        self.app = app
        self.client = client

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        disconnect: trio.Event | None = None,
        result: ASGIResult | None = None,
    ) -> ASGIResult:
        if isinstance(body, dict):
            raw = json.dumps(body).encode()
            headers = {"content-type": "application/json", **(headers or {})}
        else:
            raw = body or b""
        hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        hdrs.append((b"content-length", str(len(raw)).encode()))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": hdrs,
            "client": self.client,
            "server": ("127.0.0.1", 8000),
            "extensions": {},
        }
        res = result if result is not None else ASGIResult()
        sent_body = False
        gone = disconnect if disconnect is not None else trio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                res.status = msg["status"]
                res.headers = list(msg.get("headers", []))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    res.chunks.append(msg["body"])
                if not msg.get("more_body", False):
                    res.complete = True
                    gone.set()

        await self.app(scope, receive, send)
        return res


# -- shared by test_relay.py and test_cancel_sweep.py: a scripted provider wire and a verifier ---

import httpx  # noqa: E402  (appended helper section)

HANG = "hang"  # a script step: block forever (until cancelled)


@dataclass
class UpstreamLog:
    """What the provider side saw: requests, responses handed out, and how each body ended."""

    requests: list[httpx.Request] = field(default_factory=list)
    opened: int = 0  # response heads returned to httpx
    closed: int = 0  # body aclose() calls (httpx closing the connection / stream)
    exhausted: int = 0  # bodies read to the end
    chunks_sent: int = 0
    head_cancelled: int = 0  # cancelled while waiting for the response head


class ScriptedBody(httpx.AsyncByteStream):
    """An ``httpx.AsyncByteStream`` that plays a script: ``bytes`` are yielded, a number sleeps,
    ``HANG`` blocks forever, an exception instance (or class) is raised. Class-based iterator
    (not an async generator) so abandoning it mid-stream leaves nothing for the GC to warn about."""

    def __init__(self, steps: list[Any], log: UpstreamLog) -> None:
        self._steps = list(steps)
        self._i = 0
        self._log = log
        self._closed = False

    def __aiter__(self) -> ScriptedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:  # like a read on a closed connection
            raise httpx.ReadError("read on a closed connection")
        while self._i < len(self._steps):
            step = self._steps[self._i]
            self._i += 1
            if isinstance(step, bytes):
                await trio.lowlevel.checkpoint()  # like a socket read
                self._log.chunks_sent += 1
                return step
            if step == HANG:
                await trio.sleep_forever()
            elif isinstance(step, (int, float)):
                await trio.sleep(step)
            elif isinstance(step, BaseException):
                raise step.with_traceback(None)  # scripts are replayed: no stale traceback
            elif isinstance(step, type) and issubclass(step, BaseException):
                raise step
            else:
                raise AssertionError(f"bad script step {step!r}")
        self._log.exhausted += 1
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._closed = True
        self._log.closed += 1


class ScriptedUpstream(httpx.AsyncBaseTransport):
    """A provider wire (``httpx.AsyncBaseTransport``): every request gets ``status`` after
    ``head`` (seconds, or ``HANG``), then a body playing ``steps``."""

    def __init__(
        self,
        steps: list[Any],
        *,
        status: int = 200,
        head: float | str = 0.0,
        content_type: str = "text/event-stream",
    ) -> None:
        self.steps = steps
        self.status = status
        self.head = head
        self.content_type = content_type
        self.log = UpstreamLog()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.log.requests.append(request)
        try:
            if self.head == HANG:
                await trio.sleep_forever()
            elif self.head:
                await trio.sleep(float(self.head))
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            self.log.head_cancelled += 1
            raise
        self.log.opened += 1
        return httpx.Response(
            self.status,
            headers={"content-type": self.content_type},
            stream=ScriptedBody(self.steps, self.log),
        )


def oai_chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> bytes:
    """One upstream OpenAI chat stream chunk, as the provider sends it."""
    obj: dict[str, Any] = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4.1-2025-04-14",
        "choices": (
            [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
        ),
    }
    if usage is not None:
        obj["usage"] = {
            **usage,
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def oai_text_stream(
    words: list[str], finish: str = "stop", usage: dict[str, int] | None = None
) -> list[bytes]:
    out = [oai_chunk({"role": "assistant", "content": ""})]
    out += [oai_chunk({"content": w}) for w in words]
    out.append(oai_chunk({}, finish))
    if usage is not None:
        out.append(oai_chunk(usage=usage, choices=False))
    out.append(b"data: [DONE]\n\n")
    return out


def keccak(data: bytes) -> bytes:
    from Crypto.Hash import keccak as _k

    return _k.new(digest_bits=256, data=data).digest()


def verify_tee(fields: dict[str, Any], public_pem: str, output: str | None = None) -> None:
    """Check the five ``tee_*`` fields independently of the gateway's own signing code:
    RSA-PSS(SHA-256, MGF1-SHA-256, salt 32) over keccak256(req_hash ‖ out_hash ‖ uint256_be(ts)),
    tee_id = 0x + keccak256(DER public key), and (if given) out_hash = keccak256(output).
    Raises (AssertionError or cryptography's InvalidSignature) when anything is off."""
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    pub = serialization.load_pem_public_key(public_pem.encode())
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert fields["tee_id"] == "0x" + keccak(der).hex()
    req_h = bytes.fromhex(fields["tee_request_hash"])
    out_h = bytes.fromhex(fields["tee_output_hash"])
    ts = fields["tee_timestamp"]
    assert isinstance(ts, int) and len(req_h) == 32 and len(out_h) == 32
    if output is not None:
        assert out_h == keccak(output.encode()), "tee_output_hash does not cover the output"
    msg = keccak(req_h + out_h + ts.to_bytes(32, "big"))
    pub.verify(
        base64.b64decode(fields["tee_signature"], validate=True),
        msg,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )


class Disconnect:
    """Pass as ``ASGIClient.request(disconnect=...)``: ``set()`` makes receive() return
    ``http.disconnect``. (A bare ``trio.Event`` cannot be passed there: the driver's
    ``disconnect or trio.Event()`` calls ``Event.__bool__``, which trio forbids.)"""

    def __init__(self) -> None:
        self._ev = trio.Event()

    def set(self) -> None:
        self._ev.set()

    def is_set(self) -> bool:
        return self._ev.is_set()

    async def wait(self) -> None:
        await self._ev.wait()
