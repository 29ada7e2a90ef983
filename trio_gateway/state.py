"""The application state: built once at start-up, handed down; no module-level mutable globals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import httpx
import trio

from .config import Settings
from .ohttp_keys import OHTTPKeys
from .ohttp_keys import maintenance as ohttp_maintenance
from .payments.ledger import SessionLedger
from .payments.meter import SettlingMeter
from .payments.price_feed import PriceFeed
from .payments.x402_gate import FacilitatorClient, PaymentSettings, X402Gate
from .providers.anthropic import AnthropicProvider
from .providers.base import ModelInfo, Provider
from .providers.gemini import GeminiProvider
from .providers.mock import MOCK_BASE_URL, MockModelTransport
from .providers.openai import OpenAICompatible
from .providers.registry import ModelRegistry
from .relay.core import Relay
from .relay.metering import Meter, UsageLog
from .relay.wire import UpstreamTransport
from .services import Service, ServiceHost
from .signing.heartbeat import Heartbeat, HeartbeatConfig
from .signing.keys import EnclaveKey, Signature


class KeySigner:
    """Signs answers with the enclave key. The timestamp is taken after inference, like the
    reference's; RSA-2048 PSS costs ~0.3 ms of CPU, done inline (no thread hop)."""

    def __init__(self, key: EnclaveKey) -> None:
        self.key = key

    async def sign(self, request_bytes: bytes, output_content: str) -> Signature:
        return self.key.sign_answer(request_bytes, output_content, int(time.time()))


@dataclass
class ProviderKeys:
    """Provider credentials: installed once (``POST /v1/keys``, or env in dev mode)."""

    keys: dict[str, str] = field(default_factory=dict)
    installed: bool = False

    def __repr__(self) -> str:
        return f"ProviderKeys(providers={sorted(self.keys)}, installed={self.installed})"


def build_providers(settings: Settings) -> dict[str, Provider]:
    s = settings
    providers: dict[str, Provider] = {
        "openai": OpenAICompatible("openai", str(s.openai_base_url)),
        "anthropic": AnthropicProvider(str(s.anthropic_base_url)),
        "google": GeminiProvider(str(s.google_base_url)),
        "xai": OpenAICompatible("xai", str(s.xai_base_url)),
        "bytedance": OpenAICompatible("bytedance", str(s.bytedance_base_url)),
        "nous": OpenAICompatible("nous", str(s.nous_base_url)),
        "mock": OpenAICompatible("mock", MOCK_BASE_URL),
    }
    return providers


def build_http_client(settings: Settings, mock: MockModelTransport | None) -> httpx.AsyncClient:
    d = settings.deadlines
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    if mock is not None:
        mounts[MOCK_BASE_URL.rsplit("/v1", 1)[0]] = mock
    limits = httpx.Limits(
        max_connections=settings.max_upstream_connections,
        max_keepalive_connections=settings.max_keepalive_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=UpstreamTransport(limits=limits),  # HTTP/1.1 only: see relay/wire.py
        follow_redirects=False,
        trust_env=False,
        # read=None: the relay owns first-byte, idle and total deadlines
        timeout=httpx.Timeout(connect=d.connect, read=None, write=d.connect, pool=d.pool),
        mounts=mounts,
    )


