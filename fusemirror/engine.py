"""The master's write path (patent FIG. 6 and FIG. 7): journal, master image, clean-up.

This module owns the order of operations for every host request and the bookkeeping that
decides when an extent's intent may be retired. It holds no FUSE code (``fs.py`` maps requests
here) and no socket code. Everything runs on one trio loop; blocking syscalls go to worker
threads.

Invariants (SPEC §3 item 8), and where they are kept:

* An extent is named durably in the journal before any image changes (``_log_intents``): new
  intents of concurrent writes share one journal write (:class:`~.journal.JournalWriter`); an
  extent already active costs nothing.
* Overlapping writes are applied in arrival order (``_lock_range``).
* An extent is retired only when no write to it is in flight, a master ``fdatasync`` that
  started after its last write completed has succeeded, and the journal's retire record is
  durable (``_retire``). Retirement is lazy and batched: idle extents in the periodic clean-up,
  least recently written ones when the activity log is full.
* A write to an extent being retired waits for the retire record, then logs the extent again.
* An I/O error is never turned into success: the request fails with the kernel's errno, the
  extent stays logged ("pinned") until ``fsck.fusemirror`` runs, and a failed ``fdatasync`` or
  journal write sends the mirror to ATTENTION (a later flush that succeeds proves nothing).
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import time
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, TypeVar

import trio

from . import faults, states
from .image import Image, WriteBehind
from .journal import Journal, JournalWriter
from .mirrordb import MirrorDB

log = logging.getLogger(__name__)

T = TypeVar("T")

CLEANUP_INTERVAL = 5.0   # seconds between lazy clean-ups
IDLE_RETIRE = 10.0       # an extent idle this long is retired by the clean-up
INTENT_READAHEAD = 8     # extents kept logged ahead of a sequential stream
WRITE_BEHIND = 4 << 20   # bytes written to the master before its write-back is started


class ExtentState:
    """What the engine knows about one active extent."""

    __slots__ = ("inflight", "last_done", "logged", "error", "retiring", "retired", "pinned",
                 "touched", "queued", "slave_last")

    def __init__(self, durable: bool) -> None:
        self.inflight = 0                 # writes to this extent between logging and completion
        self.last_done = 0                # completion counter of the last write that finished
        self.logged = trio.Event()        # set once the intent is durable in the journal
        self.error: OSError | None = None # the journal write for this intent failed
        self.retiring = False
        self.retired: trio.Event | None = None
        self.pinned = False               # an I/O error hit it: keep logged until fsck
        self.touched = 0.0
        self.queued = 0                   # writes to it in a slave's stream, not yet answered
        self.slave_last: dict[str, int] = {}  # slave id -> stream seq of the last write sent
        if durable:
            self.logged.set()


class _Range:
    __slots__ = ("start", "end", "done")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = trio.Event()


class Engine:
    """The master side of one mirror: serves host reads and writes through the journal."""

    def __init__(self, unit_dir: str, db: MirrorDB, journal: Journal | None, image: Image,
                 *, mountpoint: str | None = None, inline_io_max: int = 131072,
                 write_behind: int = WRITE_BEHIND) -> None:
        self.unit_dir = unit_dir
        self.db = db
        self.journal = journal
        self.image = image
        self.mountpoint = mountpoint
        self.size = db.size
        self.extent_size = db.extent_size
        self.inline_io_max = inline_io_max
        self.writer = JournalWriter(journal) if journal is not None else None
        self.extents: OrderedDict[int, ExtentState] = OrderedDict()
        if journal is not None:
            for e in sorted(journal.active):
                self.extents[e] = ExtentState(durable=True)
        self._ranges: list[_Range] = []
        self._done_counter = 0
        self._flushed = 0
        self._flush_failed: OSError | None = None
        # one master fdatasync at a time: of two concurrent ones only the first may see a
        # writeback error (the kernel reports it once per open file), and the other would
        # answer an fsync with success over data that was lost
        self._flush_lock = trio.Lock()
        self._evict_lock = trio.Lock()
        self._inflight = 0
        self._drained = trio.Event()
        self._drained.set()
        self.attention_reason: str | None = None
        self.open_handles = 0
        self.started = time.time()
        self.links: list[Any] = []          # SlaveLink, one per slave image
        self._recent_ends: deque[int] = deque(maxlen=16)  # where recent writes ended
        self._db_dirty = trio.Event()
        self._db_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.stats = {"writes": 0, "bytes_written": 0, "reads": 0, "bytes_read": 0,
                      "flushes": 0, "intent_hits": 0, "intent_misses": 0, "retired": 0,
                      "write_errors": 0, "writebacks": 0}
        self.write_behind = WriteBehind(image, write_behind, self.stats, "master image")

    # ---- life cycle ------------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Background tasks: the journal writer and the lazy clean-up. Cancel to stop."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.writer is not None:
                nursery.start_soon(self.writer.run)
                nursery.start_soon(self._cleanup_loop)
            nursery.start_soon(self._db_saver)
            for link in self.links:
                nursery.start_soon(link.run)
            task_status.started()

    async def close(self) -> None:
        """Clean stop: wait for in-flight requests, flush the master, retire every intent.

        Extents pinned by an I/O error stay logged, so the next mount asks for fsck.
        """
        await self._drained.wait()
        if self.journal is None:
            return
        async with trio.open_nursery() as n:     # async slaves' backlogs
            for link in self.links:
                n.start_soon(link.drain)
        eligible = [e for e, st in self.extents.items() if self._retirable(st)]
        if eligible:
            try:
                await self._retire(eligible)
            except OSError as e:
                log.error("clean stop could not retire %d intents: %s (fsck.fusemirror will)",
                          len(eligible), e)
        left = len(self.extents)
        if left:
            pinned = sum(1 for st in self.extents.values() if st.pinned or st.error is not None)
            log.warning("stopping with %d extents still logged (%d pinned by I/O errors, %d "
                        "not retired): run `fsck.fusemirror %s` before the next mount", left,
                        pinned, left - pinned, self.unit_dir)
        else:
            log.info("clean stop: no intent left in the journal")
        self._all_committed()
        for link in self.links:
            link.stop()
        await self.save_db()

    def _all_committed(self) -> None:
        """No write outstanding and every slave flushed: CONSISTENT -> SYNCHRONIZED (FIG. 5)."""
        if self.extents:
            return
        for link in self.links:
            if link.mode == "streaming" and link.queued_bytes == 0 and \
                    not link.fracture_count():
                link._set_state("all_committed")

    # ---- host I/O --------------------------------------------------------------------------
    def _check_io(self) -> None:
        state = self.db.state
        if not states.host_io_allowed(state):
            raise OSError(errno.EIO, f"mirror is {state}: host I/O is not allowed")

    async def read(self, off: int, size: int) -> bytes:
        self._check_io()
        if off >= self.size or size <= 0:
            return b""
        size = min(size, self.size - off)
        data = await self._io(size, self.image.pread, off, size)
        self.stats["reads"] += 1
        self.stats["bytes_read"] += len(data)
        return data

    async def write(self, off: int, data: bytes) -> int:
        """Serve one host write: intents, then the image; returns the bytes written."""
        self._check_io()
        if off >= self.size:
            raise OSError(errno.ENOSPC, "write past the end of the image")
        if off + len(data) > self.size:
            data = data[:self.size - off]
        if not data:
            return 0
        end = off + len(data)
        self._inflight += 1
        if self._inflight == 1:
            self._drained = trio.Event()
        rng = await self._lock_range(off, end)
        exts = range(off // self.extent_size, (end - 1) // self.extent_size + 1)
        sequential = off in self._recent_ends
        self._recent_ends.append(end)
        try:
            await self._log_intents(exts, sequential)
            ok = False
            try:
                faults.crash_point("after-journal")
                await self._apply(off, data, exts)
                ok = True
            except OSError as e:
                self.stats["write_errors"] += 1
                log.error("master write of %d bytes at %d failed: %s; extents %s stay logged",
                          len(data), off, e, _fmt_extents(exts))
                raise
            finally:
                self._done_counter += 1
                now = trio.current_time()
                for e in exts:
                    st = self.extents.get(e)
                    if st is None:
                        break  # journal switched off
                    st.inflight -= 1
                    st.last_done = self._done_counter
                    st.touched = now
                    if not ok:
                        st.pinned = True
        finally:
            self._unlock_range(rng)
            self._inflight -= 1
            if self._inflight == 0:
                self._drained.set()
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(data)
        if self.write_behind.due(len(data)) and self._nursery is not None:
            self._nursery.start_soon(trio.to_thread.run_sync, self.write_behind.start)
        return len(data)

    async def _apply(self, off: int, data: bytes, exts: range) -> None:
        """The master write and the slave sends (patent FIG. 6 steps 608/610).

        Normally they run together and may complete in any order. Crash tests force one order
        (``FUSEMIRROR_WRITE_ORDER``) so each of claim 1's completion orders can be crashed in.
        """
        order = faults.WRITE_ORDER if self.links else "concurrent"
        if order == "slave-first":
            for entry in self._replicate(off, data, exts):
                await entry.done.wait()
            faults.crash_point("after-slave")
            await self._io(len(data), self.image.pwrite, off, data)
            faults.crash_point("after-master")
            return
        if order == "master-first":
            await self._io(len(data), self.image.pwrite, off, data)
            faults.crash_point("after-master")
            for entry in self._replicate(off, data, exts):
                await entry.done.wait()
            faults.crash_point("after-slave")
            return
        entries = self._replicate(off, data, exts) if self.links else ()
        await self._io(len(data), self.image.pwrite, off, data)
        faults.crash_point("after-master")
        for entry in entries:
            await entry.done.wait()
        faults.crash_point("after-slave")

    def _replicate(self, off: int, data: bytes, exts: range) -> list[Any]:
        """Start the slave sends of a host write (they run while the master writes).

        Sync policy: the returned entries are awaited before the write is answered. Async:
        the write goes into each slave's bounded backlog and is not awaited.
        """
        sts = [self.extents[e] for e in exts if e in self.extents]
        sync = self.db.mirror["write_policy"] == "sync"
        entries = []
        for link in self.links:
            link.note_master_write()
            entry = link.route(off, data, exts, sts, bounded=not sync)
            if entry is not None and sync:
                entries.append(entry)
        return entries

    async def fsync(self) -> None:
        """Make every write completed so far durable: the master (``fdatasync``) and, with the
        sync policy, every reachable slave (a flush through its ordered stream)."""
        if self.db.state == states.ATTENTION:
            raise OSError(errno.EIO, f"mirror is ATTENTION: {self.attention_reason}")
        if not self.links or self.db.mirror["write_policy"] != "sync":
            await self._flush_master()
            return
        failed: list[OSError] = []

        async def master() -> None:
            try:
                await self._flush_master()
            except OSError as e:
                failed.append(e)

        async with trio.open_nursery() as n:
            n.start_soon(master)
            for link in self.links:
                if link.accepting:
                    n.start_soon(link.flush)
        if failed:
            raise failed[0]

    # ---- intents ---------------------------------------------------------------------------
    async def _log_intents(self, exts: range, sequential: bool = False) -> None:
        """Make every extent in ``exts`` active in the journal and count this write in flight."""
        if self.writer is None:
            return  # journal switched off (benchmarks only): nothing is tracked
        limit = self.db.mirror["activity_log_extents"]
        while True:
            retiring = next((st for e in exts
                             if (st := self.extents.get(e)) is not None and st.retiring), None)
            if retiring is not None:
                assert retiring.retired is not None
                await retiring.retired.wait()
                continue
            missing = sum(1 for e in exts if e not in self.extents)
            if missing and len(self.extents) + missing > limit:
                if await self._make_room(missing, limit):
                    continue
            break
        # No await from here until every state is counted in flight: clean-up cannot pick them.
        new: list[int] = []
        for e in exts:
            st = self.extents.get(e)
            if st is None:
                st = self.extents[e] = ExtentState(durable=False)
                new.append(e)
            else:
                self.extents.move_to_end(e)
            st.inflight += 1
        ahead = self._readahead(exts, limit) if new and sequential else []
        if sequential and not new:
            self._log_ahead_in_background(exts, limit)
        if new:
            self.stats["intent_misses"] += 1
            try:
                await self.writer.commit(adds=new + ahead)
            except OSError as err:
                for e in new:
                    self.extents[e].error = err
                    self.extents[e].logged.set()
                for e in ahead:
                    # as in _commit_ahead: a write that already reached a read-ahead extent
                    # waits for its record, so it gets the error (popped, it waited for ever)
                    st = self.extents.get(e)
                    if st is None:
                        continue
                    if st.inflight == 0:
                        del self.extents[e]
                    else:
                        st.error = err
                    st.logged.set()
                await self._journal_failed(err)
            else:
                for e in new + ahead:
                    self.extents[e].logged.set()
        else:
            self.stats["intent_hits"] += 1
        failed: OSError | None = None
        for e in exts:
            st = self.extents[e]
            if not st.logged.is_set():
                await st.logged.wait()
            if st.error is not None:
                failed = st.error
        if failed is not None:
            for e in exts:
                st = self.extents[e]
                st.inflight -= 1
                if st.error is not None and st.inflight == 0:
                    del self.extents[e]
            raise OSError(failed.errno, f"journal write failed: {failed.strerror}")

    def _readahead(self, exts: range, limit: int) -> list[int]:
        """Intents for the extents a sequential stream is about to reach, in the same record.

        Called only when a write starts where a recent write ended: such a stream will need
        the next extents too, and naming them now saves an O_DSYNC journal write per extent
        (each ~0.3-1 ms, in series with the write that needs it). Random writes never read
        ahead, so they do not fill the activity log with extents nobody writes. Unused ones
        retire with the idle clean-up. The states are added here, not yet logged: a write
        that reaches one waits for its record like any other.
        """
        end = exts.stop  # the extent after the write's last one
        out = []
        now = trio.current_time()
        for e in range(end, min(end + INTENT_READAHEAD, -(-self.size // self.extent_size))):
            if e in self.extents:
                continue
            if len(self.extents) + 1 > limit:
                break
            st = self.extents[e] = ExtentState(durable=False)
            st.touched = now
            out.append(e)
        return out

    def _log_ahead_in_background(self, exts: range, limit: int) -> None:
        """Keep a sequential stream's read-ahead window logged without making it wait.

        When fewer than half of the next INTENT_READAHEAD extents are logged, the missing
        ones go into a journal record written in the background, so the write that enters
        them finds their intent already durable (or waits only for the rest of its write).
        """
        end = exts.stop
        ahead = sum(1 for e in range(end, end + INTENT_READAHEAD) if e in self.extents)
        if ahead * 2 >= INTENT_READAHEAD or self._nursery is None:
            return
        new = self._readahead(exts, limit)
        if not new:
            return
        self._inflight += 1   # a clean stop waits for it like for a write
        if self._inflight == 1:
            self._drained = trio.Event()
        self._nursery.start_soon(self._commit_ahead, new)

    async def _commit_ahead(self, ahead: list[int]) -> None:
        assert self.writer is not None
        try:
            await self.writer.commit(adds=ahead)
        except OSError as err:
            for e in ahead:
                st = self.extents.get(e)
                if st is None:
                    continue
                if st.inflight == 0:
                    del self.extents[e]   # nobody wrote to it: it was never needed
                else:
                    st.error = err        # the write waiting for it fails with this error
                st.logged.set()
            await self._journal_failed(err)
        else:
            for e in ahead:
                st = self.extents.get(e)
                if st is not None:
                    st.logged.set()
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._drained.set()

    async def _make_room(self, missing: int, limit: int) -> bool:
        """Retire least recently written idle extents so ``missing`` new ones fit the bound.

        Returns False when nothing could be retired (everything is busy): the caller then goes
        over the bound for this request rather than wait for itself.
        """
        async with self._evict_lock:
            over = len(self.extents) + missing - limit
            if over <= 0:
                return True
            want = max(over, limit // 16)
            batch = []
            for e, st in self.extents.items():
                if self._retirable(st):
                    batch.append(e)
                    if len(batch) >= want:
                        break
            if len(batch) < want and self.db.mirror["write_policy"] == "async":
                # extents kept active only by a slow async slave's backlog: their unsent
                # writes go to its fracture log instead, so the bound holds and the host does
                # not wait for that slave (SPEC §3 item 5). Only extents whose every queued
                # write is still unsent (a write on the wire cannot be taken back)
                unsent = collections.Counter[int]()
                for link in self.links:
                    unsent.update(link.unsent_writes())
                drop = []
                for e, st in self.extents.items():
                    if len(batch) + len(drop) >= want:
                        break
                    if st.queued and unsent[e] == st.queued and e not in batch and \
                            self._retirable(st, backlog=True):
                        drop.append(e)
                if drop:
                    for link in self.links:
                        link.drop_queued(set(drop))
                    batch += [e for e in drop if self._retirable(self.extents[e])]
            if not batch:
                return False
            try:
                await self._retire(batch, urgent=True)
            except OSError as err:
                log.error("could not retire extents to make room: %s", err)
                return False
            return True

    def _retirable(self, st: ExtentState, *, backlog: bool = False) -> bool:
        """Whether ``st`` may retire now; ``backlog``: but for writes queued to a slave."""
        return (st.inflight == 0 and (backlog or st.queued == 0) and st.logged.is_set()
                and st.error is None and not st.retiring and not st.pinned)

    async def _retire(self, batch: list[int], *, urgent: bool = False) -> None:
        """Lazy deletion (FIG. 7): flush what the batch needs, then one retire record.

        ``urgent``: a host write waits for the room (see SlaveLink.secure)."""
        done = trio.Event()
        for e in batch:
            st = self.extents[e]
            st.retiring = True
            st.retired = done
        try:
            if any(self.extents[e].last_done > self._flushed for e in batch):
                await self._flush_master()
            if self.links:
                try:
                    async with trio.open_nursery() as n:
                        for link in self.links:
                            n.start_soon(functools.partial(link.secure, batch, urgent=urgent))
                except BaseExceptionGroup as group:
                    # a fracture log that could not be written: an OSError for the callers
                    # (a clean-up logs it and retries later, a host write gets EIO), not an
                    # exception group that no `except OSError` catches and that ends the daemon
                    oserrors, rest = group.split(OSError)
                    if oserrors is None or rest is not None:
                        raise
                    first: BaseException = oserrors
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    raise first from None
            faults.crash_point("cleanup-before-retire")
            assert self.writer is not None
            try:
                await self.writer.commit(rets=batch)
            except OSError as err:
                await self._journal_failed(err)
                raise
            for e in batch:
                del self.extents[e]
            self.stats["retired"] += len(batch)
            log.debug("retired %d extents", len(batch))
        except BaseException:
            for e in batch:
                st = self.extents.get(e)
                if st is not None:
                    st.retiring = False
                    st.retired = None
            raise
        finally:
            done.set()

    async def _cleanup_loop(self) -> None:
        while True:
            await trio.sleep(CLEANUP_INTERVAL)
            await self.cleanup(IDLE_RETIRE)

    async def cleanup(self, idle: float = 0.0) -> int:
        """Retire every extent idle for ``idle`` seconds or more; returns how many."""
        now = trio.current_time()
        batch = [e for e, st in self.extents.items()
                 if self._retirable(st) and now - st.touched >= idle]
        if not batch or self.journal is None or self.journal.broken is not None:
            return 0
        try:
            await self._retire(batch)
        except OSError as err:
            log.error("clean-up failed: %s", err)
            return 0
        self._all_committed()
        return len(batch)

    # ---- flushing --------------------------------------------------------------------------
    async def _flush_master(self) -> None:
        async with self._flush_lock:
            if self._flush_failed is not None:
                raise OSError(errno.EIO, "an earlier fdatasync of the master image failed; "
                              "nothing written since is known to be durable")
            mark = self._done_counter
            self.write_behind.flushed()
            try:
                await trio.to_thread.run_sync(self.image.fdatasync)
            except OSError as err:
                self._flush_failed = err
                for st in self.extents.values():
                    if st.last_done > self._flushed or st.inflight:
                        st.pinned = True
                log.error("fdatasync of the master image failed: %s", err)
                await self.condition_failed(f"fdatasync of the master image failed: "
                                            f"{err.strerror}")
                raise OSError(err.errno, err.strerror) from None
            self.stats["flushes"] += 1
            if mark > self._flushed:
                self._flushed = mark

    # ---- state -----------------------------------------------------------------------------
    async def _journal_failed(self, err: OSError) -> None:
        await self.condition_failed(f"journal write failed: {err.strerror}")

    async def condition_failed(self, reason: str) -> None:
        """A condition for normal operation failed: ACTIVE goes to ATTENTION (FIG. 4)."""
        if self.attention_reason is None:
            self.attention_reason = reason
        if self.db.state == states.ACTIVE:
            await self._set_state(states.mirror_next(states.ACTIVE, "condition_fail"))
            log.error("mirror %s is now ATTENTION: %s", self.db.name, reason)

    def conditions_hold(self) -> str | None:
        """None if the mirror may operate normally, else the reason it may not."""
        for link in self.links:
            if link.conflict:
                return link.conflict
        if self.journal is not None and self.journal.broken is not None:
            return f"the journal failed ({self.journal.broken.strerror}); run fsck.fusemirror"
        if self._flush_failed is not None:
            return "an fdatasync of the master image failed; run fsck.fusemirror"
        return None

    async def activate(self) -> str:
        reason = self.conditions_reason()
        state = self.db.state
        if state == states.ATTENTION:
            states.mirror_next(state, "activate_ok")  # raises with the remedy
        new = states.mirror_next(state, "activate_fail" if reason else "activate_ok")
        await self._set_state(new)
        if reason:
            self.attention_reason = reason
        for link in self.links:
            link.wake()   # an UNSYNCHRONIZED slave starts its sync once ACTIVE
        return new

    async def deactivate(self, force: bool = False) -> str:
        """INACTIVE; graceful waits for outstanding writes and makes them durable first."""
        await self._set_state(states.mirror_next(self.db.state, "deactivate"))
        if not force:
            await self._drained.wait()
            if self._flush_failed is None:
                await self._flush_master()
        return self.db.state

    async def _set_state(self, new: str) -> None:
        if self.db.mirror["state"] == new:
            return
        old = self.db.mirror["state"]
        self.db.mirror["state"] = new
        log.info("mirror %s: %s -> %s", self.db.name, old, new)
        await self.save_db()

    # ---- slaves ----------------------------------------------------------------------------
    def add_link(self, link: Any) -> None:
        self.links.append(link)
        if self._nursery is not None:
            self._nursery.start_soon(link.run)

    def remove_link(self, link: Any) -> None:
        link.stop()
        self.links.remove(link)

    def db_changed(self) -> None:
        """Something in the mirror database changed: save it soon (in the background)."""
        self._db_dirty.set()

    async def _db_saver(self) -> None:
        while True:
            await self._db_dirty.wait()
            self._db_dirty = trio.Event()
            await self.save_db()
            await trio.sleep(0.05)

    async def save_db(self, *, push: bool = True) -> dict[str, Any] | None:
        """Save the mirror database (crash-atomically), one save at a time, and send the
        saved copy to every connected slave; return that copy (None if the save failed).

        Only a copy already in our own file leaves this master: the in-memory database may
        change (a new generation) while the save runs, and a member holding a generation the
        master's file lacks makes the next mount refuse this master as stale."""
        async with self._db_lock:
            saved = self.db.copy()          # taken in the event loop: never a torn copy
            snapshot = saved.data
            try:
                await trio.to_thread.run_sync(saved.save, self.unit_dir)
            except OSError as e:
                log.error("saving the mirror database failed: %s", e)
                return None
        if push and self._nursery is not None:
            for link in self.links:
                if link.chan is not None and link.chan.dead is None:
                    self._nursery.start_soon(link.push_db, snapshot)
        return snapshot

    def new_epoch(self, why: str) -> None:
        """Start a new generation: this master now holds data some member lacks."""
        counter, _ = self.db.bump_generation()
        log.info("mirror %s: generation %d (%s)", self.db.name, counter, why)
        self.db_changed()

    def conflict(self, why: str) -> None:
        """A member shows this master is stale or split from it: deny host I/O (ATTENTION)."""
        self.attention_reason = why
        if self._nursery is not None:
            self._nursery.start_soon(self.condition_failed, why)

    def missing_images(self) -> int:
        return sum(1 for link in self.links if not link.reachable)

    def conditions_reason(self) -> str | None:
        """Why the mirror may not operate normally now (FIG. 4), or None."""
        reason = self.conditions_hold()
        if reason:
            return reason
        m = self.db.mirror
        missing = self.missing_images()
        if m["max_missing_images"] >= 0 and missing > m["max_missing_images"]:
            return (f"{missing} slave(s) unreachable, more than max_missing_images="
                    f"{m['max_missing_images']}")
        present = 1 + len(self.links) - missing
        if m["min_images_required"] >= 0 and present < m["min_images_required"]:
            return (f"{present} image(s) reachable, fewer than min_images_required="
                    f"{m['min_images_required']}")
        return None

    def link_changed(self, link: Any) -> None:
        """A slave became reachable or unreachable: re-check the mirror's conditions."""
        if self._nursery is not None:
            self._nursery.start_soon(self._reevaluate)

    async def _reevaluate(self) -> None:
        reason = self.conditions_reason()
        state = self.db.state
        if reason and state == states.ACTIVE:
            await self.condition_failed(reason)
        elif not reason and state == states.ATTENTION:
            self.attention_reason = None
            await self._set_state(states.mirror_next(state, "conditions_ok"))
            log.info("mirror %s: conditions hold again: ATTENTION -> INACTIVE; run `fusemirror "
                     "activate` to resume host I/O", self.db.name)

    @asynccontextmanager
    async def locked_range(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold [start, end) against host writes (catch-up and sync copies use it)."""
        rng = await self._lock_range(start, end)
        try:
            yield
        finally:
            self._unlock_range(rng)

    # ---- helpers ---------------------------------------------------------------------------
    async def _io(self, nbytes: int, fn: Callable[..., T], *args: Any) -> T:
        if nbytes <= self.inline_io_max:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _lock_range(self, start: int, end: int) -> _Range:
        while True:
            busy = next((r for r in self._ranges if r.start < end and start < r.end), None)
            if busy is None:
                break
            await busy.done.wait()
        rng = _Range(start, end)
        self._ranges.append(rng)
        return rng

    def _unlock_range(self, rng: _Range) -> None:
        self._ranges.remove(rng)
        rng.done.set()

    def status(self) -> dict[str, Any]:
        """The facts `fusemirror status` prints, as of now."""
        pinned = sorted(e for e, st in self.extents.items() if st.pinned)
        jbroken = self.journal is not None and self.journal.broken is not None
        j: dict[str, Any] = {
            "active_extents": len(self.extents),
            "extents": sorted(self.extents),
            "pinned_extents": pinned,
            "activity_log_extents": self.db.mirror["activity_log_extents"],
            "enabled": self.journal is not None,
        }
        j.update(seq=self.journal.seq if self.journal else None,
                 slots=self.journal.nslots if self.journal else None,
                 records_written=self.journal.writes if self.journal else 0,
                 group_commits=self.writer.batches if self.writer else 0,
                 broken=jbroken)
        return {
            "slaves": [link.status() for link in self.links],
            "journal": j,
            "needs_recovery": bool(pinned) or jbroken or self._flush_failed is not None,
            "attention_reason": self.attention_reason,
            "running": True,
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "open_handles": self.open_handles,
            "uptime": round(time.time() - self.started, 1),
            "stats": dict(self.stats),
        }


def _fmt_extents(exts: range) -> str:
    if len(exts) == 1:
        return str(exts.start)
    return f"{exts.start}-{exts.stop - 1}"
