"""``POST /v1/chat/completions`` and ``POST /v1/completions``: validate, resolve, hand to the relay.

Order of checks (cheapest and least revealing first): gateway ready (503) → body type and JSON
(415/413/400) → schema (400) → model (404) → provider configured (503) → parameters the model or
provider cannot honour (400) → when payments are enabled, the pricing and payment gate (price
503, worst case 400, payment 402 / facilitator 503, reservation 402). Only then is the upstream
call built; the relay does the rest.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, cast

import trio
from pydantic import BaseModel
from quart import Blueprint, request
from quart_schema import document_request, document_response, tag

from ..api.chat import ChatCompletion, ChatCompletionRequest
from ..api.completions import Completion, CompletionRequest
from ..api.errors import InvalidRequest, NotFound, Unavailable
from ..api.render import ChatRenderer, CompletionRenderer, Renderer
from ..payments.x402_gate import SESSION_HEADER
from ..providers.base import Kind, ModelInfo
from ..relay.asgi import ADMITTED, RelayResponse
from ..relay.core import RelayJob
from ..relay.metering import RequestRecord
from ..signing.canonical import chat_request_bytes, completion_request_bytes
from ..state import AppState
from . import app_state, json_body, validate

bp = Blueprint("inference", __name__)


def _check_model_params(model: ModelInfo, req: Mapping[str, Any]) -> None:
    t = req.get("temperature")
    if model.fixed_temperature is not None and t is not None and t != model.fixed_temperature:
        raise InvalidRequest(
            f"'temperature' is not supported with this model: only "
            f"{model.fixed_temperature:g} is allowed",
            param="temperature",
            code="unsupported_value",
        )
    limit = req.get("max_completion_tokens") or req.get("max_tokens")
    if model.max_output is not None and limit is not None and limit > model.max_output:
        raise InvalidRequest(
            f"max tokens is too large: {limit}. This model supports at most "
            f"{model.max_output} completion tokens",
            param="max_tokens",
            code="invalid_value",
        )


async def _start(kind: Kind, schema: type[BaseModel]) -> RelayResponse:
    st = app_state()
    if not st.ready:
        raise Unavailable(
            "The gateway is not initialised yet: provider keys have not been installed.",
            code="not_initialised",
        )
    raw = await json_body()
    validate(schema, raw)
    model = st.registry.resolve(raw["model"])
    if model is None:
        raise NotFound(
            f"The model '{raw['model']}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    configured, api_key = st.api_key_for(model)
    if not configured:
        raise Unavailable(
            f"The provider for model '{model.name}' is not configured on this gateway.",
            code="provider_not_configured",
        )
    provider = st.providers[model.provider]
    bad = provider.unsupported(kind, raw, model)
    if bad:
        raise InvalidRequest(
            f"Unsupported parameter for this model: '{bad[0]}'",
            param=bad[0],
            code="unsupported_parameter",
        )
    _check_model_params(model, raw)

    created = int(time.time())
    renderer: Renderer
    if kind == "chat":
        request_bytes = chat_request_bytes(raw)
        rid = "chatcmpl-" + uuid.uuid4().hex
        renderer = ChatRenderer(rid, created, raw["model"])
    else:
        request_bytes = completion_request_bytes(raw)
        rid = "cmpl-" + uuid.uuid4().hex
        renderer = CompletionRenderer(rid, created, raw["model"])
    gate = st.payments
    if gate is None:
        return _relay_response(st, kind, raw, model, api_key, rid, renderer, request_bytes)
    # The pricing and payment gate: after every free check, before any upstream call.
    admission = await gate.admit(
        request.headers.get,
        url=request.url,
        path=request.path,
        request_id=rid,
        model=model,
        request_size=len(request_bytes),
        max_output=raw.get("max_completion_tokens") or raw.get("max_tokens"),
    )
    # the connection frees it when the request ends without the relay having run
    cast(dict[str, Any], request.scope)[ADMITTED].append(rid)
    resp = _relay_response(st, kind, raw, model, api_key, rid, renderer, request_bytes)
    resp.headers[SESSION_HEADER] = admission.session_id
    return resp


def _relay_response(
    st: AppState,
    kind: Kind,
    raw: dict[str, Any],
    model: ModelInfo,
    api_key: str | None,
    rid: str,
    renderer: Renderer,
    request_bytes: bytes,
) -> RelayResponse:
    provider = st.providers[model.provider]
    call = provider.build(kind, raw, model, api_key)
    record = RequestRecord(
        request_id=rid,
        model=model.name,
        provider=model.provider,
        stream=bool(raw.get("stream")),
        started_at=trio.current_time(),
    )
    job = RelayJob(record, provider, kind, call, renderer, request_bytes, bool(raw.get("stream")))
    resp = RelayResponse(st.relay, job)
    resp.headers["x-request-id"] = rid
    return resp


@bp.post("/v1/chat/completions")
@tag(["inference"])
@document_request(ChatCompletionRequest)
@document_response(ChatCompletion)
async def chat_completions() -> RelayResponse:
    """Chat completion, streamed (SSE) or not; every answer signed by the enclave key."""
    return await _start("chat", ChatCompletionRequest)


@bp.post("/v1/completions")
@tag(["inference"])
@document_request(CompletionRequest)
@document_response(Completion)
async def completions() -> RelayResponse:
    """Legacy text completion, streamed (SSE) or not; signed like chat."""
    return await _start("completion", CompletionRequest)
