"""The settling meter: the relay's one metering hook, turned into a charge on a session.

Flow for a paid request (the wiring lives in the x402 adapter, not here):

1. the pricing gate computes the worst case (``pricing.worst_case_cost``) at the current price
   and reserves it on the session (``SessionLedger.reserve``);
2. it ``register``\\ s the reservation under the relay's ``request_id``, with the model, the
   canonical request size and the price it quoted;
3. the relay calls ``finish(record)`` exactly once, shielded with a deadline, however the request
   ended; the meter prices the record (provider usage, else the disconnect estimate; images at
   ``image_usd``) at the **quoted** price and commits it to the reservation.

``finish`` is idempotent on ``request_id`` (a second call is a counted no-op) and never raises.
If a registered request cannot be priced (a bug: everything is validated at ``register``), it
is charged its reservation, the worst case the client was admitted for: never free.
A request that was registered but never reached the relay is released with ``abandon``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import trio

from ..providers.base import ModelInfo
from ..relay.metering import Meter, RequestRecord
from .ledger import Charge, Reservation, SessionLedger
from .pricing import OPG_DECIMALS, check_price, record_cost, usd_cost

log = logging.getLogger("trio_gateway.payments.meter")


@dataclass(frozen=True, slots=True)
class PaidRequest:
    reservation: Reservation
    model: ModelInfo
    request_size: int  # canonical request bytes (the prompt estimate's input)
    price_usd: Decimal  # the asset price the request was admitted at


class SettlingMeter:
    def __init__(
        self,
        ledger: SessionLedger,
        *,
        decimals: int = OPG_DECIMALS,
        inner: Meter | None = None,
        remember: int = 100_000,
    ) -> None:
        self.ledger = ledger
        self.decimals = decimals
        self.inner = inner  # e.g. the foundation's UsageLog, still fed for /health
        self._remember = remember
        self._pending: dict[str, PaidRequest] = {}
        self._registered_at: dict[str, float] = {}
        self._finished: OrderedDict[str, int] = OrderedDict()  # request_id -> charged
        self.charged_requests = 0
        self.estimated_requests = 0
        self.unmetered = 0  # finished without a registration (unpaid routes, dev mode)
        self.duplicates = 0
        self.errors = 0
        self.charged_total = 0
        self.orphans_reaped = 0

    def register(
        self,
        request_id: str,
        reservation: Reservation,
        model: ModelInfo,
        request_size: int,
        price_usd: Decimal,
    ) -> None:
        """Tie a reservation to the relay's request id (before the relay runs)."""
        if request_id in self._pending or request_id in self._finished:
            raise ValueError(f"request {request_id} is already metered")
        check_price(price_usd)
        usd_cost(model, 1, 1, 1 if model.image_usd is not None else 0)  # prices parse
        self._pending[request_id] = PaidRequest(reservation, model, request_size, price_usd)
        self._registered_at[request_id] = trio.current_time()

    async def abandon(self, request_id: str) -> None:
        """The request never reached the relay: free its reservation."""
        paid = self._pending.get(request_id)
        if paid is None:
            return
        with trio.CancelScope(shield=True):  # forgotten only once released (SECURITY F7)
            await self.ledger.release(paid.reservation)
        self._pending.pop(request_id, None)
        self._registered_at.pop(request_id, None)

    async def reap_orphans(self, max_age: float) -> int:
        """Release reservations whose request never reached the relay (the client left between
        admission and the response starting, so no upstream call was made and ``finish`` will
        never come). ``max_age`` must exceed the longest a relay can run (its total deadline
        plus the final hand-off and the hook's own deadline), so a live request is never
        reaped. Returns how many were released."""
        cutoff = trio.current_time() - max_age
        stale = [rid for rid, t in self._registered_at.items() if t < cutoff]
        for rid in stale:
            await self.abandon(rid)
        self.orphans_reaped += len(stale)
        return len(stale)

    async def finish(self, record: RequestRecord) -> None:
        try:
            await self._finish(record)
        except Exception as exc:  # the hook must never raise
            self.errors += 1
            log.error("settling meter failed (%s) rid=%s", type(exc).__name__, record.request_id)
        if self.inner is not None:
            try:
                await self.inner.finish(record)
            except Exception as exc:
                log.error("inner meter failed (%s)", type(exc).__name__)

    async def _finish(self, record: RequestRecord) -> None:
        rid = record.request_id
        if rid in self._finished:
            self.duplicates += 1
            return
        paid = self._pending.pop(rid, None)
        self._registered_at.pop(rid, None)
        if paid is None:
            self.unmetered += 1
            return
        self._finished[rid] = 0
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)
        try:
            cost, counts = record_cost(
                record, paid.model, paid.request_size, paid.price_usd, decimals=self.decimals
            )
            if counts.estimated:
                self.estimated_requests += 1
        except Exception as exc:
            self.errors += 1
            cost = paid.reservation.amount
            log.error("could not price rid=%s (%s): charging the reservation", rid, exc)
        # Must complete once begun: the pending entry is gone, so a commit cut short (the relay's
        # hook has a deadline) would leave the reservation held for good and the request
        # unbilled (found by the soak with an overloaded gateway). The ledger never awaits
        # while holding its lock, so only the wait for the lock can take time (CPU contention).
        with trio.CancelScope(shield=True):
            charge: Charge = await self.ledger.commit(paid.reservation, cost)
        self._finished[rid] = charge.amount
        self.charged_requests += 1
        self.charged_total += charge.amount

    def charged(self, request_id: str) -> int | None:
        """What a finished request was charged (None: unknown or forgotten)."""
        return self._finished.get(request_id)

    def snapshot(self) -> dict[str, Any]:
        return {
            "in_flight": len(self._pending),
            "charged_requests": self.charged_requests,
            "estimated_requests": self.estimated_requests,
            "charged_total": self.charged_total,
            "unmetered": self.unmetered,
            "duplicates": self.duplicates,
            "errors": self.errors,
        }
