"""Replication to slave agents on loopback: sync and async policies, fracture logs and catch-up,
full sync (resumable), verify, and the status a user sees."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import (Agent, Mounted, kill9, lock_pid, pid_alive, run_fm, run_fsck, status,
                      wait_for)

MiB = 1 << 20


def slave_status(m: Mounted, name: str = "s1") -> dict:
    st = m.status()
    return next(i for i in st["images"] if i["role"] == "slave" and i["name"].endswith("/" + name))


def make_mirror(tmp_path: Path, agent: Agent, secret_file: Path, *, size: str = "32M",
                policy: str = "sync", name: str = "s1", extra: tuple[str, ...] = (),
                quick_timeout: bool = False) -> Path:
    """An ACTIVE mirror with one slave; ``quick_timeout``: found UNREACHABLE within 1 s."""
    unit = tmp_path / f"m-{name}"
    run_fm("create", str(unit), "--size", size, "--write-policy", policy, "--secret-file",
           str(secret_file), *extra)
    run_fm("add-slave", str(unit), agent.address(name))
    if quick_timeout:
        run_fm("set", str(unit), "heartbeat=0.2")
        run_fm("set", str(unit), "--image", name, "timeout=1")
    run_fm("activate", str(unit))
    return unit


def lose_agent(m: Mounted, agent: Agent) -> None:
    """Kill the slave's agent and wait until the master calls the slave UNREACHABLE."""
    agent.kill()
    wait_for(lambda: not slave_status(m)["reachable"], what="UNREACHABLE")


def streaming(m: Mounted, name: str = "s1") -> bool:
    s = slave_status(m, name)
    return s["reachable"] and s.get("mode") == "streaming" and s["fracture_extents"] == 0


def images_equal(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def test_sync_policy_fsync_reaches_the_slave_before_returning(tmp_path, agent_factory,
                                                              secret_file, mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file)
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync")
    rng = random.Random(1)
    fsynced: dict[int, bytes] = {}
    fd = os.open(m.image, os.O_RDWR)
    try:
        for i in range(40):
            off = rng.randrange(0, 32 * MiB - 65536)
            data = rng.randbytes(rng.randrange(1, 65536))
            os.pwrite(fd, data, off)
            if i % 4 == 3:
                os.fsync(fd)
                fsynced[off] = data
    finally:
        os.close(fd)
    pid = lock_pid(unit)
    os.kill(pid, signal.SIGKILL)
    agent.kill()
    wait_for(lambda: not pid_alive(pid), what="daemon death")
    subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    slave = agent.root / "s1" / "image"
    # check in write order: a later write may overlap an earlier one
    with open(slave, "rb") as f:
        shadow = bytearray(f.read())
    with open(unit / "image", "rb") as f:
        master = f.read()
    # every fsync'ed write is on the slave unless a later write (also on both) replaced it
    for off, data in fsynced.items():
        assert shadow[off:off + len(data)] == master[off:off + len(data)]
    assert status(unit)["needs_recovery"] is True


def test_async_slave_is_always_a_past_master_state(tmp_path, agent_factory, secret_file,
                                                   mounter) -> None:
    """Sample the slave while the agent is stopped: it equals the master after some prefix of
    the write sequence (replayed here), never a mix."""
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="4M", policy="async")
    run_fm("set", str(unit), "write_backlog_size=100000")
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync")
    nblocks = (4 * MiB) // 4096
    rng = random.Random(7)
    seq = [(rng.randrange(nblocks), i.to_bytes(4, "big") * 1024) for i in range(1, 3001)]
    slave = agent.root / "s1" / "image"
    samples: list[bytes] = []
    fd = os.open(m.image, os.O_RDWR | os.O_DIRECT)
    import mmap

    buf = mmap.mmap(-1, 4096)
    try:
        for i, (blk, data) in enumerate(seq):
            buf[:] = data
            os.pwrite(fd, buf, blk * 4096)
            if i % 600 == 300:
                agent.proc.send_signal(signal.SIGSTOP)
                try:
                    samples.append(slave.read_bytes())
                finally:
                    agent.proc.send_signal(signal.SIGCONT)
    finally:
        os.close(fd)
    wait_for(lambda: slave_status(m)["lag_bytes"] == 0, what="backlog drained")
    samples.append(slave.read_bytes())
    for sample in samples:
        blocks = [sample[i * 4096:(i + 1) * 4096] for i in range(nblocks)]
        replay = [bytes(4096)] * nblocks
        mismatched = sum(1 for i in range(nblocks) if blocks[i] != replay[i])
        found = mismatched == 0
        for blk, data in seq:
            if found:
                break
            before = replay[blk] != blocks[blk]
            replay[blk] = data
            after = replay[blk] != blocks[blk]
            mismatched += int(after) - int(before)
            found = mismatched == 0
        assert found, "a slave sample is not any past state of the master"
    wait_for(lambda: streaming(m), what="streaming")
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", slave)


