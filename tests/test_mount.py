"""Real mounts: the namespace, host I/O by mirror state, locking, umount, SIGTERM, non-root."""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (Mounted, as_user, is_mounted, kill9, lock_pid, pid_alive, run_fm,
                      run_fsck, status, wait_for)


def test_mount_shows_image_and_status(mounter) -> None:
    m: Mounted = mounter(size="64M")
    assert sorted(os.listdir(m.mnt)) == ["image", "status"]
    st = m.image.stat()
    assert st.st_size == 64 << 20 and oct(st.st_mode & 0o777) == "0o600"
    text = (m.mnt / "status").read_text()
    cli = run_fm("status", str(m.unit)).stdout
    assert text.splitlines()[0] == cli.splitlines()[0]
    assert "state:ACTIVE" in text
    s = m.status()
    assert s["running"] and s["mountpoint"] == str(m.mnt) and s["state"] == "ACTIVE"
    with pytest.raises(OSError) as e:
        open(m.mnt / "status", "w")
    assert e.value.errno in (errno.EACCES, errno.EPERM)


def test_data_round_trip_and_clean_umount(mounter) -> None:
    m: Mounted = mounter(size="64M")
    data = os.urandom(3 << 20)
    with open(m.image, "r+b") as f:
        f.seek(5 << 20)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(m.image, "rb") as f:
        f.seek(5 << 20)
        assert f.read(len(data)) == data
    s = m.status()
    assert s["journal"]["active_extents"] >= 3
    logged = set(s["journal"]["extents"])
    # extents 5-7 were written; a sequential stream also names up to eight ahead
    assert set(range(5, 8)) <= logged <= set(range(5, 8 + 8 + 1)), logged
    run_fm("umount", str(m.mnt))
    assert not is_mounted(m.mnt)
    off = status(m.unit)
    assert off["running"] is False and off["needs_recovery"] is False
    assert off["journal"]["active_extents"] == 0, "a clean umount leaves no active intent"
    with open(m.unit / "image", "rb") as f:
        f.seek(5 << 20)
        assert f.read(len(data)) == data


