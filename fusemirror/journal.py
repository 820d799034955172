"""The write-intent journal: which extents may differ between the master and its slaves.

This module owns the journal's on-disk format, its recovery scan, and the group-commit writer.
It knows extents only as numbers; it never touches an image, and it never retries a failed
write into success (a failed journal write breaks the journal for good: the caller must stop
accepting writes until ``fsck.fusemirror`` has run).

On-disk format, version 1
-------------------------
The file is ``1 + nslots`` slots of 4096 bytes, preallocated with zeros (written, not
``fallocate``d, so an ``O_DSYNC`` write never converts unwritten extents). All integers are
little-endian.

Slot 0, the header (written once, at create or reset)::

    0   8s  magic b"FMJRNL01"
    8   I   version (1)
    12  I   slot size (4096)
    16  I   nslots, ring slots after the header
    20  I   reserved (0)
    24  Q   extent size in bytes
    32  Q   number of extents in the image
    40  16s mirror id
    56  16s journal id (random per create/reset; every record carries it)
    4088 Q  xxh3_64 of bytes 0..4087

Slots 1..nslots, the ring: the record with sequence number ``seq`` (from 1) lives in slot
``1 + seq % nslots``. One record per journal write; at most one write is in flight::

    0   4s  magic b"FMJR"
    4   H   version (1)
    6   H   flags (0)
    8   16s journal id
    24  Q   seq
    32  Q   ckpt_start: seq of the record where this record's checkpoint began
    40  I   ckpt_total: number of extents in that checkpoint
    44  I   ckpt_offset: index of this record's first checkpoint entry
    48  H   n_add   extents activated by this record
    50  H   n_ret   extents retired by this record
    52  H   n_ckpt  checkpoint entries carried by this record
    54  H   reserved (0)
    56  Q   wall-clock time in ns (for humans only)
    64  I*  n_add + n_ret + n_ckpt extent numbers (u32), in that order
    4088 Q  xxh3_64 of bytes 0..4087

Every record carries the intents it adds and retires, and a slice of a *checkpoint*: the sorted
active set as it stood just before the record where the checkpoint began. Checkpoints follow
each other without a gap, so whatever the ring has overwritten, it still holds a complete
checkpoint (the writer keeps checkpoint slices big enough for that, see
:attr:`Journal.max_active`), and the active set is that checkpoint plus the deltas after it.
A writer that opens a journal whose last checkpoint is incomplete carries on with that
checkpoint (the scan rebuilds its entries) rather than begin a new one: abandoned checkpoints
would push the newest complete one further back than the ring keeps.

Recovery scan rules
-------------------
* The newest valid record (highest seq, ``b``) ends the log. Every record from
  ``max(1, b - nslots + 2)`` to ``b`` must be present and valid: a missing or damaged one is
  corruption ("an invalid slot followed by valid slots with higher sequence numbers").
* The slot after ``b`` (where the next record would go) may hold anything: a torn write there is
  the expected result of a crash and is reported as ``torn_tail``.
* Slots never written (after ``b`` in a ring that has not wrapped) must be zero.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import trio
import xxhash

from . import faults
from .errors import CorruptError
from .mirrordb import atomic_write, fsync_dir

log = logging.getLogger(__name__)

SLOT = 4096
VERSION = 1
HEADER_MAGIC = b"FMJRNL01"
RECORD_MAGIC = b"FMJR"
DEFAULT_SLOTS = 256
FILENAME = "journal"

_HEADER = struct.Struct("<8sIIIIQQ16s16s")
_RECORD = struct.Struct("<4sHH16sQQIIHHHHQ")
_SUM = struct.Struct("<Q")
_SUM_OFF = SLOT - 8
PAYLOAD_ENTRIES = (_SUM_OFF - _RECORD.size) // 4  # 1006
# Deltas take at most half a record so every record carries a checkpoint slice of at least
# CKPT_MIN entries; that is what bounds the length of a checkpoint.
MAX_DELTA = PAYLOAD_ENTRIES // 2  # 503
CKPT_MIN = PAYLOAD_ENTRIES - MAX_DELTA
_ZERO = bytes(SLOT)
MAX_EXTENTS = 1 << 32


def _checksum(buf: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(bytes(buf[:_SUM_OFF]))


def max_active_for(nslots: int) -> int:
    """The largest active set a journal of ``nslots`` ring slots can always recover.

    A checkpoint of A extents spans at most ceil(A / CKPT_MIN) records; the newest complete one
    starts at most two checkpoint lengths back, and the ring keeps nslots - 1 records.
    """
    return max(0, (nslots - 4) // 2) * CKPT_MIN


@dataclass
class Header:
    nslots: int
    extent_size: int
    nextents: int
    mirror_id: bytes
    journal_id: bytes

    def pack(self) -> bytes:
        buf = bytearray(SLOT)
        _HEADER.pack_into(buf, 0, HEADER_MAGIC, VERSION, SLOT, self.nslots, 0,
                          self.extent_size, self.nextents, self.mirror_id, self.journal_id)
        _SUM.pack_into(buf, _SUM_OFF, _checksum(buf))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes, path: str) -> "Header":
        if len(buf) < SLOT:
            raise CorruptError(f"{path}: journal is truncated (no complete header)")
        magic, version, slot, nslots, _r, ext, next_, mid, jid = _HEADER.unpack_from(buf, 0)
        if magic != HEADER_MAGIC:
            raise CorruptError(f"{path}: not a fusemirror journal (bad magic)")
        if _SUM.unpack_from(buf, _SUM_OFF)[0] != _checksum(buf):
            raise CorruptError(f"{path}: journal header checksum mismatch")
        if version != VERSION or slot != SLOT:
            raise CorruptError(f"{path}: journal version {version} (slot {slot}) is not "
                               f"supported (this fusemirror reads version {VERSION})")
        if nslots < 8:
            raise CorruptError(f"{path}: journal header names {nslots} slots")
        return cls(nslots, ext, next_, mid, jid)


@dataclass
class Record:
    seq: int
    ckpt_start: int
    ckpt_total: int
    ckpt_offset: int
    adds: tuple[int, ...]
    rets: tuple[int, ...]
    ckpt: tuple[int, ...]
    time_ns: int = 0

    def pack(self, journal_id: bytes) -> bytes:
        n = len(self.adds) + len(self.rets) + len(self.ckpt)
        assert n <= PAYLOAD_ENTRIES
        buf = bytearray(SLOT)
        _RECORD.pack_into(buf, 0, RECORD_MAGIC, VERSION, 0, journal_id, self.seq,
                          self.ckpt_start, self.ckpt_total, self.ckpt_offset, len(self.adds),
                          len(self.rets), len(self.ckpt), 0, self.time_ns)
        struct.pack_into(f"<{n}I", buf, _RECORD.size, *self.adds, *self.rets, *self.ckpt)
        _SUM.pack_into(buf, _SUM_OFF, _checksum(buf))
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes, journal_id: bytes) -> "Record | None":
        """The record in ``buf``, or None if it is not a valid record of this journal."""
        (magic, version, _flags, jid, seq, cstart, ctotal, coff, nadd, nret, nck, _r,
         tns) = _RECORD.unpack_from(buf, 0)
        if magic != RECORD_MAGIC or version != VERSION or jid != journal_id:
            return None
        if _SUM.unpack_from(buf, _SUM_OFF)[0] != _checksum(buf):
            return None
        n = nadd + nret + nck
        if n > PAYLOAD_ENTRIES or seq < 1 or cstart > seq or cstart < 1:
            return None
        ents = struct.unpack_from(f"<{n}I", buf, _RECORD.size)
        return cls(seq, cstart, ctotal, coff, ents[:nadd], ents[nadd:nadd + nret],
                   ents[nadd + nret:], tns)


@dataclass
class ScanResult:
    """What the recovery scan found: the active set and how the log ended."""

    header: Header
    active: set[int]
    last_seq: int
    records: int
    torn_tail: bool
    # The checkpoint the last record belongs to, if it is incomplete: (its first seq, its sorted
    # entries, how many of them the log already holds). The next writer completes it.
    open_checkpoint: tuple[int, list[int], int] | None = None

    @property
    def needs_recovery(self) -> bool:
        return bool(self.active)


def create(path: str, *, mirror_id: bytes, extent_size: int, nextents: int,
           nslots: int = DEFAULT_SLOTS) -> Header:
    """Write a new, empty journal at ``path`` crash-atomically (temporary file and rename)."""
    if nextents > MAX_EXTENTS:
        raise ValueError("too many extents for a version-1 journal")
    if nslots < 8:
        raise ValueError("a journal needs at least 8 ring slots")
    header = Header(nslots, extent_size, nextents, mirror_id, os.urandom(16))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, header.pack())
        zeros = bytes(SLOT * 64)
        left = nslots * SLOT
        while left:
            n = os.write(fd, zeros[:min(left, len(zeros))])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return header


def scan(path: str, *, mirror_id: bytes | None = None) -> ScanResult:
    """Read the whole journal and rebuild the active set, validating as the module doc says.

    Raises :class:`CorruptError` (with the slot and the reason) when the journal cannot be
    trusted; a torn last record is not an error.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptError(f"{path}: journal is missing") from None
    header = Header.unpack(data[:SLOT], path)
    if mirror_id is not None and header.mirror_id != mirror_id:
        raise CorruptError(f"{path}: journal belongs to another mirror "
                           f"({header.mirror_id.hex()}, expected {mirror_id.hex()})")
    n = header.nslots
    if len(data) < (n + 1) * SLOT:
        raise CorruptError(f"{path}: journal is truncated ({len(data)} bytes, expected "
                           f"{(n + 1) * SLOT})")
    valid: dict[int, Record] = {}
    bad: list[int] = []      # slot indexes (0-based in the ring) that hold neither zeros nor a record
    empty: list[int] = []
    for i in range(n):
        buf = data[(1 + i) * SLOT:(2 + i) * SLOT]
        if buf == _ZERO:
            empty.append(i)
            continue
        rec = Record.unpack(buf, header.journal_id)
        if rec is None or rec.seq % n != i:
            bad.append(i)
            continue
        valid[rec.seq] = rec
    if not valid:
        if not bad:
            return ScanResult(header, set(), 0, 0, False)
        if bad == [1 % n]:
            return ScanResult(header, set(), 0, 0, True)
        raise CorruptError(f"{path}: no valid record, but slot(s) {_slots(bad)} hold data")
    b = max(valid)
    a = max(1, b - n + 2)
    for s in range(a, b + 1):
        if s not in valid:
            raise CorruptError(f"{path}: record {s} (slot {1 + s % n}) is missing or damaged, "
                               f"but record {b} after it is valid: the journal is corrupt")
    nxt = (b + 1) % n
    torn = False
    if b + 1 <= n:
        # The ring has not wrapped: the next slot is zero or torn; later slots were never written.
        torn = nxt not in empty
        used = {s % n for s in range(a, b + 1)} | {nxt}
        empty_set = set(empty)
        for i in range(n):
            if i not in used and i not in empty_set:
                raise CorruptError(f"{path}: slot {1 + i} holds data after the end of the log "
                                   f"(record {b}): the journal is corrupt")
    else:
        old = valid.get(b + 1 - n)
        torn = old is None
    # Newest complete checkpoint inside the run [a, b].
    run = [valid[s] for s in range(a, b + 1)]
    base: set[int] | None = None
    start = 0
    for c in sorted({r.ckpt_start for r in run if r.ckpt_start >= a}, reverse=True):
        members = [r for r in run if r.ckpt_start == c]
        total = members[0].ckpt_total
        got: list[int] = []
        for r in members:
            if r.ckpt_total != total or r.ckpt_offset != len(got):
                break
            got.extend(r.ckpt)
        if len(got) == total:
            base, start = set(got), c
            break
    if base is None:
        raise CorruptError(f"{path}: no complete checkpoint between records {a} and {b}: "
                           "the journal is corrupt")
    active = base
    last_start = valid[b].ckpt_start
    open_ckpt = None
    for s in range(start, b + 1):
        if s == last_start and s > start:
            open_ckpt = _open_checkpoint(valid, s, b, sorted(active))
        r = valid[s]
        active.difference_update(r.rets)
        active.update(r.adds)
    return ScanResult(header, active, b, len(run), torn, open_ckpt)


