"""Crash recovery (patent FIG. 8-10, claims 1 and 11): the daemon dies at named points, by
random SIGKILLs, with simulated power loss; fsck.fusemirror copies the logged extents; then the
master equals every slave and no fsync'ed write is lost."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (Agent, Mounted, is_mounted, kill9, lock_pid, pid_alive, run_fm, run_fsck,
                      status, teardown_mount, wait_for)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from crashkit import Ledger, Writer, images_equal  # noqa: E402

MiB = 1 << 20
SLOTS = 2048          # 8 MiB of 4 KiB blocks: 8 extents of 1 MiB


def setup_mirror(tmp_path: Path, agent: Agent, secret_file: Path, policy: str = "sync") -> Path:
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "16M", "--write-policy", policy, "--secret-file",
           str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"), "--synchronized")
    run_fm("activate", str(unit))
    return unit


def recover_and_check(unit: Path, agent: Agent, ledger: Ledger) -> None:
    r = run_fsck("-y", str(unit))
    assert r.returncode in (0, 1), r.stdout + r.stderr
    assert status(unit)["needs_recovery"] is False
    master, slave = str(unit / "image"), str(agent.root / "s1" / "image")
    assert ledger.check(master) == []
    assert images_equal(master, slave), "master and slave differ after fsck"


def crash_daemon_while_writing(m: Mounted, ledger: Ledger, seed: int,
                               action=None) -> None:
    pid = lock_pid(m.unit)
    w = Writer(str(m.image), ledger, seed)
    w.start()
    w.started_writing.wait(10)
    if action is not None:
        action()
    wait_for(lambda: not pid_alive(pid), what="the daemon's crash", timeout=60)
    w.stop.set()
    w.join(30)
    subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)


@pytest.mark.parametrize("point,order", [
    ("after-journal", "concurrent"),      # intent durable, no image written
    ("after-master", "master-first"),     # master written, slave not
    ("after-slave", "slave-first"),       # slave acknowledged, master not
    ("after-slave", "concurrent"),        # both written
])
def test_named_crash_point(tmp_path, agent_factory, secret_file, mounter, point, order) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    ledger = Ledger(SLOTS)
    m: Mounted = mounter(unit, env={"FUSEMIRROR_CRASH_AT": f"{point}@150",
                                    "FUSEMIRROR_WRITE_ORDER": order})
    m.expect_errors()
    crash_daemon_while_writing(m, ledger, seed=hash(point + order) & 0xFFFF)
    assert f"killing myself at {point}" in (unit / "daemon.log").read_text()
    s = status(unit)
    assert s["needs_recovery"] and s["journal"]["active_extents"] > 0
    recover_and_check(unit, agent, ledger)
    assert ledger.acked_fsyncs > 0


def test_crash_in_the_middle_of_a_clean_up(tmp_path, agent_factory, secret_file,
                                           mounter) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    ledger = Ledger(SLOTS)
    m: Mounted = mounter(unit, env={"FUSEMIRROR_CRASH_AT": "cleanup-before-retire"})
    w = Writer(str(m.image), ledger, seed=5)
    w.start()
    wait_for(lambda: ledger.acked_fsyncs > 20, what="some fsyncs")
    w.stop.set()
    w.join(30)
    pid = lock_pid(unit)
    try:
        m.control("cleanup", idle=0)
    except Exception:
        pass  # the daemon died answering
    wait_for(lambda: not pid_alive(pid), what="crash in clean-up")
    subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    assert "killing myself at cleanup-before-retire" in (unit / "daemon.log").read_text()
    recover_and_check(unit, agent, ledger)


def test_crash_in_the_middle_of_fsck_then_fsck_again(tmp_path, agent_factory, secret_file,
                                                     mounter) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    ledger = Ledger(SLOTS)
    m: Mounted = mounter(unit)
    w = Writer(str(m.image), ledger, seed=11)
    w.start()
    wait_for(lambda: ledger.acked_fsyncs > 20, what="some fsyncs")
    kill9(unit, m.mnt)
    w.stop.set()
    w.join(30)
    # make the slave differ in every logged extent, so a half-done fsck leaves work behind
    logged = status(unit)["journal"]["extents"]
    with open(agent.root / "s1" / "image", "r+b") as f:
        for e in logged:
            f.seek(e * MiB)
            f.write(os.urandom(MiB))
    r = run_fsck("-y", str(unit), env={"FUSEMIRROR_CRASH_AT": "fsck-mid"})
    assert r.returncode == -signal.SIGKILL
    assert status(unit)["needs_recovery"], "intents are retired only after every copy"
    recover_and_check(unit, agent, ledger)


def test_checksum_skips_equal_extents(tmp_path, agent_factory, secret_file, mounter) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    m: Mounted = mounter(unit)
    with open(m.image, "r+b") as f:
        for e in range(8):
            f.seek(e * MiB)
            f.write(os.urandom(4096))
        os.fsync(f.fileno())
    kill9(unit, m.mnt)
    with open(agent.root / "s1" / "image", "r+b") as f:   # two extents differ on the slave
        for e in (2, 5):
            f.seek(e * MiB + 8192)
            f.write(b"\xff" * 10)
    r = run_fsck("--checksum", "--json", str(unit))
    assert r.returncode == 1, r.stderr
    res = json.loads(r.stdout)["slaves"][0]
    assert res["extents"] == 2 and res["skipped"] == 6
    assert images_equal(str(unit / "image"), str(agent.root / "s1" / "image"))


def test_unreachable_slave_keeps_the_extents_in_its_fracture_log(tmp_path, agent_factory,
                                                                 secret_file, mounter) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    m: Mounted = mounter(unit)
    m.expect_errors()
    ledger = Ledger(SLOTS)
    w = Writer(str(m.image), ledger, seed=3)
    w.start()
    wait_for(lambda: ledger.acked_fsyncs > 10, what="some fsyncs")
    kill9(unit, m.mnt)
    w.stop.set()
    w.join(30)
    logged = status(unit)["journal"]["extents"]
    agent.kill()
    r = run_fsck("-y", "--json", str(unit))
    assert r.returncode == 1
    res = json.loads(r.stdout)["slaves"][0]
    assert res["kept_in_fracture_log"] == len(logged)
    assert status(unit)["images"][1]["fracture_extents"] == len(logged)
    agent.start()
    m2 = mounter(unit, mnt=m.mnt)
    wait_for(lambda: any(i.get("mode") == "streaming" and i["fracture_extents"] == 0
                         for i in m2.status()["images"] if i["role"] == "slave"),
             what="catch-up from the fracture log")
    run_fm("umount", str(m2.mnt))
    assert ledger.check(str(unit / "image")) == []
    assert images_equal(str(unit / "image"), str(agent.root / "s1" / "image"))


def test_recovery_on_mount_with_auto_policy(tmp_path, agent_factory, secret_file,
                                            mounter) -> None:
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    run_fm("set", str(unit), "--image", json.loads(
        (unit / "mirror.json").read_text())["images"][0]["name"], "recovery_policy=auto")
    m: Mounted = mounter(unit)
    ledger = Ledger(SLOTS)
    w = Writer(str(m.image), ledger, seed=9)
    w.start()
    wait_for(lambda: ledger.acked_fsyncs > 10, what="some fsyncs")
    kill9(unit, m.mnt)
    w.stop.set()
    w.join(30)
    r = run_fm("mount", str(unit), str(m.mnt))
    assert "recovering first" in r.stderr and "retired" in r.stderr
    run_fm("umount", str(m.mnt))
    assert ledger.check(str(unit / "image")) == []
    assert images_equal(str(unit / "image"), str(agent.root / "s1" / "image"))


def test_slave_crash_while_applying_writes(tmp_path, agent_factory, secret_file,
                                           mounter) -> None:
    """kill -9 of the agent mid-stream (and its unflushed writes lost, as in a power cut):
    the slave is caught up from the master and equals it."""
    agent = agent_factory()
    unit = setup_mirror(tmp_path, agent, secret_file)
    run_fm("set", str(unit), "heartbeat=0.2")
    run_fm("set", str(unit), "--image", "s1", "timeout=1")
    plog = tmp_path / "powerloss"
    plog.mkdir()
    agent.kill()
    agent.env = {"FUSEMIRROR_POWERLOSS_DIR": str(plog)}
    agent.start()
    m: Mounted = mounter(unit)
    m.expect_errors()
    ledger = Ledger(SLOTS)
    w = Writer(str(m.image), ledger, seed=21)
    w.start()
    wait_for(lambda: ledger.writes > 300, what="writes")
    agent.kill()
    from fusemirror.faults import simulate_power_loss

    simulate_power_loss(str(plog), seed=1, under=str(agent.root))
    wait_for(lambda: any(i.get("mode") == "down" for i in m.status()["images"]
                         if i["role"] == "slave"), what="the master to see the agent gone")
    agent.env = {}
    agent.start()
    wait_for(lambda: ledger.writes > 900, what="more writes")
    w.stop.set()
    w.join(30)
    assert w.error is None
    wait_for(lambda: any(i.get("mode") == "streaming" and i["fracture_extents"] == 0
                         for i in m.status()["images"] if i["role"] == "slave"),
             what="catch-up after the slave crash", timeout=60)
    run_fm("umount", str(m.mnt))
    assert ledger.check(str(unit / "image")) == []
    assert images_equal(str(unit / "image"), str(agent.root / "s1" / "image"))


def _kill_loop(tmp_path, agent, secret_file, kills: int, seed: int) -> dict:
    unit = setup_mirror(tmp_path, agent, secret_file)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    plog = tmp_path / "powerloss"
    plog.mkdir()
    rng = random.Random(seed)
    ledger = Ledger(SLOTS)
    env = {"FUSEMIRROR_POWERLOSS_DIR": str(plog)}
    stats = {"kills": 0, "acknowledged": 0, "lost": 0, "power_losses": 0}
    try:
        for i in range(kills):
            run_fm("mount", str(unit), str(mnt), env=env)
            pid = lock_pid(unit)
            w = Writer(str(mnt / "image"), ledger, seed=rng.randrange(1 << 30),
                       direct=rng.random() < 0.3)
            w.start()
            w.started_writing.wait(10)
            time.sleep(rng.uniform(0.02, 0.3))
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), what="daemon death")
            w.stop.set()
            w.join(30)
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            stats["kills"] += 1
            from fusemirror.faults import simulate_power_loss

            if rng.random() < 0.5:
                simulate_power_loss(str(plog), seed=rng.randrange(1 << 30), under=str(unit))
                stats["power_losses"] += 1
            for f in plog.iterdir():
                f.unlink()
            r = run_fsck("-y", str(unit))
            assert r.returncode in (0, 1), r.stdout + r.stderr
            stats["lost"] += ledger.lost(str(unit / "image"))
            problems = ledger.check(str(unit / "image"))
            assert problems == [], (i, problems[:5])
            assert images_equal(str(unit / "image"), str(agent.root / "s1" / "image")), i
    finally:
        teardown_mount(unit, mnt)
    stats["acknowledged"] = ledger.acked_fsyncs
    return stats


def test_random_kill_loop(tmp_path, agent_factory, secret_file) -> None:
    """SIGKILL at random moments, half of them with simulated power loss of the master."""
    agent = agent_factory()
    kills = int(os.environ.get("FUSEMIRROR_KILLS", "50"))
    stats = _kill_loop(tmp_path, agent, secret_file, kills, seed=2026)
    print(f"\nkill loop: {stats['kills']} kills ({stats['power_losses']} with power loss), "
          f"{stats['acknowledged']} acknowledged fsyncs, {stats['lost']} lost writes")
    assert stats["kills"] == kills and stats["lost"] == 0 and stats["acknowledged"] > kills
