"""The plugin's log through the real agent: NCCL_DEBUG / NCCL_DEBUG_SUBSYS /
UCCL_TCPX_DEBUG / TCPX_LOG choose what reaches stderr, and the TCPX
environment block is reported once when the backend is created. Each case
runs in a fresh Python (the logger is installed once per process)."""

import os
import re
import subprocess
import sys

import pytest

CREATE = (
    "from nixl_cu12._api import nixl_agent, nixl_agent_config\n"
    "a = nixl_agent('log', nixl_agent_config(backends=[]))\n"
    "a.create_backend('TCPX', {'nics': '127.0.0.1'})\n"
    "print('created')\n"
)

BLOCK = {
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME": "lo",
    "NCCL_TCPX_RXMEM_IMPORT_USE_GPU_PCI_CLIENT": "1",
    "NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX": "/nonexistent/tcpx",
    "NCCL_GPUDIRECTTCPX_PROGRAM_FLOW_STEERING_WAIT_MICROS": "50000",
    "NCCL_GPUDIRECTTCPX_MIN_ZCOPY_SIZE": "4096",
    "NCCL_GPUDIRECTTCPX_FORCE_ACK": "1",
    "NCCL_NET_GDR_LEVEL": "PIX",
    "NCCL_P2P_PXN_LEVEL": "0",
    "TCPX_GPU_PCI": "0000:00:00.0",
}
DEBUG_VARS = ("UCCL_TCPX_DEBUG", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "TCPX_LOG")


def create(**env):
    e = {k: v for k, v in os.environ.items() if k not in DEBUG_VARS and k not in BLOCK}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", CREATE], capture_output=True, text=True, timeout=120, env=e)
    assert r.returncode == 0 and "created" in r.stdout, r.stderr
    return r.stderr


def ours(err, level):
    """Our tracing lines of one level (the plugin's format: time, level, target)."""
    return [l for l in err.splitlines() if re.match(rf"^\S+Z +{level} (tcpx|plugin_TCPX)", l)]


def test_nccl_debug_info_reports_the_whole_block_once():
    err = create(**BLOCK, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="ENV")
    report = [l for l in ours(err, "INFO") + ours(err, "WARN") if "tcpx::config" in l]
    for var in list(BLOCK)[:-1] + ["NCCL_DEBUG", "NCCL_DEBUG_SUBSYS"]:
        lines = [l for l in report if f" {var}=\"" in l]
        assert len(lines) == 1, f"{var}: {lines}\n{err}"
    force_ack = [l for l in report if "NCCL_GPUDIRECTTCPX_FORCE_ACK" in l][0]
    assert " INFO " in force_ack and "sets TCP_QUICKACK" in force_ack
    assert any("NCCL_NET_GDR_LEVEL=\"PIX\": NCCL-only" in l for l in report)
    # The backend option decides the data NICs, and the report says so.
    assert any('NCCL_GPUDIRECTTCPX_SOCKET_IFNAME="lo": overridden by the backend option nics' in l for l in report)
    assert any('our log filter is "info" (decided by NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=ENV' in l for l in report)
    assert any("tcpx device: kernel TCP with host memory" in l for l in ours(err, "INFO")), err


def test_warnings_only_by_default():
    err = create(**BLOCK)
    assert ours(err, "INFO") == [], err
    # Warnings still show: the daemon the block names is absent here.
    assert any("gpumemd unavailable" in l for l in ours(err, "WARN")), err


@pytest.mark.parametrize(
    "env,shown,hidden",
    [
        ({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "COLL,GRAPH"}, ["WARN"], ["INFO"]),
        ({"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}, ["WARN", "INFO"], ["DEBUG"]),
        ({"UCCL_TCPX_DEBUG": "1"}, ["WARN", "INFO", "DEBUG"], []),
        ({"UCCL_TCPX_DEBUG": "0"}, ["WARN"], ["INFO"]),
        ({"TCPX_LOG": "error", "NCCL_DEBUG": "INFO", "UCCL_TCPX_DEBUG": "1"}, [], ["WARN", "INFO", "DEBUG"]),
    ],
)
def test_debug_variables_choose_the_levels(env, shown, hidden):
    err = create(**BLOCK, **env)
    for level in shown:
        assert ours(err, level), f"no {level} line with {env}:\n{err}"
    for level in hidden:
        assert not ours(err, level), f"{level} lines with {env}:\n{err}"
