"""Google Gemini generateContent adapter (placeholder: being written; see issue 4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..api.errors import GatewayError, Unavailable
from ..relay.events import ProviderEvent
from .base import Kind, ModelInfo, StreamParser, UpstreamCall


@dataclass(frozen=True)
class GeminiProvider:
    base_url: str
    name: str = "google"

    def unsupported(self, kind: Kind, fields: Mapping[str, Any]) -> list[str]:
        return []

    def build(
        self, kind: Kind, raw: Mapping[str, Any], model: ModelInfo, api_key: str | None
    ) -> UpstreamCall:
        raise Unavailable("the Gemini adapter is not available yet", code="not_implemented")

    def stream_parser(self, kind: Kind, call: UpstreamCall) -> StreamParser:
        raise NotImplementedError

    def parse_body(self, kind: Kind, call: UpstreamCall, body: bytes) -> list[ProviderEvent]:
        raise NotImplementedError

    def error(self, status: int, body: bytes) -> GatewayError:
        raise NotImplementedError
