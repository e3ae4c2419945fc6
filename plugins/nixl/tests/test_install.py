"""plugins/nixl/install.sh: TCPX in the wheel's own plugin folder, beside
UCX, without NIXL_PLUGIN_DIR. Every agent here runs in a fresh Python
without NIXL_PLUGIN_DIR (this process has it set, see conftest.py); the
wheel's folder is put back as it was afterwards."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from conftest import PLUGIN, ROOT

INSTALL = ROOT / "plugins" / "nixl" / "install.sh"

BOTH_IN_ONE_AGENT = textwrap.dedent(
    """
    import json
    import numpy as np
    from nixl_cu12._api import nixl_agent, nixl_agent_config

    def agent(name):
        a = nixl_agent(name, nixl_agent_config(backends=[]))
        a.create_backend("UCX", {})
        a.create_backend("TCPX", {"nics": "127.0.0.1"})
        return a

    a, b = agent("A"), agent("B")
    src = (np.arange(1 << 20) % 251).astype(np.uint8)
    dst = np.zeros(1 << 20, np.uint8)
    for ag, arr in ((a, src), (b, dst)):
        ag.register_memory(ag.get_reg_descs([(arr.ctypes.data, arr.nbytes, 0, "")], "DRAM"))
    a.add_remote_agent(b.get_agent_metadata())
    b.add_remote_agent(a.get_agent_metadata())
    h = a.initialize_xfer(
        "WRITE",
        a.get_xfer_descs([(src.ctypes.data, src.nbytes, 0)], "DRAM"),
        b.get_xfer_descs([(dst.ctypes.data, dst.nbytes, 0)], "DRAM"),
        "B",
        backends=["TCPX"],
    )
    state = a.transfer(h)
    while state == "PROC":
        state = a.check_xfer_state(h)
    print(json.dumps({
        "plugins": a.get_plugin_list(),
        "backends": sorted(a.backends),
        "xfer_backend": a.query_xfer_backend(h),
        "state": state,
        "exact": bool((src == dst).all()),
    }))
    """
)


def clean_env():
    env = {k: v for k, v in os.environ.items() if k != "NIXL_PLUGIN_DIR"}
    env.update(UCX_TLS="tcp", UCX_NET_DEVICES="lo")
    return env


def install(*args, plugin=PLUGIN):
    return subprocess.run(
        [str(INSTALL), "--python", sys.executable, "--plugin", str(plugin), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )


def fresh_python(code):
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=clean_env()
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def plugin_list():
    return fresh_python(
        "import json\n"
        "from nixl_cu12._api import nixl_agent, nixl_agent_config\n"
        "print(json.dumps(nixl_agent('L', nixl_agent_config(backends=[])).get_plugin_list()))"
    )


@pytest.fixture
def wheel_dir():
    """The wheel's plugin folder, with its libplugin_TCPX.so put back as it was."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "python" / "nixl_plugins.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=True,
    )
    d = pathlib.Path(r.stdout.strip())
    dest = d / "libplugin_TCPX.so"
    before = dest.read_bytes() if dest.exists() else None
    try:
        yield d
    finally:
        if before is None:
            dest.unlink(missing_ok=True)
        else:
            tmp = d / "libplugin_TCPX.so.restore"
            tmp.write_bytes(before)
            tmp.replace(dest)


def test_the_plugin_folder_is_the_one_beside_the_wheels_libnixl(wheel_dir):
    import nixl_cu12

    site = pathlib.Path(nixl_cu12.__file__).resolve().parents[1]
    assert wheel_dir == site / ".nixl_cu12.mesonpy.libs" / "plugins"
    assert (wheel_dir / "libplugin_UCX.so").is_file()


def test_installed_plugin_and_ucx_in_one_agent_then_uninstalled(wheel_dir):
    dest = wheel_dir / "libplugin_TCPX.so"
    install("--uninstall")
    assert "TCPX" not in plugin_list()

    r = install()
    assert r.returncode == 0 and r.stdout.strip() == f"installed {dest}", r.stderr
    assert dest.read_bytes() == PLUGIN.read_bytes()
    r = install()
    assert r.returncode == 0 and r.stdout.strip() == f"already installed: {dest}", r.stderr

    got = fresh_python(BOTH_IN_ONE_AGENT)
    assert {"UCX", "TCPX"} <= set(got["plugins"]), got
    assert got["backends"] == ["TCPX", "UCX"]
    assert (got["xfer_backend"], got["state"], got["exact"]) == ("TCPX", "DONE", True), got

    r = install("--uninstall")
    assert r.returncode == 0 and r.stdout.strip() == f"removed {dest}", r.stderr
    assert not dest.exists()
    listed = plugin_list()
    assert "UCX" in listed and "TCPX" not in listed
    r = install("--uninstall")
    assert r.returncode == 0 and r.stdout.strip() == f"not installed in {wheel_dir}", r.stderr


def test_a_missing_plugin_is_refused_and_nothing_changes(wheel_dir, tmp_path):
    before = sorted(p.name for p in wheel_dir.iterdir())
    r = install(plugin=tmp_path / "libplugin_TCPX.so")
    assert r.returncode != 0
    assert "not found: build it with cargo build --release -p tcpx-nixl" in r.stderr
    assert sorted(p.name for p in wheel_dir.iterdir()) == before
