"""Finding and removing FUSE mounts without ever detaching lazily.

libfuse unmounts lazily when it runs as root (``umount2(MNT_DETACH)``); a lazy detach under a
mounted ext4 on a loop device turns that filesystem's writes into EIO. So fusemirror never calls
it: root uses ``umount`` (non-lazy), others ``fusermount3 -u``, and a busy mount stays mounted.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from .errors import BusyError, FusemirrorError


@dataclass
class MountInfo:
    mountpoint: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace") \
        if "\\" in s else s


def mounts() -> list[MountInfo]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = pre.split()
            rest = post.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            out.append(MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return out


def find_mount(path: str) -> MountInfo | None:
    p = os.path.abspath(path)
    found = None
    for m in mounts():
        if m.mountpoint == p:
            found = m  # the last one is on top
    return found


def is_fusemirror(m: MountInfo) -> bool:
    return m.fstype == "fuse.fusemirror"


def unmount(path: str) -> None:
    """Unmount ``path`` (not lazily). Raises BusyError if the kernel says it is busy."""
    cmd = ["umount", path] if os.geteuid() == 0 else ["fusermount3", "-u", path]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise FusemirrorError(f"cannot unmount {path}: {cmd[0]} is not installed") from None
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        text = msg[-1] if msg else f"{cmd[0]} exited with {r.returncode}"
        if "busy" in text.lower():
            raise BusyError(f"{path} is busy (the image is still open, e.g. by a loop device or "
                            f"a mounted filesystem): {text}")
        raise FusemirrorError(f"cannot unmount {path}: {text}")
