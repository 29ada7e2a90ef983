"""x402 v2 ``upto`` payments for the inference routes: our Quart-Trio adapter over the SDK core.

The SDK's Flask/FastAPI middlewares buffer the body and use asyncio primitives, so the gateway
drives ``x402ResourceServer`` (the framework-agnostic core) itself:

* **Challenge.** One ``upto`` option (configured network, the asset with its EIP-712 name and
  version, ``assetTransferMethod: permit2``, the facilitator address from ``/supported``) whose
  ``amount`` is the session cap. A 402 carries ``PAYMENT-REQUIRED`` (base64 JSON, x402Version 2)
  and an OpenAI-shaped JSON body with code ``payment_required``.
* **Payment.** ``PAYMENT-SIGNATURE`` is decoded locally and matched against the offered
  requirements; the facilitator ``/verify`` (bounded by ``verify_timeout``) checks the Permit2
  signature, allowance and balance. A verified permit opens a ledger session (cap = the permit
  amount, deadline = the permit deadline) bound to the payer; its id goes back in
  ``X-Upto-Session``.
* **Session hits never call the facilitator**: a request carrying ``X-Upto-Session`` (or the very
  same ``PAYMENT-SIGNATURE`` bytes again) reserves on the existing session. Session ids are
  256-bit random secrets handed only to the payer; a ``PAYMENT-SIGNATURE`` sent with a session
  must name the same payer.
* **Reservation.** Before the relay runs, the request's worst case
  (``pricing.worst_case_cost`` at the current ``PriceFeed`` price) is reserved and registered
  with the ``SettlingMeter``; the relay's shielded metering hook commits the actual cost.
* **Settlement.** ``reconcile`` (an app-nursery service under ``supervise``) settles
  ``ledger.due_for_settlement()`` through the facilitator with ``settlement amount = charged``,
  each call shielded and bounded, failures retried with backoff. When cancelled (shutdown) it
  settles everything ``close_all()`` hands out, shielded, within ``shutdown_timeout``.
* **Asynchronous settle jobs** (``settle_jobs``): a ``202``/job-id answer is not a settlement.
  The job is polled (``GET /settle/<jobId>``, backoff, inside the same shielded settle deadline);
  ``succeeded`` settles with the job's transaction, ``failed``/``not_found`` keep the debt and the
  next round re-drives the settle, and a job still pending at the deadline is remembered so the
  next round polls it again instead of settling twice.

Only sync callables are given to the SDK (async price callbacks break under trio), and the one
blocking SDK call (``initialize()``: ``GET /supported`` with a sync client) runs in a worker
thread with a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, cast

import trio
from x402 import x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.http.utils import decode_payment_signature_header, encode_payment_required_header
from x402.schemas import (
    AssetAmount,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirements,
    ResourceConfig,
    ResourceInfo,
)

from ..api.errors import GatewayError
from ..providers.base import ModelInfo
from .ledger import (
    InsufficientBudget,
    LedgerError,
    PayerLimit,
    PayerMismatch,
    Reservation,
    SessionExpiring,
    SessionLedger,
    session_tag,
)
from .meter import SettlingMeter
from .price_feed import PriceFeed, PriceUnavailable
from .pricing import OPG_DECIMALS, PricingError, estimate_prompt_tokens, worst_case_cost
from .settle_jobs import (
    JobAwareFacilitatorClient,
    JobState,
    SettleJobAccepted,
    SettleJobClient,
    poll_settle_job,
)

with warnings.catch_warnings():
    # x402's EVM mechanisms import web3, whose legacy websocket provider imports the deprecated
    # ``websockets.legacy`` (a DeprecationWarning at import; we never use that provider).
    warnings.filterwarnings(
        "ignore", message=r"websockets\.legacy is deprecated", category=DeprecationWarning
    )
    from x402.mechanisms.evm.upto import UptoEvmServerScheme

log = logging.getLogger("trio_gateway.payments.x402")

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
SESSION_HEADER = "X-Upto-Session"
OPG_ADDRESS = "0xFbC2051AE2265686a469421b2C5A2D5462FbF5eB"
BASE_MAINNET = "eip155:8453"
MAX_HEADER = 16 * 1024


@dataclass(frozen=True)
class PaymentSettings:
    """What the operator configures (``/v1/keys`` in production, flags with ``--dev``)."""

    facilitator_url: str
    pay_to: str
    network: str = BASE_MAINNET
    asset: str = OPG_ADDRESS
    decimals: int = OPG_DECIMALS
    asset_name: str = "OpenGradient"
    asset_version: str = "1"
    session_cap: int = 10**18  # base units a permit authorises (the upto max)
    max_timeout_seconds: int = 3600  # permit validity; must exceed the ledger's serve margin
    verify_timeout: float = 10.0
    settle_timeout: float = 30.0
    init_timeout: float = 15.0
    reconcile_interval: float = 5.0
    # a reservation whose request never reached the relay is released after this long; it must
    # exceed the relay's longest life (state.build_payments derives it from the deadlines)
    orphan_after: float = 1200.0
    max_backoff: float = 60.0
    shutdown_timeout: float = 30.0
    # 402 amplification: at most this many facilitator verifies at once (503 beyond), and a
    # payment header the facilitator rejected is refused without asking again for this long
    max_concurrent_verifies: int = 32
    rejected_memory_seconds: float = 600.0


class FacilitatorClient(Protocol):
    """What ``x402ResourceServer`` needs: the HTTP client, or an in-process facilitator."""

    async def verify(self, payload: Any, requirements: Any) -> Any: ...

    async def settle(self, payload: Any, requirements: Any) -> Any: ...

    def get_supported(self) -> Any: ...


class PaymentRequiredError(GatewayError):
    """A 402 with the ``PAYMENT-REQUIRED`` challenge header (rendered by the app's handler)."""

    status = 402
    type = "invalid_request_error"

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message, code="payment_required")
        self.headers = {PAYMENT_REQUIRED: challenge, "Cache-Control": "no-store"}


