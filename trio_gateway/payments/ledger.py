"""The session ledger: per-session budgets for ``upto`` permits, reserved before serving.

A session is one verified ``upto`` authorization: a payer, a cap (token base units, the permit's
``amount``) and the permit's deadline (unix seconds). The gateway serves many requests against it
and settles the accumulated charge **once**, before the deadline. This fixes the reference's
billing holes (§17.4 to §17.7):

* **Reserve before serving.** ``reserve`` holds the request's worst-case cost under the ledger's
  lock and refuses (``InsufficientBudget``) when the unreserved remainder cannot cover it, so
  concurrent requests on one session can never overspend it.
* **Commit the actual charge.** ``commit(actual)`` charges ``actual`` and frees the rest of the
  hold. If ``actual`` exceeds the hold (the worst case was an under-estimate, e.g. a prompt
  with more tokens than its byte estimate), the excess is charged from the unreserved remainder;
  a charge that would cross the cap **saturates** the session (charged up to the cap, marked
  exhausted and due for settlement) - never free.
* **Deadline margins** (§16.4): no serving within ``serve_margin`` (420 s) of the deadline
  (``SessionExpiring``; the client re-signs), settlement due within ``settle_margin`` (120 s),
  and a session still unsettled within ``abandon_margin`` (30 s) is abandoned with a CRITICAL log
  (the facilitator would reject it: deadline < now + 6 s).
* **Settlement is due** for sessions near their deadline, exhausted (and idle of in-flight
  requests), or idle (no activity and nothing in flight for ``idle_timeout``). Zero-cost
  sessions are dropped, not settled. ``due_for_settlement`` hands each due session out once;
  ``mark_settled`` is idempotent; ``settle_failed`` puts it back for the next round.
* **Bounded memory**: at ``max_sessions`` open sessions, opening another evicts the oldest idle
  one (zero-cost ones dropped first, else the oldest charged one is queued for settlement);
  settled/dropped ids are remembered in a bounded list so a replayed id is refused, not
  re-opened.

Every amount is an ``int``. The clock is injectable (unix seconds; tests pass a fake).
All mutations take ``self.lock`` and never await while holding it.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

log = logging.getLogger("trio_gateway.payments.ledger")


def session_tag(session_id: str) -> str:
    """A session id is a bearer secret (``X-Upto-Session``): logs get a short fingerprint."""
    return "s:" + hashlib.sha256(session_id.encode()).hexdigest()[:12]


SERVE_MARGIN = 420.0
SETTLE_MARGIN = 120.0
ABANDON_MARGIN = 30.0
IDLE_TIMEOUT = 100.0
MAX_SESSIONS = 10_000
MAX_TOMBSTONES = 100_000


class LedgerError(Exception):
    """Base of the ledger's refusals (each maps to a 402 at the HTTP layer)."""


class UnknownSession(LedgerError):
    pass


class SessionClosed(LedgerError):
    """Settling, settled, dropped, abandoned or exhausted: no more serving on it."""


class PayerMismatch(LedgerError):
    pass


class SessionConflict(LedgerError):
    """An id already open with a different payer, cap or deadline."""


class SessionExpiring(LedgerError):
    """Within the serve margin of the permit deadline: the client must sign a new permit."""


class LedgerFull(LedgerError):
    """``max_sessions`` open sessions and none idle enough to evict."""


class InsufficientBudget(LedgerError):
    def __init__(self, remaining: int, needed: int) -> None:
        super().__init__(f"remaining budget {remaining} < worst case {needed}")
        self.remaining = remaining
        self.needed = needed


class PayerLimit(InsufficientBudget):
    """The payer's unsettled charges and holds across all its sessions reach ``payer_limit``."""


class State(enum.StrEnum):
    OPEN = "open"
    SETTLING = "settling"  # due: waiting for (or in) settlement
    SETTLED = "settled"
    DROPPED = "dropped"  # zero cost: nothing to settle
    ABANDONED = "abandoned"  # too close to the deadline to settle


@dataclass
class Session:
    session_id: str
    payer: str  # lower-cased
    cap: int
    deadline: float
    opened_at: float
    last_activity: float
    charged: int = 0
    held: int = 0  # sum of outstanding reservations
    in_flight: int = 0
    exhausted: bool = False
    state: State = State.OPEN
    reason: str | None = None  # why settlement became due
    claimed: bool = False  # handed out by due_for_settlement, not yet settled or failed
    settle_attempts: int = 0

    @property
    def remaining(self) -> int:
        return self.cap - self.charged - self.held


