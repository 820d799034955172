"""``fusemirror mount``: the master daemon's process life — fork, lock, mount, serve, stop.

The parent forks before ``trio.run`` and before any thread. The child takes the unit's lock,
opens journal and image, mounts with ``pyfuse3.init``, starts the trio loop and only then says
"ready" through a pipe; its standard error is that pipe until then, so libfuse's own messages
and ours reach the user. The parent exits 0 on "ready", else prints what the child said and
exits with the child's code. After "ready" the child logs to ``DIR/daemon.log``.

SIGTERM and SIGINT make everything durable and unmount (never lazily); while ``image`` is still
open the daemon says so in its log and keeps serving until the holder lets go.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable

import pyfuse3
import trio

from . import admin, control, faults, journal as journal_mod, lifecycle, mountutil
from .engine import WRITE_BEHIND, Engine
from .errors import (BusyError, CorruptError, FusemirrorError, NeedsRecoveryError, StateError,
                     UsageError, EXIT_FAILURE)
from .fs import CACHE_MODES, MirrorFS
from .image import Image
from .mirrordb import MirrorDB
from .status import base_status, format_text
from .unit import UnitLock, UnitPaths, lock_holder, require_unit

log = logging.getLogger("fusemirror.daemon")

READY = b"\0FUSEMIRROR-READY\n"
PR_SET_IO_FLUSHER = 57
DEFAULT_CACHE = "direct"


@dataclass
class MountOptions:
    foreground: bool = False
    allow_other: bool = False
    cache: str = DEFAULT_CACHE
    journal: bool = True
    debug: bool = False
    inline_io_max: int = 131072
    write_behind: int = WRITE_BEHIND


def setup_logging(path: str | None, *, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if path is not None:
        fh = logging.handlers.WatchedFileHandler(path)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if foreground:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(sh)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO)


def precheck(paths: UnitPaths, mountpoint: str) -> MirrorDB:
    """Refuse early, with one clear line, what the child would refuse anyway."""
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: mount point is not a directory")
    if os.path.ismount(mountpoint) or mountutil.find_mount(mountpoint) is not None:
        raise StateError(f"{mountpoint} is already a mount point")
    db = MirrorDB.load(paths.dir)
    _require_master_role(paths, db, "mounted")   # a slave's unit, even while its agent holds it
    holder = lock_holder(paths)
    if holder is not None:
        raise BusyError(f"{paths.dir} is in use by pid {holder}")
    lifecycle.check_members(paths, db)  # told it is stale before being told to run fsck
    db, _ = open_master(paths, for_what="mounted")
    return db


def mount(unit_dir: str, mountpoint: str, opts: MountOptions) -> None:
    """Mount and return once the mount is usable (or raise with the reason it is not)."""
    paths = require_unit(unit_dir)
    mnt = os.path.abspath(mountpoint)
    if opts.cache not in CACHE_MODES:
        raise UsageError(f"bad cache mode {opts.cache!r}: one of {', '.join(CACHE_MODES)}")
    recover_if_auto(paths)
    precheck(paths, mnt)
    if opts.foreground:
        setup_logging(paths.log, foreground=True, debug=opts.debug)
        run_daemon(paths, mnt, opts, on_ready=lambda: None)
        return
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: becomes the daemon
        os.close(rfd)
        rc = EXIT_FAILURE
        try:
            os.setsid()
            os.chdir("/")
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(wfd, 2)
            os.close(devnull)
            setup_logging(paths.log, foreground=False, debug=opts.debug)

            def ready() -> None:
                os.write(wfd, READY)
                logfd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                os.dup2(logfd, 2)
                os.close(logfd)
                os.close(wfd)

            run_daemon(paths, mnt, opts, on_ready=ready)
            rc = 0
        except FusemirrorError as e:
            log.warning("mount refused: %s", e.msg)
            _say(wfd, e.msg)
            rc = e.exitcode
        except BaseException as e:  # a bug: leave the traceback in the log
            log.exception("daemon failed")
            _say(wfd, f"daemon failed: {e!r} (see {paths.log})")
        finally:
            logging.shutdown()
            os._exit(rc)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if READY in b"".join(chunks):
            break
    os.close(rfd)
    data = b"".join(chunks)
    if READY in data:
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    msg = "; ".join(lines) if lines else f"the daemon exited with code {code} without a message"
    raise FusemirrorError(msg, code if code > 0 else EXIT_FAILURE)


def _say(fd: int, msg: str) -> None:
    try:
        os.write(fd, (msg + "\n").encode())
    except OSError:
        pass


def recover_if_auto(paths: UnitPaths) -> None:
    """With the master's recovery_policy=auto, an unclean unit is recovered before mounting."""
    db = MirrorDB.load(paths.dir)
    if db.self_image["role"] != "master" or db.self_image.get("recovery_policy") != "auto":
        return
    try:
        needs = journal_mod.scan(paths.journal,
                                 mirror_id=bytes.fromhex(db.mirror["id"])).needs_recovery
    except CorruptError:
        return  # a damaged journal needs an administrator: fsck -y
    if not needs or lock_holder(paths) is not None:
        return
    from . import fsck

    print(f"fusemirror: {paths.dir} was not stopped cleanly; recovering first "
          "(recovery_policy=auto)", file=sys.stderr, flush=True)
    code, summary = fsck.run(paths.dir, dry_run=False, yes=False, progress=True)
    if code not in (fsck.FSCK_OK, fsck.FSCK_CORRECTED):
        raise NeedsRecoveryError(f"automatic recovery failed: {summary.get('action')}; run "
                                 f"`fsck.fusemirror {paths.dir}`")
    fsck.print_summary(summary, sys.stderr)


