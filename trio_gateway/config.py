"""Settings, validated once at start-up (pydantic-settings).

Every field can be set by CLI flag (see ``python -m trio_gateway --help``) or environment variable.
Gateway settings use the ``TRIO_GATEWAY_`` prefix; provider base URLs and (dev-mode) keys use the
names the official SDKs use (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``, ``ANTHROPIC_BASE_URL``, …),
so the gateway can be pointed at a mock provider the same way an SDK can.
"""

from __future__ import annotations

from typing import Self

from pydantic import AliasChoices, BaseModel, Field, HttpUrl, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROVIDERS = ("openai", "anthropic", "google", "xai", "bytedance", "nous")


class Deadlines(BaseModel):
    """Every wait in the relay has one of these; all in seconds."""

    connect: float = Field(10.0, gt=0, description="TCP+TLS connect to the provider")
    first_byte: float = Field(120.0, gt=0, description="request sent → first upstream event")
    idle: float = Field(120.0, gt=0, description="gap between two upstream events")
    total: float = Field(900.0, gt=0, description="whole upstream call")
    client_stall: float = Field(30.0, gt=0, description="client not accepting bytes")
    keepalive: float = Field(15.0, gt=0, description="SSE comment when nothing else was sent")
    sign: float = Field(2.0, gt=0, description="shielded signing step")
    settle: float = Field(10.0, gt=0, description="shielded metering/settlement step")
    pool: float = Field(5.0, gt=0, description="waiting for a free upstream connection")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIO_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    dev: bool = Field(False, description="dev mode: embedded mock model, env keys, no nitriding")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    operator_host: str = Field(
        "0.0.0.0",
        description="address of the operator listener (only with operator_port)",
    )
    operator_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a second listener, the only place POST /v1/keys is accepted: in an enclave "
        "it is reached through the host's loopback-only port forward, never through nitriding",
    )
    max_body_bytes: int = Field(20 << 20, gt=0, description="request body cap (413 above)")
    max_upstream_connections: int = Field(1024, gt=0)
    max_keepalive_connections: int = Field(128, ge=0)
    deadlines: Deadlines = Deadlines()
    mock_token_delay_ms: float = Field(20.0, ge=0, description="dev mock: delay between tokens")
    nitriding: bool = Field(True, description="register the key with nitriding (off in dev)")
    nitriding_url: HttpUrl = HttpUrl("http://127.0.0.1:8080")
    nitriding_timeout: float = Field(10.0, gt=0)
    log_level: str = "INFO"
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="SIGTERM: in-flight requests may finish for this long; then they end with a "
        "'shutting_down' error, open payment sessions are settled and the process exits",
    )
    ohttp_rfc9458_test_key: bool = Field(
        False,
        description="dev only: also serve the RFC 9458 Appendix A OHTTP key as key_id 1",
    )
    ohttp_keys_max_age: int = Field(
        60, ge=0, description="Cache-Control max-age of GET /ohttp-keys (seconds)"
    )
    ohttp_replay_window: float = Field(
        600.0,
        gt=0,
        description="OHTTP anti-replay: each decrypted request's (key_id, enc) is remembered this "
        "long (seconds); OHTTP keys rotate every window - ohttp_key_overlap seconds, so no key "
        "outlives the window",
    )
    ohttp_replay_max_entries: int = Field(
        1_000_000,
        gt=0,
        description="OHTTP anti-replay cache size (~110 bytes each); when full, new OHTTP "
        "requests are refused (inner 503) until entries expire",
    )
    ohttp_key_overlap: float = Field(
        120.0,
        gt=0,
        description="a replaced OHTTP key still decrypts this long (seconds); must exceed "
        "ohttp_keys_max_age and be at most half of ohttp_replay_window",
    )
    env_keys_ignored: bool = Field(False, exclude=True)

    # x402 payments. Production: enabled by POST /v1/keys (facilitator_url + pay_to_address);
    # dev: only with --payments and both settings. Off otherwise (inference is free, as before).
    payments: bool = Field(False, description="dev only: require x402 upto payments")
    allow_unpaid: bool = Field(
        False,
        description="production without payments (a private deployment): /v1/keys then accepts "
        "provider keys without a facilitator. Off by default: never an unpaid public path.",
    )
    facilitator_url: str | None = Field(None, description="x402 facilitator base URL")
    pay_to_address: str | None = Field(None, description="EVM address that receives payments")
    payment_network: str = Field("eip155:8453", description="CAIP-2 network of the payments")
    payment_asset: str = Field(
        "0xFbC2051AE2265686a469421b2C5A2D5462FbF5eB", description="ERC-20 paid in (OPG)"
    )
    payment_asset_decimals: int = Field(18, ge=0, le=36)
    payment_asset_name: str = Field("OpenGradient", description="the asset's EIP-712 name")
    payment_asset_version: str = Field("1", description="the asset's EIP-712 version")
    payment_session_cap: int = Field(10**18, gt=0, description="upto max per permit (units)")
    payment_max_timeout: int = Field(3600, gt=420, description="permit validity (seconds)")
    price_feed_url: str | None = Field(None, description="CoinGecko-compatible OPG/USD URL")
    price_feed_refresh: float = Field(300.0, gt=0, description="price refresh interval (s)")

    # Provider base URLs, under the names the official SDKs read.
    openai_base_url: HttpUrl = Field(
        HttpUrl("https://api.openai.com/v1"),
        validation_alias=AliasChoices("openai_base_url", "OPENAI_BASE_URL"),
    )
    anthropic_base_url: HttpUrl = Field(
        HttpUrl("https://api.anthropic.com"),
        validation_alias=AliasChoices("anthropic_base_url", "ANTHROPIC_BASE_URL"),
    )
    google_base_url: HttpUrl = Field(
        HttpUrl("https://generativelanguage.googleapis.com"),
        validation_alias=AliasChoices(
            "google_base_url", "GOOGLE_GEMINI_BASE_URL", "GEMINI_BASE_URL"
        ),
    )
    xai_base_url: HttpUrl = Field(
        HttpUrl("https://api.x.ai/v1"),
        validation_alias=AliasChoices("xai_base_url", "XAI_BASE_URL"),
    )
    bytedance_base_url: HttpUrl = Field(
        HttpUrl("https://ark.ap-southeast.bytepluses.com/api/v3"),
        validation_alias=AliasChoices("bytedance_base_url", "ARK_BASE_URL"),
    )
    nous_base_url: HttpUrl = Field(
        HttpUrl("https://inference-api.nousresearch.com/v1"),
        validation_alias=AliasChoices("nous_base_url", "NOUS_BASE_URL"),
    )
    # Provider keys from the environment: read in --dev only (production: POST /v1/keys).
    openai_api_key: str | None = Field(
        None, validation_alias=AliasChoices("openai_api_key", "OPENAI_API_KEY"), repr=False
    )
    anthropic_api_key: str | None = Field(
        None, validation_alias=AliasChoices("anthropic_api_key", "ANTHROPIC_API_KEY"), repr=False
    )
    google_api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("google_api_key", "GEMINI_API_KEY", "GOOGLE_API_KEY"),
        repr=False,
    )
    xai_api_key: str | None = Field(
        None, validation_alias=AliasChoices("xai_api_key", "XAI_API_KEY"), repr=False
    )
    bytedance_api_key: str | None = Field(
        None, validation_alias=AliasChoices("bytedance_api_key", "ARK_API_KEY"), repr=False
    )
    nous_api_key: str | None = Field(
        None, validation_alias=AliasChoices("nous_api_key", "NOUS_API_KEY"), repr=False
    )

    def env_keys(self) -> dict[str, str]:
        """Provider → key, from the environment (used in --dev only)."""
        out: dict[str, str] = {}
        for provider in PROVIDERS:
            key = getattr(self, f"{provider}_api_key")
            if key:
                out[provider] = key
        return out

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.ohttp_rfc9458_test_key and not self.dev:
            raise ValueError(
                "--ohttp-rfc9458-test-key serves a published private key: only allowed with --dev"
            )
        if self.payments:
            if not self.dev:
                raise ValueError(
                    "--payments is a dev-mode switch: production payments are configured "
                    "through POST /v1/keys"
                )
            if not (self.facilitator_url and self.pay_to_address):
                raise ValueError("--payments needs --facilitator-url and --pay-to-address")
        if self.dev:
            self.nitriding = False
        elif self.env_keys():
            # Production keys arrive once, over loopback, through POST /v1/keys; an env key would
            # bypass the operator's injection step. They are dropped here and the log says so.
            for provider in PROVIDERS:
                setattr(self, f"{provider}_api_key", None)
            self.env_keys_ignored = True
        if not self.ohttp_keys_max_age < self.ohttp_key_overlap <= self.ohttp_replay_window / 2:
            raise ValueError(
                "ohttp_keys_max_age < ohttp_key_overlap <= ohttp_replay_window / 2 is required "
                "(cached key lists keep working; keys rotate at least once per replay window)"
            )
        if self.operator_port and self.operator_port == self.port:
            raise ValueError("operator_port must differ from port")
        d = self.deadlines
        if d.keepalive >= d.idle and d.keepalive >= d.client_stall:
            raise ValueError("deadlines.keepalive must be shorter than idle or client_stall")
        return self
