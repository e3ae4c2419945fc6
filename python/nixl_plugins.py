#!/usr/bin/env python3
"""Where the NIXL wheel of this Python loads its backend plugins from.

NIXL 1.5.1 loads plugins from NIXL_PLUGIN_DIR when it is set (and then from
there only), else from `plugins/` beside the libnixl.so that holds its plugin
manager (ai-dynamo/nixl src/core/nixl_plugin_manager.cpp, getPluginDir:
dladdr of itself, then "/plugins"). This module finds that libnixl.so the way
the dynamic loader did: it imports the wheel's bindings and reads the path
of the mapped libnixl.so from /proc/self/maps.

    python python/nixl_plugins.py          # prints the folder
"""

from __future__ import annotations

import importlib
import pathlib
import sys
from types import ModuleType

# The PyPI variants, in the order tried; `nixl` is the meta package.
API_PACKAGES = ("nixl_cu12", "nixl_cu13", "nixl")


def import_api() -> ModuleType:
    """The `_api` module of the NIXL wheel installed in this Python."""
    errors = []
    for name in API_PACKAGES:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError(
        f"no NIXL Python package in {sys.executable} (pip install nixl-cu12): " + "; ".join(errors)
    )


def wheel_plugin_dir() -> pathlib.Path:
    """The folder NIXL loads plugins from when NIXL_PLUGIN_DIR is unset."""
    import_api()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n").endswith("/libnixl.so"):
                lib = pathlib.Path(fields[5].rstrip("\n"))
                return lib.parent / "plugins"
    raise RuntimeError("the NIXL bindings are loaded but no libnixl.so is mapped in this process")


if __name__ == "__main__":
    try:
        print(wheel_plugin_dir())
    except (ImportError, RuntimeError) as e:
        sys.exit(f"nixl_plugins: {e}")
