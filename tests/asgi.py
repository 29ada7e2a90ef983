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
        gone = disconnect or trio.Event()

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