def _open_checkpoint(valid: dict[int, Record], c: int, b: int,
                     entries: list[int]) -> tuple[int, list[int], int] | None:
    """The incomplete checkpoint begun at record ``c``, whose entries are ``entries`` (the
    active set before ``c``), if records ``c..b`` carry a consistent prefix of it."""
    done = 0
    for s in range(c, b + 1):
        r = valid[s]
        if (r.ckpt_start != c or r.ckpt_total != len(entries) or r.ckpt_offset != done
                or list(r.ckpt) != entries[done:done + len(r.ckpt)]):
            return None
        done += len(r.ckpt)
    return (c, entries, done) if done < len(entries) else None


def _slots(idx: Iterable[int]) -> str:
    return ", ".join(str(1 + i) for i in list(idx)[:8])


class Journal:
    """An open journal: appends records with ``O_DSYNC``, one at a time, and tracks the active set.

    The file descriptor stays open for the life of the object. After a failed write the journal
    is broken: every later append raises the same error, because the ring may now hold a record
    of unknown content and writing after it could make the log unreadable.
    """

    def __init__(self, path: str, scan_result: ScanResult) -> None:
        self.path = path
        self.header = scan_result.header
        self.nslots = self.header.nslots
        self.max_active = max_active_for(self.nslots)
        self.active: set[int] = set(scan_result.active)
        self.seq = scan_result.last_seq
        # Complete the checkpoint the previous process left open, if any; otherwise begin a
        # fresh one with the next record.
        self._ckpt_start = self.seq + 1
        self._ckpt_entries: list[int] = []
        self._ckpt_total = 0
        self._ckpt_offset = 0
        if scan_result.open_checkpoint is not None:
            self._ckpt_start, entries, self._ckpt_offset = scan_result.open_checkpoint
            self._ckpt_entries = list(entries)
            self._ckpt_total = len(entries)
        self.broken: OSError | None = None
        self.fd = os.open(path, os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC)
        self.writes = 0

    @classmethod
    def open(cls, path: str, *, mirror_id: bytes | None = None) -> "Journal":
        return cls(path, scan(path, mirror_id=mirror_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _next_record(self, adds: Sequence[int], rets: Sequence[int]) -> Record:
        seq = self.seq + 1
        if self._ckpt_offset >= self._ckpt_total:
            # The previous checkpoint is complete: begin a new one with the set as it is now,
            # before this record's deltas.
            self._ckpt_start = seq
            self._ckpt_entries = sorted(self.active)
            self._ckpt_total = len(self._ckpt_entries)
            self._ckpt_offset = 0
        room = PAYLOAD_ENTRIES - len(adds) - len(rets)
        chunk = tuple(self._ckpt_entries[self._ckpt_offset:self._ckpt_offset + room])
        return Record(seq, self._ckpt_start, self._ckpt_total, self._ckpt_offset,
                      tuple(adds), tuple(rets), chunk, time.time_ns())

    def append(self, adds: Iterable[int] = (), rets: Iterable[int] = ()) -> None:
        """Make ``adds`` active and ``rets`` retired, durably, before returning (blocking).

        More than MAX_DELTA changes are split over several records, written in order.
        """
        if self.broken is not None:
            raise OSError(self.broken.errno, f"journal is broken after an earlier error: "
                          f"{self.broken.strerror}")
        add_l = sorted(set(adds) - self.active)
        ret_l = sorted(set(rets) & self.active)
        if not add_l and not ret_l:
            return
        if len(self.active) + len(add_l) > self.max_active:
            raise OSError(28, f"journal full: {len(self.active) + len(add_l)} active extents, "
                          f"this journal holds at most {self.max_active}")
        while True:
            a, add_l = add_l[:MAX_DELTA], add_l[MAX_DELTA:]
            r, ret_l = ret_l[:MAX_DELTA - len(a)], ret_l[MAX_DELTA - len(a):]
            self._write(a, r)
            if not add_l and not ret_l:
                return

    def _write(self, adds: Sequence[int], rets: Sequence[int]) -> None:
        rec = self._next_record(adds, rets)
        buf = rec.pack(self.header.journal_id)
        off = (1 + rec.seq % self.nslots) * SLOT
        try:
            faults.check("journal.write")
            faults.before_write(self.path, self.fd, off, SLOT)
            n = os.pwrite(self.fd, buf, off)
            faults.synced(self.path)   # O_DSYNC: durable once pwrite returns
            if n != SLOT:
                raise OSError(5, f"short journal write ({n} of {SLOT} bytes)")
        except OSError as e:
            self.broken = e
            log.error("journal write of record %d failed: %s", rec.seq, e)
            raise
        self.seq = rec.seq
        self._ckpt_offset += len(rec.ckpt)
        self.active.difference_update(rets)
        self.active.update(adds)
        self.writes += 1


class _Batch:
    def __init__(self) -> None:
        self.adds: set[int] = set()
        self.rets: set[int] = set()
        self.done = trio.Event()
        self.error: OSError | None = None


class JournalWriter:
    """Group commit on the trio loop: concurrent intents share one journal write.

    Callers add to the open batch and wait for it; one writer task writes a batch at a time in
    a worker thread (an ``O_DSYNC`` write blocks for the device's flush, which must not stall
    the FUSE loop), so everything that arrives during a write goes out together in the next.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._batch = _Batch()
        self._wakeup = trio.Event()
        self.batches = 0

    async def commit(self, adds: Iterable[int] = (), rets: Iterable[int] = ()) -> None:
        """Return once ``adds``/``rets`` are durable in the journal; raise its OSError if not."""
        batch = self._batch
        batch.adds.update(adds)
        batch.rets.update(rets)
        self._wakeup.set()
        await batch.done.wait()
        if batch.error is not None:
            raise OSError(batch.error.errno, batch.error.strerror)

    async def run(self) -> None:
        """The writer task; lives in the engine's nursery until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            batch, self._batch = self._batch, _Batch()
            if not batch.adds and not batch.rets:
                batch.done.set()
                continue
            try:
                await trio.to_thread.run_sync(self.journal.append, batch.adds, batch.rets)
            except OSError as e:
                batch.error = e
            self.batches += 1
            batch.done.set()


def reset(path: str, *, mirror_id: bytes, extent_size: int, nextents: int,
          nslots: int | None = None, keep_damaged: bool = True) -> Header:
    """Replace the journal with an empty one, keeping a damaged one aside for inspection."""
    if nslots is None:
        try:
            with open(path, "rb") as f:
                nslots = Header.unpack(f.read(SLOT), path).nslots
        except (OSError, CorruptError):
            nslots = DEFAULT_SLOTS
    if keep_damaged and os.path.exists(path):
        aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(path, aside)
        log.warning("kept the old journal as %s", aside)
    return create(path, mirror_id=mirror_id, extent_size=extent_size, nextents=nextents,
                  nslots=nslots)


__all__ = ["Journal", "JournalWriter", "ScanResult", "create", "scan", "reset", "atomic_write"]
