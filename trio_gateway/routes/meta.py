"""``/health``, ``/signing-key``, ``/v1/models``: what a client checks before trusting us."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import document_response, tag

from .. import __version__
from ..ohttp_keys import hpke_block
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
async def health() -> dict[str, Any]:
    st = app_state()
    body: dict[str, Any] = {
        "status": "OK",
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
    return body


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
