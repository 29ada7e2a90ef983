#!/usr/bin/env bash
# Host side (the parent EC2 instance): launch a built EIF, wire its network, record and check its
# measurements, then inject the provider keys once. Builds nothing: see `make eif`.
set -euo pipefail

prog=$(basename "$0")
usage() {
    cat <<EOF
Usage: $prog [options] EIF_PATH

Runs on the parent EC2 instance, as a user allowed to use nitro-cli and vsock (usually root).
  1. nitro-cli terminate-enclave --all   (stops any enclave already running)
  2. starts gvproxy and forwards host :443 (public) to the enclave's 192.168.127.2:443 and
     host 127.0.0.1:8000 (loopback only) to the enclave's operator listener :8001
  3. nitro-cli run-enclave with the EIF
  4. writes the enclave's measurements (PCR0/1/2) to the measurements file; if that file
     already holds PCRs (the committed, reproducibly built ones), they must match, or the
     script stops here and injects nothing
  5. waits (bounded) for http://127.0.0.1:8000/health
  6. POSTs /v1/keys once, built with jq from the env file; secret values are never printed
     and never appear on a command line

Options:
  --cpu N              vCPUs for the enclave (default ${ENCLAVE_CPUS:-2}; env ENCLAVE_CPUS)
  --memory MiB         enclave memory in MiB (default ${ENCLAVE_MEMORY_MIB:-8192}; env ENCLAVE_MEMORY_MIB)
  --cid N              enclave CID (default ${ENCLAVE_CID:-16}; env ENCLAVE_CID)
  --env-file FILE      key/config file (default .env; env ENV_FILE)
  --measurements FILE  measurements file to write or check (default measurements.txt)
  --health-tries N     /health polls, 2 s apart (default 90)
  --no-keys            do not inject keys (do it later by hand)
  --trust-first-measurement
                       when the measurements file has no PCRs yet, still inject keys into
                       this enclave (default: record the PCRs and inject nothing)
  --debug-mode         nitro-cli --debug-mode: console access, but attestation documents then
                       carry all-zero PCRs, so clients cannot verify this enclave
  -h, --help           this text

Env file: KEY=VALUE lines (optional 'export ', optional quotes, # comments). Recognised keys
(upper-case or the lower-case JSON name): OPENAI_API_KEY, ANTHROPIC_API_KEY, GOOGLE_API_KEY,
XAI_API_KEY, BYTEDANCE_API_KEY, NOUS_API_KEY, FACILITATOR_URL, PAY_TO_ADDRESS, NETWORK,
HEARTBEAT_CONTRACT_ADDRESS, TEE_HEARTBEAT_INTERVAL (integer), TEE_HEARTBEAT_BUFFER (integer).
Empty values are left out of the request.
EOF
}

die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 1; }
log() { printf '[%s] %s\n' "$prog" "$*" >&2; }

cpus="${ENCLAVE_CPUS:-2}"
memory="${ENCLAVE_MEMORY_MIB:-8192}"
cid="${ENCLAVE_CID:-16}"
env_file="${ENV_FILE:-.env}"
measurements="measurements.txt"
health_tries=90
inject=1
debug=0
trust_first=0
eif=""
gw="${GATEWAY_URL:-http://127.0.0.1:8000}" # the loopback forward; overridable for testing

while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --cpu) cpus="${2:?--cpu needs a value}"; shift 2 ;;
        --memory) memory="${2:?--memory needs a value}"; shift 2 ;;
        --cid) cid="${2:?--cid needs a value}"; shift 2 ;;
        --env-file) env_file="${2:?--env-file needs a value}"; shift 2 ;;
        --measurements) measurements="${2:?--measurements needs a value}"; shift 2 ;;
        --health-tries) health_tries="${2:?--health-tries needs a value}"; shift 2 ;;
        --no-keys) inject=0; shift ;;
        --trust-first-measurement) trust_first=1; shift ;;
        --debug-mode) debug=1; shift ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) [ -z "$eif" ] || die "only one EIF_PATH, got '$eif' and '$1'"; eif="$1"; shift ;;
    esac
done
[ -n "$eif" ] || { usage >&2; die "EIF_PATH is required"; }
[ -f "$eif" ] || die "no such EIF: $eif"
for n in "$cpus" "$memory" "$cid" "$health_tries"; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: $n"
done

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH: $2"
}
need nitro-cli "install the AWS Nitro Enclaves CLI (aws-nitro-enclaves-cli) on this instance"
need gvproxy "build it from github.com/containers/gvisor-tap-vsock (cmd/gvproxy) and put it on PATH"
need jq "install jq (used to read nitro-cli output and to build the /v1/keys body)"
need curl "install curl"
if ((inject)); then
    [ -f "$env_file" ] || die "env file '$env_file' not found (--env-file, or --no-keys to skip injection)"
    perms=$(stat -c '%a' "$env_file")
    [[ "$perms" =~ 00$ ]] || log "warning: $env_file is readable by group/others (mode $perms); chmod 600 it"
