"""The ``fusemirror`` command line (click): parse, call one function, print. Nothing else.

Every failure the user can cause or meet is a :class:`~fusemirror.errors.FusemirrorError`,
printed as one line on stderr with its exit code; a traceback means a bug.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable, TypeVar

import click

from . import __version__, control, mountutil, states
from .errors import (BusyError, EXIT_FAILURE, FusemirrorError, StateError, UsageError,
                     exit_for_errno)
from .mirrordb import MirrorDB
from .sizes import format_size, parse_size
from .status import format_text, offline_status
from .unit import UnitLock, UnitPaths, create_unit, lock_holder, require_unit

T = TypeVar("T")

EPILOG = """\b
Exit codes:
  0  success
  1  the operation failed (I/O error, bad on-disk data, peer refused)
  2  usage error (bad option, size, key or value)
  3  refused in the current state (the message names the state and the remedy)
  4  the unit is busy (another process holds it, or the image is open)
  5  the unit needs recovery: run `fsck.fusemirror DIR`
fsck.fusemirror uses the fsck(8) codes: 0, 1, 4, 8, 16.
"""


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order they are defined, most used first


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"],
                                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="fusemirror")
def cli() -> None:
    """Remote mirroring of a block image in user space.

    A mirror is a master image, served as MOUNTPOINT/image by `fusemirror mount`, and slave
    images in remote directories. Every write names the extents it touches in a write-intent
    journal (O_DSYNC) before any image changes, so after a crash `fsck.fusemirror DIR` copies
    only the logged extents instead of the whole image.

    DIR is a unit directory: DIR/image (a plain file: cmp, xxh64sum and losetup work on it when
    nothing is mounted), DIR/journal, DIR/mirror.json (the mirror database), DIR/daemon.log.

    \b
    Typical use:
      fusemirror create /srv/m0 --size 10G
      fusemirror activate /srv/m0
      fusemirror mount /srv/m0 /mnt/m0
      losetup -f --show /mnt/m0/image; mkfs.ext4 ...; mount ...
      fusemirror status /srv/m0
      fusemirror umount /mnt/m0
    """


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON object (for scripts).")


def _out(data: Any, as_json: bool, text: str | Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(text() if callable(text) else text, nl=False)


def _daemon_or_offline(paths: UnitPaths, cmd: str, offline: Callable[[], T],
                       wait: float = 10.0, **args: Any) -> Any:
    """Ask the running daemon; if none runs, do ``offline()`` under the unit lock."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return control.request(paths.control, cmd, **args)
        except control.NotRunning:
            pass
        try:
            with UnitLock(paths, cmd):
                return offline()
        except BusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ---- create ---------------------------------------------------------------------------------
@cli.command()
@click.argument("dir", type=click.Path())
@click.option("--size", required=True, metavar="SIZE",
              help="Image size, e.g. 512M, 10G, 1T (powers of 1024); a multiple of the block.")
@click.option("--name", metavar="NAME", help="Mirror name (default: the directory's name).")
@click.option("--block-size", default="4K", show_default=True, metavar="SIZE",
              help="Unit of replication I/O: a power of two >= 512.")
@click.option("--extent-size", default="1M", show_default=True, metavar="SIZE",
              help="Unit of intent and resync tracking: a power-of-two multiple of the block.")
@click.option("--write-policy", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True,
              help="sync: a write is answered after every reachable slave acknowledged it; "
                   "async: after the journal and the master.")
@click.option("--activity-log-extents", type=int, metavar="N",
              help="Extents that may be logged at once (default 1024): bounds the work after "
                   "a crash to N x extent size.")
