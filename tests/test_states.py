"""States (patent FIG. 4 and FIG. 5) as transition tables, every transition exercised, and
every refused command: one line naming the state and the remedy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import Mounted, run_fm, status, wait_for
from fusemirror import states
from fusemirror.errors import StateError
from test_replication import slave_status, streaming

MiB = 1 << 20


@pytest.mark.parametrize("key", sorted(states.MIRROR_TRANSITIONS))
def test_every_mirror_transition(key) -> None:
    state, event = key
    assert states.mirror_next(state, event) == states.MIRROR_TRANSITIONS[key]


@pytest.mark.parametrize("key", sorted(states.IMAGE_TRANSITIONS))
def test_every_image_transition(key) -> None:
    state, event = key
    assert states.image_next(state, event) == states.IMAGE_TRANSITIONS[key]


def test_fig4_and_fig5_shapes() -> None:
    T = states.MIRROR_TRANSITIONS
    assert T[(states.INACTIVE, "activate_ok")] == states.ACTIVE
    assert T[(states.INACTIVE, "activate_fail")] == states.ATTENTION
    assert T[(states.ACTIVE, "condition_fail")] == states.ATTENTION
    assert T[(states.ATTENTION, "conditions_ok")] == states.INACTIVE   # not back to ACTIVE
    assert (states.ATTENTION, "activate_ok") not in T
    I = states.IMAGE_TRANSITIONS
    assert I[(states.UNSYNCHRONIZED, "sync_start")] == states.SYNCHRONIZING
    assert I[(states.UNSYNCHRONIZED, "added_synchronized")] == states.SYNCHRONIZED
    assert I[(states.SYNCHRONIZED, "master_write")] == states.CONSISTENT
    assert I[(states.CONSISTENT, "all_committed")] == states.SYNCHRONIZED
    assert I[(states.CONSISTENT, "updates_lost")] == states.SYNCHRONIZING
    assert I[(states.CONSISTENT, "history_lost")] == states.UNSYNCHRONIZED
    assert I[(states.SYNCHRONIZING, "sync_failed")] == states.UNSYNCHRONIZED
    assert I[(states.SYNCHRONIZING, "sync_done")] == states.CONSISTENT


def test_refused_transitions_name_state_and_remedy() -> None:
    with pytest.raises(StateError) as e:
        states.mirror_next(states.ATTENTION, "activate_ok")
    assert "ATTENTION" in str(e.value) and "fusemirror status" in str(e.value)
    with pytest.raises(StateError) as e:
        states.image_next(states.UNSYNCHRONIZED, "sync_done")
    assert "UNSYNCHRONIZED" in str(e.value)


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_refused_commands(tmp_path, agent_factory, secret_file, mounter) -> None:
    agent = agent_factory()
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "8M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"))
    slave_unit = agent.root / "s1"
    run_fm("activate", str(unit))
    cases = [
        (["remove-slave", str(unit), "s1"], "mirror is ACTIVE", "deactivate"),
        (["destroy", str(unit)], "mirror is ACTIVE", "deactivate"),
        (["demote", str(unit)], "mirror is ACTIVE", "deactivate"),
        (["promote", str(unit)], "already the master", ""),
        (["promote", str(slave_unit)], "still has a master", "demote"),
        (["activate", str(slave_unit)], "slave image", "master"),
        (["mount", str(slave_unit), str(tmp_path)], "slave image", "promote"),
    ]
    for args, state_words, remedy in cases:
        r = run_fm(*args, check=False)
        line = _one_line(r)
        assert r.returncode == 3, (args, r.stderr)
        assert state_words in line and remedy in line, (args, line)
    run_fm("deactivate", str(unit))
    r = run_fm("destroy", str(unit), check=False)
    assert r.returncode == 3 and "remove-slave" in _one_line(r)
    run_fm("demote", str(slave_unit))                 # the master is "lost": demoted there
    r = run_fm("promote", str(slave_unit), check=False)
    assert r.returncode == 3 and "UNSYNCHRONIZED" in _one_line(r)
    run_fm("promote", "--force", str(slave_unit))
    assert status(slave_unit)["role"] == "master"


def test_destroy_keeps_the_data(tmp_path) -> None:
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "4M")
    with open(unit / "image", "r+b") as f:
        f.write(b"keep me")
    run_fm("destroy", str(unit))
    assert (unit / "image").read_bytes()[:7] == b"keep me"
    assert not (unit / "mirror.json").exists()
    r = run_fm("status", str(unit), check=False)
    assert r.returncode == 2 and "not a fusemirror unit" in r.stderr


def test_get_set_validation(tmp_path) -> None:
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "4M")
    r = run_fm("set", str(unit), "nope=1", check=False)
    assert r.returncode == 2 and "valid:" in r.stderr and "heartbeat" in r.stderr
    r = run_fm("set", str(unit), "heartbeat=1", "write_policy=maybe", check=False)
    assert r.returncode == 2 and "sync, async" in r.stderr
    assert json.loads(run_fm("get", str(unit), "--json").stdout)["heartbeat"] == 1.0, \
        "all or nothing: the valid pair was not applied either"
    run_fm("set", str(unit), "heartbeat=2.5", "max_missing_images=0")
    got = json.loads(run_fm("get", str(unit), "--json").stdout)
    assert got["heartbeat"] == 2.5 and got["max_missing_images"] == 0
    assert run_fm("get", str(unit), "heartbeat").stdout.strip() == "heartbeat = 2.5"
    # a heartbeat is also the wait before each reconnect: bounded
    r = run_fm("set", str(unit), "heartbeat=1e9", check=False)
    assert r.returncode == 2 and "<= 60" in r.stderr


def synchronized_pair(tmp_path: Path, agent, secret_file: Path, size: str, *settings: str,
                      slave_timeout: str | None = None) -> Path:
    """A master unit with one SYNCHRONIZED slave ``s1``, its attributes set, still INACTIVE."""
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", size, "--secret-file", str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"), "--synchronized")
    if settings:
        run_fm("set", str(unit), *settings)
    if slave_timeout is not None:
        run_fm("set", str(unit), "--image", "s1", f"timeout={slave_timeout}")
    return unit


def test_activate_fails_into_attention_then_back_to_inactive(tmp_path, agent_factory,
                                                             secret_file, mounter) -> None:
    """FIG. 4: INACTIVE -activate, condition fails-> ATTENTION -conditions hold-> INACTIVE."""
    agent = agent_factory()
    unit = synchronized_pair(tmp_path, agent, secret_file, "8M", "heartbeat=0.2",
                             "min_images_required=2", slave_timeout="1")
    agent.kill()
    m: Mounted = mounter(unit, activate=False)
    m.expect_errors()
    r = run_fm("activate", str(unit), check=False)
    assert r.returncode == 3 and "ATTENTION" in r.stdout
    assert "min_images_required" in m.status()["attention_reason"]
    agent.start()
    wait_for(lambda: m.status()["state"] == "INACTIVE", what="ATTENTION -> INACTIVE")
    run_fm("activate", str(unit))
    assert m.status()["state"] == "ACTIVE"


def test_fracture_log_overflow_needs_a_full_sync(tmp_path, agent_factory, secret_file,
                                                 mounter) -> None:
    """FIG. 5: a slave whose missed updates exceed fracture_log_size loses its history:
    UNSYNCHRONIZED, then a full sync makes it CONSISTENT again."""
    agent = agent_factory()
    unit = synchronized_pair(tmp_path, agent, secret_file, "16M", "fracture_log_size=3")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: streaming(m), what="streaming")
    run_fm("fracture", str(unit), "s1")
    with open(m.image, "r+b") as f:
        for e in range(6):
            f.seek(e * MiB)
            f.write(b"x" * 4096)
        os.fsync(f.fileno())
    m.control("cleanup", idle=0)
    assert slave_status(m)["state"] == "UNSYNCHRONIZED"
    run_fm("restore", str(unit), "s1")
    wait_for(lambda: streaming(m) and slave_status(m)["state"] == "CONSISTENT",
             what="full sync")
    assert slave_status(m)["catchup_bytes"] >= 16 * MiB


def test_a_member_that_missed_changes_is_brought_up_to_date(tmp_path, agent_factory,
                                                            secret_file, mounter) -> None:
    agent = agent_factory()
    unit = synchronized_pair(tmp_path, agent, secret_file, "8M", "heartbeat=0.2",
                             slave_timeout="1")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: streaming(m), what="streaming")
    slave_db = agent.root / "s1" / "mirror.json"
    agent.kill()
    wait_for(lambda: not slave_status(m)["reachable"], what="UNREACHABLE")
    run_fm("set", str(unit), "write_backlog_size=777")
    assert json.loads(slave_db.read_text())["mirror"]["write_backlog_size"] != 777
    agent.start()
    wait_for(lambda: json.loads(slave_db.read_text())["mirror"]["write_backlog_size"] == 777,
             what="the member's database brought up to date")
    mine = json.loads((unit / "mirror.json").read_text())["generation"]
    assert json.loads(slave_db.read_text())["generation"]["counter"] == mine["counter"]


def test_generation_relation_beyond_the_remembered_history(tmp_path) -> None:
    """A copy that forked (promoted apart) is "diverged" while the fork is within the
    remembered history, and "unknown" — never "ahead" — once it is older than all of it, as
    is an honest ancestor that old: such a member is taken back only with a full sync. Before,
    past the history it read "ahead" and a diverged slave was taken back by extents, its own
    writes kept silently. An ancestor within the history is "ahead"/"behind" as before."""
    from fusemirror import mirrordb
    from fusemirror.mirrordb import MirrorDB
    from fusemirror.unit import create_unit

    create_unit(str(tmp_path / "u"), size=MiB, block_size=4096, extent_size=MiB,
                write_policy="sync", name="t")
    master = MirrorDB.load(str(tmp_path / "u"))
    for _ in range(5):
        master.bump_generation()
    fork = master.copy()
    fork.bump_generation()                       # the slave, promoted apart
    old = master.copy()                          # a slave that only missed changes
    for n in range(mirrordb.HISTORY_KEEP + 10):
        master.bump_generation()
        if n == 20:
            near = master.copy()
            assert master.relation(fork.data["generation"]) == "diverged"
    assert master.relation(near.data["generation"]) == "ahead"
    assert near.relation(master.data["generation"]) == "behind"
    assert master.relation(fork.data["generation"]) == "unknown"
    assert master.relation(old.data["generation"]) == "unknown"
    assert fork.relation(master.data["generation"]) == "diverged"
