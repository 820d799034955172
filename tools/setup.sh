#!/bin/sh
# Install what fusemirror and its tests need, idempotently:
#   Debian packages: fuse3 (fusermount3), libfuse3-dev + pkg-config (to build pyfuse3), and the
#   tools the tests drive for real (mkfs.ext4, losetup, fio, ip, rsync).
#   A virtual environment with the package installed in editable mode, plus its test extras.
#   With a second argument `test`, also what only the tests drive: PostgreSQL (its server
#   binaries, for examples/postgresql.sh; no service is started by the installation).
set -eu
VENV=${1:-.venv}
WHAT=${2:-}
PKGS="fuse3 libfuse3-dev pkg-config e2fsprogs mount fio iproute2 rsync procps kmod xxhash"
[ "$WHAT" = test ] && PKGS="$PKGS postgresql"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages:$missing; run as root or: sudo apt-get install$missing" >&2
        exit 1
    fi
    echo "setup: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    # packages such as postgresql start a service from their install scripts; the tests start
    # their own servers, so nothing is started now (the usual policy-rc.d, removed afterwards)
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy
    fi
    apt-get install -y -q $missing >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q $missing >/dev/null
    } || { [ -z "$policy" ] || rm -f "$policy"; exit 1; }
    [ -z "$policy" ] || rm -f "$policy"
fi
# Debian's own python3: the daemon runs as root and as ordinary users (non-root mounts), so the
# interpreter must be world-readable (a per-user Python under /root is not).
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
BASE=$(dirname "$(readlink -f "$(command -v $PY)")")
if [ -f "$VENV/pyvenv.cfg" ] && ! grep -q "^home = $BASE\$" "$VENV/pyvenv.cfg"; then
    echo "setup: recreating $VENV on $PY"
    rm -rf "$VENV"
fi
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -U pip >/dev/null
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
# fsck(8) finds checkers by name in /sbin and on PATH: `fsck -t fusemirror DIR` works once
# fsck.fusemirror is on root's PATH. Link both commands (only where nothing else is there).
if [ "$(id -u)" = 0 ]; then
    for cmd in fusemirror fsck.fusemirror; do
        dst=/usr/local/sbin/$cmd
        if [ ! -e "$dst" ] || [ -L "$dst" ]; then
            ln -sfn "$(readlink -f "$VENV/bin/$cmd")" "$dst"
        fi
    done
fi
touch "$VENV/.fusemirror-installed"
[ "$WHAT" != test ] || touch "$VENV/.fusemirror-test-installed"
echo "setup: ready ($VENV)"
