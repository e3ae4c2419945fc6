"""Shared setup: point NIXL at the freshly built plugin before any agent exists."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
PLUGIN = pathlib.Path(
    os.environ.get("TCPX_NIXL_PLUGIN", ROOT / "target" / "release" / "libplugin_TCPX.so")
)

if not PLUGIN.is_file():
    raise RuntimeError(f"{PLUGIN} not found: build it with `cargo build --release -p tcpx-nixl`")
# NIXL_PLUGIN_DIR replaces the wheel's plugin folder for this process and the
# peers it spawns (they inherit the environment).
os.environ["NIXL_PLUGIN_DIR"] = str(PLUGIN.parent)
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")


@pytest.fixture
def peer():
    from peer import Peer

    p = Peer()
    yield p
    p.close()
