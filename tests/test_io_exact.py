"""Reads and writes of any size and alignment are exact: a shadow-file property test, and
the real workloads people put on the image (ext4 over a loop device, SQLite, fio with AIO)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Mounted, is_mounted, run_fm, status

SIZE = 8 << 20  # 8 extents of 1 MiB


@pytest.fixture(scope="module")
def shadow_mount(tmp_path_factory):
    """One mount for the whole property test (hypothesis runs many examples in it)."""
    from conftest import check_log, teardown_mount

    base = tmp_path_factory.mktemp("shadow")
    unit, mnt = base / "u", base / "mnt"
    mnt.mkdir()
    run_fm("create", str(unit), "--size", str(SIZE), "--extent-size", "64K",
           "--activity-log-extents", "16")
    run_fm("activate", str(unit))
    run_fm("mount", str(unit), str(mnt))
    shadow = bytearray(SIZE)
    try:
        yield Mounted(unit, mnt), shadow
    finally:
        teardown_mount(unit, mnt)
    assert check_log(unit, []) == []


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "fsync"]),
        st.integers(0, SIZE + 70000),            # offset, sometimes past the end
        st.integers(1, 300_000),                  # length: unaligned, extent-crossing
        st.sampled_from([0, os.O_DIRECT, os.O_DSYNC]),
        st.binary(min_size=1, max_size=64),       # pattern
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_random_io_matches_shadow(shadow_mount, seq) -> None:
    m, shadow = shadow_mount
    for op, off, length, flags, pat in seq:
        if flags == os.O_DIRECT:  # O_DIRECT needs aligned buffers, offsets and sizes
            off -= off % 4096
            length = max(4096, length - length % 4096)
        fd = os.open(m.image, os.O_RDWR | flags)
        try:
            if op == "write":
                data = (pat * (length // len(pat) + 1))[:length]
                if flags == os.O_DIRECT:
                    import mmap

                    buf = mmap.mmap(-1, length)
                    buf.write(data)
                    data_obj = buf
                else:
                    data_obj = data
                if off >= SIZE:
                    with pytest.raises(OSError):
                        os.pwrite(fd, data_obj, off)
                    continue
                n = os.pwrite(fd, data_obj, off)
                assert n == min(length, SIZE - off)
                shadow[off:off + n] = data[:n]
            elif op == "read":
                if flags == os.O_DIRECT:
                    import mmap

                    buf = mmap.mmap(-1, length)
                    n = os.preadv(fd, [buf], off)
                    got = bytes(buf[:n])
                else:
                    got = os.pread(fd, length, off)
                assert got == bytes(shadow[off:off + length])
            else:
                os.fsync(fd)
        finally:
            os.close(fd)
    # the whole image, and the journal bound holds throughout
    with open(m.image, "rb") as f:
        assert f.read() == bytes(shadow)
    assert m.status()["journal"]["active_extents"] <= 16 + 5


def test_ext4_and_sqlite_on_loop_device(mounter, tmp_path: Path) -> None:
    m: Mounted = mounter(size="256M")
    fsmnt = tmp_path / "ext4"
    fsmnt.mkdir()
    loop = subprocess.run(["losetup", "-f", "--show", str(m.image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
        subprocess.run(["mount", loop, str(fsmnt)], check=True)
        try:
            db = sqlite3.connect(fsmnt / "t.db", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
            for i in range(1000):
                db.execute("BEGIN")
                db.execute("INSERT INTO t (i, v) VALUES (?, ?)", (i, os.urandom(200)))
                db.execute("COMMIT")
            db.close()
        finally:
            subprocess.run(["umount", str(fsmnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
    run_fm("umount", str(m.mnt))
    assert not is_mounted(m.mnt)
    assert status(m.unit)["journal"]["active_extents"] == 0
    m2 = mounter(m.unit, mnt=m.mnt)
    loop = subprocess.run(["losetup", "-f", "--show", str(m2.image)], capture_output=True,
                          text=True, check=True).stdout.strip()
    try:
        subprocess.run(["fsck.ext4", "-n", "-f", loop], check=True, capture_output=True)
        subprocess.run(["mount", loop, str(fsmnt)], check=True)
        try:
            db = sqlite3.connect(fsmnt / "t.db")
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
            db.close()
        finally:
            subprocess.run(["umount", str(fsmnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_group_commit_under_aio(mounter) -> None:
    """Concurrent new intents share journal writes (fio libaio, O_DIRECT, iodepth 16)."""
    m: Mounted = mounter(size="512M", create_args=("--extent-size", "64K",
                                                   "--activity-log-extents", "8192"))
    r = subprocess.run(["fio", "--name=gc", f"--filename={m.image}", "--rw=randwrite",
                        "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=16",
                        "--size=512M", "--io_size=16M", "--randrepeat=0", "--norandommap",
                        "--output-format=terse"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = m.status()
    misses = s["stats"]["intent_misses"]
    records = s["journal"]["records_written"]
    assert s["stats"]["writes"] == 4096
    assert misses > 1000, "most 4K writes to 8192 extents of 64K start a new intent"
    assert records < misses * 0.8, f"{records} journal writes for {misses} new intents"
