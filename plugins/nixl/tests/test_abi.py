"""Our declared NIXL ABI against the wheel's own binaries (see shim/nixl_abi.h)."""

import pathlib
import shutil
import subprocess

import pytest

from conftest import PLUGIN


def wheel_ucx_plugin():
    import nixl_cu12

    site = pathlib.Path(nixl_cu12.__file__).resolve().parents[1]
    return site / ".nixl_cu12.mesonpy.libs" / "plugins" / "libplugin_UCX.so"


def vtable_size(lib, cls):
    out = subprocess.run(["nm", "-C", "-S", str(lib)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.endswith(f"vtable for {cls}"):
            return int(line.split()[1], 16)
    return None


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils nm not installed")
def test_base_class_vtable_has_nixls_slot_count():
    theirs = vtable_size(wheel_ucx_plugin(), "nixlBackendEngine")
    ours = vtable_size(PLUGIN, "nixlBackendEngine")
    assert theirs == 0xE8, "the wheel changed nixlBackendEngine: re-derive shim/nixl_abi.h"
    assert ours == theirs


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils nm not installed")
def test_plugin_exports_the_entry_points_and_needs_nothing_from_nixl():
    dyn = subprocess.run(["nm", "-D", str(PLUGIN)], capture_output=True, text=True, check=True).stdout
    exported = {l.split()[-1] for l in dyn.splitlines() if " T " in l}
    assert {"nixl_plugin_init", "nixl_plugin_fini"} <= exported
    undefined = [l for l in dyn.splitlines() if " U " in l and "nixl" in l.lower()]
    assert undefined == []
