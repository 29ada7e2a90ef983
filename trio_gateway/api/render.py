"""OpenAI-exact wire bytes for answers: stream chunks, the signed final chunk, whole bodies.

The relay calls a renderer; it never builds JSON itself. Stream chunks carry ``id``, ``object``,
``created`` and ``model`` like OpenAI's. The final chunk carries the ``finish_reason``, ``usage``
and the five ``tee_*`` fields together, so a client that reads the reference's final frame
(finish reason, usage and signature in one frame, then ``[DONE]``) reads ours too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from ..codecs.sse import encode_data
from ..relay.accumulate import Answer
from ..relay.events import TextDelta, ToolCallDelta, UsageReport
from ..signing.keys import Signature

DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _image(data_uri: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri}}


def usage_dict(u: UsageReport | None) -> dict[str, Any] | None:
    if u is None:
        return None
    d: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }
    if u.cached_tokens is not None:
        d["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    if u.reasoning_tokens is not None:
        d["completion_tokens_details"] = {"reasoning_tokens": u.reasoning_tokens}
    return d


class Renderer(Protocol):
    def delta(self, ev: TextDelta | ToolCallDelta, first: bool) -> bytes: ...
    def final(self, answer: Answer, sig: Signature) -> bytes: ...
    def body(self, answer: Answer, sig: Signature) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ChatRenderer:
    id: str
    created: int
    model: str

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return encode_data(_dumps(obj))

    def delta(self, ev: TextDelta | ToolCallDelta, first: bool) -> bytes:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if isinstance(ev, TextDelta):
            delta["content"] = ev.text
        else:
            call: dict[str, Any] = {"index": ev.index}
            fn: dict[str, Any] = {}
            if ev.id:
                call["id"] = ev.id
                call["type"] = "function"
            if ev.name:
                fn["name"] = ev.name
            fn["arguments"] = ev.arguments
            call["function"] = fn
            if first:
                delta["content"] = None
            delta["tool_calls"] = [call]
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def final(self, answer: Answer, sig: Signature) -> bytes:
        extra: dict[str, Any] = {}
        if answer.images:
            extra["images"] = [_image(u) for u in answer.images]
        return self._chunk(
            [{"index": 0, "delta": {}, "finish_reason": answer.finish_reason}],
            usage=usage_dict(answer.usage),
            **extra,
            **sig.fields(),
        )

    def body(self, answer: Answer, sig: Signature) -> bytes:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.calls:
            message["tool_calls"] = answer.tool_calls()
        if answer.images:
            message["images"] = [_image(u) for u in answer.images]
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": sig.timestamp,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.finish_reason}],
            "usage": usage_dict(answer.usage),
            **sig.fields(),
        }
        return _dumps(obj).encode()


@dataclass(frozen=True, slots=True)
class CompletionRenderer:
    id: str
    created: int
    model: str

    def _obj(self, text: str, finish: str | None, created: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    def delta(self, ev: TextDelta | ToolCallDelta, first: bool) -> bytes:
        text = ev.text if isinstance(ev, TextDelta) else ""
        return encode_data(_dumps(self._obj(text, None, self.created)))

    def final(self, answer: Answer, sig: Signature) -> bytes:
        obj = self._obj("", answer.finish_reason, self.created)
        obj.update(usage=usage_dict(answer.usage), **sig.fields())
        return encode_data(_dumps(obj))

    def body(self, answer: Answer, sig: Signature) -> bytes:
        obj = self._obj(answer.text, answer.finish_reason, sig.timestamp)
        obj.update(usage=usage_dict(answer.usage), **sig.fields())
        return _dumps(obj).encode()


def error_event(body: dict[str, Any]) -> bytes:
    return encode_data(_dumps(body))


def json_bytes(body: dict[str, Any]) -> bytes:
    return _dumps(body).encode()
