"""The TCPX plugin inside the PyPI NIXL agent, against a peer in another process."""

import ctypes
import os
import time

import numpy as np
import pytest

from peer import MAIN, OPTS, make_agent, register, sha

LOCAL = 80 << 20


def state(agent, h):
    """check_xfer_state, with the binding's error exceptions read as "ERR:<name>"."""
    try:
        return agent.check_xfer_state(h)
    except Exception as e:  # nixl raises nixl*Error for failed transfers
        return f"ERR:{type(e).__name__}"


def wait_all(agent, handles, timeout=30):
    """Polls until no handle is in progress; returns the final states."""
    deadline = time.monotonic() + timeout
    states = ["PROC"] * len(handles)
    while "PROC" in states:
        assert time.monotonic() < deadline, f"transfers still in progress: {states}"
        states = [s if s != "PROC" else state(agent, h) for s, h in zip(states, handles)]
    return states


@pytest.fixture
def pair(peer):
    """(initiator agent, local buffer, peer) with metadata exchanged both ways."""
    agent = make_agent("I")
    local = np.zeros(LOCAL, np.uint8)
    register(agent, local)
    assert agent.add_remote_agent(peer.metadata) == peer.name.encode()
    peer.call("add_remote", agent.get_agent_metadata())
    yield agent, local, peer


def xfer(agent, op, local, loff, raddr, pairs, notif=b""):
    """One request moving `pairs` of (local offset, remote offset, length)."""
    base = local.ctypes.data
    ld = agent.get_xfer_descs([(base + loff + lo, n, 0) for lo, _, n in pairs], "DRAM")
    rd = agent.get_xfer_descs([(raddr + ro, n, 0) for _, ro, n in pairs], "DRAM")
    h = agent.initialize_xfer(op, ld, rd, "T", notif)
    assert agent.transfer(h) in ("PROC", "DONE")
    return h


def cuda_usable():
    """Whether this process can use a CUDA device, asked of libcuda directly
    (not of the plugin, whose answer is what the tests check)."""
    if os.environ.get("TCPX_CUDA_DISABLE", "") not in ("", "0"):
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    n = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0


def test_plugin_is_listed_with_its_options_and_honest_memory_kinds():
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    a = nixl_agent("solo", nixl_agent_config(backends=[]))
    assert "TCPX" in a.get_plugin_list()
    assert set(a.get_plugin_params("TCPX")) == {"nics", "sockets_per_nic", "chunk_size", "timeout_ms", "pack_dram"}
    expected = ["DRAM_SEG", "VRAM_SEG"] if cuda_usable() else ["DRAM_SEG"]
    assert a.get_plugin_mem_types("TCPX") == expected
    a.create_backend("TCPX", OPTS)
    assert a.get_backend_mem_types("TCPX") == expected


def test_vram_registration_of_non_gpu_memory_fails_cleanly(capfd):
    """NIXL hands a VRAM registration to the plugin even where it reports DRAM
    only; the fake pointer must be refused with the cause, the agent kept usable."""
    agent = make_agent("vram")
    fake = agent.get_reg_descs([(1 << 20, 4096, 0, "")], "VRAM")
    with pytest.raises(Exception):
        agent.register_memory(fake, backends=["TCPX"])
    err = capfd.readouterr().err
    if cuda_usable():
        assert "is not GPU memory" in err, err
    else:
        assert "registerMem failed (status -9): VRAM needs CUDA, which is unusable in this process" in err, err
    buf = np.zeros(4096, np.uint8)
    register(agent, buf)


def test_unknown_option_is_rejected_with_a_message(capfd):
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    a = nixl_agent("picky", nixl_agent_config(backends=[]))
    with pytest.raises(Exception):
        a.create_backend("TCPX", {"nics": "127.0.0.1", "sockets_per_nick": "2"})
    err = capfd.readouterr().err
    assert "unknown TCPX backend option \"sockets_per_nick\"" in err
    assert "known options: nics, sockets_per_nic, chunk_size, timeout_ms, pack_dram" in err
    with pytest.raises(Exception):
        a.create_backend("TCPX", {"timeout_ms": "soon"})
    assert "bad value \"soon\" for TCPX backend option \"timeout_ms\"" in capfd.readouterr().err


@pytest.mark.parametrize("prog_thread", [True, False])
def test_the_agents_progress_thread_setting_reaches_the_engine(prog_thread):
    """NIXL passes enable_prog_thread through its init parameters; the engine
    then runs one polling thread (`tcpx-nixl-poll`), else none. This also checks
    where our ABI declaration puts that field."""
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    def pollers():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return names.count("tcpx-nixl-poll")

    before = pollers()
    a = nixl_agent(f"pt{prog_thread}", nixl_agent_config(enable_prog_thread=prog_thread, backends=[]))
    a.create_backend("TCPX", OPTS)
    # A new thread names itself once it runs: give it that moment.
    want = 1 if prog_thread else 0
    deadline = time.monotonic() + (5 if prog_thread else 0.3)
    while pollers() - before != want and time.monotonic() < deadline:
        time.sleep(0.01)
    if not prog_thread:
        time.sleep(0.3)
    assert pollers() - before == want


