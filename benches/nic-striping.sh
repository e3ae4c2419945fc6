#!/usr/bin/env bash
# Striping over NICs of unequal speed, and losing one, between two network
# namespaces on this machine: one veth pair per data NIC (each its own /24,
# rate-limited with tc tbf on the sender's side unless its rate is 0) and
# one pair for control. Needs root and iproute2 (ip, tc); skips with a
# message where network namespaces cannot be made.
#
# For each case, in the same namespaces and the same run: each NIC alone,
# then all together; prints together / sum of singles (target >= 0.9x).
# The first case is issue 15's: an unlimited veth NIC beside one at 1 Gbit/s
# (before work-conserving striping, 11x slower than the fast NIC alone).
# Then failover: two equal NICs, one cut in the middle of the stream:
# throughput after the cut against the remaining NIC alone, and the time
# from the cut to the first re-sent chunk (and to the socket's retirement).
#
#   sudo benches/nic-striping.sh                 # this build
#   BASE=/tmp/main-target/release/tcpx-bench sudo -E benches/nic-striping.sh
#                                                # and another build, same namespaces
#   TCPX_BENCH=gpu-bin/tcpx-bench benches/nic-striping.sh   # a prebuilt binary
#
# Rates: veth and tbf on a small machine are CPU-bound, so in the ratio
# cases every NIC is limited (the fast one too) to keep the rate limit, not
# the CPU, the bottleneck; the bucket is 256 KB (a bucket smaller than a
# 64 KB GSO packet makes tbf split packets and cap near 0.5 Gbit/s).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-16M}
BYTES=${BYTES:-256M}
REPEAT=${REPEAT:-2}
STALL_MS=${STALL_MS:-500}
RX=tcpx-bench-rx-$$
TX=tcpx-bench-tx-$$

skip() { echo "nic-striping: skipped: $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root to make network namespaces (run it with sudo)"
command -v ip >/dev/null && command -v tc >/dev/null || skip "needs iproute2 (ip, tc): apt-get install iproute2"
ip netns add "$RX" 2>/dev/null || skip "ip netns add failed (no CAP_SYS_ADMIN, or a container without netns)"
ip netns del "$RX"

# TCPX_BENCH: a prebuilt binary (a machine without Rust, e.g. the GPU one).
if [ -n "${TCPX_BENCH:-}" ]; then
  B=$(realpath "$TCPX_BENCH")
else
  cargo build --release --quiet --bin tcpx-bench
  B=$PWD/target/release/tcpx-bench
fi
BINS=("$B")
[ -n "${BASE:-}" ] && BINS+=("$BASE")
LOGS=$(mktemp -d)
cleanup() { ip netns del "$RX" 2>/dev/null || true; ip netns del "$TX" 2>/dev/null || true; }
trap 'cleanup; rm -rf "$LOGS"' EXIT

# setup RATE... : one NIC per rate (Mbit/s; 0: not limited)
setup() {
  cleanup
  ip netns add "$RX"; ip netns add "$TX"
  local i=0
  for r in "$@" ctl; do
    local d=d$i n=$i
    [ "$r" = ctl ] && { d=ctl; n=200; }
    ip link add "$d" netns "$RX" type veth peer name "$d" netns "$TX"
    ip -n "$RX" addr add "10.253.$n.1/24" dev "$d"; ip -n "$TX" addr add "10.253.$n.2/24" dev "$d"
    ip -n "$RX" link set "$d" up; ip -n "$TX" link set "$d" up
    case $r in
      ctl | 0) ;;
      *) ip netns exec "$TX" tc qdisc add dev "$d" root tbf rate "${r}mbit" burst 256kb latency 10ms ;;
    esac
    i=$((i + 1))
  done
  ip -n "$RX" link set lo up; ip -n "$TX" link set lo up
}

