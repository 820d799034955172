"""Roles and the mirror's life: promote, demote, destroy, rejoin (patent: administrative
operations), and pushing mirror-database changes to every reachable member.

Every member keeps a full copy of the mirror database. A change of roles or configuration
starts a new *generation* (counter + random id, with its history: the patent's cookie) and goes
to every reachable member in two steps — ``db_prepare`` (stored aside) then ``db_commit``
(made current) — so a member either has the whole change or none of it; a member that does not
acknowledge is marked unreachable in the committed copy. Comparing generations tells a member
that missed changes ("behind", brought up to date) from two members that changed apart
("diverged": a split brain, never merged silently).

These functions run on a unit directory whose lock the caller holds.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import trio

from . import faults, fracture, journal as journal_mod, states
from .errors import FusemirrorError, StateError, UsageError
from .link import Channel, LinkDown
from .mirrordb import MirrorDB, atomic_write
from .unit import UnitPaths

log = logging.getLogger("fusemirror.lifecycle")

REJOIN = "rejoin.json"


# ---- pushing the database -------------------------------------------------------------------

def _why(e: BaseException, timeout: float) -> str:
    """A member's failure in words: an agent's refusal without the errno ("[Errno 22] ...")."""
    if isinstance(e, trio.TooSlowError):
        return f"no answer within {timeout:g}s"
    if isinstance(e, OSError) and e.strerror:
        return str(e.strerror)
    return str(e)


async def push_db(db: MirrorDB, secret: bytes, *, skip: set[str] = frozenset(),
                  timeout: float = 5.0) -> dict[str, str]:
    """Prepare, then commit, ``db`` on every member with an address (but ``skip``).

    Returns {image name: "ok" | reason}. Members that fail are marked unreachable in ``db``.
    """
    results: dict[str, str] = {}
    chans: dict[str, Channel] = {}

    async def prepare(img: dict[str, Any]) -> None:
        try:
            chan = await Channel.connect(img["address"], secret, db.name, timeout=timeout)
        except LinkDown as e:
            results[img["name"]] = f"unreachable: {e}"
            return
        try:
            async with trio.open_nursery() as n:
                n.start_soon(chan.receiver)
                try:
                    with trio.fail_after(timeout):
                        await chan.request("db_prepare", db=db.data)
                    results[img["name"]] = "prepared"
                    chans[img["name"]] = chan
                except (LinkDown, OSError, trio.TooSlowError) as e:
                    results[img["name"]] = f"refused: {_why(e, timeout)}"
                if img["name"] not in chans:
                    n.cancel_scope.cancel()
                else:
                    await commit_event.wait()
                    try:
                        with trio.fail_after(timeout):
                            await chan.request("db_commit", generation=list(db.generation))
                        results[img["name"]] = "ok"
                    except (LinkDown, OSError, trio.TooSlowError) as e:
                        results[img["name"]] = f"commit failed: {_why(e, timeout)}"
                    n.cancel_scope.cancel()
        finally:
            await chan.aclose()

    commit_event = trio.Event()
    members = [img for img in db.images if img.get("address") and img["id"] not in skip
               and img["id"] != db.data["self"]]
    async with trio.open_nursery() as n:
        for img in members:
            n.start_soon(prepare, img)
        with trio.move_on_after(timeout + 1):
            while any(img["name"] not in results for img in members):
                await trio.sleep(0.01)
        for img in members:
            if results.get(img["name"]) != "prepared":
                img["reachable"] = False
        commit_event.set()
    return results


# ---- promote / demote / destroy -------------------------------------------------------------
def _demote_record(img: dict[str, Any]) -> None:
    """Record an image as a former master: a slave to rejoin (address unknown until then)."""
    img["role"] = "slave"
    img["state"] = states.CONSISTENT
    img["rejoin"] = True
    img["lost"] = True          # consumed by the next promote (see there)
    img["address"] = img.get("agent_address")
    img["reachable"] = False
    img["recovery_policy"] = "auto"


def check_promote(db: MirrorDB, paths: UnitPaths, *, force: bool) -> None:
    """Raise StateError if this unit may not be promoted (see :func:`promote`). Asked before
    the agent lets go of the unit too, so a refused promote leaves replication running."""
    me = db.self_image
    if me["role"] == "master":
        raise StateError(f"{paths.dir} is already the master of mirror {db.name!r}")
    master = db.master
    if master is not None and not force:
        raise StateError(
            f"mirror {db.name!r} still has a master ({master['name']}); demote it first "
            f"(`fusemirror demote DIR` on its host, or `fusemirror demote {paths.dir}` when it "
            "is lost), or promote with --force")
    if me["state"] not in (states.SYNCHRONIZED, states.CONSISTENT) and not force:
        raise StateError(f"image {me['name']} is {me['state']}; only a SYNCHRONIZED or "
                         "CONSISTENT slave can be promoted (--force takes its data as it is)")
    if rejoin_info(paths.dir) is not None and not force:
        # a demoted former master: whatever the mirror wrote since its demotion is not here
        raise StateError(f"{paths.dir} was demoted and has not rejoined; it lacks what the "
                         "mirror wrote since. Add it as a slave of the current master "
                         "(`fusemirror add-slave MASTERDIR HOST:PORT/NAME`), or promote "
                         "--force to take its data as it is")
    if me.get("unreachable_since_catchup") and not force:
        raise StateError(f"image {me['name']} was UNREACHABLE since its last catch-up and may "
                         "lack writes; promote with --force to accept that")


def promote(paths: UnitPaths, *, force: bool) -> MirrorDB:
    """Make this slave unit the master (preconditions of the patent; --force overrides)."""
    db = MirrorDB.load(paths.dir)
    check_promote(db, paths, force=force)
    me = db.self_image
    master = db.master
    if master is not None:
        log.warning("promote --force: demoting master %s, which cannot be asked", master["name"])
        _demote_record(master)
    # A master that was lost (demoted from a slave's unit, here with --force, or demoted on
    # its own unit after a crash, its journal not recovered) could not say what each slave
    # holds: writes in flight when it stopped, or missed while a slave
    # was unreachable, may differ between this unit and another slave, and this unit's
    # fracture logs know nothing of them. Every other slave gets a full sync from here. (A
    # master that demoted itself cleanly pushed the slaves' states as they are.)
    lost_ids = {img["id"] for img in db.images if img.pop("lost", False)}
    if master is not None:
        lost_ids.add(master["id"])
    if lost_ids:
        for img in db.slaves:
            # the lost master itself rejoins by its own list (rejoin.json) plus what is
            # written from here on; every other copy, a former master not rejoined yet
            # included, may lack what only the lost master knew
            if img["id"] != me["id"] and img["id"] not in lost_ids:
                img["state"] = states.UNSYNCHRONIZED
                img["sync_progress"] = None
                img.pop("unreachable_since_catchup", None)
    me["role"] = "master"
    me["state"] = states.SYNCHRONIZED
    me["recovery_policy"] = "manual"
    me["address"] = None
    me.pop("unreachable_since_catchup", None)
    me.pop("fractured", None)
    me.pop("rejoin", None)
    db.mirror["state"] = states.INACTIVE
    db.bump_generation()
    _reset_journal(paths, db)
    db.save(paths.dir)
    try:
        os.unlink(os.path.join(paths.dir, REJOIN))   # promote --force of a demoted master
    except FileNotFoundError:
        pass
    log.info("%s promoted to master of %s (generation %d)", paths.dir, db.name,
             db.generation[0])
    return db


def demote(paths: UnitPaths, *, force: bool, discard: bool) -> MirrorDB:
    """Demote the master held by this unit, or — on a slave unit — its lost master."""
    db = MirrorDB.load(paths.dir)
    me = db.self_image
    if me["role"] == "slave":
        if discard:
            # a slave copy that sided with the wrong side of a split brain: whichever master
            # takes it replaces its data with a full sync (its lost master, if any, is left
            # as recorded: demote it separately)
            me["state"] = states.UNSYNCHRONIZED
            me["sync_progress"] = None
            me.pop("unreachable_since_catchup", None)
            # marked, not a generation of its own (that would read as newer or apart from
            # every other member's and block them): a master finding the mark at the same
            # generation fully syncs it (SlaveLink._check_generation)
            me["discarded"] = True
            db.save(paths.dir)
            log.info("%s: slave data discarded; it is taken back with a full sync", paths.dir)
            return db
        master = db.master
        if master is None:
            raise StateError(f"mirror {db.name!r} has no master; promote a slave: "
                             f"`fusemirror promote {paths.dir}`")
        _demote_record(master)
        db.mirror["state"] = states.INACTIVE
        db.bump_generation()
        db.save(paths.dir)
        log.info("master %s demoted in %s's database", master["name"], paths.dir)
        return db
    if db.state != states.INACTIVE and not force:
        raise StateError(f"mirror is {db.state}; run `fusemirror deactivate {paths.dir}` "
                         "first (or demote --force a master that crashed)")
    # What this unit may hold that the others do not: its logged extents and what its
    # slaves missed. The new master copies exactly those back when it takes this unit.
    divergent: set[int] = set()
    damaged = None
    try:
        divergent |= journal_mod.scan(paths.journal,
                                      mirror_id=bytes.fromhex(db.mirror["id"])).active
    except Exception as e:  # CorruptError, OSError: the journal cannot say
        damaged = str(e)
    crashed = bool(divergent) or damaged is not None
    for img in db.slaves:
        missed = _fracture_extents(paths, db, img)
        divergent |= set(missed)
        if missed:
            # what it missed is only in this unit's fracture log, cleared below: whichever
            # unit is promoted next cannot catch it up, so it gets a full sync
            img["state"] = states.UNSYNCHRONIZED
            img["sync_progress"] = None
    me["rejoin"] = True          # a former master: promote leaves it to its own rejoin list
    if crashed:
        # writes in flight at the crash may differ between the slaves: the next promote
        # treats this master as lost (the other slaves get a full sync)
        me["lost"] = True
    earlier = rejoin_info(paths.dir)     # a demote that crashed before its database was saved
    if earlier and earlier.get("image") == me["id"]:
        divergent |= set(earlier.get("extents") or [])
    me["role"] = "slave"
    me["state"] = states.UNSYNCHRONIZED if (discard or damaged) else states.CONSISTENT
    db.mirror["state"] = states.INACTIVE
    # Order matters for a crash in between: the list of what to copy back, then the database
    # that makes this unit a slave, and only then is the journal (and the fracture logs) that
    # the list came from cleared. Before, a crash after clearing them left a clean master
    # that mounted without recovery, its slaves never told what they lacked.
    atomic_write(os.path.join(paths.dir, REJOIN), json.dumps({
        "image": me["id"], "generation": db.data["generation"], "discard": discard,
        "damaged_journal": damaged, "extents": sorted(divergent)}).encode())
    db.save(paths.dir)
    faults.crash_point("demote-saved")
    _reset_journal(paths, db)
    for img in db.slaves:
        try:
            os.unlink(os.path.join(paths.fracture, img["id"]))
        except FileNotFoundError:
            pass
    log.info("%s demoted: a slave now (%s; %d extents to copy back when it rejoins)",
             paths.dir, me["state"], len(divergent))
    return db


def destroy(paths: UnitPaths) -> None:
    """Destroy the mirror (INACTIVE, master, no slave left): the data stays in DIR/image."""
    db = MirrorDB.load(paths.dir)
    if db.self_image["role"] != "master":
        raise StateError(f"{paths.dir} holds a slave image; destroy runs on the master")
    if db.state != states.INACTIVE:
        raise StateError(f"mirror is {db.state}; run `fusemirror deactivate {paths.dir}` first")
    if db.slaves:
        names = ", ".join(s["name"] for s in db.slaves)
        raise StateError(f"mirror still has slaves ({names}); remove them first: "
                         f"`fusemirror remove-slave {paths.dir} SLAVE`")
    scan = journal_mod.scan(paths.journal, mirror_id=bytes.fromhex(db.mirror["id"]))
    if scan.needs_recovery:
        raise StateError(f"{paths.dir} needs recovery; run `fsck.fusemirror {paths.dir}` first")
    for name in (MirrorDB.FILENAME, journal_mod.FILENAME, "secret", REJOIN):
        try:
            os.unlink(os.path.join(paths.dir, name))
        except FileNotFoundError:
            pass
    import shutil

    shutil.rmtree(paths.fracture, ignore_errors=True)
    log.info("mirror %s destroyed; %s/image is kept", db.name, paths.dir)


def _reset_journal(paths: UnitPaths, db: MirrorDB) -> None:
    journal_mod.reset(paths.journal, mirror_id=bytes.fromhex(db.mirror["id"]),
                      extent_size=db.extent_size, nextents=-(-db.size // db.extent_size),
                      keep_damaged=False)


def _fracture_extents(paths: UnitPaths, db: MirrorDB, img: dict[str, Any]) -> list[int]:
    path = os.path.join(paths.fracture, img["id"])
    if not os.path.exists(path):
        return []
    try:
        fl = fracture.FractureLog(path, -(-db.size // db.extent_size), db.extent_size,
                                  img["id"])
    except Exception:
        return list(range(-(-db.size // db.extent_size)))  # unreadable: everything
    try:
        return list(fl.extents())
    finally:
        fl.close()


def rejoin_info(unit_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(unit_dir, REJOIN)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_rejoin(master_db: MirrorDB, summary: dict[str, Any]) -> str:
    """Decide how a former member rejoins as a slave: "extents", "full", or raise.

    ``summary`` is what the agent reports about the existing unit.
    """
    if summary["role"] == "master":
        raise StateError(f"unit {summary['name']} is still a master (generation "
                         f"{summary['generation']['counter']}); demote it on its host first: "
                         f"`fusemirror demote DIR` (add --discard to throw away its writes)")
    if summary["state"] == states.UNSYNCHRONIZED:
        return "full"
    rel = master_db.relation(summary["generation"])
    if rel == "unknown":
        return "full"       # older than every generation remembered: nothing owed is known
    if rel == "diverged":
        raise StateError(
            f"split brain: unit {summary['name']} changed apart from this mirror (its "
            f"generation {summary['generation']['counter']}:{summary['generation']['id']}, "
            f"ours {master_db.generation[0]}:{master_db.generation[1]}); nothing is merged. "
            "Discard its data with `fusemirror demote DIR --discard` on its host, then add it "
            "again (a full sync)")
    return "extents"


async def describe_members(db: MirrorDB, secret: bytes,
                           timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """{image name: its own copy of the database} for every member with an address that
    answers (other than this unit) — what the mirror looks like beyond this copy."""
    out: dict[str, dict[str, Any]] = {}

    async def one(img: dict[str, Any]) -> None:
        try:
            chan = await Channel.connect(img["address"], secret, db.name, timeout=timeout)
        except LinkDown:
            return
        try:
            async with trio.open_nursery() as n:
                n.start_soon(chan.receiver)
                try:
                    with trio.fail_after(timeout):
                        res = await chan.request("describe")
                    out[img["name"]] = res["db"]
                except (LinkDown, OSError, trio.TooSlowError, KeyError, TypeError):
                    pass
                n.cancel_scope.cancel()
        finally:
            await chan.aclose()

    async with trio.open_nursery() as n:
        for img in db.images:
            if img.get("address") and img["id"] != db.data["self"]:
                n.start_soon(one, img)
    return out


async def check_promote_members(db: MirrorDB, secret: bytes, *, force: bool,
                                what: str = "promote") -> None:
    """Refuse to promote a copy (or to demote its lost master from it) that a reachable member
    has moved past or apart from, or while a member is a master: its own copy alone cannot
    tell it missed changes (SPEC §6: the highest generation reachable decides). --force
    overrides."""
    if force:
        return
    for name, data in sorted((await describe_members(db, secret)).items()):
        other = MirrorDB(data)
        rel = db.relation(other.data["generation"])
        if other.self_image["role"] == "master":
            raise StateError(f"member {name} is the master of mirror {db.name!r} (generation "
                             f"{other.generation[0]}); demote it first, or {what} --force")
        if rel in ("behind", "diverged"):
            raise StateError(
                f"member {name} holds a newer state of the mirror (generation "
                f"{other.generation[0]}, this unit's {db.generation[0]}"
                + (", changed apart" if rel == "diverged" else "") + "): this unit may lack "
                f"changes it has; {what} from that member's host instead, or {what} --force "
                "to go on with this unit's copy as it is")


def check_members(paths: UnitPaths, db: MirrorDB) -> None:
    """Refuse a master that the mirror has moved past (a slave promoted, or apart).

    Used by mount and fsck before they trust the local journal; lives here rather than in
    the daemon so fsck does not import pyfuse3 (part of its start-up cost)."""
    if not any(img.get("address") for img in db.slaves):
        return
    from . import admin

    try:
        secret = admin.unit_secret(paths)
    except UsageError:
        return
    trio.run(probe_members, db, secret, paths.dir)


async def probe_members(db: MirrorDB, secret: bytes, unit_dir: str,
                        timeout: float = 2.0) -> None:
    """Before a master serves (mount) or recovers (fsck): ask each reachable slave's agent
    for its copy of the database. A slave promoted since, or changed apart, means this unit
    is a stale master or split from the mirror: refuse, saying how to rejoin."""
    for name, data in sorted((await describe_members(db, secret, timeout)).items()):
        other = MirrorDB(data)
        rel = db.relation(other.data["generation"])
        promoted = other.self_image["role"] == "master"
        if rel == "diverged" and other.self_image["state"] != states.UNSYNCHRONIZED:
            raise StateError(f"split brain: slave {name} changed apart from this unit "
                             f"(generations {other.generation[0]}:{other.generation[1]} and "
                             f"{db.generation[0]}:{db.generation[1]}); keep one side and "
                             f"`fusemirror demote DIR --discard` the other")
        if promoted or rel == "behind":
            raise StateError(
                f"stale master: slave {name} "
                + ("was promoted" if promoted else "has newer mirror changes")
                + f" (generation {other.generation[0]}); this unit must rejoin as a slave: "
                f"`fusemirror demote {unit_dir}`, then `fusemirror add-slave NEWMASTER "
                "HOST:PORT/NAME` from the new master")
