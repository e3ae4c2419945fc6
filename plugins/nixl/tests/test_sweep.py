"""python/benchmark_nixl.py --sweep: the nixlbench-shaped sweep, a server
and a client process per backend through the agents' listener on
loopback, TCPX and UCX in one run; every point's bytes checked."""

import json
import re
import subprocess
import sys

from conftest import ROOT

BENCH = ROOT / "python" / "benchmark_nixl.py"


def test_a_sweep_of_both_backends_reports_and_checks_every_point(tmp_path):
    out = tmp_path / "sweep.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--sweep", "--backend", "TCPX,UCX", "--block-sizes", "4K,16K",
         "--batch-sizes", "1,4", "--iters", "8", "--warmup", "1", "--timeout", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    points = sorted((x["backend"], x["op"], x["mem"], x["block"], x["batch"]) for x in rows)
    want = sorted(
        (b, op, "DRAM:DRAM", block, batch)
        for b in ("TCPX", "UCX")
        for op in ("WRITE", "READ")
        for block in (4096, 16384)
        for batch in (1, 4)
    )
    assert points == want
    assert all(x["byte_exact"] for x in rows), rows
    for x in rows:
        for k in ("gb_s", "prep_avg_us", "prep_p99_us", "post_avg_us", "post_p99_us", "tx_avg_us", "tx_p99_us"):
            assert x[k] > 0, (k, x)
    # nixlbench's columns, and µs per descriptor where one block of the
    # same bytes ran (4 x 4K against 1 x 16K).
    assert "avg prep  p99 prep  avg post  p99 post    avg tx    p99 tx  us/desc" in r.stdout
    four = [
        l for l in r.stdout.splitlines() if re.match(r"^\s*WRITE DRAM:DRAM\s+4K\s+4 ", l) and "p50" not in l
    ]
    assert len(four) == 2 and all(re.search(r"-?\d+\.\d\d$", l) for l in four), r.stdout
    assert "TCPX against UCX, same points" in r.stdout
    assert f"bytes checked once per point (after its last transfer): {len(rows)} of {len(rows)} byte-exact" in r.stdout
