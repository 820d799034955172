"""Lifecycle edges found in review: what follows a failover, and crashes inside a command.

After a failover the new master's database holds the lost master as an address-less slave
record ("a former master, not rejoined"): fsck, verify, sync and fracture must treat it as a
slave they cannot reach, not crash on it. A crash inside ``demote`` must not lose what the
slaves lack. ``set`` on a slave's unit is refused (it would split the mirror). A demoted
former master is not promoted without --force while its rejoin is pending.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import FM, kill9, run_fm, run_fsck, status, wait_for

MiB = 1 << 20


def write_fsync(path: Path, off: int, data: bytes) -> None:
    """Write ``data`` at ``off`` and fsync: acknowledged, it must survive what follows."""
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def failover(tmp: Path, agent: Any, secret: Path) -> tuple[Path, Path]:
    """Master ``a`` with slave s1 on ``agent``; ``a`` lost: demote it from s1, promote s1."""
    a = tmp / "a"
    run_fm("create", str(a), "--size", "32M", "--secret-file", str(secret))
    run_fm("add-slave", str(a), agent.address("s1"), "--synchronized")
    s1 = agent.root / "s1"
    run_fm("demote", str(s1))
    run_fm("promote", str(s1))
    return a, s1


def test_fsck_and_admin_commands_after_a_failover(tmp_path, agent_factory, secret_file,
                                                  mounter) -> None:
    """The promoted slave crashes with logged extents: fsck keeps them in the former master's
    fracture log (exit 1, corrected) instead of a traceback with exit 1 and the unit left
    unrecoverable; mount then works. verify/sync/fracture naming the former master give a
    clear refusal, and verify of every slave skips it."""
    agent = agent_factory()
    a, s1 = failover(tmp_path, agent, secret_file)
    db = json.loads((s1 / "mirror.json").read_text())
    old = next(i for i in db["images"] if i["role"] == "slave")
    assert old["address"] is None
    run_fm("activate", str(s1))
    m = mounter(s1)
    with open(m.image, "r+b") as f:
        f.write(os.urandom(3 * MiB))
        f.flush()
        os.fsync(f.fileno())
    for cmd in (["verify", str(s1), old["name"]], ["sync", str(s1), old["name"]]):
        r = run_fm(*cmd, check=False)
        assert r.returncode == 3 and "former master" in r.stderr, (cmd, r.stderr)
    r = run_fm("verify", str(s1), check=False)
    assert r.returncode == 2 and "no slave to verify" in r.stderr, r.stderr
    kill9(s1, m.mnt)
    assert status(s1)["needs_recovery"]
    r = run_fsck(str(s1), "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["slaves"][0]["result"].startswith("a former master")
    # the 3 extents written, and those the journal logged ahead of a sequential writer
    assert out["slaves"][0]["kept_in_fracture_log"] == len(out["logged_extents"]) >= 3
    assert not status(s1)["needs_recovery"]
    assert "Traceback" not in r.stderr
    m2 = mounter(s1)
    assert m2.status()["state"] == "ACTIVE"


def test_a_crash_inside_demote_keeps_what_the_slaves_lack(tmp_path, agent_factory, secret_file,
                                                          mounter) -> None:
    """demote writes the list of extents to copy back and saves the unit as a slave before it
    clears the journal that list came from: killed right after the save, the unit is a slave
    (mount refused) whose rejoin.json names every logged extent. Before, the journal was
    cleared first and a crash left a clean master that mounted without recovery."""
    agent = agent_factory()
    a = tmp_path / "a"
    run_fm("create", str(a), "--size", "32M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(a), agent.address("s1"), "--synchronized")
    run_fm("activate", str(a))
    m = mounter(a)
    with open(m.image, "r+b") as f:
        for e in (3, 9, 20):
            f.seek(e * MiB)
            f.write(os.urandom(4096))
        f.flush()
        os.fsync(f.fileno())
    kill9(a, m.mnt)
    logged = status(a)["journal"]["extents"]
    assert {3, 9, 20} <= set(logged)
    r = run_fm("demote", str(a), "--force", check=False,
               env={"FUSEMIRROR_CRASH_AT": "demote-saved"})
    assert r.returncode == -9, r.stderr
    db = json.loads((a / "mirror.json").read_text())
    me = next(i for i in db["images"] if i["id"] == db["self"])
    assert me["role"] == "slave"
    assert set(json.loads((a / "rejoin.json").read_text())["extents"]) >= set(logged)
    (tmp_path / "mnt-again").mkdir()
    r = run_fm("mount", str(a), str(tmp_path / "mnt-again"), check=False)
    assert r.returncode == 3, (r.returncode, r.stderr)


def test_set_on_a_slave_unit_is_refused(tmp_path, agent_factory, secret_file, mounter) -> None:
    """Attributes are the mirror's: `set` on a slave's unit (held by its agent or not) is
    refused with exit 3 and changes nothing. Before, it bumped the slave's generation apart
    from the master's, and the master's next mount refused the slave as split brain."""
    agent = agent_factory()
    a = tmp_path / "a"
    run_fm("create", str(a), "--size", "32M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(a), agent.address("s1"), "--synchronized")
    s1 = agent.root / "s1"
    before = (s1 / "mirror.json").read_bytes()
    r = run_fm("set", str(s1), "heartbeat=2", check=False)
    assert r.returncode == 3 and "slave image" in r.stderr, (r.returncode, r.stderr)
    assert (s1 / "mirror.json").read_bytes() == before
    run_fm("activate", str(a))
    m = mounter(a)                     # the master still takes its slave (no split brain)
    run_fm("umount", str(m.mnt))


def test_a_demoted_former_master_is_not_promoted_without_force(tmp_path, agent_factory,
                                                               secret_file) -> None:
    """After a switch-over (the master demoted on its host, the slave promoted and written
    to), the demoted unit still reads CONSISTENT with no master in its copy of the database;
    promoting it would serve data without the new master's writes. It is refused (exit 3)
    until it has rejoined; --force takes it as it is."""
    agent = agent_factory()
    a = tmp_path / "a"
    run_fm("create", str(a), "--size", "32M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(a), agent.address("s1"), "--synchronized")
    run_fm("demote", str(a))
    r = run_fm("promote", str(a), check=False)
    assert r.returncode == 3 and "has not rejoined" in r.stderr, (r.returncode, r.stderr)
    r = run_fm("promote", str(a), "--force", "--json")
    assert json.loads(r.stdout)
    assert not (a / "rejoin.json").exists()


def test_a_removed_slave_added_again_gets_a_full_sync(tmp_path, agent_factory, secret_file,
                                                      mounter) -> None:
    """remove-slave forgets the slave (its unit stays on the agent); writes follow; add-slave
    of the same unit takes it back with a full sync, since nothing recorded what it missed.
    Before, it rejoined "by extents" with nothing owed, read CONSISTENT and lacked the writes."""
    from test_failover import streaming_to
    from test_replication import images_equal

    agent = agent_factory()
    a = tmp_path / "a"
    run_fm("create", str(a), "--size", "32M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(a), agent.address("s1"), "--synchronized")
    run_fm("activate", str(a))
    m = mounter(a)
    run_fm("deactivate", str(a))
    run_fm("remove-slave", str(a), agent.address("s1"))
    run_fm("activate", str(a))
    write_fsync(m.image, 5 * MiB, os.urandom(MiB))
    r = run_fm("add-slave", str(a), agent.address("s1"), "--json")
    assert json.loads(r.stdout)["state"] == "rejoined: full sync", r.stdout
    wait_for(lambda: streaming_to(m, agent.address("s1")), what="the full sync", timeout=60)
    run_fm("umount", str(m.mnt))
    assert images_equal(a / "image", agent.root / "s1" / "image")


def test_after_a_failover_the_other_slave_is_fully_synced_from_the_new_master(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """Master with slaves s1 and s2; s2 holds a block s1 lacks (a write in flight when the
    master died reached only s2). s1 is promoted: s2 becomes UNSYNCHRONIZED in the new
    master's database and is fully synced from it, ending equal. Before, s2 stayed
    CONSISTENT, streamed on, and kept its different block (promotable, reported healthy)."""
    from test_failover import slave_of, streaming_to
    from test_replication import images_equal

    agent = agent_factory()
    m = tmp_path / "m"
    run_fm("create", str(m), "--size", "16M", "--secret-file", str(secret_file))
    for name in ("s1", "s2"):
        run_fm("add-slave", str(m), agent.address(name), "--synchronized")
    run_fm("activate", str(m))
    old = mounter(m)
    for name in ("s1", "s2"):   # both hold the database that lists both
        wait_for(lambda: streaming_to(old, agent.address(name)), what=f"{name} streaming")
    with open(agent.root / "s2" / "image", "r+b") as f:
        f.seek(6 * MiB)
        f.write(os.urandom(4096))
    kill9(m, old.mnt)
    s1 = agent.root / "s1"
    run_fm("demote", str(s1))
    run_fm("promote", str(s1))
    db = json.loads((s1 / "mirror.json").read_text())
    other = next(i for i in db["images"] if i.get("address") == agent.address("s2"))
    assert other["state"] == "UNSYNCHRONIZED"
    run_fm("activate", str(s1))
    mm = mounter(s1)
    wait_for(lambda: streaming_to(mm, agent.address("s2")), what="s2's full sync", timeout=60)
    assert slave_of(mm, agent.address("s2"))["state"] in ("SYNCHRONIZED", "CONSISTENT")
    run_fm("umount", str(mm.mnt))
    assert images_equal(s1 / "image", agent.root / "s2" / "image")


def test_a_master_replaced_elsewhere_writes_no_more_to_the_other_slave(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """Master m with slave s1 (host A) and s2 (host B). m loses host A; there s1 is promoted
    and the promotion is committed on s2. m's session to s2 is fenced at that commit, and
    reconnecting m is refused as stale (before the agent cuts anyone off): m goes to
    ATTENTION and its writes no longer reach s2. Before, m went on writing to s2 (fsync'ed
    writes landed on a slave of the new master) and each reconnect fenced the new master's
    session first."""

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    host_b.expected_errors.append("refused to a master")
    mm.expect_errors("stale master", "is now ATTENTION", "UNREACHABLE")
    host_a.kill()                                  # m cannot reach host A any more
    r = run_fm("promote", str(host_a.root / "s1"), "--force", "--json")
    assert json.loads(r.stdout)["members"].get(host_b.address("s2")) == "ok", r.stdout
    wait_for(lambda: mm.status()["state"] == "ATTENTION", what="m to stop", timeout=30)
    data = os.urandom(4096)
    try:
        write_fsync(mm.image, 9 * MiB, data)
    except OSError:
        pass
    with open(host_b.root / "s2" / "image", "rb") as f:
        f.seek(9 * MiB)
        assert f.read(4096) != data


def test_a_slave_that_missed_changes_cannot_take_over_while_a_newer_member_answers(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """s2 was down while the master wrote (the other slave s1 holds the newer generation);
    the master crashes. On s2's host, demote (of the lost master) and promote are refused
    (exit 3), naming the member with the newer state (a forced demote does not make the
    promote go through). Before, both succeeded on s2 and the new master lacked fsync'ed
    writes."""
    from test_failover import slave_of

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    mm.expect_errors("UNREACHABLE")
    host_b.kill()
    wait_for(lambda: not slave_of(mm, host_b.address("s2"))["reachable"], what="s2 down")
    write_fsync(mm.image, 8 * MiB, os.urandom(MiB))

    def gen(unit: Path) -> int:
        return json.loads((unit / "mirror.json").read_text())["generation"]["counter"]

    s1, s2 = host_a.root / "s1", host_b.root / "s2"
    wait_for(lambda: gen(s1) > gen(s2), what="s1 to hold the newer generation")
    kill9(m, mm.mnt)
    host_b.start()
    r = run_fm("demote", str(s2), check=False)
    assert r.returncode == 3 and "newer state" in r.stderr, (r.returncode, r.stderr)
    assert "s1" in r.stderr
    # insisted on (--force), the demote goes through; the promote is still refused
    run_fm("demote", str(s2), "--force")
    r = run_fm("promote", str(s2), check=False)
    assert r.returncode == 3 and "newer state" in r.stderr, (r.returncode, r.stderr)
    db = json.loads((s2 / "mirror.json").read_text())
    assert next(i for i in db["images"] if i["id"] == db["self"])["role"] == "slave"


def test_a_slave_down_during_the_failover_is_taken_by_the_new_master(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """s2's host is down while s1 takes over, so s2's copy still names the old master. When
    it is back, the new master s1 takes it (its copy descends from s2's): s1 stays ACTIVE and
    s2 streams after a full sync. (Refusing every master but the one s2 names sent the new
    master to ATTENTION.)"""
    from test_failover import streaming_to

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    kill9(m, mm.mnt)
    host_b.kill()
    s1 = host_a.root / "s1"
    run_fm("demote", str(s1))
    run_fm("promote", str(s1))
    host_b.start()
    run_fm("activate", str(s1))
    new = mounter(s1)
    new.expect_errors("UNREACHABLE")
    wait_for(lambda: streaming_to(new, host_b.address("s2")) or
             new.status()["state"] == "ATTENTION", what="s2 taken or refused", timeout=60)
    st = new.status()
    assert st["state"] == "ACTIVE", st.get("attention_reason")
    assert streaming_to(new, host_b.address("s2"))


def test_a_slave_away_longer_than_the_remembered_history_is_fully_synced(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """The master made more generation changes than it remembers while its slave was away:
    nothing proves what the slave missed, so the master mounts and takes it with a full sync
    (not by extents, not refused as a split brain)."""
    from fusemirror import mirrordb
    from fusemirror.mirrordb import MirrorDB
    from test_failover import slave_of, streaming_to
    from test_replication import images_equal

    agent = agent_factory()
    m = tmp_path / "m"
    run_fm("create", str(m), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(m), agent.address("s1"), "--synchronized")
    agent.kill()
    db = MirrorDB.load(str(m))           # as many offline `set`s would
    for _ in range(mirrordb.HISTORY_KEEP + 6):
        db.bump_generation()
    db.save(str(m))
    with open(m / "image", "r+b") as f:   # and the data changed meanwhile
        f.seek(3 * MiB)
        f.write(os.urandom(MiB))
    agent.start()
    run_fm("activate", str(m))
    mm = mounter(m)
    wait_for(lambda: streaming_to(mm, agent.address("s1")), what="the full sync", timeout=60)
    assert slave_of(mm, agent.address("s1"))["state"] in ("SYNCHRONIZED", "CONSISTENT")
    assert "full sync" in (m / "daemon.log").read_text()
    run_fm("umount", str(mm.mnt))
    assert images_equal(m / "image", agent.root / "s1" / "image")


def test_a_full_sync_owed_to_a_former_master_survives_its_rejoin(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """After a failover the new master crashes with a damaged journal; fsck -y records the
    address-less former master as UNSYNCHRONIZED. When it rejoins it gets that full sync
    (its own report, CONSISTENT, used to overwrite it: caught up by extents, it lacked the
    writes the damaged journal had covered)."""
    from fusemirror import journal
    from test_failover import streaming_to
    from test_replication import images_equal

    host_a, host_b = agent_factory("host-a"), agent_factory("host-b")
    a = host_a.root / "m0"
    run_fm("create", str(a), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(a), host_b.address("s1"), "--synchronized")
    s1 = host_b.root / "s1"
    run_fm("activate", str(a))
    ma = mounter(a)                      # the slave then holds the master's database
    wait_for(lambda: streaming_to(ma, host_b.address("s1")), what="streaming")
    run_fm("umount", str(ma.mnt))
    run_fm("demote", str(s1))
    run_fm("promote", str(s1))
    run_fm("activate", str(s1))
    m = mounter(s1)
    write_fsync(m.image, 5 * MiB, os.urandom(2 * MiB))
    kill9(s1, m.mnt)
    os.truncate(s1 / "journal", 3 * journal.SLOT + 100)
    assert run_fsck("-y", str(s1)).returncode == 1
    db = json.loads((s1 / "mirror.json").read_text())
    assert next(i for i in db["images"] if i["role"] == "slave")["state"] == "UNSYNCHRONIZED"
    run_fm("deactivate", str(a))
    run_fm("demote", str(a))
    m2 = mounter(s1)
    m2.expect_errors("UNREACHABLE")
    r = run_fm("add-slave", str(s1), host_a.address("m0"), "--json")
    assert json.loads(r.stdout)["state"] == "rejoined: full sync", r.stdout
    wait_for(lambda: streaming_to(m2, host_a.address("m0")), what="the rejoin", timeout=60)
    run_fm("umount", str(m2.mnt))
    assert images_equal(s1 / "image", a / "image")


def _master_with_two_slaves(tmp_path, agent_factory, secret_file, mounter):
    from test_failover import streaming_to

    host_a, host_b = agent_factory("host-a"), agent_factory("host-b")
    m = tmp_path / "m"
    run_fm("create", str(m), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(m), host_a.address("s1"), "--synchronized")
    run_fm("add-slave", str(m), host_b.address("s2"), "--synchronized")
    run_fm("activate", str(m))
    mm = mounter(m)
    for h, name in ((host_a, "s1"), (host_b, "s2")):
        wait_for(lambda: streaming_to(mm, h.address(name)), what=f"{name} streaming")
    return host_a, host_b, m, mm


def test_a_planned_switch_over_keeps_what_a_down_slave_missed(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """s2 is down while the master writes (its misses are in the master's fracture log for
    it); planned switch-over: the master unmounted, demoted cleanly, s1 promoted. The demote
    records s2 as needing a full sync (its fracture log is gone with the demote), so the new
    master brings it level. Before, s2 streamed on, CONSISTENT, without the fsync'ed write."""
    from test_failover import slave_of, streaming_to
    from test_replication import images_equal

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    mm.expect_errors("UNREACHABLE")
    host_b.kill()
    wait_for(lambda: not slave_of(mm, host_b.address("s2"))["reachable"], what="s2 down")
    write_fsync(mm.image, 8 * MiB, os.urandom(MiB))
    run_fm("deactivate", str(m))
    run_fm("umount", str(mm.mnt))
    run_fm("demote", str(m))
    s1 = host_a.root / "s1"
    run_fm("promote", str(s1))
    host_b.start()
    run_fm("activate", str(s1))
    new = mounter(s1)
    new.expect_errors("UNREACHABLE")
    wait_for(lambda: streaming_to(new, host_b.address("s2")), what="s2 level", timeout=60)
    run_fm("umount", str(new.mnt))
    assert images_equal(s1 / "image", host_b.root / "s2" / "image")


def test_a_clean_switch_over_after_an_old_failover_rejoins_by_extents(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """The first master is lost for good (s1 takes over); later a planned switch-over from
    s1 to s2. s1, demoted cleanly, rejoins by extents: the old failover's 'lost master' mark
    was consumed by the promote it was for (it made every later promote order full syncs)."""
    from test_failover import streaming_to

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    kill9(m, mm.mnt)
    s1, s2 = host_a.root / "s1", host_b.root / "s2"
    run_fm("demote", str(s1))
    run_fm("promote", str(s1))
    run_fm("activate", str(s1))
    new = mounter(s1)
    wait_for(lambda: streaming_to(new, host_b.address("s2")), what="s2 synced", timeout=60)
    run_fm("deactivate", str(s1))
    run_fm("umount", str(new.mnt))
    run_fm("demote", str(s1))
    run_fm("promote", str(s2))
    db = json.loads((s2 / "mirror.json").read_text())
    rec = next(i for i in db["images"] if i["name"] == host_a.address("s1"))
    assert rec["state"] != "UNSYNCHRONIZED", rec
    run_fm("activate", str(s2))
    nb = mounter(s2)
    r = run_fm("add-slave", str(s2), host_a.address("s1"), "--json")
    assert json.loads(r.stdout)["state"] == "rejoined: extents", r.stdout
    wait_for(lambda: streaming_to(nb, host_a.address("s1")), what="s1 rejoined", timeout=60)


def test_a_slave_that_sided_with_the_discarded_master_can_be_discarded(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """Split brain: host A cut off while m writes (m's newer generation reaches s2 only); s1
    promoted --force there; the administrator keeps s1 and discards m. s2 followed m, so the
    kept master refuses it as a split brain and says to discard it: `demote --discard` on
    s2's unit (a usage error before, leaving no way back short of deleting the unit) marks
    it UNSYNCHRONIZED, and s1 mounts and takes it with a full sync."""
    from test_failover import streaming_to
    from test_replication import images_equal

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    host_b.expected_errors.append("refused to a master")
    mm.expect_errors("UNREACHABLE", "split brain", "stale master", "ATTENTION")
    s1, s2 = host_a.root / "s1", host_b.root / "s2"

    def gen(unit: Path) -> int:
        return json.loads((unit / "mirror.json").read_text())["generation"]["counter"]

    host_a.kill()
    write_fsync(mm.image, 8 * MiB, os.urandom(MiB))
    wait_for(lambda: gen(s2) > gen(s1), what="s2 to hold m's newer generation")
    run_fm("promote", str(s1), "--force")
    host_a.start()
    run_fm("umount", str(mm.mnt))
    run_fm("demote", str(m), "--force", "--discard")
    (tmp_path / "mnt-s1").mkdir()
    r = run_fm("mount", str(s1), str(tmp_path / "mnt-s1"), check=False)
    assert r.returncode == 3 and "--discard" in r.stderr, (r.returncode, r.stderr)
    r = run_fm("demote", str(s2), "--discard", "--json")
    assert json.loads(r.stdout)["role"] == "slave"
    run_fm("activate", str(s1))
    new = mounter(s1, mnt=tmp_path / "mnt-s1")
    new.expect_errors("UNREACHABLE")
    wait_for(lambda: streaming_to(new, host_b.address("s2")), what="s2 full sync", timeout=60)
    run_fm("umount", str(new.mnt))
    assert images_equal(s1 / "image", s2 / "image")


def test_a_former_master_not_rejoined_gets_a_full_sync_after_a_lost_master(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """m0 is demoted cleanly (a planned switch-over) and s1 promoted, which writes; before m0
    rejoins, s1 is lost and s2 takes over. What m0 missed from s1 was only in s1's fracture
    log: m0 is one of the "other" copies and rejoins with a full sync. (Skipped for being a
    former master, it rejoined by extents and lacked s1's fsync'ed write.)"""
    from test_failover import streaming_to
    from test_replication import images_equal

    host_a, host_b = agent_factory("host-a"), agent_factory("host-b")
    m0 = host_a.root / "m0"
    run_fm("create", str(m0), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(m0), host_a.address("s1"), "--synchronized")
    run_fm("add-slave", str(m0), host_b.address("s2"), "--synchronized")
    run_fm("activate", str(m0))
    mm = mounter(m0)
    for h, name in ((host_a, "s1"), (host_b, "s2")):
        wait_for(lambda: streaming_to(mm, h.address(name)), what=f"{name} streaming")
    run_fm("deactivate", str(m0))
    run_fm("umount", str(mm.mnt))
    run_fm("demote", str(m0))
    s1, s2 = host_a.root / "s1", host_b.root / "s2"
    run_fm("promote", str(s1))
    run_fm("activate", str(s1))
    n1 = mounter(s1)
    n1.expect_errors("UNREACHABLE")
    write_fsync(n1.image, 4 * MiB, os.urandom(2 * MiB))
    wait_for(lambda: streaming_to(n1, host_b.address("s2")), what="s2 has s1's write")
    kill9(s1, n1.mnt)
    run_fm("demote", str(s2))
    run_fm("promote", str(s2))
    run_fm("activate", str(s2))
    n2 = mounter(s2)
    n2.expect_errors("UNREACHABLE")
    r = run_fm("add-slave", str(s2), host_a.address("m0"), "--json")
    assert json.loads(r.stdout)["state"] == "rejoined: full sync", r.stdout
    wait_for(lambda: streaming_to(n2, host_a.address("m0")), what="m0 rejoined", timeout=60)
    run_fm("umount", str(n2.mnt))
    assert images_equal(s2 / "image", m0 / "image")


def test_discarding_a_slave_that_a_healthy_master_streams_to_means_a_full_sync(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """demote --discard on s1's unit while the master streams to it (s1's copy is known bad):
    s1 gets a generation of its own, so the reconnecting master fully syncs it and the bad
    block is repaired; the other slave is not told anything. (At the old generation the
    master only caught s1 up and the mark was overwritten.)"""
    from test_failover import streaming_to
    from test_replication import images_equal

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    mm.expect_errors("UNREACHABLE")
    s1 = host_a.root / "s1"
    with open(s1 / "image", "r+b") as f:
        f.seek(10 * MiB)
        f.write(os.urandom(4096))
    log = m / "daemon.log"
    syncs = log.read_text().count("full sync done")
    r = run_fm("demote", str(s1), "--discard", "--json")
    assert json.loads(r.stdout)["members"] == {}
    wait_for(lambda: log.read_text().count("full sync done") > syncs, what="s1's full sync",
             timeout=60)
    wait_for(lambda: streaming_to(mm, host_a.address("s1")), what="s1 streaming")
    run_fm("deactivate", str(m))
    run_fm("umount", str(mm.mnt))
    assert images_equal(m / "image", s1 / "image")


def test_a_slave_that_missed_nothing_keeps_its_state_through_a_clean_demote(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """A slave down while the mirror was INACTIVE missed nothing (empty fracture log): a
    clean demote does not send it to a full sync."""
    from test_failover import slave_of

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    mm.expect_errors("UNREACHABLE")
    run_fm("deactivate", str(m))
    host_b.kill()
    wait_for(lambda: not slave_of(mm, host_b.address("s2"))["reachable"], what="s2 down")
    assert slave_of(mm, host_b.address("s2"))["fracture_extents"] == 0
    run_fm("umount", str(mm.mnt))
    run_fm("demote", str(m))
    db = json.loads((m / "mirror.json").read_text())
    rec = next(i for i in db["images"] if i.get("address") == host_b.address("s2"))
    assert rec["state"] != "UNSYNCHRONIZED", rec


def test_a_discarded_slave_blocks_no_one_and_is_fully_synced_by_the_next_master(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """`demote --discard` on s1's unit while the mirror is down marks its own copy, without a
    generation of its own: the master mounts again, a planned switch-over to s2 goes through
    (before: "member s1 holds a newer state"), and the new master fully syncs s1 — the mark
    survives the databases other members push meanwhile — repairing its bad block."""
    from test_failover import streaming_to
    from test_replication import images_equal

    host_a, host_b, m, mm = _master_with_two_slaves(tmp_path, agent_factory, secret_file,
                                                    mounter)
    mm.expect_errors("UNREACHABLE")
    s1, s2 = host_a.root / "s1", host_b.root / "s2"
    run_fm("deactivate", str(m))
    run_fm("umount", str(mm.mnt))
    with open(s1 / "image", "r+b") as f:
        f.seek(10 * MiB)
        f.write(os.urandom(4096))
    run_fm("demote", str(s1), "--discard")
    m2 = mounter(m)                           # the master still mounts
    run_fm("umount", str(m2.mnt))
    run_fm("demote", str(m))
    run_fm("promote", str(s2))                # a planned switch-over still goes through
    run_fm("activate", str(s2))
    new = mounter(s2)
    new.expect_errors("UNREACHABLE")
    wait_for(lambda: "full sync done" in (s2 / "daemon.log").read_text(),
             what="s1's full sync", timeout=60)
    wait_for(lambda: streaming_to(new, host_a.address("s1")), what="s1 full sync", timeout=60)
    run_fm("umount", str(new.mnt))
    assert images_equal(s2 / "image", s1 / "image")
