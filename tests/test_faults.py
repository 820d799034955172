"""Errors are never swallowed: I/O errors of the master image and the journal reach the writer,
the extents stay logged, and the daemon keeps serving or stops cleanly."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from conftest import Mounted, is_mounted, run_fm, run_fsck, status

FAULTS = {"FUSEMIRROR_FAULT_INJECTION": "1"}


def _write(path: Path, off: int, data: bytes, sync: bool = False) -> None:
    fd = os.open(path, os.O_RDWR | (os.O_DSYNC if sync else 0))
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def _expect_oserror(code: int, fn, *args) -> None:
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, e.value


def test_master_write_eio_fails_the_write_and_keeps_the_extent(mounter) -> None:
    m: Mounted = mounter(size="16M", env=FAULTS)
    m.expect_errors("master write of .* failed", "stopping with .* still logged")
    _write(m.image, 0, b"a" * 4096)
    m.control("fault", spec="image.write=EIOx1")
    _expect_oserror(errno.EIO, _write, m.image, 3 << 20, b"b" * 4096)
    s = m.status()
    assert 3 in s["journal"]["extents"] and s["journal"]["pinned_extents"] == [3]
    assert s["needs_recovery"] is True and s["state"] == "ACTIVE"
    # the daemon keeps serving: other writes and reads work
    _write(m.image, 5 << 20, b"c" * 4096, sync=True)
    with open(m.image, "rb") as f:
        assert f.read(4096) == b"a" * 4096
    # the pinned extent is never retired, not even by a clean umount
    m.control("cleanup", idle=0)
    assert 3 in m.status()["journal"]["extents"]
    run_fm("umount", str(m.mnt))
    off = status(m.unit)
    assert off["needs_recovery"] is True and off["journal"]["extents"] == [3]
    r = run_fm("mount", str(m.unit), str(m.mnt), check=False)
    assert r.returncode == 5
    assert run_fsck(str(m.unit)).returncode == 1
    assert status(m.unit)["needs_recovery"] is False


def test_failed_fdatasync_is_never_followed_by_success(mounter) -> None:
    m: Mounted = mounter(size="16M", env=FAULTS)
    m.expect_errors("fdatasync of the master image failed", "is now ATTENTION",
                    "flush before unmount failed", "stopping with .* still logged",
                    "clean stop could not retire")
    fd = os.open(m.image, os.O_RDWR)
    try:
        os.pwrite(fd, b"d" * 8192, 1 << 20)
        m.control("fault", spec="image.flush=EIOx1")
        _expect_oserror(errno.EIO, os.fsync, fd)
        s = m.status()
        assert s["state"] == "ATTENTION" and "fdatasync" in s["attention_reason"]
        assert 1 in s["journal"]["pinned_extents"]
        # the fault is gone, but a later fsync must not report success
        _expect_oserror(errno.EIO, os.fsync, fd)
        _expect_oserror(errno.EIO, os.pwrite, fd, b"e" * 4096, 0)
        _expect_oserror(errno.EIO, os.pread, fd, 4096, 0)
    finally:
        os.close(fd)
    run_fm("umount", str(m.mnt))
    off = status(m.unit)
    assert off["state"] == "ATTENTION" and off["needs_recovery"] is True
    assert 1 in off["journal"]["extents"]
    r = run_fsck(str(m.unit))
    assert r.returncode == 1, r.stdout + r.stderr
    s = status(m.unit)
    assert s["state"] == "INACTIVE" and not s["needs_recovery"], \
        "after recovery the conditions hold again: ATTENTION -> INACTIVE (FIG. 4)"


def test_journal_eio_fails_the_write_and_sends_the_mirror_to_attention(mounter) -> None:
    m: Mounted = mounter(size="16M", env=FAULTS)
    m.expect_errors("journal write of record .* failed", "is now ATTENTION",
                    "stopping with .* still logged", "clean stop could not retire")
    _write(m.image, 0, b"f" * 4096)
    m.control("fault", spec="journal.write=EIOx1")
    _expect_oserror(errno.EIO, _write, m.image, 2 << 20, b"g" * 4096)
    s = m.status()
    assert s["state"] == "ATTENTION" and "journal" in s["attention_reason"]
    assert s["journal"]["broken"] is True
    _expect_oserror(errno.EIO, _write, m.image, 0, b"h" * 4096)
    with open(m.unit / "image", "rb") as f:
        f.seek(2 << 20)
        assert f.read(4096) == bytes(4096), "the image must not change without an intent"
    run_fm("umount", str(m.mnt))
    assert status(m.unit)["needs_recovery"] is True
    assert run_fsck(str(m.unit)).returncode == 1
    assert status(m.unit)["needs_recovery"] is False


def test_real_enospc_under_the_master_image(mounter, tmp_path: Path) -> None:
    """A sparse image on a full filesystem: the write gets ENOSPC, nothing reports success."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        unit = small / "u"
        run_fm("create", str(unit), "--size", "64M")
        run_fm("activate", str(unit))
        m: Mounted = mounter(unit)
        m.expect_errors("master write of .* failed", "stopping with .* still logged")
        chunk = os.urandom(1 << 20)
        fd = os.open(m.image, os.O_RDWR)
        written = 0
        try:
            with pytest.raises(OSError) as e:
                for i in range(64):
                    os.pwrite(fd, chunk, i << 20)
                    written += 1
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert 0 < written < 64
        s = m.status()
        assert s["journal"]["pinned_extents"], "the failed extent stays logged"
        assert s["state"] == "ACTIVE"
        with open(m.image, "rb") as f:
            for i in range(written):
                f.seek(i << 20)
                assert f.read(1 << 20) == chunk
        run_fm("umount", str(m.mnt))
        assert not is_mounted(m.mnt)
        assert status(unit)["needs_recovery"] is True
    finally:
        subprocess.run(["umount", str(small)])


