#!/usr/bin/env python3
"""NCCL collectives through whatever net NCCL picks (our plugin or Socket),
with result checks and bus bandwidth, as nccl-tests reports it.

    python3 nccl_check.py run --ranks 2 --out plugin.json      # one process per GPU
    python3 nccl_check.py table plugin.json socket.json        # busbw side by side

The environment (NCCL_NET_PLUGIN, NCCL_NET, NCCL_DEBUG, ...) comes from the
caller: gpu-test.sh. With --ranks 1 only communicator setup runs (it loads
and initializes the net plugin; nothing crosses the network).
"""
import argparse
import json
import os
import sys
import time


def sizes(lo, hi):
    # 8 B, 64 B, ... 1 GiB: powers of 8 from lo, plus 64 MiB and 256 MiB,
    # where the bandwidth target is judged.
    out, s = set(), lo
    while s <= hi:
        out.add(s)
        s *= 8
    out.update(x for x in (64 << 20, 256 << 20) if lo <= x <= hi)
    return sorted(out)


def iters_for(nbytes):
    # ~256 MiB of traffic per point, between 5 and 40 timed iterations.
    return max(5, min(40, (256 << 20) // max(nbytes, 1)))


def worker(rank, world, args):
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    results, failures = [], []

    def timed(fn, n):
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    def record(op, nbytes, sec, factor, ok):
        algbw = nbytes / sec / 1e9
        results.append(dict(op=op, bytes=nbytes, us=sec * 1e6, algbw=algbw,
                            busbw=algbw * factor, ok=ok))
        if not ok:
            failures.append(f"{op} {nbytes} B")

    if world > 1:
        for nbytes in sizes(args.min_bytes, args.max_bytes):
            n = iters_for(nbytes)
            count = max(nbytes // 4, 2)
            # all_reduce (in place): every rank holds rank+1 → sum = w(w+1)/2, exact in fp32.
            x = torch.full((count,), float(rank + 1), device=dev)
            dist.all_reduce(x)
            ok = bool(torch.all(x == world * (world + 1) / 2).item())
            sec = timed(lambda: dist.all_reduce(x), n)
            record("all_reduce", count * 4, sec, 2 * (world - 1) / world, ok)

            # all_gather: nbytes is the gathered size (nccl-tests convention).
            per = max(count // world, 1)
            inp = torch.arange(per, device=dev, dtype=torch.int32) + rank * per
            out = torch.empty(per * world, device=dev, dtype=torch.int32)
            dist.all_gather_into_tensor(out, inp)
            ok = bool(torch.equal(out, torch.arange(per * world, device=dev, dtype=torch.int32)))
            sec = timed(lambda: dist.all_gather_into_tensor(out, inp), n)
            record("all_gather", per * world * 4, sec, (world - 1) / world, ok)

            # send/recv between ranks 0 and 1, both directions at once.
            if rank < 2:
                peer = 1 - rank
                src = torch.arange(count, device=dev, dtype=torch.int32) * 3 + rank
                dst = torch.zeros(count, device=dev, dtype=torch.int32)

                def sendrecv():
                    ops = [dist.P2POp(dist.isend, src, peer), dist.P2POp(dist.irecv, dst, peer)]
                    for r in dist.batch_isend_irecv(ops):
                        r.wait()

                sendrecv()
                torch.cuda.synchronize()
                want = torch.arange(count, device=dev, dtype=torch.int32) * 3 + peer
                ok = bool(torch.equal(dst, want))
                sec = timed(sendrecv, n)
                record("sendrecv", count * 4, sec, 1.0, ok)
            if rank == 0:
                r = results[-1]
                print(f"[rank0] {nbytes:>12} B done ({r['op']} {r['busbw']:.2f} GB/s)", flush=True)
            del x, inp, out
            torch.cuda.empty_cache()
    else:
        x = torch.ones(16, device=dev)
        dist.all_reduce(x)
        ok = bool(torch.all(x == 1).item())
        results.append(dict(op="setup", bytes=64, us=0, algbw=0, busbw=0, ok=ok))
        if not ok:
            failures.append("single-rank all_reduce")

    flags = torch.tensor([len(failures)], device=dev)
    dist.all_reduce(flags)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(dict(world=world, results=results, failures=failures,
                           total_failures=int(flags.item())), f, indent=1)
    dist.destroy_process_group()
    if flags.item():
        sys.exit(f"rank {rank}: result check failed: {failures}")


def run(args):
    import torch
    import torch.multiprocessing as mp

    have = torch.cuda.device_count()
    if have < args.ranks:
        sys.exit(f"need {args.ranks} GPUs, found {have}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    mp.spawn(worker, args=(args.ranks, args), nprocs=args.ranks, join=True)


def human(n):
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"


def table(args):
    a = json.load(open(args.plugin))
    b = json.load(open(args.socket))
    key = lambda r: (r["op"], r["bytes"])
    sock = {key(r): r for r in b["results"]}
    print(f"{'op':<11} {'size':>10} {'TCPX-rs busbw':>14} {'Socket busbw':>13} {'ratio':>7}  check")
    print("-" * 66)
    for r in a["results"]:
        s = sock.get(key(r))
        sb = s["busbw"] if s else float("nan")
        ratio = r["busbw"] / sb if s and sb > 0 else float("nan")
        ok = "ok" if r["ok"] and (s is None or s["ok"]) else "FAIL"
        print(f"{r['op']:<11} {human(r['bytes']):>10} {r['busbw']:>11.2f} GB/s {sb:>8.2f} GB/s {ratio:>7.2f}  {ok}")
    big = [r["busbw"] / sock[key(r)]["busbw"] for r in a["results"]
           if r["bytes"] >= 64 << 20 and key(r) in sock and sock[key(r)]["busbw"] > 0]
    if big:
        gm = 1.0
        for x in big:
            gm *= x
        gm **= 1 / len(big)
        print(f"\nratio at >= 64 MiB: geometric mean {gm:.2f}, min {min(big):.2f} over {len(big)} points")
    bad = a["total_failures"] + b["total_failures"]
    print(f"\nresult checks: {'all passed' if bad == 0 else f'{bad} FAILED'}")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--ranks", type=int, default=2)
    r.add_argument("--min-bytes", type=int, default=8)
    r.add_argument("--max-bytes", type=int, default=1 << 30)
    r.add_argument("--out")
    t = sub.add_parser("table")
    t.add_argument("plugin")
    t.add_argument("socket")
    args = p.parse_args()
    if args.cmd == "run":
        run(args)
        return 0
    return table(args)


if __name__ == "__main__":
    sys.exit(main())
