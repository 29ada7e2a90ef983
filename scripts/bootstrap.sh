#!/usr/bin/env bash
# Make the project's environment on a fresh machine: find Python >= 3.12, get uv, `uv sync --frozen`.
# Nothing is installed by hand; uv cannot download interpreters here, so we find an installed one.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local c v
    local candidates=()
    [ -n "${TRIO_GATEWAY_PYTHON:-}" ] && candidates+=("$TRIO_GATEWAY_PYTHON")
    candidates+=(python3.12 python3 python)
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    for c in "$pyenv_root"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -x "$c" ] && candidates+=("$c")
    done
    for c in "${candidates[@]}"; do
        command -v "$c" >/dev/null 2>&1 || continue
        v=$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
        if [ "$v" = "3.12" ]; then command -v "$c"; return 0; fi
    done
    return 1
}

if ! PY=$(find_python); then
    echo "bootstrap: no Python 3.12 found (looked at python3.12, python3, \$PYENV_ROOT/versions/3.12*)." >&2
    echo "bootstrap: install CPython 3.12 (e.g. 'pyenv install 3.12') or set TRIO_GATEWAY_PYTHON." >&2
    exit 1
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "bootstrap: uv not found; installing it from PyPI with pip" >&2
    "$PY" -m pip install --quiet --user uv 2>/dev/null || "$PY" -m pip install --quiet uv
    export PATH="$("$PY" -c 'import site,os; print(os.path.join(site.getuserbase(),"bin"))'):$PATH"
    hash -r
fi
if ! command -v uv >/dev/null 2>&1; then
    UV=("$PY" -m uv)
else
    UV=(uv)
fi

export UV_PYTHON="$PY" UV_PYTHON_DOWNLOADS=never
"${UV[@]}" sync --frozen --quiet
