#!/usr/bin/env bash
# tcpx-bench against its baselines, in one run on this machine:
#  - throughput at 64 MiB messages vs iperf3 with the same number of TCP streams;
#  - small-message one-way latency vs a raw TCP ping-pong (tcpx-bench tcp-pingpong).
# Prints a table with the ratios. Needs iperf3 (apt-get install iperf3) and python3.
# BIN=path/to/tcpx-bench measures another build (e.g. main's) the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
NICS=${NICS:-127.0.0.1,127.0.0.2}
SOCKS=${SOCKS:-2}
SECS=${SECS:-5}
REPEAT=${REPEAT:-3}
command -v iperf3 >/dev/null || { echo "iperf3 missing: apt-get install iperf3" >&2; exit 1; }
if [ -n "${BIN:-}" ]; then
  B=$BIN
else
  cargo build --release --quiet --bin tcpx-bench
  B=target/release/tcpx-bench
fi
streams=$(( $(tr ',' '\n' <<<"$NICS" | wc -l) * SOCKS ))

iperf3 -s -1 -B 127.0.0.1 -p 5399 >/dev/null 2>&1 & sleep 0.5
best_iperf=0
for i in $(seq "$REPEAT"); do
  (( i > 1 )) && { iperf3 -s -1 -B 127.0.0.1 -p 5399 >/dev/null 2>&1 & sleep 0.5; }
  g=$(iperf3 -c 127.0.0.1 -p 5399 -P "$streams" -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e9)')
  best_iperf=$(python3 -c "print(max($best_iperf, $g))")
done
best_tcpx=0
for i in $(seq "$REPEAT"); do
  g=$($B --nics "$NICS" --sockets-per-nic "$SOCKS" --min-size 64M --max-size 64M --bytes-per-size 4G --json \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["gbytes_per_s"])')
  best_tcpx=$(python3 -c "print(max($best_tcpx, $g))")
done
tcp_lat=$($B tcp-pingpong --size 64 --iters 20000 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_us"])')
spin_lat=$($B tcp-pingpong --size 64 --iters 20000 --spin --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["p50_us"])')
our_lat=$($B --nics "$NICS" --sockets-per-nic "$SOCKS" --min-size 64 --max-size 64 --bytes-per-size 1M --json \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["p50_us"])')
python3 - "$streams" "$best_tcpx" "$best_iperf" "$our_lat" "$tcp_lat" "$spin_lat" <<'PY'
import sys
n, t, i, ol, tl, sl = int(sys.argv[1]), *map(float, sys.argv[2:])
print(f"machine: {open('/proc/cpuinfo').read().count('processor')} CPUs; streams: {n}")
print(f"| metric | tcpx-rs | baseline | ratio | target |")
print(f"|---|---|---|---|---|")
print(f"| 64 MiB throughput (GB/s, best of runs) | {t:.2f} | iperf3 -P {n}: {i:.2f} | {t/i:.2f}x | >= 0.9x |")
print(f"| 64 B one-way latency p50 (us) | {ol:.1f} | raw TCP ping-pong, blocking: {tl:.1f} | {ol/tl:.2f}x | <= 1.3x |")
print(f"| 64 B one-way latency p50 (us) | {ol:.1f} | raw TCP ping-pong, spinning: {sl:.1f} | {ol/sl:.2f}x | <= 1.3x |")
PY
