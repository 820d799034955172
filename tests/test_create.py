"""`fusemirror create`: the unit it makes, and every bad input refused with nothing left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_fm, status
from fusemirror import journal
from fusemirror.mirrordb import MirrorDB
from fusemirror.sizes import format_size, parse_size
from fusemirror.errors import UsageError


def test_create_makes_a_complete_inactive_unit(tmp_path: Path) -> None:
    u = tmp_path / "m"
    r = run_fm("create", str(u), "--size", "1G", "--name", "db1", "--extent-size", "2M",
               "--block-size", "8K", "--write-policy", "async", "--json")
    info = json.loads(r.stdout)
    assert info["size"] == 1 << 30 and info["state"] == "INACTIVE"
    img = u / "image"
    st = img.stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks == 0, "image must be sparse"
    assert oct(st.st_mode & 0o777) == "0o600"
    db = MirrorDB.load(str(u))
    assert (db.name, db.state, db.extent_size, db.block_size) == ("db1", "INACTIVE", 2 << 20, 8192)
    assert db.mirror["write_policy"] == "async"
    assert db.self_image["role"] == "master"
    scan = journal.scan(str(u / "journal"), mirror_id=bytes.fromhex(db.mirror["id"]))
    assert scan.active == set() and scan.last_seq == 0
    # preallocated with zeros, not sparse
    jst = (u / "journal").stat()
    assert jst.st_size == (scan.header.nslots + 1) * journal.SLOT
    assert jst.st_blocks * 512 >= jst.st_size
    s = status(u)
    assert s["state"] == "INACTIVE" and s["needs_recovery"] is False
    assert s["journal"]["active_extents"] == 0
    assert s["write_policy"] == "async" and s["name"] == "db1"
    assert [i["role"] for i in s["images"]] == ["master"]


def test_create_into_empty_directory(tmp_path: Path) -> None:
    u = tmp_path / "empty"
    u.mkdir()
    run_fm("create", str(u), "--size", "4M")
    assert (u / "image").stat().st_size == 4 << 20


@pytest.mark.parametrize("args,needle", [
    (["--size", "0"], "greater than 0"),
    (["--size", "1000"], "multiple of the block"),
    (["--size", "10Q"], "bad size"),
    (["--size", "abc"], "bad size"),
    (["--size", "64M", "--extent-size", "3M"], "power-of-two multiple"),
    (["--size", "64M", "--extent-size", "2K"], "power-of-two multiple"),
    (["--size", "64M", "--block-size", "3000"], "power of two"),
    (["--size", "64M", "--write-policy", "maybe"], "maybe"),
    # more than the image's extents (and the default): a huge preallocated journal
    (["--size", "64M", "--activity-log-extents", "100000000"], "at most 1024"),
    # the secret is read before anything is created
    (["--size", "64M", "--secret-file", "/nonexistent/secret"], "cannot read secret file"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path: Path, args: list[str],
                                                  needle: str) -> None:
    u = tmp_path / "bad"
    r = run_fm("create", str(u), *args, check=False)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2
    assert not u.exists()
    assert os.listdir(tmp_path) == [], "nothing half-made may be left"


def test_refuses_existing_unit_and_nonempty_dir(tmp_path: Path) -> None:
    u = tmp_path / "m"
    run_fm("create", str(u), "--size", "4M")
    before = (u / "mirror.json").read_bytes()
    r = run_fm("create", str(u), "--size", "8M", check=False)
    assert r.returncode == 2 and "already a fusemirror unit" in r.stderr
    assert (u / "mirror.json").read_bytes() == before
    d = tmp_path / "full"
    d.mkdir()
    (d / "x").write_text("keep me")
    r = run_fm("create", str(d), "--size", "4M", check=False)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert sorted(os.listdir(d)) == ["x"]


def test_refuses_unwritable_parent(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    r = run_fm("create", str(tmp_path / "nope" / "m"), "--size", "4M", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
    # root ignores mode bits; a read-only bind of the parent is what stops root
    os.system(f"mount --bind {parent} {parent} && mount -o remount,bind,ro {parent}")
    try:
        r = run_fm("create", str(parent / "m"), "--size", "4M", check=False)
        assert r.returncode == 1 and "ro" in r.stderr and "Traceback" not in r.stderr
        assert os.listdir(parent) == []
    finally:
        os.system(f"umount {parent}")


def test_sizes() -> None:
    assert parse_size("4K") == 4096 and parse_size("4KiB") == 4096 and parse_size("4k") == 4096
    assert parse_size("1T") == 1 << 40 and parse_size("512") == 512
    with pytest.raises(UsageError):
        parse_size("4X")
    assert format_size(1 << 30) == "1GiB" and format_size(1536) == "1.5KiB"


def test_a_damaged_database_is_named_not_a_traceback(tmp_path: Path) -> None:
    """A mirror.json edited into nonsense (a wrong type where every reader relies on one) is
    refused on load with the file and the field named; `status` and `mount` exit 1 without a
    traceback and change nothing."""
    u = tmp_path / "m"
    run_fm("create", str(u), "--size", "64M")
    db = json.loads((u / "mirror.json").read_text())
    db["images"][0]["state"] = "HAPPY"
    (u / "mirror.json").write_text(json.dumps(db))
    before = (u / "mirror.json").read_bytes()
    for args in (("status", str(u)), ("mount", str(u), str(tmp_path / "mnt"))):
        (tmp_path / "mnt").mkdir(exist_ok=True)
        r = run_fm(*args, check=False)
        assert r.returncode == 1, (args, r.stderr)
        assert "mirror.json" in r.stderr and "state 'HAPPY'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert (u / "mirror.json").read_bytes() == before


def test_set_refuses_an_activity_log_larger_than_the_image(tmp_path: Path) -> None:
    """The database would fail validation on the next load (and a slave's journal is sized
    from it): `set` refuses, and the unit stays usable."""
    u = tmp_path / "m"
    run_fm("create", str(u), "--size", "2G")
    r = run_fm("set", str(u), "activity_log_extents=4096", check=False)
    assert r.returncode == 2 and "at most 2048" in r.stderr
    run_fm("set", str(u), "activity_log_extents=2048")
    assert status(u)["journal"]["activity_log_extents"] == 2048
