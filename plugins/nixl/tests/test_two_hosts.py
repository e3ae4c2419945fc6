"""python/benchmark_nixl.py as two hosts run it: server and client in two
network namespaces joined by a veth pair (made here, removed afterwards even
on failure), DRAM, WRITE and READ, every byte checked; and a side that is
gone ends the other's run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

BENCH = ROOT / "python" / "benchmark_nixl.py"
SERVER_IP, CLIENT_IP = "10.213.0.1", "10.213.0.2"
SIZES = ["4.0 KB", "1.0 MB", "3.0 MB"]
# UCCL's line: [role] size : Gbps | GB/s | s
LINE = re.compile(r"^\[(server|client)\] +(\S+ [KMG]?B) : +\d+\.\d\d Gbps \| +\d+\.\d\d GB/s \| +\d+\.\d{6} s$")


def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def netns():
    """(server namespace, client namespace) joined by a veth pair."""
    if os.geteuid() != 0:
        pytest.skip("two network namespaces need root (CI runs the suite as root)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = os.getpid() % 100000
    ns = (f"tcpxs{tag}", f"tcpxc{tag}")
    veth = (f"tcpxvs{tag}", f"tcpxvc{tag}")
    steps = [
        ("netns", "add", ns[0]),
        ("netns", "add", ns[1]),
        ("link", "add", veth[0], "type", "veth", "peer", "name", veth[1]),
        ("link", "set", veth[0], "netns", ns[0]),
        ("link", "set", veth[1], "netns", ns[1]),
        ("-n", ns[0], "addr", "add", f"{SERVER_IP}/24", "dev", veth[0]),
        ("-n", ns[1], "addr", "add", f"{CLIENT_IP}/24", "dev", veth[1]),
        ("-n", ns[0], "link", "set", "lo", "up"),
        ("-n", ns[1], "link", "set", "lo", "up"),
        ("-n", ns[0], "link", "set", veth[0], "up"),
        ("-n", ns[1], "link", "set", veth[1], "up"),
    ]
    try:
        for step in steps:
            r = ip(*step)
            if r.returncode != 0:
                pytest.skip(f"cannot make the namespaces here: ip {' '.join(step)}: {r.stderr.strip()}")
        yield ns
    finally:
        for n in ns:
            ip("netns", "del", n)  # takes its end of the veth pair with it
        ip("link", "del", veth[0])  # in case it never left this namespace


def start(cmd, out):
    return subprocess.Popen(cmd, stdout=open(out, "w"), stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout):
    """Waits for every process; kills what is still running at the deadline."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


@pytest.mark.parametrize("backend,op", [("tcpx", "write"), ("tcpx", "read"), ("ucx", "write")])
def test_server_and_client_in_two_namespaces(netns, backend, op, tmp_path):
    common = [
        sys.executable, str(BENCH), "--backend", backend, "--op-type", op, "--device", "cpu",
        "--sizes", "4K,1M,3M", "--iters", "5", "--warmup", "1", "--num-kvblocks", "3", "--timeout", "30",
    ]
    out = {r: tmp_path / f"{r}.out" for r in ("server", "client")}
    js = {r: tmp_path / f"{r}.json" for r in ("server", "client")}
    # The client first: it retries until the server's listener is up.
    client = start(
        ["ip", "netns", "exec", netns[1], *common, "--role", "client", "--remote-ip", SERVER_IP, "--json", str(js["client"])],
        out["client"],
    )
    time.sleep(0.5)
    server = start(["ip", "netns", "exec", netns[0], *common, "--role", "server", "--json", str(js["server"])], out["server"])
    rcs = finish([server, client], 90)
    text = {r: out[r].read_text() for r in out}
    assert rcs == [0, 0], f"exit codes {rcs}\n--- server\n{text['server']}\n--- client\n{text['client']}"

    checker = "server" if op == "write" else "client"
    for role in ("server", "client"):
        lines = [m for m in map(LINE.match, text[role].splitlines()) if m]
        assert [(m[1], m[2]) for m in lines] == [(role, s) for s in SIZES], text[role]
        assert f"[{role}] bytes checked by the {checker}: 3 of 3 sizes all byte-exact" in text[role]
        got = json.loads(js[role].read_text())
        assert (got["role"], got["backend"], got["op"]) == (role, backend.upper(), op.upper())
        assert [(r["size"], r["byte_exact"]) for r in got["results"]] == [
            (4096, True),
            (1 << 20, True),
            (3 << 20, True),
        ]


def test_a_client_without_a_server_gives_up_with_the_address():
    port = 20000 + os.getpid() % 10000
    r = subprocess.run(
        [sys.executable, str(BENCH), "--role", "client", "--remote-ip", "127.0.0.1", "--port", str(port),
         "--sizes", "4K", "--iters", "1", "--timeout", "3", "--nics", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"[client] error: no NIXL agent answered at 127.0.0.1:{port} within 3 s" in r.stderr


def test_a_killed_server_ends_the_clients_run(tmp_path):
    port = 21000 + os.getpid() % 10000
    common = [sys.executable, str(BENCH), "--sizes", "16M", "--iters", "100000", "--nics", "127.0.0.1",
              "--port", str(port), "--timeout", "8"]
    server = start([*common, "--role", "server"], tmp_path / "server.out")
    client = start([*common, "--role", "client", "--remote-ip", "127.0.0.1"], tmp_path / "client.out")
    try:
        time.sleep(4)  # connected and transferring (or, on a slow machine, still connecting)
        server.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc = finish([client], 30)[0]
        took = time.monotonic() - killed
    finally:
        finish([server, client], 1)
    text = (tmp_path / "client.out").read_text()
    assert rc == 2 and "[client] error: " in text, text
    assert took < 15, f"the client needed {took:.0f} s to notice"


def test_sides_run_with_different_settings_both_stop_and_say_why(tmp_path):
    port = 22000 + os.getpid() % 10000
    common = [sys.executable, str(BENCH), "--sizes", "4K,64K", "--nics", "127.0.0.1", "--port", str(port), "--timeout", "20"]
    server = start([*common, "--role", "server", "--iters", "5"], tmp_path / "server.out")
    client = start([*common, "--role", "client", "--remote-ip", "127.0.0.1", "--iters", "3"], tmp_path / "client.out")
    rcs = finish([server, client], 60)
    s, c = (tmp_path / "server.out").read_text(), (tmp_path / "client.out").read_text()
    assert rcs == [2, 2], f"{rcs}\n--- server\n{s}\n--- client\n{c}"
    assert "iterations) = (4096, WRITE, 1, 3, 5), this client (4096, WRITE, 1, 3, 3): give both sides the same" in c, c
    assert "[server] error: the client gave up: the server runs" in s, s
