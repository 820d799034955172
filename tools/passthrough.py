#!/usr/bin/env python3
"""The FUSE floor for tools/bench: one file ``image`` passed through to a backing file.

    .venv/bin/python tools/passthrough.py BACKING MOUNTPOINT [--inline-io-max BYTES]

No journal, no slaves, no state: what is left is the cost of FUSE plus pyfuse3 plus trio, built
the same way as fusemirror's daemon (``fusemirror/fs.py`` and ``fusemirror/engine.py``), so the
difference between this floor and ``fusemirror mount`` is fusemirror's own work:

* ``FileInfo(direct_io=True)``: every read and write reaches the daemon (fusemirror's default
  ``--cache direct``);
* a handle opened with ``O_DSYNC``/``O_SYNC`` is made synchronous here (``fdatasync`` after each
  write), because with direct_io the kernel sends no FSYNC after such a write;
* ``pread``/``pwrite`` of requests up to 128 KiB run inline on the trio loop, bigger ones in
  ``trio.to_thread`` (fusemirror's ``Engine._io`` and ``--inline-io-max``);
* ``fsync`` is implemented (``fdatasync`` in a worker thread, as ``Engine._flush_master``);
* the same mount options (pyfuse3's defaults plus fsname/subtype), and PR_SET_IO_FLUSHER.

Runs in the foreground until unmounted (``fusermount3 -u MOUNTPOINT``) or sent SIGTERM/SIGINT.
The bench waits for ``MOUNTPOINT/image`` to appear.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import stat
import sys
import time
from typing import Any

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
IMAGE = ROOT + 1
PR_SET_IO_FLUSHER = 57


def pwrite_all(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[n:]
        off += n


def pread_all(fd: int, size: int, off: int) -> bytes:
    data = os.pread(fd, size, off)
    if len(data) == size:
        return data
    parts, got = [data], len(data)
    while got < size:
        chunk = os.pread(fd, size - got, off + got)
        if not chunk:
            parts.append(bytes(size - got))
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class Passthrough(pyfuse3.Operations):
    """A directory with one fixed-size file ``image`` backed by ``backing``."""

    def __init__(self, backing: str, inline_io_max: int) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.inline_io_max = inline_io_max
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime_ns = time.time_ns()
        self.sync: dict[int, bool] = {}
        self.next_fh = 1

    async def _io(self, nbytes: int, fn: Any, *args: Any) -> Any:
        if nbytes <= self.inline_io_max:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT and name == b"image":
            return await self.getattr(IMAGE)
        if parent_inode == ROOT and name in (b".", b".."):
            return await self.getattr(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime_ns
        a.st_blksize = 4096
        a.entry_timeout = a.attr_timeout = 300
        if inode == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == IMAGE:
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = self.size
            a.st_blocks = self.size // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return a

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        if fields.update_size and (inode != IMAGE or attr.st_size != self.size):
            raise pyfuse3.FUSEError(errno.EPERM)
        return await self.getattr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"image", await self.getattr(IMAGE), 1)

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.size // 4096
        s.f_files = 2
        s.f_namemax = 255
        return s

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != IMAGE:
            raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT else errno.ENOENT)
        fh = self.next_fh
        self.next_fh += 1
        self.sync[fh] = bool(flags & (os.O_DSYNC | os.O_SYNC))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if off >= self.size or size <= 0:
            return b""
        size = min(size, self.size - off)
        try:
            return await self._io(size, pread_all, self.fd, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off >= self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        if off + len(buf) > self.size:
            buf = buf[:self.size - off]
        try:
            await self._io(len(buf), pwrite_all, self.fd, buf, off)
            if self.sync.get(fh):
                await trio.to_thread.run_sync(os.fdatasync, self.fd)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await trio.to_thread.run_sync(os.fdatasync, self.fd)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        self.sync.pop(fh, None)


SIGNALLED = False


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    global SIGNALLED
                    SIGNALLED = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--inline-io-max", type=int, default=131072)
    args = p.parse_args()
    ops = Passthrough(args.backing, args.inline_io_max)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    options = set(pyfuse3.default_options)
    options.add("fsname=passthrough")
    options.add("subtype=passthrough")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=SIGNALLED)  # after fusermount3 -u it is gone already
        os.close(ops.fd)


if __name__ == "__main__":
    sys.exit(main())
