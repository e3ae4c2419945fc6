#!/usr/bin/env python3
"""NIXL point-to-point benchmark: our TCPX backend (and UCX), across two
hosts or on one machine.

Two hosts, with the flags of UCCL's p2p/benchmarks/benchmark_nixl.py:

    # host A (the server: its memory is written, or read with --op-type read)
    python python/benchmark_nixl.py --role server --backend tcpx
    # host B (the client: it posts the transfers)
    python python/benchmark_nixl.py --role client --backend tcpx --remote-ip <A's address>

  Each side prints one line per size, as UCCL's script does:

    [client]   1.0 MB :  12.34 Gbps |   1.54 GB/s | 0.000679 s

  then which sizes arrived byte-exact (the side that received checks every
  byte: the server for write, the client for read; the other side is told).
  Metadata goes through the NIXL agents' own listener (the server's on
  --port): the client fetches the server's (retrying until the server is up)
  and sends its own; the server's descriptors come by a NIXL notification;
  the server counts the transfers by their notifications
  (check_remote_xfer_done). Either side that fails tells the other, and a
  side that is gone ends the run within --timeout.

One machine (no --role): both agents run here, each in its own process,
exchanging metadata over a pipe; each backend of --backend (default TCPX
and UCX) in turn, then one table:

    .venv/bin/python python/benchmark_nixl.py                 # TCPX and UCX
    .venv/bin/python python/benchmark_nixl.py --backend TCPX --sizes 1M,64M
    .venv/bin/python python/benchmark_nixl.py --device gpu   # VRAM (torch CUDA tensors)

  UCX runs over TCP on loopback there (UCX_TLS=tcp, plus cuda_copy for
  --device gpu).

The TCPX plugin is found in this order: --plugin; NIXL_PLUGIN_DIR when it
holds libplugin_TCPX.so; the NIXL wheel's own plugin folder (after
plugins/nixl/install.sh); target/release. NIXL_PLUGIN_DIR replaces the
wheel's folder, so UCX runs without it. --device gpu registers CUDA tensors
of --local-gpu-idx as VRAM (needs torch with CUDA; TCPX moves VRAM through
pinned host staging).
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

import nixl_plugins

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PLUGIN = ROOT / "target" / "release" / "libplugin_TCPX.so"
DEFAULT_SIZES = "256,4K,64K,256K,1M,4M,16M,64M"
LISTEN_PORT = 9000  # UCCL's
# Our messages between the two sides, as NIXL notifications.
TAG = b"tcpx-bench "
PING = TAG + b"ping"
ABORT = TAG + b"abort "
BYE = TAG + b"bye"
DONE = TAG + b"done "  # the server has no size left


class Failed(Exception):
    """The run cannot go on; the message says why."""


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


def pretty_size(n: int) -> str:
    """Sizes as UCCL's script prints them: 256 B, 1.0 KB, 10.0 MB."""
    val = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if val < 1024 or unit == "GB":
            return f"{val:.0f} {unit}" if unit == "B" else f"{val:.1f} {unit}"
        val /= 1024
    return f"{n} B"


def tcpx_plugin_dir(plugin: pathlib.Path | None) -> str | None:
    """The NIXL_PLUGIN_DIR under which NIXL finds libplugin_TCPX.so; None
    when the wheel's own folder has it (NIXL_PLUGIN_DIR must then be unset)."""
    if plugin is not None:
        if not plugin.is_file():
            raise Failed(f"{plugin} not found: cargo build --release -p tcpx-nixl")
        if plugin.name != "libplugin_TCPX.so":
            raise Failed(f"{plugin}: NIXL finds plugins by file name; it must be libplugin_TCPX.so")
        return str(plugin.resolve().parent)
    env = os.environ.get("NIXL_PLUGIN_DIR")
    if env and (pathlib.Path(env) / "libplugin_TCPX.so").is_file():
        return env
    if (nixl_plugins.wheel_plugin_dir() / "libplugin_TCPX.so").is_file():
        return None
    if DEFAULT_PLUGIN.is_file():
        return str(DEFAULT_PLUGIN.parent)
    raise Failed(
        "the TCPX plugin is not installed beside NIXL's plugins and "
        f"{DEFAULT_PLUGIN} does not exist: cargo build --release -p tcpx-nixl "
        "(and plugins/nixl/install.sh), or pass --plugin"
    )


def set_env(env: dict[str, str | None]) -> dict[str, str | None]:
    """Applies `env` (None = unset); returns what was there before."""
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


def backend_env(backend: str, args) -> dict[str, str | None]:
    if backend == "TCPX":
        return {"NIXL_PLUGIN_DIR": tcpx_plugin_dir(args.plugin)}
    # NIXL_PLUGIN_DIR would hide the wheel's UCX plugin, unless it has one.
    env = os.environ.get("NIXL_PLUGIN_DIR")
    out: dict[str, str | None] = {}
    if env and not (pathlib.Path(env) / f"libplugin_{backend}.so").is_file():
        out["NIXL_PLUGIN_DIR"] = None
    if args.role is None:
        # One machine: UCX over TCP on loopback.
        out["UCX_TLS"] = "tcp,cuda_copy" if args.device == "gpu" else "tcp"
        out["UCX_NET_DEVICES"] = "lo"
    return out


def backend_params(backend: str, nics: str | None) -> dict[str, str]:
    if backend == "TCPX" and nics:
        return {"nics": nics}
    return {}


# ---------------------------------------------------------------- memory


def layout(sizes: list[int], nblocks: int):
    """The buffer length and, per size, its blocks as (offset, length).
    Block j of every size starts at j * stride, so the blocks of one message
    lie apart, as KV-cache blocks do; the last block takes the remainder."""
    stride = max(sizes) // nblocks + nblocks

    def blocks(size: int) -> list[tuple[int, int]]:
        base = size // nblocks
        return [(j * stride, base if j < nblocks - 1 else size - base * (nblocks - 1)) for j in range(nblocks)]

    return stride * nblocks, blocks


