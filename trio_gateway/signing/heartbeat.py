"""The signed heartbeat: proof, every ``interval``, that this enclave key is alive.

The on-chain TEE registry keeps a last-seen time per ``teeId``; the facilitator relays
``heartbeat(teeId, timestamp, signature)`` from its own funded wallet (we keep no wallet). Each
attempt signs, with the enclave key and the scheme of the answers (RSA-PSS, see ``keys.py``)::

    message = keccak256(teeId (32 raw bytes) || uint256_be(timestamp))

and POSTs ``{facilitator_url}/heartbeat`` with
``{"teeId": "0x<64 hex>", "timestamp": "<decimal>", "signature": "<base64>",
"contractAddress": <as configured>}``. Success is HTTP < 400 with a JSON object whose ``txHash``
is a non-empty string; anything else fails the attempt with the facilitator's ``error`` field or
the first 500 characters of the answer (never more, and never the request).

``timestamp`` is the wall clock minus ``timestamp_buffer``. The reference backdates by 300 s to
absorb drift between the enclave's clock and the chain's block time (a heartbeat stamped later
than the block that records it would claim a time in the future). The default stays 300 s so a
registry deployed for the reference accepts our heartbeats unchanged; ``/v1/keys`` may set another
(``tee_heartbeat_buffer``, 0..3600) where the registry's window allows a fresher claim.

Schedule (``run``): one heartbeat at once, then one every ``interval``, measured start to start.
A heartbeat makes up to ``max_attempts`` attempts, each with a fresh timestamp and signature and
bounded by ``facilitator_timeout`` as a whole (connect, send, answer); retries wait
``retry_delay``, doubling, each wait capped at half the interval, and a retry that could not start
before the next heartbeat is due is dropped (that one carries a fresher timestamp anyway). A
failed heartbeat is counted and logged and the loop waits for the next slot: ``run`` never
raises for a facilitator problem. Cancellation (shutdown, or ``stop()``) ends it at once,
mid-request or mid-wait; nothing is shielded, because a heartbeat cut short costs nothing.

Ownership: ``run`` is a service under ``services.supervise`` in the app nursery; the HTTP client
is injected (its own, ``trust_env=False``; tests pass ``httpx.MockTransport``) and closed by
``aclose()`` at shutdown. Time is trio's (``MockClock`` in tests) except the signed timestamp,
which comes from the injectable ``wall_clock``. Counters are plain attributes: one trio thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from ..relay.wire import BodyTooLarge, read_capped
from .hashing import keccak256
from .keys import EnclaveKey

log = logging.getLogger("trio_gateway.heartbeat")

DEFAULT_INTERVAL = 900.0
DEFAULT_TIMESTAMP_BUFFER = 300
DEFAULT_FACILITATOR_TIMEOUT = 20.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_DELAY = 10.0
MAX_ANSWER_BYTES = 64 * 1024
ERROR_CHARS = 500


def heartbeat_msg_hash(tee_id: bytes, timestamp: int) -> bytes:
    """keccak256(teeId ‖ uint256_be(timestamp)): the 32 bytes the enclave key signs."""
    if len(tee_id) != 32:
        raise ValueError("teeId must be 32 bytes")
    if not 0 <= timestamp < 1 << 256:
        raise ValueError("timestamp out of uint256 range")
    return keccak256(tee_id + timestamp.to_bytes(32, "big"))


def shown_url(url: str) -> str:
    """``url`` without user info, query or fragment: what status and logs may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    contract_address: str  # the TEE registry; sent as given
    facilitator_url: str  # trailing "/" stripped
    interval: float = DEFAULT_INTERVAL
    timestamp_buffer: int = DEFAULT_TIMESTAMP_BUFFER
    facilitator_timeout: float = DEFAULT_FACILITATOR_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay: float = DEFAULT_RETRY_DELAY

    def __post_init__(self) -> None:
        object.__setattr__(self, "facilitator_url", self.facilitator_url.rstrip("/"))
        if not self.facilitator_url.startswith(("http://", "https://")):
            raise ValueError("facilitator_url must be an http(s) URL")
        if not self.contract_address:
            raise ValueError("contract_address is required")
        if not (self.interval > 0 and self.facilitator_timeout > 0 and self.retry_delay >= 0):
            raise ValueError("interval and facilitator_timeout must be > 0, retry_delay >= 0")
        if self.timestamp_buffer < 0:
            raise ValueError("timestamp_buffer must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    @property
    def endpoint(self) -> str:
        return f"{self.facilitator_url}/heartbeat"

    def retry_wait(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1, 2, …): 10 s, 20 s, … capped at half the
        interval, so retries never crowd out the next heartbeat."""
        return min(self.retry_delay * 2.0 ** (retry - 1), self.interval / 2)


class HeartbeatError(Exception):
    """One attempt failed; the message is short, trimmed and safe to log and show."""


def read_answer(status: int, body: bytes) -> str:
    """The ``txHash`` of a successful answer, or ``HeartbeatError`` with the reason."""
    try:
        data: Any = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        data = None
    if status < 400 and isinstance(data, dict):
        tx = data.get("txHash")
        if isinstance(tx, str) and tx:
            return tx
    detail: Any = data.get("error") if isinstance(data, dict) else None
    if detail is None or detail == "":
        detail = body.decode("utf-8", "replace")
    elif not isinstance(detail, str):
        detail = json.dumps(detail, separators=(",", ":"))
    detail = detail[:ERROR_CHARS]
    if status < 400 and not detail:
        detail = "no txHash in the answer"
    raise HeartbeatError(f"HTTP {status}: {detail}" if detail else f"HTTP {status}")


class Heartbeat:
    def __init__(
        self,
        config: HeartbeatConfig,
        key: EnclaveKey,
        client: httpx.AsyncClient,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.key = key
        self.client = client
        self._tee_id_raw = bytes.fromhex(key.tee_id.removeprefix("0x"))
        self._wall_clock = wall_clock
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self._next_due: float | None = None  # trio time of the next heartbeat
        self.running = False
        self.total_sent = 0  # heartbeats the facilitator confirmed with a txHash
        self.total_errors = 0  # heartbeats that failed after every attempt
        self.consecutive_failures = 0
        self.attempts = 0  # POSTs started
        self.failed_attempts = 0
        self.last_success_timestamp: int | None = None  # wall clock when confirmed
        self.last_heartbeat_timestamp: int | None = None  # the signed (backdated) timestamp
        self.last_tx_hash: str | None = None
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"Heartbeat(tee_id={self.key.tee_id}, endpoint={shown_url(self.config.endpoint)})"

    # -- the service ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat now, then every ``interval``, until cancelled or ``stop()``ped."""
        if self._stopped:
            return
        interval = self.config.interval
        with trio.CancelScope() as scope:
            self._scope = scope
            self.running = True
            try:
                due = trio.current_time()
                while True:
                    self._next_due = due + interval
                    await self.beat(retry_until=self._next_due)
                    now = trio.current_time()
                    if self._next_due <= now:  # the heartbeat overran its slot: skip missed ones
                        late = now - self._next_due
                        self._next_due += (math.floor(late / interval) + 1) * interval
                    due = self._next_due
                    await trio.sleep_until(due)
            finally:
                self.running = False
                self._next_due = None
                self._scope = None

    def stop(self) -> None:
        """End ``run`` at once (it returns; ``supervise`` does not restart a returned service)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """Stop, then close the HTTP client (shutdown, in ``after_serving``)."""
        self.stop()
        await self.client.aclose()

    async def beat(self, *, retry_until: float | None = None) -> bool:
        """One heartbeat: up to ``max_attempts`` attempts; True once the facilitator confirmed.
        No retry starts at or after ``retry_until`` (trio time)."""
        cfg = self.config
        error = "no attempt"
        for attempt in range(1, cfg.max_attempts + 1):
            if attempt > 1:
                wait = cfg.retry_wait(attempt - 1)
                if retry_until is not None and trio.current_time() + wait >= retry_until:
                    break
                await trio.sleep(wait)
            try:
                timestamp, tx = await self._attempt()
            except HeartbeatError as exc:
                error = str(exc)
                self.failed_attempts += 1
                log.warning("heartbeat attempt %d/%d failed: %r", attempt, cfg.max_attempts, error)
                continue
            self.total_sent += 1
            self.consecutive_failures = 0
            self.last_success_timestamp = int(self._wall_clock())
            self.last_heartbeat_timestamp = timestamp
            self.last_tx_hash = tx[:ERROR_CHARS]  # a real one is 66 characters
            self.last_error = None
            log.info("heartbeat accepted (timestamp %d, tx %r)", timestamp, tx[:100])
            return True
        self.total_errors += 1
        self.consecutive_failures += 1
        self.last_error = error
        log.error("heartbeat failed: %r", error)
        return False

    async def _attempt(self) -> tuple[int, str]:
        """Sign and POST one heartbeat; (signed timestamp, txHash) or ``HeartbeatError``."""
        cfg = self.config
        self.attempts += 1
        timestamp = int(self._wall_clock()) - cfg.timestamp_buffer
        try:
            digest = heartbeat_msg_hash(self._tee_id_raw, timestamp)
        except ValueError as exc:
            raise HeartbeatError(f"cannot sign: {exc}") from None
        payload = {
            "teeId": self.key.tee_id,
            "timestamp": str(timestamp),
            "signature": base64.b64encode(self.key.sign_raw(digest)).decode("ascii"),
            "contractAddress": cfg.contract_address,
        }
        try:
            with trio.fail_after(cfg.facilitator_timeout):
                async with self.client.stream("POST", cfg.endpoint, json=payload) as resp:
                    status = resp.status_code
                    try:
                        body = await read_capped(resp, MAX_ANSWER_BYTES)
                    except BodyTooLarge:
                        raise HeartbeatError(
                            f"HTTP {status}: the answer is over {MAX_ANSWER_BYTES} bytes"
                        ) from None
        except trio.TooSlowError:
            raise HeartbeatError(f"no answer within {cfg.facilitator_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise HeartbeatError(f"transport error ({type(exc).__name__})") from None
        return timestamp, read_answer(status, body)

    # -- readers --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /heartbeat/status``: the reference's fields plus a few of ours. Never raises."""
        next_due_in: float | None = None
        if self._next_due is not None:
            with contextlib.suppress(RuntimeError):  # outside trio: leave it None
                next_due_in = round(max(0.0, self._next_due - trio.current_time()), 3)
        cfg = self.config
        return {
            "enabled": True,
            "running": self.running,
            "tee_id": self.key.tee_id,
            "registry": cfg.contract_address,
            "wallet": None,
            "relay_mode": "facilitator",
            "facilitator_url": shown_url(cfg.facilitator_url),
            "heartbeat_endpoint": shown_url(cfg.endpoint),
            "interval_seconds": cfg.interval,
            "timestamp_buffer_seconds": cfg.timestamp_buffer,
            "total_sent": self.total_sent,
            "total_errors": self.total_errors,
            "consecutive_failures": self.consecutive_failures,
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "last_success_timestamp": self.last_success_timestamp,
            "last_heartbeat_timestamp": self.last_heartbeat_timestamp,
            "last_tx_hash": self.last_tx_hash,
            "last_error": self.last_error,
            "next_due_in": next_due_in,
        }


def disabled_status(tee_id: str) -> dict[str, Any]:
    """The status shape when ``/v1/keys`` configured no heartbeat."""
    return {
        "enabled": False,
        "running": False,
        "tee_id": tee_id,
        "registry": None,
        "wallet": None,
        "relay_mode": "facilitator",
        "facilitator_url": None,
        "heartbeat_endpoint": None,
        "interval_seconds": None,
        "timestamp_buffer_seconds": None,
        "total_sent": 0,
        "total_errors": 0,
        "consecutive_failures": 0,
        "attempts": 0,
        "failed_attempts": 0,
        "last_success_timestamp": None,
        "last_heartbeat_timestamp": None,
        "last_tx_hash": None,
        "last_error": None,
        "next_due_in": None,
    }