@click.option("--secret-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The shared secret of the slave agents (copied into DIR, mode 0600).")
@click.option("--json", "as_json", is_flag=True, help="Print the new mirror as JSON.")
def create(dir: str, size: str, name: str | None, block_size: str, extent_size: str,
           write_policy: str, activity_log_extents: int | None, secret_file: str | None,
           as_json: bool) -> None:
    """Create a mirror whose master image lives in DIR.

    DIR must not exist or be an empty directory. The image DIR/image is sparse (it takes no
    space until written); the journal is preallocated. The mirror starts INACTIVE: run
    `fusemirror activate DIR` before host I/O. On any error nothing is left behind.
    """
    from .admin import write_secret
    from .agent import read_secret

    secret = read_secret(secret_file) if secret_file else None   # before anything is created
    db = create_unit(dir, size=parse_size(size), block_size=parse_size(block_size, "block size"),
                     extent_size=parse_size(extent_size, "extent size"),
                     write_policy=write_policy, name=name,
                     activity_log_extents=activity_log_extents)
    if secret is not None:
        write_secret(UnitPaths(os.path.abspath(dir)), secret)
    info = {"name": db.name, "unit": os.path.abspath(dir), "size": db.size,
            "block_size": db.block_size, "extent_size": db.extent_size,
            "write_policy": db.mirror["write_policy"], "state": db.state}
    _out(info, as_json, f"created mirror {db.name!r} in {info['unit']}: "
         f"{format_size(db.size)}, extent {format_size(db.extent_size)}, "
         f"block {format_size(db.block_size)}, policy {info['write_policy']}, state INACTIVE\n")


# ---- activate / deactivate ------------------------------------------------------------------
@cli.command()
@click.argument("dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the resulting state as JSON.")
def activate(dir: str, as_json: bool) -> None:
    """Allow host I/O: the mirror goes INACTIVE -> ACTIVE.

    If a condition for normal operation fails (too many missing slaves, a failed journal or
    master flush) the mirror goes to ATTENTION instead and host I/O stays denied.
    """
    paths = require_unit(dir)
    # a slave's unit is refused as such, even while its agent holds it (not "in use")
    _require_master(MirrorDB.load(paths.dir), paths, "activate")

    def offline() -> dict[str, str]:
        db = MirrorDB.load(paths.dir)
        _require_master(db, paths, "activate")
        new = states.mirror_next(db.state, "activate_ok")
        db.mirror["state"] = new
        db.save(paths.dir)
        return {"state": new}

    res = _daemon_or_offline(paths, "activate", offline)
    _out(res, as_json, f"mirror is {res['state']}\n")
    if res["state"] != states.ACTIVE:
        sys.exit(3)


@cli.command()
@click.argument("dir", type=click.Path())
@click.option("--force", is_flag=True,
              help="Do not wait for outstanding writes to complete and become durable.")
@click.option("--json", "as_json", is_flag=True, help="Print the resulting state as JSON.")
def deactivate(dir: str, force: bool, as_json: bool) -> None:
    """Deny host I/O: the mirror goes to INACTIVE (reads and writes of the image get EIO).

    Graceful by default: outstanding writes complete and the master is flushed first.
    """
    paths = require_unit(dir)

    def offline() -> dict[str, str]:
        db = MirrorDB.load(paths.dir)
        _require_master(db, paths, "deactivate")
        db.mirror["state"] = states.mirror_next(db.state, "deactivate")
        db.save(paths.dir)
        return {"state": db.state}

    res = _daemon_or_offline(paths, "deactivate", offline, force=force)
    _out(res, as_json, f"mirror is {res['state']}\n")


def _require_master(db: MirrorDB, paths: UnitPaths, what: str) -> None:
    if db.self_image["role"] != "master":
        raise StateError(f"{paths.dir} holds a slave image; run `fusemirror {what}` on the "
                         "master's unit directory")


# ---- mount / umount -------------------------------------------------------------------------
@cli.command()
@click.argument("dir", type=click.Path())
@click.argument("mountpoint", type=click.Path())
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground and log to stderr too (for systemd Type=simple).")
@click.option("--allow-other", is_flag=True,
              help="Let other users (and root) open the image; needed for losetup by a non-root "
                   "owner. Requires user_allow_other in /etc/fuse.conf.")
@click.option("--cache", type=click.Choice(["direct", "page", "writeback"]), default="direct",
              show_default=True,
              help="How the kernel caches the image; see docs/ARCHITECTURE.md for the figures. "
                   "writeback reports write errors only at fsync.")
@click.option("--debug", is_flag=True, help="Log every request (slow).")
@click.option("--no-journal", is_flag=True, hidden=True,
              help="Benchmarks only: no write-intent journal (a crash then needs a full sync).")
@click.option("--inline-io-max", default="128K", show_default=True, metavar="SIZE",
              help="Requests up to this size do their image pread/pwrite on the event loop "
                   "instead of a worker thread (saves ~150 us per request; a stalled disk then "
                   "stalls the mount). 0 sends every request to a thread.")
