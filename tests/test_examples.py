"""The runnable examples in examples/, run for real as a user would (root: loop devices, mounts).

Each example tears down what it made (a trap on exit); the test checks that it did, and that
neither the daemon nor the agent logged a traceback or an ERROR line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import FM, FSCK, check_log, free_port, is_mounted

REPO = Path(__file__).resolve().parent.parent


def _loops_under(root: Path) -> list[str]:
    out = []
    for dev in os.listdir("/sys/block"):
        try:
            back = Path(f"/sys/block/{dev}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if back.startswith(str(root) + "/"):
            out.append(dev)
    return out


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(str(root) + "/")]


@pytest.fixture
def workdir() -> Path:
    """A work directory the postgres user can reach (pytest's tmp_path is private to root)."""
    w = Path(tempfile.mkdtemp(prefix="fm-example-", dir="/tmp"))
    w.chmod(0o755)
    yield w
    for mnt in reversed(_mounts_under(w)):       # only after a failure of the script's own trap
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    for dev in _loops_under(w):
        subprocess.run(["losetup", "-d", f"/dev/{dev}"], capture_output=True)
    shutil.rmtree(w, ignore_errors=True)


def test_postgresql_example(workdir: Path) -> None:
    """examples/postgresql.sh: PostgreSQL on a sync mirror, the daemon killed under pgbench load,
    fsck.fusemirror, then every committed transaction, pgbench's balance invariant, amcheck and
    master == slave."""
    w = workdir / "pg"
    env = {**os.environ, "FM": FM, "FSCK": FSCK, "W": str(w), "PORT": str(free_port())}
    r = subprocess.run(["bash", str(REPO / "examples" / "postgresql.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "first run: 2000 transactions committed" in out
    assert "needs recovery" in out                               # the crash left intents
    assert "master and slave images: IDENTICAL" in out
    assert "balances equal the sum of the history's deltas: t" in out
    assert "B-tree indexes checked, heap and index consistent" in out
    assert "s1: identical" in out                                # fusemirror verify
    seen = int(out.split(" rows in pgbench_history")[0].rsplit("(with ", 1)[1])
    rows = int(out.split("pgbench_history: ")[1].split(" rows")[0])
    assert seen >= 2500 and rows >= seen, (seen, rows)
    # everything it made is gone, and nothing logged a traceback or an error
    assert not _mounts_under(w) and not _loops_under(w)
    assert not is_mounted(w / "mnt")
    assert check_log(w / "m0", []) == []
    agent_log = (w / "agent.log").read_text(errors="replace")
    assert "Traceback" not in agent_log and " ERROR " not in agent_log


def test_failover_example(workdir: Path) -> None:
    """examples/failover.sh: SQLite on a sync mirror, the master daemon killed, the slave
    promoted with every committed row, the old master rejoined by extents, roles switched back,
    verify finds the images identical."""
    w = workdir / "fo"
    env = {**os.environ, "FM": FM, "W": str(w), "PORT_A": str(free_port()),
           "PORT_B": str(free_port())}
    r = subprocess.run(["bash", str(REPO / "examples" / "failover.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "integrity: ok rows: 500" in out
    assert "s1: identical" in out
    assert out.rstrip().endswith("== done")
    assert not _mounts_under(w) and not _loops_under(w)
    # the killed daemon's log is the one place an ERROR is allowed: none expected either
    for unit in (w / "a" / "m0", w / "b" / "s1"):
        assert check_log(unit, []) == [], unit
    for log in ("agent-a.log", "agent-b.log"):
        text = (w / log).read_text(errors="replace")
        assert "Traceback" not in text, log
