"""Where a request enters: thin Quart blueprints. Validation, dispatch, nothing else."""

from __future__ import annotations

import json
from typing import Any, cast

from pydantic import BaseModel, ValidationError
from quart import current_app, request

from ..api.errors import GatewayError, InvalidRequest
from ..state import AppState

MAX_JSON_DEPTH = 64


def app_state() -> AppState:
    return cast(AppState, current_app.extensions["trio_gateway"])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        cur, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(cur, dict):
            stack.extend((v, d + 1) for v in cur.values())
        elif isinstance(cur, list):
            stack.extend((v, d + 1) for v in cur)
    return deepest


async def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx in OpenAI's error shape."""
    ctype = (request.mimetype or "").lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise GatewayError(
            f"Content-Type must be application/json (got {ctype or 'none'})",
            status=415,
            type="invalid_request_error",
            code="unsupported_media_type",
        )
    data = await request.get_data(cache=False, as_text=False)  # 413 above MAX_CONTENT_LENGTH
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request.", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidRequest("The JSON body is nested too deeply.", code="invalid_json")
    return obj


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def validate[M: BaseModel](model: type[M], raw: dict[str, Any]) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        # A discriminated union reports the variant name in loc; drop it for the param.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.endswith("Message")))
        loc = tuple(p for p in loc if p not in ("TextPart", "ImagePart", "str", "list[...]"))
        param = _loc(loc) or None
        if err["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
            code = "unknown_parameter"
        else:
            msg = f"Invalid value for '{param}': {err['msg']}" if param else err["msg"]
            code = "invalid_value"
        raise InvalidRequest(msg, param=param, code=code) from None
