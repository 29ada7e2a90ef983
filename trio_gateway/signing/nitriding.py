"""Registration of the enclave key with nitriding (its internal API, default 127.0.0.1:8080).

``POST /enclave/hash`` with base64(SHA-256(DER public key)) binds our key into the attestation
document's user data; ``GET /enclave/ready`` then lets nitriding open the public port. Both have
deadlines (the reference's ready call had none and could hang start-up forever) and a few retries
with backoff, since nitriding may come up a moment after us.
"""

from __future__ import annotations

import base64
import logging

import httpx
import trio

from .keys import EnclaveKey

log = logging.getLogger("trio_gateway.nitriding")


class NitridingError(RuntimeError):
    pass


async def register_with_nitriding(
    client: httpx.AsyncClient, base_url: str, key: EnclaveKey, *, deadline: float
) -> None:
    base = base_url.rstrip("/")
    body = base64.b64encode(key.nitriding_hash)
    with trio.move_on_after(deadline) as cs:
        delay = 0.2
        while True:
            try:
                r = await client.post(f"{base}/enclave/hash", content=body, timeout=deadline)
                if r.status_code == 200:
                    r = await client.get(f"{base}/enclave/ready", timeout=deadline)
                    if r.status_code == 200:
                        log.info("key registered with nitriding; enclave ready")
                        return
                log.warning("nitriding answered HTTP %s; retrying", r.status_code)
            except httpx.HTTPError as exc:
                log.warning("nitriding not reachable (%s); retrying", type(exc).__name__)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
    if cs.cancelled_caught:
        raise NitridingError(
            f"could not register the key with nitriding at {base} within {deadline:g}s "
            "(outside an enclave, run with --dev or --no-nitriding)"
        )
