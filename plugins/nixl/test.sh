#!/usr/bin/env bash
# Builds the TCPX NIXL plugin, prepares the venv and runs the Python tests
# against the PyPI NIXL agent. Quiet on success; prints the failing output.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

run() {
    if ! "$@" >"$log" 2>&1; then
        echo "FAILED: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

run cargo build --release --quiet -p tcpx-nixl --manifest-path "$root/Cargo.toml"
run "$here/setup-venv.sh"
export TCPX_NIXL_PLUGIN="$CARGO_TARGET_DIR/release/libplugin_TCPX.so"
run "${TCPX_NIXL_VENV:-$root/.venv}/bin/python" -m pytest -q -p no:cacheprovider "$here/tests"
# The summary line ("N passed in Xs") tells CI that tests ran.
tail -n 1 "$log"
