"""Administrative operations on slaves: add, remove, sync, fracture, restore, verify.

Each operation works on an :class:`~fusemirror.engine.Engine`: the running daemon's (reached
through the control channel), or a headless one that an admin command runs itself, under the
unit's lock, when nothing is mounted. One code path either way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Awaitable, Callable, TypeVar

import trio

from . import journal as journal_mod, protocol as P, states
from .engine import Engine
from .errors import FusemirrorError, StateError, UsageError
from .fracture import FractureLog
from .image import Image
from .link import Channel, LinkDown, SlaveLink, parse_address
from .mirrordb import MirrorDB, atomic_write, new_id
from .sizes import format_size
from .unit import UnitPaths

log = logging.getLogger("fusemirror.admin")

T = TypeVar("T")
SECRET = "secret"
VERIFY_CHUNK = 4 << 20


# ---- the shared secret ------------------------------------------------------------------------
def store_secret(paths: UnitPaths, secret_file: str) -> bytes:
    """Copy the agents' shared secret into the unit (mode 0600)."""
    from .agent import read_secret

    secret = read_secret(secret_file)
    write_secret(paths, secret)
    return secret


def write_secret(paths: UnitPaths, secret: bytes) -> None:
    atomic_write(os.path.join(paths.dir, SECRET), secret)


def unit_secret(paths: UnitPaths, secret_file: str | None = None) -> bytes:
    if secret_file:
        return store_secret(paths, secret_file)
    try:
        with open(os.path.join(paths.dir, SECRET), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"{paths.dir} has no shared secret for the agents: pass "
                         "--secret-file FILE (the file the agents were started with)") from None


