"""The Quart-Trio application: routes, error shape, OpenAPI, lifespan.

Quart's ``RESPONSE_TIMEOUT`` is off (it would silently cut streams at 60 s); the relay enforces
its own deadlines. Background services run in ``state.service_host``, a nursery hosted by one task
in the app-owned nursery quart-trio opens for the lifespan (``app.nursery``); each is supervised
(it catches its own errors, because a task that raises there takes the whole app down), and
shutdown stops them all before settling sessions and closing clients. Per-request work never
goes there: it belongs to the request's nursery.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Response, request
from quart_schema import Info, QuartSchema
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__
from .api.errors import GatewayError, NotFound, error_body
from .relay.asgi import RelayHTTPConnection
from .relay.core import ShuttingDown
from .routes import inference, keys, meta, ohttp
from .state import AppState

log = logging.getLogger("trio_gateway.app")

OPERATOR_PATHS = frozenset({"/v1/keys", "/health", "/signing-key", "/heartbeat/status"})

_HTTP_CODES = {
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def _json(body: dict[str, Any], status: int) -> Response:
    from .api.render import json_bytes

    return Response(json_bytes(body), status=status, content_type="application/json")


def create_app(state: AppState) -> QuartTrio:
    app = QuartTrio(__name__)
    app.asgi_http_class = RelayHTTPConnection
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["MAX_CONTENT_LENGTH"] = state.settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions["trio_gateway"] = state

    QuartSchema(
        app,
        info=Info(title="trio_gateway", version=__version__),
        redoc_ui_path=None,
        scalar_ui_path=None,
    )
    app.register_blueprint(meta.bp)
    app.register_blueprint(inference.bp)
    app.register_blueprint(keys.bp)
    app.register_blueprint(ohttp.bp)

    @app.before_request
    async def _gate() -> None:
        # the operator listener serves key injection and a few reads, nothing else
        op = state.operator_endpoint
        server = request.scope.get("server")
        if op is not None and server and server[1] == op[1] and request.path not in OPERATOR_PATHS:
            raise NotFound("not served on the operator listener", code="not_found")
        # after SIGTERM: running requests may finish, new work is refused (reads still answer)
        if state.draining and request.method not in ("GET", "HEAD", "OPTIONS"):
            raise ShuttingDown()

    @app.errorhandler(GatewayError)
    async def _gateway_error(err: GatewayError) -> Response:
        resp = _json(err.body(), err.status)
        for name, value in getattr(err, "headers", {}).items():  # e.g. PAYMENT-REQUIRED
            resp.headers[name] = value
        return resp

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        type_, code = _HTTP_CODES.get(status, ("invalid_request_error", None))
        msg = {
            404: "Unknown request URL. Please check the URL and method.",
            405: "Method not allowed for this URL.",
            413: f"Request body too large (limit {state.settings.max_body_bytes} bytes).",
        }.get(status, err.description or err.name)
        resp = _json(error_body(status, msg, type_, code), status)
        if status == 405 and getattr(err, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(err.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        log.error("unhandled %s", type(err).__name__)  # never the message: it may carry content
        return _json(error_body(500, "internal gateway error", "server_error"), 500)

    @app.before_serving
    async def _start_services() -> None:
        s = state.settings
        if s.payments and state.payments is None:
            # dev mode with --payments: a facilitator that cannot be reached stops the start-up
            assert s.facilitator_url and s.pay_to_address  # checked by Settings
            gate = state.build_payment_gate(
                state.payment_settings(s.facilitator_url, s.pay_to_address)
            )
            await gate.initialize()
            state.enable_payments(gate)
            log.warning("x402 payments enabled on %s", s.payment_network)
        await app.nursery.start(state.service_host.run)
        for name, service in state.services.items():
            state.service_host.start(name, service)

    @app.after_serving
    async def _close_client() -> None:
        # services first (price feed, reconciler, heartbeat): nothing may still use a client
        # that is closed below, and the shutdown settlement must not race the reconciler
        # (a reconciler settle in flight is shielded for up to the settle deadline: wait for it)
        if not await state.service_host.stop(state.settings.deadlines.settle + 2.0):
            log.error("background services did not stop in time")
        if state.heartbeat is not None:
            await state.heartbeat.aclose()  # stops it first, then closes its client
        if state.payments is not None:
            await state.payments.shutdown()  # settle every open session, bounded
            await state.payments.aclose()
            await state.payments.feed.client.aclose()
        await state.client.aclose()

    return app
