#!/usr/bin/env bash
# `make bench-paid`: what a paid request costs over an unpaid one when its x402 session is open.
# Mock provider, loopback facilitator (the test suite's: real signatures, in-memory chain) and two
# gateways: one unpaid, one with --payments. One session is opened with the x402 SDK client, then
# ../shared/bench `loadgen.py overhead` runs with the same -n/-c against the unpaid gateway and
# against the paid one with `X-Upto-Session`. Gateways pinned to CPU 0, everything else to CPU 1
# (as bench/run.sh). Prints paid − unpaid p50/p99 and CPU/request, and the facilitator's call
# counts before and after the paid run (a session hit must call no facilitator).
# Results: bench/results/paid-*.jsonl and bench/results/paid-summary.md. Figures, no asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH_DIR:-../shared/bench}
OUT=bench/results
MOCK_PORT=${MOCK_PORT:-18510}
FAC_PORT=${FAC_PORT:-18520}
GW_PORT=${GW_PORT:-18610}      # unpaid
PAID_PORT=${PAID_PORT:-18611}  # paid
PY=.venv/bin/python
LOADPY=${LOADPY:-$PY}
N=${N:-500}
C=${C:-8}
ROUNDS=${ROUNDS:-2}  # unpaid/paid pairs, alternated (ABAB) to spread drift over both
MODEL=gpt-4.1
PAYEE=0x209693Bc6afc0C5328bA36FaF03C514EF312287C
mkdir -p "$OUT"
rm -f "$OUT"/paid-*.jsonl

pin() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# for `spawn CPU cmd… &`: exec, so that $! is the server's own pid (killed on exit, measured)
spawn() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then exec taskset -c "$1" "${@:2}"; else exec "${@:2}"; fi; }
wait_http() { for _ in $(seq 150); do curl -s -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }

stop_gateways() {  # first, while the facilitator is up: the paid one settles its session on exit
    kill "${GW:-}" "${PGW:-}" 2>/dev/null || true
    for _ in $(seq 150); do
        { kill -0 "${PGW:-}" 2>/dev/null || kill -0 "${GW:-}" 2>/dev/null; } || break; sleep 0.1
    done
    kill -9 "${GW:-}" "${PGW:-}" 2>/dev/null || true
}
cleanup() {
    stop_gateways
    kill "${FAC:-}" "${MOCK:-}" 2>/dev/null || true
    sleep 0.2
    kill -9 "${FAC:-}" "${MOCK:-}" 2>/dev/null || true
}
trap cleanup EXIT
for p in "$MOCK_PORT" "$FAC_PORT" "$GW_PORT" "$PAID_PORT"; do
    if curl -s -o /dev/null "http://127.0.0.1:$p/"; then echo "port $p is already in use" >&2; exit 1; fi
done

spawn 1 "$LOADPY" "$BENCH/mock_upstream.py" --port "$MOCK_PORT" --parent-pid $$ >"$OUT/paid-mock.log" 2>&1 &
MOCK=$!
spawn 1 "$PY" bench/paid_setup.py facilitator --port "$FAC_PORT" >"$OUT/paid-facilitator.log" 2>&1 &
FAC=$!
wait_http "http://127.0.0.1:$MOCK_PORT/health"
wait_http "http://127.0.0.1:$FAC_PORT/supported"

export OPENAI_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" OPENAI_API_KEY=sk-bench
spawn 0 "$PY" -m trio_gateway --dev --port "$GW_PORT" --log-level WARNING >"$OUT/paid-gw-unpaid.log" 2>&1 &
GW=$!
# a cap large enough for every request of the run on one session (the payer is funded for it)
TRIO_GATEWAY_PAYMENT_SESSION_CAP=${SESSION_CAP:-1000000000000000000000000} \
    spawn 0 "$PY" -m trio_gateway --dev --port "$PAID_PORT" --log-level WARNING --payments \
    --facilitator-url "http://127.0.0.1:$FAC_PORT" --pay-to-address "$PAYEE" \
    --payment-network eip155:8453 --price-feed-url "http://127.0.0.1:$FAC_PORT/price" \
    >"$OUT/paid-gw-paid.log" 2>&1 &
PGW=$!
wait_http "http://127.0.0.1:$GW_PORT/health"
wait_http "http://127.0.0.1:$PAID_PORT/health"
for _ in $(seq 100); do  # the price feed's first fetch
    curl -s "http://127.0.0.1:$PAID_PORT/health" | grep -q '"price_usd": *"[0-9]' && break; sleep 0.1
done

SID=$(pin 1 "$PY" bench/paid_setup.py session --url "http://127.0.0.1:$PAID_PORT" --model "$MODEL")
echo "session opened: ${SID:0:8}…"
BEFORE=$(curl -s "http://127.0.0.1:$FAC_PORT/_stats")

LG=(pin 1 "$LOADPY" "$BENCH/loadgen.py" overhead --model "$MODEL" -n "$N" -c "$C" --direct-url "http://127.0.0.1:$MOCK_PORT")
for r in $(seq "$ROUNDS"); do
    "${LG[@]}" --url "http://127.0.0.1:$GW_PORT" --gateway-pid "$GW" --label "unpaid-$r" \
        --out "$OUT/paid-unpaid-$r.jsonl" >/dev/null
    "${LG[@]}" --url "http://127.0.0.1:$PAID_PORT" --gateway-pid "$PGW" --label "paid-$r" \
        --header "X-Upto-Session: $SID" --out "$OUT/paid-paid-$r.jsonl" >/dev/null
done
AFTER=$(curl -s "http://127.0.0.1:$FAC_PORT/_stats")
HEALTH=$(curl -s "http://127.0.0.1:$PAID_PORT/health")
stop_gateways
FINAL=$(curl -s "http://127.0.0.1:$FAC_PORT/_stats")

{
    echo "## paid (open session) vs unpaid, loadgen overhead -n $N -c $C, model $MODEL"
    echo
    for r in $(seq "$ROUNDS"); do
        echo "round $r"
        echo
        "$PY" bench/paid_setup.py compare "$OUT/paid-unpaid-$r.jsonl" "$OUT/paid-paid-$r.jsonl"
        echo
    done
    echo "facilitator calls after opening the session: $BEFORE; after the paid runs: $AFTER;"
    echo "after the paid gateway's shutdown (it settles the session): $FINAL"
    echo
    echo "paid gateway payments: $("$PY" -c 'import json,sys; p=json.load(sys.stdin)["payments"]; print(json.dumps({"session_cap": p["session_cap"], "session_hits": p["session_hits"], "facilitator": {k: p["facilitator"][k] for k in ("verifies", "settles")}, "ledger_open": p["ledger"]["open_sessions"]}))' <<<"$HEALTH")"
} | tee "$OUT/paid-summary.md"
