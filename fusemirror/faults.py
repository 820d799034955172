"""Fault injection for tests: make a named I/O point fail, or kill the process at a named point.

Inert in normal use: nothing here acts unless the process was started with
``FUSEMIRROR_FAULT_INJECTION=1`` (faults armed at run time through the control channel, or from
``FUSEMIRROR_FAULTS``) or ``FUSEMIRROR_CRASH_AT`` (crash points). The checks on the write path are
one dictionary lookup when nothing is armed.

``FUSEMIRROR_FAULTS`` is a comma-separated list of ``POINT=ERRNO[@SKIP][xCOUNT]``: the point fails
with ``ERRNO`` (a name such as ``EIO`` or ``ENOSPC``) after ``SKIP`` successful calls, ``COUNT``
times (default: forever). ``FUSEMIRROR_CRASH_AT=POINT[@SKIP]`` sends SIGKILL to this process the
``SKIP+1``-th time ``POINT`` is reached.

Points: ``image.write``, ``image.flush``, ``image.read``, ``journal.write``, and the crash points
named where :func:`crash_point` is called.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENABLED = os.environ.get("FUSEMIRROR_FAULT_INJECTION") == "1"


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