@dataclass
class _Permit:
    payload: PaymentPayload
    requirements: PaymentRequirements
    payer: str


@dataclass
class Admission:
    """A paid request, admitted: the session to echo and the meter registration to undo."""

    session_id: str
    reservation: Reservation
    price_usd: Decimal


@dataclass
class Stats:
    verifies: int = 0
    verify_failures: int = 0
    verify_failures_cached: int = 0  # refused without a facilitator call (rejected before)
    verify_busy: int = 0  # 503: too many verifies in flight
    facilitator_errors: int = 0
    session_hits: int = 0
    sessions_opened: int = 0
    settles: int = 0
    settle_failures: int = 0
    settled_units: int = 0
    settle_jobs: int = 0  # settles the facilitator accepted as asynchronous jobs
    settle_jobs_failed: int = 0  # jobs that ended failed or not_found (then re-driven)
    extra: dict[str, int] = field(default_factory=dict)


def _printable(value: object, limit: int = 200) -> str:
    """A facilitator-controlled string for a log line: truncated, non-ASCII and control
    characters escaped, so it cannot forge or split log lines (SECURITY F11)."""
    text = "" if value is None else str(value)
    return ascii(text[:limit])[1:-1] + ("…" if len(text) > limit else "")


def _norm(addr: str) -> str:
    return addr.lower()


def _header_key(value: str) -> str:
    return hashlib.sha256(value.encode("latin1", "replace")).hexdigest()


