"""``POST /v1/keys``: one-time injection of provider keys and configuration, loopback only.

The peer is the TCP peer address Hypercorn saw (``scope["client"]``), never a header: nitriding
proxies public traffic from 127.0.0.1 too, so in an enclave the operator must reach this through
the host's loopback-only port forward to :8000 (see SECURITY.md). Checks in order: loopback (403),
already initialised (409), body (400); the install itself has no await, so it is atomic.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator
from quart import Blueprint, request
from quart_schema import document_request, tag

from ..api.errors import GatewayError, InvalidRequest
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
    heartbeat_contract_address: StrictStr | None = Field(None, max_length=64)
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


@bp.post("/v1/keys")
@tag(["operator"])
@document_request(KeysRequest)
async def install_keys() -> dict[str, Any]:
    st = app_state()
    client = request.scope.get("client")
    peer = client[0] if client else None
    if not _is_loopback(peer):
        raise GatewayError(
            "key injection is accepted from the loopback interface only",
            status=403,
            type="permission_error",
            code="not_loopback",
        )
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
    if st.provider_keys.installed:  # re-check: json_body() awaited
        raise GatewayError(
            "Provider keys have already been initialized", status=409, code="already_initialized"
        )
    # All checks passed: install in one step (no await between here and the flag).
    st.provider_keys.keys = dict(new)
    st.provider_keys.installed = True
    log.info("provider keys installed for: %s", ", ".join(sorted(new)))
    return {
        "status": "ok",
        "providers_initialized": sorted(new),
        "heartbeat_enabled": False,
    }
