"""Fault injection for tests: make a named I/O point fail, or kill the process at a named point.

Inert in normal use: nothing here acts unless the process was started with
``FUSEMIRROR_FAULT_INJECTION=1`` (faults armed at run time through the control channel, or from
``FUSEMIRROR_FAULTS``) or ``FUSEMIRROR_CRASH_AT`` (crash points). The checks on the write path are
one dictionary lookup when nothing is armed.

``FUSEMIRROR_FAULTS`` is a comma-separated list of ``POINT=ERRNO[@SKIP][xCOUNT]``: the point fails
with ``ERRNO`` (a name such as ``EIO`` or ``ENOSPC``) after ``SKIP`` successful calls, ``COUNT``
times (default: forever). ``FUSEMIRROR_CRASH_AT=POINT[@SKIP]`` sends SIGKILL to this process the
``SKIP+1``-th time ``POINT`` is reached.

Points: ``image.write``, ``image.flush``, ``image.read``, ``journal.write``,
``fracture.write`` (a page of a slave's fracture log). Crash points:
``after-journal`` (intents durable, no image written), ``after-master`` (master written),
``after-slave`` (slaves acknowledged), ``cleanup-before-retire`` (a clean-up batch flushed, its
retire record not written), ``fsck-mid`` (half of fsck's copy done),
``fsck-journal-rebuilt`` (fsck -y rebuilt a damaged journal, its final save not done),
``demote-saved`` (demote saved the unit as a slave, its journal not cleared yet). With
``FUSEMIRROR_WRITE_ORDER=master-first|slave-first`` the master write and the slave sends happen
in that order instead of together, so every completion order of claim 1 can be crashed in.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENABLED = os.environ.get("FUSEMIRROR_FAULT_INJECTION") == "1"
# Crash tests only: the order of the master write and the slave sends (normally concurrent).
WRITE_ORDER = os.environ.get("FUSEMIRROR_WRITE_ORDER", "concurrent") if (
    ENABLED or os.environ.get("FUSEMIRROR_CRASH_AT")) else "concurrent"


@dataclass
class _Fault:
    err: int
    skip: int = 0
    count: int = -1  # -1: forever


_armed: dict[str, _Fault] = {}
_crash: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, _Fault]:
    point, _, rest = spec.partition("=")
    count = -1
    if "x" in rest:
        rest, _, c = rest.partition("x")
        count = int(c)
    skip = 0
    if "@" in rest:
        rest, _, s = rest.partition("@")
        skip = int(s)
    return point.strip(), _Fault(getattr(errno, rest.strip()), skip, count)


def arm(spec: str) -> None:
    """Arm faults from a ``POINT=ERRNO[@SKIP][xCOUNT],...`` spec (tests only)."""
    if not ENABLED:
        raise RuntimeError("fault injection is disabled (FUSEMIRROR_FAULT_INJECTION is not 1)")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, fault = _parse(part)
        _armed[point] = fault
        log.warning("fault injection: %s armed (%s)", point, errno.errorcode[fault.err])


def disarm() -> None:
    _armed.clear()


def check(point: str) -> None:
    """Raise the armed OSError for ``point``, if any. Cheap when nothing is armed."""
    if not _armed:
        return
    f = _armed.get(point)
    if f is None:
        return
    if f.skip > 0:
        f.skip -= 1
        return
    if f.count == 0:
        return
    if f.count > 0:
        f.count -= 1
    raise OSError(f.err, f"{os.strerror(f.err)} (injected at {point})")


def crash_point(point: str) -> None:
    """SIGKILL this process if ``FUSEMIRROR_CRASH_AT`` names ``point`` (crash tests only)."""
    if not _crash:
        return
    left = _crash.get(point)
    if left is None:
        return
    if left > 0:
        _crash[point] = left - 1
        return
    log.warning("crash injection: killing myself at %s", point)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _init_from_env() -> None:
    spec = os.environ.get("FUSEMIRROR_FAULTS")
    if spec and ENABLED:
        arm(spec)
    crash = os.environ.get("FUSEMIRROR_CRASH_AT")
    if crash:
        point, _, skip = crash.partition("@")
        _crash[point.strip()] = int(skip or 0)


_init_from_env()


# ---- simulated power loss -------------------------------------------------------------------
# With FUSEMIRROR_POWERLOSS_DIR set, every write to an image, a fracture log or the journal first
# saves the bytes it overwrites in an undo log there, and a successful fdatasync (or, for the
# O_DSYNC journal, the write's return) forgets them. After the process is SIGKILLed,
# simulate_power_loss() undoes a random subset of what was never made durable, page by page,
# some pages torn at sector granularity: what a power cut may leave on a disk whose cache lied
# about nothing it acknowledged.
POWERLOSS_DIR = os.environ.get("FUSEMIRROR_POWERLOSS_DIR")
_undo_fds: dict[str, int] = {}


def _undo_fd(path: str) -> int:
    import hashlib

    fd = _undo_fds.get(path)
    if fd is None:
        assert POWERLOSS_DIR is not None
        tag = f"{os.getpid()}-{hashlib.sha1(path.encode()).hexdigest()[:12]}"
        with open(os.path.join(POWERLOSS_DIR, tag + ".path"), "w") as f:
            f.write(path)
        fd = os.open(os.path.join(POWERLOSS_DIR, tag + ".undo"),
                     os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        _undo_fds[path] = fd
    return fd


def before_write(path: str, fd: int, off: int, length: int) -> None:
    """Save what a write is about to overwrite (power-loss simulation only)."""
    if POWERLOSS_DIR is None:
        return
    import struct

    old = os.pread(fd, length, off)
    old += bytes(length - len(old))
    os.write(_undo_fd(path), struct.pack("<QI", off, length) + old)


def synced(path: str) -> None:
    """Everything written to ``path`` so far is durable: forget its undo records."""
    if POWERLOSS_DIR is None:
        return
    fd = _undo_fds.get(path)
    if fd is not None:
        os.ftruncate(fd, 0)


def simulate_power_loss(directory: str, seed: int, *, under: str | None = None,
                        page: int = 4096, sector: int = 512) -> dict[str, int]:
    """Undo a random subset of the non-durable writes recorded in ``directory``.

    Each touched page independently keeps its newest content, goes back to its last durable
    content, or is torn (some sectors back). Only files under ``under`` (a unit or agent root:
    the host that lost power) are touched. Returns counts for the test's report.
    """
    import random
    import struct

    rng = random.Random(seed)
    counts = {"files": 0, "pages_reverted": 0, "pages_torn": 0, "pages_kept": 0}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".undo"):
            continue
        with open(os.path.join(directory, name[:-5] + ".path")) as f:
            path = f.read()
        with open(os.path.join(directory, name), "rb") as f:
            raw = f.read()
        recs = []
        pos = 0
        while pos + 12 <= len(raw):
            off, length = struct.unpack_from("<QI", raw, pos)
            old = raw[pos + 12:pos + 12 + length]
            if len(old) < length:
                break  # the undo record itself was cut by the kill: its write never started
            recs.append((off, old))
            pos += 12 + length
        if under is not None and not path.startswith(under.rstrip("/") + "/"):
            continue
        if not recs or not os.path.exists(path):
            os.unlink(os.path.join(directory, name))
            continue
        counts["files"] += 1
        decision: dict[int, str] = {}
        torn_mask: dict[int, set[int]] = {}
        for off, old in recs:
            for p in range(off // page, (off + len(old) - 1) // page + 1):
                if p not in decision:
                    decision[p] = rng.choice(["keep", "revert", "torn"])
                    if decision[p] == "torn":
                        torn_mask[p] = {s for s in range(page // sector) if rng.random() < 0.5}
                    counts["pages_" + {"keep": "kept", "revert": "reverted",
                                       "torn": "torn"}[decision[p]]] += 1
        fd = os.open(path, os.O_RDWR)
        try:
            for off, old in reversed(recs):   # newest first: the oldest old bytes win
                start = off
                end = off + len(old)
                b = start
                while b < end:
                    p = b // page
                    chunk_end = min(end, (p + 1) * page)
                    d = decision[p]
                    if d == "revert":
                        os.pwrite(fd, old[b - off:chunk_end - off], b)
                    elif d == "torn":
                        s = b
                        while s < chunk_end:
                            sec = (s % page) // sector
                            sec_end = min(chunk_end, (s // sector + 1) * sector)
                            if sec in torn_mask[p]:
                                os.pwrite(fd, old[s - off:sec_end - off], s)
                            s = sec_end
                    b = chunk_end
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(os.path.join(directory, name))
    return counts
