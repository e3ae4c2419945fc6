"""A NIXL agent with the TCPX backend in a second process, driven over a pipe.

The target process owns two registered buffers (`main`, `spare`) and answers
commands; the test process is the initiator.
"""

import hashlib
import multiprocessing as mp
import time

import numpy as np

MAIN = 80 << 20
SPARE = 1 << 20
OPTS = {"nics": "127.0.0.1", "timeout_ms": "5000"}


def make_agent(name, **extra):
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    a = nixl_agent(name, nixl_agent_config(backends=[]))
    a.create_backend("TCPX", {**OPTS, **extra})
    return a


def register(agent, arr):
    descs = agent.get_reg_descs([(arr.ctypes.data, arr.nbytes, 0, "")], "DRAM")
    agent.register_memory(descs, backends=["TCPX"])
    return descs


def sha(arr, off, n):
    return hashlib.sha256(memoryview(arr[off : off + n])).hexdigest()


def _target(conn, name):
    agent = make_agent(name)
    bufs = {"main": np.zeros(MAIN, np.uint8), "spare": np.zeros(SPARE, np.uint8)}
    regs = {k: register(agent, v) for k, v in bufs.items()}
    conn.send((agent.get_agent_metadata(), {k: v.ctypes.data for k, v in bufs.items()}))
    while True:
        cmd, *args = conn.recv()
        if cmd == "exit":
            conn.send(None)
            return
        if cmd == "add_remote":
            conn.send(agent.add_remote_agent(args[0]))
        elif cmd == "fill":
            buf, seed = args
            rng = np.random.default_rng(seed)
            bufs[buf][:] = rng.integers(0, 256, bufs[buf].size, dtype=np.uint8)
            conn.send(None)
        elif cmd == "hash":
            buf, off, n = args
            conn.send(sha(bufs[buf], off, n))
        elif cmd == "notifs":
            conn.send(agent.get_new_notifs())
        elif cmd == "wait_notif":
            # Hash the range the moment the notification is seen: proves the
            # data was in place before the notification was delivered.
            msg, buf, off, n, timeout = args
            deadline = time.monotonic() + timeout
            got = []
            while time.monotonic() < deadline:
                got += agent.get_new_notifs().get("I", [])
                if msg in got:
                    conn.send((sha(bufs[buf], off, n), got))
                    break
            else:
                conn.send((None, got))
        elif cmd == "dereg":
            agent.deregister_memory(regs.pop(args[0]), backends=["TCPX"])
            conn.send(None)


class Peer:
    def __init__(self, name="T"):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_target, args=(child, name), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise RuntimeError("target agent did not start")
        self.metadata, self.addr = self.conn.recv()
        self.name = name

    def call(self, *cmd, timeout=60):
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"target did not answer {cmd[0]}")
        return self.conn.recv()

    def kill(self):
        self.proc.kill()
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self.call("exit", timeout=10)
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()
