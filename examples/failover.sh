#!/bin/bash
# Failover end to end on one machine: two "hosts" are two agent roots on loopback.
#   host A: $W/a (agent on 127.0.0.1:$PORT_A, default 7811), the master unit a/m0
#   host B: $W/b (agent on 127.0.0.1:$PORT_B, default 7812), the slave unit  b/s1
# ext4 + SQLite on a sync mirror; the master daemon is killed (SIGKILL); B is promoted and
# mounted: every committed transaction is there. A comes back, is demoted, rejoins as a slave of
# B (caught up by extents only), and the roles are switched back. Run as root.
# W, PORT_A and PORT_B may be set in the environment. Exit status 0 when every check held.
set -euo pipefail
FM=${FM:-fusemirror}
W=${W:-/tmp/fm-failover}
PORT_A=${PORT_A:-7811}
PORT_B=${PORT_B:-7812}
say() { printf '\n== %s\n' "$*"; }
until_true() {       # until_true SECONDS WHAT COMMAND...: poll a condition, fail after SECONDS
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt $end ] || { echo "failover.sh: timed out waiting for $what" >&2; exit 1; }
        sleep 0.1
    done
}
streaming() {        # streaming DIR: every slave of the mirror at DIR is connected and caught up
    $FM status --json "$1" | python3 -c '
import json, sys
imgs = [i for i in json.load(sys.stdin)["images"] if i["role"] == "slave"]
sys.exit(0 if imgs and all(i.get("mode") == "streaming" and not i.get("fracture_extents")
                          and not i.get("lag_bytes") for i in imgs) else 1)'
}
cleanup() {
    set +e
    for d in $W/fs; do mountpoint -q $d && umount $d; done
    losetup -a | grep "$W/" | cut -d: -f1 | xargs -r -n1 losetup -d
    for d in $W/mnt-a $W/mnt-b; do mountpoint -q $d && fusermount3 -u $d; done
    [ -n "${AG_A:-}" ] && kill $AG_A 2>/dev/null
    [ -n "${AG_B:-}" ] && kill $AG_B 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT
rm -rf $W && mkdir -p $W/a $W/b $W/mnt-a $W/mnt-b $W/fs
head -c 24 /dev/urandom | base64 > $W/secret
$FM serve $W/a --listen 127.0.0.1:$PORT_A --secret-file $W/secret 2>$W/agent-a.log & AG_A=$!
$FM serve $W/b --listen 127.0.0.1:$PORT_B --secret-file $W/secret 2>$W/agent-b.log & AG_B=$!
until_true 10 "agent A" grep -q "agent serving" $W/agent-a.log
until_true 10 "agent B" grep -q "agent serving" $W/agent-b.log

say "a sync mirror: master on A, slave on B"
$FM create $W/a/m0 --size 256M --name db --secret-file $W/secret
$FM add-slave $W/a/m0 127.0.0.1:$PORT_B/s1 --synchronized
$FM activate $W/a/m0
$FM mount $W/a/m0 $W/mnt-a
LOOP=$(losetup -f --show $W/mnt-a/image); mkfs.ext4 -q $LOOP; mount $LOOP $W/fs
python3 - $W/fs <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1] + "/t.db", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
for i in range(500):
    db.execute("INSERT INTO t VALUES (?)", (i,))
print("500 transactions committed")
PY

say "the master host fails: SIGKILL of its daemon"
kill -9 "$(cut -d' ' -f1 $W/a/m0/lock)"
umount $W/fs 2>/dev/null || true; losetup -d $LOOP || true; fusermount3 -uz $W/mnt-a
$FM status $W/a/m0 || true

say "failover on B: demote the lost master, promote the slave, mount it"
$FM demote $W/b/s1
$FM promote $W/b/s1
$FM mount $W/b/s1 $W/mnt-b && $FM activate $W/b/s1
LOOP=$(losetup -f --show $W/mnt-b/image); fsck.ext4 -p $LOOP || true; mount $LOOP $W/fs
python3 - $W/fs <<'PY'
import sqlite3, sys
d = sqlite3.connect(sys.argv[1] + "/t.db")
ok, rows = d.execute("PRAGMA integrity_check").fetchone()[0], d.execute("SELECT count(*) FROM t").fetchone()[0]
print("integrity:", ok, "rows:", rows)
sys.exit(0 if ok == "ok" and rows == 500 else "failover.sh: the promoted slave lost committed rows")
PY
umount $W/fs; losetup -d $LOOP

say "A comes back: demoted, it rejoins as a slave of B (extents only)"
$FM deactivate $W/a/m0
$FM demote $W/a/m0
$FM add-slave $W/b/s1 127.0.0.1:$PORT_A/m0
until_true 120 "A to catch up as a slave of B" streaming $W/b/s1; $FM status $W/b/s1

say "switch the roles back"
$FM deactivate $W/b/s1; $FM umount $W/mnt-b
$FM demote $W/b/s1
$FM promote $W/a/m0
$FM mount $W/a/m0 $W/mnt-a && $FM activate $W/a/m0
$FM add-slave $W/a/m0 127.0.0.1:$PORT_B/s1
until_true 120 "B to catch up as a slave of A" streaming $W/a/m0; $FM status $W/a/m0
$FM verify $W/a/m0
$FM umount $W/mnt-a
say "done"