def set_io_flusher() -> None:
    """PR_SET_IO_FLUSHER: memory reclaim must not wait on us while we serve a loop device."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
            log.info("PR_SET_IO_FLUSHER not set (%s); fine without CAP_SYS_RESOURCE",
                     os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        log.info("PR_SET_IO_FLUSHER unavailable: %s", e)


def _require_master_role(paths: UnitPaths, db: MirrorDB, for_what: str) -> None:
    if db.self_image["role"] != "master":
        raise StateError(f"{paths.dir} holds a slave image of mirror {db.name!r}; only the "
                         f"master can be {for_what} (promote it first: `fusemirror promote "
                         f"{paths.dir}`)")


def open_master(paths: UnitPaths, *, for_what: str) -> tuple[MirrorDB, journal_mod.ScanResult]:
    """Load the database and scan the journal, refusing a unit that needs recovery."""
    db = MirrorDB.load(paths.dir)
    _require_master_role(paths, db, for_what)
    try:
        scan = journal_mod.scan(paths.journal, mirror_id=bytes.fromhex(db.mirror["id"]))
    except CorruptError as e:
        raise NeedsRecoveryError(f"{e}; run `fsck.fusemirror {paths.dir}`") from None
    if scan.needs_recovery:
        raise NeedsRecoveryError(
            f"{paths.dir} was not stopped cleanly: {len(scan.active)} extents are logged in "
            f"the journal; run `fsck.fusemirror {paths.dir}` first")
    return db, scan


class Daemon:
    """One mounted mirror: the engine, the FUSE operations, the control channel, signals."""

    def __init__(self, paths: UnitPaths, mountpoint: str, opts: MountOptions) -> None:
        self.paths = paths
        self.mountpoint = mountpoint
        self.opts = opts
        self.db, scan = open_master(paths, for_what="mounted")
        self.journal = journal_mod.Journal(paths.journal, scan) if opts.journal else None
        self.image = Image(paths.image)
        if self.image.size != self.db.size:
            raise CorruptError(f"{paths.image} is {self.image.size} bytes but the mirror is "
                               f"{self.db.size}")
        self.engine = Engine(paths.dir, self.db, self.journal, self.image,
                             mountpoint=mountpoint, inline_io_max=opts.inline_io_max,
                             write_behind=opts.write_behind)
        admin.make_links(self.engine, paths)
        self.fs = MirrorFS(self.engine, cache=opts.cache, status_text=self.status_text,
                           unit_dir=paths.dir, on_release=self._on_release)
        self._unmount_wanted = False
        self._nursery: trio.Nursery | None = None

    def close_files(self) -> None:
        for link in self.engine.links:
            link.fracture.close()
        if self.journal is not None:
            self.journal.close()
        self.image.close()

    # ---- status and control ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        st = base_status(self.paths, self.db)
        st.update(self.engine.status())
        live = {s["name"]: s for s in st.pop("slaves")}
        st["images"] = [live.get(img["name"], img) for img in st["images"]]
        st["cache"] = self.opts.cache
        return st

    def status_text(self) -> str:
        return format_text(self.status())

    async def handle(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        if cmd == "status":
            return self.status()
        if cmd == "activate":
            return {"state": await self.engine.activate()}
        if cmd == "deactivate":
            return {"state": await self.engine.deactivate(bool(req.get("force")))}
        if cmd == "umount_check":
            n = self.engine.open_handles
            if n and not req.get("force"):
                raise BusyError(f"{self.mountpoint}/image is open ({n} handle{'s' * (n > 1)}, "
                                "e.g. a loop device: `losetup -d`); close it first or use "
                                "--force")
            return {"open_handles": n}
        if cmd == "add_slave":
            secret = admin.unit_secret(self.paths, req.get("secret_file"))
            return await admin.add_slave(self.engine, self.paths, req["address"],
                                         synchronized=bool(req.get("synchronized")),
                                         secret=secret)
        if cmd == "remove_slave":
            return await admin.remove_slave(self.engine, self.paths, req["slave"],
                                            force=bool(req.get("force")))
        if cmd == "sync":
            return await admin.start_sync(self.engine, req["slave"])
        if cmd == "fracture":
            return await admin.fracture(self.engine, req["slave"])
        if cmd == "restore":
            return await admin.restore(self.engine, req["slave"])
        if cmd == "verify":
            return await admin.verify(self.engine, req.get("slave"))
        if cmd == "set":
            pairs = [tuple(p) for p in req["pairs"]]
            res = self.db.apply_settings(pairs, req.get("image"))  # type: ignore[arg-type]
            self.db.bump_generation()
            await self.engine.save_db()
            for link in self.engine.links:
                link.wake()
            return res
        if cmd == "get":
            return self.db.get_attrs(req.get("image"))
        if cmd == "cleanup":
            return {"retired": await self.engine.cleanup(float(req.get("idle", 0)))}
        if cmd == "fault" and faults.ENABLED:
            if req.get("spec"):
                faults.arm(req["spec"])
            else:
                faults.disarm()
            return {}
        raise UsageError(f"unknown control command {cmd!r}")

    # ---- stopping --------------------------------------------------------------------------
    def _on_release(self) -> None:
        if self._unmount_wanted and self._nursery is not None:
            log.info("image released; unmounting as asked")
            self._nursery.start_soon(self._unmount)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                log.info("got %s: making everything durable and unmounting",
                         signal.Signals(sig).name)
                self._unmount_wanted = True
                if self.engine.open_handles:
                    log.warning("image is still open (%d handles, e.g. a loop device); serving "
                                "until it is released, then unmounting",
                                self.engine.open_handles)
                else:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._unmount)

    async def _unmount(self) -> None:
        try:
            await self.engine.fsync()
        except OSError as e:
            log.error("flush before unmount failed: %s", e)
        try:
            await trio.to_thread.run_sync(mountutil.unmount, self.mountpoint)
        except FusemirrorError as e:
            log.warning("unmount failed, still serving: %s", e.msg)

    async def main(self, on_ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as outer:
            await outer.start(self.engine.run)
            async with trio.open_nursery() as inner:
                self._nursery = inner
                await inner.start(control.serve, self.paths.control, self.handle)
                inner.start_soon(self._signals)
                inner.start_soon(self._fuse_loop, inner.cancel_scope)
                log.info("mounted %s on %s (cache=%s, journal=%s, state %s)", self.paths.dir,
                         self.mountpoint, self.opts.cache, "on" if self.journal else "OFF",
                         self.db.state)
                on_ready()
            self._nursery = None
            await self.engine.close()
            outer.cancel_scope.cancel()

    async def _fuse_loop(self, scope: trio.CancelScope) -> None:
        await pyfuse3.main()
        log.info("unmounted %s", self.mountpoint)
        scope.cancel()


def run_daemon(paths: UnitPaths, mountpoint: str, opts: MountOptions,
               on_ready: Callable[[], None]) -> None:
    """The daemon proper (in the forked child, or in the foreground)."""
    lock = UnitLock(paths, "mount").acquire()
    try:
        d = Daemon(paths, mountpoint, opts)
        try:
            set_io_flusher()
            options = set(pyfuse3.default_options)
            options.add(f"fsname=fusemirror:{d.db.name}")
            options.add("subtype=fusemirror")
            if opts.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(d.fs, mountpoint, options)
            except RuntimeError as e:
                raise FusemirrorError(f"cannot mount on {mountpoint}: {e}") from None
            clean = False
            try:
                trio.run(d.main, on_ready)
                clean = True
            finally:
                pyfuse3.close(unmount=False)
                if not clean and mountutil.find_mount(mountpoint) is not None:
                    try:
                        mountutil.unmount(mountpoint)
                    except FusemirrorError as e:
                        log.error("could not unmount after failure: %s", e.msg)
        finally:
            d.close_files()
    finally:
        lock.release()
    log.info("daemon for %s stopped", paths.dir)
