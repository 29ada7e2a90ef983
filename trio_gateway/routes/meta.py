"""``/health``, ``/signing-key``, ``/heartbeat/status``, ``/v1/models``: what a client checks
before trusting us."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint
from quart_schema import document_response, tag

from .. import __version__
from ..ohttp_keys import hpke_block
from ..signing.heartbeat import disabled_status
from . import app_state

bp = Blueprint("meta", __name__)


class SigningKey(BaseModel):
    public_key: str = Field(description="PEM SubjectPublicKeyInfo, RSA-2048")
    tee_id: str = Field(description="0x + keccak256(DER public key)")
    wallet_address: str | None = Field(description="not kept: always null")
    timestamp: str
    enclave_info: dict[str, str]
    measurements: dict[str, str] | None
    signature_scheme: str
    hpke: dict[str, Any] = Field(
        description="the OHTTP key config (primary key), signed by the enclave key: "
        "signature over signature_hash = keccak256(keccak256('OPENGRADIENT_TEE_OHTTP_CONFIG_V1') "
        "|| tee_id || u256(key_id) || u256(kem_id) || u256(kdf_id) || u256(aead_id) "
        "|| keccak256(public_key) || keccak256(key_config))"
    )


class HeartbeatStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the service's status() and this stay in step

    enabled: bool = Field(description="false until /v1/keys configured a heartbeat")
    running: bool = Field(description="the heartbeat loop is alive (sending or waiting)")
    tee_id: str = Field(description="0x + keccak256(DER public key): the id the heartbeat signs")
    registry: str | None = Field(description="the TEE registry contract address")
    wallet: str | None = Field(description="we keep no wallet: always null")
    relay_mode: str = Field(description='always "facilitator": it relays the transaction')
    facilitator_url: str | None = Field(description="without user info or query")
    heartbeat_endpoint: str | None
    interval_seconds: float | None
    timestamp_buffer_seconds: int | None = Field(
        description="the signed timestamp is the wall clock minus this"
    )
    total_sent: int = Field(description="heartbeats the facilitator confirmed with a txHash")
    total_errors: int = Field(description="heartbeats that failed after every attempt")
    consecutive_failures: int
    attempts: int = Field(description="POSTs to the facilitator, retries included")
    failed_attempts: int
    last_success_timestamp: int | None = Field(description="Unix time of the last confirmation")
    last_heartbeat_timestamp: int | None = Field(
        description="the (backdated) timestamp signed in the last confirmed heartbeat"
    )
    last_tx_hash: str | None
    last_error: str | None = Field(description="the last failed heartbeat's reason (trimmed)")
    next_due_in: float | None = Field(description="seconds until the next heartbeat")


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@bp.get("/health")
@tag(["meta"])
async def health() -> tuple[dict[str, Any], int]:
    """200 while serving; 503 with status DRAINING after SIGTERM (take it out of rotation)."""
    st = app_state()
    body: dict[str, Any] = {
        "status": "DRAINING" if st.draining else "OK",
        "draining": st.draining,
        "in_flight": st.relay.in_flight,
        "version": __version__,
        "tee_enabled": not st.settings.dev,
        "dev_mode": st.settings.dev,
        "ready": st.ready,
        "providers": sorted(st.provider_keys.keys),
        "keys_installed": st.provider_keys.installed,
        "uptime_seconds": round(time.time() - st.started_at, 3),
    }
    if st.usage_log is not None:
        body["usage"] = st.usage_log.snapshot()
    body["payments"] = st.payments.status() if st.payments is not None else {"enabled": False}
    body["ohttp"] = st.ohttp.status()  # key rotation, anti-replay cache counters
    return body, 503 if st.draining else 200


@bp.get("/signing-key")
@tag(["meta"])
@document_response(SigningKey)
async def signing_key() -> dict[str, Any]:
    st = app_state()
    return {
        "public_key": st.key.public_pem,
        "tee_id": st.key.tee_id,
        "wallet_address": None,
        "timestamp": datetime.now(UTC).isoformat(),
        "enclave_info": {
            "platform": "dev" if st.settings.dev else "aws-nitro",
            "instance_type": "dev-mode" if st.settings.dev else "tee-enabled",
            "version": __version__,
        },
        "measurements": None,
        "signature_scheme": "RSASSA-PSS(SHA-256, MGF1-SHA-256, salt=32) over "
        "keccak256(request_hash || output_hash || uint256_be(timestamp))",
        "hpke": hpke_block(st.ohttp, st.key),
    }


@bp.get("/heartbeat/status")
@tag(["meta"])
@document_response(HeartbeatStatus)
async def heartbeat_status() -> dict[str, Any]:
    """The signed heartbeat's counters. Always 200: without a configured heartbeat the answer
    says ``enabled: false, running: false`` and still carries ``tee_id``, so a monitor can tell
    "not configured" from "configured but failing" (``total_errors``, ``last_error``) without
    treating a 404 as either."""
    st = app_state()
    raw = st.heartbeat.status() if st.heartbeat is not None else disabled_status(st.key.tee_id)
    return HeartbeatStatus.model_validate(raw).model_dump()


@bp.get("/v1/models")
@tag(["models"])
@document_response(ModelList)
async def list_models() -> dict[str, Any]:
    st = app_state()
    return {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
            for m in st.registry
        ],
    }
