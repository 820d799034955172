"""Status of a unit: the facts (a dict, printed as JSON by ``--json``) and their text form.

The text reads like ``drbdadm status``: one line for the mirror, one per image, then the
journal, and a last line saying what to do when something needs the administrator.
"""

from __future__ import annotations

import os
from typing import Any

from . import fracture, journal as journal_mod
from .errors import CorruptError
from .mirrordb import MirrorDB
from .sizes import format_size
from .unit import UnitPaths, lock_holder


def base_status(paths: UnitPaths | None, db: MirrorDB, unit: str | None = None
                ) -> dict[str, Any]:
    """The part of the status that comes from a copy of the mirror database alone.

    ``paths`` is the local unit (its fracture logs are counted); None for a member reached
    over the network (``unit`` names it then).
    """
    me = db.self_image
    images = []
    for img in db.images:
        local = img["id"] == me["id"]
        images.append({
            "name": img["name"], "role": img["role"], "state": img["state"],
            "reachable": True if local else bool(img.get("reachable", False)),
            "reachable_known": local,
            "address": img.get("address"), "local": local,
            "fracture_extents": 0 if local or paths is None else fracture.count(
                os.path.join(paths.fracture, img["id"])),
            "lag_bytes": 0,
            "sync_progress": img.get("sync_progress"),
            "unreachable_since_catchup": bool(img.get("unreachable_since_catchup")),
        })
    counter, gid = db.generation
    return {
        "name": db.name, "state": db.state, "write_policy": db.mirror["write_policy"],
        "unit": paths.dir if paths is not None else unit, "role": me["role"], "size": db.size,
        "block_size": db.block_size, "extent_size": db.extent_size,
        "generation": {"counter": counter, "id": gid},
        "images": images, "running": False, "mountpoint": None,
    }


def offline_status(paths: UnitPaths, db: MirrorDB) -> dict[str, Any]:
    """Status of a unit no daemon serves: the journal is scanned read-only."""
    st = base_status(paths, db)
    st["holder"] = lock_holder(paths)
    try:
        scan = journal_mod.scan(paths.journal, mirror_id=bytes.fromhex(db.mirror["id"]))
    except CorruptError as e:
        st["journal"] = {"active_extents": None, "extents": [], "error": str(e),
                         "activity_log_extents": db.mirror["activity_log_extents"]}
        st["needs_recovery"] = True
        return st
    st["journal"] = {
        "active_extents": len(scan.active), "extents": sorted(scan.active),
        "seq": scan.last_seq, "slots": scan.header.nslots, "torn_tail": scan.torn_tail,
        "activity_log_extents": db.mirror["activity_log_extents"], "error": None,
    }
    st["needs_recovery"] = scan.needs_recovery
    return st


def format_text(st: dict[str, Any]) -> str:
    """The human form of a status dict."""
    where = ""
    if st.get("answered_by"):
        where = f" answered-by:{st['answered_by']}" + (" (served)" if st.get("running") else "")
    elif st.get("running"):
        where = f" mounted:{st.get('mountpoint')} pid:{st.get('pid')}"
    elif st.get("holder"):
        where = f" in-use-by:{st['holder']}"
    lines = [f"{st['name']} role:{st['role']} state:{st['state']} "
             f"policy:{st['write_policy']} size:{format_size(st['size'])}{where}"]
    for img in sorted(st["images"], key=lambda i: i["role"] != "master"):
        reach = "reachable" if img["reachable"] else "UNREACHABLE"
        if not img.get("reachable_known", True):
            reach = f"last-known:{reach.lower()}"
        if img.get("mode") == "fractured":
            reach = "fractured"     # split off on purpose, not lost: `fusemirror restore`
        extra = ""
        if img["role"] == "slave":
            extra = (f" fracture:{img['fracture_extents']} "
                     f"lag:{format_size(img['lag_bytes'])}")
            if img.get("mode"):
                extra += f" link:{img['mode']}"
            if img.get("last_heartbeat_age") is not None and img["reachable"]:
                extra += f" heartbeat:{img['last_heartbeat_age']:.1f}s-ago"
            sy = img.get("sync")
            if sy:
                eta = sy.get("eta_seconds")
                extra += f" sync:{sy['percent']:.1f}%" + (f" eta:{eta:.0f}s" if eta else "")
            elif img.get("sync_progress") is not None:
                extra += f" sync-resumes-at:{format_size(img['sync_progress'])}"
            if img.get("unreachable_since_catchup"):
                extra += " unreachable-since-catch-up"   # promote needs --force
            if img.get("conflict"):
                extra += " CONFLICT"
        lines.append(f"  {img['name']} role:{img['role']} state:{img['state']} {reach}{extra}")
    j = st.get("journal", {})
    if j.get("error"):
        lines.append(f"  journal: DAMAGED: {j['error']}")
    elif j.get("active_extents") is None or st.get("answered_by"):
        lines.append("  journal: the master's (ask it: `fusemirror status DIR` on its host)")
    else:
        lines.append(f"  journal: {j.get('active_extents')} active extents "
                     f"(bound {j.get('activity_log_extents')}), seq {j.get('seq')}, "
                     f"{j.get('slots')} slots")
        if j.get("pinned_extents"):
            lines.append(f"  journal: {len(j['pinned_extents'])} extents pinned by I/O errors")
    if st.get("attention_reason"):
        lines.append(f"  attention: {st['attention_reason']}")
    if st.get("needs_recovery"):
        lines.append(f"  needs recovery: run `fsck.fusemirror {st['unit']}`")
    return "\n".join(lines) + "\n"


def remote_status(address: str, reply: dict[str, Any]) -> dict[str, Any]:
    """Status as one member (reached through its agent) sees the whole mirror."""
    st = base_status(None, MirrorDB(reply["db"]), unit=address)
    # a slave unit has no journal of its own to recover (the master's journal is the
    # mirror's); a master unit reached this way is not served, and its journal not read
    slave = st["role"] == "slave"
    st.update(running=bool(reply.get("served")), answered_by=address,
              journal={"active_extents": 0 if slave else None, "extents": []},
              needs_recovery=False if slave else None)
    return st