@dataclass
class Reservation:
    session_id: str
    amount: int
    serial: int
    charged: int | None = None  # set by commit
    released: bool = False

    @property
    def done(self) -> bool:
        return self.charged is not None or self.released


@dataclass(frozen=True, slots=True)
class Charge:
    amount: int  # what was added to the session
    requested: int  # what commit was asked to charge
    saturated: bool = False  # the cap cut it short; the session is now exhausted
    duplicate: bool = False  # the reservation was already committed or released
    late: bool = False  # the session was already being settled: not billed (counted)


@dataclass(frozen=True, slots=True)
class DueSettlement:
    session_id: str
    payer: str
    amount: int
    reason: str  # deadline | exhausted | idle | evicted | shutdown
    deadline: float


def _as_amount(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    return value


class SessionLedger:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        serve_margin: float = SERVE_MARGIN,
        settle_margin: float = SETTLE_MARGIN,
        abandon_margin: float = ABANDON_MARGIN,
        idle_timeout: float = IDLE_TIMEOUT,
        max_sessions: int = MAX_SESSIONS,
        max_tombstones: int = MAX_TOMBSTONES,
        payer_limit: int | None = None,
    ) -> None:
        if not 0 < abandon_margin < settle_margin < serve_margin:
            raise ValueError("need 0 < abandon_margin < settle_margin < serve_margin")
        if idle_timeout <= 0 or max_sessions < 1 or max_tombstones < 1:
            raise ValueError("idle_timeout, max_sessions and max_tombstones must be positive")
        self.clock = clock
        self.serve_margin = serve_margin
        self.settle_margin = settle_margin
        self.abandon_margin = abandon_margin
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.max_tombstones = max_tombstones
        # Credit per payer (SECURITY F9): a permit is not escrow, the facilitator checked the
        # wallet's balance against one cap when it verified; so across all of a payer's live
        # sessions, charged + held may not pass this (the gate sets it to the session cap, so
        # the balance one verification saw covers everything outstanding). None: no bound.
        self.payer_limit = payer_limit
        self.payer_refusals = 0
        self.lock = trio.Lock()
        # live sessions (open and settling), least recently active first
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._by_payer: dict[str, set[str]] = {}  # payer -> ids of its live sessions
        self._open = 0
        self._tombstones: OrderedDict[str, tuple[State, int]] = OrderedDict()
        self._serial = 0
        # counters
        self.total_charged = 0
        self.total_settled = 0
        self.total_lost = 0  # abandoned debts
        self.total_late_unbilled = 0  # commits after settlement began
        self.saturations = 0
        self.refusals = 0
        self.duplicate_commits = 0
        self.duplicate_settles = 0
        self.dropped = 0
        self.abandoned = 0
        self.evicted = 0

    # -- queries --------------------------------------------------------------------------------

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def state_of(self, session_id: str) -> State | None:
        s = self._sessions.get(session_id)
        if s is not None:
            return s.state
        tomb = self._tombstones.get(session_id)
        return tomb[0] if tomb is not None else None

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def open_sessions(self) -> int:
        return self._open

    def status(self) -> dict[str, Any]:
        settling = len(self._sessions) - self._open
        return {
            "open_sessions": self._open,
            "settling_sessions": settling,
            "reserved": sum(s.held for s in self._sessions.values()),
            "unsettled": sum(s.charged for s in self._sessions.values()),
            "total_charged": self.total_charged,
            "total_settled": self.total_settled,
            "total_lost": self.total_lost,
            "total_late_unbilled": self.total_late_unbilled,
            "saturations": self.saturations,
            "refusals": self.refusals,
            "payer_refusals": self.payer_refusals,
            "dropped": self.dropped,
            "abandoned": self.abandoned,
            "evicted": self.evicted,
        }

    # -- opening --------------------------------------------------------------------------------

    async def open_session(self, session_id: str, payer: str, cap: int, deadline: float) -> Session:
        """Open (or, for the same payer/cap/deadline, return) a session."""
        _as_amount(cap, "cap")
        if cap < 0:
            raise ValueError("cap must be >= 0")
        payer = payer.lower()
        async with self.lock:
            now = self.clock()
            s = self._sessions.get(session_id)
            if s is not None:
                if (s.payer, s.cap, s.deadline) != (payer, cap, deadline):
                    raise SessionConflict(f"session {session_id} exists with other terms")
                if s.state is not State.OPEN:
                    raise SessionClosed(f"session {session_id} is {s.state}")
                return s
            if session_id in self._tombstones:
                raise SessionClosed(f"session {session_id} is {self._tombstones[session_id][0]}")
            if now >= deadline - self.serve_margin:
                raise SessionExpiring("the permit deadline is too close to serve on")
            if self._open >= self.max_sessions:
                self._evict_one(now)
            s = Session(session_id, payer, cap, deadline, now, now)
            self._sessions[session_id] = s
            self._by_payer.setdefault(payer, set()).add(session_id)
            self._open += 1
            return s

    def _evict_one(self, now: float) -> None:
        idle = [s for s in self._sessions.values() if s.state is State.OPEN and not s.in_flight]
        if not idle:
            self.refusals += 1
            raise LedgerFull("too many open sessions")
        zero = [s for s in idle if s.charged == 0]
        self.evicted += 1
        if zero:  # least recently active first; owing nothing, it just goes
            self.dropped += 1
            self._tombstone(zero[0], State.DROPPED, 0)
        else:
            self._due(idle[0], "evicted")

    # -- reserving ------------------------------------------------------------------------------

    def reserve(self, session_id: str, payer: str, amount: int) -> _Reserving:
        """Hold ``amount`` on the session: ``r = await ledger.reserve(...)`` (then commit or
        release), or ``async with ledger.reserve(...) as r:`` (released on exit unless
        committed)."""
        return _Reserving(self, session_id, payer, amount)

    async def _reserve(self, session_id: str, payer: str, amount: int) -> Reservation:
        _as_amount(amount, "amount")
        if amount < 0:
            raise ValueError("amount must be >= 0")
        async with self.lock:
            s = self._sessions.get(session_id)
            if s is None:
                if session_id in self._tombstones:
                    raise SessionClosed(f"session {session_id} is closed")
                raise UnknownSession(f"no session {session_id}")
            if s.payer != payer.lower():
                raise PayerMismatch("the session belongs to another payer")
            if s.state is not State.OPEN or s.exhausted:
                raise SessionClosed(f"session {session_id} is {s.state}")
            now = self.clock()
            if now >= s.deadline - self.serve_margin:
                raise SessionExpiring("the permit deadline is too close to serve on")
            if amount > s.remaining:
                self.refusals += 1
                raise InsufficientBudget(s.remaining, amount)
            if self.payer_limit is not None:
                outstanding = self.outstanding(s.payer)
                if outstanding + amount > self.payer_limit:
                    self.refusals += 1
                    self.payer_refusals += 1
                    raise PayerLimit(max(0, self.payer_limit - outstanding), amount)
            s.held += amount
            s.in_flight += 1
            s.last_activity = now
            self._sessions.move_to_end(session_id)
            self._serial += 1
            return Reservation(session_id, amount, self._serial)

    async def commit(self, r: Reservation, actual: int) -> Charge:
        """Charge ``actual`` (clamped at 0) against the reservation and free the rest."""
        _as_amount(actual, "actual")
        actual = max(0, actual)
        async with self.lock:
            if r.done:
                self.duplicate_commits += 1
                return Charge(r.charged or 0, actual, duplicate=True)
            s = self._sessions.get(r.session_id)
            if s is not None:
                s.held -= r.amount
                s.in_flight -= 1
            if s is None or s.claimed:
                # its settlement already began (deadline or shutdown): too late to bill
                r.charged = 0
                self.total_late_unbilled += actual
                if actual:
                    log.error(
                        "late charge of %d on settling session %s",
                        actual,
                        session_tag(r.session_id),
                    )
                return Charge(0, actual, late=True)
            headroom = s.cap - s.charged - s.held  # >= r.amount
            charge = min(actual, headroom)
            saturated = charge < actual
            s.charged += charge
            r.charged = charge
            self.total_charged += charge
            s.last_activity = self.clock()
            self._sessions.move_to_end(r.session_id)
            if saturated or s.charged >= s.cap:
                s.exhausted = True
            if saturated:
                self.saturations += 1
                log.warning("session %s saturated at its cap", session_tag(r.session_id))
            return Charge(charge, actual, saturated=saturated)

    async def release(self, r: Reservation) -> None:
        """Free the reservation without charging (the request never ran)."""
        async with self.lock:
            if r.done:
                return
            r.released = True
            s = self._sessions.get(r.session_id)
            if s is not None:
                s.held -= r.amount
                s.in_flight -= 1

    # -- settlement -----------------------------------------------------------------------------

    def outstanding(self, payer: str) -> int:
        """What ``payer`` owes and holds across its live sessions (not yet settled)."""
        total = 0
        for sid in self._by_payer.get(payer.lower(), ()):
            x = self._sessions.get(sid)
            if x is not None:
                total += x.charged + x.held
        return total

    def _tombstone(self, s: Session, state: State, amount: int) -> None:
        if s.state is State.OPEN:
            self._open -= 1
        s.state = state
        self._sessions.pop(s.session_id, None)
        ids = self._by_payer.get(s.payer)
        if ids is not None:
            ids.discard(s.session_id)
            if not ids:
                del self._by_payer[s.payer]
        self._tombstones[s.session_id] = (state, amount)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)

    def _due(self, s: Session, reason: str) -> None:
        """Close the session for serving and queue it (``_claim`` hands it out or drops it)."""
        if s.state is State.OPEN:
            self._open -= 1
            s.state = State.SETTLING
            s.reason = reason
            s.claimed = False

    async def due_for_settlement(self) -> list[DueSettlement]:
        """Sessions to settle now, each handed out once (until ``settle_failed``)."""
        async with self.lock:
            now = self.clock()
            for s in list(self._sessions.values()):
                if now >= s.deadline - self.abandon_margin:
                    if s.claimed:
                        continue  # its settlement is in flight: let it land or fail
                    if s.charged:
                        self.total_lost += s.charged
                        log.critical(
                            "session %s abandoned: %d units unsettled at its permit deadline",
                            session_tag(s.session_id),
                            s.charged,
                        )
                    self.abandoned += 1
                    self._tombstone(s, State.ABANDONED, 0)
                elif s.state is State.OPEN:
                    if now >= s.deadline - self.settle_margin:
                        self._due(s, "deadline")
                    elif s.in_flight:
                        continue
                    elif s.exhausted:
                        self._due(s, "exhausted")
                    elif now - s.last_activity >= self.idle_timeout:
                        self._due(s, "idle")
            return self._claim(now, force=False)

    async def close_all(self) -> list[DueSettlement]:
        """Shutdown: close every open session for serving and hand out everything owed."""
        async with self.lock:
            for s in list(self._sessions.values()):
                if s.state is State.OPEN:
                    self._due(s, "shutdown")
            return self._claim(self.clock(), force=True)

    def _claim(self, now: float, *, force: bool) -> list[DueSettlement]:
        """Hand out queued sessions whose requests have all committed (or that cannot wait:
        near the deadline, or ``force``); zero-cost ones are dropped instead."""
        out = []
        for s in list(self._sessions.values()):
            if s.state is not State.SETTLING or s.claimed:
                continue
            if s.in_flight and not force and now < s.deadline - self.settle_margin:
                continue  # let its in-flight requests commit first
            if s.charged == 0:
                self.dropped += 1
                self._tombstone(s, State.DROPPED, 0)
                continue
            s.claimed = True
            s.settle_attempts += 1
            out.append(DueSettlement(s.session_id, s.payer, s.charged, s.reason or "", s.deadline))
        return out

    async def mark_settled(self, session_id: str, amount: int) -> bool:
        """Record the settlement; True the first time, False (a no-op) after."""
        _as_amount(amount, "amount")
        async with self.lock:
            tomb = self._tombstones.get(session_id)
            if tomb is not None and tomb[0] is State.SETTLED:
                self.duplicate_settles += 1
                return False
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(f"no session {session_id} to mark settled")
            if s.state is not State.SETTLING:
                raise LedgerError(f"session {session_id} is not being settled")
            if amount != s.charged:
                log.warning(
                    "session %s settled %d, ledger says %d",
                    session_tag(session_id),
                    amount,
                    s.charged,
                )
            self.total_settled += amount
            self._tombstone(s, State.SETTLED, amount)
            return True

    async def settle_failed(self, session_id: str) -> None:
        """Put a claimed session back in the queue (the next round retries it)."""
        async with self.lock:
            s = self._sessions.get(session_id)
            if s is not None and s.state is State.SETTLING:
                s.claimed = False


class _Reserving:
    """``await`` it for a ``Reservation``, or use it as an async context manager."""

    def __init__(self, ledger: SessionLedger, session_id: str, payer: str, amount: int) -> None:
        self._ledger = ledger
        self._args = (session_id, payer, amount)
        self._r: Reservation | None = None

    def __await__(self) -> Generator[Any, None, Reservation]:
        return self._ledger._reserve(*self._args).__await__()

    async def __aenter__(self) -> Reservation:
        self._r = await self._ledger._reserve(*self._args)
        return self._r

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._r is not None and not self._r.done:
            with trio.CancelScope(shield=True):  # a cancelled request must not leak its hold
                await self._ledger.release(self._r)
