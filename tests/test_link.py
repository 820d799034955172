"""SlaveLink's ordered stream on its own (no socket, no sender task): what a backlog overflow
drops and what it keeps, and what a request's caller sees when its entry is dropped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from fusemirror import protocol as P, states
from fusemirror.fracture import FractureLog
from fusemirror.link import LinkDown, SlaveLink, _Entry
from fusemirror.mirrordb import MirrorDB
from fusemirror.unit import create_unit

MiB = 1 << 20
BS = 4096


class FakeEngine:
    """What a SlaveLink asks of its engine on the paths tested here."""

    def __init__(self, unit: Path, backlog_blocks: int) -> None:
        create_unit(str(unit), size=16 * MiB, block_size=BS, extent_size=MiB,
                    write_policy="async", name="t")
        self.db = MirrorDB.load(str(unit))
        self.db.mirror["write_backlog_size"] = backlog_blocks
        self.size = 16 * MiB
        self.extent_size = MiB
        self.extents: dict[int, Any] = {}
        self.epochs: list[str] = []
        self.changed = 0

    def new_epoch(self, why: str) -> None:
        self.epochs.append(why)

    def db_changed(self) -> None:
        self.changed += 1

    def link_changed(self, link: SlaveLink) -> None:
        pass


class FakeChannel:
    dead = None


def streaming_link(tmp_path: Path, backlog_blocks: int) -> tuple[SlaveLink, FakeEngine]:
    eng = FakeEngine(tmp_path / "u", backlog_blocks)
    image = {"id": "i1", "name": "s1", "address": "127.0.0.1:1/s1",
             "state": states.CONSISTENT}
    fracture = FractureLog(str(tmp_path / "fracture"), 16, MiB, "i1")
    link = SlaveLink(eng, image, b"secret", fracture)  # type: ignore[arg-type]
    link.mode = "streaming"
    link.chan = FakeChannel()  # type: ignore[assignment]
    return link, eng


def test_overflow_drops_queued_writes_but_keeps_requests(tmp_path: Path) -> None:
    """A database update queued between host writes survives the overflow that drops them:
    it is half of a prepare/commit pair, and its caller waits for its answer."""
    link, eng = streaming_link(tmp_path, backlog_blocks=8)
    answers: list[Any] = []

    async def main() -> None:
        first = link.route(0, b"a" * (4 * BS), range(0, 1), [], bounded=True)
        assert first is not None

        async def caller() -> None:
            answers.append(await link.call(lambda s: P.Request(s, "db_prepare", {})))

        async with trio.open_nursery() as n:
            n.start_soon(caller)
            while len(link._queue) < 2:
                await trio.sleep(0)
            # 4 blocks queued + 6 more > 8: the backlog overflows
            assert link.route(3 * MiB, b"b" * (6 * BS), range(3, 4), [], bounded=True) is None
            assert [e.make is not None for e in link._queue] == [True], "only the request stays"
            assert first.done.is_set() and not first.ok
            assert set(link.missed) == {0, 3}            # both writes go to the fracture log
            assert link.mode == "catchup" and link.state == states.SYNCHRONIZING
            assert link.backlog_blocks == 0 and link.queued_bytes == 0
            request = link._queue.popleft()              # as the sender would, once answered
            request.answer = P.Reply(1, {"prepared": [2, "x"]})
            link._finish(request, True)
        assert answers == [P.Reply(1, {"prepared": [2, "x"]})]

    trio.run(main)


def test_a_request_dropped_unsent_raises_link_down(tmp_path: Path) -> None:
    """When the connection is lost before a request was sent, its caller gets LinkDown, not
    None (which a prepare/commit pair would take for success and go on to commit)."""
    link, _ = streaming_link(tmp_path, backlog_blocks=8)

    async def main() -> None:
        async def caller() -> None:
            with pytest.raises(LinkDown, match="before the request was sent"):
                await link.call(lambda s: P.Request(s, "db_prepare", {}))

        async with trio.open_nursery() as n:
            n.start_soon(caller)
            while not link._queue:
                await trio.sleep(0)
            link._finish(link._queue.popleft(), False)   # dropped, as _down drops the queue

    trio.run(main)


def test_overflow_during_a_sync_keeps_its_copies(tmp_path: Path) -> None:
    """A full sync's copies queued when host writes overflow the backlog keep their place:
    the sync saves its progress after the next flush, which must find them on the slave (a
    dropped copy would be remembered in memory only, and lost with a crash)."""
    link, eng = streaming_link(tmp_path, backlog_blocks=2)
    link.mode = "sync"
    link.sync_cursor = 8 * MiB
    copy = link._enqueue(_Entry(4 * MiB, b"c" * MiB, range(4, 5), [], copy=True))
    write = link.route(0, b"a" * (2 * BS), range(0, 1), [], bounded=True)
    assert write is not None
    assert link.route(MiB, b"b" * BS, range(1, 2), [], bounded=True) is None   # overflow
    assert list(link._queue) == [copy] and not copy.done.is_set()
    assert write.done.is_set() and not write.ok
    assert set(link.missed) == {0, 1}
    assert link.mode == "sync" and link.state == states.SYNCHRONIZING


def test_extents_missed_during_a_resync_survive_its_end(tmp_path: Path) -> None:
    """The end of a catch-up or full sync forgets what it copied, but not an extent missed
    again while it ran (the copy may have read it before the write it missed)."""
    link, eng = streaming_link(tmp_path, backlog_blocks=8)

    async def main() -> None:
        link.fracture.add([2, 3])
        stamp = link._stamp
        link._missed_during = set()
        link._miss([3])                            # missed again during the copy ...
        await link.secure([3])                     # ... and moved to the fracture log
        assert 3 in link.fracture and 3 not in link.missed
        await link._resynced([2, 3], stamp)
        assert list(link.fracture.extents()) == [3]
        assert link._missed_during is None

    trio.run(main)
