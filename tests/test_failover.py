"""Failover end to end, and split brain.

Failover: ext4 with files and a SQLite database on a `sync` mirror; the master daemon killed
with SIGKILL; the slave promoted on its agent's host; every fsync'ed write there. The old master
comes back, is demoted, rejoins as a slave of the new master caught up by extents only; then
the roles are switched back.

Split brain: the old master keeps accepting writes while partitioned (netns) and the slave is
promoted with --force: on reconnect the master detects the divergence from the generations and
refuses to replicate; nothing is merged; `demote --discard` discards one side, which rejoins
with a full sync.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (FM, Mounted, is_mounted, kill9, run_fm, status, teardown_mount,
                      wait_for)
from test_partition import in_ns, sh, slave_host  # noqa: F401 - fixture
from test_replication import images_equal

MiB = 1 << 20


def slave_of(m: Mounted, addr: str) -> dict:
    return next(i for i in m.status()["images"] if i.get("address") == addr)


def streaming_to(m: Mounted, addr: str) -> bool:
    s = slave_of(m, addr)
    return s.get("mode") == "streaming" and s["fracture_extents"] == 0 and s["reachable"]


class Ext4:
    def __init__(self, image: Path, where: Path) -> None:
        self.where = where
        where.mkdir(exist_ok=True)
        self.loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                                   capture_output=True, text=True).stdout.strip()

    def mkfs(self) -> None:
        subprocess.run(["mkfs.ext4", "-q", "-F", self.loop], check=True)

    def mount(self) -> None:
        subprocess.run(["fsck.ext4", "-p", self.loop], capture_output=True)
        subprocess.run(["mount", self.loop, str(self.where)], check=True)

    def close(self) -> None:
        if is_mounted(self.where):
            subprocess.run(["umount", str(self.where)], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def write_workload(fs: Path, n: int, start: int = 0) -> dict:
    """Committed SQLite transactions and fsync'ed files; returns what must survive."""
    db = sqlite3.connect(fs / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v TEXT)")
    for i in range(start, start + n):
        db.execute("INSERT INTO t VALUES (?, ?)", (i, f"row {i}"))
    db.close()
    files = {}
    for i in range(3):
        data = os.urandom(200_000)
        p = fs / f"f{start}-{i}.bin"
        with open(p, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[p.name] = data
    dfd = os.open(fs, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    return {"rows": start + n, "files": files}


def check_workload(fs: Path, want: dict) -> None:
    db = sqlite3.connect(fs / "t.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == want["rows"]
    db.close()
    for name, data in want["files"].items():
        assert (fs / name).read_bytes() == data, name


def test_failover_and_back(tmp_path, agent_factory, secret_file, mounter) -> None:
    host_a = agent_factory("host-a")
    host_b = agent_factory("host-b")
    for a in (host_a, host_b):
        a.expected_errors.append("refused to a master")
    unit_a = host_a.root / "m0"
    unit_b = host_b.root / "s1"
    run_fm("create", str(unit_a), "--size", "128M", "--name", "db", "--secret-file",
           str(secret_file))
    run_fm("add-slave", str(unit_a), host_b.address("s1"), "--synchronized")
    run_fm("activate", str(unit_a))
    ma: Mounted = mounter(unit_a)
    ma.expect_errors()
    wait_for(lambda: streaming_to(ma, host_b.address("s1")), what="slave streaming")
    fs = Ext4(ma.image, tmp_path / "fs-a")
    try:
        fs.mkfs()
        fs.mount()
        want = write_workload(fs.where, 300)
        # the crash: SIGKILL of the master daemon under the mounted ext4
        kill9(unit_a)
    finally:
        fs.close()
    subprocess.run(["fusermount3", "-uz", str(ma.mnt)], capture_output=True)
    assert status(unit_a)["needs_recovery"] is True

    # failover: on the slave's host, demote the lost master, promote the slave
    r = run_fm("promote", str(unit_b), check=False)
    assert r.returncode == 3 and "still has a master" in r.stderr
    run_fm("demote", str(unit_b))
    run_fm("promote", str(unit_b))
    sb = status(unit_b)
    assert sb["role"] == "master" and sb["state"] == "INACTIVE"
    mb: Mounted = mounter(unit_b)
    mb.expect_errors()
    run_fm("activate", str(unit_b))
    fs = Ext4(mb.image, tmp_path / "fs-b")
    try:
        fs.mount()
        check_workload(fs.where, want)          # every fsync'ed write is on the new master
        want = write_workload(fs.where, 100, start=300)
    finally:
        fs.close()

    # the old master comes back: as a master it is refused (stale), by mount and by fsck
    r = run_fm("mount", str(unit_a), str(ma.mnt), check=False)
    assert r.returncode == 3 and "stale master" in r.stderr and "demote" in r.stderr
    from conftest import run_fsck

    r = run_fsck("-y", str(unit_a))
    assert r.returncode == 8 and "stale master" in r.stderr
    # demoted, it rejoins as a slave, caught up by extents
    logged_a = len(status(unit_a)["journal"]["extents"])
    assert logged_a > 0
    run_fm("deactivate", str(unit_a))
    run_fm("demote", str(unit_a))
    addr_a = host_a.address("m0")
    res = json.loads(run_fm("add-slave", str(unit_b), addr_a, "--json").stdout)
    assert res["state"] == "rejoined: extents"
    owed = res["owed_extents"]
    assert owed >= logged_a, "its journal's extents and those written since the promotion"
    wait_for(lambda: streaming_to(mb, addr_a), what="the old master caught up", timeout=60)
    copied = slave_of(mb, addr_a)["catchup_bytes"]
    assert copied == owed * MiB, f"{copied} bytes for {owed} extents"
    assert copied < 128 * MiB / 2, "extents only, not a full copy"
    run_fm("deactivate", str(unit_b))
    run_fm("umount", str(mb.mnt))
    assert images_equal(unit_b / "image", unit_a / "image")

    # switch the roles back
    run_fm("demote", str(unit_b))
    run_fm("promote", str(unit_a))
    ma2 = mounter(unit_a, mnt=ma.mnt)
    ma2.expect_errors()
    run_fm("activate", str(unit_a))
    r = run_fm("add-slave", str(unit_a), host_b.address("s1"))
    assert "rejoined" in r.stdout
    wait_for(lambda: streaming_to(ma2, host_b.address("s1")), what="switch back", timeout=60)
    assert slave_of(ma2, host_b.address("s1"))["catchup_bytes"] == 0
    fs = Ext4(ma2.image, tmp_path / "fs-a2")
    try:
        fs.mount()
        check_workload(fs.where, want)
    finally:
        fs.close()
    run_fm("umount", str(ma2.mnt))
    assert images_equal(unit_a / "image", unit_b / "image")
    # any member answers for the whole mirror
    st = json.loads(run_fm("status", host_b.address("s1"), "--secret-file", str(secret_file),
                           "--json").stdout)
    roles = sorted((i["role"], i["state"]) for i in st["images"])
    assert st["name"] == "db" and [r[0] for r in roles] == ["master", "slave"]
    # a slave unit has nothing to recover itself; the text says who answered, no "None"
    assert st["needs_recovery"] is False and st["journal"]["active_extents"] == 0
    text = run_fm("status", host_b.address("s1"), "--secret-file", str(secret_file)).stdout
    assert "answered-by:" in text and "None" not in text, text


def test_split_brain_is_detected_every_time(tmp_path, agent_factory, secret_file, mounter,
                                            slave_host) -> None:
    agent = agent_factory("remote", host=slave_host["addr"], prefix=in_ns(slave_host["ns"]))
    agent.expected_errors.append("refused to a master")
    for rep in range(10):
        unit = tmp_path / f"m{rep}"
        name = f"s{rep}"
        run_fm("create", str(unit), "--size", "16M", "--secret-file", str(secret_file))
        run_fm("add-slave", str(unit), agent.address(name), "--synchronized")
        run_fm("set", str(unit), "heartbeat=0.2")
        run_fm("set", str(unit), "--image", name, "timeout=1")
        run_fm("activate", str(unit))
        m: Mounted = mounter(unit)
        m.expect_errors("split brain", "is now ATTENTION", "UNREACHABLE")
        wait_for(lambda: streaming_to(m, agent.address(name)), what="streaming")
        sh("ip", "link", "set", slave_host["link"], "down")            # partition
        wait_for(lambda: not slave_of(m, agent.address(name))["reachable"],
                 what="UNREACHABLE")
        with open(m.image, "r+b") as f:                                  # the master goes on
            f.seek(3 * MiB)
            f.write(os.urandom(MiB))
            os.fsync(f.fileno())
        assert m.status()["state"] == "ACTIVE"
        # the slave's side promotes itself (its master looks lost)
        sh(*in_ns(slave_host["ns"]), FM, "promote", "--force", str(agent.root / name))
        sh("ip", "link", "set", slave_host["link"], "up")              # heal
        wait_for(lambda: m.status()["state"] == "ATTENTION", what="detection", timeout=30)
        st = m.status()
        assert "split brain" in st["attention_reason"]
        assert "split brain" in slave_of(m, agent.address(name))["conflict"]
        assert "split brain" in (unit / "daemon.log").read_text()
        assert "refused to a master" in agent.log_text()
        # nothing merged: the promoted side kept its own data
        slave_img = (agent.root / name / "image").read_bytes()
        master_img = (unit / "image").read_bytes()
        assert slave_img[3 * MiB:4 * MiB] != master_img[3 * MiB:4 * MiB]
        with pytest.raises(OSError):
            with open(m.image, "r+b") as f:
                f.write(b"no")
                f.flush()
        if rep < 9:
            teardown_mount(unit, m.mnt)
            continue
        # the documented way out: discard one side (here the old master's) and resync it
        run_fm("umount", str(m.mnt))
        run_fm("demote", str(unit), "--discard", "--force")
        new_master = agent.root / name
        # move the promoted unit to the host side so it can be mounted here
        mb = mounter(new_master)
        mb.expect_errors("split brain", "UNREACHABLE")
        run_fm("activate", str(new_master))
        side = agent_factory("old-master-host")
        shutil_move(unit, side.root / "old")
        r = run_fm("add-slave", str(new_master), side.address("old"))
        assert "full sync" in r.stdout
        wait_for(lambda: streaming_to(mb, side.address("old")), what="full sync", timeout=60)
        run_fm("umount", str(mb.mnt))
        assert images_equal(new_master / "image", side.root / "old" / "image")


def shutil_move(src: Path, dst: Path) -> None:
    import shutil

    shutil.move(str(src), str(dst))
