#!/usr/bin/env bash
# `make bench`: the mock provider and the gateway on loopback, then ../shared/bench's scenarios.
# Gateway pinned to CPU 0; mock provider and load generator to CPU 1 (as in shared/bench/README.md).
# Results: bench/results/results.jsonl and bench/results/summary.md. Not a test: figures, no asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH_DIR:-../shared/bench}
OUT=bench/results
MOCK_PORT=${MOCK_PORT:-18500}
GW_PORT=${GW_PORT:-18600}
PY=.venv/bin/python
LOADPY=${LOADPY:-$PY}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

pin() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
# start a server in the background, pinned; $! is then the server itself (taskset execs it)
spawn() { if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then taskset -c "$1" "${@:2}" & else "${@:2}" & fi; }
wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }

cleanup() {
    kill "${GW:-}" "${MOCK:-}" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "${GW:-}" 2>/dev/null || break; sleep 0.1; done
    kill -9 "${GW:-}" "${MOCK:-}" 2>/dev/null || true
}
trap cleanup EXIT
for p in "$MOCK_PORT" "$GW_PORT"; do
    if curl -s -o /dev/null "http://127.0.0.1:$p/"; then echo "port $p is already in use" >&2; exit 1; fi
done

spawn 1 "$LOADPY" "$BENCH/mock_upstream.py" --port "$MOCK_PORT" --parent-pid $$ >"$OUT/mock.log" 2>&1
MOCK=$!
wait_http "http://127.0.0.1:$MOCK_PORT/health"

OPENAI_BASE_URL="http://127.0.0.1:$MOCK_PORT/v1" OPENAI_API_KEY=sk-bench \
ANTHROPIC_BASE_URL="http://127.0.0.1:$MOCK_PORT" ANTHROPIC_API_KEY=sk-bench \
    spawn 0 "$PY" -m trio_gateway --dev --port "$GW_PORT" --log-level WARNING >"$OUT/gateway.log" 2>&1
GW=$!
wait_http "http://127.0.0.1:$GW_PORT/health"

LG=(pin 1 "$LOADPY" "$BENCH/loadgen.py")
COMMON=(--url "http://127.0.0.1:$GW_PORT" --gateway-pid "$GW" --model gpt-4.1 --label trio_gateway --out "$OUT/results.jsonl")
N=500; [ "$QUICK" = 1 ] && N=100

"${LG[@]}" overhead "${COMMON[@]}" --direct-url "http://127.0.0.1:$MOCK_PORT" -n "$N" -c 8
"${LG[@]}" streams "${COMMON[@]}" --mock-url "http://127.0.0.1:$MOCK_PORT" -c 100 --tokens 100 --delay-ms 20
[ "$QUICK" = 1 ] || "${LG[@]}" streams "${COMMON[@]}" --mock-url "http://127.0.0.1:$MOCK_PORT" -c 500 --tokens 50 --delay-ms 20 --ramp-ms 500
D=("${LG[@]}" disconnect "${COMMON[@]}" --mock-url "http://127.0.0.1:$MOCK_PORT" -s 20)
"${D[@]}" -k 5 --tokens 300                                              # mid-stream
"${D[@]}" -k 5 --tokens 300 --abort-mode rst                              # mid-stream, RST
"${D[@]}" -k 5 --abort-at-ms 300 --ttft-ms 3000                           # during TTFT, head sent
"${D[@]}" -k 5 --abort-at-ms 300 --ttft-ms 3000 --hold-headers            # during TTFT, head held
"${D[@]}" --nonstream --abort-at-ms 300 --ttft-ms 3000                    # non-streaming abandoned
"${D[@]}" -k 5 --tokens 300 --model claude-sonnet-4-5                     # mid-stream, Anthropic-style upstream
"${D[@]}" -k 5 --tokens 300 --model claude-sonnet-4-5 --abort-mode rst    # the same with RST
"$LOADPY" "$BENCH/summarize.py" "$OUT/results.jsonl" | tee "$OUT/summary.md"
