"""``fsck.fusemirror DIR``: recover a master unit after an unclean stop (patent FIG. 9).

Reads the write-intent journal, brings every slave up to date for the logged extents (copying
them without comparing first, claim 11), makes the master durable, and retires the intents. With
no slave it validates the journal and retires the intents.

Exit codes follow fsck(8)::

    0   nothing to do (the journal was clean)
    1   errors corrected (intents retired, a damaged journal rebuilt)
    4   errors left uncorrected (-n, or a damaged journal without -y)
    8   operational error (unit in use, not a unit, I/O error)
    16  usage error

Options as fsck(8) passes them: ``-n`` reports only, ``-y`` answers yes to every question
(rebuilding a damaged journal), ``-a``/``-p`` repair what is safe without asking (the default),
``-f`` and ``-V`` are accepted, ``-C [FD]`` is ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from . import faults, journal as journal_mod, states
from .errors import BusyError, CorruptError, FusemirrorError
from .image import Image
from .mirrordb import MirrorDB
from .sizes import format_size
from .unit import UnitLock, require_unit

log = logging.getLogger(__name__)

FSCK_OK = 0
FSCK_CORRECTED = 1
FSCK_UNCORRECTED = 4
FSCK_ERROR = 8
FSCK_USAGE = 16


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # fsck(8): usage errors exit 16
        self.print_usage(sys.stderr)
        print(f"fsck.fusemirror: {message}", file=sys.stderr)
        sys.exit(FSCK_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fsck.fusemirror",
        description="Recover a fusemirror master unit after an unclean stop: copy the extents "
                    "named in its write-intent journal to every slave and retire the intents.",
        epilog="Exit codes (fsck(8)): 0 nothing to do, 1 corrected, 4 left uncorrected, "
               "8 operational error, 16 usage error. Also run as `fusemirror fsck DIR` and "
               "`fsck -t fusemirror DIR`.")
    p.add_argument("dir", metavar="DIR", help="the master's unit directory")
    p.add_argument("-n", dest="no", action="store_true", help="report only; change nothing")
    p.add_argument("-y", dest="yes", action="store_true",
                   help="answer yes: also rebuild a damaged journal (with a full sync of every "
                        "slave)")
    p.add_argument("-a", "-p", dest="preen", action="store_true",
                   help="repair what is safe without asking (the default)")
    p.add_argument("-f", dest="force", action="store_true", help="accepted for fsck(8)")
    p.add_argument("-V", dest="verbose", action="store_true", help="say more")
    p.add_argument("-C", dest="progress_fd", nargs="?", const=-1, type=int,
                   help="accepted for fsck(8)")
    p.add_argument("--checksum", action="store_true",
                   help="skip extents whose xxh3 digests already match on a slave")
    p.add_argument("--json", dest="as_json", action="store_true", help="print a JSON summary")
    return p


def run(unit_dir: str, *, dry_run: bool, yes: bool, checksum: bool = False,
        progress: bool = False) -> tuple[int, dict[str, Any]]:
    """Check and repair one unit; returns (fsck exit code, summary)."""
    t0 = time.monotonic()
    paths = require_unit(unit_dir)
    summary: dict[str, Any] = {"unit": paths.dir, "dry_run": dry_run, "slaves": []}
    with UnitLock(paths, "fsck"):
        db = MirrorDB.load(paths.dir)
        if db.self_image["role"] != "master":
            raise FusemirrorError(f"{paths.dir} holds a slave image; fsck runs on the master")
        mid = bytes.fromhex(db.mirror["id"])
        nextents = -(-db.size // db.extent_size)
        from .lifecycle import check_members

        check_members(paths, db)   # a stale or split master is not "recovered" into a mirror
        try:
            scan = journal_mod.scan(paths.journal, mirror_id=mid)
        except CorruptError as e:
            summary.update(journal="damaged", error=str(e))
            if dry_run or not yes:
                summary["action"] = ("none: the journal cannot be trusted; run with -y to "
                                     "rebuild it" + (" and fully resynchronize every slave"
                                                     if db.slaves else ""))
                return FSCK_UNCORRECTED, summary
            _resync(paths, db, None, summary, checksum=False, progress=progress)
            # what the slaves lack (UNSYNCHRONIZED: the ones not copied) is saved before the
            # journal that named it is gone: a crash in between must not leave them SYNCHRONIZED
            db.save(paths.dir)
            journal_mod.reset(paths.journal, mirror_id=mid, extent_size=db.extent_size,
                              nextents=nextents)
            faults.crash_point("fsck-journal-rebuilt")
            summary["action"] = "journal rebuilt" + (
                "; every reachable slave fully resynchronized" if db.slaves else "")
            _conditions_hold_again(db, paths.dir, summary)
            db.save(paths.dir)
            summary["seconds"] = round(time.monotonic() - t0, 3)
            return FSCK_CORRECTED, summary
        logged = sorted(scan.active)
        summary.update(journal="ok", torn_tail=scan.torn_tail, last_seq=scan.last_seq,
                       logged_extents=logged)
        if not logged:
            summary["action"] = "none: the journal names no extent"
            return FSCK_OK, summary
        if dry_run:
            summary["action"] = (f"would copy {len(logged)} logged extents to "
                                 f"{len(db.slaves)} slave(s) and retire their intents")
            return FSCK_UNCORRECTED, summary
        _resync(paths, db, logged, summary, checksum=checksum, progress=progress)
        j = journal_mod.Journal(paths.journal, scan)
        try:
            j.append(rets=logged)
        finally:
            j.close()
        summary["action"] = f"retired {len(logged)} intents"
        _conditions_hold_again(db, paths.dir, summary)
        db.save(paths.dir)
        summary["seconds"] = round(time.monotonic() - t0, 3)
        return FSCK_CORRECTED, summary


def _resync(paths: Any, db: MirrorDB, extents: list[int] | None, summary: dict[str, Any], *,
            checksum: bool, progress: bool) -> None:
    """Master durable first; then each slave gets the extents, or keeps them in its fracture
    log when it cannot be reached (or needs a full sync anyway)."""
    import trio

    from . import admin
    from .resync import SlaveGone, copy_to_slave

    img = Image(paths.image)
    try:
        img.fdatasync()
        secret = admin.unit_secret(paths) if db.slaves else b""
        for slave in db.slaves:
            res: dict[str, Any] = {"name": slave["name"]}
            if slave["state"] == states.UNSYNCHRONIZED or slave.get("fractured") or \
                    not slave.get("address"):
                why = ("fractured" if slave.get("fractured") else
                       "UNSYNCHRONIZED (full sync pending)" if slave["state"] ==
                       states.UNSYNCHRONIZED else "a former master, not rejoined (no address)")
                _fracture(paths, db, slave, extents, res, why)
                summary["slaves"].append(res)
                continue
            bar = _Bar(f"fsck {slave['name']}") if progress else None
            try:
                res.update(trio.run(lambda: copy_to_slave(
                    img, db, slave, secret, extents, checksum=checksum,
                    progress=bar.update if bar else None)))
                res["result"] = "copied"
                if extents is None:
                    slave["state"] = states.CONSISTENT
                    slave["sync_progress"] = None
                    admin.fracture_log(paths, db, slave).clear()
            except SlaveGone as e:
                _fracture(paths, db, slave, extents, res, f"unreachable: {e}")
            summary["slaves"].append(res)
    finally:
        img.close()


def _fracture(paths: Any, db: MirrorDB, slave: dict[str, Any], extents: list[int] | None,
              res: dict[str, Any], why: str) -> None:
    from . import admin

    res["result"] = why
    if extents is None:
        slave["state"] = states.UNSYNCHRONIZED
        slave["sync_progress"] = None
        res["kept"] = "needs a full sync"
        return
    fl = admin.fracture_log(paths, db, slave)
    try:
        fl.add(extents)
        res["kept_in_fracture_log"] = len(extents)
    finally:
        fl.close()


class _Bar:
    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < (0.1 if self.tty else 2.0):
            return
        self.last = now
        pct = 100.0 * done / max(1, total)
        if self.tty:
            fill = int(30 * done / max(1, total))
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (30 - fill)}] {pct:5.1f}%")
            if done >= total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{self.label}: {done}/{total} extents ({pct:.0f}%)\n")
        sys.stderr.flush()


def _conditions_hold_again(db: MirrorDB, unit_dir: str, summary: dict[str, Any]) -> None:
    """A mirror left in ATTENTION by an I/O error goes to INACTIVE once recovered (FIG. 4)."""
    if db.state == states.ATTENTION:
        db.mirror["state"] = states.mirror_next(db.state, "conditions_ok")
        db.save(unit_dir)
        summary["state"] = db.state
        summary["action"] += "; mirror ATTENTION -> INACTIVE (run `fusemirror activate`)"


def print_summary(summary: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout

    def print(*a: Any) -> None:  # noqa: A001 - local, to the chosen stream
        out.write(" ".join(str(x) for x in a) + "\n")

    print(f"fsck.fusemirror {summary['unit']}:")
    if summary.get("journal") == "damaged":
        print(f"  journal DAMAGED: {summary['error']}")
    else:
        n = len(summary.get("logged_extents", []))
        torn = " (torn last record ignored)" if summary.get("torn_tail") else ""
        print(f"  journal ok{torn}: {n} logged extents")
    for s in summary.get("slaves", []):
        if s.get("result") == "copied":
            skipped = f", {s['skipped']} already equal" if s.get("skipped") else ""
            print(f"  slave {s['name']}: copied {s['extents']} extents "
                  f"({format_size(s['bytes'])}){skipped} in {s['seconds']:.3f}s")
        else:
            kept = s.get("kept_in_fracture_log")
            print(f"  slave {s['name']}: {s['result']}; "
                  + (f"{kept} extents kept in its fracture log" if kept is not None
                     else s.get("kept", "")))
    print(f"  action: {summary.get('action')}")
    if "seconds" in summary:
        print(f"  time: {summary['seconds']:.3f}s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="fsck.fusemirror: %(message)s")
    if args.no and args.yes:
        print("fsck.fusemirror: -n and -y exclude each other", file=sys.stderr)
        return FSCK_USAGE
    why = None
    try:
        code, summary = run(args.dir, dry_run=args.no, yes=args.yes, checksum=args.checksum,
                            progress=True)
    except BusyError as e:
        why = f"{e.msg}; unmount it first"
    except FusemirrorError as e:
        why = e.msg
    except OSError as e:
        why = f"{e.filename or args.dir}: {e.strerror}"
    except Exception as e:  # a bug: still fsck(8)'s "operational error", never 1 ("corrected")
        log.exception("unexpected error")
        why = f"unexpected error (a bug): {e!r}"
    if why is not None:
        print(f"fsck.fusemirror: {why}", file=sys.stderr)
        if args.as_json:    # a script still gets one object, saying what stopped fsck
            print(json.dumps({"unit": args.dir, "exit": FSCK_ERROR, "action": "none",
                              "error": why}, indent=2, sort_keys=True))
        return FSCK_ERROR
    summary["exit"] = code
    if args.as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print_summary(summary)
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
