#!/bin/bash
# PostgreSQL on a fusemirror image, crashed under load and recovered. Run as root.
#
#   a sync mirror of a 1 GiB image with one slave on a local agent (127.0.0.1)
#   ext4 on a loop device over the image; a PostgreSQL cluster on the ext4 (initdb, as postgres)
#   pgbench: a first run that completes, then a second one during which the master daemon is
#   killed (SIGKILL) — PostgreSQL loses its disk mid-transaction
#   fsck.fusemirror copies only the logged extents to the slave; master and slave are compared
#   byte for byte; the cluster is mounted again, PostgreSQL replays its WAL, and the data is
#   checked: every transaction of the first run is there, pgbench's balance invariant holds
#   (the accounts' balances sum to the history's deltas), and amcheck finds every index sound.
#
# Needs the Debian packages postgresql-15 (or another version) and fuse3; `make test` installs
# them. Everything lives under $W (default /tmp/fm-postgresql) and is torn down on exit.
# Exit status 0 when every check held.
set -euo pipefail
FM=${FM:-fusemirror}
FSCK=${FSCK:-fsck.fusemirror}
W=${W:-/tmp/fm-postgresql}
PORT=${PORT:-7821}                 # the agent's TCP port on 127.0.0.1
PGPORT=5439                        # PostgreSQL listens on a Unix socket in $W/sock only
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PGBIN/initdb" ] || { echo "postgresql.sh: no PostgreSQL server (apt-get install postgresql-15)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "postgresql.sh: run as root (loop device, mount)" >&2; exit 2; }

