"""A damaged journal never means silent data loss: each kind of damage has its documented
outcome (docs/RECOVERY.md), and when the journal cannot be trusted fsck says so and either
stops (exit 4) or, with -y, falls back to a full sync of every slave."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import Mounted, kill9, run_fm, run_fsck, status, wait_for
from fusemirror import journal
from fusemirror.mirrordb import MirrorDB

MiB = 1 << 20


@pytest.fixture
def crashed(tmp_path, agent_factory, secret_file, mounter):
    """A mirror with one slave, killed after writes: (unit, agent, logged extents)."""
    agent = agent_factory()
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "16M", "--extent-size", "64K", "--secret-file",
           str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"), "--synchronized")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit)
    with open(m.image, "r+b") as f:
        for e in range(0, 256, 3):            # 86 extents of 64 KiB
            f.seek(e * 65536 + 100)
            f.write(os.urandom(3000))
        os.fsync(f.fileno())
    kill9(unit, m.mnt)
    logged = status(unit)["journal"]["extents"]
    assert len(logged) == 86
    # the slave lost everything the journal names (what a crash may leave)
    with open(agent.root / "s1" / "image", "r+b") as f:
        for e in logged:
            f.seek(e * 65536)
            f.write(bytes(65536))
    return unit, agent, logged


def equal(unit: Path, agent) -> bool:
    return (unit / "image").read_bytes() == (agent.root / "s1" / "image").read_bytes()


def _slot(unit: Path, seq: int) -> int:
    h = journal.scan(str(unit / "journal")).header
    return (1 + seq % h.nslots) * journal.SLOT


def test_torn_last_record_is_ignored(crashed) -> None:
    unit, agent, logged = crashed
    db = MirrorDB.load(str(unit))
    j = journal.Journal.open(str(unit / "journal"), mirror_id=bytes.fromhex(db.mirror["id"]))
    j.append(adds=[254])                      # an intent whose write never happened...
    seq = j.seq
    j.close()
    with open(unit / "journal", "r+b") as f:  # ...and whose record was torn by the crash
        f.seek(_slot(unit, seq) + 2000)
        f.write(os.urandom(2096))
    r = run_fsck("-n", "--json", str(unit))
    res = json.loads(r.stdout)
    assert r.returncode == 4 and res["torn_tail"] is True and 254 not in res["logged_extents"]
    r = run_fsck(str(unit))
    assert r.returncode == 1 and "torn last record ignored" in r.stdout
    assert equal(unit, agent)


@pytest.mark.parametrize("damage", ["bitflip", "missing", "truncated", "foreign",
                                    "zeroed-middle"])
def test_untrusted_journal_stops_or_falls_back_to_full_sync(crashed, tmp_path, damage) -> None:
    unit, agent, logged = crashed
    jp = unit / "journal"
    last = journal.scan(str(jp)).last_seq
    if damage == "bitflip":
        with open(jp, "r+b") as f:
            off = _slot(unit, last // 2) + 300
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0x10]))
    elif damage == "missing":
        jp.unlink()
    elif damage == "truncated":
        os.truncate(jp, 3 * journal.SLOT + 100)
    elif damage == "foreign":
        other = tmp_path / "other"
        run_fm("create", str(other), "--size", "16M", "--extent-size", "64K")
        shutil.copy(other / "journal", jp)
    elif damage == "zeroed-middle":
        with open(jp, "r+b") as f:
            f.seek(_slot(unit, last - 3))
            f.write(bytes(journal.SLOT))
    st = status(unit)
    assert st["needs_recovery"] is True and st["journal"]["error"]
    r = run_fm("mount", str(unit), str(tmp_path), check=False)
    assert r.returncode == 5 and "fsck.fusemirror" in r.stderr
    r = run_fsck(str(unit))
    assert r.returncode == 4, r.stdout
    assert "DAMAGED" in r.stdout and "-y" in r.stdout
    assert not equal(unit, agent), "nothing was changed without -y"
    r = run_fsck("-y", "--json", str(unit))
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["slaves"][0]["result"] == "copied"
    assert res["slaves"][0]["bytes"] == 16 * MiB, "a full sync: every extent"
    assert equal(unit, agent)
    st = status(unit)
    assert st["needs_recovery"] is False and st["journal"]["error"] is None
    assert st["images"][1]["state"] == "CONSISTENT"
    assert any(p.name.startswith("journal.damaged-") for p in unit.iterdir()) or \
        damage == "missing"


def test_untrusted_journal_with_an_unreachable_slave(crashed) -> None:
    unit, agent, logged = crashed
    with open(unit / "journal", "r+b") as f:
        f.seek(journal.SLOT * 5 + 77)
        f.write(b"\xde\xad")
    agent.kill()
    r = run_fsck("-y", "--json", str(unit))
    assert r.returncode == 1
    res = json.loads(r.stdout)
    assert "unreachable" in res["slaves"][0]["result"]
    st = status(unit)
    assert st["images"][1]["state"] == "UNSYNCHRONIZED", "it needs a full sync now"


def test_fsck_dash_t_finds_the_checker(crashed) -> None:
    """`fsck -t fusemirror DIR` runs fsck.fusemirror (util-linux fsck, passing -y through)."""
    import subprocess

    from conftest import _env

    unit, agent, logged = crashed
    r = subprocess.run(["fsck", "-t", "fusemirror", "-y", str(unit)], capture_output=True,
                       text=True, env=_env(None))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"retired {len(logged)} intents" in r.stdout
    assert equal(unit, agent)


def test_crash_after_the_journal_is_rebuilt_keeps_the_unreachable_slave_unsynchronized(
        crashed, tmp_path) -> None:
    """fsck -y with the slave unreachable marks it UNSYNCHRONIZED (a full sync) and saves that
    before the journal that named its extents is rebuilt: a crash right after the rebuild
    (before fsck's final save) must not leave it recorded as in sync with a clean journal
    (before the fix: the next fsck said "nothing to do" and the slave silently differed)."""
    unit, agent, logged = crashed
    agent.kill()
    jp = unit / "journal"
    with open(jp, "r+b") as f:
        off = _slot(unit, journal.scan(str(jp)).last_seq // 2) + 300
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    r = run_fsck("-y", str(unit), env={"FUSEMIRROR_CRASH_AT": "fsck-journal-rebuilt"})
    assert r.returncode == -9, r.stdout + r.stderr
    slave = MirrorDB.load(str(unit)).slaves[0]
    assert slave["state"] == "UNSYNCHRONIZED", slave
    assert not status(unit)["needs_recovery"]
