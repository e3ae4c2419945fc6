#!/usr/bin/env bash
# Small-message latency, RUNS consecutive runs. Each run measures the raw
# spinning TCP ping-pong (the baseline, same moment) and tcpx-bench's
# ping-pong (and, with BASE set, another build's), then prints p50/p99 and
# the targets: p50 <= 1.2x the raw spinning p50, p99 <= 3x its own p50.
# It also measures raw TCP with a connection per direction (raw2), the
# shape of a send comm and a receive comm: there each message's receiver
# sends a bare ACK that one connection would carry on the reply, and on
# loopback that ACK's trip through the stack is on the critical path;
# raw2pk is the same with peeking reads that drop the bytes at the next
# read (as tcpx reads its control sockets), which moves that ACK after
# the reply.
#   RUNS=10 SIZE=64 PINGS=5000 CPUS=0,1 BASE=/path/to/older/tcpx-bench benches/latency.sh
set -euo pipefail
cd "$(dirname "$0")/.."
B=${TCPX_BENCH:-target/release/tcpx-bench}
[ -x "$B" ] || cargo build --release --quiet --bin tcpx-bench
RUNS=${RUNS:-10}
SIZE=${SIZE:-64}
PINGS=${PINGS:-5000}
NICS=${NICS:-127.0.0.1,127.0.0.2}
pin=()
[ -n "${CPUS:-}" ] && pin=(taskset -c "$CPUS")
# The same ping count for the other build, where it takes one (older builds
# ping a fixed 400 times).
base_pings=()
if [ -n "${BASE:-}" ] && "$BASE" --help | grep -q -- --pings; then
  base_pings=(--pings "$PINGS")
fi
# Each run's output goes to a file before Python parses it: a parser started
# on a pipe spends its start-up beside the run it measures (on 2 vCPUs that
# moved tcpx's 64 B p50 from 2.9 to 3.7 µs).
out=$(mktemp)
trap 'rm -f "$out"' EXIT
json() {
  "$@" > "$out"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); r=r.get("results",[r])[0]; print(r["p50_us"], r["p99_us"])' "$out"
}
printf '%-4s %-10s %-10s %-10s %-10s %-10s %-10s %-8s %-9s %-8s %s\n' run raw_p50 raw_p99 raw2_p50 raw2pk_p50 p50 p99 p50/raw p50/raw2 p99/p50 ok
fails=0
for i in $(seq "$RUNS"); do
  read -r rp50 rp99 < <(json "${pin[@]}" "$B" tcp-pingpong --size "$SIZE" --iters "$PINGS" --spin --json)
  read -r r2p50 _ < <(json "${pin[@]}" "$B" tcp-pingpong --size "$SIZE" --iters "$PINGS" --spin --socket-per-direction --json)
  read -r r2kp50 _ < <(json "${pin[@]}" "$B" tcp-pingpong --size "$SIZE" --iters "$PINGS" --spin --peek --socket-per-direction --json)
  read -r p50 p99 < <(json "${pin[@]}" "$B" --nics "$NICS" --min-size "$SIZE" --max-size "$SIZE" --bytes-per-size 64K --pings "$PINGS" --json)
  base=""
  if [ -n "${BASE:-}" ]; then
    read -r b50 b99 < <(json "${pin[@]}" "$BASE" --nics "$NICS" --min-size "$SIZE" --max-size "$SIZE" --bytes-per-size 64K "${base_pings[@]}" --json)
    base=" base: p50 $b50 p99 $b99"
  fi
  ok=$(python3 -c "print('yes' if $p50 <= 1.2*$rp50 and $p99 <= 3*$p50 else 'NO')")
  [ "$ok" = yes ] || fails=$((fails + 1))
  printf '%-4s %-10.2f %-10.2f %-10.2f %-10.2f %-10.2f %-10.2f %-8.2f %-9.2f %-8.2f %s%s\n' "$i" "$rp50" "$rp99" "$r2p50" "$r2kp50" "$p50" "$p99" \
    "$(python3 -c "print($p50/$rp50)")" "$(python3 -c "print($p50/$r2p50)")" "$(python3 -c "print($p99/$p50)")" "$ok" "$base"
done
echo "runs missing a target: $fails of $RUNS"
