#!/usr/bin/env bash
# Creates or refreshes the Python venv for the TCPX NIXL plugin tests and
# benchmark at <repo>/.venv. Idempotent: does nothing when it is up to date.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${TCPX_NIXL_VENV:-$root/.venv}"
nixl_version="$(tr -d '[:space:]' < "$here/NIXL_VERSION")"
stamp="$venv/.tcpx-nixl-$nixl_version"

if [[ -f "$stamp" && -x "$venv/bin/python" ]]; then
    exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# --no-deps: the wheel declares torch, which DRAM transfers do not need (5 GB).
"${pip[@]}" --no-deps "nixl-cu12==$nixl_version"
"${pip[@]}" numpy pytest
"$venv/bin/python" -c "import nixl_cu12._api" >/dev/null
touch "$stamp"
