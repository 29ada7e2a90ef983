"""``python -m trio_gateway [--dev] [--host H] [--port P] …`` — see ``--help``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import trio
from pydantic import ValidationError

from . import __version__
from .config import Settings
from .providers.registry import RegistryError
from .server import run_server
from .signing.nitriding import NitridingError
from .state import AppState

LOG_FORMAT = "%(asctime)s.%(msecs)03d [%(levelname)s] %(name)s: %(message)s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trio_gateway",
        description="Verifiable LLM gateway: OpenAI API in, RSA-PSS-signed answers out. "
        "Every flag can also be set by environment variable (TRIO_GATEWAY_<NAME>, "
        "deadlines as TRIO_GATEWAY_DEADLINES__<NAME>); provider base URLs use the SDK names "
        "(OPENAI_BASE_URL, ...).",
    )
    p.add_argument("--version", action="version", version=f"trio_gateway {__version__}")
    p.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="dev mode: embedded mock model 'trio-mock', fresh key, OPENAI_API_KEY from the "
        "environment allowed, no nitriding. Not for production.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000; 0 = any free)")
    p.add_argument(
        "--operator-port",
        type=int,
        help="a second listener for the operator: the only place POST /v1/keys is accepted "
        "(in an enclave: the host's loopback-only forward; nitriding never proxies to it)",
    )
    p.add_argument("--operator-host", help="address of the operator listener (0.0.0.0)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    p.add_argument("--max-body-bytes", type=int, help="request body cap, 413 above (20 MiB)")
    p.add_argument(
        "--max-upstream-connections", type=int, help="upstream connection pool size (1024)"
    )
    p.add_argument(
        "--no-nitriding",
        dest="nitriding",
        action="store_false",
        default=None,
        help="do not register the key with nitriding (production outside an enclave)",
    )
    p.add_argument(
        "--allow-unpaid",
        action="store_true",
        default=None,
        help="production without x402 payments (private deployments only): /v1/keys then "
        "accepts provider keys without facilitator_url/pay_to_address",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="S",
        help="on SIGTERM, how long in-flight requests may finish (30)",
    )
    p.add_argument("--nitriding-url", help="nitriding internal API (http://127.0.0.1:8080)")
    p.add_argument(
        "--mock-token-delay-ms", type=float, help="dev mock: delay between tokens (20 ms)"
    )
    p.add_argument(
        "--ohttp-rfc9458-test-key",
        action="store_true",
        default=None,
        help="dev only: also serve the RFC 9458 Appendix A OHTTP test key as key_id 1, so the "
        "RFC's published request can be replayed (refused without --dev)",
    )
    pay = p.add_argument_group("x402 payments (production: configured by POST /v1/keys)")
    pay.add_argument(
        "--payments",
        action="store_true",
        default=None,
        help="dev only: require x402 upto payments on inference (needs the two below)",
    )
    pay.add_argument("--facilitator-url", help="x402 facilitator base URL")
    pay.add_argument("--pay-to-address", help="EVM address that receives the payments")
    pay.add_argument("--payment-network", help="CAIP-2 network (eip155:8453)")
    pay.add_argument("--price-feed-url", help="CoinGecko-compatible OPG/USD price URL")
    g = p.add_argument_group("deadlines (seconds)")
    for name, default in (
        ("connect", 10),
        ("first-byte", 120),
        ("idle", 120),
        ("total", 900),
        ("client-stall", 30),
        ("keepalive", 15),
        ("sign", 2),
        ("settle", 10),
        ("pool", 5),
    ):
        g.add_argument(f"--{name}-timeout", type=float, metavar="S", help=f"default {default}")
    return p.parse_args(argv)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for field in (
        "dev",
        "host",
        "port",
        "operator_host",
        "operator_port",
        "log_level",
        "max_body_bytes",
        "max_upstream_connections",
        "nitriding",
        "allow_unpaid",
        "nitriding_url",
        "shutdown_grace",
        "mock_token_delay_ms",
        "ohttp_rfc9458_test_key",
        "payments",
        "facilitator_url",
        "pay_to_address",
        "payment_network",
        "price_feed_url",
    ):
        value = getattr(ns, field)
        if value is not None:
            overrides[field] = value
    deadlines: dict[str, float] = {}
    for name in (
        "connect",
        "first_byte",
        "idle",
        "total",
        "client_stall",
        "keepalive",
        "sign",
        "settle",
        "pool",
    ):
        value = getattr(ns, f"{name}_timeout")
        if value is not None:
            deadlines[name] = value
    if deadlines:
        base = Settings().deadlines.model_dump()
        base.update(deadlines)
        overrides["deadlines"] = base
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        settings = settings_from_args(ns)
    except ValidationError as exc:
        print("trio_gateway: invalid settings:", file=sys.stderr)
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"  {loc}: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"
    )
    log = logging.getLogger("trio_gateway")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings.env_keys_ignored:
        log.warning("provider keys in the environment are ignored outside --dev: use POST /v1/keys")
    try:
        state = AppState.build(settings)
    except RegistryError as exc:
        print(f"trio_gateway: model table: {exc}", file=sys.stderr)
        return 2
    if settings.dev:
        log.warning(
            "DEV MODE: embedded mock model 'trio-mock', throwaway key, %s, "
            "no attestation. NOT FOR PRODUCTION.",
            "x402 payments ON" if settings.payments else "no payments",
        )
    log.info("tee_id %s", state.key.tee_id)
    return serve_until_shutdown(state, log)


EXIT_NITRIDING = 3
EXIT_CRASHED = 70  # EX_SOFTWARE


def serve_until_shutdown(state: AppState, log: logging.Logger) -> int:
    """Run the gateway until a signal shuts it down (exit 0). A crash is final: the enclave key
    lives only in this process, so nothing here restarts it (scripts/start.sh stops the
    enclave); the log carries the exception type only, never a message that could hold
    content."""
    try:
        trio.run(run_server, state)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # the process boundary: classify, never respawn
        leaves = _leaf_exceptions(exc)
        for leaf in leaves:
            if isinstance(leaf, NitridingError):
                log.error("%s", leaf)
                return EXIT_NITRIDING
        if leaves and all(isinstance(e, KeyboardInterrupt) for e in leaves):
            return 0
        log.critical(
            "gateway crashed (%s); exiting without restart: a new process would have a new key",
            ", ".join(sorted({type(e).__name__ for e in leaves})) or type(exc).__name__,
        )
        return EXIT_CRASHED
    return 0


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_exceptions(sub)]
    return [exc]


if __name__ == "__main__":
    sys.exit(main())
