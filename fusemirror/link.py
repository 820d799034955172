"""The master's link to one slave image: connection, ordered stream, heartbeats, catch-up.

A :class:`SlaveLink` keeps one authenticated connection to the slave's agent and sends it, in
one ordered stream, the host writes and the catch-up or full-sync copies. It tracks what the
slave has acknowledged (written) and flushed (durable), and which active extents the slave
missed while it could not receive them; the engine puts those into the slave's fracture log
before retiring their intents.

Modes:

``down``       not connected (UNREACHABLE, or not yet connected): writes are *missed*
``fractured``  split off by the administrator: writes are missed until ``restore``
``catchup``    connected, copying its fracture log and missed extents; host writes flow too
``sync``       connected, full block copy behind a cursor; host writes flow only behind it
``streaming``  connected and caught up: every host write flows

The stream carries sequence numbers; the agent applies in order, so a flush acknowledged with
sequence number N covers every write sent before it.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import trio

from . import protocol as P, states
from .fracture import FractureLog

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("fusemirror.link")

CONNECT_TIMEOUT = 5.0
COPY_WINDOW = 8          # catch-up/sync copies in flight at once (bounds memory)
URGENT_FLUSH_WAIT = 1.0  # the most a host write waiting for room waits for an async slave
COPY_CHUNK = 1 << 20     # the most one copy reads and sends (well below the frame limit,
                         # whatever the extent size)


class LinkDown(Exception):
    """The connection to the slave failed; the reason is the message."""


class Conflict(Exception):
    """The slave's generation shows a split brain or a newer master."""


class _Waiter:
    __slots__ = ("event", "answer", "seq", "callback")

    def __init__(self, seq: int, callback: Callable[["_Waiter"], None] | None = None) -> None:
        self.event = trio.Event()
        self.answer: P.Event | LinkDown | None = None
        self.seq = seq
        self.callback = callback

    def resolve(self, answer: "P.Event | LinkDown") -> None:
        self.answer = answer
        self.event.set()
        if self.callback is not None:
            self.callback(self)

    @property
    def ok(self) -> bool:
        return self.answer is not None and not isinstance(self.answer, (LinkDown, P.Error))


def parse_address(addr: str) -> tuple[str, int, str]:
    """``HOST:PORT/NAME`` -> (host, port, name)."""
    hostport, sep, name = addr.partition("/")
    host, sep2, port = hostport.rpartition(":")
    if not sep or not sep2 or not port.isdigit() or not P.valid_unit_name(name):
        from .errors import UsageError

        raise UsageError(f"bad slave address {addr!r}: use HOST:PORT/NAME")
    return host.strip("[]"), int(port), name


