"""The mirror database: attributes, crash-atomic persistence and generations.

Every unit directory holds a full copy (``DIR/mirror.json``). This module owns its format, the
validation of every attribute, and the atomic write (temporary file, fsync, rename, fsync of the
directory), so a crash leaves either the old or the new copy, never a mix. It does no locking
(the caller holds the unit lock) and knows nothing of FUSE or the network.

On-disk format, version 1 (JSON, UTF-8)::

    {"format": "fusemirror-mirrordb", "version": 1,
     "mirror": {"id": <hex>, "name": ..., "state": ..., "size": <bytes>,
                "block_size": ..., "extent_size": ..., <mirror-wide attributes>},
     "generation": {"counter": <int>, "id": <hex>, "history": [[<counter>, <id>], ...]},
     "images": [{"id": <hex>, "name": ..., "role": "master"|"slave", "address": ...,
                 "state": ..., "cookie": ..., <per-image attributes>}, ...],
     "self": <id of the image this unit holds>}

The generation (the patent's "cookie") is a counter plus a random id, with its history, so two
members that changed apart are told apart even when their counters agree.

Every copy read from disk (:meth:`MirrorDB.load`) or received from a peer (the agent) is checked
by :meth:`MirrorDB.validate` first: types, states, attribute values, unique image ids.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable

from . import states
from .errors import CorruptError, UsageError
from .sizes import parse_size

FORMAT = "fusemirror-mirrordb"
VERSION = 1
# Generations remembered. A member whose generation is older than all of them cannot be
# shown to descend from ours: "unknown", taken back only with a full sync (see relation).
HISTORY_KEEP = 1024


def relation(mine: dict[str, Any], other: dict[str, Any]) -> str:
    """How generation ``mine`` relates to ``other`` (two members' "generation" entries).

    "same"; "behind" (ours is in their history: we missed changes); "ahead" (theirs is in
    ours: they missed changes); "unknown" (theirs is older than all HISTORY_KEEP generations we
    remember: it may descend from ours or have forked long ago — never "ahead", so such a
    member is taken back only with a full sync); or "diverged" (neither contains the other:
    both changed apart, e.g. a split brain).
    """
    a = (mine["counter"], mine["id"])
    b = (other["counter"], other["id"])
    if a == b:
        return "same"
    theirs = {tuple(x) for x in other.get("history", [])}
    ours = {tuple(x) for x in mine.get("history", [])}
    if a in theirs:
        return "behind"
    if b in ours:
        return "ahead"
    if ours and b[0] < min(x[0] for x in ours):
        return "unknown"
    return "diverged"


def _int(lo: int | None = None) -> Callable[[str | int], int]:
    def conv(v: str | int) -> int:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ValueError("an integer") from None
        if lo is not None and n < lo:
            raise ValueError(f"an integer >= {lo}")
        return n

    return conv


def _seconds(most: float) -> Callable[[str | float], float]:
    """Seconds > 0 and at most ``most`` (a huge heartbeat would also be the wait before each
    reconnect: a slave would never come back)."""
    def conv(v: str | float) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"a number of seconds > 0 and <= {most:g}") from None
        if not 0 < x <= most:
            raise ValueError(f"a number of seconds > 0 and <= {most:g}")
        return x

    return conv


def _choice(*options: str) -> Callable[[str], str]:
    def conv(v: str) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(options))
        return v

    return conv


def _rate(v: str | int) -> int:
    n = parse_size(v, "rate") if isinstance(v, str) else int(v)
    if n < 0:
        raise ValueError("a rate in bytes/s (0 = unlimited)")
    return n


def max_activity_log(size: int, extent_size: int) -> int:
    """The most activity_log_extents may be: the image's extents (more could never be logged
    at once), or the default where that is more. Bounds the journal a unit preallocates —
    also a slave's, built from the copy of the database a master sends."""
    return max(DEFAULTS["activity_log_extents"], -(-size // extent_size))


@dataclass(frozen=True)
class Attr:
    """One settable attribute: its converter/validator, default, and what it means."""

    conv: Callable[[Any], Any]
    help: str


# Mirror-wide attributes that `fusemirror set` may change. name, state, size, block_size and
# extent_size are fixed at create (or changed only by their own commands).
MIRROR_ATTRS: dict[str, Attr] = {
    "fracture_log_size": Attr(_int(0), "extents a slave's fracture log may hold before the slave "
                              "needs a full sync (0 = no limit)"),
    "max_missing_images": Attr(_int(-1), "slaves that may be missing while ACTIVE (-1 disables)"),
    "min_images_required": Attr(_int(-1), "images needed to activate (-1 disables)"),
    "heartbeat": Attr(_seconds(60), "seconds between heartbeats to each slave"),
    "sync_priority": Attr(_int(0), "priority of this mirror's syncs (higher first)"),
    "write_policy": Attr(_choice("sync", "async"), "sync: answered after every reachable slave; "
                         "async: after journal and master"),
    "write_backlog_size": Attr(_int(1), "blocks queued per slave in async mode"),
    "activity_log_extents": Attr(_int(16), "extents that may be logged at once (bounds resync)"),
}

IMAGE_ATTRS: dict[str, Attr] = {
    "timeout": Attr(_seconds(3600), "seconds without an answer before a slave is UNREACHABLE"),
    "sync_rate": Attr(_rate, "bytes/s throttle for full sync and catch-up (0 = unlimited)"),
    "recovery_policy": Attr(_choice("auto", "manual"), "auto: resynchronize when it comes back"),
}

DEFAULTS = {
    "fracture_log_size": 0,
    "max_missing_images": -1,
    "min_images_required": -1,
    "heartbeat": 1.0,
    "sync_priority": 0,
    "write_policy": "sync",
    "write_backlog_size": 16384,
    "activity_log_extents": 1024,
}


def new_generation_id() -> str:
    return secrets.token_hex(8)


def new_id() -> str:
    return secrets.token_hex(16)


class MirrorDB:
    """One unit's copy of the mirror database, held as a dict and saved atomically."""

    FILENAME = "mirror.json"

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def new(cls, *, name: str, size: int, block_size: int, extent_size: int,
            write_policy: str, image_name: str) -> "MirrorDB":
        """A database for a new mirror whose only image is the master held by this unit."""
        gen_id = new_generation_id()
        master_id = new_id()
        mirror = {"id": new_id(), "name": name, "state": states.INACTIVE, "size": size,
                  "block_size": block_size, "extent_size": extent_size}
        mirror.update(DEFAULTS)
        mirror["write_policy"] = MIRROR_ATTRS["write_policy"].conv(write_policy)
        data = {
            "format": FORMAT,
            "version": VERSION,
            "mirror": mirror,
            "generation": {"counter": 1, "id": gen_id, "history": [[1, gen_id]]},
            "images": [{
                "id": master_id, "name": image_name, "role": "master", "address": None,
                "state": states.SYNCHRONIZED, "cookie": [1, gen_id], "timeout": 5.0,
                "sync_rate": 0, "sync_progress": None, "recovery_policy": "manual",
            }],
            "self": master_id,
        }
        return cls(data)

    @classmethod
    def load(cls, unit_dir: str) -> "MirrorDB":
        path = os.path.join(unit_dir, cls.FILENAME)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CorruptError(f"{unit_dir}: mirror database {cls.FILENAME} is missing") from None
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CorruptError(f"{path}: not a valid mirror database ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptError(f"{path}: not a fusemirror mirror database")
        if data.get("version") != VERSION:
            raise CorruptError(f"{path}: mirror database version {data.get('version')} is not "
                               f"supported (this fusemirror reads version {VERSION})")
        try:
            return cls(data).validate()
        except CorruptError as e:
            raise CorruptError(f"{path}: {e.msg}") from None

    def save(self, unit_dir: str) -> None:
        """Write crash-atomically: temporary file, fsync, rename, fsync the directory."""
        atomic_write(os.path.join(unit_dir, self.FILENAME),
                     json.dumps(self.data, indent=1, sort_keys=True).encode() + b"\n")

    def copy(self) -> "MirrorDB":
        return MirrorDB(copy.deepcopy(self.data))

    def validate(self) -> "MirrorDB":
        """Check the structure every reader relies on; raise CorruptError naming the first
        problem. Run on every copy read from disk and on every copy a peer sends (an agent
        stores a master's copy as its own: a wrong type there would surface later, as a crash of
        `status`, `promote` or the next mount, far from its cause)."""
        def need(ok: Any, what: str) -> None:
            if not ok:
                raise CorruptError(f"mirror database: {what}")

        def text(v: Any) -> bool:
            return isinstance(v, str) and 0 < len(v) <= 1024 and v.isprintable()

        def integer(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def attrs(rec: dict[str, Any], table: dict[str, Attr], where: str) -> None:
            """Each settable attribute present holds a value its validator keeps as is."""
            for key, attr in table.items():
                if key in rec:
                    try:
                        ok = attr.conv(rec[key]) == rec[key]
                    except (ValueError, TypeError) as e:
                        raise CorruptError(f"mirror database: {where}{key} {rec[key]!r} is not "
                                           f"{e}") from None
                    need(ok, f"{where}{key} {rec[key]!r}")

        d = self.data
        need(isinstance(d, dict), "not an object")
        need(d.get("format") == FORMAT, f"format is not {FORMAT!r}")
        need(d.get("version") == VERSION, f"version {d.get('version')!r} is not {VERSION}")
        m = d.get("mirror")
        need(isinstance(m, dict), "no mirror record")
        need(text(m.get("id")) and text(m.get("name")), "mirror id or name missing")
        need(m.get("state") in states.MIRROR_STATES, f"mirror state {m.get('state')!r}")
        bs, es, size = m.get("block_size"), m.get("extent_size"), m.get("size")
        need(integer(bs) and bs >= 512 and not bs & (bs - 1), f"block_size {bs!r}")
        need(integer(es) and es >= bs and es % bs == 0, f"extent_size {es!r}")
        need(integer(size) and size > 0, f"size {size!r}")
        attrs(m, MIRROR_ATTRS, "")
        al = m.get("activity_log_extents")
        need(al is None or al <= max_activity_log(size, es),
             f"activity_log_extents {al!r} (more than the image's extents)")
        g = d.get("generation")
        need(isinstance(g, dict) and integer(g.get("counter")) and g["counter"] >= 1
             and text(g.get("id")), "generation")
        hist = g.get("history", [])
        need(isinstance(hist, list) and all(
            isinstance(h, list) and len(h) == 2 and integer(h[0]) and text(h[1]) for h in hist),
            "generation history")
        imgs = d.get("images")
        need(isinstance(imgs, list) and imgs, "no images")
        ids = set()
        for img in imgs:
            need(isinstance(img, dict) and text(img.get("id")) and text(img.get("name")),
                 "an image without id or name")
            name = img["name"]
            need(img["id"] not in ids, f"image id {img['id']} twice")
            ids.add(img["id"])
            need(img.get("role") in ("master", "slave"), f"image {name}: role {img.get('role')!r}")
            need(img.get("state") in states.IMAGE_STATES,
                 f"image {name}: state {img.get('state')!r}")
            need(img.get("address") is None or text(img.get("address")),
                 f"image {name}: address {img.get('address')!r}")
            sp = img.get("sync_progress")
            need(sp is None or (integer(sp) and 0 <= sp <= size),
                 f"image {name}: sync_progress {sp!r}")
            attrs(img, IMAGE_ATTRS, f"image {name}: ")
        need("self" not in d or d["self"] in ids, "'self' names no image")
        return self

    # ---- accessors -----------------------------------------------------------------------
    @property
    def mirror(self) -> dict[str, Any]:
        return self.data["mirror"]

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.data["images"]

    @property
    def self_image(self) -> dict[str, Any]:
        for img in self.images:
            if img["id"] == self.data["self"]:
                return img
        raise CorruptError("mirror database names no image for this unit")

    @property
    def master(self) -> dict[str, Any] | None:
        for img in self.images:
            if img["role"] == "master":
                return img
        return None

    @property
    def slaves(self) -> list[dict[str, Any]]:
        return [img for img in self.images if img["role"] == "slave"]

    @property
    def name(self) -> str:
        return self.mirror["name"]

    @property
    def state(self) -> str:
        return self.mirror["state"]

    @property
    def size(self) -> int:
        return self.mirror["size"]

    @property
    def block_size(self) -> int:
        return self.mirror["block_size"]

    @property
    def extent_size(self) -> int:
        return self.mirror["extent_size"]

    @property
    def generation(self) -> tuple[int, str]:
        g = self.data["generation"]
        return g["counter"], g["id"]

    def bump_generation(self) -> tuple[int, str]:
        """Start a new generation (every committed change of mirror-wide meaning gets one)."""
        g = self.data["generation"]
        g["counter"] += 1
        g["id"] = new_generation_id()
        g["history"].append([g["counter"], g["id"]])
        del g["history"][:-HISTORY_KEEP]
        return g["counter"], g["id"]

    def relation(self, other: dict[str, Any]) -> str:
        """How this copy's generation relates to ``other`` (another member's "generation");
        see :func:`relation`."""
        return relation(self.data["generation"], other)

    def find_image(self, name: str) -> dict[str, Any]:
        """The image called ``name`` (its name, its address, or its id)."""
        for img in self.images:
            if name in (img["name"], img.get("address"), img["id"]) or \
                    (img.get("address") or "").endswith("/" + name):
                return img
        known = ", ".join(img["name"] for img in self.images)
        raise UsageError(f"no image {name!r} in mirror {self.name!r} (images: {known})")

    # ---- attributes ----------------------------------------------------------------------
    def set_mirror_attr(self, key: str, value: Any) -> Any:
        """Validate and set a mirror-wide attribute; unknown keys and bad values list the valid."""
        if key not in MIRROR_ATTRS:
            hint = " (a per-image attribute: use --image NAME)" if key in IMAGE_ATTRS else ""
            raise UsageError(f"unknown mirror attribute {key!r}{hint}; valid: "
                             + ", ".join(sorted(MIRROR_ATTRS)))
        try:
            v = MIRROR_ATTRS[key].conv(value)
        except ValueError as e:
            raise UsageError(f"bad value {value!r} for {key}: expected {e}") from None
        if key == "activity_log_extents" and v > max_activity_log(self.size, self.extent_size):
            raise UsageError(f"activity_log_extents={v} is more than the image has extents: at "
                             f"most {max_activity_log(self.size, self.extent_size)}")
        self.mirror[key] = v
        return v

    def set_image_attr(self, image: str, key: str, value: Any) -> Any:
        """Validate and set a per-image attribute (timeout, sync_rate, recovery_policy)."""
        img = self.find_image(image)
        if key not in IMAGE_ATTRS:
            raise UsageError(f"unknown image attribute {key!r}; valid: "
                             + ", ".join(sorted(IMAGE_ATTRS)))
        try:
            v = IMAGE_ATTRS[key].conv(value)
        except ValueError as e:
            raise UsageError(f"bad value {value!r} for {key}: expected {e}") from None
        img[key] = v
        return v

    def get_attrs(self, image: str | None = None) -> dict[str, Any]:
        """Every attribute: mirror-wide, or of one image."""
        if image is not None:
            img = self.find_image(image)
            return {k: img.get(k) for k in ("id", "name", "address", "role", "state", "cookie",
                                            "timeout", "sync_rate", "sync_progress",
                                            "recovery_policy")}
        m = dict(self.mirror)
        m["generation"] = self.data["generation"]["counter"]
        return m

    def apply_settings(self, pairs: list[tuple[str, str]], image: str | None) -> dict[str, Any]:
        """Validate every KEY=VALUE first, then apply them all (all or nothing)."""
        trial = self.copy()
        out = {}
        for k, v in pairs:
            out[k] = trial.set_image_attr(image, k, v) if image else trial.set_mirror_attr(k, v)
        for k, v in pairs:
            if image:
                self.set_image_attr(image, k, v)
            else:
                self.set_mirror_attr(k, v)
        return out


def atomic_write(path: str, payload: bytes) -> None:
    """Replace ``path`` with ``payload`` so that a crash leaves the old or the new file."""
    d = os.path.dirname(path) or "."
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(d)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a create or rename in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
