"""Administrative commands at the edges a user meets: a demote or promote on a slave's host
while the master is alive, a slave that was briefly unreachable but missed nothing, a sync
whose slave is gone, Ctrl-C, the heartbeat age in `status`, and a remote refusal's exit code.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import FM, Mounted, run_fm, wait_for
from test_replication import lose_agent, make_mirror, slave_status, streaming


def master_db(unit: Path) -> dict:
    return json.loads((unit / "mirror.json").read_text())


def slave_record(unit: Path) -> dict:
    return next(i for i in master_db(unit)["images"] if i["role"] == "slave")


def test_demote_or_promote_from_a_slave_while_the_master_is_alive_is_refused(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """`demote SLAVEDIR` is for a lost master: while the master still talks to the slave it
    is refused (exit 3) and the master stays ACTIVE and streaming; a refused `promote` (the
    master not demoted) leaves the replication link up and the slave promotable later."""
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="16M")
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="streaming")
    slave_dir = agent.root / "s1"
    r = run_fm("demote", str(slave_dir), check=False)
    assert r.returncode == 3 and "is alive" in r.stderr and "--force" in r.stderr, r.stderr
    r = run_fm("promote", str(slave_dir), check=False)
    assert r.returncode == 3 and "still has a master" in r.stderr
    r = run_fm("promote", agent.address("s1"), "--secret-file", str(secret_file), check=False)
    assert r.returncode == 3 and "still has a master" in r.stderr, (r.returncode, r.stderr)
    st = m.status()
    assert st["state"] == "ACTIVE"
    s = slave_status(m)
    assert s["reachable"] and s["mode"] == "streaming", s
    assert not slave_record(unit).get("unreachable_since_catchup")
    with open(m.image, "r+b") as f:                 # the master still serves writes
        f.write(b"x" * 4096)
        f.flush()
    assert "refused" not in (unit / "daemon.log").read_text()


def test_a_slave_back_after_missing_nothing_is_promotable(tmp_path, agent_factory,
                                                          secret_file, mounter) -> None:
    """The agent restarts while nothing is written: the slave was UNREACHABLE but lacks
    nothing, so no flag is left that would make a later promote need --force."""
    agent = agent_factory()
    agent.expected_errors.append("refused")
    unit = make_mirror(tmp_path, agent, secret_file, size="16M", quick_timeout=True)
    m: Mounted = mounter(unit)
    m.expect_errors()
    wait_for(lambda: streaming(m), what="streaming")
    lose_agent(m, agent)
    wait_for(lambda: slave_record(unit).get("unreachable_since_catchup"),
             what="the flag saved while it is away")
    assert slave_status(m)["unreachable_since_catchup"] is True
    agent.start()
    wait_for(lambda: streaming(m) and not slave_record(unit).get("unreachable_since_catchup"),
             what="the flag cleared once it is back, having missed nothing")
    assert "it missed no write" in (unit / "daemon.log").read_text()


def test_heartbeat_age_is_refreshed_on_an_idle_link(tmp_path, agent_factory, secret_file,
                                                    mounter) -> None:
    """`status` says when the slave last answered: on an idle, healthy link (pings only) the
    age goes down again after each answered heartbeat instead of growing for ever."""
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="16M")
    run_fm("set", str(unit), "heartbeat=0.2")
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="streaming")
    ages: list[float] = []

    def refreshed() -> bool:
        ages.append(slave_status(m)["last_heartbeat_age"])
        return len(ages) >= 2 and ages[-1] < ages[-2]

    wait_for(refreshed, timeout=20, what="the heartbeat age to be refreshed")
    assert max(ages) < 5, ages


def test_offline_sync_of_an_unreachable_slave_fails_instead_of_hanging(
        tmp_path, agent_factory, secret_file) -> None:
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="16M")
    run_fm("set", str(unit), "--image", "s1", "timeout=1")
    agent.kill()
    t0 = time.monotonic()
    r = run_fm("sync", str(unit), agent.address("s1"), check=False, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "unreachable" in r.stderr and "run `fusemirror sync` again" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert "lock" not in run_fm("status", str(unit)).stdout   # the unit is free again


def test_ctrl_c_on_an_offline_sync_says_interrupted(tmp_path, agent_factory,
                                                    secret_file) -> None:
    """SIGINT inside trio.run arrives wrapped in an exception group: still one line, 130."""
    agent = agent_factory()
    unit = make_mirror(tmp_path, agent, secret_file, size="64M")
    run_fm("set", str(unit), "--image", "s1", "sync_rate=1M")      # long enough to interrupt
    p = subprocess.Popen([FM, "sync", str(unit), agent.address("s1")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (slave_record(unit).get("sync_progress") or 0) > 0 or
                 p.poll() is not None, what="the sync to make progress")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().endswith("interrupted") and "Traceback" not in err, err
    assert slave_record(unit)["sync_progress"] > 0, "progress kept for the next sync"


def test_every_changing_command_speaks_json(tmp_path, agent_factory, secret_file) -> None:
    """Scripts get one JSON object on stdout from every command that changes something."""
    agent = agent_factory()

    def js(*args: str) -> dict:
        r = run_fm(*args, "--json")
        return json.loads(r.stdout)

    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"), "--synchronized")
    assert js("set", str(unit), "heartbeat=0.5") == {"heartbeat": 0.5}
    run_fm("activate", str(unit))
    assert js("fracture", str(unit), "s1")["name"].endswith("/s1")
    assert "fracture_extents" in js("restore", str(unit), "s1")
    assert js("sync", str(unit), "s1") == {"slave": "s1", "synchronized": True}
    run_fm("deactivate", str(unit))
    assert js("remove-slave", str(unit), "s1")["removed"] is True
    assert js("destroy", str(unit))["destroyed"] is True

    unit2 = tmp_path / "m2"
    run_fm("create", str(unit2), "--size", "16M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(unit2), agent.address("s2"), "--synchronized")
    d = js("demote", str(unit2))
    assert d["role"] == "slave" and d["state"] == "INACTIVE"
    p = js("promote", str(agent.root / "s2"))
    assert p["role"] == "master" and p["generation"] > d["generation"]

    r = run_fm("fsck", "/nonexistent", "--json", check=False)   # an error is an object too
    assert r.returncode == 8 and "no such directory" in json.loads(r.stdout)["error"]


def test_refusal_exit_codes_cross_the_wire_and_os_errors_stay_failures() -> None:
    """An agent's refusal carries its exit code; a real OS error it met (EPERM, EBUSY,
    EINVAL from a system call) is a failure (1), not a state, busy or usage refusal."""
    import errno as E

    from fusemirror.errors import (BusyError, FusemirrorError, NeedsRecoveryError, StateError,
                                   UsageError, errno_for, exit_for_errno)

    for err, code in ((StateError("s"), 3), (BusyError("b"), 4), (UsageError("u"), 2),
                      (NeedsRecoveryError("r"), 5), (FusemirrorError("f"), 1)):
        n = errno_for(err)
        assert n > 0xFFFF and exit_for_errno(n) == code
    for n in (E.EPERM, E.EBUSY, E.EINVAL, E.EIO, E.ENOSPC, None):
        assert exit_for_errno(n) == 1
