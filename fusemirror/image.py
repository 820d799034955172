"""Block I/O on an image file (``DIR/image``), master or slave.

Owns the file descriptor and nothing else: no journal, no replication. Every call is blocking
and is meant to run in a worker thread (or inline where the caller has measured it is cheap).
Errors are raised as they come (OSError with the kernel's errno); nothing here retries.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any, Iterator, Sequence

from . import faults

FILENAME = "image"
PREFETCH = 32   # scattered extents whose reads are started ahead of the one being copied

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2

log = logging.getLogger("fusemirror.image")


class Image:
    """A fixed-size image file opened for reading and writing."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def pwrite(self, off: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` at ``off``; a short write that makes no progress is ENOSPC."""
        faults.check("image.write")
        faults.before_write(self.path, self.fd, off, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            if n <= 0:
                raise OSError(28, "No space left on device (short write)")
            view = view[n:]
            off += n

    def pread(self, off: int, size: int) -> bytes:
        """Read ``size`` bytes at ``off`` (the image is fixed-size, so reads are whole)."""
        faults.check("image.read")
        data = os.pread(self.fd, size, off)
        if len(data) == size:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            chunk = os.pread(self.fd, size - got, off + got)
            if not chunk:
                parts.append(bytes(size - got))  # past EOF of a shorter file: zeros
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def prefetch(self, off: int, size: int) -> None:
        """Ask the kernel to start reading a range now (a hint; errors surface at pread).

        Copying scattered extents one pread at a time waits for the disk once per extent;
        naming the next ones ahead lets the disk work on them while this one is sent.
        """
        try:
            os.posix_fadvise(self.fd, off, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def read_ahead(self, extents: Sequence[int], extent_size: int,
                   window: int = PREFETCH) -> Iterator[int]:
        """Yield ``extents`` in order, the reads of the next ``window`` already started
        (fsck's copy and the daemon's catch-up of scattered extents)."""
        ahead = 0
        for i, e in enumerate(extents):
            while ahead < min(len(extents), i + window):
                self.prefetch(extents[ahead] * extent_size, extent_size)
                ahead += 1
            yield e

    def start_writeback(self) -> None:
        """Start writing the image's dirty pages to disk, without waiting for them.

        ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` over the whole file: not a durability point
        (no wait, no device cache flush, no metadata), and it does not consume a write-back
        error: the next ``fdatasync`` still reports any write the disk lost.
        """
        faults.check("image.writeback")
        if _libc.sync_file_range(self.fd, ctypes.c_int64(0), ctypes.c_int64(0),
                                 _SYNC_FILE_RANGE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def fdatasync(self) -> None:
        faults.check("image.flush")
        os.fdatasync(self.fd)
        faults.synced(self.path)


class WriteBehind:
    """Start an image's write-back every ``every`` bytes written (the master's and each
    slave's: ``--write-behind``; see ARCHITECTURE.md, "Write-behind").

    The kernel would otherwise keep a large write dirty in the page cache and the next
    fdatasync would write all of it while its caller waits (1 GiB: 1.7-3.0 s on the bench VM,
    0.01-0.03 s with write-back started every 4 MiB). Not a flush: durability still comes only
    from fdatasync, which also reports any write the disk lost. The caller counts with
    :meth:`due` on its write path (no system call) and runs :meth:`start` in a worker thread
    when it says so; one start runs at a time. Starts are counted in ``stats["writebacks"]``.
    """

    def __init__(self, image: Image, every: int, stats: dict[str, Any], what: str) -> None:
        self.image = image
        self.every = every
        self.stats = stats
        self.what = what
        self.unstarted = 0          # bytes written since write-back was last started
        self.running = False
        stats.setdefault("writebacks", 0)

    def due(self, nbytes: int) -> bool:
        """Count a write; True when a start is due now (then run :meth:`start`)."""
        self.unstarted += nbytes
        if not self.every or self.unstarted < self.every or self.running:
            return False
        self.running = True
        self.unstarted = 0
        return True

    def flushed(self) -> None:
        """An fdatasync begins: it writes back everything written so far."""
        self.unstarted = 0

    def start(self) -> None:
        """Blocking: start the write-back. A failure is logged; the next fdatasync reports
        any write it lost."""
        try:
            self.image.start_writeback()
            self.stats["writebacks"] += 1
        except OSError as e:
            log.error("%s: starting write-back failed: %s (the next fdatasync reports any "
                      "write it lost)", self.what, e)
        finally:
            self.running = False
