#!/usr/bin/env bash
# Engine x zero-copy x message size on this machine, with iperf3 (plain and
# --zerocopy) as the baseline measured in the same run. Prints a markdown table
# of GB/s and CPU seconds per GB. Needs iperf3 and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
NICS=${NICS:-127.0.0.1,127.0.0.2}
SOCKS=${SOCKS:-2}
SIZES=${SIZES:-64K 1M 16M 64M}
command -v iperf3 >/dev/null || { echo "iperf3 missing: apt-get install iperf3" >&2; exit 1; }
cargo build --release --quiet --bin tcpx-bench
B=target/release/tcpx-bench
streams=$(( $(tr ',' '\n' <<<"$NICS" | wc -l) * SOCKS ))
out=$(mktemp -d)
for engine in epoll uring; do
  for zc in off on auto; do
    $B --nics "$NICS" --sockets-per-nic "$SOCKS" --engine $engine --zerocopy $zc \
       --min-size 64K --max-size 64M --bytes-per-size 1G --json > "$out/$engine-$zc.json"
  done
done
for z in "" "-Z"; do
  iperf3 -s -1 -B 127.0.0.1 -p 5398 >/dev/null 2>&1 & sleep 0.5
  iperf3 -c 127.0.0.1 -p 5398 -P "$streams" -t 5 $z -J > "$out/iperf3$z.json"
done
python3 - "$out" "$SIZES" "$streams" <<'PY'
import json, sys, os
out, sizes, streams = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def parse(s):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s)
def iperf(name):
    j = json.load(open(os.path.join(out, name)))
    e = j["end"]
    gbs = e["sum_received"]["bits_per_second"] / 8e9
    cpu = e["cpu_utilization_percent"]
    return gbs, cpu["host_total"], cpu["remote_total"]
ip, ipz = iperf("iperf3.json"), iperf("iperf3-Z.json")
print(f"iperf3 -P {streams}: {ip[0]:.2f} GB/s (CPU sender {ip[1]:.0f}%, receiver {ip[2]:.0f}%); "
      f"iperf3 -P {streams} --zerocopy: {ipz[0]:.2f} GB/s (CPU sender {ipz[1]:.0f}%, receiver {ipz[2]:.0f}%)")
print()
print("| engine | zerocopy | " + " | ".join(f"{s} GB/s (CPU s/GB)" for s in sizes) + " | 64M vs iperf3 |")
print("|---|---|" + "---|" * (len(sizes) + 1))
for engine in ("epoll", "uring"):
    for zc in ("off", "on", "auto"):
        j = json.load(open(os.path.join(out, f"{engine}-{zc}.json")))
        rows = {r["size"]: r for r in j["results"]}
        cells = [f"{rows[parse(s)]['gbytes_per_s']:.2f} ({rows[parse(s)]['cpu_s_per_gb']:.2f})" for s in sizes]
        ratio = rows[parse('64M')]["gbytes_per_s"] / ip[0]
        print(f"| {j['engine']} | {zc} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
PY
