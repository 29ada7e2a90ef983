"""Helpers for bench/paid.sh (not a test; loopback only).

* ``facilitator --port P``: the test suite's loopback x402 facilitator
  (``tests/test_payments_x402``: the SDK's upto facilitator over an in-memory chain, real
  signatures), the bench payer funded;
  also serves the OPG/USD price at ``/price`` and, at ``/_stats``, its call counters and what
  moved on the chain (``settle_txs``, ``settled_units``).
* ``session --url GW``: one paid request with the x402 SDK client (402 -> sign -> 200); prints
  the ``X-Upto-Session`` id.
* ``compare UNPAID.jsonl PAID.jsonl [--stats URL]``: paid - unpaid latency and CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def facilitator(port: int) -> None:
    from eth_account import Account
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme

    from tests import test_payments_x402 as px

    class Handler(px._Handler):
        def do_GET(self) -> None:
            if self.path == "/_stats":
                with chain.lock:  # what actually moved on the (fake) chain
                    settled = [amount for kind, amount in chain.txs.values() if kind == "settle"]
                return self._send(
                    200,
                    {
                        **self.server.calls,
                        "settle_txs": len(settled),
                        "settled_units": sum(settled),
                    },
                )
            return super().do_GET()

    chain = px.FakeChain()
    payer = Account.from_key(px.PAYER_KEY).address
    chain.balances[payer] = chain.allowance[payer] = 10**30
    core = x402FacilitatorSync()
    core.register([px.NETWORK], UptoEvmFacilitatorScheme(chain))
    fac: Any = px.Facilitator(("127.0.0.1", port), Handler)
    fac.core, fac.calls, fac.down, fac.verify_delay = core, {}, False, 0.0
    print(f"facilitator on 127.0.0.1:{port} (payer {payer})", flush=True)
    try:
        fac.serve_forever()
    finally:
        fac.server_close()


async def session(url: str, model: str) -> None:
    from eth_account import Account
    from x402 import x402Client
    from x402.http.clients.httpx import x402HttpxClient
    from x402.mechanisms.evm.upto import UptoEvmClientScheme

    from tests import test_payments_x402 as px

    xc = x402Client()
    xc.register(px.NETWORK, UptoEvmClientScheme(Account.from_key(px.PAYER_KEY)))
    xc.set_spend_controls(False)
    body = {"model": model, "messages": [{"role": "user", "content": "open"}], "max_tokens": 16}
    async with x402HttpxClient(xc, base_url=url, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200 or "X-Upto-Session" not in r.headers:
        sys.exit(f"paid request failed: {r.status_code} {r.text[:300]}")
    print(r.headers["X-Upto-Session"])


def _records(path: str) -> dict[str, dict[str, Any]]:
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("scenario") == "overhead" and rec.get("target") == "gateway":
            out[rec["mode"]] = rec
    return out


def compare(unpaid: str, paid: str) -> None:
    u, p = _records(unpaid), _records(paid)
    print(
        "| mode | unpaid p50 / p99 ms | paid p50 / p99 ms | added p50 / p99 ms "
        "| CPU ms/req unpaid → paid | req/s unpaid → paid | paid errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in ("sequential", "concurrent"):
        a, b = u[mode], p[mode]
        la, lb = a["latency_ms"], b["latency_ms"]
        print(
            f"| {mode} (c={b['concurrency']}, n={b['ok']}) "
            f"| {la['p50']:.3f} / {la['p99']:.3f} | {lb['p50']:.3f} / {lb['p99']:.3f} "
            f"| **{lb['p50'] - la['p50']:+.3f} / {lb['p99'] - la['p99']:+.3f}** "
            f"| {a.get('gateway_cpu_ms_per_req')} → {b.get('gateway_cpu_ms_per_req')} "
            f"| {a['rps']} → {b['rps']} | {b['errors']} {b['statuses']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("facilitator")
    f.add_argument("--port", type=int, required=True)
    s = sub.add_parser("session")
    s.add_argument("--url", required=True)
    s.add_argument("--model", default="gpt-4.1")
    c = sub.add_parser("compare")
    c.add_argument("unpaid")
    c.add_argument("paid")
    a = ap.parse_args()
    if a.cmd == "facilitator":
        threading.current_thread().name = "facilitator"
        facilitator(a.port)
    elif a.cmd == "session":
        asyncio.run(session(a.url, a.model))
    else:
        compare(a.unpaid, a.paid)


if __name__ == "__main__":
    main()
