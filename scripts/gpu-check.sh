#!/usr/bin/env bash
# CUDA tests and benches for the GPU machine.
#   --build  (here, any x86-64 Linux with Rust): builds every CUDA test and
#            bench binary in release and copies them into gpu-bin/.
#   --run    (there, no Rust needed): runs them from gpu-bin/ and prints a
#            table: test, result, figure; then, where plugins/nixl/gpu-bundle.sh
#            left .nixlgpu/ (the NIXL agent and our plugin), the NIXL sweep
#            through the real agent, VRAM and DRAM (its own table).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${GPU_BIN:-gpu-bin}
TARGET=${CARGO_TARGET_DIR:-target}
# package:test pairs whose test binaries run on the GPU machine
PAIRS="tcpx:cuda_bounce tcpx:cuda_devmem tcpx:devmem_gpu tcpx:devmem_require devmem:cuda_gpu devmem:emu_cuda_unpack devmem:emu_gpu_pool tcpx-nixl:vram tcpx-nccl-net:gdr_pattern"
TESTS=$(for pt in $PAIRS; do printf '%s ' "${pt#*:}"; done)

build() {
  set -e
  mkdir -p "$BIN"
  for pt in $PAIRS; do
    local p=${pt%%:*} t=${pt#*:}
    cargo test --release -p "$p" --test "$t" --no-run --message-format=json |
      python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$t" |
      tail -1 | xargs -I{} cp {} "$BIN/$t"
  done
  cargo build --release --bin tcpx-gpu-bench
  cp "$TARGET/release/tcpx-gpu-bench" "$BIN/"
  # gdr_pattern dlopens the NCCL plugin from beside itself.
  cargo build --release -p tcpx-nccl-net --lib
  cp "$TARGET/release/libnccl_net_tcpx.so" "$BIN/libnccl-net-tcpx.so"
  # Debug info would push the folder past what the device tool carries (64 MiB).
  for t in $TESTS tcpx-gpu-bench libnccl-net-tcpx.so; do strip --strip-debug "$BIN/$t"; done
  ls -la "$BIN"
}

run() {
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib"
  local rows=() log
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
  for t in $TESTS; do
    log=$(mktemp)
    if timeout "${GPU_TEST_TIMEOUT:-300}" "$BIN/$t" --test-threads=1 --nocapture >"$log" 2>&1; then res=PASS; else res=FAIL; fi
    cat "$log"
    while read -r line; do
      name=$(sed -E 's/^test ([^ ]+) \.\.\. .*/\1/' <<<"$line")
      r=$(sed -E 's/.* \.\.\. //' <<<"$line")
      rows+=("$t::$name|$r|")
    done < <(grep -E '^test .* \.\.\. (ok|FAILED|ignored)' "$log")
    rows+=("$t (binary)|$res|$(grep -E 'byte-exact|imported|DMA-BUF|bind probe' "$log" | tr '\n' ' ')")
    while read -r line; do
      rows+=("$t ${line#ROW }")
    done < <(grep '^ROW ' "$log" | sed -E 's/ \| /|'"$res"'|/')
  done
  log=$(mktemp)
  if timeout "${GPU_TEST_TIMEOUT:-300}" "$BIN/tcpx-gpu-bench" >"$log" 2>&1; then res=PASS; else res=FAIL; fi
  cat "$log"
  while read -r line; do
    rows+=("bench ${line#ROW }")
  done < <(grep '^ROW ' "$log" | sed -E 's/ \| /|'"$res"'|/')
  printf '\n%-60s | %-6s | %s\n' test result figure
  printf '%s\n' "------------------------------------------------------------------------------------------"
  for r in "${rows[@]}"; do
    IFS='|' read -r a b c <<<"$r"
    printf '%-60s | %-6s | %s\n' "$a" "$b" "$c"
  done
  nixl_sweep
}

# The KV-cache-shaped NIXL sweep through the real agent (two processes,
# metadata through the agents' listener), VRAM and DRAM on both sides.
nixl_sweep() {
  if [ ! -d .nixlgpu/site ]; then
    echo "NIXL sweep skipped: no .nixlgpu/ (run plugins/nixl/gpu-bundle.sh on the build machine)"
    return
  fi
  PYTHONPATH=$PWD/.nixlgpu/site timeout "${GPU_SWEEP_TIMEOUT:-300}" python3 python/benchmark_nixl.py --sweep \
    --backend TCPX --device gpu --plugin .nixlgpu/plugin/libplugin_TCPX.so --mems VRAM:VRAM,DRAM:DRAM \
    --block-sizes 8K,64K,1M --batch-sizes 1,128,256 --max-transfer 256M --iters 100 \
    ${GPU_SWEEP_JSON:+--json "$GPU_SWEEP_JSON"} || echo "NIXL sweep FAILED (exit $?)"
}

case "${1:-}" in
  --build) build ;;
  --run) run ;;
  *) echo "usage: $0 --build | --run" >&2; exit 2 ;;
esac