class Channel:
    """One authenticated connection to an agent, for one unit: requests and their answers.

    Used by the link (long-lived) and by one-shot admin operations (add-slave, verify, sync
    while unmounted). Answers come back in order; :meth:`call` waits for one.
    """

    def __init__(self, stream: trio.SocketStream, conn: P.Connection, name: str) -> None:
        self.stream = stream
        self.conn = conn
        self.name = name
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self.last_rx = trio.current_time()
        self.dead: LinkDown | None = None
        self.closed = trio.Event()
        self.bytes_sent = 0

    @classmethod
    async def connect(cls, addr: str, secret: bytes, mirror: str,
                      timeout: float = CONNECT_TIMEOUT) -> "Channel":
        host, port, name = parse_address(addr)
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_tcp_stream(host, port)
                conn = P.Connection("master", secret, unit=name, mirror=mirror)
                await stream.send_all(conn.hello())
                while True:
                    ev = conn.next_event()
                    if ev is None:
                        data = await stream.receive_some(1 << 16)
                        if not data:
                            raise LinkDown("the agent closed the connection during the "
                                           "handshake (wrong secret?)")
                        conn.receive_data(data)
                        continue
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(out)
                    if isinstance(ev, P.Authenticated):
                        break
        except trio.TooSlowError:
            raise LinkDown(f"{addr}: no answer within {timeout:g}s") from None
        except OSError as e:
            raise LinkDown(f"{addr}: {e.strerror or e}") from None
        except (trio.BrokenResourceError, P.ProtocolError) as e:
            raise LinkDown(f"{addr}: {e}") from None
        return cls(stream, conn, name)

    async def receiver(self) -> None:
        """Read answers until the connection ends; then fail every waiter."""
        buf = memoryview(bytearray(1 << 18))
        try:
            while True:
                ev = self.conn.next_event()
                if ev is None:
                    # recv_into a reused buffer: receive_some allocates its maximum per read
                    n = await self.stream.socket.recv_into(buf)
                    if not n:
                        raise LinkDown("the agent closed the connection")
                    self.conn.receive_data(buf[:n])
                    continue
                self.last_rx = trio.current_time()
                w = self._waiters.pop(ev.seq, None)  # type: ignore[union-attr]
                if w is not None:
                    w.resolve(ev)
        except (LinkDown, P.ProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as e:
            self.fail(LinkDown(str(e)))
        except BaseException:
            self.fail(LinkDown("link stopped"))
            raise

    def fail(self, why: LinkDown) -> None:
        if self.dead is None:
            self.dead = why
        waiters, self._waiters = self._waiters, {}
        for w in waiters.values():
            w.resolve(self.dead)
        self.closed.set()

    @property
    def outstanding(self) -> int:
        return len(self._waiters)

    async def submit(self, make: Callable[[int], P.Event],
                     callback: Callable[[_Waiter], None] | None = None) -> _Waiter:
        """Send a request (built with its sequence number) and return its waiter.

        The callback, if any, runs when the answer (or the connection's failure) arrives.
        """
        if self.dead is not None:
            raise self.dead
        async with self._send_lock:
            if self.dead is not None:
                raise self.dead
            seq = self.conn.next_seq()
            parts = self.conn.send_parts(make(seq))
            w = _Waiter(seq, callback)
            self._waiters[seq] = w
            try:
                await self._send_vectored(parts)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self.fail(LinkDown(f"send failed: {e}"))
        return w

    async def _send_vectored(self, parts: list[bytes]) -> None:
        """Send a frame's parts with gathered writes (``sendmsg``), not one ``send`` each.

        A write frame is a header, its digests and its data: sent apart, with TCP_NODELAY,
        the header leaves as its own segment and the agent wakes once per part. Called with
        the send lock held, so frames never interleave.
        """
        sock = self.stream.socket
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            n = await sock.sendmsg(views)
            self.bytes_sent += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    async def call(self, make: Callable[[int], P.Event]) -> P.Event:
        """Send a request and wait for its answer; an ERROR answer raises OSError."""
        w = await self.submit(make)
        await w.event.wait()
        ans = w.answer
        if isinstance(ans, LinkDown):
            raise ans
        if isinstance(ans, P.Error):
            raise OSError(ans.errno or errno.EIO, ans.message)
        assert ans is not None
        return ans

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        ans = await self.call(lambda s: P.Request(s, op, args))
        if not isinstance(ans, P.Reply):
            raise LinkDown(f"unexpected answer {type(ans).__name__} to {op}")
        return ans.result

    async def aclose(self) -> None:
        self.fail(LinkDown("closed"))
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class _Entry:
    """One item of a link's ordered stream: a write (host or copy) or a flush."""

    __slots__ = ("off", "data", "exts", "sts", "flush", "done", "ok", "nblocks", "gseq",
                 "make", "answer", "copy")

    def __init__(self, off: int, data: bytes, exts: range | list[int], sts: list[Any],
                 flush: bool = False, nblocks: int = 0,
                 make: Callable[[int], P.Event] | None = None, copy: bool = False) -> None:
        self.make = make
        self.copy = copy            # a catch-up or sync copy (not a host write)
        self.answer: Any = None
        self.off = off
        self.data = data
        self.exts = exts
        self.sts = sts
        self.flush = flush
        self.done = trio.Event()
        self.ok = False
        self.nblocks = nblocks
        self.gseq = 0

    @property
    def host_write(self) -> bool:
        """A host write (what the async backlog bounds), not a copy, flush or request."""
        return not (self.flush or self.copy or self.make is not None)


class SlaveLink:
    """Everything the master knows and does about one slave image (see the module doc)."""

    def __init__(self, engine: "Engine", image: dict[str, Any], secret: bytes,
                 fracture: FractureLog) -> None:
        self.engine = engine
        self.image = image          # the slave's record in the master's mirror database
        self.id: str = image["id"]
        self.name: str = image["name"]
        self.addr: str = image["address"]
        self.secret = secret
        self.fracture = fracture
        self.mode = "fractured" if image.get("fractured") else "down"
        self.chan: Channel | None = None
        self.reachable = False
        self.last_heartbeat: float | None = None   # wall clock of the last answer
        self.missed: dict[int, int] = {}           # active extent -> stamp of the last miss
        self._stamp = 0
        self._gbase = 0                            # global seq = _gbase + connection seq
        self._gmax = 0
        self.flushed_gseq = 0
        self.sync_cursor = 0
        self.sync_started: float | None = None
        self.queued_bytes = 0
        self.backlog_blocks = 0
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queue_event = trio.Event()
        self.catchup_bytes = 0
        self.last_error: str | None = None
        self._wake = trio.Event()
        self._stopping = False
        self.conflict: str | None = None
        self._epoch_open = False   # a new data epoch was started for this outage
        self.sync_requested = False
        self._window: list[_Entry] = []
        self._sync_from = 0
        # extents missed while a catch-up or full sync runs: the copy may have read them
        # before the write it missed, so the resync's end must not clear them
        self._missed_during: set[int] | None = None
        # fracture-log updates: a retire's add and a resync's remove of the same extent must
        # not cross (the remove would clear a bit the add just set)
        self._fracture_lock = trio.Lock()
        self._push_lock = trio.Lock()          # one prepare/commit pair at a time
        self._slow_flush: _Entry | None = None  # an urgent flush the slave has not answered

    # ---- facts -----------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self.image["state"]

    @property
    def timeout(self) -> float:
        return float(self.image.get("timeout", 5.0))

    @property
    def heartbeat(self) -> float:
        return float(self.engine.db.mirror["heartbeat"])

    @property
    def accepting(self) -> bool:
        return self.mode in ("catchup", "sync", "streaming") and self.chan is not None \
            and self.chan.dead is None

    def fracture_count(self) -> int:
        extra = sum(1 for e in self.missed if e not in self.fracture)
        return len(self.fracture) + extra

    def status(self) -> dict[str, Any]:
        now = time.time()
        d: dict[str, Any] = {
            "name": self.name, "role": "slave", "state": self.state, "address": self.addr,
            "reachable": self.reachable, "mode": self.mode, "local": False,
            "fracture_extents": self.fracture_count(),
            "lag_bytes": self.queued_bytes,
            "backlog_blocks": self.backlog_blocks,
            "last_heartbeat_age": None if self.last_heartbeat is None
            else round(now - self.last_heartbeat, 2),
            "sync_progress": self.image.get("sync_progress"),
            "last_error": self.last_error,
            "timeout": self.timeout,
            "catchup_bytes": self.catchup_bytes,
            "recovery_policy": self.image.get("recovery_policy", "auto"),
            "unreachable_since_catchup": bool(self.image.get("unreachable_since_catchup")),
            "conflict": self.conflict,
        }
        if self.mode == "sync" and self.sync_started is not None:
            size = self.engine.size
            done = self.sync_cursor
            rate = (done - self._sync_from) / max(1e-3, time.monotonic() - self.sync_started)
            d["sync"] = {"done": done, "total": size,
                         "percent": round(100.0 * done / max(1, size), 1),
                         "eta_seconds": round((size - done) / rate, 1) if rate > 0 else None}
        return d

    # ---- host writes -----------------------------------------------------------------------
    def _miss(self, exts: Any) -> None:
        self._stamp += 1
        for e in exts:
            self.missed[e] = self._stamp
        if self._missed_during is not None:
            self._missed_during.update(exts)
        if not self._epoch_open and self.missed:
            # the master now holds data this slave does not: a new generation, so that a
            # promotion of the slave meanwhile is recognised as a split brain later
            self._epoch_open = True
            self.engine.new_epoch(f"slave {self.name} missed writes")

    def route(self, off: int, data: bytes, exts: range, sts: list[Any],
              bounded: bool) -> _Entry | None:
        """Put a host write in the stream, or record it as missed; never blocks.

        Returns the entry to wait for (sync policy), or None when the slave does not get the
        write now (missed, or left for the full-sync copy ahead of the cursor).
        """
        if not self.accepting:
            self._miss(exts)
            return None
        if self.mode == "sync" and off >= self.sync_cursor:
            return None
        bs = self.engine.db.block_size
        nblocks = -(-len(data) // bs)
        if bounded and self.backlog_blocks + nblocks > \
                int(self.engine.db.mirror["write_backlog_size"]):
            self._overflow()
            self._miss(exts)
            return None
        return self._enqueue(_Entry(off, data, exts, sts, nblocks=nblocks))

    def _enqueue(self, entry: _Entry) -> _Entry:
        for st in entry.sts:
            st.queued += 1
        self.backlog_blocks += entry.nblocks
        self.queued_bytes += len(entry.data)
        self._queue.append(entry)
        self._queue_event.set()
        return entry

    def _finish(self, entry: _Entry, ok: bool) -> None:
        if entry.done.is_set():
            return                  # finished already (a cancelled send, then its waiter)
        entry.ok = ok
        self.backlog_blocks -= entry.nblocks
        self.queued_bytes -= len(entry.data)
        for st in entry.sts:
            st.queued -= 1
        if not ok and (entry.host_write or entry.copy):   # it did not land
            self._miss(entry.exts)
        entry.done.set()

    def _overflow(self) -> None:
        """Async backlog full: drop the queued host writes (they become missed) and catch up
        later.

        Only host writes are dropped (they are what the backlog bounds, and their extents stay
        logged until they reach the slave or its fracture log). Flushes and requests keep their
        place: a request such as a database update may be half of a pair (``db_prepare``, then
        ``db_commit``), and its caller waits for its answer. Copies of a catch-up or full sync
        keep theirs too (they are bounded by COPY_WINDOW): a full sync saves its progress after
        a flush, which must find every copy below that point on the slave — a dropped copy
        would be remembered in memory only, and lost with a crash.
        """
        dropped = [e for e in self._queue if e.host_write]
        self._queue = collections.deque(e for e in self._queue if not e.host_write)
        for entry in dropped:
            self._finish(entry, False)
        log.warning("slave %s: write backlog overflow (%d blocks): falling back to its "
                    "fracture log", self.name, self.engine.db.mirror["write_backlog_size"])
        self._lost_updates()

    def unsent_writes(self) -> collections.Counter[int]:
        """Per extent, the host writes still waiting in the backlog (not sent yet)."""
        n: collections.Counter[int] = collections.Counter()
        for x in self._queue:
            if x.host_write:
                n.update(x.exts)
        return n

    def drop_queued(self, exts: set[int]) -> None:
        """Drop the unsent host writes to ``exts``: they become missed, so the extents can
        retire through the fracture log (see Engine._make_room)."""
        keep: collections.deque[_Entry] = collections.deque()
        dropped = []
        for x in self._queue:
            (dropped if x.host_write and not exts.isdisjoint(x.exts) else keep).append(x)
        if not dropped:
            return
        self._queue = keep
        for entry in dropped:
            self._finish(entry, False)
        self._lost_updates()

    def _lost_updates(self) -> None:
        """Connected, but the slave lacks updates it was sent or should have been (overflow, a
        failed write or flush): no longer SYNCHRONIZED/CONSISTENT, and the resync loop is
        woken to catch it up from what was missed."""
        if self.mode == "streaming":
            self.mode = "catchup"
        self._set_state("updates_lost")
        self._wake.set()

    async def call(self, make: Callable[[int], P.Event]) -> Any:
        """A request through the ordered stream (after every write queued before it)."""
        if not self.accepting and self.mode != "idle":
            raise LinkDown(f"slave {self.name} is not connected")
        if self.chan is None:
            raise LinkDown(f"slave {self.name} is not connected")
        entry = self._enqueue(_Entry(0, b"", [], [], make=make))
        await entry.done.wait()
        if isinstance(entry.answer, LinkDown):
            raise entry.answer
        if entry.answer is None:
            raise LinkDown(f"slave {self.name}: the connection was lost before the request "
                           "was sent")
        if isinstance(entry.answer, P.Error):
            raise OSError(entry.answer.errno or errno.EIO, entry.answer.message)
        return entry.answer

    async def flush(self) -> bool:
        """Ask the slave to make everything sent so far durable; True once it has."""
        if not self.accepting:
            return False
        entry = self._enqueue(_Entry(0, b"", [], [], flush=True))
        await entry.done.wait()
        return entry.ok

    async def _sender(self, chan: Channel) -> None:
        """Send the ordered stream; answers complete entries through callbacks."""
        bs = self.engine.db.block_size
        while True:
            while not self._queue:
                self._queue_event = trio.Event()
                await self._queue_event.wait()
            entry = self._queue.popleft()

            def done(w: _Waiter, entry: _Entry = entry) -> None:
                ok = w.ok
                entry.answer = w.answer
                if ok and entry.flush:
                    self.flushed_gseq = max(self.flushed_gseq, entry.gseq)
                failed = isinstance(w.answer, P.Error) and entry.make is None
                if isinstance(w.answer, P.Error):
                    self.last_error = w.answer.message
                if failed:                   # a request's error answer is its caller's to report
                    log.error("slave %s: %s failed: %s", self.name,
                              "flush" if entry.flush else "write", w.answer.message)
                    if entry.flush:
                        # what was sent since the last good flush may not be durable there;
                        # a later flush that succeeds proves nothing about it (as for the
                        # master's own fdatasync): missed, so it is caught up and stays
                        # logged until then
                        self._miss([e for e, st in self.engine.extents.items()
                                    if self.unflushed(e, st)])
                self._finish(entry, ok)
                if failed:
                    self._lost_updates()

            try:
                if entry.make is not None:
                    w = await chan.submit(entry.make, done)
                elif entry.flush:
                    w = await chan.submit(P.Flush, done)
                else:
                    w = await chan.submit(
                        lambda s, e=entry: P.Write(s, e.off, e.data, bs), done)
            except LinkDown:
                self._finish(entry, False)
                continue
            except P.ProtocolError as e:
                # a frame this side cannot send (a bug, not the peer's doing): this
                # connection ends, the mirror does not
                log.error("slave %s: cannot send: %s", self.name, e)
                chan.fail(LinkDown(f"cannot send: {e}"))
                self._finish(entry, False)
                continue
            except BaseException:
                # cancelled before its waiter was registered: no one else would finish it
                # (its extents would stay counted as queued for ever)
                self._finish(entry, False)
                raise
            entry.gseq = self._gbase + w.seq
            self._gmax = max(self._gmax, entry.gseq)
            if not entry.flush and entry.make is None:
                for st in entry.sts:
                    st.slave_last[self.id] = entry.gseq

    # ---- retire support --------------------------------------------------------------------
    def unflushed(self, e: int, st: Any) -> bool:
        g = st.slave_last.get(self.id)
        return g is not None and g > self.flushed_gseq

    async def _urgent_flush(self) -> bool:
        """A flush a host write may wait for: URGENT_FLUSH_WAIT at most, and not at all while
        the slave has not answered the previous one (it is slow or stopped)."""
        if not self.accepting:
            return False
        if self._slow_flush is not None and not self._slow_flush.done.is_set():
            return False
        entry = self._enqueue(_Entry(0, b"", [], [], flush=True))
        with trio.move_on_after(URGENT_FLUSH_WAIT):
            await entry.done.wait()
        if not entry.done.is_set():
            self._slow_flush = entry
            return False
        return entry.ok

    async def secure(self, batch: list[int], *, urgent: bool = False) -> None:
        """Before ``batch`` retires: each extent is flushed on the slave or in its fracture log.

        ``urgent`` (a host write waits for the room), async policy: the flush is waited for
        briefly (see _urgent_flush); if the slave does not answer in time, what it has not
        acknowledged durable goes to its fracture log (caught up later) — a slow async slave
        never stalls the host for long.
        """
        need = [e for e in batch if e not in self.missed
                and self.unflushed(e, self.engine.extents[e])]
        if need and urgent and self.engine.db.mirror["write_policy"] == "async":
            if not await self._urgent_flush():
                self._miss(need)
                self._lost_updates()
        elif need and not await self.flush():
            self._miss(need)
        async with self._fracture_lock:
            lost = [e for e in batch if e in self.missed]
            if lost:
                await trio.to_thread.run_sync(self.fracture.add, lost)
                for e in lost:
                    self.missed.pop(e, None)
            limit = int(self.engine.db.mirror.get("fracture_log_size") or 0)
            if limit and len(self.fracture) > limit and self.state != states.UNSYNCHRONIZED:
                log.warning("slave %s: fracture log holds %d extents, over its size %d: the "
                            "slave needs a full sync", self.name, len(self.fracture), limit)
                self._set_state("history_lost")

    # ---- state -----------------------------------------------------------------------------
    def _set_state(self, event: str) -> None:
        old = self.image["state"]
        try:
            new = states.image_next(old, event)
        except Exception:
            return
        if new != old:
            self.image["state"] = new
            log.info("slave %s: %s -> %s (%s)", self.name, old, new, event.replace("_", " "))
            self.engine.db_changed()

    def note_master_write(self) -> None:
        if self.image["state"] == states.SYNCHRONIZED:
            self._set_state("master_write")

    # ---- connection life -------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def _nap(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._wake.wait()
        self._wake = trio.Event()

    async def run(self) -> None:
        """Connect, catch up, stream; on failure mark UNREACHABLE and retry every heartbeat."""
        while not self._stopping:
            if self.mode == "fractured" or not self.addr:
                await self._nap(3600)   # fractured, or a former master not yet rejoined
                continue
            try:
                chan = await Channel.connect(self.addr, self.secret, self.engine.db.name,
                                             timeout=self.timeout)
            except LinkDown as e:
                self._down(str(e))
                await self._nap(self.heartbeat)
                continue
            if self._stopping:          # stopped while connecting: nothing more to say
                await chan.aclose()
                break
            try:
                await self._session(chan)
            except LinkDown as e:
                self._down(str(e))
            finally:
                await chan.aclose()
            if self.mode != "fractured":
                await self._nap(self.heartbeat)

    async def _session(self, chan: Channel) -> None:
        failure: LinkDown | None = None
        async with trio.open_nursery() as n:
            n.start_soon(chan.receiver)
            try:
                with trio.fail_after(self.timeout):
                    info = await chan.request("open", mirror_id=self.engine.db.mirror["id"],
                                              size=self.engine.size,
                                              generation=self.engine.db.data["generation"],
                                              master=self.engine.db.data["self"])
                    self._check_generation(info["db"])
                    # only a copy already in the master's own file (see Engine.save_db)
                    saved = await self.engine.save_db(push=False)
                    if saved is None:
                        raise LinkDown("the master could not save its database")
                    if self._stopping:   # stopped (or removed) while it was connecting
                        raise LinkDown("the link is stopping")
                    await chan.request("db_write", db=saved)
                    if self._stopping:   # ... or while the database went out
                        raise LinkDown("the link is stopping")
            except (trio.TooSlowError, LinkDown, OSError) as e:
                failure = LinkDown(f"the agent refused the unit: {e.strerror or e}"
                                   if isinstance(e, OSError) else f"opening the unit failed: {e}")
                n.cancel_scope.cancel()
                if isinstance(e, OSError):
                    if e.errno == errno.ESTALE and str(e.strerror).startswith("promoted:"):
                        failure = LinkDown(self._conflict(json.loads(e.strerror[9:])))
                    else:
                        log.error("slave %s: %s", self.name, failure)
            except Conflict as e:
                failure = LinkDown(str(e))
                n.cancel_scope.cancel()
            else:
                await self._stream(chan, n)
        raise failure or LinkDown(str(chan.dead or "closed"))

    async def _stream(self, chan: Channel, n: trio.Nursery) -> None:
        """Connected: start the sender, the watchdog and the resync loop; wait for the end."""
        self._gbase = self._gmax
        self.chan = chan
        self.reachable = True
        self.image["reachable"] = True
        self.last_heartbeat = time.time()
        self.last_error = None
        log.info("slave %s: connected (%s)", self.name, self.state)
        n.start_soon(self._sender, chan)
        n.start_soon(self._watchdog, chan)
        self.engine.link_changed(self)
        n.start_soon(self._resync_loop)
        await chan.closed.wait()
        n.cancel_scope.cancel()

    def _check_generation(self, unit_db: dict[str, Any]) -> None:
        """The slave unit's copy of the database must not be newer than ours or apart."""
        from .mirrordb import MirrorDB

        other = MirrorDB(unit_db)
        rel = self.engine.db.relation(other.data["generation"])
        if rel in ("same", "ahead"):
            if other.self_image.get("discarded"):
                # `demote --discard` on the slave's unit: its copy is to be replaced
                log.warning("slave %s: its data was discarded: full sync", self.name)
                self.image["state"] = states.UNSYNCHRONIZED
                self.image["sync_progress"] = None
            return
        if rel == "unknown":
            # away for longer than the generations remembered: what it missed is not known
            log.warning("slave %s: its database is older than every generation this master "
                        "remembers: full sync", self.name)
            self.image["state"] = states.UNSYNCHRONIZED
            self.image["sync_progress"] = None
            return
        named = other.master
        if other.self_image["state"] == states.UNSYNCHRONIZED and \
                (named is None or named["id"] == self.engine.db.data["self"]):
            # its data was discarded (demote --discard): take it back with a full sync
            log.warning("slave %s: its database changed apart (%s) but it discarded its data: "
                        "full sync", self.name, rel)
            self.image["state"] = states.UNSYNCHRONIZED
            self.image["sync_progress"] = None
            return
        raise Conflict(self._conflict(other.data["generation"]))

    def _conflict(self, theirs: dict[str, Any]) -> str:
        """A slave that was promoted, or changed apart: this master must stop (FIG. 4)."""
        rel = self.engine.db.relation(theirs)
        mine = self.engine.db.data["generation"]
        if rel == "diverged":
            why = (f"split brain: slave {self.name} was promoted or changed apart (its "
                   f"generation {theirs['counter']}:{theirs['id']}, ours "
                   f"{mine['counter']}:{mine['id']}); nothing is merged. Keep one side: "
                   f"`fusemirror umount` here and `fusemirror demote {self.engine.unit_dir} "
                   "--discard` to discard this side's writes (or `demote --discard` the other)")
        else:
            why = (f"stale master: slave {self.name} was promoted (generation "
                   f"{theirs['counter']}) after this master's last change; rejoin this unit "
                   f"as a slave: `fusemirror umount`, `fusemirror demote "
                   f"{self.engine.unit_dir}`, then add it from the new master")
        if self.conflict != why:
            log.error("%s", why)
        self.conflict = why
        self.engine.conflict(why)
        return why

    def _down(self, why: str) -> None:
        was = self.reachable or self.chan is not None
        self.chan = None
        # writes sent but not known durable on the slave are missed
        for e, st in self.engine.extents.items():
            if self.unflushed(e, st):
                self._miss([e])
        dropped, self._queue = self._queue, collections.deque()
        for entry in dropped:
            self._finish(entry, False)
        if self.mode != "fractured":
            self.mode = "down"
        self.sync_started = None
        self.last_error = why
        if self._stopping:
            log.info("slave %s: disconnected (the mirror is stopping)", self.name)
        elif was or self.reachable:
            log.warning("slave %s: UNREACHABLE: %s", self.name, why)
        if self.reachable:
            self.reachable = False
            if not self._stopping:
                self.image["unreachable_since_catchup"] = True
            self.image["reachable"] = False
            self.engine.db_changed()
        self.engine.link_changed(self)

    async def _watchdog(self, chan: Channel) -> None:
        """Heartbeats: something is always outstanding; no answer within the timeout = dead."""
        while True:
            await trio.sleep(min(self.heartbeat, self.timeout / 4))
            now = trio.current_time()
            # the wall-clock time of the last answer (status: "heartbeat N s ago")
            self.last_heartbeat = time.time() - (now - chan.last_rx)
            if chan.outstanding == 0:
                chan.last_rx = now
                try:
                    await chan.submit(P.Ping)
                except LinkDown:
                    return
            elif now - chan.last_rx > self.timeout:
                chan.fail(LinkDown(f"no answer within {self.timeout:g}s"))
                return

    async def _resync_loop(self) -> None:
        """While connected: decide between idle, catch-up, full sync and streaming."""
        while True:
            try:
                await self._step()
            except LinkDown as e:
                if self.chan is not None:
                    self.chan.fail(e)
                return
            except OSError as e:
                log.error("slave %s: resynchronization failed: %s", self.name, e)
                if self.chan is not None:
                    self.chan.fail(LinkDown(f"resynchronization failed: {e}"))
                return
            finally:
                self._missed_during = None   # a resync ended, or failed mid-copy
            if self.mode in ("streaming", "idle", "fractured") and (
                    self.mode != "streaming" or not self.fracture_count()):
                await self._nap(3600)

    async def _step(self) -> None:
        st = self.state
        active = self.engine.db.state == states.ACTIVE
        auto = self.image.get("recovery_policy", "auto") == "auto"
        if self.mode == "fractured":
            return
        if st == states.UNSYNCHRONIZED or self.image.get("sync_progress") is not None:
            # (a full sync asked for during a catch-up finds the image CONSISTENT again)
            if active or self.sync_requested:
                await self._full_sync()
            else:
                self.mode = "idle"
            return
        if self.fracture_count() or self.mode == "catchup":
            if auto or self.sync_requested:
                await self._catch_up()
            else:
                self.mode = "idle"
                log.info("slave %s: %d extents to catch up; recovery_policy is manual: run "
                         "`fusemirror restore`", self.name, self.fracture_count())
            return
        if self.image.get("unreachable_since_catchup") and not self.fracture_count():
            # connected again and nothing was missed meanwhile: no catch-up is needed, and
            # the slave lacks nothing (the flag would otherwise block a promote for good)
            self.image["unreachable_since_catchup"] = False
            self.engine.db_changed()
            log.info("slave %s: reachable again; it missed no write", self.name)
        self.mode = "streaming"

    async def _copy(self, start: int, length: int, *, advance: bool = False) -> None:
        """Copy master bytes [start, start+length) into the stream, ordered with host writes,
        in pieces of at most COPY_CHUNK.

        Each piece is read and queued under the range lock, so a host write to it lands either
        before the read (and is copied) or after the piece in the stream. With ``advance`` (a
        full sync) the sync cursor passes the piece before the lock is released: a host write
        that waited for it is then forwarded, not left for a copy that has already read.
        """
        eng = self.engine
        es = eng.extent_size
        rate = int(self.image.get("sync_rate") or 0)
        end = start + length
        while start < end:
            n = min(COPY_CHUNK, end - start)
            while len(self._window) >= COPY_WINDOW:
                await self._window.pop(0).done.wait()
            exts = range(start // es, (start + n - 1) // es + 1)
            async with eng.locked_range(start, start + n):
                data = await trio.to_thread.run_sync(eng.image.pread, start, n)
                entry = self._enqueue(_Entry(start, data, exts, [], copy=True))
                if advance:
                    self.sync_cursor = start + n
            self._window.append(entry)
            self.catchup_bytes += n
            start += n
            if rate:
                await trio.sleep(n / rate)

    async def _resynced(self, covered: Iterable[int], stamp: int) -> None:
        """A catch-up or full sync has put ``covered`` on the slave (flushed): forget them in
        the fracture log and the missed set — except extents missed again meanwhile (the copy
        may have read them before the write it missed), which the next round copies."""
        again = self._missed_during or set()
        self._missed_during = None
        for e in list(self.missed):
            if self.missed[e] <= stamp and e not in again:
                del self.missed[e]
        done = [e for e in covered if e not in again]
        async with self._fracture_lock:
            await trio.to_thread.run_sync(self.fracture.remove, done)

    async def _catch_up(self) -> None:
        """Copy the fracture log's and the missed extents (only those), then stream."""
        self.mode = "catchup"
        self._set_state("sync_start")
        es = self.engine.extent_size
        t0 = time.monotonic()
        rounds = total = 0
        while True:
            stamp = self._stamp
            self._missed_during = set()
            todo = sorted(set(self.fracture.extents()) | set(self.missed))
            if not todo:
                break
            rounds += 1
            total += len(todo)
            log.info("slave %s: catching up %d extents", self.name, len(todo))
            for e in self.engine.image.read_ahead(todo, es):
                off = e * es
                await self._copy(off, min(es, self.engine.size - off))
            if not await self.flush():
                raise LinkDown("catch-up flush failed")
            await self._resynced(todo, stamp)
        self.mode = "streaming"
        if self.image.get("sync_progress") is None:   # else a full sync was asked meanwhile
            self.sync_requested = False
        self._epoch_open = False
        self.image["unreachable_since_catchup"] = False
        self._set_state("sync_done")
        log.info("slave %s: caught up %d extents in %.2fs%s", self.name, total,
                 time.monotonic() - t0, f" ({rounds} rounds)" if rounds > 1 else "")

    async def _full_sync(self) -> None:
        """Block copy of the whole image behind a cursor (patent: sync), resumable."""
        eng = self.engine
        start = int(self.image.get("sync_progress") or 0)
        stamp = self._stamp
        self._missed_during = set()
        if start:
            # extents missed below the resume point while the link was down
            below = [e for e in set(self.fracture.extents()) | set(self.missed)
                     if e * eng.extent_size < start]
            self.mode = "catchup"
            for e in sorted(below):
                off = e * eng.extent_size
                await self._copy(off, min(eng.extent_size, eng.size - off))
        self.mode = "sync"
        self.sync_cursor = start
        self._sync_from = start
        self.sync_started = time.monotonic()
        self._set_state("sync_start")
        if self.image.get("sync_progress") is None:
            self.image["sync_progress"] = start
            eng.db_changed()
        log.info("slave %s: full sync from %d of %d bytes", self.name, start, eng.size)
        last_persist = time.monotonic()
        while self.sync_cursor < eng.size:
            await self._copy(self.sync_cursor, min(COPY_CHUNK, eng.size - self.sync_cursor),
                             advance=True)
            if time.monotonic() - last_persist > 1.0 or self.sync_cursor >= eng.size:
                mark = self.sync_cursor
                if not await self.flush():
                    raise LinkDown("sync flush failed")
                self.image["sync_progress"] = mark
                eng.db_changed()
                last_persist = time.monotonic()
        # every extent is on the slave now but those missed during the copy (below the
        # cursor: an overflow, a failed write): those are caught up before the sync is done
        await self._resynced(list(self.fracture.extents()) + list(self.missed), stamp)
        self.image["sync_progress"] = None
        self.sync_started = None
        if self.missed or len(self.fracture):
            log.info("slave %s: full sync copied; %d extents written meanwhile were missed",
                     self.name, self.fracture_count())
            eng.db_changed()
            await self._catch_up()
        self.image["unreachable_since_catchup"] = False
        self.sync_requested = False
        self._epoch_open = False
        self.mode = "streaming"
        self._set_state("sync_done")
        log.info("slave %s: full sync done", self.name)

    async def push_db(self, data: dict[str, Any]) -> None:
        """Send a saved copy of the master's database to the slave (ordered with the stream)."""
        if self.chan is None:
            return
        gen = [data["generation"]["counter"], data["generation"]["id"]]
        try:
            async with self._push_lock:     # pairs from two saves must not interleave
                await self.call(lambda s: P.Request(s, "db_prepare", {"db": data}))
                await self.call(lambda s: P.Request(s, "db_commit", {"generation": gen}))
        except (LinkDown, OSError) as e:
            log.warning("slave %s: database update not taken: %s", self.name, e)

    async def drain(self) -> None:
        """Clean stop: let the slave take its backlog, for its timeout at most.

        What it has not taken by then is dropped as missed, so the clean stop records it in
        the fracture log (and the slave is caught up from there) instead of leaving the
        extents logged and the next mount asking for fsck."""
        if not self.accepting or not self.queued_bytes:
            return
        with trio.move_on_after(self.timeout):
            await self.flush()
            return
        log.warning("slave %s: stopping with %d bytes of backlog not taken within %gs: they "
                    "go to its fracture log", self.name, self.queued_bytes, self.timeout)
        self._stopping = True       # no reconnect while the engine closes; not an outage
        if self.chan is not None:
            self.chan.fail(LinkDown("the mirror is stopping"))
        dropped, self._queue = self._queue, collections.deque()
        for entry in dropped:
            self._finish(entry, False)
        self._lost_updates()        # it lacks the tail: not promotable without --force

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.chan is not None:
            self.chan.fail(LinkDown("link stopped"))
