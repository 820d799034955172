"""Fracture logs: per slave, the durable set of extents that slave has missed.

One bitmap file per slave image in ``DIR/fracture/<image id>``, a bit per extent, so memory and
disk stay bounded (128 KiB for a 1 TiB image with 1 MiB extents) whatever the slave misses.
:meth:`FractureLog.add` returns only once the bits are durable: the master retires an intent
only after the extent is in every lagging slave's fracture log.

On-disk format, version 1: a 4096-byte header (magic ``b"FMFRAC01"``, version, extent count,
extent size, image id, xxh3_64 of the header at byte 4088) followed by the bitmap, extent ``e``
being bit ``e % 8`` of byte ``e // 8``. Setting bits is monotonic, so a torn page write can only
lose bits whose ``add`` had not returned yet; a torn clear leaves bits set (an extra copy).
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Iterable, Iterator

import xxhash

from . import faults
from .errors import CorruptError
from .mirrordb import fsync_dir

MAGIC = b"FMFRAC01"
VERSION = 1
PAGE = 4096
_HDR = struct.Struct("<8sIQQ32s")


class FractureLog:
    """A bitmap of extents, loaded in memory and written through with ``fdatasync``."""

    def __init__(self, path: str, nextents: int, extent_size: int, image_id: str) -> None:
        self.path = path
        self.nextents = nextents
        nbytes = -(-nextents // 8)
        self._bits = bytearray(nbytes)
        self.count = 0
        # add (a retire's secure) and remove (a catch-up's end) run in worker threads and may
        # overlap: one update at a time, so the count and the pages written stay consistent
        self._lock = threading.Lock()
        if os.path.exists(path):
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            head = os.pread(self.fd, PAGE, 0)
            magic, ver, n, es, iid = _HDR.unpack_from(head, 0) if len(head) == PAGE else \
                (b"", 0, 0, 0, b"")
            if magic != MAGIC or ver != VERSION or n != nextents or es != extent_size or \
                    struct.unpack_from("<Q", head, PAGE - 8)[0] != _sum(head):
                os.close(self.fd)
                raise CorruptError(f"{path}: not a fracture log of this mirror")
            data = os.pread(self.fd, nbytes, PAGE)
            self._bits[:len(data)] = data
            self.count = sum(bin(b).count("1") for b in self._bits if b)
        else:
            tmp = path + ".tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            head = bytearray(PAGE)
            _HDR.pack_into(head, 0, MAGIC, VERSION, nextents, extent_size,
                           image_id.encode()[:32])
            struct.pack_into("<Q", head, PAGE - 8, _sum(head))
            os.pwrite(fd, bytes(head), 0)
            os.ftruncate(fd, PAGE + -(-nbytes // PAGE) * PAGE)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __contains__(self, e: int) -> bool:
        return bool(self._bits[e >> 3] & (1 << (e & 7)))

    def __len__(self) -> int:
        return self.count

    def extents(self) -> Iterator[int]:
        """The extents in the log, ascending."""
        bits = self._bits
        for i, b in enumerate(bits):
            if b:
                for k in range(8):
                    if b & (1 << k):
                        yield i * 8 + k

    def add(self, extents: Iterable[int]) -> int:
        """Set the bits of ``extents`` durably; returns how many were new."""
        return self._update(extents, True)

    def remove(self, extents: Iterable[int]) -> int:
        """Clear the bits of ``extents`` durably (after the slave has them)."""
        return self._update(extents, False)

    def clear(self) -> None:
        self.remove(list(self.extents()))

    def _update(self, extents: Iterable[int], value: bool) -> int:
        with self._lock:
            return self._update_locked(extents, value)

    def _update_locked(self, extents: Iterable[int], value: bool) -> int:
        """Change a copy of the bitmap, write its pages, ``fdatasync``; only then is the copy
        the log's. A failed write or sync leaves the log as it was, so the same update asked
        again writes its pages again (it would otherwise find its bits set, return 0 and let
        an intent retire on bits that never reached the disk)."""
        bits = None
        pages: set[int] = set()
        changed = 0
        for e in extents:
            if not 0 <= e < self.nextents:
                raise ValueError(f"extent {e} out of range")
            i, m = e >> 3, 1 << (e & 7)
            if bool(self._bits[i] & m) != value:
                if bits is None:
                    bits = bytearray(self._bits)
                if bool(bits[i] & m) != value:
                    bits[i] ^= m
                    changed += 1
                    pages.add(i // PAGE)
        if bits is None or not changed:
            return 0
        for p in sorted(pages):
            chunk = bytes(bits[p * PAGE:(p + 1) * PAGE])
            faults.check("fracture.write")
            faults.before_write(self.path, self.fd, PAGE + p * PAGE, len(chunk))
            n = os.pwrite(self.fd, chunk, PAGE + p * PAGE)
            if n != len(chunk):
                raise OSError(5, "short write to the fracture log")
        os.fdatasync(self.fd)
        faults.synced(self.path)
        self._bits = bits
        self.count += changed if value else -changed
        return changed


def _sum(head: bytes | bytearray) -> int:
    return xxhash.xxh3_64_intdigest(bytes(head[:PAGE - 8]))


def count(path: str) -> int:
    """Extents in the fracture log at ``path`` (0 if there is none), read-only."""
    try:
        with open(path, "rb") as f:
            f.seek(PAGE)
            data = f.read()
    except FileNotFoundError:
        return 0
    return sum(bin(b).count("1") for b in data if b)