class X402Gate:
    def __init__(
        self,
        settings: PaymentSettings,
        ledger: SessionLedger,
        meter: SettlingMeter,
        feed: PriceFeed,
        *,
        facilitator: FacilitatorClient | None = None,
        remember: int = 100_000,
    ) -> None:
        if settings.max_timeout_seconds <= ledger.serve_margin:
            raise ValueError("max_timeout_seconds must exceed the ledger's serve margin")
        self.settings = settings
        self.ledger = ledger
        self.meter = meter
        self.feed = feed
        self._own_client: HTTPFacilitatorClient | None = None
        if facilitator is None:
            self._own_client = JobAwareFacilitatorClient(
                FacilitatorConfig(url=settings.facilitator_url, timeout=settings.settle_timeout)
            )
            facilitator = self._own_client
        self.facilitator = facilitator
        self.server = x402ResourceServer(facilitator)
        scheme: Any = UptoEvmServerScheme()  # type: ignore[no-untyped-call]
        self.server.register(settings.network, scheme)
        self.requirements: PaymentRequirements | None = None
        self._challenges: dict[str, str] = {}
        self._permits: dict[str, _Permit] = {}  # session id -> the verified permit
        self._by_header: OrderedDict[str, str] = OrderedDict()  # sha256(header) -> session id
        self._by_nonce: OrderedDict[tuple[str, str], str] = OrderedDict()  # (payer, nonce) -> sid
        self._opening: dict[tuple[str, str], trio.Event] = {}  # permits being verified/opened
        self._rejected: OrderedDict[str, float] = OrderedDict()  # header key -> refuse until
        self._verify_slots = trio.Semaphore(settings.max_concurrent_verifies)
        self._remember = remember
        self.stats = Stats()
        self.initialized = False
        self.last_settle_error: str | None = None
        self.last_settle_tx: str | None = None
        self._jobs: dict[str, str] = {}  # session id -> its pending settle job
        # sessions with a settle attempt whose outcome we never learned (timeout, transport
        # error): only for these may a later "nonce already used" mean our own settle landed
        self._uncertain: set[str] = set()

    # -- start-up -------------------------------------------------------------------------------

    async def initialize(self) -> None:
        """``GET /supported`` (blocking, in a thread, with a deadline) and the requirements."""
        with trio.fail_after(self.settings.init_timeout):
            await trio.to_thread.run_sync(self.server.initialize, abandon_on_cancel=True)
        s = self.settings
        price = AssetAmount(
            amount=str(s.session_cap),
            asset=s.asset,
            extra={"name": s.asset_name, "version": s.asset_version},
        )
        reqs = self.server.build_payment_requirements(
            ResourceConfig(
                scheme="upto",
                network=s.network,
                pay_to=s.pay_to,
                price=price,
                max_timeout_seconds=s.max_timeout_seconds,
            )
        )
        if len(reqs) != 1 or reqs[0].extra.get("assetTransferMethod") != "permit2":
            raise RuntimeError("the facilitator did not offer upto/permit2 on the network")
        self.requirements = reqs[0]
        self.initialized = True

    async def aclose(self) -> None:
        if self._own_client is not None:
            await self._own_client.aclose()

    # -- the challenge --------------------------------------------------------------------------

    async def challenge(self, url: str, path: str) -> str:
        cached = self._challenges.get(url)  # keyed by the full URL: Host is client-chosen
        if cached is not None:
            return cached
        assert self.requirements is not None
        pr: PaymentRequired = await self.server.create_payment_required_response(
            [self.requirements],
            ResourceInfo(
                url=url,
                description="Chat completion" if "chat" in path else "Completion",
                mime_type="application/json",
            ),
            "Payment required",
        )
        value = encode_payment_required_header(pr)
        if len(self._challenges) < 16:
            self._challenges[url] = value
        return value

    async def _refuse(self, message: str, url: str, path: str) -> PaymentRequiredError:
        return PaymentRequiredError(message, await self.challenge(url, path))

    # -- admission ------------------------------------------------------------------------------

    def price(self) -> Decimal:
        try:
            return self.feed.price()
        except PriceUnavailable as exc:
            raise GatewayError(
                f"Pricing unavailable: {exc}",
                status=503,
                type="server_error",
                code="pricing_unavailable",
            ) from None

    async def admit(
        self,
        header: Callable[[str], str | None],
        *,
        url: str,
        path: str,
        request_id: str,
        model: ModelInfo,
        request_size: int,
        max_output: int | None,
    ) -> Admission:
        """Price, authorise and reserve one request (raises a 402/503/400 ``GatewayError``)."""
        price = self.price()
        try:
            worst = worst_case_cost(
                model,
                estimate_prompt_tokens(request_size),
                max_output,
                price,
                decimals=self.settings.decimals,
            )
        except PricingError as exc:
            raise GatewayError(
                str(exc), status=400, type="invalid_request_error", code="unpriceable_request"
            ) from None
        if worst > self.settings.session_cap:
            raise GatewayError(
                "The worst-case cost of this request exceeds the payment cap: lower max_tokens.",
                status=400,
                type="invalid_request_error",
                param="max_tokens",
                code="request_exceeds_payment_cap",
            )
        sid_hdr = (header(SESSION_HEADER) or "").strip()
        pay_hdr = (header(PAYMENT_SIGNATURE) or "").strip()
        if len(pay_hdr) > MAX_HEADER or len(sid_hdr) > 256:
            raise await self._refuse("Payment header too large.", url, path)
        sid: str | None = None
        if sid_hdr:
            sid = sid_hdr if sid_hdr in self._permits else None
            if sid is None:
                raise await self._refuse("Session expired or exhausted.", url, path)
            if pay_hdr and self._by_header.get(_header_key(pay_hdr)) != sid:
                payer = self._payer_of(pay_hdr)
                if payer is None or payer != self._permits[sid].payer:
                    raise await self._refuse("The payment does not match the session.", url, path)
            self.stats.session_hits += 1
        elif pay_hdr:
            sid = self._by_header.get(_header_key(pay_hdr))
            if sid is not None:
                self.stats.session_hits += 1
            else:
                sid = await self._verify_and_open(pay_hdr, url, path)
        else:
            raise await self._refuse("Payment required.", url, path)
        permit = self._permits.get(sid)
        if permit is None:  # settled, dropped or abandoned: a replay of a spent payment
            raise await self._refuse("Session expired or exhausted.", url, path)
        try:
            reservation = await self.ledger.reserve(sid, permit.payer, worst)
        except PayerLimit:
            raise await self._refuse(
                "This payer's unsettled charges across its sessions reach the payment cap: "
                "retry once they are settled, or lower max_tokens.",
                url,
                path,
            ) from None
        except InsufficientBudget:
            raise await self._refuse(
                "The session's remaining budget cannot cover this request: sign a new payment.",
                url,
                path,
            ) from None
        except SessionExpiring:
            raise await self._refuse(
                "The payment is about to expire: sign a new one.", url, path
            ) from None
        except PayerMismatch:
            raise await self._refuse("The session belongs to another payer.", url, path) from None
        except LedgerError:
            raise await self._refuse("Session expired or exhausted.", url, path) from None
        try:
            self.meter.register(request_id, reservation, model, request_size, price)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.ledger.release(reservation)
            raise
        return Admission(sid, reservation, price)

    def _payer_of(self, header: str) -> str | None:
        try:
            payload = decode_payment_signature_header(header)
            auth = payload.payload["permit2Authorization"]
            return _norm(str(auth["from"]))
        except Exception:
            return None

    async def _verify_and_open(self, header: str, url: str, path: str) -> str:
        assert self.requirements is not None
        try:
            decoded = decode_payment_signature_header(header)
            if not isinstance(decoded, PaymentPayload):
                raise ValueError("x402 v1 payload")
            auth = decoded.payload["permit2Authorization"]
            nonce = str(int(auth["nonce"]))
            int(auth["deadline"])  # present and an integer (read again when opening)
        except Exception:
            raise await self._refuse(
                "The payment header is not a valid x402 v2 payment.", url, path
            ) from None
        req = self.server.find_matching_requirements([self.requirements], decoded)
        if req is None:
            raise await self._refuse("The payment does not match the offered terms.", url, path)
        # One opening per permit at a time (keyed by the claimed payer and the Permit2 nonce,
        # checked against the verified payer below): without this, k concurrent first uses of
        # one permit each verified and opened a full-cap session of their own, k x cap of
        # service for one permit that settles once. Later ones wait, then find its session.
        claim = (_norm(str(auth["from"])), nonce)
        while (opening := self._opening.get(claim)) is not None:
            await opening.wait()
        existing = self._by_nonce.get(claim)
        if existing is not None:
            permit = self._permits.get(existing)
            if permit is None:  # that permit's session is closed: a replay of a spent payment
                raise await self._refuse("Session expired or exhausted.", url, path)
            if permit.payload == decoded:  # exactly the payment that opened it (signature too)
                self._remember_header(header, existing)
                return existing
            # Same claimed payer and nonce but not the same payload: nothing here is verified
            # yet (the claim could carry a forged signature: SECURITY F15), so verify it first;
            # a valid re-encoding of the same permit then joins the session below.
        done = trio.Event()
        self._opening[claim] = done
        try:
            return await self._verify_and_open_once(header, decoded, req, auth, nonce, url, path)
        finally:
            del self._opening[claim]
            done.set()

    async def _verify_and_open_once(
        self, header: str, decoded: Any, req: Any, auth: Any, nonce: str, url: str, path: str
    ) -> str:
        deadline = int(auth["deadline"])
        hkey = _header_key(header)
        until = self._rejected.get(hkey)
        if until is not None and trio.current_time() < until:
            self.stats.verify_failures_cached += 1  # the facilitator said no already
            raise await self._refuse("Payment rejected.", url, path)
        try:
            self._verify_slots.acquire_nowait()
        except trio.WouldBlock:
            self.stats.verify_busy += 1
            raise GatewayError(
                "Too many payments are being verified; try again shortly.",
                status=503,
                type="server_error",
                code="verify_busy",
            ) from None
        self.stats.verifies += 1
        try:
            with trio.fail_after(self.settings.verify_timeout):
                result = await self.server.verify_payment(decoded, req)
        except Exception as exc:  # transport error, non-200, bad JSON, TooSlowError
            self.stats.facilitator_errors += 1
            log.warning("facilitator verify failed: %s", type(exc).__name__)
            raise GatewayError(
                "The payment facilitator is unavailable; try again later.",
                status=503,
                type="server_error",
                code="facilitator_unavailable",
            ) from None
        finally:
            self._verify_slots.release()
        if not result.is_valid or not result.payer:
            self.stats.verify_failures += 1
            self._rejected[hkey] = trio.current_time() + self.settings.rejected_memory_seconds
            self._rejected.move_to_end(hkey)
            while len(self._rejected) > self._remember:
                self._rejected.popitem(last=False)
            reason = _printable(result.invalid_reason or "invalid_payment", 100)
            raise await self._refuse(f"Payment rejected: {reason}.", url, path)
        payer = _norm(result.payer)
        if payer != _norm(str(auth["from"])):
            raise await self._refuse("Payment rejected: payer mismatch.", url, path)
        key = (payer, nonce)
        existing = self._by_nonce.get(key)
        if existing is not None:  # same permit, differently encoded: the same session
            if existing not in self._permits:
                raise await self._refuse("Session expired or exhausted.", url, path)
            self._remember_header(header, existing)
            return existing
        sid = secrets.token_urlsafe(32)
        try:
            await self.ledger.open_session(sid, payer, int(req.amount), float(deadline))
        except SessionExpiring:
            raise await self._refuse(
                "The payment expires too soon to serve on: sign with a later deadline.", url, path
            ) from None
        except LedgerError:
            raise GatewayError(
                "Too many open payment sessions; try again later.",
                status=503,
                type="server_error",
                code="sessions_full",
            ) from None
        self._permits[sid] = _Permit(decoded, req, payer)
        self._by_nonce[key] = sid
        while len(self._by_nonce) > self._remember:
            self._by_nonce.popitem(last=False)
        self._remember_header(header, sid)
        self.stats.sessions_opened += 1
        return sid

    def _remember_header(self, header: str, sid: str) -> None:
        self._by_header[_header_key(header)] = sid
        while len(self._by_header) > self._remember:
            self._by_header.popitem(last=False)

    async def abandon(self, request_id: str) -> None:
        await self.meter.abandon(request_id)

    # -- settlement -----------------------------------------------------------------------------

    async def settle_one(self, session_id: str, amount: int, *, deadline: float = math.inf) -> bool:
        """Settle one claimed session (shielded, bounded by ``settle_timeout`` and by
        ``deadline``, an absolute trio time). True when it is final."""
        permit = self._permits.get(session_id)
        if permit is None:
            log.error("no permit for session %s: cannot settle", session_tag(session_id))
            return False
        reqs = permit.requirements.model_copy(update={"amount": str(amount)})
        ok = False
        error: str | None = None
        tx: str | None = None
        with trio.CancelScope(shield=True):
            end = min(trio.current_time() + self.settings.settle_timeout, deadline)
            with trio.move_on_at(end):
                try:
                    job = self._jobs.get(session_id)
                    if job is None:  # no job pending from an earlier round: (re-)drive it
                        try:
                            res = await self.server.settle_payment(permit.payload, reqs)
                            ok = bool(res.success)
                            tx = res.transaction or None
                            error = None if ok else (res.error_reason or "settle_failed")
                        except SettleJobAccepted as acc:
                            job = self._jobs[session_id] = acc.job_id
                            self._uncertain.add(session_id)  # the facilitator went on-chain
                            self.stats.settle_jobs += 1
                            log.info(
                                "session %s: settle accepted as job %s",
                                session_tag(session_id),
                                _printable(job),
                            )
                    if job is not None:
                        ok, tx, error = await self._await_job(session_id, job)
                except Exception as exc:
                    error = type(exc).__name__
                    self._uncertain.add(session_id)  # it may have reached the chain
            if not ok and error is None:
                error = "timeout"  # a job still pending stays in _jobs: next round polls it
                self._uncertain.add(session_id)
            spent = not ok and error is not None and "nonce" in error
            if spent and session_id in self._uncertain:
                # an earlier attempt of ours landed but its answer was lost: final
                log.warning(
                    "session %s already settled on chain (%s)",
                    session_tag(session_id),
                    _printable(error),
                )
                ok = True
            elif spent:
                # the permit was spent without a settle of ours that may have landed: unpaid
                log.critical(
                    "session %s: permit spent elsewhere, %d units unpaid",
                    session_tag(session_id),
                    amount,
                )

            if ok:
                self.stats.settles += 1
                self.stats.settled_units += amount
                self.last_settle_tx = _printable(tx) if tx else None
                log.info(
                    "session %s settled %d (tx %s)", session_tag(session_id), amount, _printable(tx)
                )
                await self.ledger.mark_settled(session_id, amount)
                self._forget(session_id)
            else:
                self.stats.settle_failures += 1
                self.last_settle_error = _printable(error)
                log.warning(
                    "settle of session %s failed: %s", session_tag(session_id), _printable(error)
                )
                await self.ledger.settle_failed(session_id)
        return ok

    async def _await_job(self, session_id: str, job: str) -> tuple[bool, str | None, str | None]:
        """Poll an accepted settle job (bounded by the caller): (settled, tx, error)."""
        if not hasattr(
            self.facilitator, "settle_job_status"
        ):  # cannot happen with our HTTP client; never count it as settled
            self._jobs.pop(session_id, None)
            return False, None, "settle_job_unpollable"
        status = await poll_settle_job(cast(SettleJobClient, self.facilitator), job)
        del self._jobs[session_id]
        if status.state is JobState.SUCCEEDED:
            return True, status.transaction, None
        self.stats.settle_jobs_failed += 1
        log.warning(
            "settle job %s of session %s: %s",
            _printable(job),
            session_tag(session_id),
            status.state.value,
        )
        return False, None, f"settle_job_{status.state.value}: {status.error or ''}".rstrip(": ")

    def _forget(self, session_id: str) -> None:
        self._permits.pop(session_id, None)
        self._jobs.pop(session_id, None)
        self._uncertain.discard(session_id)

    def _drop_closed(self) -> None:
        """Forget permits of sessions the ledger dropped or abandoned (bounded memory)."""
        for sid in [sid for sid in self._permits if self.ledger.get(sid) is None]:
            del self._permits[sid]
            self._jobs.pop(sid, None)
            self._uncertain.discard(sid)

    async def settle_due(self) -> tuple[int, int]:
        """One reconciler round: (settled, failed)."""
        await self.meter.reap_orphans(self.settings.orphan_after)
        due = await self.ledger.due_for_settlement()
        settled = failed = 0
        for i, d in enumerate(due):
            try:  # each settle is shielded: stop between two of them when cancelled (F16)
                await trio.lowlevel.checkpoint_if_cancelled()
            except trio.Cancelled:
                with trio.CancelScope(shield=True):  # unclaimed: still owed, settled later
                    for rest in due[i:]:
                        await self.ledger.settle_failed(rest.session_id)
                raise
            if await self.settle_one(d.session_id, d.amount):
                settled += 1
            else:
                failed += 1
        self._drop_closed()
        return settled, failed

    async def reconcile(self, *, sleep: Callable[[float], Any] = trio.sleep) -> None:
        """The reconciler service: settle due sessions, forever; after a round with failures
        the next one waits twice as long (up to ``max_backoff``). Shutdown settlement is
        ``shutdown()``, called by the app after serving."""
        base = delay = self.settings.reconcile_interval
        while True:
            _, failed = await self.settle_due()
            delay = min(delay * 2, self.settings.max_backoff) if failed else base
            await sleep(delay)

    async def shutdown(self) -> None:
        """Close every session and settle what is owed, within ``shutdown_timeout`` in all
        (each settle is shielded and bounded by what is left of it, SECURITY F4). What cannot
        be settled in time is lost with the process: logged CRITICAL with the amount."""
        end = trio.current_time() + self.settings.shutdown_timeout
        with trio.CancelScope(shield=True), trio.move_on_at(end):
            due = await self.ledger.close_all()
            lost = []
            for d in due:
                if trio.current_time() >= end or not await self.settle_one(
                    d.session_id, d.amount, deadline=end
                ):
                    lost.append(d)
            if lost:  # the process ends with them (F17: every one, however it failed)
                log.critical(
                    "shutdown: %d of %d payment sessions unsettled, %d units lost",
                    len(lost),
                    len(due),
                    sum(d.amount for d in lost),
                )
            elif due:
                log.info("shutdown: settled %d payment sessions", len(due))

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "enabled": True,
            "initialized": self.initialized,
            "network": self.settings.network,
            "asset": self.settings.asset,
            "pay_to": self.settings.pay_to,
            "session_cap": str(self.settings.session_cap),
            "price_feed": self.feed.status(),
            "ledger": self.ledger.status(),
            "meter": self.meter.snapshot(),
            "facilitator": {
                "verifies": s.verifies,
                "verify_failures": s.verify_failures,
                "verify_failures_cached": s.verify_failures_cached,
                "verify_busy": s.verify_busy,
                "errors": s.facilitator_errors,
                "settles": s.settles,
                "settle_failures": s.settle_failures,
                "settled_units": str(s.settled_units),
                "last_settle_error": self.last_settle_error,
                "last_settle_tx": self.last_settle_tx,
                "settle_jobs": s.settle_jobs,
                "settle_jobs_failed": s.settle_jobs_failed,
                "settle_jobs_pending": len(self._jobs),
            },
            "session_hits": s.session_hits,
        }
