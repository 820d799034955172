"""The unit directory: its fixed file names, its creation, and its lock.

A unit directory holds one image of one mirror (SPEC §1): ``image``, ``journal``,
``mirror.json``, ``fracture/`` (per-slave fracture logs), ``lock``, ``control.sock`` while a
process serves it, and ``daemon.log``. A master's and a slave's unit have the same layout, so
any unit can be promoted. Exactly one process holds a unit's lock (``flock``) at a time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

from . import journal as journal_mod
from .errors import BusyError, FusemirrorError, UsageError
from .mirrordb import MirrorDB, fsync_dir

log = logging.getLogger(__name__)

IMAGE = "image"
JOURNAL = journal_mod.FILENAME
DB = MirrorDB.FILENAME
LOCK = "lock"
CONTROL = "control.sock"
LOG = "daemon.log"
FRACTURE_DIR = "fracture"


@dataclass
class UnitPaths:
    dir: str

    @property
    def image(self) -> str:
        return os.path.join(self.dir, IMAGE)

    @property
    def journal(self) -> str:
        return os.path.join(self.dir, JOURNAL)

    @property
    def db(self) -> str:
        return os.path.join(self.dir, DB)

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, LOCK)

    @property
    def control(self) -> str:
        return os.path.join(self.dir, CONTROL)

    @property
    def log(self) -> str:
        return os.path.join(self.dir, LOG)

    @property
    def fracture(self) -> str:
        return os.path.join(self.dir, FRACTURE_DIR)


def is_unit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, DB))


def require_unit(path: str) -> UnitPaths:
    """The unit at ``path``, or a clear error saying what ``path`` is instead."""
    p = os.path.abspath(path)
    if not os.path.exists(p):
        raise UsageError(f"{path}: no such directory")
    if not os.path.isdir(p):
        raise UsageError(f"{path}: not a directory")
    if not is_unit(p):
        raise UsageError(f"{path}: not a fusemirror unit directory (no {DB}); "
                         "create one with `fusemirror create DIR --size SIZE`")
    return UnitPaths(p)


class UnitLock:
    """The unit's exclusive ``flock``, held for the life of a daemon, agent or admin command.

    The lock file records the holder's pid and role so a refusal can name them.
    """

    def __init__(self, paths: UnitPaths, role: str) -> None:
        self.paths = paths
        self.role = role
        self.fd = -1

    def acquire(self) -> "UnitLock":
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise BusyError(f"{self.paths.dir} is in use{holder}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "UnitLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return ""
    if len(text) >= 2:
        return f" by pid {text[0]} ({text[1]})"
    return ""


def lock_holder(paths: UnitPaths) -> str | None:
    """Who holds the lock now ("pid role"), or None if nobody does."""
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd).replace(" by pid ", "").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def create_unit(path: str, *, size: int, block_size: int, extent_size: int,
                write_policy: str, name: str | None,
                activity_log_extents: int | None = None) -> MirrorDB:
    """Create a master unit directory with a sparse image, a journal and the mirror database.

    Everything is built in a hidden sibling directory and renamed into place at the end, so a
    failure (or a crash) leaves nothing half-made at ``path``. ``path`` may be an empty
    directory, which the rename replaces.
    """
    validate_geometry(size, block_size, extent_size)
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise UsageError(f"{path}: parent directory {parent} does not exist")
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise UsageError(f"{path}: exists and is not a directory")
        if is_unit(target):
            raise UsageError(f"{path}: is already a fusemirror unit")
        if os.listdir(target):
            raise UsageError(f"{path}: directory is not empty")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FusemirrorError(f"{path}: cannot create here: parent {parent} is not writable")
    name = name or os.path.basename(target)
    validate_name(name)
    db = MirrorDB.new(name=name, size=size, block_size=block_size, extent_size=extent_size,
                      write_policy=write_policy, image_name=f"{socket.gethostname()}:{target}")
    if activity_log_extents is not None:
        db.set_mirror_attr("activity_log_extents", activity_log_extents)
    _build_unit(target, db, path)
    return db


def create_slave_unit(path: str, db: MirrorDB) -> None:
    """Create a slave unit (same layout as a master) from the master's database.

    ``db["self"]`` must name a slave image of that database.
    """
    target = os.path.abspath(path)
    if db.self_image["role"] != "slave":
        raise UsageError("a slave unit must be created from a database naming a slave image")
    validate_geometry(db.size, db.block_size, db.extent_size)
    if os.path.lexists(target):
        raise UsageError(f"{path}: exists")
    _build_unit(target, db, path)


def _build_unit(target: str, db: MirrorDB, shown: str) -> None:
    """Build the unit in a hidden sibling and rename it into place (nothing half-made)."""
    parent = os.path.dirname(target)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.creating-", dir=parent)
    except OSError as e:
        raise FusemirrorError(f"{shown}: cannot create here: {e.strerror}") from None
    try:
        os.chmod(tmp, 0o700)
        tp = UnitPaths(tmp)
        fd = os.open(tp.image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, db.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        nslots = journal_slots_for(db.mirror["activity_log_extents"])
        journal_mod.create(tp.journal, mirror_id=bytes.fromhex(db.mirror["id"]),
                           extent_size=db.extent_size,
                           nextents=-(-db.size // db.extent_size), nslots=nslots)
        os.mkdir(tp.fracture, 0o700)
        db.save(tmp)
        fsync_dir(tmp)
        os.rename(tmp, target)   # replaces an empty directory atomically
        fsync_dir(parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "no space left" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise FusemirrorError(f"{shown}: create failed: {what}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def journal_slots_for(activity_log_extents: int) -> int:
    """Ring slots for a journal that can always recover ``activity_log_extents`` (with room
    for one request's worth of extents beyond the bound)."""
    need = activity_log_extents + 2048
    nslots = journal_mod.DEFAULT_SLOTS
    while journal_mod.max_active_for(nslots) < need:
        nslots *= 2
    return nslots


def check_activity_log(paths: UnitPaths, pairs: list[tuple[str, str]]) -> None:
    """Refuse an activity_log_extents the unit's journal cannot always recover."""
    for k, v in pairs:
        if k != "activity_log_extents" or not v.strip().isdigit():
            continue
        with open(paths.journal, "rb") as f:
            nslots = journal_mod.Header.unpack(f.read(journal_mod.SLOT), paths.journal).nslots
        cap = journal_mod.max_active_for(nslots) - 2048
        if int(v) > cap:
            raise UsageError(f"activity_log_extents={v} is more than this unit's journal "
                             f"({nslots} slots) can hold: at most {cap}; create the mirror "
                             "with --activity-log-extents to get a bigger journal")


def validate_geometry(size: int, block_size: int, extent_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size} must be a power of two >= 512")
    if size <= 0:
        raise UsageError("size must be greater than 0")
    if size % block_size:
        raise UsageError(f"size {size} is not a multiple of the block size {block_size}")
    if extent_size < block_size or extent_size % block_size or \
            (extent_size // block_size) & (extent_size // block_size - 1):
        raise UsageError(f"extent size {extent_size} must be a power-of-two multiple of the "
                         f"block size {block_size}")
    if -(-size // extent_size) > journal_mod.MAX_EXTENTS:
        raise UsageError(f"size {size} has more than 2^32 extents of {extent_size} bytes; "
                         "use a bigger extent size")


def validate_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or any(c.isspace() for c in name) \
            or len(name) > 128:
        raise UsageError(f"bad name {name!r}: use 1-128 characters without '/' or spaces")