# run BIN "NIC indices" BYTES [extra client args]: prints the client's JSON
# ('{}' if it failed; its log's tail goes to stderr)
run() {
  local bin=$1 idx=$2 bytes=$3; shift 3
  local rx="" tx=""
  for i in $idx; do rx+="10.253.$i.1,"; tx+="10.253.$i.2,"; done
  TCPX_CTRL_NIC=10.253.200.1 TCPX_STALL_TIMEOUT_MS=$STALL_MS ip netns exec "$RX" \
    "$bin" server 10.253.200.1:7477 --nics "${rx%,}" --workers-per-nic 1 >"$LOGS/server" 2>&1 &
  local srv=$!
  sleep 0.3
  TCPX_CTRL_NIC=10.253.200.2 TCPX_STALL_TIMEOUT_MS=$STALL_MS ip netns exec "$TX" \
    "$bin" client 10.253.200.1:7477 --nics "${tx%,}" --workers-per-nic 1 \
    --min-size "$SIZE" --max-size "$SIZE" --bytes-per-size "$bytes" --json "$@" 2>"$LOGS/client" || {
    echo '{}'
    { echo "client on NICs [$idx] failed:"; tail -3 "$LOGS/client"; echo "server:"; tail -3 "$LOGS/server"; } >&2
  }
  kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null || true
}

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["results"][0]["gbytes_per_s"] if d.get("results") else 0)'; }

# best of REPEAT runs (its JSON kept in $LOGS/best.json)
best() {
  local b=0 g
  for _ in $(seq "$REPEAT"); do
    run "$@" >"$LOGS/run.json"
    g=$(gbps <"$LOGS/run.json")
    python3 -c "import sys; sys.exit(not $g > $b)" && cp "$LOGS/run.json" "$LOGS/best.json"
    b=$(python3 -c "print(max($b, $g))")
  done
  echo "$b"
}

# Bytes the client's NICs sent (chunk headers, re-sends and tail copies
# included) over the payload it sent, from a run's JSON.
sent() { python3 -c 'import json,sys; d=json.load(sys.stdin); r=d.get("results") or [{}]; r=r[0]; p=r.get("size",0)*(r.get("iters",0)+1); s=sum(n["bytes_sent"] for n in d.get("nic_stats",[])); print(f"{s/1e6:.0f} MB / {p/1e6:.0f} MB = {s/p if p else 0:.2f}x")'; }

echo "machine: $(nproc) CPUs; messages of $SIZE, window 4, $BYTES per run (4x for an unlimited NIC), best of $REPEAT"
printf '| case | build | NICs alone (GB/s) | sum | together | together / sum | sent / payload, together |\n|---|---|---|---|---|---|---|\n'
# case_run NAME RATE...
case_run() {
  local name=$1; shift
  setup "$@"
  local n=$# bytes=$BYTES
  [[ " $* " == *" 0 "* ]] && bytes=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)([KMG]?)', sys.argv[1]); print(str(4*int(m[1]))+m[2])" "$BYTES")
  local all; all=$(seq 0 $((n - 1)) | tr '\n' ' ')
  for bin in "${BINS[@]}"; do
    local singles=() sum=0
    for i in $(seq 0 $((n - 1))); do
      local g; g=$(best "$bin" "$i" "$bytes" --pings 1)
      singles+=("$g"); sum=$(python3 -c "print($sum + $g)")
    done
    local tog; tog=$(best "$bin" "$all" "$bytes" --pings 1)
    local sent; sent=$(sent <"$LOGS/best.json")
    local label=this; [ "$bin" = "$B" ] || label=base
    [ "$label" = this ] && { FIRST[$name]=${singles[0]}; TOGETHER[$name]=$tog; }
    python3 - "$name" "$label" "$sum" "$tog" "$sent" "${singles[@]}" <<'PY'