def test_host_io_only_while_active(mounter) -> None:
    m: Mounted = mounter(size="16M", activate=False)
    assert m.status()["state"] == "INACTIVE"
    fd = os.open(m.image, os.O_RDWR)
    try:
        for op in (lambda: os.pread(fd, 4096, 0), lambda: os.pwrite(fd, b"x" * 4096, 0)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EIO
        r = run_fm("activate", str(m.unit), "--json")
        assert json.loads(r.stdout)["state"] == "ACTIVE"
        assert os.pwrite(fd, b"y" * 4096, 0) == 4096
        assert os.pread(fd, 4096, 0) == b"y" * 4096
        run_fm("deactivate", str(m.unit))
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # the state is persistent: the mirror database says INACTIVE while mounted and after
    run_fm("umount", str(m.mnt))
    assert status(m.unit)["state"] == "INACTIVE"


def test_fixed_namespace_and_size(mounter) -> None:
    m: Mounted = mounter(size="16M")
    size = 16 << 20
    cases = [
        lambda: os.truncate(m.image, 1 << 20),
        lambda: os.truncate(m.image, size * 2),
        lambda: open(m.mnt / "new", "w"),
        lambda: os.unlink(m.image),
        lambda: os.rename(m.image, m.mnt / "other"),
        lambda: os.mkdir(m.mnt / "d"),
        lambda: os.symlink("image", m.mnt / "l"),
        lambda: os.link(m.image, m.mnt / "h"),
        lambda: open(m.image, "r+b").truncate(0),
        lambda: open(m.image, "w"),  # O_TRUNC
    ]
    for i, op in enumerate(cases):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EPERM, f"case {i}: {e.value}"
    assert m.image.stat().st_size == size
    fd = os.open(m.image, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"z" * 4096, size)
        assert e.value.errno == errno.ENOSPC
        # a write across the end is cut at the end (like a block device)
        assert os.pwrite(fd, b"w" * 8192, size - 4096) == 4096
        assert os.pread(fd, 8192, size - 4096) == b"w" * 4096
    finally:
        os.close(fd)
    # same size through truncate-to-same-size is allowed (tools do it)
    os.truncate(m.image, size)


def test_odirect_odsync_fsync(mounter) -> None:
    import mmap

    m: Mounted = mounter(size="16M")
    buf = mmap.mmap(-1, 1 << 20)
    payload = os.urandom(1 << 20)
    buf.write(payload)
    for flags in (os.O_DIRECT, os.O_DSYNC, os.O_SYNC, os.O_DIRECT | os.O_DSYNC, 0):
        fd = os.open(m.image, os.O_RDWR | flags)
        try:
            assert os.pwrite(fd, buf, 2 << 20) == 1 << 20
            os.fsync(fd)
            os.fdatasync(fd)
            rb = mmap.mmap(-1, 1 << 20)
            assert os.preadv(fd, [rb], 2 << 20) == 1 << 20
            assert bytes(rb) == payload
        finally:
            os.close(fd)
    assert m.status()["stats"]["flushes"] >= 10


def test_second_mount_is_refused(mounter, tmp_path: Path) -> None:
    m: Mounted = mounter(size="16M")
    other = tmp_path / "other"
    other.mkdir()
    r = run_fm("mount", str(m.unit), str(other), check=False)
    assert r.returncode == 4 and "in use" in r.stderr
    assert not is_mounted(other)
    # and a second unit cannot mount on a mountpoint in use
    run_fm("create", str(tmp_path / "u2"), "--size", "4M")
    r = run_fm("mount", str(tmp_path / "u2"), str(m.mnt), check=False)
    assert r.returncode == 3 and "already a mount point" in r.stderr


def test_mount_errors_are_one_line(tmp_path: Path, unit: Path) -> None:
    r = run_fm("mount", str(unit), str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_fm("mount", str(tmp_path / "nounit"), str(tmp_path), check=False)
    assert r.returncode == 2 and "no such directory" in r.stderr
    (tmp_path / "plain").mkdir()
    r = run_fm("mount", str(tmp_path / "plain"), str(tmp_path), check=False)
    assert r.returncode == 2 and "not a fusemirror unit" in r.stderr


def test_umount_refuses_while_open_then_succeeds(mounter) -> None:
    m: Mounted = mounter(size="16M")
    f = open(m.image, "r+b")
    try:
        f.write(b"a" * 4096)
        r = run_fm("umount", str(m.mnt), check=False)
        assert r.returncode == 4 and "open" in r.stderr
        assert is_mounted(m.mnt)
        r = run_fm("umount", "--force", str(m.mnt), check=False)
        assert r.returncode == 4 and "busy" in r.stderr, "the kernel refuses; never lazily"
        assert is_mounted(m.mnt)
    finally:
        f.close()
    run_fm("umount", str(m.mnt))
    assert not is_mounted(m.mnt)
    assert status(m.unit)["journal"]["active_extents"] == 0


def test_sigterm_unmounts_cleanly_and_waits_for_holder(mounter) -> None:
    m: Mounted = mounter(size="16M")
    pid = lock_pid(m.unit)
    assert pid is not None
    fd = os.open(m.image, os.O_RDWR)
    os.pwrite(fd, b"q" * 8192, 1 << 20)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: "still open" in (m.unit / "daemon.log").read_text(), what="log line")
    assert is_mounted(m.mnt) and pid_alive(pid)
    assert os.pread(fd, 8192, 1 << 20) == b"q" * 8192, "keeps serving while held"
    os.close(fd)
    wait_for(lambda: not pid_alive(pid), what="daemon exit after release")
    assert not is_mounted(m.mnt)
    s = status(m.unit)
    assert s["journal"]["active_extents"] == 0 and not s["needs_recovery"]
    # and without a holder, SIGTERM unmounts at once
    m2 = mounter(m.unit, mnt=m.mnt)
    pid2 = lock_pid(m2.unit)
    os.kill(pid2, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid2), what="daemon exit")
    assert not is_mounted(m.mnt)


