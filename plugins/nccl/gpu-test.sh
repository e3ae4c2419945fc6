#!/usr/bin/env bash
# NCCL itself proves the plugin, on a machine with GPUs and PyTorch:
#   1. torch.distributed (NCCL backend), 2 ranks, all_reduce / all_gather /
#      send-recv from 8 B to 1 GiB with result checks, through our plugin
#      (NCCL_NET_PLUGIN=<our .so>, NCCL_NET=TCPX-rs);
#   2. the same through NCCL's built-in socket transport (NCCL_NET=Socket);
#   3. a busbw table of both and the ratio; NCCL's own log must show that it
#      loaded our plugin and used it (and Socket for the second run).
# P2P, SHM and NVLS are off so that every byte crosses the network plugin.
#
#   plugins/nccl/gpu-test.sh            # 2 GPUs: the full check
#   plugins/nccl/gpu-test.sh --ranks 1  # 1 GPU: NCCL loads + inits the plugin only
#
# The .so: $TCPX_NCCL_PLUGIN if set, else built here with build.sh (needs
# cargo), else target/release/libnccl-net-tcpx.so. Data NICs: $TCPX_NICS
# (default 127.0.0.1: both ranks on one host talk over loopback, and the
# Socket run is pinned to `lo` too, so the comparison is like for like).
# Logs and JSON land in $OUT_DIR (default a fresh temp dir), printed at the end.
# Each run is killed after $RUN_TIMEOUT seconds (default 300).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
ranks=2
max_bytes=$((1 << 30))
run_timeout=${RUN_TIMEOUT:-300}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ranks) ranks="$2"; shift 2 ;;
    --max-bytes) max_bytes="$2"; shift 2 ;;
    *) echo "usage: $0 [--ranks N] [--max-bytes B]" >&2; exit 2 ;;
  esac
done

so="${TCPX_NCCL_PLUGIN:-}"
if [[ -z "$so" ]]; then
  if command -v cargo >/dev/null; then
    so="$("$here/build.sh" | tail -1)" || { echo "gpu-test: build failed" >&2; exit 1; }
  else
    so="${CARGO_TARGET_DIR:-$root/target}/release/libnccl-net-tcpx.so"
  fi
fi
[[ -f "$so" ]] || { echo "gpu-test: plugin $so not found; set TCPX_NCCL_PLUGIN" >&2; exit 1; }
so="$(cd "$(dirname "$so")" && pwd)/$(basename "$so")"

out="${OUT_DIR:-$(mktemp -d /tmp/tcpx-nccl-gpu-test.XXXXXX)}"
mkdir -p "$out"
py="${PYTHON:-python3}"

# Shared by both runs. Multicast stays off (shared GPUs; see the device notes).
export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET
export TCPX_NICS="${TCPX_NICS:-127.0.0.1}"
unset NCCL_NET_PLUGIN NCCL_NET

nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader 2>/dev/null
"$py" -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())'

fail=0
run() { # name, then env assignments
  local name="$1"; shift
  echo "== $name: $*"
  # A stuck collective must not hang the script: each run has a deadline.
  timeout -k 10 "$run_timeout" env "$@" "$py" "$here/nccl_check.py" run --ranks "$ranks" \
    --max-bytes "$max_bytes" --out "$out/$name.json" >"$out/$name.log" 2>&1
  local rc=$?
  [[ $rc -eq 124 ]] && { echo "gpu-test: $name ran past ${run_timeout}s"; pkill -9 -f "nccl_check.py run"; }
  grep -E '^\[rank0\]' "$out/$name.log" | tail -3
  if [[ $rc -ne 0 ]]; then
    echo "gpu-test: $name run failed (rc $rc); last lines of $out/$name.log:"
    tail -30 "$out/$name.log"
    fail=1
  fi
}

run plugin NCCL_NET_PLUGIN="$so" NCCL_NET=TCPX-rs
run socket NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo

# NCCL's own words: the plugin was loaded, initialized (our data-path line
# went through NCCL's logger) and chosen; the control run used Socket.
need() { # file, regex, what
  if grep -qE "$2" "$1"; then echo "  ok: $3"; else echo "  MISSING: $3 (/$2/ in $1)"; fail=1; fi
}
echo "== NCCL log checks"
need "$out/plugin.log" 'NET/Plugin: Loaded net plugin TCPX-rs \(v[0-9]+\)' "NCCL loaded our plugin"
need "$out/plugin.log" 'NET/TCPX-rs : dev 0 .* data path' "our init logged through NCCL's logger"
need "$out/plugin.log" 'Using network TCPX-rs' "NCCL used our plugin"
need "$out/socket.log" 'Using network Socket' "control run used NCCL's Socket transport"
grep -hE 'Loaded net plugin|Using network|NET/TCPX-rs : (dev|initialized)' "$out/plugin.log" | sort -u | head -8

if [[ $ranks -ge 2 && -f "$out/plugin.json" && -f "$out/socket.json" ]]; then
  echo "== busbw (GB/s), nccl-tests convention; ratio = TCPX-rs / Socket"
  "$py" "$here/nccl_check.py" table "$out/plugin.json" "$out/socket.json" || fail=1
fi
echo "logs: $out"
if [[ $fail -eq 0 ]]; then echo "gpu-test: PASS"; else echo "gpu-test: FAIL"; fi
exit $fail