import sys
name, label, s, t, sent, *singles = sys.argv[1:]
s, t = float(s), float(t)
print(f"| {name} | {label} | {' + '.join(f'{float(x):.3f}' for x in singles)} | {s:.3f} | {t:.3f} | {t / s if s else 0:.2f}x | {sent} |")
PY
  done
}
declare -A FIRST TOGETHER
ISSUE="1 unlimited + 1 at 1 Gbit/s (issue 15)" EQUAL="2 equal, unlimited"
case_run "$ISSUE" 0 1000
case_run "$EQUAL" 0 0
case_run "1 fast (3 Gbit/s) + 1 at 1 Gbit/s" 3000 1000
case_run "2 equal (2 Gbit/s each)" 2000 2000
case_run "4 at 4:2:1:1 (1600/800/400/400 Mbit/s)" 1600 800 400 400
python3 - "${TOGETHER[$ISSUE]}" "${FIRST[$ISSUE]}" "${TOGETHER[$EQUAL]}" <<'PY'
import sys
s, f, e = map(float, sys.argv[1:])
print(f"\nunlimited NIC + 1 Gbit/s NIC, striped: {s:.3f} GB/s = {s / f if f else 0:.2f}x the unlimited NIC alone ({f:.3f}), "
      f"{s / e if e else 0:.2f}x two unlimited NICs ({e:.3f})")
PY

echo
echo "failover: 2 NICs at 2 Gbit/s, NIC 1 cut after 2 s; stall timeout $STALL_MS ms"
printf '| build | NIC 0 alone (GB/s) | after the cut (GB/s) | after / alone | cut to first retirement (ms) | cut to first re-send or copy (ms) | cut to 0.9x alone again (ms) |\n|---|---|---|---|---|---|---|\n'
setup 2000 2000
for bin in "${BINS[@]}"; do
  if [ "$bin" != "$B" ]; then
    echo "| base | (no failover: a lost data socket fails the comm) | | | | | |"
    continue
  fi
  alone=$(best "$bin" 0 "$BYTES")
  out=$LOGS/failover.json
  run "$bin" "0 1" 2G --pings 1 --timeline-ms 10 >"$out" &
  cl=$!
  sleep 2
  cut=$(date +%s.%N)
  ip -n "$RX" link set d1 down
  wait "$cl" || true
  ip -n "$RX" link set d1 up
  python3 - "$out" "$cut" "$alone" this <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); cut = float(sys.argv[2]) * 1e3; alone = float(sys.argv[3])
tl = d.get("timeline") or []
if not tl:
    print(f"| {sys.argv[4]} | {alone:.3f} | failed: the client ended without results | | | | |")
    sys.exit()
def first(key):
    base = next((s[key] for s in tl if s["unix_ms"] >= cut), None)
    t = next((s["unix_ms"] for s in tl if s["unix_ms"] >= cut and s[key] > base), None)
    return f"{t - cut:.0f}" if t is not None else "none"
def rate(a, b):
    return (b["bytes_sent"] - a["bytes_sent"]) / ((b["unix_ms"] - a["unix_ms"]) / 1e3) / 1e9
# Steady state: from 1 s after the cut to the end of the throughput phase,
# the first sample with the run's last byte count (the timeline goes on
# through the ping and the teardown, when no byte moves).
end = next(s["unix_ms"] for s in tl if s["bytes_sent"] == tl[-1]["bytes_sent"])
after = [s for s in tl if cut + 1000 <= s["unix_ms"] <= end]
steady = rate(after[0], after[-1]) if len(after) > 1 else 0
# Recovered: after the rate (over 200 ms) dipped below 0.9x the NIC
# alone, the first such window at 0.9x again; its end, from the cut.
back, dipped = "no dip", False
for i, a in enumerate(tl):
    b = next((s for s in tl[i:] if s["unix_ms"] >= a["unix_ms"] + 200), None)
    if a["unix_ms"] < cut or b is None:
        continue
    ok = rate(a, b) >= 0.9 * alone
    if not ok and not dipped:
        dipped, back = True, "never"
    elif ok and dipped:
        back = f"{b['unix_ms'] - cut:.0f}"
        break
print(f"| {sys.argv[4]} | {alone:.3f} | {steady:.3f} | {steady / alone if alone else 0:.2f}x | {first('retired')} | {first('resent_chunks')} | {back} |")
PY
done