@click.option("--write-behind", default="4M", show_default=True, metavar="SIZE",
              help="Each time this much has been written, start writing the master image back "
                   "to disk in the background (sync_file_range), so that dirty data does not "
                   "pile up for the next fsync. Not a flush: durability still comes from fsync. "
                   "0 leaves write-back to the kernel.")
def mount(dir: str, mountpoint: str, foreground: bool, allow_other: bool, cache: str,
          debug: bool, no_journal: bool, inline_io_max: str, write_behind: str) -> None:
    """Serve the master image of DIR as MOUNTPOINT/image.

    Returns once the mount is usable (or fails with the reason). MOUNTPOINT/image has the
    mirror's fixed size: truncate, create, unlink and rename give EPERM, a write past the end
    ENOSPC. MOUNTPOINT/status is a read-only text file with `fusemirror status`. Host I/O is
    served only while the mirror is ACTIVE (otherwise EIO).

    A unit that was not stopped cleanly is refused until `fsck.fusemirror DIR` has run. A
    unit is served by one daemon at a time. The daemon logs to DIR/daemon.log; SIGTERM
    makes everything durable and unmounts (after the image is closed, if it is open).
    """
    from .daemon import MountOptions, mount as do_mount

    do_mount(dir, mountpoint, MountOptions(foreground=foreground, allow_other=allow_other,
                                           cache=cache, journal=not no_journal, debug=debug,
                                           inline_io_max=parse_size(inline_io_max,
                                                                    "--inline-io-max"),
                                           write_behind=parse_size(write_behind,
                                                                   "--write-behind")))


@cli.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--force", is_flag=True,
              help="Unmount even if the daemon does not answer or reports the image open "
                   "(the kernel still refuses a busy mount; nothing is detached lazily).")
@click.option("--timeout", default=120.0, show_default=True, metavar="SECONDS",
              help="How long to wait for the daemon to finish after the unmount.")
def umount(mountpoint: str, force: bool, timeout: float) -> None:
    """Unmount a fusemirror mount cleanly and wait for its daemon to finish.

    Refuses while the image is open (a loop device or a mounted filesystem holds it). The
    daemon flushes the master and retires every intent, so the unit needs no fsck afterwards.
    """
    mnt = os.path.abspath(mountpoint)
    m = mountutil.find_mount(mnt)
    if m is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if not mountutil.is_fusemirror(m):
        raise UsageError(f"{mountpoint} is a {m.fstype} mount, not fusemirror")
    paths: UnitPaths | None = None
    try:
        unit = os.getxattr(mnt, "user.fusemirror.unit").decode()
        paths = UnitPaths(unit)
        control.request(paths.control, "umount_check", timeout=30, force=force)
    except (OSError, control.NotRunning) as e:
        if not force:
            raise FusemirrorError(f"the daemon serving {mountpoint} does not answer ({e}); "
                                  "`fusemirror umount --force` unmounts it anyway") from None
    mountutil.unmount(mnt)
    if paths is None:
        return
    deadline = time.monotonic() + timeout
    while lock_holder(paths) is not None:
        if time.monotonic() > deadline:
            raise FusemirrorError(f"unmounted, but the daemon for {paths.dir} is still running "
                                  f"after {timeout:.0f}s; see {paths.dir}/daemon.log")
        time.sleep(0.05)


# ---- status ---------------------------------------------------------------------------------
@cli.command()
@click.argument("dir", metavar="DIR|HOST:PORT/NAME")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (keys: name, state, "
              "write_policy, journal{active_extents, extents}, needs_recovery, images[...]).")
@click.option("--secret-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The agents' shared secret (for HOST:PORT/NAME).")
def status(dir: str, as_json: bool, secret_file: str | None) -> None:
    """Show the mirror's state, its images and the journal.

    Works whether or not the mirror is mounted. After an unclean stop it shows
    needs_recovery and the logged extents. Given HOST:PORT/NAME, any member (a slave's agent)
    answers for the whole mirror from its copy of the mirror database: the other members with
    their last known state.
    """
    if _is_address(dir):
        from .status import remote_status

        res = _remote(dir, secret_file, "describe")
        st = remote_status(dir, res)
        _out(st, as_json, lambda: format_text(st))
        return
    paths = require_unit(dir)
    try:
        st = control.request(paths.control, "status", timeout=30)
    except control.NotRunning:
        st = offline_status(paths, MirrorDB.load(paths.dir))
    _out(st, as_json, lambda: format_text(st))