SIZES = [1, 7, 4096, 65537, (1 << 20) + 3, 16 << 20, 64 << 20]


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_sizes_are_moved_byte_exact(pair, op):
    agent, local, peer = pair
    rng = np.random.default_rng(1)
    local[:] = rng.integers(0, 256, LOCAL, dtype=np.uint8)
    peer.call("fill", "main", 2)
    raddr = peer.addr["main"]
    for i, n in enumerate(SIZES):
        lo, ro = 13 * i, 1000 + 7 * i  # unaligned on both sides
        if op == "READ":
            local[lo : lo + n] = 0
        h = xfer(agent, op, local, 0, raddr, [(lo, ro, n)])
        assert wait_all(agent, [h]) == ["DONE"], n
        assert peer.call("hash", "main", ro, n) == sha(local, lo, n), f"{op} of {n} bytes differs"
        agent.release_xfer_handle(h)


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_many_descriptors_and_requests_in_flight(pair, op):
    agent, local, peer = pair
    rng = np.random.default_rng(3)
    local[:] = rng.integers(0, 256, LOCAL, dtype=np.uint8)
    peer.call("fill", "main", 4)
    raddr = peer.addr["main"]
    # 4 requests x 300 descriptors of random sizes at random, disjoint places.
    reqs, at = [], 0
    for _ in range(4):
        pairs = []
        for _ in range(300):
            n = int(rng.integers(1, 40_000))
            pairs.append((at, MAIN - at - n, n))  # reversed layout on the remote side
            at += n + int(rng.integers(0, 64))
        reqs.append(pairs)
    if op == "READ":
        local[:] = 0
    handles = [xfer(agent, op, local, 0, raddr, p) for p in reqs]
    assert wait_all(agent, handles) == ["DONE"] * 4
    for pairs in reqs:
        got = [peer.call("hash", "main", ro, n) for _, ro, n in pairs]
        assert got == [sha(local, lo, n) for lo, _, n in pairs]


def test_reposting_a_handle_moves_fresh_data(pair):
    agent, local, peer = pair
    h = xfer(agent, "WRITE", local, 0, peer.addr["main"], [(0, 0, 4096)])
    assert wait_all(agent, [h]) == ["DONE"]
    local[:4096] = 0x5A
    assert agent.transfer(h) in ("PROC", "DONE")
    assert wait_all(agent, [h]) == ["DONE"]
    assert peer.call("hash", "main", 0, 4096) == sha(local, 0, 4096)


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_notification_arrives_once_after_the_data(pair, op):
    agent, local, peer = pair
    local[:] = np.random.default_rng(5).integers(0, 256, LOCAL, dtype=np.uint8)
    n = 32 << 20
    msg = f"done-{op}".encode()
    # The target starts watching before the transfer is posted.
    peer.conn.send(("wait_notif", msg, "main", 0, n, 30))
    h = xfer(agent, op, local, 0, peer.addr["main"], [(0, 0, n)], notif=msg)
    assert wait_all(agent, [h]) == ["DONE"]
    assert peer.conn.poll(30)
    seen_hash, seen = peer.conn.recv()
    assert seen == [msg]
    assert seen_hash == sha(local, 0, n), "notification came before the data"
    time.sleep(0.2)
    assert peer.call("notifs") == {}, "notification delivered twice"


def test_standalone_notification(pair):
    agent, _, peer = pair
    agent.send_notif("T", b"\x00binary\xff")
    deadline = time.monotonic() + 10
    got = {}
    while not got and time.monotonic() < deadline:
        got = peer.call("notifs")
    assert got == {"I": [b"\x00binary\xff"]}


def test_nixl_refuses_ranges_outside_remote_registrations(pair):
    agent, local, peer = pair
    with pytest.raises(Exception):
        xfer(agent, "WRITE", local, 0, peer.addr["main"], [(0, MAIN - 10, 20)])


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_target_refuses_access_to_unregistered_memory(pair, op, capfd):
    """The initiator's metadata is stale (the target deregistered): our target-side
    check must refuse, report an error, and leave its memory untouched."""
    agent, local, peer = pair
    local[:] = 0x11
    peer.call("fill", "main", 9)
    before = peer.call("hash", "main", 0, 1 << 20)
    peer.call("dereg", "main")
    h = xfer(agent, op, local, 0, peer.addr["main"], [(0, 0, 1 << 20)], notif=b"must-not-arrive")
    assert wait_all(agent, [h]) == ["ERR:nixlNotAllowedError"]
    assert "is not inside a registration of agent \"T\"" in capfd.readouterr().err
    assert peer.call("hash", "main", 0, 1 << 20) == before
    if op == "READ":
        assert (local[: 1 << 20] == 0x11).all(), "refused READ wrote local memory"
    # The link survived the refusal: the still-registered buffer works.
    local[:4096] = 0x77
    h2 = xfer(agent, "WRITE", local, 0, peer.addr["spare"], [(0, 0, 4096)], notif=b"ok")
    assert wait_all(agent, [h2]) == ["DONE"]
    assert peer.call("hash", "spare", 0, 4096) == sha(local, 0, 4096)
    time.sleep(0.2)
    assert peer.call("notifs") == {"I": [b"ok"]}


def test_killed_peer_turns_transfers_into_errors(pair):
    agent, local, peer = pair
    handles = [xfer(agent, "WRITE", local, 0, peer.addr["main"], [(0, 0, 64 << 20)]) for _ in range(6)]
    peer.kill()
    start = time.monotonic()
    states = wait_all(agent, handles, timeout=15)
    assert time.monotonic() - start < 10
    assert "ERR:nixlRemoteDisconnectError" in states, states
    assert set(states) <= {"DONE", "ERR:nixlRemoteDisconnectError"}