@dataclass
class AppState:
    settings: Settings
    key: EnclaveKey
    registry: ModelRegistry
    providers: dict[str, Provider]
    client: httpx.AsyncClient
    relay: Relay
    meter: Meter
    usage_log: UsageLog | None
    provider_keys: ProviderKeys
    ohttp: OHTTPKeys = field(default_factory=OHTTPKeys.create)
    started_at: float = field(default_factory=time.time)
    services: dict[str, Service] = field(default_factory=dict)
    keys_lock: trio.Lock = field(default_factory=trio.Lock)
    service_host: ServiceHost = field(default_factory=ServiceHost)
    # the operator listener's (host, port) once bound; None: there is none (see routes/keys.py)
    operator_endpoint: tuple[str, int] | None = None
    draining: bool = False  # SIGTERM received: new requests get 503, running ones may finish
    payments: X402Gate | None = None  # None: inference is not paid for (the default)
    heartbeat: Heartbeat | None = None  # set by /v1/keys with heartbeat_contract_address

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        key: EnclaveKey | None = None,
        meter: Meter | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AppState:
        """Everything the gateway needs, built before serving. ``transport`` replaces the wire
        to every provider (tests); the dev mock is mounted in dev mode."""
        key = key or EnclaveKey.generate()
        providers = build_providers(settings)
        registry = ModelRegistry.load_default(providers=set(providers), dev=settings.dev)
        mock = (
            MockModelTransport(token_delay=settings.mock_token_delay_ms / 1000)
            if settings.dev
            else None
        )
        client = build_http_client(settings, mock)
        if transport is not None:
            client = httpx.AsyncClient(
                transport=transport, timeout=client.timeout, follow_redirects=False
            )
        usage_log = UsageLog() if meter is None else None
        the_meter: Meter = meter if meter is not None else usage_log  # type: ignore[assignment]
        keys = ProviderKeys()
        if settings.dev:
            keys.keys.update(settings.env_keys())
        relay = Relay(client, KeySigner(key), the_meter, settings.deadlines)
        # scheduled rotation: no key outlives the replay window (see ohttp_keys.py)
        ohttp = OHTTPKeys.create(
            rfc9458_test_key=settings.ohttp_rfc9458_test_key,
            rotate_every=settings.ohttp_replay_window - settings.ohttp_key_overlap,
            overlap=settings.ohttp_key_overlap,
            replay_window=settings.ohttp_replay_window,
            replay_max_entries=settings.ohttp_replay_max_entries,
        )
        return cls(
            settings=settings,
            key=key,
            registry=registry,
            providers=providers,
            client=client,
            relay=relay,
            meter=the_meter,
            usage_log=usage_log,
            provider_keys=keys,
            ohttp=ohttp,
            services={"ohttp_keys": partial(ohttp_maintenance, ohttp)},
        )

    def begin_shutdown(self, grace: float) -> None:
        """Stop taking new work; running upstream calls end ``grace`` seconds from now at the
        latest (a second call can only shorten it). Settlement comes later, in after_serving."""
        self.draining = True
        self.relay.drain(grace)

    @property
    def ready(self) -> bool:
        """Inference is served in dev mode, or once the operator has injected keys."""
        return self.settings.dev or self.provider_keys.installed

    def api_key_for(self, model: ModelInfo) -> tuple[bool, str | None]:
        """(configured, key) for the model's provider."""
        if model.provider == "mock":
            return True, None
        key = self.provider_keys.keys.get(model.provider)
        return key is not None, key

    # -- payments -------------------------------------------------------------------------------

    def payment_settings(
        self, facilitator_url: str, pay_to: str, network: str | None = None
    ) -> PaymentSettings:
        s = self.settings
        d = s.deadlines
        return PaymentSettings(
            facilitator_url=facilitator_url,
            pay_to=pay_to,
            network=network or s.payment_network,
            asset=s.payment_asset,
            decimals=s.payment_asset_decimals,
            asset_name=s.payment_asset_name,
            asset_version=s.payment_asset_version,
            session_cap=s.payment_session_cap,
            max_timeout_seconds=s.payment_max_timeout,
            settle_timeout=s.deadlines.settle,
            # longer than any relay can live: total + final hand-off + signing + the hook
            orphan_after=d.total + d.client_stall + d.sign + d.settle + 60.0,
        )

    def build_payment_gate(
        self,
        pay: PaymentSettings,
        *,
        facilitator: FacilitatorClient | None = None,
        feed: PriceFeed | None = None,
        ledger: SessionLedger | None = None,
    ) -> X402Gate:
        """The payment layer (not yet enabled): ledger, settling meter around the usage log,
        price feed (its own HTTP client unless given) and the x402 gate."""
        if ledger is None:  # (an empty ledger is falsy: it has __len__)
            ledger = SessionLedger(payer_limit=pay.session_cap)  # credit per payer: F9
        meter = SettlingMeter(ledger, decimals=pay.decimals, inner=self.meter)
        if feed is None:
            feed = PriceFeed(
                httpx.AsyncClient(trust_env=False, follow_redirects=False),
                pay.asset,
                url=self.settings.price_feed_url,
                refresh_interval=self.settings.price_feed_refresh,
            )
        return X402Gate(pay, ledger, meter, feed, facilitator=facilitator)

    def enable_payments(self, gate: X402Gate) -> dict[str, Service]:
        """Switch the relay's meter to the gate's settling meter and return the services to run
        (price feed, reconciler). From here on no inference request is served unpaid."""
        if not gate.initialized:
            raise RuntimeError("initialize() the payment gate before enabling it")
        self.relay.meter = gate.meter
        self.meter = gate.meter
        self.payments = gate
        services: dict[str, Service] = {
            "price_feed": gate.feed.run,
            "x402_reconciler": gate.reconcile,
        }
        self.services.update(services)
        return services

    # -- heartbeat ------------------------------------------------------------------------------

    def enable_heartbeat(
        self, config: HeartbeatConfig, *, client: httpx.AsyncClient | None = None
    ) -> dict[str, Service]:
        """Build the signed heartbeat (its own HTTP client unless given), keep it on the state
        and return the service to run; ``after_serving`` closes it."""
        if self.heartbeat is not None:
            raise RuntimeError("the heartbeat is already enabled")
        if client is None:
            client = httpx.AsyncClient(
                trust_env=False,
                follow_redirects=False,
                timeout=httpx.Timeout(config.facilitator_timeout),
            )
        self.heartbeat = Heartbeat(config, self.key, client)
        services: dict[str, Service] = {"heartbeat": self.heartbeat.run}
        self.services.update(services)
        return services
