#!/usr/bin/env bash
# Bundles what benchmark_nixl.py needs on the GPU machine, which has PyTorch
# and CUDA 13 but no network and no nixl wheel: the nixl-cu13 wheel of the
# pinned release (NIXL_VERSION), cut down to the Python package and the
# shared libraries it loads (the full wheel is too large to carry), plus our
# plugin. Output: .nixlgpu/ (git-ignored: add `/.nixlgpu/` to .git/info/exclude).
#
#   plugins/nixl/gpu-bundle.sh
#   # on the GPU machine, from the repository root:
#   PYTHONPATH=$PWD/.nixlgpu/site python3 python/benchmark_nixl.py --backend TCPX \
#       --device gpu --plugin .nixlgpu/plugin/libplugin_TCPX.so
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
version="$(cat "$here/NIXL_VERSION")"
out="$root/.nixlgpu"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$root" && cargo build --release -p tcpx-nixl)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 "nixl-cu13==$version" -d "$tmp"
python3 -m zipfile -e "$tmp"/nixl_cu13-*.whl "$tmp/x"

rm -rf "$out"
mkdir -p "$out/site/nixl_cu13.libs" "$out/plugin"
cp -r "$tmp/x/nixl_cu13" "$tmp/x/.nixl_cu13.mesonpy.libs" "$out/site/"
rm -rf "$out/site/.nixl_cu13.mesonpy.libs/plugins"  # NIXL_PLUGIN_DIR replaces it
# Only the libraries the bindings load (the wheel's plugins and their
# dependencies stay behind; NIXL_PLUGIN_DIR points at ours).
export LD_LIBRARY_PATH="$tmp/x/.nixl_cu13.mesonpy.libs:$tmp/x/nixl_cu13.libs"
for so in "$tmp"/x/nixl_cu13/*.so; do ldd "$so"; done | awk '{print $3}' |
  grep '/nixl_cu13.libs/' | sort -u | xargs -I{} cp {} "$out/site/nixl_cu13.libs/"
cp "$root/target/release/libplugin_TCPX.so" "$out/plugin/"
strip --strip-debug "$out/plugin/libplugin_TCPX.so"
# The wheel's libraries keep symbol tables they do not link by: without
# them the bundle fits beside gpu-bin/ in one device call (64 MiB).
find "$out/site" -name '*.so*' -type f -exec strip --strip-unneeded {} +
du -sh "$out"
