"""Mirror and image state machines (patent FIG. 4 and FIG. 5) as plain transition tables.

This module owns the names of the states and which events move between them; it does no I/O.
A transition that the table does not allow raises :class:`~fusemirror.errors.StateError` with a
message that names the current state and the remedy, so callers never invent their own wording.
"""

from __future__ import annotations

from .errors import StateError

# Mirror states (FIG. 4).
INACTIVE = "INACTIVE"      # default after create; host I/O denied
ACTIVE = "ACTIVE"          # normal operation; host I/O allowed
ATTENTION = "ATTENTION"    # a condition for normal operation fails; host I/O denied

MIRROR_STATES = (INACTIVE, ACTIVE, ATTENTION)

# Image states (FIG. 5), from the slave's point of view. The master image is always SYNCHRONIZED
# with itself; it is listed with that state so every image has one.
UNSYNCHRONIZED = "UNSYNCHRONIZED"
SYNCHRONIZED = "SYNCHRONIZED"
CONSISTENT = "CONSISTENT"
SYNCHRONIZING = "SYNCHRONIZING"

IMAGE_STATES = (UNSYNCHRONIZED, SYNCHRONIZED, CONSISTENT, SYNCHRONIZING)

# Mirror transitions: (state, event) -> new state. Events:
#   activate_ok      administrator activates and the minimum conditions hold
#   activate_fail    administrator activates but a minimum condition fails
#   condition_fail   a minimum condition fails while ACTIVE (slave lost, I/O error)
#   conditions_ok    the conditions hold again while in ATTENTION (back to INACTIVE by itself)
#   deactivate       administrator deactivates
MIRROR_TRANSITIONS: dict[tuple[str, str], str] = {
    (INACTIVE, "activate_ok"): ACTIVE,
    (INACTIVE, "activate_fail"): ATTENTION,
    (ACTIVE, "activate_ok"): ACTIVE,
    (ACTIVE, "condition_fail"): ATTENTION,
    (ACTIVE, "deactivate"): INACTIVE,
    (ATTENTION, "condition_fail"): ATTENTION,
    (ATTENTION, "conditions_ok"): INACTIVE,
    (ATTENTION, "deactivate"): INACTIVE,
    (INACTIVE, "deactivate"): INACTIVE,
}

# What the administrator should do when an event is refused in a state.
_MIRROR_REMEDY: dict[tuple[str, str], str] = {
    (ATTENTION, "activate_ok"): "the mirror leaves ATTENTION by itself once its conditions hold; "
    "run `fusemirror status DIR` to see which one fails, then `fusemirror deactivate DIR` and "
    "`fusemirror activate DIR`",
    (ATTENTION, "activate_fail"): "run `fusemirror status DIR` to see which condition fails",
}

# Image transitions (FIG. 5): (state, event) -> new state. Events:
#   added_synchronized   administrator marks the image SYNCHRONIZED (add --synchronized, or
#                        after copying it by hand with the mirror INACTIVE)
#   sync_start           a full sync or catch-up starts (implicitly when ACTIVE, or by command)
#   sync_done            the synchronization completed
#   sync_failed          the synchronization could not complete
#   master_write         the master committed a write the slave may not have yet
#   all_committed        master and slave committed every write (no outstanding request)
#   updates_lost         the slave missed updates (fracture, backlog overflow, unreachable)
#   history_lost         the master's write history (journal or fracture log) is lost or corrupt
IMAGE_TRANSITIONS: dict[tuple[str, str], str] = {
    (UNSYNCHRONIZED, "sync_start"): SYNCHRONIZING,
    (UNSYNCHRONIZED, "added_synchronized"): SYNCHRONIZED,
    (UNSYNCHRONIZED, "history_lost"): UNSYNCHRONIZED,
    (UNSYNCHRONIZED, "updates_lost"): UNSYNCHRONIZED,
    (SYNCHRONIZED, "master_write"): CONSISTENT,
    (SYNCHRONIZED, "all_committed"): SYNCHRONIZED,
    (SYNCHRONIZED, "added_synchronized"): SYNCHRONIZED,
    (SYNCHRONIZED, "updates_lost"): SYNCHRONIZING,
    (SYNCHRONIZED, "sync_start"): SYNCHRONIZING,
    (SYNCHRONIZED, "history_lost"): UNSYNCHRONIZED,
    (CONSISTENT, "master_write"): CONSISTENT,
    (CONSISTENT, "all_committed"): SYNCHRONIZED,
    (CONSISTENT, "added_synchronized"): SYNCHRONIZED,
    (CONSISTENT, "sync_start"): SYNCHRONIZING,
    (CONSISTENT, "updates_lost"): SYNCHRONIZING,
    (CONSISTENT, "history_lost"): UNSYNCHRONIZED,
    (SYNCHRONIZING, "sync_start"): SYNCHRONIZING,
    (SYNCHRONIZING, "sync_done"): CONSISTENT,
    (SYNCHRONIZING, "sync_failed"): UNSYNCHRONIZED,
    (SYNCHRONIZING, "updates_lost"): SYNCHRONIZING,
    (SYNCHRONIZING, "master_write"): SYNCHRONIZING,
    (SYNCHRONIZING, "history_lost"): UNSYNCHRONIZED,
}


def mirror_next(state: str, event: str) -> str:
    """Return the mirror state after ``event``, or raise StateError naming state and remedy."""
    try:
        return MIRROR_TRANSITIONS[(state, event)]
    except KeyError:
        remedy = _MIRROR_REMEDY.get((state, event), "")
        raise StateError(
            f"mirror is {state}; {event.replace('_', ' ')} is not allowed"
            + (f": {remedy}" if remedy else "")
        ) from None


def image_next(state: str, event: str) -> str:
    """Return the image state after ``event``, or raise StateError naming the state."""
    try:
        return IMAGE_TRANSITIONS[(state, event)]
    except KeyError:
        raise StateError(
            f"image is {state}; {event.replace('_', ' ')} is not allowed in that state"
        ) from None


def host_io_allowed(mirror_state: str) -> bool:
    """Host reads and writes are served only while the mirror is ACTIVE (FIG. 4)."""
    return mirror_state == ACTIVE