class Buffer:
    """One side's registered memory: numpy (cpu) or a torch CUDA tensor (gpu)."""

    def __init__(self, nbytes: int, device: str, gpu: int):
        self.n = nbytes
        if device == "gpu":
            import torch

            self.a = torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{gpu}")
            self.addr, self.mem, self.dev = self.a.data_ptr(), "VRAM", gpu
        else:
            import numpy as np

            self.a = np.zeros(nbytes, dtype=np.uint8)
            self.addr, self.mem, self.dev = self.a.ctypes.data, "DRAM", 0

    def pattern(self, seed: int):
        """The bytes (i + seed) % 251, as an array of the same kind."""
        if self.mem == "VRAM":
            import torch

            period = ((torch.arange(251, device=self.a.device) + seed) % 251).to(torch.uint8)
            return period.repeat(self.n // 251 + 1)[: self.n]
        import numpy as np

        return np.resize(((np.arange(251) + seed) % 251).astype(np.uint8), self.n)

    def fill(self, seed: int, upto: int | None = None):
        n = self.n if upto is None else upto
        self.a[:n] = self.pattern(seed)[:n]

    def zero(self, upto: int | None = None):
        self.a[: self.n if upto is None else upto] = 0

    def check(self, seed: int, blocks: list[tuple[int, int]], upto: int | None = None) -> str | None:
        """None when every block holds pattern(seed) and every other byte
        (below `upto`, default all) is still zero; else where the first
        difference is."""
        want = self.pattern(seed)
        at = 0
        for off, n in blocks + [(self.n if upto is None else upto, 0)]:
            gap = self.a[at:off]
            if gap.any():
                return f"byte {at + _first_true(gap != 0)} outside the blocks was written"
            got = self.a[off : off + n]
            if n and not bool((got == want[off : off + n]).all()):
                i = off + _first_true(got != want[off : off + n])
                return f"byte {i} is {int(self.a[i])}, not {int(want[i])}"
            at = off + n
        return None

    def descs(self, agent, blocks: list[tuple[int, int]]):
        return agent.get_xfer_descs([(self.addr + off, n, self.dev) for off, n in blocks], self.mem)


def _first_true(mask) -> int:
    if hasattr(mask, "nonzero") and hasattr(mask, "cpu"):
        return int(mask.nonzero()[0].item())
    import numpy as np

    return int(np.flatnonzero(mask)[0])


def check_device(args, ap):
    if args.device == "gpu":
        try:
            import torch
        except ImportError:
            ap.error("--device gpu needs torch with CUDA in this Python")
        if not torch.cuda.is_available():
            ap.error("--device gpu: torch sees no CUDA device")


def check_mem(agent, backend: str, mem: str) -> None:
    if f"{mem}_SEG" not in agent.get_backend_mem_types(backend):
        raise Failed(f"{backend} does not support {mem} in this process (is CUDA usable here?)")


# ---------------------------------------------------------------- two hosts


class Peer:
    """The other side, through NIXL notifications kept in the agent's own map
    (`agent.notifs`, which check_remote_xfer_done also uses)."""

    def __init__(self, agent, name: str, timeout: float):
        self.agent, self.name, self.timeout = agent, name, timeout
        self.next_ping = 0.0

    def send(self, msg: bytes):
        self.agent.send_notif(self.name, msg)

    def check(self, deadline: float, what: str, ended: bool = False, fetch: bool = True):
        """Raises when the peer gave up, is gone, or `what` is late; with
        `ended`, also when it said it has finished (it runs fewer sizes).
        `fetch=False` judges the messages the caller just searched, so that
        a goodbye fetched together with the awaited message cannot win."""
        if fetch:
            self.agent.update_notifs()
        msgs = self.agent.notifs.get(self.name, [])
        for m in list(msgs):
            if m.startswith(ABORT):
                raise Failed(f"the {self.name} gave up: {m[len(ABORT):].decode(errors='replace')}")
            if m == PING:
                msgs.remove(m)
            elif ended and (m == BYE or m.startswith(DONE)):
                raise Failed(
                    f"the {self.name} finished while this side waited for {what}: "
                    "give both sides the same --sizes"
                )
        now = time.monotonic()
        if now >= self.next_ping:
            # A peer that is gone fails this (TCPX reports it at once).
            self.next_ping = now + 1
            try:
                self.send(PING)
            except Exception as e:
                raise Failed(f"the {self.name} is gone while waiting for {what} ({type(e).__name__}: {e})")
        if now > deadline:
            raise Failed(f"no {what} from the {self.name} within {self.timeout:.0f} s")

    def take(self, prefix: bytes, what: str) -> bytes:
        """The first message from the peer that starts with `prefix`."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.agent.update_notifs()
            msgs = self.agent.notifs.get(self.name, [])
            for m in msgs:
                if m.startswith(prefix):
                    msgs.remove(m)
                    return m
            self.check(deadline, what, ended=True, fetch=False)
            time.sleep(0.001)

    def transfer_done(self, tag: bytes, what: str):
        """Waits for the notification of one transfer (the server's count)."""
        deadline = time.monotonic() + self.timeout
        next_check = time.monotonic() + 0.05
        while not self.agent.check_remote_xfer_done(self.name, tag):
            now = time.monotonic()
            if now >= next_check:
                self.check(deadline, what, ended=True, fetch=False)
                next_check = now + 0.05
            os.sched_yield()


class Progress:
    """A stderr line every few seconds while one size runs long."""

    def __init__(self, role: str, size: int, total: int):
        self.role, self.size, self.total = role, size, total
        self.next = time.monotonic() + 5

    def tick(self, i: int):
        now = time.monotonic()
        if now >= self.next:
            self.next = now + 5
            print(f"[{self.role}] {pretty_size(self.size)}: iteration {i}/{self.total}", file=sys.stderr, flush=True)


def result_line(role: str, size: int, iters: int, elapsed: float) -> str:
    gbps = size * iters * 8 / elapsed / 1e9
    gb_sec = size * iters / elapsed / 1e9
    lat = elapsed / iters
    return f"[{role}] {pretty_size(size):>8} : {gbps:6.2f} Gbps | {gb_sec:6.2f} GB/s | {lat:6.6f} s"


def make_agent(name: str, backend: str, params: dict[str, str], prog_thread: bool, listen_port: int | None = None):
    api = nixl_plugins.import_api()
    conf = api.nixl_agent_config(
        enable_prog_thread=prog_thread,
        enable_listen_thread=listen_port is not None,
        listen_port=listen_port or 0,
        backends=[],
    )
    agent = api.nixl_agent(name, conf)
    agent.create_backend(backend, params)
    return agent


def wait_for_client(agent, timeout: float, port: int):
    start = time.monotonic()
    say = start + 10
    while not agent.check_remote_metadata("client"):
        now = time.monotonic()
        if now - start > timeout:
            raise Failed(
                f"no client sent its metadata to port {port} within {timeout:.0f} s "
                "(start it with --role client --remote-ip <this host's address>)"
            )
        if now >= say:
            say = now + 10
            print(f"[server] still waiting for the client ({now - start:.0f} s)", file=sys.stderr, flush=True)
        time.sleep(0.01)


def connect_to_server(agent, ip: str, port: int, timeout: float):
    """Fetches the server's metadata, retrying while nothing answers (NIXL
    tries a refused connection once), then sends ours."""
    start = time.monotonic()
    wait, tries = 0.5, 0
    while not agent.check_remote_metadata("server"):
        if time.monotonic() - start > timeout:
            raise Failed(f"no NIXL agent answered at {ip}:{port} within {timeout:.0f} s (is the server running there?)")
        if tries == 1:
            print(f"[client] waiting for the server at {ip}:{port} ...", file=sys.stderr, flush=True)
        agent.fetch_remote_metadata("server", ip, port)
        tries += 1
        until = time.monotonic() + wait
        while time.monotonic() < until and not agent.check_remote_metadata("server"):
            time.sleep(0.01)
        wait = min(wait * 2, 4)
    agent.send_local_metadata(ip, port)


def run_two_hosts(args, backend: str, sizes: list[int]) -> int:
    role = args.role
    op = args.op.upper()
    peer_name = "client" if role == "server" else "server"
    print(f"NIXL P2P Benchmark — role: {role}")
    print("Message sizes:", ", ".join(pretty_size(s) for s in sizes))
    print("Number of key-value blocks per message:", args.num_kvblocks)
    print(f"Device: {args.device} | Local GPU idx: {args.local_gpu_idx} | Iterations: {args.iters}")
    print(f"Backend: {backend} | Op: {op} | Warm-up iterations: {args.warmup}", flush=True)

    set_env(backend_env(backend, args))
    prog = args.progress_thread == "on" or backend == "UCX"
    port = args.port if role == "server" else 0
    agent = make_agent(role, backend, backend_params(backend, args.nics), prog, listen_port=port)
    check_mem(agent, backend, "VRAM" if args.device == "gpu" else "DRAM")
    nbytes, blocks = layout(sizes, args.num_kvblocks)
    buf = Buffer(nbytes, args.device, args.local_gpu_idx)
    reg = agent.register_memory(agent.get_reg_descs([(buf.addr, buf.n, buf.dev, "")], buf.mem))
    peer = Peer(agent, peer_name, args.timeout)
    connected = False
    rows = []
    try:
        if role == "server":
            print(f"[server] NIXL listener on port {args.port}; waiting for the client", file=sys.stderr, flush=True)
            wait_for_client(agent, args.timeout, args.port)
        else:
            connect_to_server(agent, args.remote_ip, args.port, args.timeout)
        connected = True
        for k, size in enumerate(sizes):
            rows.append(run_size(args, role, op, agent, peer, buf, k, size, blocks(size)))
        # The end, best effort: with read the client may have left already
        # (its goodbye is then here), so telling it "done" may fail.
        try:
            if role == "server":
                try:
                    peer.send(DONE + b"%d" % len(sizes))
                except Exception:
                    pass
                peer.take(BYE, "goodbye")
            else:
                peer.send(BYE)
        except Exception as e:
            print(f"[{role}] warning: no goodbye ({type(e).__name__}: {e})", file=sys.stderr)
    except Failed as e:
        if connected:
            try:
                peer.send(ABORT + str(e).encode())
            except Exception:
                pass
        print(f"[{role}] error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        try:
            agent.deregister_memory(reg)
            agent.remove_remote_agent(peer_name)
        except Exception:
            pass

    bad = [pretty_size(r["size"]) for r in rows if not r["byte_exact"]]
    checker = "server" if op == "WRITE" else "client"
    verdict = "all byte-exact" if not bad else "WRONG for " + ", ".join(bad)
    print(f"[{role}] bytes checked by the {checker}: {len(rows) - len(bad)} of {len(rows)} sizes {verdict}")
    if args.json:
        out = {"role": role, "backend": backend, "op": op, "device": args.device, "num_kvblocks": args.num_kvblocks}
        args.json.write_text(json.dumps({**out, "results": rows}, indent=1))
    return 1 if bad else 0


def run_size(args, role, op, agent, peer, buf, k, size, blocks) -> dict:
    """One size: the server offers its blocks and counts notifications, the
    client transfers; the receiving side checks the bytes and tells the other."""
    seed = k + 1
    tag = b"TRANSFER size=%d;" % size
    what = f"the transfers of {pretty_size(size)}"
    total = args.warmup + args.iters
    progress = Progress(role, size, total)
    receiver = (role == "server") == (op == "WRITE")
    if receiver:
        buf.zero()
    else:
        buf.fill(seed)
    if role == "server":
        descs = buf.descs(agent, blocks)
        head = b"descs %d %d %s %d %d %d\n" % (k, size, op.encode(), len(blocks), args.warmup, args.iters)
        peer.send(TAG + head + agent.get_serialized_descs(descs))
        for i in range(total):
            if i == args.warmup:
                start = time.perf_counter()
            peer.transfer_done(tag, what)
            progress.tick(i + 1)
    else:
        msg = peer.take(TAG + b"descs %d " % k, f"the descriptors for {pretty_size(size)}")
        head, blob = msg.split(b"\n", 1)
        theirs = head.decode(errors="replace").split()[3:]
        ours = [str(size), op, str(len(blocks)), str(args.warmup), str(args.iters)]
        if theirs != ours:
            raise Failed(
                f"the server runs (size, op, blocks, warm-up, iterations) = ({', '.join(theirs)}), "
                f"this client ({', '.join(ours)}): give both sides the same --sizes, --op-type, "
                "--num-kvblocks, --warmup and --iters"
            )
        remote = agent.deserialize_descs(blob)
        # The metadata fetched first may predate the server's registration.
        deadline = time.monotonic() + args.timeout
        while not agent.check_remote_metadata("server", remote):
            agent.fetch_remote_metadata("server", args.remote_ip, args.port)
            peer.check(deadline, "metadata covering its descriptors")
            time.sleep(0.05)
        h = agent.initialize_xfer(op, buf.descs(agent, blocks), remote, "server", tag)
        try:
            for i in range(total):
                if i == args.warmup:
                    start = time.perf_counter()
                transfer(agent, h, f"{op} of {pretty_size(size)}", args.timeout)
                progress.tick(i + 1)
        finally:
            agent.release_xfer_handle(h)
    elapsed = time.perf_counter() - start
    checked = TAG + b"checked %d " % k
    if receiver:
        bad = buf.check(seed, blocks)
        peer.send(checked + (b"ok" if bad is None else b"WRONG " + bad.encode()))
    else:
        reply = peer.take(checked, f"the byte check of {pretty_size(size)}")[len(checked) :]
        bad = None if reply == b"ok" else reply.decode(errors="replace")
    print(result_line(role, size, args.iters, elapsed), flush=True)
    if bad is not None:
        print(f"[{role}] {pretty_size(size):>8} : bytes WRONG: {bad}", flush=True)
    return {
        "size": size,
        "iters": args.iters,
        "gbps": size * args.iters * 8 / elapsed / 1e9,
        "gb_s": size * args.iters / elapsed / 1e9,
        "lat_s": elapsed / args.iters,
        "byte_exact": bad is None,
    }


def transfer(agent, h, what: str, timeout: float):
    try:
        state = agent.transfer(h)
        deadline = time.monotonic() + timeout
        polls = 0
        while state == "PROC":
            state = agent.check_xfer_state(h)
            polls += 1
            if polls % 1024 == 0 and time.monotonic() > deadline:
                raise Failed(f"{what} did not complete within {timeout:.0f} s")
    except Failed:
        raise
    except Exception as e:  # nixl raises nixl*Error for failed transfers
        raise Failed(f"{what} failed: {type(e).__name__}: {e}")
    if state != "DONE":
        raise Failed(f"{what} ended in {state}")


# ---------------------------------------------------------------- one machine


def target_main(conn, backend, params, prog, nbytes, device, gpu, op):
    agent = make_agent("target", backend, params, prog)
    buf = Buffer(nbytes, device, gpu)
    if op == "READ":
        buf.fill(1)
    check_mem(agent, backend, buf.mem)
    agent.register_memory(agent.get_reg_descs([(buf.addr, buf.n, buf.dev, "")], buf.mem))
    conn.send((agent.get_agent_metadata(), buf.addr))
    agent.add_remote_agent(conn.recv())
    blocks = conn.recv()  # the initiator's "done": the largest size's blocks
    conn.send(buf.check(1, blocks) if op == "WRITE" else None)


def initiator_main(conn, backend, params, prog, nbytes, device, gpu, sizes, nblocks, op, iters, warmup, out):
    agent = make_agent("initiator", backend, params, prog)
    buf = Buffer(nbytes, device, gpu)
    if op == "WRITE":
        buf.fill(1)
    check_mem(agent, backend, buf.mem)
    agent.register_memory(agent.get_reg_descs([(buf.addr, buf.n, buf.dev, "")], buf.mem))
    meta, raddr = conn.recv()
    peer = agent.add_remote_agent(meta)
    conn.send(agent.get_agent_metadata())
    _, blocks_of = layout(sizes, nblocks)
    rows = []
    for size in sizes:
        blocks = blocks_of(size)
        local = buf.descs(agent, blocks)
        remote = agent.get_xfer_descs([(raddr + off, n, buf.dev) for off, n in blocks], buf.mem)
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
        print(f"  {backend} {fmt_size(size)} done", file=sys.stderr, flush=True)
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
    largest = blocks_of(max(sizes))
    conn.send(largest)
    bad = conn.recv() if op == "WRITE" else buf.check(1, largest)
    for r in rows:
        r["byte_exact"] = bad is None
    out.put(rows)


def run_backend(backend: str, args, sizes: list[int]) -> list[dict]:
    ctx = mp.get_context("spawn")
    saved = set_env(backend_env(backend, args))
    try:
        a, b = ctx.Pipe()
        out = ctx.Queue()
        nbytes, _ = layout(sizes, args.num_kvblocks)
        params = backend_params(backend, args.nics or "127.0.0.1")
        op = args.op.upper()
        # UCX serves a passive target only from its progress thread.
        prog = args.progress_thread == "on" or backend == "UCX"
        gpu = args.local_gpu_idx
        t = ctx.Process(target=target_main, args=(a, backend, params, prog, nbytes, args.device, gpu, op))
        i = ctx.Process(
            target=initiator_main,
            args=(b, backend, params, prog, nbytes, args.device, gpu, sizes, args.num_kvblocks, op, args.iters, args.warmup, out),
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
                    raise Failed(f"{backend}: " + ("; ".join(dead) if dead else f"no result within {args.timeout:.0f} s"))
        for p in (i, t):
            p.join(10)
            if p.is_alive():
                p.kill()
        return rows
    finally:
        set_env(saved)


def run_one_machine(args, backends: list[str], sizes: list[int]) -> int:
    op = args.op.upper()
    results = {}
    for b in backends:
        print(f"running {b} {op} ({args.device}) ...", file=sys.stderr, flush=True)
        results[b] = {r["size"]: r for r in run_backend(b, args, sizes)}

    head = f"{'size':>8} " + " ".join(f"{b + ' GB/s':>10} {b + ' lat us':>12}" for b in backends)
    print(f"NIXL {op}, {args.device}, loopback; GB/s over all iterations, median latency")
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


# ---------------------------------------------------------------- sweep

SWEEP_BLOCKS = "4K,8K,16K,64K,256K,1M,4M"
SWEEP_BATCHES = "1,4,16,64,128,256,1024"
SWEEP = TAG + b"sweep "
SWEEP_END = TAG + b"sweep end"
SWEEP_BYE = TAG + b"sweep bye"
# nixlbench's columns (decimal GB/s, times in µs), then ours.
SWEEP_HEAD = (
    f"{'op':>5} {'mem':>9} {'block':>6} {'batch':>5} {'GB/s':>8} {'avg lat':>9} {'p50 lat':>9} "
    f"{'avg prep':>9} {'p99 prep':>9} {'avg post':>9} {'p99 post':>9} {'avg tx':>9} {'p99 tx':>9} {'us/desc':>8}"
)


def sweep_points(args) -> list[dict]:
    """Every configuration of the sweep, in the order it runs: op, memory
    kinds (initiator:target), block size, blocks per transfer; points whose
    transfer exceeds --max-transfer are left out."""
    try:
        blocks = [parse_size(b) for b in args.block_sizes.split(",") if b.strip()]
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise Failed("--block-sizes and --batch-sizes: comma lists of sizes (K/M/G) and counts")
    mems = [m.strip().upper() for m in args.mems.split(",") if m.strip()]
    for m in mems:
        if not all(k in ("DRAM", "VRAM") for k in m.split(":")) or m.count(":") != 1:
            raise Failed(f"--mems {m!r}: initiator:target, each DRAM or VRAM (DRAM:VRAM)")
    ops = [o.strip().upper() for o in args.ops.split(",") if o.strip()]
    if any(o not in ("WRITE", "READ") for o in ops) or not ops or not blocks or not batches:
        raise Failed("--ops: write and/or read; --block-sizes and --batch-sizes must not be empty")
    pts = []
    for op in ops:
        for mem in mems:
            for block in blocks:
                for batch in batches:
                    if block * batch <= args.max_transfer and batch >= 1 and block >= 1:
                        pts.append({"op": op, "mem": mem, "block": block, "batch": batch})
    return pts


def sweep_layout(block: int, batch: int) -> list[tuple[int, int]]:
    """Blocks of one transfer: every other block of the buffer, so that no
    two are adjacent (NIXL users' KV blocks rarely are; adjacent ones would
    be merged into one descriptor)."""
    return [(2 * j * block, block) for j in range(batch)]


def sweep_span(points: list[dict]) -> int:
    return max((2 * p["batch"] - 1) * p["block"] for p in points) if points else 0


def sweep_iters(args, size: int) -> int:
    """Iterations of one point: about --sweep-bytes moved, within [5, --iters]."""
    return max(5, min(args.iters, args.sweep_bytes // max(size, 1)))


def stats_us(samples: list[float]) -> tuple[float, float, float]:
    """(average, median, 99th percentile) of seconds, in µs."""
    s = sorted(samples)
    return (
        sum(s) / len(s) * 1e6,
        s[len(s) // 2] * 1e6,
        s[min(len(s) - 1, (len(s) * 99) // 100)] * 1e6,
    )


def sweep_buffers(agent, kinds: set[str], span: int, gpu: int) -> dict[str, Buffer]:
    """One registered buffer per memory kind, reused by every point."""
    bufs = {}
    for kind in sorted(kinds):
        b = Buffer(max(span, 1), "gpu" if kind == "VRAM" else "cpu", gpu)
        agent.register_memory(agent.get_reg_descs([(b.addr, b.n, b.dev, "")], b.mem))
        bufs[kind] = b
    return bufs


def sweep_server(args, backend: str, agent, peer) -> None:
    """The target: for each point the client names, offers blocks of the
    buffer of the memory kind it asks for, counts the transfers by their
    notifications (check_remote_xfer_done) and checks a WRITE's bytes."""
    points = sweep_points(args)
    kinds = {p["mem"].split(":")[1] for p in points}
    for k in kinds:
        check_mem(agent, backend, k)
    bufs = sweep_buffers(agent, kinds, sweep_span(points), args.local_gpu_idx)
    print(f"[server] sweep: {len(points)} points; waiting for the client", file=sys.stderr, flush=True)
    wait_for_client(agent, args.timeout, args.port)
    while True:
        msg = peer.take(SWEEP, "the next sweep point")
        if msg == SWEEP_END:
            peer.send(SWEEP_BYE)
            break
        k, op, kind, block, batch, total = msg[len(SWEEP) :].decode().split()
        k, block, batch, total = int(k), int(block), int(batch), int(total)
        buf, blocks = bufs[kind], sweep_layout(block, batch)
        span = blocks[-1][0] + block
        seed = k % 250 + 1
        if op == "WRITE":
            buf.zero(span)
        else:
            buf.fill(seed, span)
        peer.send(TAG + b"sweep-descs %d\n" % k + agent.get_serialized_descs(buf.descs(agent, blocks)))
        count_transfers(agent, peer, b"SWEEP %d;" % k, total, f"the transfers of sweep point {k}")
        if op == "WRITE":
            bad = buf.check(seed, blocks, span)
            peer.send(TAG + b"sweep-checked %d " % k + (b"ok" if bad is None else b"WRONG " + bad.encode()))


def sweep_client(args, backend: str, agent, peer) -> list[dict]:
    """The initiator: runs every point, timing each transfer as nixlbench
    does: prepare (initialize_xfer), post (transfer), transfer (from the
    post until DONE); checks the bytes once per point (its own for READ,
    the server's answer for WRITE)."""
    points = sweep_points(args)
    kinds = {p["mem"].split(":")[0] for p in points}
    for kind in kinds:
        check_mem(agent, backend, kind)
    bufs = sweep_buffers(agent, kinds, sweep_span(points), args.local_gpu_idx)
    connect_to_server(agent, args.remote_ip, args.port, args.timeout)
    rows = []
    for k, p in enumerate(points):
        op, block, batch = p["op"], p["block"], p["batch"]
        ikind, tkind = p["mem"].split(":")
        size = block * batch
        warmup, iters = args.warmup, sweep_iters(args, size)
        total = warmup + iters
        peer.send(SWEEP + b"%d %s %s %d %d %d" % (k, op.encode(), tkind.encode(), block, batch, total))
        msg = peer.take(TAG + b"sweep-descs %d\n" % k, f"the descriptors of sweep point {k}")
        remote = agent.deserialize_descs(msg.split(b"\n", 1)[1])
        deadline = time.monotonic() + args.timeout
        while not agent.check_remote_metadata("server", remote):
            agent.fetch_remote_metadata("server", args.remote_ip, args.port)
            peer.check(deadline, "metadata covering its descriptors")
            time.sleep(0.05)
        buf, blocks = bufs[ikind], sweep_layout(block, batch)
        span = blocks[-1][0] + block
        seed = k % 250 + 1
        if op == "WRITE":
            buf.fill(seed, span)
        else:
            buf.zero(span)
        local = buf.descs(agent, blocks)
        tag = b"SWEEP %d;" % k
        prep, post, xfer = [], [], []
        what = f"{op} of {batch} x {pretty_size(block)}"
        for i in range(total):
            t0 = time.perf_counter()
            h = agent.initialize_xfer(op, local, remote, "server", tag)
            t1 = time.perf_counter()
            try:
                state = agent.transfer(h)
                t2 = time.perf_counter()
                polls = 0
                while state == "PROC":
                    state = agent.check_xfer_state(h)
                    polls += 1
                    if polls % 4096 == 0 and time.perf_counter() - t1 > args.timeout:
                        raise Failed(f"{what} did not complete within {args.timeout:.0f} s")
                t3 = time.perf_counter()
            except Failed:
                raise
            except Exception as e:
                raise Failed(f"{what} failed: {type(e).__name__}: {e}")
            finally:
                agent.release_xfer_handle(h)
            if state != "DONE":
                raise Failed(f"{what} ended in {state}")
            if i >= warmup:
                prep.append(t1 - t0)
                post.append(t2 - t1)
                xfer.append(t3 - t1)
        if op == "WRITE":
            checked = TAG + b"sweep-checked %d " % k
            reply = peer.take(checked, f"the byte check of sweep point {k}")[len(checked) :]
            bad = None if reply == b"ok" else reply.decode(errors="replace")
        else:
            bad = buf.check(seed, blocks, span)
        pa, _, pp = stats_us(prep)
        sa, _, sp = stats_us(post)
        xa, x50, xp = stats_us(xfer)
        row = {
            **p,
            "backend": backend,
            "iters": iters,
            "gb_s": size / (xa / 1e6) / 1e9,
            "prep_avg_us": pa,
            "prep_p99_us": pp,
            "post_avg_us": sa,
            "post_p99_us": sp,
            "tx_avg_us": xa,
            "tx_p50_us": x50,
            "tx_p99_us": xp,
            "byte_exact": bad is None,
        }
        rows.append(row)
        print(sweep_line(row, None), flush=True)
        if bad is not None:
            print(f"[client] sweep point {k}: bytes WRONG: {bad}", flush=True)
    peer.send(SWEEP_END)
    # Leaving before the server read that would fail its run.
    peer.take(SWEEP_BYE, "the end of the sweep")
    return rows


def count_transfers(agent, peer, tag: bytes, total: int, what: str) -> None:
    """Waits for `total` transfer notifications carrying `tag`, napping
    between looks: the target's polls must not take the CPU from the
    initiator it is measured against (a 2-core machine has no core to spare)."""
    deadline = time.monotonic() + peer.timeout
    next_check = time.monotonic() + 0.05
    done = 0
    while done < total:
        if agent.check_remote_xfer_done(peer.name, tag):
            done += 1
            continue
        now = time.monotonic()
        if now >= next_check:
            peer.check(deadline, what, ended=True, fetch=False)
            next_check = now + 0.05
        time.sleep(0.0005)


def per_desc_us(row: dict, rows: list[dict]) -> float | None:
    """µs each descriptor adds: this point's transfer time less that of one
    block of the same total bytes (same op, memory kinds and backend), over
    the descriptor count; None where the sweep has no such block."""
    if row["batch"] == 1:
        return None
    for r in rows:
        if (r["backend"], r["op"], r["mem"], r["block"], r["batch"]) == (
            row["backend"], row["op"], row["mem"], row["block"] * row["batch"], 1
        ):
            return (row["tx_avg_us"] - r["tx_avg_us"]) / row["batch"]
    return None


def sweep_line(r: dict, rows: list[dict] | None) -> str:
    d = per_desc_us(r, rows) if rows else None
    return (
        f"{r['op']:>5} {r['mem']:>9} {fmt_size(r['block']):>6} {r['batch']:>5} {r['gb_s']:>8.3f} "
        f"{r['tx_avg_us']:>9.1f} {r['tx_p50_us']:>9.1f} {r['prep_avg_us']:>9.1f} {r['prep_p99_us']:>9.1f} "
        f"{r['post_avg_us']:>9.1f} {r['post_p99_us']:>9.1f} {r['tx_avg_us']:>9.1f} {r['tx_p99_us']:>9.1f} "
        + (f"{d:>8.2f}" if d is not None else f"{'-':>8}")
        + ("" if r["byte_exact"] else "  WRONG")
    )


def run_sweep_role(args, backend: str) -> int:
    """--sweep with --role: this side of a two-host sweep."""
    set_env(backend_env(backend, args))
    prog = args.progress_thread == "on" or backend == "UCX"
    role = args.role
    port = args.port if role == "server" else 0
    agent = make_agent(role, backend, backend_params(backend, args.nics), prog, listen_port=port)
    peer = Peer(agent, "client" if role == "server" else "server", args.timeout)
    try:
        if role == "server":
            sweep_server(args, backend, agent, peer)
            return 0
        rows = sweep_client(args, backend, agent, peer)
    except Failed as e:
        try:
            peer.send(ABORT + str(e).encode())
        except Exception:
            pass
        print(f"[{role}] error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        args.json.write_text(json.dumps({"backend": backend, "results": rows}, indent=1))
    return 0 if all(r["byte_exact"] for r in rows) else 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sweep_local(args, backends: list[str]) -> int:
    """--sweep without --role: for each backend a server and a client
    process on this machine, through the agents' listener on loopback."""
    import subprocess
    import tempfile

    rows = []
    for backend in backends:
        saved = set_env(backend_env(backend, args))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / "client.json"
                port = free_port()
                common = [sys.executable, __file__, "--sweep", "--backend", backend, "--port", str(port),
                          "--nics", args.nics or "127.0.0.1", "--ops", args.ops, "--mems", args.mems,
                          "--block-sizes", args.block_sizes, "--batch-sizes", args.batch_sizes,
                          "--max-transfer", str(args.max_transfer), "--sweep-bytes", str(args.sweep_bytes),
                          "--iters", str(args.iters), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
                          "--progress-thread", args.progress_thread, "--local-gpu-idx", str(args.local_gpu_idx)]
                if args.plugin:
                    common += ["--plugin", str(args.plugin)]
                print(f"sweep: {backend} ...", file=sys.stderr, flush=True)
                server = subprocess.Popen(common + ["--role", "server"], stdout=subprocess.DEVNULL)
                client = subprocess.Popen(common + ["--role", "client", "--remote-ip", "127.0.0.1", "--json", str(out)],
                                          stdout=sys.stderr)
                procs = [("client", client), ("server", server)]
                try:
                    for _, p in procs:
                        p.wait(timeout=args.sweep_timeout)
                except subprocess.TimeoutExpired:
                    raise Failed(f"{backend}: the sweep ran past --sweep-timeout ({args.sweep_timeout:.0f} s)")
                finally:
                    for _, p in procs:
                        if p.poll() is None:
                            p.kill()
                failed = [f"{n} exited with {p.returncode}" for n, p in procs if p.returncode not in (0, 1)]
                if failed or not out.exists():
                    raise Failed(f"{backend}: " + ("; ".join(failed) or "no results"))
                rows += json.loads(out.read_text())["results"]
        finally:
            set_env(saved)
    print_sweep(rows, backends)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["byte_exact"] for r in rows) else 1


def print_sweep(rows: list[dict], backends: list[str]) -> None:
    for b in backends:
        print(f"\nNIXL sweep, {b}: GB/s decimal (block x batch over the average transfer time); times in us")
        print(SWEEP_HEAD)
        print("-" * len(SWEEP_HEAD))
        for r in rows:
            if r["backend"] == b:
                print(sweep_line(r, rows))
    if len(backends) > 1:
        a, b = backends[0], backends[1]
        key = lambda r: (r["op"], r["mem"], r["block"], r["batch"])
        other = {key(r): r for r in rows if r["backend"] == b}
        print(f"\n{a} against {b}, same points: GB/s ratio, p50 latency (us)")
        misses = 0
        for r in rows:
            o = other.get(key(r)) if r["backend"] == a else None
            if o is None:
                continue
            ratio = r["gb_s"] / o["gb_s"] if o["gb_s"] else float("inf")
            lower = r["tx_p50_us"] < o["tx_p50_us"]
            misses += not lower
            print(
                f"{r['op']:>5} {r['mem']:>9} {fmt_size(r['block']):>6} {r['batch']:>5} "
                f"{ratio:>7.2f}x  p50 {r['tx_p50_us']:>9.1f} vs {o['tx_p50_us']:>9.1f}" + ("" if lower else "  (higher)")
            )
        print(f"points where {a}'s p50 latency is not lower: {misses}")
    bad = [r for r in rows if not r["byte_exact"]]
    print(f"bytes checked once per point (after its last transfer): {len(rows) - len(bad)} of {len(rows)} byte-exact")


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--role",
        choices=["server", "client"],
        help="two hosts: server (its memory is written or read) or client (posts the transfers); "
        "without --role both agents run on this machine",
    )
    ap.add_argument("--remote-ip", help="the server's address (client only)")
    ap.add_argument("--port", type=int, default=LISTEN_PORT, help=f"the server's NIXL listener port (default {LISTEN_PORT})")
    ap.add_argument(
        "--backend",
        help="tcpx or ucx (two hosts, default tcpx); one machine: a comma list (default TCPX,UCX)",
    )
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="buffer location (default cpu)")
    ap.add_argument("--local-gpu-idx", type=int, default=0, help="GPU of the buffers with --device gpu")
    ap.add_argument(
        "--op-type",
        "--op",
        dest="op",
        type=str.lower,
        choices=["write", "read"],
        default="write",
        help="NIXL operation the client (initiator) posts (default write)",
    )
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list of bytes, K/M/G allowed (default {DEFAULT_SIZES})")
    ap.add_argument(
        "--iters",
        type=int,
        help="iterations per size, excluding the warm-up (default 20); with --sweep the most per point (default 200)",
    )
    ap.add_argument("--warmup", type=int, default=3, help="warm-up iterations per size (default 3)")
    ap.add_argument("--num-kvblocks", type=int, default=1, help="blocks (descriptors) per transfer (default 1)")
    ap.add_argument(
        "--nics",
        help="TCPX data NICs (names or addresses); default: 127.0.0.1 on one machine, "
        "else the plugin's (NCCL_GPUDIRECTTCPX_SOCKET_IFNAME, or every up interface)",
    )
    ap.add_argument("--plugin", type=pathlib.Path, help="libplugin_TCPX.so to load (see above for the default)")
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds: one machine, per backend (default 300); two hosts, the longest wait for the peer (default 120)",
    )
    ap.add_argument(
        "--progress-thread",
        choices=["on", "off"],
        default="on",
        help="the agents' enable_prog_thread (NIXL's default: on). TCPX then polls from one thread; "
        "off: it sleeps on its sockets. UCX always runs with it on",
    )
    ap.add_argument("--json", type=pathlib.Path, help="also write the results here")
    sw = ap.add_argument_group(
        "sweep (nixlbench-shaped: block size x blocks per transfer x op x memory kinds, two processes "
        "through the agents' metadata exchange; without --role both run here, per backend of --backend)"
    )
    sw.add_argument("--sweep", action="store_true", help="run the sweep instead of the size list")
    sw.add_argument("--block-sizes", default=SWEEP_BLOCKS, help=f"block sizes (default {SWEEP_BLOCKS})")
    sw.add_argument("--batch-sizes", default=SWEEP_BATCHES, help=f"blocks per transfer (default {SWEEP_BATCHES})")
    sw.add_argument("--ops", default="write,read", help="operations (default write,read)")
    sw.add_argument(
        "--mems",
        help="initiator:target memory kinds, comma list (default DRAM:DRAM; with --device gpu all four of DRAM/VRAM)",
    )
    sw.add_argument("--max-transfer", default="64M", help="leave out points moving more per transfer (default 64M)")
    sw.add_argument("--sweep-bytes", default="64M", help="bytes to move per point, within 5..--iters transfers (default 64M)")
    sw.add_argument("--sweep-timeout", type=float, default=1800, help="seconds for one backend's whole sweep (default 1800)")
    args = ap.parse_args()

    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: a comma list of byte counts (K/M/G suffixes allowed)")
    if not sizes or min(sizes) < 1:
        ap.error("--sizes: every size must be at least 1 byte")
    if args.num_kvblocks < 1 or args.num_kvblocks > min(sizes):
        ap.error(f"--num-kvblocks must be 1..{min(sizes)} (the smallest size in bytes)")
    args.iters = args.iters or (200 if args.sweep else 20)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be at least 1 and --warmup at least 0")
    check_device(args, ap)
    if args.sweep:
        return sweep_main(args, ap)
    if args.role is None:
        backends = [b.strip().upper() for b in (args.backend or "TCPX,UCX").split(",") if b.strip()]
        for b in backends:
            if b not in ("TCPX", "UCX"):
                ap.error(f"unknown backend {b!r}; use TCPX and/or UCX")
        args.timeout = args.timeout or 300
        try:
            return run_one_machine(args, backends, sizes)
        except Failed as e:
            sys.exit(str(e))
    backend = (args.backend or "tcpx").strip().upper()
    if backend not in ("TCPX", "UCX"):
        ap.error(f"--backend {args.backend!r}: with --role use tcpx or ucx (one backend)")
    if args.role == "client" and not args.remote_ip:
        ap.error("--role client needs --remote-ip (the server's address)")
    args.timeout = args.timeout or 120
    try:
        return run_two_hosts(args, backend, sizes)
    except Failed as e:
        print(f"[{args.role}] error: {e}", file=sys.stderr)
        return 2


def sweep_main(args, ap) -> int:
    try:
        args.max_transfer = parse_size(args.max_transfer)
        args.sweep_bytes = parse_size(args.sweep_bytes)
    except ValueError:
        ap.error("--max-transfer and --sweep-bytes take byte counts (K/M/G suffixes allowed)")
    if args.mems is None:
        args.mems = "DRAM:DRAM,VRAM:VRAM,DRAM:VRAM,VRAM:DRAM" if args.device == "gpu" else "DRAM:DRAM"
    if "VRAM" in args.mems.upper() and args.device != "gpu":
        args.device = "gpu"
        check_device(args, ap)
    try:
        sweep_points(args)
    except Failed as e:
        ap.error(str(e))
    if args.role is None:
        backends = [b.strip().upper() for b in (args.backend or "TCPX,UCX").split(",") if b.strip()]
        if any(b not in ("TCPX", "UCX") for b in backends):
            ap.error("--backend: TCPX and/or UCX")
        args.timeout = args.timeout or 120
        try:
            return run_sweep_local(args, backends)
        except Failed as e:
            sys.exit(str(e))
    backend = (args.backend or "tcpx").strip().upper()
    if backend not in ("TCPX", "UCX"):
        ap.error(f"--backend {args.backend!r}: with --role use tcpx or ucx (one backend)")
    if args.role == "client" and not args.remote_ip:
        ap.error("--role client needs --remote-ip (the server's address)")
    args.timeout = args.timeout or 120
    return run_sweep_role(args, backend)


if __name__ == "__main__":
    sys.exit(main())
