"""The FUSE face of a mounted mirror: a directory with ``image`` and a read-only ``status``.

pyfuse3 Operations only, and thin: every image read, write and fsync goes to
:class:`~fusemirror.engine.Engine`; this module holds no replication or journal logic. It maps
OSError from the engine to the same errno for the kernel, so no error is swallowed.

The namespace is fixed: ``image`` cannot be truncated, created, removed or renamed (EPERM), and
a write past its end gives ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any, Callable

import pyfuse3

from .engine import Engine

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
IMAGE = ROOT + 1
STATUS = ROOT + 2
NAMES = {b"image": IMAGE, b"status": STATUS}
XATTR_UNIT = b"user.fusemirror.unit"

# How the kernel caches the image (see docs/ARCHITECTURE.md for the figures behind the default):
#   direct     FOPEN_DIRECT_IO: every read and write reaches the daemon, no page cache in FUSE;
#              O_DSYNC/O_SYNC handles are made synchronous here (no FSYNC follows such writes)
#   page       page cache, write-through: write(2) returns after the daemon answered
#   writeback  page cache with FUSE writeback caching: write(2) returns before the daemon saw
#              the data; errors and the sync policy's promise hold at fsync only
CACHE_MODES = ("direct", "page", "writeback")


class _Handle:
    __slots__ = ("inode", "sync", "text")

    def __init__(self, inode: int, sync: bool, text: bytes = b"") -> None:
        self.inode = inode
        self.sync = sync
        self.text = text


class MirrorFS(pyfuse3.Operations):
    """Operations for one mounted mirror.

    Attributes:
        engine: the write path every image request goes to.
        cache: one of CACHE_MODES.
        status_text: callable returning the text of ``status`` (same as `fusemirror status`).
        unit_dir: reported through the ``user.fusemirror.unit`` xattr of the root, so
            `fusemirror umount MNT` finds the daemon's control socket.
        on_release: called when the last open handle of ``image`` is closed.
    """

    def __init__(self, engine: Engine, *, cache: str, status_text: Callable[[], str],
                 unit_dir: str, on_release: Callable[[], None] | None = None) -> None:
        super().__init__()
        assert cache in CACHE_MODES
        self.engine = engine
        self.cache = cache
        self.enable_writeback_cache = cache == "writeback"
        self.status_text = status_text
        self.unit_dir = unit_dir
        self.on_release = on_release
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.mtime_ns = time.time_ns()
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1

    # ---- namespace -------------------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT and name in NAMES:
            return await self.getattr(NAMES[name], ctx)
        if parent_inode == ROOT and name in (b".", b".."):
            return await self.getattr(ROOT, ctx)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.st_blksize = self.engine.db.block_size
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
            a.entry_timeout = a.attr_timeout = 300
        elif inode == IMAGE:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.engine.size
            a.st_blocks = self.engine.size // 512
            a.entry_timeout = a.attr_timeout = 300  # the size never changes
        elif inode == STATUS:
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = 0  # generated on open; read with direct I/O until EOF
            a.entry_timeout = 300
            a.attr_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if inode == IMAGE and fields.update_size and attr.st_size != self.engine.size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if inode != IMAGE and fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self.getattr(inode, ctx)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = [(b"image", IMAGE), (b"status", STATUS)]
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, await self.getattr(ino), i):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        bs = self.engine.db.block_size
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = self.engine.size // bs
        s.f_bfree = s.f_bavail = 0
        s.f_files = 3
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == ROOT and name == XATTR_UNIT:
            return os.fsencode(self.unit_dir)
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [XATTR_UNIT] if inode == ROOT else []

    async def _eperm(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mknod = mkdir = unlink = rmdir = rename = link = symlink = _eperm
    setxattr = removexattr = _eperm

    # ---- files -----------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode == STATUS:
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EACCES)
            text = self.status_text().encode()
            return pyfuse3.FileInfo(fh=self._new_handle(_Handle(STATUS, False, text)),
                                    direct_io=True, keep_cache=False)
        if inode != IMAGE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        if flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EPERM)
        sync = bool(flags & (os.O_DSYNC | os.O_SYNC)) and self.cache == "direct"
        fh = self._new_handle(_Handle(IMAGE, sync))
        self.engine.open_handles += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=self.cache == "direct", keep_cache=True)

    def _new_handle(self, h: _Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = h
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handles[fh]
        if h.inode == STATUS:
            return h.text[off:off + size]
        try:
            return await self.engine.read(off, size)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        if h.inode != IMAGE:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            n = await self.engine.write(off, buf)
            if h.sync:
                await self.engine.fsync()
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handles.get(fh)
        if h is not None and h.inode != IMAGE:
            return
        try:
            await self.engine.fsync()
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None and h.inode == IMAGE:
            self.engine.open_handles -= 1
            if self.engine.open_handles == 0 and self.on_release is not None:
                self.on_release()
