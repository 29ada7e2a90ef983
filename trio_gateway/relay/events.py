"""What a provider adapter turns upstream bytes into, and what the relay hands the ASGI side.

Small frozen values, like h11's events. Provider parsers produce the first group; the relay turns
them into client bytes; the ASGI side only ever sees ``Start`` and ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class UsageReport:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ImageOutput:
    """A generated image, as a ``data:`` URI. Delivered under ``images``; not in the output hash
    (the reference signs only the caption text of image answers)."""

    data_uri: str


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str


ProviderEvent = TextDelta | ToolCallDelta | UsageReport | Finish | ImageOutput


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the HTTP response (the ASGI side sends ``http.response.start``, then ``body`` if
    any: a whole non-streamed answer travels as one item)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default_factory=tuple)
    body: bytes = b""


Emit = Start | bytes