def test_async_backlog_overflow_uses_the_fracture_log(tmp_path, agent_factory, secret_file,
                                                      mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="32M", policy="async")
    run_fm("set", str(unit), "write_backlog_size=64")
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: streaming(m), what="initial sync")
    agent.proc.send_signal(signal.SIGSTOP)
    try:
        with open(m.image, "r+b") as f:
            for i in range(8):
                f.seek(i * 3 * MiB)
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())   # async: answered after the master alone
        s = slave_status(m)
        assert s["fracture_extents"] > 0, s
        assert s["state"] == "SYNCHRONIZING"
    finally:
        agent.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: streaming(m), what="catch-up", timeout=60)
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")


def test_verify_finds_exactly_the_flipped_blocks(tmp_path, agent_factory, secret_file,
                                                 mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="16M")
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync")
    with open(m.image, "r+b") as f:
        f.write(os.urandom(16 * MiB))
        os.fsync(f.fileno())
    r = run_fm("verify", str(unit), "--json")
    assert json.loads(r.stdout)["slaves"][0]["equal"] is True
    slave = agent.root / "s1" / "image"
    flips = [3, 4, 1000, 4095]
    with open(slave, "r+b") as f:
        for b in flips:
            f.seek(b * 4096 + 17)
            old = f.read(1)
            f.seek(b * 4096 + 17)
            f.write(bytes([old[0] ^ 0xFF]))
    r = run_fm("verify", str(unit), "--json", check=False)
    assert r.returncode == 1
    res = json.loads(r.stdout)["slaves"][0]
    assert res["differing_blocks"] == 4
    assert res["ranges"] == [[3, 5], [1000, 1001], [4095, 4096]]
    # unmounted, verify works too (a headless engine)
    run_fm("umount", str(m.mnt))
    r = run_fm("verify", str(unit), "s1", check=False)
    assert r.returncode == 1 and "4 differing blocks" in r.stdout


def test_fracture_and_restore_copy_only_the_missed_extents(tmp_path, agent_factory,
                                                           secret_file, mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="64M")
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync")
    run_fm("fracture", str(unit), "s1")
    assert slave_status(m)["mode"] == "fractured"
    line = next(x for x in run_fm("status", str(unit)).stdout.splitlines() if "/s1 " in x)
    assert " fractured " in line and "UNREACHABLE" not in line, line
    with open(m.image, "r+b") as f:
        for e in (1, 5, 9, 60):
            f.seek(e * MiB + 100)
            f.write(os.urandom(5000))
        os.fsync(f.fileno())
    m.control("cleanup", idle=0)          # retire: the missed extents go to the fracture log
    s = slave_status(m)
    assert s["fracture_extents"] == 4
    before = s["catchup_bytes"]
    run_fm("restore", str(unit), "s1")
    wait_for(lambda: streaming(m), what="catch-up")
    copied = slave_status(m)["catchup_bytes"] - before
    assert copied == 4 * MiB, "catch-up copies the fracture-logged extents, not the image"
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")


