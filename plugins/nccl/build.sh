#!/usr/bin/env bash
# Builds the NCCL net plugin (release) and places it under NCCL's name:
#   <target>/release/libnccl-net-tcpx.so  (NCCL_NET_PLUGIN=tcpx finds it on
#   LD_LIBRARY_PATH; NCCL_NET_PLUGIN=<that full path> works anywhere).
# Cargo cannot name a cdylib with '-', so it writes libnccl_net_tcpx.so and we
# copy it (a copy, not a symlink, so the file can be shipped on its own).
# Honours CARGO_TARGET_DIR. Prints the path of the NCCL-named .so last.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

(cd "$root" && cargo build --release --lib -p tcpx-nccl-net)

src="$target/release/libnccl_net_tcpx.so"
dst="$target/release/libnccl-net-tcpx.so"
[ -f "$src" ] || { echo "build.sh: $src missing after the build" >&2; exit 1; }
cp -f "$src" "$dst.tmp"
mv -f "$dst.tmp" "$dst"
command -v nm >/dev/null && for v in 12 11 10 9 8; do
  nm -D --defined-only "$dst" | grep -q " ncclNetPlugin_v$v\$" \
    || { echo "build.sh: $dst does not export ncclNetPlugin_v$v" >&2; exit 1; }
done
echo "$dst"