def test_kill9_needs_recovery_then_fsck(mounter) -> None:
    m: Mounted = mounter(size="32M")
    with open(m.image, "r+b") as f:
        for ext in (2, 7, 30):
            f.seek(ext << 20)
            f.write(b"k" * 4096)
        f.flush()
        os.fsync(f.fileno())
    kill9(m.unit, m.mnt)
    s = status(m.unit)
    assert s["needs_recovery"] is True and s["running"] is False
    assert s["journal"]["active_extents"] == 3 and s["journal"]["extents"] == [2, 7, 30]
    text = run_fm("status", str(m.unit)).stdout
    assert "needs recovery" in text and "fsck.fusemirror" in text
    r = run_fm("mount", str(m.unit), str(m.mnt), check=False)
    assert r.returncode == 5 and f"fsck.fusemirror {m.unit}" in r.stderr
    assert not is_mounted(m.mnt)
    r = run_fsck("-n", str(m.unit))
    assert r.returncode == 4, r.stdout + r.stderr
    assert status(m.unit)["needs_recovery"] is True, "-n changes nothing"
    r = run_fsck(str(m.unit))
    assert r.returncode == 1 and "retired 3" in r.stdout, r.stdout + r.stderr
    r = run_fsck(str(m.unit))
    assert r.returncode == 0, r.stdout
    assert status(m.unit)["needs_recovery"] is False
    with open(m.unit / "image", "rb") as f:
        f.seek(7 << 20)
        assert f.read(4096) == b"k" * 4096
    mounter(m.unit, mnt=m.mnt)
    assert m.status()["running"]


NONROOT = "fmtest"


@pytest.fixture
def nonroot_user() -> str:
    try:
        pwd.getpwnam(NONROOT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        NONROOT], check=True)
    # /dev/fuse is 0600 on these machines; workstations have 0666
    os.chmod("/dev/fuse", 0o666)
    return NONROOT


def test_nonroot_owner_can_mount_and_umount(nonroot_user: str, tmp_path: Path) -> None:
    import tempfile

    opened = _open_path_to(Path(sys.executable).parent)
    base = Path(tempfile.mkdtemp(prefix="fm-nonroot-"))
    os.chmod(base, 0o755)
    pw = pwd.getpwnam(nonroot_user)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    unit, mnt = base / "u", base / "mnt"
    try:
        def as_u(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return run_fm(*args, user=nonroot_user, check=check)

        as_u("create", str(unit), "--size", "8M")
        as_u("activate", str(unit))
        subprocess.run(as_user(nonroot_user, ["mkdir", str(mnt)]), check=True)
        as_u("mount", str(unit), str(mnt))
        assert is_mounted(mnt)
        w = subprocess.run(as_user(nonroot_user, ["dd", "if=/dev/urandom", f"of={mnt}/image",
                                                  "bs=64k", "count=16", "conv=notrunc,fsync"]),
                           capture_output=True, text=True)
        assert w.returncode == 0, w.stderr
        # without allow_other, even root cannot open the mount
        with pytest.raises(PermissionError):
            os.stat(mnt / "image")
        s = json.loads(as_u("status", str(unit), "--json").stdout)
        assert s["running"] and 0 in s["journal"]["extents"]  # (and its read-ahead window)
        as_u("umount", str(mnt))
        assert not is_mounted(mnt)
        assert status(unit)["journal"]["active_extents"] == 0
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)])
            subprocess.run(["fusermount3", "-uz", str(mnt)])
        pid = lock_pid(unit) if unit.exists() else None
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(base)])
        for d, mode in opened:
            os.chmod(d, mode)


def _open_path_to(d: Path) -> list[tuple[Path, int]]:
    """Let other users traverse to the venv (a clone under /root is 0700); undone after."""
    opened = []
    for p in [d, *d.parents]:
        mode = p.stat().st_mode & 0o7777
        if not mode & 0o001:
            os.chmod(p, mode | 0o001)
            opened.append((p, mode))
    return opened
