#!/usr/bin/env bash
# Bounded atheris run of every harness in parallel (used by `make fuzz`).
#   FUZZ_SECONDS  per-harness wall time (libFuzzer -max_total_time), default 60
#   FUZZ_HARNESSES  space-separated subset, default all fuzz/fuzz_*.py
#   FUZZ_NICE     niceness, default 10;  FUZZ_ARGS  extra libFuzzer flags
# The committed seed corpus is copied to a temp dir, so a run never adds files to fuzz/corpus/.
# Crashing inputs go to fuzz/crashes/<harness>/, logs to $FUZZ_LOGS (default fuzz/logs/; both git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SECONDS_EACH=${FUZZ_SECONDS:-60}
NICE=${FUZZ_NICE:-10}
LOGS=${FUZZ_LOGS:-fuzz/logs}
HARNESSES=${FUZZ_HARNESSES:-$(cd fuzz && ls fuzz_*.py | sed 's/^fuzz_//; s/\.py$//')}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$LOGS"
declare -A pids
for h in $HARNESSES; do
    mkdir -p "$work/$h" "fuzz/crashes/$h"
    cp fuzz/corpus/"$h"/* "$work/$h/" 2>/dev/null || true
    # shellcheck disable=SC2086
    nice -n "$NICE" "$PY" "fuzz/fuzz_$h.py" -max_total_time="$SECONDS_EACH" -timeout=20 \
        -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="fuzz/crashes/$h/" \
        ${FUZZ_ARGS:-} "$work/$h" >"$LOGS/$h.log" 2>&1 &
    pids[$h]=$!
done
status=0
total=0
for h in $HARNESSES; do
    wait "${pids[$h]}"
    rc=$?
    runs=$(grep -oE "^Done [0-9]+ runs" "$LOGS/$h.log" | awk '{s += $2} END {print s + 0}')
    if [ "$runs" -eq 0 ]; then  # interrupted: libFuzzer printed only its final stats
        runs=$(grep -oE "^stat::number_of_executed_units: [0-9]+" "$LOGS/$h.log" | awk '{s += $2} END {print s + 0}')
    fi
    total=$((total + runs))
    printf '%-15s rc=%-3s runs=%s\n' "$h" "$rc" "$runs"
    if [ "$rc" -ne 0 ]; then
        status=1
        grep -A20 -E 'Uncaught Python exception|ERROR: libFuzzer' "$LOGS/$h.log" | head -40
    fi
done
echo "total executions: $total"
exit $status