def test_unreachable_agent_then_automatic_catch_up(tmp_path, agent_factory, secret_file,
                                                   mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="32M", quick_timeout=True)
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: streaming(m), what="initial sync")
    lose_agent(m, agent)
    assert m.status()["state"] == "ACTIVE", "max_missing_images=-1: the master keeps serving"
    with open(m.image, "r+b") as f:
        for e in (2, 3, 20):
            f.seek(e * MiB)
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    m.control("cleanup", idle=0)
    assert slave_status(m)["fracture_extents"] == 3
    before = slave_status(m)["catchup_bytes"]
    agent.start()
    wait_for(lambda: streaming(m), what="automatic catch-up")
    assert slave_status(m)["catchup_bytes"] - before == 3 * MiB, \
        "the catch-up copies the 3 fracture-logged extents, not the image"
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")


def test_max_missing_images_sends_the_mirror_to_attention(tmp_path, agent_factory, secret_file,
                                                          mounter) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="8M")
    run_fm("set", str(unit), "heartbeat=0.2", "max_missing_images=0")
    run_fm("set", str(unit), "--image", "s1", "timeout=1")
    m: Mounted = mounter(unit)
    m.expect_errors("is now ATTENTION")
    wait_for(lambda: streaming(m), what="initial sync")
    agent.kill()
    wait_for(lambda: m.status()["state"] == "ATTENTION", what="ATTENTION")
    with pytest.raises(OSError) as e:
        with open(m.image, "r+b") as f:
            f.write(b"x" * 4096)
            f.flush()
    assert e.value.errno == errno.EIO
    agent.start()
    wait_for(lambda: m.status()["state"] == "INACTIVE", what="back to INACTIVE by itself")
    run_fm("activate", str(unit))
    with open(m.image, "r+b") as f:
        f.write(b"y" * 4096)


