"""Folds provider events into the answer that gets signed (text or tool calls, usage, finish)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..signing.canonical import tool_calls_output
from .events import Finish, ImageOutput, ProviderEvent, TextDelta, ToolCallDelta, UsageReport


@dataclass
class _Call:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class Answer:
    text_parts: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    usage: UsageReport | None = None
    finish: str | None = None
    images: list[str] = field(default_factory=list)

    def add(self, ev: ProviderEvent) -> None:
        if isinstance(ev, TextDelta):
            self.text_parts.append(ev.text)
        elif isinstance(ev, ToolCallDelta):
            call = self.calls.setdefault(ev.index, _Call())
            if ev.id:
                call.id = ev.id
            if ev.name:
                call.name += ev.name
            if ev.arguments:
                call.arguments.append(ev.arguments)
        elif isinstance(ev, UsageReport):
            self.usage = ev
        elif isinstance(ev, Finish):
            self.finish = ev.reason
        elif isinstance(ev, ImageOutput):
            self.images.append(ev.data_uri)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def tool_calls(self) -> list[dict[str, Any]]:
        return [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": "".join(c.arguments)},
            }
            for _, c in sorted(self.calls.items())
        ]

    @property
    def finish_reason(self) -> str:
        if self.calls and self.finish in (None, "stop"):
            return "tool_calls"
        return self.finish or "stop"

    def output_content(self) -> str:
        """What ``tee_output_hash`` covers (reference §3.3): the tool calls when the answer is a
        tool-call turn, else the text."""
        if self.calls and self.finish_reason == "tool_calls":
            return tool_calls_output(self.tool_calls())
        return self.text
