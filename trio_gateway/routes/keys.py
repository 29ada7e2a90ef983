"""``POST /v1/keys``: one-time injection of provider keys and configuration, loopback only.

Who may call it (checked first, 403 otherwise; see SECURITY.md):

* With an operator listener (``--operator-port``; what ``scripts/start.sh`` runs in an enclave):
  only requests that arrived on that listener, whatever the peer. Inside the enclave nitriding
  proxies every public request to the public listener from 127.0.0.1, so a loopback peer proves
  nothing there; the operator listener is reached only through the host's loopback-only port
  forward (gvproxy, whose address is the peer), and nitriding never proxies to it.
* Without one (dev, a private deployment outside an enclave): a loopback TCP peer
  (``scope["client"]``, never a header) whose request carries no proxy header
  (``X-Forwarded-For``, ``Forwarded``, ``X-Real-IP``: nitriding's proxy always adds the first).

Then: already initialised (409), body (400); the install itself has no await, so it is atomic.

Payments: ``facilitator_url`` + ``pay_to_address`` (+ optional ``network``, CAIP-2) enable x402
``upto`` payments on inference. The facilitator's ``/supported`` is fetched first (in a thread,
bounded); if that fails the answer is 502 and nothing at all is installed, so the operator can
retry. On success the settling meter replaces the relay's meter and the price feed and the
settlement reconciler start in the service host. Without those fields inference stays unpaid.
The whole install runs under ``keys_lock`` (the payment set-up awaits).

Heartbeat: a non-empty ``heartbeat_contract_address`` (0x + 40 hex) starts the signed heartbeat
(``signing/heartbeat.py``) through the request's ``facilitator_url`` (there is no default
facilitator: without one the answer is 400 ``heartbeat_needs_facilitator``), with
``tee_heartbeat_interval`` (default 900 s) and ``tee_heartbeat_buffer`` (default 300 s). Where
unpaid inference is allowed (dev, ``--allow-unpaid``) a ``facilitator_url`` without
``pay_to_address`` serves the heartbeat only; otherwise it is an incomplete payment set-up. The
heartbeat is installed after the payment set-up succeeded, in the same no-await step as the keys.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from quart import Blueprint, request
from quart_schema import document_request, tag

from ..api.errors import GatewayError, InvalidRequest
from ..signing.heartbeat import DEFAULT_INTERVAL, DEFAULT_TIMESTAMP_BUFFER, HeartbeatConfig
from . import app_state, json_body, validate

log = logging.getLogger("trio_gateway.keys")
bp = Blueprint("keys", __name__)

KEY_FIELDS = {
    "openai_api_key": "openai",
    "anthropic_api_key": "anthropic",
    "google_api_key": "google",
    "xai_api_key": "xai",
    "bytedance_api_key": "bytedance",
    "nous_api_key": "nous",
}


class KeysRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    openai_api_key: StrictStr | None = Field(None, max_length=512)
    anthropic_api_key: StrictStr | None = Field(None, max_length=512)
    google_api_key: StrictStr | None = Field(None, max_length=512)
    xai_api_key: StrictStr | None = Field(None, max_length=512)
    bytedance_api_key: StrictStr | None = Field(None, max_length=512)
    nous_api_key: StrictStr | None = Field(None, max_length=512)
    facilitator_url: StrictStr | None = Field(None, max_length=2048)
    pay_to_address: StrictStr | None = Field(None, pattern=r"^0x[0-9a-fA-F]{40}$")
    network: StrictStr | None = Field(None, pattern=r"^eip155:[0-9]{1,12}$")
    heartbeat_contract_address: StrictStr | None = Field(None, pattern=r"^(0x[0-9a-fA-F]{40})?$")
    tee_heartbeat_interval: int | None = Field(None, ge=10, le=86400)
    tee_heartbeat_buffer: int | None = Field(None, ge=0, le=3600)

    @field_validator("tee_heartbeat_interval", "tee_heartbeat_buffer", mode="before")
    @classmethod
    def _numeric_string(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().isdigit():
            return int(v.strip())
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            raise ValueError("must be an integer or a numeric string")
        return v


def _is_loopback(addr: str | None) -> bool:
    if not addr:
        return False
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def _refusal(operator: tuple[str, int] | None, scope: Any, headers: Any) -> tuple[str, str] | None:
    """(code, message) when this request may not inject keys; None when it may."""
    if operator is not None:
        server = scope.get("server")
        if not server or server[1] != operator[1]:
            return (
                "operator_listener_only",
                "key injection is accepted on the operator listener only",
            )
        return None
    client = scope.get("client")
    if not _is_loopback(client[0] if client else None):
        return ("not_loopback", "key injection is accepted from the loopback interface only")
    if any(h in headers for h in PROXY_HEADERS):
        return (
            "proxied",
            "key injection is not accepted through a proxy (in an enclave, use the operator "
            "listener: --operator-port)",
        )
    return None


@bp.post("/v1/keys")
@tag(["operator"])
@document_request(KeysRequest)
async def install_keys() -> dict[str, Any]:
    st = app_state()
    refusal = _refusal(st.operator_endpoint, request.scope, request.headers)
    if refusal is not None:
        raise GatewayError(refusal[1], status=403, type="permission_error", code=refusal[0])
    if st.provider_keys.installed:
        raise GatewayError(
            "Provider keys have already been initialized",
            status=409,
            type="invalid_request_error",
            code="already_initialized",
        )
    raw = await json_body()
    if not raw:
        raise InvalidRequest("JSON body required", code="empty_body")
    body = validate(KeysRequest, raw)
    new = {
        provider: value for field, provider in KEY_FIELDS.items() if (value := getattr(body, field))
    }
    if not new:
        raise InvalidRequest("at least one provider API key is required", code="no_keys")
    unsupported = sorted(p for p in new if p not in st.providers)
    if unsupported:
        raise InvalidRequest(
            f"this gateway build has no adapter for: {', '.join(unsupported)}",
            code="unsupported_provider",
        )
    unpaid_allowed = st.settings.dev or st.settings.allow_unpaid
    wants_heartbeat = bool(body.heartbeat_contract_address)
    # a facilitator without pay_to serves the heartbeat only, and only where unpaid is allowed
    heartbeat_only = wants_heartbeat and unpaid_allowed and not body.pay_to_address
    wants_payments = bool(body.pay_to_address) or (
        bool(body.facilitator_url) and not heartbeat_only
    )
    if not wants_payments and not unpaid_allowed:
        raise InvalidRequest(
            "production inference is paid: facilitator_url and pay_to_address are required "
            "(or start the gateway with --allow-unpaid for a private deployment)",
            code="payments_required",
        )
    if wants_payments and not (body.facilitator_url and body.pay_to_address):
        raise InvalidRequest(
            "payments need both facilitator_url and pay_to_address", code="incomplete_payments"
        )
    if body.facilitator_url and not body.facilitator_url.startswith(("http://", "https://")):
        raise InvalidRequest(
            "facilitator_url must be an http(s) URL", param="facilitator_url", code="invalid_value"
        )
    heartbeat: HeartbeatConfig | None = None
    if wants_heartbeat:
        if not body.facilitator_url:
            raise InvalidRequest(
                "the heartbeat is relayed by the facilitator: facilitator_url is required",
                param="facilitator_url",
                code="heartbeat_needs_facilitator",
            )
        assert body.heartbeat_contract_address
        try:
            heartbeat = HeartbeatConfig(
                contract_address=body.heartbeat_contract_address,
                facilitator_url=body.facilitator_url,
                interval=float(body.tee_heartbeat_interval or DEFAULT_INTERVAL),
                timestamp_buffer=(
                    DEFAULT_TIMESTAMP_BUFFER
                    if body.tee_heartbeat_buffer is None
                    else body.tee_heartbeat_buffer
                ),
            )
        except ValueError as exc:
            raise InvalidRequest(f"heartbeat: {exc}", code="invalid_value") from None
    async with st.keys_lock:  # the payment set-up awaits: one installer at a time
        if st.provider_keys.installed:  # re-check: json_body() awaited
            raise GatewayError(
                "Provider keys have already been initialized",
                status=409,
                code="already_initialized",
            )
        needs_services = (wants_payments and st.payments is None) or heartbeat is not None
        if needs_services and not st.service_host.running:  # never half-install
            raise GatewayError(
                "the gateway is not serving yet (or shutting down); retry",
                status=503,
                type="service_unavailable",
                code="not_serving",
            )
        if wants_payments and st.payments is None:
            assert body.facilitator_url and body.pay_to_address
            gate = st.build_payment_gate(
                st.payment_settings(body.facilitator_url, body.pay_to_address, body.network)
            )
            try:
                await gate.initialize()  # GET /supported, in a thread, bounded
            except BaseException as exc:  # incl. the operator hanging up: close what we opened
                with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                    await gate.aclose()
                    await gate.feed.client.aclose()
                if not isinstance(exc, Exception):
                    raise
                log.error("payment facilitator set-up failed (%s)", type(exc).__name__)
                raise GatewayError(
                    "the payment facilitator could not be reached or does not support upto "
                    "on this network; nothing was installed",
                    status=502,
                    code="facilitator_unavailable",
                ) from None
            for name, service in st.enable_payments(gate).items():
                st.service_host.start(name, service)
            log.info("x402 payments enabled on %s", gate.settings.network)
        # All checks passed: install in one step (no await between here and the flag).
        if heartbeat is not None and st.heartbeat is None:
            for name, service in st.enable_heartbeat(heartbeat).items():
                st.service_host.start(name, service)
            log.info("heartbeat enabled every %g s", heartbeat.interval)
        st.provider_keys.keys = dict(new)
        st.provider_keys.installed = True
    log.info("provider keys installed for: %s", ", ".join(sorted(new)))
    out: dict[str, Any] = {
        "status": "ok",
        "providers_initialized": sorted(new),
        "heartbeat_enabled": st.heartbeat is not None,
    }
    if st.payments is not None:
        out["payments_enabled"] = True
    return out
