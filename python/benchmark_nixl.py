#!/usr/bin/env python3
"""NIXL point-to-point benchmark: TCPX (our plugin) and UCX side by side.

Two NIXL agents per backend, each in its own process (a target that
registers a buffer, an initiator that sweeps message sizes with WRITE or
READ), exchanging metadata over a pipe. Prints GB/s and latency per size.

    .venv/bin/python python/benchmark_nixl.py                 # TCPX and UCX
    .venv/bin/python python/benchmark_nixl.py --backend TCPX --sizes 1M,64M
    .venv/bin/python python/benchmark_nixl.py --device gpu   # VRAM (torch CUDA tensors)

UCX runs over TCP on loopback (UCX_TLS=tcp, plus cuda_copy for --device
gpu) with the wheel's own plugin; TCPX loads target/release/libplugin_TCPX.so
through NIXL_PLUGIN_DIR. --device gpu registers CUDA tensors of GPU 0 as
VRAM on both sides (needs torch with CUDA; TCPX moves VRAM through pinned
host staging).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import queue
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = ROOT / "target" / "release" / "libplugin_TCPX.so"
DEFAULT_SIZES = "256,4K,64K,256K,1M,4M,16M,64M"


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if s.endswith(suffix):
            return int(float(s[:-1]) * mult)
    return int(s)


def fmt_size(n: int) -> str:
    for suffix, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def backend_env(backend: str, plugin: pathlib.Path, device: str) -> dict[str, str | None]:
    if backend == "TCPX":
        return {"NIXL_PLUGIN_DIR": str(plugin.parent)}
    # The wheel's plugin folder (NIXL_PLUGIN_DIR would replace it).
    tls = "tcp,cuda_copy" if device == "gpu" else "tcp"
    return {"NIXL_PLUGIN_DIR": None, "UCX_TLS": tls, "UCX_NET_DEVICES": "lo"}


def backend_params(backend: str, args) -> dict[str, str]:
    if backend == "TCPX":
        return {"nics": args.nics}
    return {}


def make_agent(name: str, backend: str, params: dict[str, str], prog_thread: bool):
    try:  # the pinned wheel; nixl-cu13 of the same release where CUDA 13 is the runtime
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl_cu13._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=prog_thread, backends=[]))
    agent.create_backend(backend, params)
    return agent


def alloc(n: int, device: str, source: bool):
    """(buffer, address, NIXL memory kind); the buffer keeps the memory alive.
    The source side holds `pattern(n)`, the destination zeros."""
    if device == "gpu":
        import torch

        t = torch.arange(n, device="cuda:0") % 251 if source else torch.zeros(n, device="cuda:0")
        t = t.to(torch.uint8)
        return t, t.data_ptr(), "VRAM"
    import numpy as np

    a = (np.arange(n) % 251).astype(np.uint8) if source else np.zeros(n, dtype=np.uint8)
    return a, a.ctypes.data, "DRAM"


def landed_ok(buf, n: int) -> bool:
    """True when the first n bytes of a destination buffer hold the pattern."""
    import numpy as np

    got = buf[:n].cpu().numpy() if hasattr(buf, "cpu") else buf[:n]
    return bool(np.array_equal(got, (np.arange(n) % 251).astype(np.uint8)))


def check_mem(agent, backend: str, mem: str) -> None:
    if f"{mem}_SEG" not in agent.get_backend_mem_types(backend):
        raise SystemExit(f"{backend} does not support {mem} in this process (is CUDA usable here?)")


def target_main(conn, backend, params, prog, nbytes, device, op):
    agent = make_agent("target", backend, params, prog)
    buf, addr, mem = alloc(nbytes, device, source=op == "READ")
    check_mem(agent, backend, mem)
    agent.register_memory(agent.get_reg_descs([(addr, nbytes, 0, "")], mem))
    conn.send((agent.get_agent_metadata(), addr))
    agent.add_remote_agent(conn.recv())
    conn.recv()  # the initiator's "done"
    conn.send(landed_ok(buf, nbytes) if op == "WRITE" else True)


def initiator_main(conn, backend, params, prog, nbytes, device, sizes, op, iters, warmup, out):
    agent = make_agent("initiator", backend, params, prog)
    buf, addr, mem = alloc(nbytes, device, source=op == "WRITE")
    check_mem(agent, backend, mem)
    agent.register_memory(agent.get_reg_descs([(addr, nbytes, 0, "")], mem))
    meta, raddr = conn.recv()
    peer = agent.add_remote_agent(meta)
    conn.send(agent.get_agent_metadata())
    rows = []
    for size in sizes:
        local = agent.get_xfer_descs([(addr, size, 0)], mem)
        remote = agent.get_xfer_descs([(raddr, size, 0)], mem)
        h = None
        deadline = time.monotonic() + 20
        while h is None:  # the peer may still be loading our metadata
            try:
                h = agent.initialize_xfer(op, local, remote, peer)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        n = iters if size < (16 << 20) else max(3, iters // 4)
        lat = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            state = agent.transfer(h)
            while state == "PROC":
                state = agent.check_xfer_state(h)
            if state != "DONE":
                raise RuntimeError(f"{backend} {op} of {size} bytes ended in {state}")
            if i >= warmup:
                lat.append(time.perf_counter() - t0)
        agent.release_xfer_handle(h)
        total = sum(lat)
        lat.sort()
        rows.append(
            {
                "size": size,
                "gbps": size * len(lat) / total / 1e9,
                "lat_us": lat[len(lat) // 2] * 1e6,
                "lat_p99_us": lat[min(len(lat) - 1, len(lat) * 99 // 100)] * 1e6,
                "iters": len(lat),
            }
        )
    conn.send("done")
    exact = conn.recv() and (op == "WRITE" or landed_ok(buf, nbytes))
    for r in rows:
        r["byte_exact"] = exact
    out.put(rows)


def run_backend(backend: str, args, sizes: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")
    env = backend_env(backend, args.plugin, args.device)
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        a, b = ctx.Pipe()
        out = ctx.Queue()
        nbytes = max(sizes)
        params = backend_params(backend, args)
        # UCX serves a passive target only from its progress thread.
        prog = args.progress_thread == "on" or backend == "UCX"
        t = ctx.Process(target=target_main, args=(a, backend, params, prog, nbytes, args.device, args.op))
        i = ctx.Process(
            target=initiator_main,
            args=(b, backend, params, prog, nbytes, args.device, sizes, args.op, args.iters, args.warmup, out),
        )
        t.start()
        i.start()
        # A side that dies (a failed import, a crash) ends the run at once.
        deadline = time.monotonic() + args.timeout
        rows = None
        while rows is None:
            try:
                rows = out.get(timeout=0.5)
            except queue.Empty:
                dead = [f"{n} exited with {p.exitcode}" for n, p in (("initiator", i), ("target", t))
                        if p.exitcode not in (None, 0)]
                late = time.monotonic() > deadline
                if dead or late:
                    for p in (i, t):
                        p.kill()
                    raise SystemExit(f"{backend}: " + ("; ".join(dead) if dead else f"no result within {args.timeout:.0f} s"))
        for p in (i, t):
            p.join(10)
            if p.is_alive():
                p.kill()
        return rows
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="TCPX,UCX", help="TCPX, UCX or a comma list (default: both)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--op", choices=["WRITE", "READ"], default="WRITE")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list (default {DEFAULT_SIZES})")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--nics", default="127.0.0.1", help="TCPX data NICs (names or addresses)")
    ap.add_argument("--plugin", type=pathlib.Path, default=DEFAULT_PLUGIN)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per backend")
    ap.add_argument(
        "--progress-thread",
        choices=["on", "off"],
        default="on",
        help="the agents' enable_prog_thread (NIXL's default: on). TCPX then polls from one thread; "
        "off: it sleeps on its sockets. UCX always runs with it on",
    )
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = ap.parse_args()

    backends = [b.strip().upper() for b in args.backend.split(",") if b.strip()]
    for b in backends:
        if b not in ("TCPX", "UCX"):
            ap.error(f"unknown backend {b!r}; use TCPX and/or UCX")
    if "TCPX" in backends and not args.plugin.is_file():
        ap.error(f"{args.plugin} not found: cargo build --release -p tcpx-nixl")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.device == "gpu":
        try:
            import torch
        except ImportError:
            ap.error("--device gpu needs torch with CUDA in this Python")
        if not torch.cuda.is_available():
            ap.error("--device gpu: torch sees no CUDA device")

    results = {}
    for b in backends:
        print(f"running {b} {args.op} ({args.device}) ...", file=sys.stderr, flush=True)
        results[b] = {r["size"]: r for r in run_backend(b, args, sizes)}

    head = f"{'size':>8} " + " ".join(f"{b + ' GB/s':>10} {b + ' lat us':>12}" for b in backends)
    print(f"NIXL {args.op}, {args.device}, loopback; GB/s over all iterations, median latency")
    print(head)
    print("-" * len(head))
    for s in sizes:
        cells = " ".join(f"{results[b][s]['gbps']:>10.3f} {results[b][s]['lat_us']:>12.1f}" for b in backends)
        print(f"{fmt_size(s):>8} {cells}")
    if args.json:
        args.json.write_text(json.dumps({b: list(r.values()) for b, r in results.items()}, indent=1))
    bad = [b for b in backends if not all(r["byte_exact"] for r in results[b].values())]
    largest = fmt_size(max(sizes))
    print(f"bytes checked after the sweep ({largest}): " + ("all byte-exact" if not bad else f"WRONG for {bad}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
