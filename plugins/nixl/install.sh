#!/usr/bin/env bash
# Puts libplugin_TCPX.so into the plugin folder of the NIXL wheel of the
# active Python, beside NIXL's own plugins (UCX, POSIX, ...), so that one
# agent can create both UCX and TCPX backends without NIXL_PLUGIN_DIR (which
# would replace that folder). The folder is asked of the installed package
# (python/nixl_plugins.py), not guessed. Idempotent; --uninstall removes it.
#
#   cargo build --release -p tcpx-nixl
#   plugins/nixl/install.sh                 # python: --python, else $VIRTUAL_ENV's, else python3
#   plugins/nixl/install.sh --uninstall
#
# Options: --python PATH (the Python whose NIXL wheel gets the plugin),
# --plugin PATH (default: target/release/libplugin_TCPX.so).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
name=libplugin_TCPX.so
plugin="${CARGO_TARGET_DIR:-$root/target}/release/$name"
python=""
uninstall=0

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --uninstall) uninstall=1 ;;
        --python) python="${2:?--python needs a path}"; shift ;;
        --plugin) plugin="${2:?--plugin needs a path}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ -z "$python" ]]; then
    if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
        python="$VIRTUAL_ENV/bin/python"
    else
        python="$(command -v python3 || true)"
    fi
fi
[[ -n "$python" && -x "$python" ]] || { echo "install.sh: no Python found (use --python)" >&2; exit 1; }

# NIXL_PLUGIN_DIR must not steer the lookup: we want the wheel's own folder.
dir="$(env -u NIXL_PLUGIN_DIR "$python" "$root/python/nixl_plugins.py")" || {
    echo "install.sh: cannot find the NIXL wheel of $python" >&2
    exit 1
}
[[ -d "$dir" ]] || { echo "install.sh: $dir (the NIXL wheel's plugin folder) does not exist" >&2; exit 1; }
dest="$dir/$name"

if [[ $uninstall == 1 ]]; then
    if [[ -e "$dest" ]]; then
        rm -f "$dest"
        echo "removed $dest"
    else
        echo "not installed in $dir"
    fi
    exit 0
fi

[[ -f "$plugin" ]] || {
    echo "install.sh: $plugin not found: build it with cargo build --release -p tcpx-nixl" >&2
    exit 1
}
if [[ -f "$dest" ]] && cmp -s "$plugin" "$dest"; then
    echo "already installed: $dest"
    exit 0
fi
# Copy, then rename: a process that has the old file mapped keeps it intact.
tmp="$dest.tmp.$$"
trap 'rm -f "$tmp"' EXIT
cp "$plugin" "$tmp"
chmod 0755 "$tmp"
mv -f "$tmp" "$dest"
echo "installed $dest"
