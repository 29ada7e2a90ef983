#!/usr/bin/env bash
# Inside the enclave: start nitriding, wait until it is up, then become the gateway.
#
# Process model (why `exec`, and who watches nitriding):
# - In a Nitro enclave, PID 1 is the EIF's init. It runs this script as its only child, blocks
#   every signal for itself, reaps orphans, and when its child exits it reboots, which ends the
#   enclave. `nitro-cli terminate-enclave` is a power-off: nobody gets a SIGTERM there.
# - Under `docker run` this script is PID 1 itself.
# Either way the last line `exec`s the gateway: the gateway keeps this PID, so it is init's
# child in the enclave (its exit ends the enclave) and PID 1 under docker (`docker stop`'s
# SIGTERM reaches it directly and starts its graceful drain, which settles open payments).
# No shell stays in between to swallow or mis-forward signals.
# - nitriding is started by a small watchdog subshell, which is its parent and `wait`s for it.
#   If nitriding ever exits, the watchdog logs it and sends the gateway (our PID, kept across
#   the exec) SIGTERM, then SIGKILL after NITRIDING_LOST_KILL_AFTER seconds: the enclave must not
#   run on without its TLS front, attestation and network. The gateway's exit ends the enclave.
#   Its exit status is then the gateway's own (0 after a clean drain), since after `exec` no
#   shell is left to choose one; the console line below is the record of why.
# - If nitriding does not open its internal port within NITRIDING_WAIT_SECONDS, or exits before
#   that, this script exits 1 before the gateway ever starts.
#
# Environment (baked into the image, hence measured): NITRIDING_FQDN (default localhost),
# NITRIDING_ACME=1 to add -acme, NITRIDING_WAIT_SECONDS (30), NITRIDING_LOST_KILL_AFTER (90),
# GATEWAY_HOST (127.0.0.1), GATEWAY_PORT (8000), OPERATOR_PORT (8001), NITRIDING_INTPORT (8080),
# APP_DIR (/app).

set -euo pipefail
# Two listeners: the public one on 127.0.0.1:GATEWAY_PORT, which nitriding proxies to (every
# public request arrives there from 127.0.0.1), and the operator listener on
# 0.0.0.0:OPERATOR_PORT, the only place POST /v1/keys is accepted. Nitriding never proxies to it;
# it is reached only through the host's loopback-only gvproxy forward (scripts/run-enclave.sh).

fqdn="${NITRIDING_FQDN:-localhost}"
intport="${NITRIDING_INTPORT:-8080}"
gw_host="${GATEWAY_HOST:-127.0.0.1}"
gw_port="${GATEWAY_PORT:-8000}"
op_port="${OPERATOR_PORT:-8001}"
wait_s="${NITRIDING_WAIT_SECONDS:-30}"
kill_after="${NITRIDING_LOST_KILL_AFTER:-90}" # > a full drain (~80 s)

log() { printf '[start.sh] %s\n' "$*" >&2; }

nitriding_args=(
    -fqdn "$fqdn"
    -appwebsrv "http://127.0.0.1:${gw_port}"
    -ext-pub-port 443
    -intport "$intport"
    -wait-for-app
)
case "${NITRIDING_ACME:-0}" in
    1 | true | yes) nitriding_args+=(-acme) ;;
    0 | false | no | "") ;;
    *) log "NITRIDING_ACME must be 0 or 1, not '${NITRIDING_ACME}'"; exit 2 ;;
esac

gateway_pid=$$ # `exec` below keeps this PID

(
    # The watchdog (a subshell: nitriding's parent, so it can `wait` for it).
    nitriding "${nitriding_args[@]}" &
    n_pid=$!
    # If someone signals the watchdog itself, pass it on to nitriding.
    trap 'kill -TERM "$n_pid" 2>/dev/null || true' TERM INT
    status=0
    wait "$n_pid" || status=$?
    # A trapped signal interrupts `wait`; wait again for the real exit.
    while kill -0 "$n_pid" 2>/dev/null; do wait "$n_pid" || status=$?; done
    log "FATAL: nitriding exited (status ${status}); stopping the gateway, the enclave ends"
    kill -TERM "$gateway_pid" 2>/dev/null || exit 1
    sleep "$kill_after"
    if kill -0 "$gateway_pid" 2>/dev/null; then
        log "gateway still running ${kill_after}s after SIGTERM; SIGKILL"
        kill -KILL "$gateway_pid" 2>/dev/null || true
    fi
    exit 1
) &
watchdog_pid=$!
log "nitriding starting (fqdn ${fqdn}, internal port ${intport}, backend ${gw_host}:${gw_port})"

# Until the exec, a SIGTERM from the watchdog means nitriding died during start-up.
trap 'log "nitriding exited during start-up"; exit 1' TERM

# Bounded wait for nitriding's internal API (the gateway registers its key there). A plain TCP
# connect: GET /enclave/ready must not be used as a probe, it is one-shot (the second call
# answers 410 and the gateway's own call would fail).
deadline=$((SECONDS + wait_s))
until (exec 3<>"/dev/tcp/127.0.0.1/${intport}") 2>/dev/null; do
    if ! kill -0 "$watchdog_pid" 2>/dev/null; then
        log "nitriding exited during start-up"
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        log "nitriding's internal port ${intport} did not open within ${wait_s}s"
        trap '' TERM # the watchdog will signal us as it goes down; keep our status 1
        kill -TERM "$watchdog_pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
log "nitriding is up; starting the gateway"
trap - TERM # the gateway installs its own SIGTERM handling (graceful drain)
# the gateway registers its key on nitriding's internal API (its --nitriding-url, by env)
export TRIO_GATEWAY_NITRIDING_URL="${TRIO_GATEWAY_NITRIDING_URL:-http://127.0.0.1:${intport}}"

cd "${APP_DIR:-/app}"
exec python -m trio_gateway --host "$gw_host" --port "$gw_port" \
    --operator-host 0.0.0.0 --operator-port "$op_port"