fi

run_dir="${XDG_RUNTIME_DIR:-/run}/trio-gateway"
mkdir -p "$run_dir"
gv_sock="$run_dir/gvproxy.sock"
gv_pidfile="$run_dir/gvproxy.pid"
gv_log="$run_dir/gvproxy.log"

# ---------------------------------------------------------------- 1. stop what was running
log "terminating any running enclave"
nitro-cli terminate-enclave --all >/dev/null
if [ -f "$gv_pidfile" ]; then
    old=$(cat "$gv_pidfile")
    # only the gvproxy this script started (the pid file), and only if it still is gvproxy
    if [[ "$old" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$old/comm" 2>/dev/null)" = gvproxy ]; then
        log "stopping the previous gvproxy (pid $old)"
        kill "$old"
        for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$gv_pidfile"
fi

# ---------------------------------------------------------------- 2. gvproxy + forwards
rm -f "$gv_sock"
log "starting gvproxy (log: $gv_log)"
nohup gvproxy -listen vsock://:1024 -listen "unix://$gv_sock" >"$gv_log" 2>&1 &
echo $! >"$gv_pidfile"
for _ in $(seq 100); do [ -S "$gv_sock" ] && break; sleep 0.1; done
[ -S "$gv_sock" ] || die "gvproxy did not create $gv_sock within 10 s (see $gv_log)"
expose() {
    local body="{\"local\":\"$1\",\"remote\":\"$2\"}"
    curl -fsS --max-time 10 --unix-socket "$gv_sock" -X POST -d "$body" \
        http://gvproxy/services/forwarder/expose >/dev/null ||
        die "gvproxy refused the forward $1 -> $2"
}
expose ":443" "192.168.127.2:443"           # public: nitriding's TLS port
# loopback only: the gateway's operator listener (health and key injection; see start.sh)
expose "127.0.0.1:8000" "192.168.127.2:${OPERATOR_PORT:-8001}"

# ---------------------------------------------------------------- 3. the enclave
run_args=(--cpu-count "$cpus" --memory "$memory" --enclave-cid "$cid" --eif-path "$eif")
((debug)) && run_args+=(--debug-mode) && log "WARNING: --debug-mode: attestation PCRs are all zero"
log "nitro-cli run-enclave ${run_args[*]}"
run_json=$(nitro-cli run-enclave "${run_args[@]}")
enclave_id=$(jq -r '.EnclaveID // empty' <<<"$run_json")
[ -n "$enclave_id" ] || die "nitro-cli run-enclave gave no EnclaveID: $run_json"
log "enclave $enclave_id running"

# ---------------------------------------------------------------- 4. measurements
pcr_filter='(if type == "array" then .[0] else . end) | .Measurements // empty
    | {HashAlgorithm, PCR0, PCR1, PCR2}'
measured=$(nitro-cli describe-enclaves | jq -c "$pcr_filter" 2>/dev/null || true)
source_cmd="nitro-cli describe-enclaves"
if [ -z "$measured" ] || [ "$(jq -r '.PCR0 // empty' <<<"$measured")" = "" ]; then
    measured=$(nitro-cli describe-eif --eif-path "$eif" | jq -c "$pcr_filter")
    source_cmd="nitro-cli describe-eif"
fi
[ -n "$measured" ] || die "no Measurements from nitro-cli describe-enclaves/describe-eif"
log "PCR0 $(jq -r .PCR0 <<<"$measured") (from $source_cmd)"
if [ -f "$measurements" ] && [ "$(jq -r '.Measurements.PCR0 // empty' "$measurements")" != "" ]; then
    for k in PCR0 PCR1 PCR2; do
        want=$(jq -r ".Measurements.$k" "$measurements")
        got=$(jq -r ".$k" <<<"$measured")
        if [ "$want" != "$got" ]; then
            log "MISMATCH $k: $measurements has $want"
            log "         $k: the running enclave has $got"
            die "the EIF is not the reproducibly built one recorded in $measurements; no keys injected (the enclave is still running: nitro-cli terminate-enclave --all)"
        fi
    done
    log "PCR0/1/2 match $measurements"
else
    tmp=$(mktemp)
    if [ -f "$measurements" ]; then
        jq --argjson m "$measured" --arg src "$source_cmd" \
            '.Measurements = ((.Measurements // {}) + $m + {MeasuredWith: $src})
             | del(.Measurements.Status, .Measurements.HowToMeasure)' "$measurements" >"$tmp"
    else
        jq -n --argjson m "$measured" --arg src "$source_cmd" \
            '{Measurements: ($m + {MeasuredWith: $src})}' >"$tmp"
    fi
    mv "$tmp" "$measurements"
    log "wrote the measurements to $measurements (it had none: compare them with a reproducible build)"
    if ((inject)) && ((!trust_first)); then
        # trust on first use is a decision, not a default: keys go only into a measured enclave
        log "no keys injected: $measurements had no PCRs to check this enclave against."
        log "Compare the PCRs above with a reproducible build (make image twice, make eif), commit"
        log "them, then rerun; or pass --trust-first-measurement to inject into this one anyway."
        inject=0
    fi
fi

# ---------------------------------------------------------------- 5. health
log "waiting for $gw/health (up to $((health_tries * 2)) s)"
ok=0
for _ in $(seq "$health_tries"); do
    if curl -fsS --max-time 3 "$gw/health" >/dev/null 2>&1; then ok=1; break; fi
    sleep 2
done
((ok)) || die "the gateway did not answer /health through the loopback forward (console: nitro-cli console --enclave-id $enclave_id, needs --debug-mode)"
log "gateway is up"

# ---------------------------------------------------------------- 6. keys, once
if ((!inject)); then
    log "--no-keys: not injecting; the gateway answers inference with 503 until someone does"
    exit 0
fi

# Parse the env file without executing it; values only ever live in this shell's memory and in
# jq's environment (never on a command line, which other users can read in /proc).
declare -A cfg=()
while IFS= read -r line || [ -n "$line" ]; do
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    line="${line#export }"
    [[ "$line" == *=* ]] || continue
    key="${line%%=*}"
    key="${key//[[:space:]]/}"
    val="${line#*=}"
    if [[ "$val" =~ ^\"(.*)\"$ || "$val" =~ ^\'(.*)\'$ ]]; then val="${BASH_REMATCH[1]}"; fi
    cfg["${key,,}"]="$val"
done <"$env_file"

fields=(openai_api_key anthropic_api_key google_api_key xai_api_key bytedance_api_key
    nous_api_key facilitator_url pay_to_address network heartbeat_contract_address
    tee_heartbeat_interval tee_heartbeat_buffer)
for f in tee_heartbeat_interval tee_heartbeat_buffer; do
    v="${cfg[$f]:-}"
    [ -z "$v" ] || [[ "$v" =~ ^[0-9]+$ ]] || die "$f in $env_file must be a whole number"
done

body=$(
    for f in "${fields[@]}"; do export "TG_KEY_${f}=${cfg[$f]:-}"; done
    # shellcheck disable=SC2016 # $ENV is jq's, not the shell's
    jq -n '
        [ "openai_api_key", "anthropic_api_key", "google_api_key", "xai_api_key",
          "bytedance_api_key", "nous_api_key", "facilitator_url", "pay_to_address", "network",
          "heartbeat_contract_address", "tee_heartbeat_interval", "tee_heartbeat_buffer" ]
        | map({key: ., value: $ENV["TG_KEY_" + .]})
        | map(select(.value != null and .value != ""))
        | map(if (.key | startswith("tee_heartbeat_")) then .value |= tonumber else . end)
        | from_entries'
)
[ "$(jq 'length' <<<"$body")" -gt 0 ] || die "$env_file sets none of the recognised keys"
log "injecting: $(jq -r 'keys | join(", ")' <<<"$body")"

resp_file=$(mktemp)
trap 'rm -f "$resp_file"' EXIT
status=$(curl -sS --max-time 60 -o "$resp_file" -w '%{http_code}' \
    -H 'Content-Type: application/json' --data-binary @- \
    "$gw/v1/keys" <<<"$body") || die "POST /v1/keys failed to connect"
unset body cfg
case "$status" in
    200)
        log "keys installed: $(jq -c '{providers_initialized, heartbeat_enabled} + (if has("payments") then {payments} else {} end)' "$resp_file" 2>/dev/null || echo ok)"
        ;;
    409)
        die "409: keys were ALREADY installed in this fresh enclave, by someone else. Do not use it: nitro-cli terminate-enclave --all, and find out how /v1/keys was reached"
        ;;
    403)
        die "403 from /v1/keys: $(jq -r '.error.message // .error // .' "$resp_file" 2>/dev/null) (the forward must reach the gateway's operator listener, OPERATOR_PORT in start.sh)"
        ;;
    *)
        die "POST /v1/keys answered $status: $(jq -c '.error // .' "$resp_file" 2>/dev/null || head -c 300 "$resp_file")"
        ;;
esac

cat >&2 <<EOF
[$prog] done. Check:
  curl -s $gw/health | jq
  curl -s $gw/heartbeat/status | jq   (if heartbeats are configured)
  curl -sk https://127.0.0.1/enclave/attestation?nonce=\$(openssl rand -hex 20)   (public path)
gvproxy keeps running (pid $(cat "$gv_pidfile"), log $gv_log).
EOF
