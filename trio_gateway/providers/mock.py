"""The embedded dev-mode model: an in-process OpenAI-compatible provider, as an httpx transport.

It sits *behind* the real relay and the real OpenAI adapter (mounted on the shared client at
``MOCK_BASE_URL``), so ``make run`` exercises every production code path except the network. It
streams realistic chunks on a schedule (``token_delay`` apart), honours ``max_tokens`` (finishing
with ``length``), calls a tool when asked to (``tool_choice`` required/named, or the user names a
tool), answers JSON for ``response_format``, and reports usage. Deterministic: same request, same
answer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

MOCK_BASE_URL = "http://mock.trio-gateway.invalid/v1"

_LOREM = (
    "Structured concurrency means every task has an owner and a way to end. When you hang up, "
    "the gateway closes the upstream connection within milliseconds, bills what was delivered, "
    "and signs nothing it did not send. This answer comes from the built-in mock model, so no "
    "provider key was needed; verify its signature with the key at /signing-key."
)


def _words(text: str) -> list[str]:
    return [w for w in text.replace("\n", " ").split(" ") if w]


def _count_tokens(obj: Any) -> int:
    return max(1, len(json.dumps(obj)) // 4)


def _user_text(body: dict[str, Any]) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            c = msg.get("content")
            if isinstance(c, str):
                return c
            return " ".join(p.get("text", "") for p in c or [] if p.get("type") == "text")
    return ""


def _example(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return "example"
    t = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if t == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: _example(v) for k, v in props.items()}
    if t == "array":
        return [_example(schema.get("items"))]
    if t in ("integer", "number"):
        return 42
    if t == "boolean":
        return True
    return "example"


def _plan(body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str]:
    """(text tokens, tool call or None, finish_reason)."""
    user = _user_text(body)
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if tools and choice != "none":
        chosen = None
        if isinstance(choice, dict):
            chosen = next(
                (t for t in tools if t["function"]["name"] == choice["function"]["name"]), None
            )
        elif choice == "required":
            chosen = tools[0]
        else:
            chosen = next((t for t in tools if t["function"]["name"] in user), None)
        if chosen is not None:
            fn = chosen["function"]
            call = {
                "id": "call_" + uuid.uuid5(uuid.NAMESPACE_OID, user).hex[:24],
                "name": fn["name"],
                "arguments": json.dumps(_example(fn.get("parameters") or {})),
            }
            return [], call, "tool_calls"
    fmt = (body.get("response_format") or {}).get("type")
    if fmt == "json_schema":
        schema = body["response_format"]["json_schema"].get("schema") or {}
        text = json.dumps(_example(schema))
        words = [text[i : i + 8] for i in range(0, len(text), 8)]
    elif fmt == "json_object":
        text = json.dumps({"answer": "mock", "you_said": user[:80]})
        words = [text[i : i + 8] for i in range(0, len(text), 8)]
    else:
        echo = f'You said: "{user[:120]}". ' if user else ""
        ws = _words(echo + _LOREM)
        words = [ws[0]] + [" " + w for w in ws[1:]]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        joined = "".join(words)
        if s and s in joined:
            cut = joined.index(s)
            words, acc = [w for w in words], 0
            kept = []
            for w in words:
                if acc + len(w) > cut:
                    if cut - acc > 0:
                        kept.append(w[: cut - acc])
                    break
                kept.append(w)
                acc += len(w)
            return kept, None, "stop"
    if limit is not None and limit < len(words):
        return words[:limit], None, "length"
    return words, None, "stop"


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], delay: float, first_delay: float) -> None:
        self._chunks = chunks
        self._delay = delay
        self._first = first_delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await trio.sleep(self._first)
        for i, c in enumerate(self._chunks):
            if i and self._delay:
                await trio.sleep(self._delay)
            yield c

    async def aclose(self) -> None:
        pass


class MockModelTransport(httpx.AsyncBaseTransport):
    def __init__(self, token_delay: float = 0.02, first_token_delay: float = 0.05) -> None:
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        try:
            body = json.loads(request.content)
        except ValueError:
            return httpx.Response(400, json={"error": {"message": "bad json", "type": "x"}})
        kind = (
            "completion"
            if request.url.path.endswith("/completions")
            and (not request.url.path.endswith("/chat/completions"))
            else "chat"
        )
        words, call, finish = _plan(body)
        prompt_tokens = _count_tokens(body.get("messages") or body.get("prompt"))
        completion_tokens = len(words) if call is None else _count_tokens(call)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        model = body.get("model", "mock")
        if not body.get("stream"):
            if kind == "completion":
                choice: dict[str, Any] = {"index": 0, "text": "".join(words)}
            else:
                msg: dict[str, Any] = {"role": "assistant", "content": "".join(words) or None}
                if call:
                    msg["tool_calls"] = [
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["arguments"]},
                        }
                    ]
                choice = {"index": 0, "message": msg}
            choice["finish_reason"] = finish
            obj = {
                "id": cid,
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
            data = json.dumps(obj).encode()
            return httpx.Response(
                200,
                headers={"content-type": "application/json"},
                stream=_Stream([data], 0, self.first_token_delay + self.token_delay * len(words)),
            )

        def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created,
                "model": model,
                "choices": [choice],
                **extra,
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        chunks: list[bytes] = []
        if kind == "chat":
            if call:
                chunks.append(
                    chunk(
                        {
                            "index": 0,
                            "delta": {
                                "role": "assistant",
                                "content": None,
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": call["id"],
                                        "type": "function",
                                        "function": {"name": call["name"], "arguments": ""},
                                    }
                                ],
                            },
                            "finish_reason": None,
                        }
                    )
                )
                args = call["arguments"]
                for i in range(0, len(args), 6):
                    chunks.append(
                        chunk(
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [
                                        {"index": 0, "function": {"arguments": args[i : i + 6]}}
                                    ]
                                },
                                "finish_reason": None,
                            }
                        )
                    )
            for i, w in enumerate(words):
                delta = {"role": "assistant", "content": w} if i == 0 else {"content": w}
                chunks.append(chunk({"index": 0, "delta": delta, "finish_reason": None}))
            chunks.append(chunk({"index": 0, "delta": {}, "finish_reason": finish}))
        else:
            for w in words:
                chunks.append(chunk({"index": 0, "text": w, "finish_reason": None}))
            chunks.append(chunk({"index": 0, "text": "", "finish_reason": finish}))
        if (body.get("stream_options") or {}).get("include_usage"):
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created}
            obj.update(model=model, choices=[], usage=usage)
            chunks.append(b"data: " + json.dumps(obj).encode() + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=_Stream(chunks, self.token_delay, self.first_token_delay),
        )