# ---- attributes -----------------------------------------------------------------------------
def _attr_help() -> str:
    from .mirrordb import IMAGE_ATTRS, MIRROR_ATTRS

    lines = ["\b", "Mirror-wide attributes:"]
    lines += [f"  {k:22} {a.help}" for k, a in MIRROR_ATTRS.items()]
    lines += ["\b", "Per-image attributes (with --image NAME):"]
    lines += [f"  {k:22} {a.help}" for k, a in IMAGE_ATTRS.items()]
    return "\n".join(lines)


@cli.command(epilog=_attr_help())
@click.argument("dir", type=click.Path())
@click.argument("key", required=False)
@click.option("--image", metavar="NAME", help="Show one image's attributes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def get(dir: str, key: str | None, image: str | None, as_json: bool) -> None:
    """Show the mirror's attributes (or one KEY)."""
    paths = require_unit(dir)
    try:
        attrs = control.request(paths.control, "get", image=image)
    except control.NotRunning:
        attrs = MirrorDB.load(paths.dir).get_attrs(image)
    if key is not None:
        if key not in attrs:
            raise UsageError(f"unknown attribute {key!r}; valid: {', '.join(sorted(attrs))}")
        attrs = {key: attrs[key]}
    _out(attrs, as_json, lambda: "".join(f"{k} = {v}\n" for k, v in sorted(attrs.items())))


@cli.command(name="set", epilog=_attr_help())
@click.argument("dir", type=click.Path())
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--image", metavar="NAME", help="Set attributes of one image (a slave's name).")
@json_option
def set_cmd(dir: str, settings: tuple[str, ...], image: str | None, as_json: bool) -> None:
    """Change attributes: all KEY=VALUE pairs are validated before any is applied."""
    paths = require_unit(dir)
    pairs = []
    for item in settings:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"bad setting {item!r}: use KEY=VALUE")
        pairs.append((k.strip(), v.strip()))
    # attributes are the mirror's: changed on a slave's copy, they would fork its generation
    # from the master's (the master then refuses it as split brain)
    _require_master(MirrorDB.load(paths.dir), paths, "set")
    from .unit import check_activity_log

    check_activity_log(paths, pairs)

    def offline() -> dict[str, Any]:
        db = MirrorDB.load(paths.dir)
        res = db.apply_settings(pairs, image)
        db.bump_generation()
        db.save(paths.dir)
        return res

    res = _daemon_or_offline(paths, "set", offline, pairs=pairs, image=image)
    _out(res, as_json, lambda: "".join(f"{k} = {v}\n" for k, v in res.items()))


# ---- slaves ---------------------------------------------------------------------------------
def _engine_op(paths: UnitPaths, cmd: str, offline: Callable[[Any], Any],
               **args: Any) -> Any:
    """Ask the daemon, or run ``offline(engine)`` on a headless engine under the unit lock."""
    import trio

    from .admin import run_headless

    def go() -> Any:
        return trio.run(run_headless, paths, offline)

    return _daemon_or_offline(paths, cmd, go, **args)


class _Progress:
    """A progress line: redrawn in place on a terminal, a plain line every few seconds else."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, total: int, extra: str = "") -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < 2.0 and done < total:
            return
        self.last = now
        pct = 100.0 * done / max(1, total)
        if self.tty:
            width = 30
            fill = int(width * done / max(1, total))
            bar = "#" * fill + "." * (width - fill)
            sys.stderr.write(f"\r{self.label} [{bar}] {pct:5.1f}% {extra}   ")
            if done >= total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(f"{self.label}: {pct:.1f}% ({format_size(done)} of "
                             f"{format_size(total)}) {extra}\n")
        sys.stderr.flush()


@cli.command()
@click.argument("root", type=click.Path())
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Address to accept masters on, e.g. 0.0.0.0:7789.")
@click.option("--secret-file", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="The shared secret (the same file the masters use).")
@click.option("--debug", is_flag=True, help="Log every connection event.")
@click.option("--write-behind", default="4M", show_default=True, metavar="SIZE",
              help="Each time this much has been written to a slave image, start writing it "
                   "back to disk in the background (sync_file_range), so that the master's "
                   "next flush finds little left to write. 0 leaves write-back to the kernel.")
def serve(root: str, listen: str, secret_file: str, debug: bool, write_behind: str) -> None:
    """Run the slave agent: serve every slave unit under ROOT (ROOT/NAME).

    Runs in the foreground (for systemd) and logs one line per connection and state change to
    stderr. Masters authenticate with the shared secret (HMAC challenge-response both ways)
    before any other request. SIGTERM stops it.
    """
    import logging

    import trio

    from .agent import run_agent

    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(functools.partial(run_agent, os.path.abspath(root), listen, secret_file,
                               write_behind=parse_size(write_behind, "--write-behind")))


@cli.command(name="add-slave")
@click.argument("dir", type=click.Path())
@click.argument("address", metavar="HOST:PORT/NAME")
@click.option("--synchronized", is_flag=True,
              help="The slave image already equals the master (copied by hand with the mirror "
                   "INACTIVE): no sync. Otherwise it starts UNSYNCHRONIZED and is fully "
                   "synchronized once the mirror is ACTIVE.")
@click.option("--secret-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The agents' shared secret (stored in DIR; needed the first time).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def add_slave(dir: str, address: str, synchronized: bool, secret_file: str | None,
              as_json: bool) -> None:
    """Add a slave image: the agent at HOST:PORT creates ROOT/NAME with the master's size.

    An existing ROOT/NAME of this mirror is taken back (rejoin); one of another size or
    mirror is refused.
    """
    from . import admin

    paths = require_unit(dir)
    if secret_file:
        admin.store_secret(paths, secret_file)

    async def offline(engine: Any) -> Any:
        return await admin.add_slave(engine, paths, address, synchronized=synchronized,
                                     secret=admin.unit_secret(paths))

    res = _engine_op(paths, "add_slave", offline, address=address, synchronized=synchronized)
    owed = f"; {res['owed_extents']} extents to copy" if res.get("owed_extents") is not None \
        else ""
    _out(res, as_json, f"slave {res['name']} added ({res['state']}{owed})\n")


@cli.command(name="remove-slave")
@click.argument("dir", type=click.Path())
@click.argument("slave")
@click.option("--force", is_flag=True, help="Do not complete outstanding requests first.")
@json_option
def remove_slave(dir: str, slave: str, force: bool, as_json: bool) -> None:
    """Remove a slave from the mirror (the mirror must be INACTIVE). Its data stays."""
    from . import admin

    paths = require_unit(dir)
    res = _engine_op(paths, "remove_slave",
                     lambda e: admin.remove_slave(e, paths, slave, force=force),
                     slave=slave, force=force)
    _out(res, as_json,
         f"slave {res['name']} removed; its unit directory and data stay on its host\n")


@cli.command()
@click.argument("dir", type=click.Path())
@click.argument("slave")
@click.option("--no-wait", is_flag=True, help="Start the sync and return.")
@json_option
def sync(dir: str, slave: str, no_wait: bool, as_json: bool) -> None:
    """Fully synchronize a slave: a block copy of the whole image, throttled by sync_rate.

    Host writes during the sync are forwarded only where the copy has already passed. Progress
    is saved, so an interrupted sync resumes where it stopped (and says where).
    """
    from . import admin

    paths = require_unit(dir)
    bar = _Progress(f"sync {slave}")

    def started(res: dict[str, Any]) -> None:
        if res.get("resume_at"):
            at, size = int(res["resume_at"]), int(res["size"])
            click.echo(f"sync {slave}: resuming at {format_size(at)} of {format_size(size)} "
                       f"({100.0 * at / max(1, size):.1f}%)", err=True)

    def show(st: dict[str, Any]) -> None:
        sy = st.get("sync") or {}
        if sy:
            eta = sy.get("eta_seconds")
            bar.update(sy["done"], sy["total"], f"ETA {eta:.0f}s" if eta is not None else "")

    async def offline(engine: Any) -> Any:
        started(await admin.start_sync(engine, slave))
        if no_wait:
            return {}
        return await admin.wait_synced(engine, slave, show)

    try:
        started(control.request(paths.control, "sync", slave=slave))
    except control.NotRunning:
        if no_wait:
            raise UsageError("--no-wait needs a mounted mirror (otherwise the sync runs in "
                             "this command)") from None
        _engine_op(paths, "sync", offline, slave=slave)
        _out({"slave": slave, "synchronized": True}, as_json, f"slave {slave}: synchronized\n")
        return
    if no_wait:
        _out({"slave": slave, "synchronized": False, "started": True}, as_json,
             f"slave {slave}: sync started\n")
        return
    down = admin.DownFor()
    while True:
        st = control.request(paths.control, "status")
        img = next((i for i in st["images"] if slave in (i["name"], i.get("address"))
                    or (i.get("address") or "").endswith("/" + slave)), None)
        if img is None:
            raise UsageError(f"no slave {slave!r}")
        show(img)
        if img.get("mode") == "streaming" and img.get("sync_progress") is None \
                and not img.get("fracture_extents"):
            break
        if down.longer_than(float(img.get("timeout") or 5.0) + 1.0, bool(img.get("reachable"))):
            raise admin.unreachable_error(img, "the mounted mirror goes on by itself when it "
                                          "is back (`fusemirror status` shows it)")
        time.sleep(0.5)
    _out({"slave": slave, "synchronized": True}, as_json, f"slave {slave}: synchronized\n")


@cli.command()
@click.argument("dir", type=click.Path())
@click.argument("slave")
@json_option
def fracture(dir: str, slave: str, as_json: bool) -> None:
    """Split a slave off on purpose: writes are recorded in its fracture log until restore."""
    from . import admin

    paths = require_unit(dir)
    res = _engine_op(paths, "fracture", lambda e: admin.fracture(e, slave), slave=slave)
    _out(res, as_json, f"slave {slave}: fractured\n")


@cli.command()
@click.argument("dir", type=click.Path())
@click.argument("slave")
@json_option
def restore(dir: str, slave: str, as_json: bool) -> None:
    """Rejoin a fractured slave: it is caught up from its fracture log (extents only)."""
    from . import admin

    paths = require_unit(dir)
    res = _engine_op(paths, "restore", lambda e: admin.restore(e, slave), slave=slave)
    _out(res, as_json,
         f"slave {slave}: restoring ({res['fracture_extents']} extents to catch up)\n")


@cli.command()
@click.argument("dir", type=click.Path())
@click.argument("slave", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(dir: str, slave: str | None, as_json: bool) -> None:
    """Compare master and slave(s) by xxh3 digests; report the differing block ranges.

    Only digests cross the network for equal blocks. Exit 1 if any block differs.
    """
    from . import admin

    paths = require_unit(dir)
    res = _engine_op(paths, "verify", lambda e: admin.verify(e, slave), slave=slave)

    def text() -> str:
        lines = []
        for s in res["slaves"]:
            if s["equal"]:
                lines.append(f"{s['name']}: identical ({s['seconds']}s)")
            else:
                rng = ", ".join(f"{a}-{b - 1}" if b - a > 1 else str(a)
                                for a, b in s["ranges"][:20])
                lines.append(f"{s['name']}: {s['differing_blocks']} differing blocks of "
                             f"{res['block_size']} bytes: {rng}")
        return "\n".join(lines) + "\n"

    _out(res, as_json, text)
    if not all(s["equal"] for s in res["slaves"]):
        sys.exit(EXIT_FAILURE)


# ---- roles ----------------------------------------------------------------------------------
def _is_address(text: str) -> bool:
    return ":" in text and "/" in text and not os.path.isdir(text)


def _refuse_if_master_alive(paths: UnitPaths) -> None:
    """Demoting the master from a slave's unit is for a master that is lost: refuse while it
    is still talking to this slave (its agent saw a frame within the slave's timeout)."""
    db = MirrorDB.load(paths.dir)
    master = db.master
    if db.self_image["role"] != "slave" or master is None:
        return
    sock = _agent_socket(paths)
    try:
        st = control.request(sock, "status", timeout=10) if os.path.exists(sock) else {}
    except control.NotRunning:
        return
    sess = (st.get("sessions") or {}).get(os.path.basename(paths.dir))
    limit = float(db.self_image.get("timeout", 5.0))
    if sess is not None and sess["idle"] <= limit:
        raise StateError(
            f"the master {master['name']} is alive: it talked to this slave {sess['idle']:.1f}s "
            f"ago (from {sess['peer']}); demote it on its host (`fusemirror umount`, "
            "`fusemirror deactivate DIR`, `fusemirror demote DIR`), or pass --force to "
            "demote it from here anyway (its host I/O then fails)")


def _agent_socket(paths: UnitPaths) -> str:
    """The control socket of the agent that would serve this unit (ROOT/NAME)."""
    from .agent import AGENT_CONTROL

    return os.path.join(os.path.dirname(paths.dir), AGENT_CONTROL)


def _release_from_agent(paths: UnitPaths) -> None:
    """If an agent serves this unit (ROOT/NAME), ask it to let go of the unit's lock."""
    sock = _agent_socket(paths)
    if lock_holder(paths) is None or not os.path.exists(sock):
        return
    try:
        control.request(sock, "release", unit=os.path.basename(paths.dir), timeout=30)
    except control.NotRunning:
        pass


def _check_members(paths: UnitPaths, db: MirrorDB, force: bool, what: str) -> None:
    """Before a slave's unit takes the mirror's future in hand (promote, demote its lost
    master): no reachable member may hold a newer or diverged state, or be a master."""
    import trio

    from . import admin, lifecycle

    if force or not any(i.get("address") for i in db.images if i["id"] != db.data["self"]):
        return
    try:
        secret = admin.unit_secret(paths)
    except UsageError:
        return      # no shared secret here: the other members cannot be asked
    trio.run(lambda: lifecycle.check_promote_members(db, secret, force=force, what=what))


def _push(paths: UnitPaths, db: MirrorDB) -> dict[str, str]:
    """Send a committed change to every reachable member (prepare/commit)."""
    import trio

    from . import admin, lifecycle

    if not any(i.get("address") for i in db.images if i["id"] != db.data["self"]):
        return {}
    try:
        secret = admin.unit_secret(paths)
    except UsageError:
        return {"*": "no shared secret in the unit: other members not told"}
    res = trio.run(lambda: lifecycle.push_db(db, secret))
    db.save(paths.dir)
    return res


def _remote(address: str, secret_file: str | None, op: str, **args: Any) -> Any:
    import trio

    from .agent import read_secret
    from .link import Channel, LinkDown

    if not secret_file:
        raise UsageError(f"{address}: pass --secret-file FILE (the agents' shared secret)")
    secret = read_secret(secret_file)

    async def go() -> Any:
        try:
            chan = await Channel.connect(address, secret, args.pop("mirror", "") or "")
        except LinkDown as e:
            raise FusemirrorError(f"cannot reach {address}: {e}") from None
        out: dict[str, Any] = {}
        try:
            async with trio.open_nursery() as n:
                n.start_soon(chan.receiver)
                try:
                    out["r"] = await chan.request(op, **args)
                except (OSError, LinkDown) as e:
                    code = exit_for_errno(e.errno) if isinstance(e, OSError) else EXIT_FAILURE
                    out["e"] = FusemirrorError(
                        f"{address}: {getattr(e, 'strerror', None) or e}", code)
                n.cancel_scope.cancel()
        finally:
            await chan.aclose()
        if "e" in out:
            raise out["e"]
        return out["r"]

    return trio.run(go)


@cli.command()
@click.argument("target", metavar="DIR|HOST:PORT/NAME")
@click.option("--force", is_flag=True,
              help="Promote even if the image is not SYNCHRONIZED/CONSISTENT or was UNREACHABLE "
                   "since its last catch-up, and demote a master that cannot be asked.")
@click.option("--secret-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="The agents' shared secret (for HOST:PORT/NAME).")
@click.option("--mirror", metavar="NAME", help="The mirror's name (for HOST:PORT/NAME).")
@json_option
def promote(target: str, force: bool, secret_file: str | None, mirror: str | None,
            as_json: bool) -> None:
    """Make a slave image the master (run it on the slave's host, or name its agent).

    Preconditions (patent): the mirror has no master (demote it first), the slave is
    SYNCHRONIZED or CONSISTENT and was not UNREACHABLE since its last catch-up; --force
    overrides the last two and demotes a lost master. The agent stops serving the unit; mount
    it with `fusemirror mount DIR MNT`, then `fusemirror activate DIR`. The change is recorded
    in every reachable member's database with a new generation.
    """
    from . import lifecycle

    if _is_address(target):
        res = _remote(target, secret_file, "promote", force=force, mirror=mirror or "")
        _out({"unit": target, "role": "master", "generation": res["generation"][0],
              "members": res.get("members", {})}, as_json,
             f"{target} promoted to master (generation {res['generation'][0]})\n")
        return
    paths = require_unit(target)
    # refused before the agent lets go of the unit: a refusal leaves replication running
    db = MirrorDB.load(paths.dir)
    lifecycle.check_promote(db, paths, force=force)
    _check_members(paths, db, force, "promote")
    _release_from_agent(paths)
    with UnitLock(paths, "promote"):
        db = lifecycle.promote(paths, force=force)
        res = _push(paths, db)
    told = ", ".join(f"{k}: {v}" for k, v in res.items()) or "no other member"
    _out({"unit": paths.dir, "role": "master", "mirror": db.name,
          "generation": db.generation[0], "members": res}, as_json,
         f"{paths.dir} is now the master of {db.name!r} (generation {db.generation[0]}; "
         f"{told}); mount it and activate\n")


@cli.command()
@click.argument("dir", type=click.Path())
@click.option("--force", is_flag=True, help="Demote a master whose mirror is not INACTIVE "
              "(a master that crashed); given a slave's unit, demote its master even though it "
              "is still connected to this slave.")
@click.option("--discard", is_flag=True, help="Throw this unit's data away: it rejoins with a "
              "full sync (the way out of a split brain). On a slave's unit: mark it "
              "UNSYNCHRONIZED, to be fully synced by the master that takes it.")
@json_option
def demote(dir: str, force: bool, discard: bool, as_json: bool) -> None:
    """Demote the master held in DIR to a slave; or, given a slave's unit directory, record that
    its (lost) master is demoted.

    A demoted master remembers the extents it may hold that the others do not (its journal and
    its fracture logs); added again as a slave of the new master (`fusemirror add-slave NEWDIR
    HOST:PORT/NAME`), it is caught up by those extents plus what was written since — not a full
    copy. The mirror becomes INACTIVE in every reachable member.
    """
    from . import lifecycle

    paths = require_unit(dir)
    db = MirrorDB.load(paths.dir)
    slave_discard = discard and db.self_image["role"] == "slave"   # its own data only: safe
    if not force and not slave_discard:
        _refuse_if_master_alive(paths)
    if db.self_image["role"] == "slave" and not slave_discard:
        _check_members(paths, db, force, "demote")
    _release_from_agent(paths)
    with UnitLock(paths, "demote"):
        db = lifecycle.demote(paths, force=force, discard=discard)
        # a slave's discarded copy is its own business: not a change for the other members
        res = {} if slave_discard else _push(paths, db)
    told = ", ".join(f"{k}: {v}" for k, v in res.items()) or "no other member reached"
    _out({"unit": paths.dir, "role": db.self_image["role"], "state": db.state,
          "generation": db.generation[0], "members": res}, as_json, f"demoted ({told})\n")


@cli.command()
@click.argument("dir", type=click.Path())
@json_option
def destroy(dir: str, as_json: bool) -> None:
    """Destroy the mirror (INACTIVE, master, no slave left). DIR/image stays: the data is kept."""
    from . import lifecycle

    paths = require_unit(dir)
    with UnitLock(paths, "destroy"):
        lifecycle.destroy(paths)
    _out({"unit": paths.dir, "destroyed": True, "image": f"{paths.dir}/image"}, as_json,
         f"mirror destroyed; the data stays in {paths.dir}/image\n")


@cli.command(name="fsck", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def fsck_cmd(args: tuple[str, ...]) -> None:
    """Same as fsck.fusemirror (see `fsck.fusemirror --help`)."""
    from .fsck import main as fsck_main

    sys.exit(fsck_main(list(args)))


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning FusemirrorError into one line and its exit code."""
    try:
        cli.main(args=argv, prog_name="fusemirror", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "fusemirror"
        click.echo(f"{where}: {e.format_message()} (see `{where} --help`)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"fusemirror: {e.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_FAILURE)
    except FusemirrorError as e:
        click.echo(f"fusemirror: {e.msg}", err=True)
        sys.exit(e.exitcode)
    except BaseExceptionGroup as eg:
        # trio nurseries wrap errors; a lone user-facing one is still just one line
        leaves = _leaves(eg)
        if len(leaves) == 1 and isinstance(leaves[0], FusemirrorError):
            click.echo(f"fusemirror: {leaves[0].msg}", err=True)
            sys.exit(leaves[0].exitcode)
        if len(leaves) == 1 and isinstance(leaves[0], OSError):
            click.echo(f"fusemirror: {leaves[0]}", err=True)
            sys.exit(EXIT_FAILURE)
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            click.echo("interrupted", err=True)      # Ctrl-C inside trio.run
            sys.exit(130)
        raise
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