say() { printf '\n== %s\n' "$*"; }
pg() { runuser -u postgres -- "$@"; }
psql_() { pg "$PGBIN/psql" -h $W/sock -p $PGPORT -d bench -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
until_true() {       # until_true SECONDS WHAT COMMAND...: poll a condition, fail after SECONDS
    local limit=$1 what=$2; shift 2
    local end=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt $end ] || { echo "postgresql.sh: timed out waiting for $what" >&2; exit 1; }
        sleep 0.1
    done
}
pg_pids() {          # the server's processes: they run with the data directory as their cwd
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink $p/cwd 2>/dev/null)" = "$W/fs/pgdata" ] && echo "${p#/proc/}"
    done
    return 0
}
kill_pg() { pg_pids | xargs -r kill -9; until_true 30 "PostgreSQL to exit" test -z "$(pg_pids)"; }
cleanup() {
    set +e
    [ -n "${BENCH:-}" ] && kill "$BENCH" 2>/dev/null
    pg_pids | xargs -r kill -9
    mountpoint -q $W/fs && { umount $W/fs 2>/dev/null || umount -l $W/fs; }
    losetup -a | grep "$W/" | cut -d: -f1 | xargs -r -n1 losetup -d
    mountpoint -q $W/mnt && { $FM umount $W/mnt 2>/dev/null || fusermount3 -uz $W/mnt; }
    [ -n "${AGENT:-}" ] && kill "$AGENT" 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT

(cleanup)
rm -rf $W && mkdir -p $W/root $W/mnt $W/fs $W/sock $W/log
chown postgres: $W/sock $W/log
head -c 24 /dev/urandom | base64 > $W/secret && chmod 600 $W/secret

say "a sync mirror: master $W/m0, slave s1 on a local agent"
$FM serve $W/root --listen 127.0.0.1:$PORT --secret-file $W/secret 2>$W/agent.log & AGENT=$!
until_true 10 "the agent" grep -q "agent serving" $W/agent.log
$FM create $W/m0 --size 1G --name pg --secret-file $W/secret --write-policy sync
$FM add-slave $W/m0 127.0.0.1:$PORT/s1 --synchronized
$FM activate $W/m0
$FM mount $W/m0 $W/mnt
LOOP=$(losetup -f --show $W/mnt/image)
mkfs.ext4 -q -E nodiscard $LOOP && mount $LOOP $W/fs && chmod 755 $W/fs

say "PostgreSQL on the mirror: initdb, start, pgbench"
mkdir $W/fs/pgdata && chown postgres: $W/fs/pgdata
pg "$PGBIN/initdb" -D $W/fs/pgdata -A trust -U postgres >$W/initdb.log
start_pg() {
    pg "$PGBIN/pg_ctl" -D $W/fs/pgdata -l $W/log/postgres.log -w -t 120 \
        -o "-p $PGPORT -k $W/sock -c listen_addresses=''" start >/dev/null
}
start_pg
pg "$PGBIN/createdb" -h $W/sock -p $PGPORT bench
pg "$PGBIN/pgbench" -h $W/sock -p $PGPORT -i -s 5 -q bench 2>&1 | tail -1
psql_ "CREATE EXTENSION amcheck"
pg "$PGBIN/pgbench" -h $W/sock -p $PGPORT -c 4 -j 2 -t 500 -n bench >$W/pgbench1.log
FIRST=$(psql_ "SELECT count(*) FROM pgbench_history")
echo "first run: $FIRST transactions committed"
[ "$FIRST" -eq 2000 ]

say "crash under load: SIGKILL of the master daemon during a second pgbench run"
pg "$PGBIN/pgbench" -h $W/sock -p $PGPORT -c 4 -j 2 -T 60 -n bench >$W/pgbench2.log 2>&1 & BENCH=$!
history_at_least() { [ "$(psql_ "SELECT count(*) FROM pgbench_history")" -ge "$1" ]; }
until_true 60 "the second run to commit 500 transactions" history_at_least $((FIRST + 500))
DAEMON=$(cut -d' ' -f1 $W/m0/lock)
SEEN=$(psql_ "SELECT count(*) FROM pgbench_history")    # committed: visible to another session
echo "\$ kill -9 $DAEMON   (with $SEEN rows in pgbench_history, the transactions committed so far)"
kill -9 "$DAEMON"
kill_pg                                   # PostgreSQL has lost its disk: gone with it
wait "$BENCH" 2>/dev/null || true; BENCH=""
umount $W/fs 2>/dev/null || umount -l $W/fs
losetup -d $LOOP 2>/dev/null || true
fusermount3 -uz $W/mnt
$FM status $W/m0 | sed -n 1,12p || true

say "recovery: fsck.fusemirror copies the logged extents to the slave"
rc=0; $FSCK $W/m0 || rc=$?
[ $rc -le 1 ] || { echo "fsck.fusemirror exit $rc" >&2; exit 1; }   # fsck(8): 1 = corrected
cmp $W/m0/image $W/root/s1/image && echo "master and slave images: IDENTICAL"

say "mount again: PostgreSQL replays its WAL"
$FM mount $W/m0 $W/mnt
LOOP=$(losetup -f --show $W/mnt/image)
fsck.ext4 -p $LOOP >/dev/null || [ $? -le 1 ]
mount $LOOP $W/fs
start_pg
ROWS=$(psql_ "SELECT count(*) FROM pgbench_history")
echo "pgbench_history: $ROWS rows ($SEEN were committed when the daemon was killed)"
[ "$ROWS" -ge "$SEEN" ]
INV=$(psql_ "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
             AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
             AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")
echo "balances equal the sum of the history's deltas: $INV"
[ "$INV" = t ]
# bt_index_check raises an error on the first inconsistency (and the script stops there)
N=$(psql_ "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence = 'p'")
echo "amcheck: $N B-tree indexes checked, heap and index consistent"
pg "$PGBIN/pg_ctl" -D $W/fs/pgdata -m fast -w stop >/dev/null
umount $W/fs; losetup -d $LOOP
$FM umount $W/mnt
$FM verify $W/m0
say "done: PostgreSQL survived the crash, and the slave holds the same bytes"
