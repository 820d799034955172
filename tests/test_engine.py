"""The write path's invariants (SPEC §3 item 8), tested on the engine alone, without FUSE."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from fusemirror import journal, states
from fusemirror.engine import Engine
from fusemirror.mirrordb import MirrorDB
from fusemirror.unit import create_unit

EXT = 64 * 1024


class FakeImage:
    """An in-memory image that records the order of events and can be made to stall."""

    def __init__(self, size: int, jpath: str, mirror_id: bytes) -> None:
        self.size = size
        self.data = bytearray(size)
        self.events: list[tuple] = []
        self.jpath = jpath
        self.mirror_id = mirror_id
        self.stall_flush = threading.Event()
        self.stall_flush.set()
        self.stall_write = threading.Event()
        self.stall_write.set()
        self.lock = threading.Lock()

    def pwrite(self, off: int, data: bytes) -> None:
        durable = journal.scan(self.jpath, mirror_id=self.mirror_id).active
        with self.lock:
            self.events.append(("write", off, len(data), frozenset(durable)))
        self.stall_write.wait(10)
        self.data[off:off + len(data)] = data

    def pread(self, off: int, size: int) -> bytes:
        return bytes(self.data[off:off + size])

    def fdatasync(self) -> None:
        self.stall_flush.wait(10)
        with self.lock:
            self.events.append(("flush",))

    def start_writeback(self) -> None:
        from fusemirror import faults

        faults.check("image.writeback")
        with self.lock:
            self.events.append(("writeback", sum(1 for ev in self.events if ev[0] == "write")))

    def close(self) -> None:
        pass


def make(tmp_path: Path, ale: int = 64, size: int = 64 * EXT,
         write_behind: int = 0) -> tuple[Engine, FakeImage, str]:
    u = tmp_path / "u"
    create_unit(str(u), size=size, block_size=4096, extent_size=EXT, write_policy="sync",
                name="t", activity_log_extents=ale)
    db = MirrorDB.load(str(u))
    db.mirror["state"] = states.ACTIVE
    jpath = str(u / "journal")
    mid = bytes.fromhex(db.mirror["id"])
    j = journal.Journal.open(jpath, mirror_id=mid)
    img = FakeImage(size, jpath, mid)
    return (Engine(str(u), db, j, img, inline_io_max=0,  # type: ignore[arg-type]
                   write_behind=write_behind), img, jpath)


async def until(cond, timeout: float = 10.0) -> None:
    """Poll a condition that a worker thread makes true."""
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


def run(engine: Engine, body) -> None:
    async def main() -> None:
        async with trio.open_nursery() as n:
            await n.start(engine.run)
            await body()
            n.cancel_scope.cancel()

    trio.run(main)


def test_intent_is_durable_before_the_image_changes(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)

    async def body() -> None:
        await e.write(3 * EXT - 100, b"x" * 300)          # crosses extents 2 and 3
        await e.write(10 * EXT, b"y" * (3 * EXT))           # extents 10..12
        await e.write(10 * EXT + 5, b"z")                   # already active: no journal write

    run(e, body)
    writes = [ev for ev in img.events if ev[0] == "write"]
    assert {2, 3} <= writes[0][3]
    assert {10, 11, 12} <= writes[1][3]
    assert e.journal is not None and e.journal.writes == 2
    assert e.stats["intent_hits"] == 1 and e.stats["intent_misses"] == 2


def test_activity_log_is_bounded_and_evicts_least_recent(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path, ale=16, size=200 * EXT)
    seen = []

    async def body() -> None:
        for i in range(100):
            await e.write(i * EXT, b"w")
            seen.append(len(e.extents))
            await e.write(0, b"hot")  # extent 0 stays recently used

    run(e, body)
    assert max(seen) <= 16
    active = journal.scan(jpath, mirror_id=img.mirror_id).active
    assert len(active) <= 16 and 0 in active and 99 in active
    assert e.stats["retired"] >= 84
    # every eviction was preceded by a flush covering the evicted extents' writes
    assert ("flush",) in img.events


def test_retire_needs_a_flush_after_the_last_write(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)

    async def body() -> None:
        await e.write(5 * EXT, b"a" * 10)
        await e.write(6 * EXT, b"b" * 10)
        n = await e.cleanup(0)
        assert n == 2

    run(e, body)
    kinds = [ev[0] for ev in img.events]
    assert kinds == ["write", "write", "flush"]
    assert journal.scan(jpath, mirror_id=img.mirror_id).active == set()


def test_write_to_a_retiring_extent_waits_and_logs_again(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)
    order: list[str] = []

    async def body() -> None:
        await e.write(7 * EXT, b"first")
        img.stall_flush.clear()                       # the retire's flush will block
        async with trio.open_nursery() as n:
            async def retire() -> None:
                await e.cleanup(0)
                order.append("retired")

            n.start_soon(retire)
            await trio.testing.wait_all_tasks_blocked()
            assert e.extents[7].retiring

            async def write() -> None:
                await e.write(7 * EXT, b"second")
                order.append("written")

            n.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and len([x for x in img.events if x[0] == "write"]) == 1
            img.stall_flush.set()
        assert order == ["retired", "written"]
        assert 7 in e.extents and e.extents[7].logged.is_set()

    import trio.testing  # noqa: F401

    run(e, body)
    writes = [ev for ev in img.events if ev[0] == "write"]
    assert 7 in writes[1][3], "the second write was logged again before it touched the image"
    assert 7 in journal.scan(jpath, mirror_id=img.mirror_id).active
    assert bytes(img.data[7 * EXT:7 * EXT + 6]) == b"second"


def test_overlapping_writes_apply_in_arrival_order(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)

    async def body() -> None:
        img.stall_write.clear()
        async with trio.open_nursery() as n:
            n.start_soon(e.write, 100, b"A" * 1000)
            await until(lambda: [ev for ev in img.events if ev[0] == "write"])
            n.start_soon(e.write, 500, b"B" * 1000)
            n.start_soon(e.write, 5000, b"C" * 10)   # no overlap: not held back
            await until(lambda: len([ev for ev in img.events if ev[0] == "write"]) >= 2)
            await trio.testing.wait_all_tasks_blocked()
            pending = [ev[1] for ev in img.events if ev[0] == "write"]
            assert 500 not in pending and 5000 in pending
            img.stall_write.set()

    import trio.testing  # noqa: F401

    run(e, body)
    assert bytes(img.data[100:500]) == b"A" * 400
    assert bytes(img.data[500:1500]) == b"B" * 1000
    offs = [ev[1] for ev in img.events if ev[0] == "write"]
    assert offs.index(100) < offs.index(500)


def test_clean_close_retires_everything(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)

    async def body() -> None:
        for i in range(10):
            await e.write(i * EXT + 7, b"c" * 100)
        await e.close()

    run(e, body)
    assert journal.scan(jpath, mirror_id=img.mirror_id).active == set()
    assert img.events[-1] == ("flush",)


def test_host_io_denied_unless_active(tmp_path: Path) -> None:
    e, img, jpath = make(tmp_path)

    async def body() -> None:
        for state in (states.INACTIVE, states.ATTENTION):
            e.db.mirror["state"] = state
            for op in (e.write(0, b"x"), e.read(0, 10)):
                try:
                    await op
                except OSError as err:
                    assert err.errno == 5
                else:
                    raise AssertionError(f"{state}: host I/O allowed")

    run(e, body)
    assert [ev for ev in img.events if ev[0] == "write"] == []


def test_sequential_writes_log_the_next_extents_ahead(tmp_path: Path) -> None:
    """A sequential stream keeps the next extents logged ahead of it: after the first two
    writes it never waits for a journal record of its own, whatever size the writes come in."""
    e, img, jpath = make(tmp_path, size=64 * EXT)

    async def body() -> None:
        for i in range(16):
            await e.write(i * EXT, b"s" * EXT)

    run(e, body)
    # the first write is not known to be sequential; the second logs itself and the next
    # eight; from then on the window is refilled in the background, a few extents at a time
    assert e.stats["intent_misses"] == 2 and e.stats["intent_hits"] == 14
    assert e.journal is not None and e.journal.writes <= 5
    writes = [ev for ev in img.events if ev[0] == "write"]
    for i, w in enumerate(writes):
        assert i in w[3], "each write's own extent was durable before it"
    # random small writes do not log ahead
    (tmp_path / "2").mkdir()
    e2, img2, _ = make(tmp_path / "2", size=64 * EXT)

    async def body2() -> None:
        for i in (5, 40, 17):
            await e2.write(i * EXT + 100, b"r" * 10)
        await e2.write(21 * EXT - 4096, b"t" * 4096)  # ends on a boundary, but not sequential

    run(e2, body2)
    assert sorted(e2.extents) == [5, 17, 20, 40]
    # a stream of small writes (as the kernel splits a large one) also logs ahead
    (tmp_path / "3").mkdir()
    e3, _, _ = make(tmp_path / "3", size=64 * EXT)

    async def body3() -> None:
        for off in range(0, 8 * EXT, 16384):
            await e3.write(off, b"c" * 16384)

    run(e3, body3)
    assert e3.stats["intent_misses"] == 1   # only the very first write waited for a record
    assert e3.journal is not None and e3.journal.writes <= 3
    active = journal.scan(str(tmp_path / "3" / "u" / "journal"),
                          mirror_id=bytes.fromhex(e3.db.mirror["id"])).active
    assert set(range(8)) <= active and len(active) <= 8 + 8  # at most a window beyond


def test_failed_background_intent_record_fails_only_the_writes_that_need_it(
        tmp_path: Path, monkeypatch) -> None:
    """A read-ahead record written in the background fails: the mirror goes to ATTENTION,
    extents nobody wrote to are dropped, and no write is answered for an unlogged extent."""
    from fusemirror import faults

    monkeypatch.setattr(faults, "ENABLED", True)
    e, img, jpath = make(tmp_path, size=64 * EXT)
    result: dict[str, object] = {}

    async def body() -> None:
        for i in range(6):                       # extents 0..9 logged (0; 1 and 2-9 ahead)
            await e.write(i * EXT, b"s" * EXT)
        faults.arm("journal.write=EIOx1")
        try:
            await e.write(6 * EXT, b"s" * EXT)   # hit; refills 10-14 in the background
            await until(lambda: e.db.state == states.ATTENTION)
            result["logged"] = sorted(e.extents)
            try:
                await e.write(10 * EXT, b"x")
            except OSError as err:
                result["err"] = err.errno
        finally:
            faults.disarm()

    run(e, body)
    assert result["logged"] == list(range(10)), "the failed window was dropped"
    assert result["err"] == 5  # EIO: ATTENTION refuses host I/O
    assert all(ev[1] < 10 * EXT for ev in img.events if ev[0] == "write")


def test_failed_intent_record_with_read_ahead_fails_a_write_waiting_on_it(
        tmp_path: Path, monkeypatch) -> None:
    """A sequential write's record (its extent and the read-ahead ones) fails after a slow
    O_DSYNC write, while a second write has already reached one of the read-ahead extents and
    waits for that record: the second write gets the error too. Before, the read-ahead states
    were dropped without their event set and it waited for ever (the engine never drained)."""
    from fusemirror import faults

    monkeypatch.setattr(faults, "ENABLED", True)
    e, img, jpath = make(tmp_path, size=64 * EXT)
    assert e.writer is not None
    real = e.writer.journal.append
    result: dict[str, object] = {}

    def slow_failing_append(adds=(), rets=()):
        gate.wait(10)                            # the record is slow to reach the disk ...
        faults.arm("journal.write=EIOx1")        # ... and fails
        return real(adds, rets)

    gate = threading.Event()

    async def write(name: str, off: int) -> None:
        try:
            await e.write(off, b"b" * 4096)
            result[name] = "ok"
        except OSError as err:
            result[name] = err.errno

    async def body() -> None:
        await e.write(EXT - 4096, b"a" * 4096)  # extent 0: a stream now ends at extent 1
        monkeypatch.setattr(e.writer.journal, "append", slow_failing_append)
        try:
            async with trio.open_nursery() as n:
                n.start_soon(write, "w1", EXT)  # logs 1 and, ahead, 2..
                await until(lambda: 3 in e.extents)
                n.start_soon(write, "w2", 3 * EXT)
                await until(lambda: e.extents[3].inflight == 1)
                gate.set()
                with trio.fail_after(10):
                    await until(lambda: len(result) == 2)
        finally:
            faults.disarm()

    run(e, body)
    assert result == {"w1": 5, "w2": 5}
    assert e._inflight == 0


def test_write_behind_starts_write_back_every_so_many_bytes(tmp_path: Path) -> None:
    """Every ``write_behind`` bytes written, the master's write-back is started in the
    background (so a later fsync finds little dirty data); it is not a flush, and a failure
    to start it is logged without failing writes or changing the mirror's state."""
    from fusemirror import faults

    e, img, _ = make(tmp_path, size=64 * EXT, write_behind=4 * EXT)

    # a start that is due while the previous one still runs (in its worker thread) is left for
    # the next write: the writes here wait for each start to end, so the count is exact
    async def body() -> None:
        for i in range(16):
            await e.write(i * EXT, b"b" * EXT)
            await until(lambda: not e.write_behind.running)
        assert e.stats["writebacks"] == 4

    run(e, body)
    starts = [ev[1] for ev in img.events if ev[0] == "writeback"]
    # one start per 4 extents written, never before the 4th (it runs in a worker thread, so
    # later writes may already have landed when it does)
    assert len(starts) == 4 and all(n >= 4 * (k + 1) for k, n in enumerate(starts)), starts
    assert not any(ev[0] == "flush" for ev in img.events), "write-back is not a flush"

    (tmp_path / "off").mkdir()
    e0, img0, _ = make(tmp_path / "off", size=64 * EXT, write_behind=0)

    async def body0() -> None:
        for i in range(16):
            await e0.write(i * EXT, b"b" * EXT)

    run(e0, body0)
    assert e0.stats["writebacks"] == 0 and not any(ev[0] == "writeback" for ev in img0.events)

    (tmp_path / "eio").mkdir()
    e1, img1, _ = make(tmp_path / "eio", size=64 * EXT, write_behind=2 * EXT)
    faults.ENABLED = True
    try:
        async def body1() -> None:
            faults.arm("image.writeback=EIOx1")
            for i in range(4):
                await e1.write(i * EXT, b"b" * EXT)
                await until(lambda: not e1.write_behind.running)
            assert e1.stats["writebacks"] == 1     # the first start failed, the second worked

        run(e1, body1)
    finally:
        faults.disarm()
        faults.ENABLED = False
    assert e1.db.state == states.ACTIVE and e1.stats["writes"] == 4
    assert bytes(img1.data[:4 * EXT]) == b"b" * (4 * EXT)
