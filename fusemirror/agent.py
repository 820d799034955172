"""``fusemirror serve ROOT``: the slave agent, one per host, serving every slave unit under ROOT.

The agent accepts authenticated connections from masters (protocol in :mod:`.protocol`), and
applies their requests to ``ROOT/NAME`` strictly in order: a write is acknowledged after its
``pwrite``, a flush after its ``fdatasync`` — never on receipt. It never writes outside an image,
never touches a path outside ROOT (NAME is one path component, checked), and never dies of bad
input: a peer that breaks the protocol is disconnected with one log line.

A new connection for a unit fences the old one (the old connection is cancelled and finished
before the new one may write). The agent holds the lock of every unit it has open.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
from typing import Any

import trio
import xxhash

from . import protocol as P, states
from .errors import CorruptError, FusemirrorError, StateError, UsageError, errno_for
from .image import Image, WriteBehind
from .mirrordb import MirrorDB, atomic_write, relation
from .unit import UnitLock, UnitPaths, create_slave_unit, is_unit

log = logging.getLogger("fusemirror.agent")

HANDSHAKE_TIMEOUT = 10.0
AGENT_CONTROL = ".fusemirror-agent.sock"
RCVLOWAT_MAX = 256 * 1024   # the most a read waits to accumulate (see _next)
WRITE_BEHIND = 4 << 20   # bytes written to a slave image before its write-back is started


def read_secret(path: str) -> bytes:
    """The shared secret from ``path``: its bytes without a trailing newline."""
    try:
        with open(path, "rb") as f:
            secret = f.read().rstrip(b"\r\n")
    except OSError as e:
        raise UsageError(f"cannot read secret file {path}: {e.strerror}") from None
    if len(secret) < 8:
        raise UsageError(f"secret file {path} holds fewer than 8 bytes")
    return secret


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bad address {text!r}: use HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class OpenUnit:
    """A slave unit the agent holds: its lock, its image, and the session writing to it."""

    def __init__(self, paths: UnitPaths, db: MirrorDB, write_behind: int = WRITE_BEHIND) -> None:
        self.paths = paths
        self.db = db
        self.lock = UnitLock(paths, "agent").acquire()
        self.image = Image(paths.image)
        self.session: "Session | None" = None
        self.stats: dict[str, int] = {}
        self.write_behind = WriteBehind(self.image, write_behind, self.stats,
                                        f"unit {os.path.basename(paths.dir)}")

    def close(self) -> None:
        self.image.close()
        self.lock.release()


class Agent:
    def __init__(self, root: str, secret: bytes, write_behind: int = WRITE_BEHIND) -> None:
        self.root = os.path.abspath(root)
        self.secret = secret
        self.write_behind = write_behind
        self.units: dict[str, OpenUnit] = {}
        self.connections = 0
        self.stale_logged: dict[str, float] = {}   # unit -> when a stale master was logged

    def unit_dir(self, name: str) -> str:
        if not P.valid_unit_name(name):
            raise P.ProtocolError(f"bad unit name {name!r}")
        path = os.path.join(self.root, name)
        if os.path.dirname(path) != self.root:
            raise P.ProtocolError(f"unit name {name!r} leaves the root")
        return path

    async def release(self, name: str, by: str = "an administrator") -> None:
        """Stop serving unit ``name``: fence its session and give up its lock."""
        u = self.units.get(name)
        if u is None:
            return
        if u.session is not None:
            s = u.session
            s.fenced = True
            s.scope.cancel()
            await s.done.wait()
        self.units.pop(name, None)
        u.close()
        log.info("unit %s released (asked by %s)", name, by)

    async def control(self, req: dict[str, Any]) -> Any:
        """The agent's control socket (ROOT/.fusemirror-agent.sock): release a unit, status."""
        if req["cmd"] == "release":
            await self.release(str(req["unit"]))
            return {"released": req["unit"]}
        if req["cmd"] == "status":
            now = time.monotonic()
            sessions = {n: {"peer": u.session.peer, "idle": round(now - u.session.last_rx, 3)}
                        for n, u in sorted(self.units.items()) if u.session is not None}
            return {"root": self.root, "units": sorted(self.units), "sessions": sessions,
                    "connections": self.connections, "write_behind": self.write_behind,
                    "writebacks": {n: u.stats["writebacks"] for n, u in sorted(self.units.items())}}
        raise UsageError(f"unknown agent command {req['cmd']!r}")

    async def serve(self, host: str, port: int, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        bound = listeners[0].socket.getsockname()
        log.info("agent serving %s on %s:%s", self.root, bound[0], bound[1])
        task_status.started(bound[1])
        try:
            await trio.serve_listeners(self._connection, listeners)
        finally:
            for u in self.units.values():
                u.close()
            self.units.clear()

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        self.connections += 1
        conn = P.Connection("agent", self.secret)
        session: Session | None = None
        why = "closed by peer"
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                ev = await _next(conn, stream)
                while not isinstance(ev, P.Authenticated):
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(out)
                    ev = await _next(conn, stream)
                await stream.send_all(conn.data_to_send())
            log.info("%s: authenticated for unit %s of mirror %s", peer, ev.unit, ev.mirror)
            session = Session(self, conn, stream, peer, ev.unit, ev.mirror)
            await session.run()
        except P.ProtocolError as e:
            why = f"protocol error: {e}"
        except trio.TooSlowError:
            why = "handshake timed out"
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            why = f"connection lost: {e}"
        except EOFError:
            pass
        except Fenced:
            why = "fenced by a newer connection for the same unit"
        finally:
            if session is not None:
                session.release()
            log.info("%s: disconnected: %s", peer, why)
            with trio.CancelScope(shield=True):
                await stream.aclose()


class Fenced(Exception):
    pass


class PromotedError(FusemirrorError):
    """The unit a master asked for is a master itself (promoted): stale master or split."""

    def __init__(self, generation: dict[str, Any]) -> None:
        super().__init__("promoted:" + json.dumps(generation))


async def _next(conn: P.Connection, stream: trio.SocketStream) -> P.Event:
    """The next event; reads straight into the connection's buffer (``recv_into``), so a
    WRITE's data is not copied between the socket and the image.

    After authentication the socket's ``SO_RCVLOWAT`` is kept at what the current frame still
    needs (at most RCVLOWAT_MAX): a 1 MiB frame arriving in 64 KiB segments then wakes the
    agent a few times instead of once per segment. Only bytes the peer has announced are
    waited for, and EOF or an error still wakes it.
    """
    sock = stream.socket
    while True:
        ev = conn.next_event()
        if ev is not None:
            return ev
        if conn.authenticated:
            lowat = min(conn.missing(), RCVLOWAT_MAX)
            if lowat != getattr(sock, "_fm_lowat", 1):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                sock._fm_lowat = lowat  # type: ignore[attr-defined]
        n = await sock.recv_into(conn.receive_buffer())
        if not n:
            raise EOFError
        conn.received(n)


class Session:
    """One authenticated master connection, bound to one unit name."""

    def __init__(self, agent: Agent, conn: P.Connection, stream: trio.SocketStream,
                 peer: str, unit: str, mirror: str) -> None:
        self.agent = agent
        self.conn = conn
        self.stream = stream
        self.peer = peer
        self.name = unit
        self.mirror = mirror
        self.path = agent.unit_dir(unit)
        self.unit: OpenUnit | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.fenced = False
        self._nursery: trio.Nursery | None = None
        self.last_rx = time.monotonic()   # the master's last frame (a live master pings)

    async def run(self) -> None:
        """Read requests in one task, apply them in order in another; the first failure of
        either ends the session and is re-raised here (not wrapped in an exception group)."""
        send, recv = trio.open_memory_channel[P.Event](64)
        self.error: BaseException | None = None
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._guard, self._reader(send), nursery.cancel_scope)
                    nursery.start_soon(self._guard, self._apply_all(recv), nursery.cancel_scope)
        finally:
            self.done.set()
        if self.fenced:
            raise Fenced()
        if self.error is not None:
            raise self.error

    async def _guard(self, coro: Any, scope: trio.CancelScope) -> None:
        try:
            await coro
        except (P.ProtocolError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                ConnectionError) as e:
            if self.error is None:
                self.error = e
        scope.cancel()

    async def _reader(self, send: trio.MemorySendChannel[P.Event]) -> None:
        # close synchronously: ``async with`` would checkpoint on the way out and let the
        # applier see the closed channel (EOFError) and record it before the reader's error,
        # logging a protocol error as "closed by peer"
        with send:
            while True:
                ev = await _next(self.conn, self.stream)
                self.last_rx = time.monotonic()
                await send.send(ev)

    async def _apply_all(self, recv: trio.MemoryReceiveChannel[P.Event]) -> None:
        out = bytearray()
        async with recv:
            async for ev in recv:
                answer = await self._apply(ev)
                out += self.conn.send(answer)
                # answers go out together while more requests are already waiting
                if recv.statistics().current_buffer_used == 0 or len(out) > 65536:
                    await self.stream.send_all(out)
                    out = bytearray()
        raise EOFError

    def release(self) -> None:
        u = self.unit
        if u is not None and u.session is self:
            u.session = None

    # ---- requests ------------------------------------------------------------------------
    async def _apply(self, ev: P.Event) -> P.Event:
        if isinstance(ev, P.Ping):
            return P.Ack(ev.seq)
        if isinstance(ev, P.Request):
            return await self._request(ev)
        u = self._require_open(ev)
        if isinstance(ev, P.Write):
            self._check_range(u, ev.offset, len(ev.data))
            try:
                # in order anyway: a thread hand-off would only add ~150 us per write
                u.image.pwrite(ev.offset, ev.data)
            except OSError as e:
                log.error("unit %s: write of %d bytes at %d failed: %s", self.name,
                          len(ev.data), ev.offset, e)
                return P.Error(ev.seq, e.errno or errno.EIO, str(e))
            # write-behind (image.WriteBehind), started in the session's nursery so the
            # image is not closed under it; a master's FLUSH then finds little left to write
            if u.write_behind.due(len(ev.data)) and self._nursery is not None:
                self._nursery.start_soon(trio.to_thread.run_sync, u.write_behind.start)
            return P.Ack(ev.seq)
        if isinstance(ev, P.Flush):
            try:
                u.write_behind.flushed()
                await trio.to_thread.run_sync(u.image.fdatasync)
            except OSError as e:
                log.error("unit %s: fdatasync failed: %s", self.name, e)
                return P.Error(ev.seq, e.errno or errno.EIO, str(e))
            return P.Ack(ev.seq)
        if isinstance(ev, (P.ReadDigests, P.Read)):
            self._check_range(u, ev.offset, ev.length)
            try:
                if isinstance(ev, P.ReadDigests):
                    digests = await trio.to_thread.run_sync(_digests, u.image, ev.offset,
                                                            ev.length, ev.block_size)
                    return P.Digests(ev.seq, digests)
                data = await trio.to_thread.run_sync(u.image.pread, ev.offset, ev.length)
                return P.Data(ev.seq, data)
            except OSError as e:
                log.error("unit %s: read at %d failed: %s", self.name, ev.offset, e)
                return P.Error(ev.seq, e.errno or errno.EIO, str(e))
        raise P.ProtocolError(f"unexpected {type(ev).__name__}")

    def _require_open(self, ev: P.Event) -> OpenUnit:
        if self.unit is None:
            raise P.ProtocolError(f"{type(ev).__name__} before the unit was opened")
        return self.unit

    def _check_range(self, u: OpenUnit, off: int, length: int) -> None:
        if off < 0 or length < 0 or off + length > u.image.size:
            raise P.ProtocolError(f"range {off}+{length} is outside unit {self.name} "
                                  f"({u.image.size} bytes)")

    async def _request(self, ev: P.Request) -> P.Event:
        try:
            if ev.op == "create":
                result = await self._create(ev.args)
            elif ev.op == "open":
                result = await self._open(ev.args)
            elif ev.op == "db_write":
                result = self._db_write(ev.args)
            elif ev.op == "db_prepare":
                result = self._db_prepare(ev.args)
            elif ev.op == "db_commit":
                result = self._db_commit(ev.args)
            elif ev.op == "describe":
                if not is_unit(self.path):
                    raise FusemirrorError(f"no unit {self.name} under {self.agent.root}")
                db = MirrorDB.load(self.path)
                result = {"db": db.data, "unit": self._summary(db),
                          "served": self.name in self.agent.units}
            elif ev.op == "rejoin_done":
                result = self._rejoin_done()
            elif ev.op == "promote":
                result = await self._promote(ev.args)
            elif ev.op == "info":
                result = self._info()
            else:
                raise P.ProtocolError(f"unknown request {ev.op!r}")
        except PromotedError as e:
            return P.Error(ev.seq, errno.ESTALE, e.msg)
        except FusemirrorError as e:
            return P.Error(ev.seq, errno_for(e), e.msg)
        except OSError as e:
            return P.Error(ev.seq, e.errno or errno.EIO, f"{ev.op}: {e.strerror or e}")
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
            # malformed arguments (a missing key, a size that is no number, a database that
            # is no dict): a protocol error for this connection, not the agent's death
            raise P.ProtocolError(f"malformed {ev.op!r} request: {e!r}") from None
        return P.Reply(ev.seq, result)

    async def _create(self, args: dict[str, Any]) -> dict[str, Any]:
        """add-slave: make ROOT/NAME with an image of the master's size (or accept one)."""
        db = _peer_db(args["db"])
        size = int(db.size)
        if is_unit(self.path):
            old = MirrorDB.load(self.path)
            if old.mirror["id"] != db.mirror["id"]:
                raise FusemirrorError(f"unit {self.name} belongs to another mirror "
                                      f"({old.name!r})")
            if old.size != size:
                raise FusemirrorError(f"unit {self.name} has {old.size} bytes, the mirror "
                                      f"{size}: refusing a size mismatch")
            log.info("unit %s exists for mirror %s: rejoining", self.name, db.name)
            return {"created": False, "unit": self._summary(old)}
        if os.path.lexists(self.path):
            raise FusemirrorError(f"{self.path} exists and is not a fusemirror unit")
        await trio.to_thread.run_sync(create_slave_unit, self.path, db)
        atomic_write(os.path.join(self.path, "secret"), self.agent.secret)
        log.info("unit %s created for mirror %s (%d bytes)", self.name, db.name, size)
        return {"created": True}

    def _summary(self, db: MirrorDB) -> dict[str, Any]:
        """What a master needs to know to take an existing unit back (rejoin)."""
        from .lifecycle import rejoin_info

        me = db.self_image
        return {"name": self.name, "image": me["id"], "role": me["role"],
                "state": me["state"], "generation": db.data["generation"],
                "rejoin": rejoin_info(self.path)}

    async def _open(self, args: dict[str, Any]) -> dict[str, Any]:
        if not is_unit(self.path):
            raise FusemirrorError(f"no unit {self.name} under {self.agent.root}; "
                                  "add it with `fusemirror add-slave`")
        opener = args.get("generation")
        if opener is not None:
            # Before anyone is fenced: a master whose generation this unit's database has gone
            # past (another unit promoted and pushed here meanwhile) or apart from is stale;
            # it must not cut off the session of the master that replaced it. An opener this
            # unit's copy descends from is not ("ahead": a new master whose promotion this
            # slave missed, "unknown": away very long). An UNSYNCHRONIZED unit that names no
            # other master (it discarded its data) may be taken by a full sync.
            current = MirrorDB.load(self.path)
            if relation(opener, current.data["generation"]) in ("behind", "diverged"):
                named = current.master
                discarded = current.self_image["state"] == states.UNSYNCHRONIZED and (
                    named is None or named["id"] == args.get("master"))
                if not discarded:
                    self._refuse_stale(current)
        existing = self.agent.units.get(self.name)
        if existing is not None and existing.session is not None \
                and existing.session is not self:
            old = existing.session
            log.info("unit %s: new connection from %s fences the one from %s", self.name,
                     self.peer, old.peer)
            old.fenced = True
            old.scope.cancel()
            await old.done.wait()
        if existing is None:
            db = MirrorDB.load(self.path)
            if db.self_image["role"] == "master":
                self._refuse_stale(db)
            existing = OpenUnit(UnitPaths(self.path), db, self.agent.write_behind)
            self.agent.units[self.name] = existing
        db = existing.db = MirrorDB.load(self.path)
        if args.get("mirror_id") != db.mirror["id"]:
            raise FusemirrorError(f"unit {self.name} belongs to another mirror ({db.name!r})")
        if db.self_image["role"] == "master":
            self._release_unit(existing)
            self._refuse_stale(db)
        if int(args.get("size", -1)) != existing.image.size:
            raise FusemirrorError(f"unit {self.name} has {existing.image.size} bytes, the "
                                  f"master {args.get('size')}")
        existing.session = self
        self.unit = existing
        return self._info()

    def _db_write(self, args: dict[str, Any]) -> dict[str, Any]:
        """The master's copy of the database, for the unit it has open (same or newer only)."""
        u = self._require_open(P.Request(0, "db_write"))
        db = self._accept_db(args["db"], MirrorDB.load(u.paths.dir))
        db.save(u.paths.dir)
        u.db = db
        return {"generation": list(db.generation)}

    def _accept_db(self, data: dict[str, Any], current: MirrorDB) -> MirrorDB:
        db = _peer_db(data)
        if db.mirror["id"] != current.mirror["id"]:
            raise FusemirrorError("database of another mirror")
        for key in ("size", "block_size", "extent_size"):
            if db.mirror[key] != current.mirror[key]:
                raise FusemirrorError(f"database refused: {key} {db.mirror[key]} differs from "
                                      f"this unit's {current.mirror[key]}")
        if current.self_image["role"] == "master":
            raise FusemirrorError(f"unit {self.name} is a master now; it takes no database "
                                  "from another member")
        rel = db.relation(current.data["generation"])
        named, theirs = current.master, db.master
        discarded = current.self_image["state"] == states.UNSYNCHRONIZED and (
            named is None or theirs is not None and theirs["id"] == named["id"])
        if rel not in ("same", "ahead", "unknown") and not discarded:
            raise FusemirrorError(f"database generation {db.generation[0]} is {rel} of this "
                                  f"unit's {current.generation[0]}: refused")
        db.data["self"] = current.data["self"]
        if not any(img["id"] == db.data["self"] for img in db.images):
            raise FusemirrorError(f"the database no longer lists unit {self.name}")
        return db

    def _db_prepare(self, args: dict[str, Any]) -> dict[str, Any]:
        """Phase one of a database change: validated and stored aside, not yet current."""
        if not is_unit(self.path):
            raise FusemirrorError(f"no unit {self.name}")
        current = MirrorDB.load(self.path)
        db = self._accept_db(args["db"], current)
        if current.self_image.get("discarded"):
            # `demote --discard` here: a change pushed by another member does not undo it;
            # only the master that connects, sees the mark and fully syncs the unit does
            # (its db_write)
            me = db.self_image
            me.update(state=states.UNSYNCHRONIZED, sync_progress=None, discarded=True)
        atomic_write(os.path.join(self.path, "mirror.json.prepared"),
                     json.dumps(db.data).encode())
        return {"prepared": list(db.generation)}

    def _db_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Phase two: the prepared copy becomes current (if it is the generation named)."""
        pp = os.path.join(self.path, "mirror.json.prepared")
        try:
            with open(pp) as f:
                db = MirrorDB(json.load(f))
        except FileNotFoundError:
            raise FusemirrorError("nothing prepared") from None
        if list(db.generation) != list(args["generation"]):
            raise FusemirrorError("the prepared generation differs from the committed one")
        before = MirrorDB.load(self.path).master
        db.save(self.path)
        os.unlink(pp)
        u = self.agent.units.get(self.name)
        if u is not None:
            u.db = db
            after = db.master
            s = u.session
            if s is not None and s is not self and \
                    (before or {}).get("id") != (after or {}).get("id"):
                # the mirror has another master now (a promotion elsewhere, or this one
                # declared lost): the session of the one it replaced writes no more here;
                # reconnecting, it is refused as stale (see _open)
                log.info("unit %s: the mirror's master changed; fencing the session from %s",
                         self.name, s.peer)
                s.fenced = True
                s.scope.cancel()
        log.info("unit %s: mirror database generation %d committed", self.name,
                 db.generation[0])
        return {"generation": list(db.generation)}

    def _rejoin_done(self) -> dict[str, Any]:
        try:
            os.unlink(os.path.join(self.path, "rejoin.json"))
        except FileNotFoundError:
            pass
        return {}

    def _release_unit(self, u: OpenUnit) -> None:
        if self.agent.units.get(self.name) is u:
            del self.agent.units[self.name]
        u.close()
        self.unit = None

    async def _promote(self, args: dict[str, Any]) -> dict[str, Any]:
        """`fusemirror promote HOST:PORT/NAME`: release the unit, promote it, push the change."""
        from . import lifecycle
        from .unit import UnitLock

        paths = UnitPaths(self.path)
        force = bool(args.get("force"))
        if self.unit is not None:
            # releasing the unit fences the session holding it, here this one: it would cancel
            # itself and end as "fenced", promoting nothing (the CLI always asks on a fresh one)
            raise StateError(f"unit {self.name} is open on this connection; ask for the "
                             "promote on a connection that has not opened it")
        current = MirrorDB.load(paths.dir)
        lifecycle.check_promote(current, paths, force=force)  # before letting go
        await lifecycle.check_promote_members(current, self.agent.secret, force=force)
        await self.agent.release(self.name, by=self.peer)
        with UnitLock(paths, "promote"):
            db = lifecycle.promote(paths, force=force)
        res = await lifecycle.push_db(db, self.agent.secret)
        with UnitLock(paths, "promote"):
            db.save(paths.dir)
        log.info("unit %s promoted to master of %s; the agent no longer serves it", self.name,
                 db.name)
        return {"generation": list(db.generation), "members": res}

    def _refuse_stale(self, db: MirrorDB) -> None:
        """A master asks for a unit that was promoted, or whose mirror has another master or
        a newer generation: refuse. Logged as an error once a
        minute per unit (the stale master retries every heartbeat), at debug level between."""
        g = db.data["generation"]
        now = time.monotonic()
        last = self.agent.stale_logged.get(self.name)
        level = logging.ERROR if last is None or now - last >= 60 else logging.DEBUG
        if level == logging.ERROR:
            self.agent.stale_logged[self.name] = now
        why = "it was promoted" if db.self_image["role"] == "master" else \
            "its mirror has moved on without that master"
        log.log(level, "unit %s refused to a master (%s): %s (generation %d:%s); the master "
                "connecting is stale or split from it", self.name, self.peer, why,
                g["counter"], g["id"])
        raise PromotedError(g)

    def _info(self) -> dict[str, Any]:
        u = self.unit
        if u is None:
            return {"open": False}
        return {"open": True, "size": u.image.size, "db": u.db.data}


def _peer_db(data: Any) -> MirrorDB:
    """A database copy a master sent: one that fails validation is a malformed request (a
    protocol error for that connection), never stored."""
    try:
        return MirrorDB(data).validate()
    except CorruptError as e:
        raise ValueError(e.msg) from None


def _digests(image: Image, off: int, length: int, bs: int) -> list[int]:
    out = []
    end = off + length
    while off < end:
        chunk = image.pread(off, min(1 << 20, end - off))
        mv = memoryview(chunk)
        out.extend(xxhash.xxh3_64_intdigest(mv[i:i + bs]) for i in range(0, len(mv), bs))
        off += len(chunk)
    return out


async def run_agent(root: str, listen: str, secret_file: str, *,
                    write_behind: int = WRITE_BEHIND,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    host, port = parse_hostport(listen)
    if not os.path.isdir(root):
        raise UsageError(f"{root}: no such directory")
    agent = Agent(root, read_secret(secret_file), write_behind)
    from . import control

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(agent.serve, host, port)
        await nursery.start(control.serve, os.path.join(agent.root, AGENT_CONTROL),
                            agent.control)
        task_status.started(bound)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("got %s: stopping", signal.Signals(sig).name)
                nursery.cancel_scope.cancel()
                break
