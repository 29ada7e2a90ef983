"""The single hook point where metering and settlement run: once per request, however it ends.

The relay calls ``Meter.finish(record)`` exactly once, from its ``finally``, inside
``trio.move_on_after(settle_deadline, shield=True)``. A meter must be idempotent on
``record.request_id`` (the payments layer settles through it) and must never raise for
business reasons; if it overruns its deadline the relay logs it and moves on (the payments layer
hands such debts to its reconciler).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from .events import UsageReport


class Outcome(enum.StrEnum):
    COMPLETE = "complete"  # signed final event (or body) handed to the server
    CLIENT_GONE = "client_gone"  # cancelled: the client disconnected
    CLIENT_STALLED = "client_stalled"  # the client stopped reading for longer than the deadline
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    SIGNING_FAILED = "signing_failed"
    GATEWAY_ERROR = "gateway_error"
    SHUTDOWN = "shutdown"  # cut at the end of the shutdown grace period (billed like an error)


@dataclass
class RequestRecord:
    request_id: str
    model: str
    provider: str
    stream: bool
    started_at: float
    outcome: Outcome | None = None
    usage: UsageReport | None = None  # as reported by the provider, if it ever arrived
    delivered_events: int = 0  # content/tool deltas handed to the client
    delivered_chars: int = 0
    signed: bool = False
    images: int = 0  # generated images delivered (billed per image for image models)
    upstream_status: int | None = None
    finished_at: float | None = None
    notes: list[str] = field(default_factory=list)


class Meter(Protocol):
    async def finish(self, record: RequestRecord) -> None: ...


class UsageLog:
    """The foundation's meter: counts outcomes and tokens (shown on ``/health``).

    Payments replace it with a settling meter behind the same interface.
    """

    def __init__(self) -> None:
        self.by_outcome: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.seen: set[str] = set()
        self.duplicates = 0

    async def finish(self, record: RequestRecord) -> None:
        if record.request_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(record.request_id)
        if len(self.seen) > 100_000:
            self.seen.clear()
        key = str(record.outcome)
        self.by_outcome[key] = self.by_outcome.get(key, 0) + 1
        if record.usage is not None:
            self.prompt_tokens += record.usage.prompt_tokens
            self.completion_tokens += record.usage.completion_tokens

    def snapshot(self) -> dict[str, object]:
        return {
            "requests": dict(self.by_outcome),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
