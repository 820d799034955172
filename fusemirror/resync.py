"""Copying extents from the master image to a slave outside the daemon (fsck's resync).

Claim 11: the logged extents are copied without comparing first. ``checksum=True`` (fsck
``--checksum``, DRBD's csums-after-crash idea) asks the slave for xxh3 digests first and skips
extents that already match. With ``extents=None`` the whole image is copied (the fallback when
the journal cannot be trusted). The daemon's own catch-up and sync live in :mod:`.link`, where
they must be ordered with host writes; here nothing else writes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import trio

from . import faults, protocol as P
from .image import Image
from .link import COPY_CHUNK, Channel, LinkDown, _Waiter
from .mirrordb import MirrorDB

WINDOW = 16   # writes in flight to one slave


class SlaveGone(Exception):
    """The slave could not be reached or failed during the copy."""


async def copy_to_slave(image: Image, db: MirrorDB, slave: dict[str, Any], secret: bytes,
                        extents: Sequence[int] | None, *, checksum: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Copy ``extents`` (or everything) from ``image`` to ``slave``, then flush the slave."""
    es, bs, size = db.extent_size, db.block_size, db.size
    todo = list(extents) if extents is not None else list(range(-(-size // es)))
    t0 = time.monotonic()
    try:
        chan = await Channel.connect(slave["address"], secret, db.name,
                                     timeout=float(slave.get("timeout", 5.0)))
    except LinkDown as e:
        raise SlaveGone(str(e)) from None
    copied = skipped = nbytes = 0
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as n:
            n.start_soon(chan.receiver)
            try:
                await chan.request("open", mirror_id=db.mirror["id"], size=size,
                                   generation=db.data["generation"], master=db.data["self"])
                window: list[_Waiter] = []
                # scattered extents: start the next reads now (a whole-image copy is
                # sequential, the kernel's own read-ahead serves it)
                order = image.read_ahead(todo, es) if extents is not None else todo
                for i, e in enumerate(order):
                    if i == len(todo) // 2:
                        faults.crash_point("fsck-mid")
                    start = e * es
                    end = min(start + es, size)
                    sent = False
                    for off in range(start, end, COPY_CHUNK):   # frames stay small
                        length = min(COPY_CHUNK, end - off)
                        data = await trio.to_thread.run_sync(image.pread, off, length)
                        if checksum:
                            ans = await chan.call(
                                lambda s, o=off, n=length: P.ReadDigests(s, o, n, bs))
                            if isinstance(ans, P.Digests) and \
                                    ans.digests == P.block_digests(data, bs):
                                continue
                        window.append(await chan.submit(
                            lambda s, o=off, d=data: P.Write(s, o, d, bs)))
                        sent = True
                        nbytes += length
                        while len(window) > WINDOW:
                            await _settle(window.pop(0))
                    if sent:
                        copied += 1
                    else:
                        skipped += 1
                    if progress:
                        progress(i + 1, len(todo))
                for w in window:
                    await _settle(w)
                await chan.call(P.Flush)
            except (LinkDown, OSError, SlaveGone) as e:
                failure = e
            n.cancel_scope.cancel()
    finally:
        await chan.aclose()
    if failure is not None:
        raise SlaveGone(str(failure))
    return {"name": slave["name"], "extents": copied, "skipped": skipped, "bytes": nbytes,
            "seconds": round(time.monotonic() - t0, 3)}


async def _settle(w: _Waiter) -> None:
    await w.event.wait()
    if isinstance(w.answer, LinkDown):
        raise w.answer
    if isinstance(w.answer, P.Error):
        raise SlaveGone(f"the slave failed a write: {w.answer.message}")