# ---- links ------------------------------------------------------------------------------------
def fracture_log(paths: UnitPaths, db: MirrorDB, img: dict[str, Any]) -> FractureLog:
    os.makedirs(paths.fracture, mode=0o700, exist_ok=True)
    return FractureLog(os.path.join(paths.fracture, img["id"]),
                       -(-db.size // db.extent_size), db.extent_size, img["id"])


def make_links(engine: Engine, paths: UnitPaths) -> None:
    """One SlaveLink per slave in the database (called before the engine runs)."""
    db = engine.db
    if not db.slaves:
        return
    secret = unit_secret(paths)
    for img in db.slaves:
        engine.links.append(SlaveLink(engine, img, secret, fracture_log(paths, db, img)))


def find_link(engine: Engine, name: str) -> SlaveLink:
    for link in engine.links:
        if name in (link.name, link.addr, link.id):
            return link
        if not link.addr:   # a former master not rejoined yet: no address to match
            continue
        try:
            if parse_address(link.addr)[2] == name:
                return link
        except UsageError:
            pass
    known = ", ".join(link.name for link in engine.links) or "none"
    raise UsageError(f"no slave {name!r} in mirror {engine.db.name!r} (slaves: {known})")


def _require_address(link: SlaveLink, what: str) -> None:
    """A former master not rejoined yet (demoted at a failover) has no address to reach."""
    if not link.addr:
        raise StateError(f"slave {link.name} is a former master that has not rejoined (no "
                         f"address yet), so there is nothing to {what}: `fusemirror add-slave` "
                         "its unit first")


# ---- operations -------------------------------------------------------------------------------
async def add_slave(engine: Engine, paths: UnitPaths, addr: str, *, synchronized: bool,
                    secret: bytes) -> dict[str, Any]:
    """Make the agent create ROOT/NAME (the master's size) and add it to the mirror.

    An existing unit of this mirror rejoins: a former master (demoted) or a former slave is
    taken back under its own image id and caught up from the extents it may differ in (its
    journal and fracture logs, plus everything written here since it left), or fully synced
    when it discarded its data. A unit that changed apart from this mirror is refused.
    """
    from . import lifecycle

    db = engine.db
    parse_address(addr)
    if any(img.get("address") == addr for img in db.images):
        raise UsageError(f"{addr} is already a slave of mirror {db.name!r}")
    state = states.SYNCHRONIZED if synchronized else states.UNSYNCHRONIZED
    rec = {"id": new_id(), "name": addr, "role": "slave", "address": addr, "state": state,
           "cookie": list(db.generation), "timeout": 5.0, "sync_rate": 0,
           "sync_progress": None, "recovery_policy": "auto"}
    slave_db = db.copy()
    slave_db.images.append(dict(rec))
    slave_db.data["self"] = rec["id"]
    try:
        chan = await Channel.connect(addr, secret, db.name)
    except LinkDown as e:
        raise FusemirrorError(f"cannot reach the agent: {e}") from None
    res: dict[str, Any] = {}
    failure: FusemirrorError | None = None
    try:
        async with trio.open_nursery() as n:
            n.start_soon(chan.receiver)
            try:
                res = await chan.request("create", db=slave_db.data)
                unit = res.get("unit")
                if unit is not None:
                    mode = lifecycle.check_rejoin(db, unit)
                    owed, mode = await _rejoin(engine, paths, addr, unit, mode, secret,
                                               synchronized)
                    await chan.request("rejoin_done")
                    state = f"rejoined: {'full sync' if mode == 'full' else 'extents'}"
                    res["owed_extents"] = owed
            except OSError as e:
                failure = FusemirrorError(f"the agent refused: {e.strerror}")
            except LinkDown as e:
                failure = FusemirrorError(f"the agent closed the connection: {e}")
            except FusemirrorError as e:
                failure = e
            n.cancel_scope.cancel()
    finally:
        await chan.aclose()
    if failure is not None:
        raise failure
    if res.get("unit") is None:
        db.images.append(rec)
        db.bump_generation()
        await engine.save_db()
        link = SlaveLink(engine, rec, secret, fracture_log(paths, db, rec))
        engine.add_link(link)
    log.info("slave %s added to mirror %s (%s)", addr, db.name, state)
    return {"name": addr, "state": state, "created": res.get("created"),
            "owed_extents": res.get("owed_extents")}


async def _rejoin(engine: Engine, paths: UnitPaths, addr: str, unit: dict[str, Any],
                  mode: str, secret: bytes, synchronized: bool) -> tuple[int | None, str]:
    """Take back a unit of this mirror; returns (extents owed, "extents" or "full")."""
    db = engine.db
    rec = next((img for img in db.images if img["id"] == unit["image"]), None)
    if rec is None:  # a unit of this mirror the database forgot (removed earlier)
        # nothing recorded what was written here since it left: a full sync, unless the
        # administrator says it is identical (--synchronized, as for a new slave)
        if not synchronized:
            mode = "full"
        rec = {"id": unit["image"], "name": addr, "role": "slave", "address": addr,
               "state": states.SYNCHRONIZED if synchronized else states.UNSYNCHRONIZED,
               "cookie": list(db.generation), "timeout": 5.0, "sync_rate": 0,
               "sync_progress": None, "recovery_policy": "auto"}
        db.images.append(rec)
        engine.add_link(SlaveLink(engine, rec, secret, fracture_log(paths, db, rec)))
    if rec["role"] != "slave":
        raise StateError(f"{addr} holds image {rec['name']}, which this database lists as "
                         f"{rec['role']}")
    if rec["state"] in (states.UNSYNCHRONIZED, states.SYNCHRONIZING):
        # this master already knows it owes the unit a full sync (e.g. fsck -y rebuilt the
        # journal meanwhile): the unit's own report cannot lower that
        mode = "full"
    link = find_link(engine, rec["id"])
    rec.update(address=addr, name=addr)
    rec.pop("rejoin", None)
    link.addr, link.name = addr, addr
    extents = (unit.get("rejoin") or {}).get("extents", [])
    if mode == "full":
        rec["state"] = states.UNSYNCHRONIZED
        rec["sync_progress"] = None
    else:
        rec["state"] = unit["state"] if unit["state"] != states.SYNCHRONIZED else \
            states.CONSISTENT
        if extents:
            async with link._fracture_lock:     # as every other fracture-log update
                await trio.to_thread.run_sync(link.fracture.add, extents)
    owed = None if mode == "full" else link.fracture_count()
    db.bump_generation()
    await engine.save_db()
    link.wake()
    log.info("unit %s rejoins mirror %s as a slave (%s; %d extents it may differ in, plus %d "
             "written here since it left)", addr, db.name, mode, len(extents),
             len(link.fracture))
    return owed, mode


async def remove_slave(engine: Engine, paths: UnitPaths, name: str, *,
                       force: bool) -> dict[str, Any]:
    """Remove a slave (mirror INACTIVE); graceful completes outstanding requests first."""
    db = engine.db
    link = find_link(engine, name)
    if db.state != states.INACTIVE:
        raise StateError(f"mirror is {db.state}; run `fusemirror deactivate {paths.dir}` "
                         "first (a slave is removed from an INACTIVE mirror)")
    if not force and link.accepting:
        if not await link.flush():
            raise FusemirrorError(f"slave {link.name}: outstanding requests did not complete; "
                                  "use --force to remove it anyway")
    engine.remove_link(link)
    link.fracture.close()
    try:
        os.unlink(link.fracture.path)
    except FileNotFoundError:
        pass
    db.data["images"] = [img for img in db.images if img["id"] != link.id]
    db.bump_generation()
    await engine.save_db()      # under the save lock: no older concurrent save lands after it
    log.info("slave %s removed from mirror %s (%s); its data stays", link.name, db.name,
             "forced" if force else "graceful")
    return {"name": link.name, "removed": True}


async def start_sync(engine: Engine, name: str) -> dict[str, Any]:
    """Full sync of a slave from the start, throttled by its sync_rate."""
    link = find_link(engine, name)
    _require_address(link, "sync")
    if link.mode == "fractured":
        raise StateError(f"slave {link.name} is fractured; run `fusemirror restore` first")
    resuming = link.state == states.SYNCHRONIZING and link.image.get("sync_progress")
    if not resuming:
        link.image["sync_progress"] = 0
        if link.state != states.UNSYNCHRONIZED:
            link._set_state("sync_start")
    link.sync_requested = True
    engine.db_changed()
    link.wake()
    return {"name": link.name, "state": link.state,
            "resume_at": int(resuming or 0), "size": engine.size}


async def fracture(engine: Engine, name: str) -> dict[str, Any]:
    """Split a slave off on purpose: its writes go to its fracture log until restore."""
    link = find_link(engine, name)
    if link.mode == "fractured":
        raise StateError(f"slave {link.name} is already fractured; `fusemirror restore` "
                         "rejoins it")
    if link.accepting:
        await link.flush()
    link.mode = "fractured"
    link.image["fractured"] = True
    if link.chan is not None:
        link.chan.fail(LinkDown("fractured by the administrator"))
    engine.db_changed()
    log.info("slave %s fractured", link.name)
    return {"name": link.name, "mode": link.mode}


async def restore(engine: Engine, name: str) -> dict[str, Any]:
    """Rejoin a fractured (or manual-policy) slave: catch up from its fracture log."""
    link = find_link(engine, name)
    _require_address(link, "restore")
    link.image["fractured"] = False
    if link.mode == "fractured":
        link.mode = "down"
    link.sync_requested = True
    engine.db_changed()
    link.wake()
    log.info("slave %s restoring: %d extents to catch up", link.name, link.fracture_count())
    return {"name": link.name, "fracture_extents": link.fracture_count()}


def _ranges(blocks: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


async def verify(engine: Engine, name: str | None,
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Compare master and slave(s) by xxh3 digests per block; report differing block ranges.

    Each chunk is held against host writes while both sides digest it, and the slave's
    request goes through its ordered stream, after every write queued before it.
    """
    # a former master not rejoined yet has no address: nothing to compare with (named, it
    # is refused below as not reachable)
    links = [find_link(engine, name)] if name else [ln for ln in engine.links if ln.addr]
    for link in links:
        _require_address(link, "verify")
    if not links:
        raise UsageError(f"mirror {engine.db.name!r} has no slave to verify")
    bs = engine.db.block_size
    out: dict[str, Any] = {"block_size": bs, "slaves": []}
    for link in links:
        with trio.move_on_after(max(10.0, link.timeout * 2)):
            while link.chan is None or link.mode not in ("streaming", "idle", "catchup",
                                                         "sync"):
                await trio.sleep(0.05)
        if link.chan is None:
            raise FusemirrorError(f"slave {link.name} is not reachable: {link.last_error}")
        diff: list[int] = []
        t0 = time.monotonic()
        for off in range(0, engine.size, VERIFY_CHUNK):
            n = min(VERIFY_CHUNK, engine.size - off)
            async with engine.locked_range(off, off + n):
                ours = await trio.to_thread.run_sync(_digests, engine.image, off, n, bs)
                try:
                    ans = await link.call(lambda s, o=off, n=n: P.ReadDigests(s, o, n, bs))
                except LinkDown as e:
                    raise FusemirrorError(f"slave {link.name}: {e}") from None
            theirs = ans.digests
            first = off // bs
            diff.extend(first + i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            if progress:
                progress(link.name, off + n, engine.size)
        out["slaves"].append({"name": link.name, "differing_blocks": len(diff),
                              "ranges": _ranges(diff), "seconds": round(time.monotonic() - t0, 3),
                              "equal": not diff})
    return out


def _digests(image: Image, off: int, length: int, bs: int) -> list[int]:
    from .agent import _digests as d

    return d(image, off, length, bs)


# ---- headless engine ----------------------------------------------------------------------
async def run_headless(paths: UnitPaths, fn: Callable[[Engine], Awaitable[T]]) -> T:
    """Run ``fn`` on an engine over the unit without FUSE (the caller holds the unit lock)."""
    from .daemon import open_master

    db, scan = open_master(paths, for_what="used")
    journal = journal_mod.Journal(paths.journal, scan)
    image = Image(paths.image)
    engine = Engine(paths.dir, db, journal, image)
    try:
        make_links(engine, paths)
        failure: Exception | None = None
        result: Any = None
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            try:
                result = await fn(engine)
            except Exception as e:  # re-raised below, not wrapped in an exception group
                failure = e
            finally:
                with trio.CancelScope(shield=True):
                    await engine.close()
                n.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result
    finally:
        for link in engine.links:
            link.fracture.close()
        journal.close()
        image.close()


async def wait_synced(engine: Engine, name: str,
                      progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Wait until a slave's sync or catch-up is done (streaming, nothing to catch up).

    Fails (instead of waiting for ever, holding the unit) once the slave has been unreachable
    for its timeout; the saved progress lets the next `fusemirror sync` resume."""
    link = find_link(engine, name)
    down = DownFor()
    while True:
        st = link.status()
        if progress:
            progress(st)
        if link.mode == "streaming" and not link.fracture_count() and \
                link.image.get("sync_progress") is None and not link.sync_requested:
            return st
        if down.longer_than(link.timeout + link.heartbeat, link.reachable):
            raise unreachable_error(st, "run `fusemirror sync` again when it is back")
        await trio.sleep(0.2)


class DownFor:
    """For a command waiting on a slave: has it been unreachable, without a break, for
    longer than a limit? (Fed one observation per poll.)"""

    def __init__(self) -> None:
        self.since: float | None = None

    def longer_than(self, limit: float, reachable: bool) -> bool:
        now = time.monotonic()
        if reachable:
            self.since = None
        elif self.since is None:
            self.since = now
        return self.since is not None and now - self.since > limit


def unreachable_error(st: dict[str, Any], then: str) -> FusemirrorError:
    """A sync or catch-up that cannot go on: the slave is unreachable (status ``st``)."""
    where = ""
    if st.get("sync_progress"):
        where = f"; the sync resumes at {format_size(int(st['sync_progress']))}"
    return FusemirrorError(f"slave {st['name']} is unreachable "
                           f"({st.get('last_error') or 'no answer'}){where}: {then}")


__all__ = ["add_slave", "remove_slave", "start_sync", "fracture", "restore", "verify",
           "run_headless", "make_links", "unit_secret", "store_secret"]
