"""The provider interface: the only thing the relay knows about a provider.

An adapter is pure: it builds an ``UpstreamCall`` (method, URL, headers, body bytes) and parses
bytes into relay events. It never opens a connection; the relay owns the one process-wide
``httpx.AsyncClient`` and every await on it (so every cancellation rule lives in one place), and
tests swap the wire with ``httpx.MockTransport`` or a loopback server instead of patching code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..api.errors import GatewayError
from ..relay.events import ProviderEvent

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One upstream HTTP request. ``stream`` is whether the *upstream* answer is streamed (an
    image endpoint never is, even for a streaming client). ``context`` is the adapter's own
    note to itself for parsing (e.g. the name of a tool it forced)."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool
    context: Mapping[str, Any] = field(default_factory=dict)


class StreamParser(Protocol):
    def feed(self, data: bytes) -> list[ProviderEvent]: ...

    def close(self) -> list[ProviderEvent]:
        """End of the upstream body: final events, or raise ``UpstreamError`` if truncated."""
        ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One row of the model table (``models.toml``)."""

    name: str
    provider: str
    upstream: str
    input_usd: str
    output_usd: str
    fixed_temperature: float | None = None
    context: int | None = None
    max_output: int | None = None
    dev_only: bool = False
    mode: Literal["chat", "image_output", "image_generation"] = "chat"
    image_usd: str | None = None  # per generated image (image models)
    thinking_budget: int | None = None  # Gemini thinking budget, where the reference sets one


class Provider(Protocol):
    @property
    def name(self) -> str: ...

    def unsupported(
        self, kind: Kind, fields: Mapping[str, Any], model: ModelInfo | None = None
    ) -> list[str]:
        """Request fields this provider cannot honour (the route answers 400 naming them)."""
        ...

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall: ...

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> StreamParser: ...

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]: ...

    def error(self, status: int, body: bytes) -> GatewayError:
        """Map an upstream error answer to our error (never echoing the provider body)."""
        ...