def test_full_sync_resumes_after_a_kill(tmp_path, agent_factory, secret_file, mounter) -> None:
    agent = agent_factory()
    unit = tmp_path / "big"
    run_fm("create", str(unit), "--size", "96M", "--secret-file", str(secret_file))
    with open(unit / "image", "r+b") as f:
        f.write(os.urandom(96 * MiB))
    run_fm("add-slave", str(unit), agent.address("s1"))
    run_fm("set", str(unit), "--image", "s1", "sync_rate=24M")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: (slave_status(m).get("sync_progress") or 0) >= 30 * MiB,
             what="sync progress", timeout=60)
    s = slave_status(m)
    assert s["state"] == "SYNCHRONIZING" and s["sync"]["eta_seconds"] is not None
    # host writes during the sync land behind and ahead of the cursor
    with open(m.image, "r+b") as f:
        f.seek(1 * MiB)
        f.write(os.urandom(4096))
        f.seek(90 * MiB)
        f.write(os.urandom(4096))
        os.fsync(f.fileno())
    kill9(unit, m.mnt)
    done = json.loads((unit / "mirror.json").read_text())
    progress = next(i for i in done["images"] if i["role"] == "slave")["sync_progress"]
    assert progress and progress >= 30 * MiB
    assert run_fsck(str(unit)).returncode in (0, 1)
    run_fm("set", str(unit), "--image", "s1", "sync_rate=0")
    m2 = mounter(unit, mnt=m.mnt)
    wait_for(lambda: streaming(m2), what="sync completion", timeout=120)
    log = (unit / "daemon.log").read_text()
    assert f"full sync from {progress}" in log or "full sync from" in log.split("connected")[-1]
    resumed = [int(x.split()[0]) for x in log.split("full sync from ")[1:]]
    assert resumed[-1] >= 30 * MiB, "the second sync resumed, not restarted"
    run_fm("umount", str(m2.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")


def test_add_slave_refusals_and_status_fields(tmp_path, agent_factory, secret_file,
                                              mounter) -> None:
    agent = agent_factory()
    agent.expected_errors.append("refused")
    unit = make_mirror(tmp_path, agent, secret_file, size="8M")
    other = tmp_path / "other"
    run_fm("create", str(other), "--size", "16M", "--secret-file", str(secret_file))
    r = run_fm("add-slave", str(other), agent.address("s1"), check=False)
    assert r.returncode != 0 and "another mirror" in r.stderr
    r = run_fm("add-slave", str(unit), agent.address("s1"), check=False)
    assert r.returncode == 2 and "already a slave" in r.stderr
    r = run_fm("add-slave", str(unit), "127.0.0.1:1/../x", check=False)
    assert r.returncode == 2
    bad = tmp_path / "bad-secret"
    bad.write_text("not the right secret at all\n")
    r = run_fm("add-slave", str(unit), agent.address("s9"), "--secret-file", str(bad),
               check=False)
    assert r.returncode != 0
    run_fm("add-slave", str(unit), agent.address("s9"), "--secret-file", str(secret_file),
           check=False)
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync")
    s = slave_status(m)
    for key in ("name", "role", "state", "reachable", "fracture_extents", "lag_bytes",
                "last_heartbeat_age", "sync_progress"):
        assert key in s
    assert s["role"] == "slave" and s["reachable"] is True and s["lag_bytes"] == 0
    text = (m.mnt / "status").read_text()
    assert "role:slave" in text and "reachable" in text
    # remove-slave needs an INACTIVE mirror
    r = run_fm("remove-slave", str(unit), "s9", check=False)
    assert r.returncode == 3 and "deactivate" in r.stderr
    run_fm("deactivate", str(unit))
    run_fm("remove-slave", str(unit), "s9")
    assert all(not i["name"].endswith("/s9") for i in m.status()["images"])
    assert (agent.root / "s9" / "image").exists(), "the slave's data stays"


def test_offline_sync_is_killed_and_resumes(tmp_path, agent_factory, secret_file) -> None:
    """`fusemirror sync` on an unmounted unit: killed half-way, run again, it resumes."""
    agent = agent_factory()
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "64M", "--secret-file", str(secret_file))
    with open(unit / "image", "r+b") as f:
        f.write(os.urandom(64 * MiB))
    run_fm("add-slave", str(unit), agent.address("s1"))
    run_fm("set", str(unit), "--image", "s1", "sync_rate=16M")
    from conftest import FM

    p = subprocess.Popen([FM, "sync", str(unit), "s1"], stderr=subprocess.PIPE, text=True)

    def progress() -> int:
        db = json.loads((unit / "mirror.json").read_text())
        return next(i for i in db["images"] if i["role"] == "slave")["sync_progress"] or 0

    wait_for(lambda: progress() >= 16 * MiB, what="persisted progress", timeout=60)
    p.kill()
    p.wait()
    saved = progress()
    assert 16 * MiB <= saved < 64 * MiB
    run_fm("set", str(unit), "--image", "s1", "sync_rate=0")
    r = run_fm("sync", str(unit), "s1")
    assert "synchronized" in r.stdout
    resumed = [ln for ln in r.stderr.splitlines() if "resuming at" in ln]
    assert resumed, f"did not resume: {r.stderr}"
    pct = float(resumed[0].rsplit("(", 1)[1].split("%")[0])
    assert pct >= 100.0 * saved / (64 * MiB) - 0.1, f"did not resume where it stopped: {resumed}"
    db = json.loads((unit / "mirror.json").read_text())
    s1 = next(i for i in db["images"] if i["role"] == "slave")
    assert s1["state"] in ("CONSISTENT", "SYNCHRONIZED") and s1["sync_progress"] is None
    assert images_equal(unit / "image", agent.root / "s1" / "image")


def test_slave_added_to_an_active_mirror_is_synchronized(tmp_path, agent_factory, secret_file,
                                                         mounter) -> None:
    agent = agent_factory()
    m: Mounted = mounter(size="32M", create_args=("--secret-file", str(secret_file)))
    with open(m.image, "r+b") as f:
        f.write(os.urandom(8 * MiB))
        os.fsync(f.fileno())
    run_fm("add-slave", str(m.unit), agent.address("late"))
    wait_for(lambda: streaming(m, "late"), what="automatic full sync", timeout=60)
    assert slave_status(m, "late")["state"] == "CONSISTENT"
    run_fm("umount", str(m.mnt))
    assert images_equal(m.unit / "image", agent.root / "late" / "image")
