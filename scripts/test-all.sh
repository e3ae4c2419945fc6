#!/usr/bin/env bash
# The full test suite, from a fresh clone: installs what it needs, then
# formatting, lints, and every test of the workspace (release build: the
# transfer tests move gigabytes).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v ip >/dev/null || need+=(iproute2)
command -v c++ >/dev/null || need+=(g++)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ -f /usr/include/linux/ethtool.h ]; then :; else need+=(linux-libc-dev); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing packages (run as root or install them): ${need[*]}" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
# Its own target dir: the tcpx lib is also a cdylib, so its rlib has no hash in
# its file name, and a check build's .rmeta beside it confuses later doctests.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/clippy" cargo clippy --workspace --all-targets --release -- -D warnings
echo "== fuzz targets compile (run them with cargo +nightly fuzz run <target>)"
cargo check --quiet --manifest-path fuzz/Cargo.toml
echo "== cargo test"
cargo test --workspace --release
echo "== NIXL plugin against the PyPI nixl agent"
./plugins/nixl/test.sh
