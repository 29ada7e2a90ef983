"""Canonical request and output bytes, byte-compatible with the reference gateway (spec §3.2, §3.3).

A client that recomputes ``tee_request_hash`` with the reference's recipe must get our value, so
the quirks are kept on purpose and pinned by vectors in the tests:

* ``json.dumps(d, sort_keys=True)`` with the default ``", "`` / ``": "`` separators and
  ``ensure_ascii=True`` (non-ASCII as ``\\uXXXX``), floats as Python repr;
* chat: ``temperature`` is hashed as ``float(t)`` or ``0.0`` when omitted; ``max_tokens`` only when
  given; ``stop``, ``tools``, ``response_format`` only when truthy; nothing else (not ``stream``,
  ``tool_choice``, ``top_p``, ``seed``, ``user``, ``max_completion_tokens``);
* a user message whose content is a list is hashed as Python's ``str(list)`` of the parsed JSON;
* completions: ``temperature`` defaults to 1.0 and ``max_tokens`` to 16 (OpenAI's documented legacy
  defaults; we also *run* with them, so the hash never vouches for a value that was not used).

Input is the request JSON exactly as parsed from the client's body (key order preserved), never a
model re-serialisation, so numbers and key order inside ``tools`` survive as the client sent them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

COMPLETIONS_DEFAULT_TEMPERATURE = 1.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def dumps_canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _message(msg: Mapping[str, Any]) -> dict[str, Any]:
    role = msg.get("role")
    content = msg.get("content")
    if role in ("system", "developer"):
        return {"role": role, "content": content}
    if role == "user":
        return {"role": "user", "content": str(content) if isinstance(content, list) else content}
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": content or ""}
        calls = msg.get("tool_calls")
        if calls:
            out["tool_calls"] = [
                {
                    "id": c.get("id"),
                    "type": c.get("type"),
                    "function": {
                        "name": (c.get("function") or {}).get("name"),
                        "arguments": (c.get("function") or {}).get("arguments"),
                    },
                }
                for c in calls
            ]
        return out
    if role == "tool":
        return {"role": "tool", "content": content, "tool_call_id": msg.get("tool_call_id")}
    if role == "function":
        return {"role": "function", "content": content, "name": msg.get("name")}
    raise ValueError(f"unknown role {role!r}")


def chat_request_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "model": raw["model"],
        "messages": [_message(m) for m in raw["messages"]],
    }
    t = raw.get("temperature")
    d["temperature"] = float(t) if t is not None else 0.0
    if raw.get("max_tokens") is not None:
        d["max_tokens"] = raw["max_tokens"]
    for key in ("stop", "tools", "response_format"):
        if raw.get(key):
            d[key] = raw[key]
    return d


def completion_request_dict(raw: Mapping[str, Any]) -> dict[str, Any]:
    t = raw.get("temperature")
    mt = raw.get("max_tokens")
    d: dict[str, Any] = {
        "model": raw["model"],
        "prompt": raw["prompt"],
        "temperature": float(t) if t is not None else COMPLETIONS_DEFAULT_TEMPERATURE,
        "max_tokens": mt if mt is not None else COMPLETIONS_DEFAULT_MAX_TOKENS,
    }
    if raw.get("stop"):
        d["stop"] = raw["stop"]
    return d


def chat_request_bytes(raw: Mapping[str, Any]) -> bytes:
    return dumps_canonical(chat_request_dict(raw)).encode()


def completion_request_bytes(raw: Mapping[str, Any]) -> bytes:
    return dumps_canonical(completion_request_dict(raw)).encode()


def tool_calls_output(calls: Sequence[Mapping[str, Any]]) -> str:
    """Output content of a tool-call answer: sorted-keys JSON of the calls as returned."""
    return dumps_canonical(
        [
            {
                "id": c["id"],
                "type": "function",
                "function": {
                    "name": c["function"]["name"],
                    "arguments": c["function"]["arguments"],
                },
            }
            for c in calls
        ]
    )