def test_fault_injection_is_inert_without_the_switch(mounter) -> None:
    m: Mounted = mounter(size="4M")
    with pytest.raises(Exception) as e:
        m.control("fault", spec="image.write=EIO")
    assert "unknown control command" in str(e.value)
    _write(m.image, 0, b"x" * 4096, sync=True)


def test_a_failed_fracture_log_write_keeps_the_intents_and_is_written_again(
        tmp_path, agent_factory, secret_file, mounter) -> None:
    """The slave is down, so a clean-up must put what it missed in its fracture log before
    retiring the intents. The log's write fails once: the clean-up fails, the daemon lives (the
    error used to escape as an exception group and end it), the extents stay logged; the next
    clean-up writes the log again (it used to find its bits set in memory, write nothing and
    retire the intents on bits that never reached the disk). The slave, back, is caught up."""
    from conftest import wait_for
    from fusemirror import fracture
    from test_failover import streaming_to
    from test_replication import images_equal

    agent = agent_factory()
    run_fm("create", str(tmp_path / "m"), "--size", "16M", "--secret-file", str(secret_file))
    unit = tmp_path / "m"
    run_fm("add-slave", str(unit), agent.address("s1"), "--synchronized")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit, env=FAULTS)
    m.expect_errors("clean-up failed", "UNREACHABLE")
    wait_for(lambda: streaming_to(m, agent.address("s1")), what="the slave")
    agent.kill()
    wait_for(lambda: not m.status()["images"][1]["reachable"], what="the slave to be down")
    for e in (2, 7, 11):
        _write(m.image, e << 20, os.urandom(4096), sync=True)
    m.control("fault", spec="fracture.write=EIOx1")
    assert m.control("cleanup", idle=0)["retired"] == 0
    s = m.status()
    assert {2, 7, 11} <= set(s["journal"]["extents"])
    flog = next((unit / "fracture").iterdir())
    assert fracture.count(str(flog)) == 0
    assert m.control("cleanup", idle=0)["retired"] >= 3
    assert fracture.count(str(flog)) >= 3
    assert not {2, 7, 11} & set(m.status()["journal"]["extents"])
    agent.start()
    wait_for(lambda: streaming_to(m, agent.address("s1")), what="the catch-up", timeout=60)
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")
