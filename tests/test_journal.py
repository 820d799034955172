"""Tests of the write-intent journal (fusemirror/journal.py): format, recovery scan, writer.

Everything here runs in-process on small journal files under tmp_path; no FUSE, no daemon.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import tempfile
import threading

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fusemirror import faults
from fusemirror import journal as jm
from fusemirror.errors import CorruptError

MID = bytes(range(16))
OTHER_MID = bytes(range(16, 32))
SLOT = jm.SLOT
NEXTENTS = 1 << 20


# ---- helpers ---------------------------------------------------------------------------------
def make(path, nslots: int = 16) -> jm.Header:
    return jm.create(str(path), mirror_id=MID, extent_size=1 << 20, nextents=NEXTENTS,
                     nslots=nslots)


def slot_off(nslots: int, seq: int) -> int:
    """Byte offset of the slot that holds record ``seq``."""
    return (1 + seq % nslots) * SLOT


def read_slot(path, nslots: int, seq: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(slot_off(nslots, seq))
        return f.read(SLOT)


def write_slot(path, nslots: int, seq: int, data: bytes) -> None:
    assert len(data) == SLOT
    with open(path, "r+b") as f:
        f.seek(slot_off(nslots, seq))
        f.write(data)


def write_at(path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def flip_bit(path, off: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ (1 << bit)]))


def records(path) -> list[jm.Record]:
    """Every valid record in the ring, in seq order."""
    with open(path, "rb") as f:
        data = f.read()
    h = jm.Header.unpack(data[:SLOT], str(path))
    out = []
    for i in range(h.nslots):
        r = jm.Record.unpack(data[(1 + i) * SLOT:(2 + i) * SLOT], h.journal_id)
        if r is not None:
            out.append(r)
    return sorted(out, key=lambda r: r.seq)


def check_scan(path, j: jm.Journal, model: set[int] | None = None) -> jm.ScanResult:
    res = jm.scan(str(path), mirror_id=MID)
    assert res.last_seq == j.seq
    assert res.active == j.active
    if model is not None:
        assert res.active == model
    assert res.needs_recovery == bool(res.active)
    return res


@pytest.fixture
def jpath(tmp_path):
    return tmp_path / "journal"


# ---- 1. create, scan, append, reopen ---------------------------------------------------------
def test_create_and_scan_empty(jpath):
    h = make(jpath, nslots=32)
    assert os.path.getsize(jpath) == 33 * SLOT
    assert not os.path.exists(str(jpath) + ".tmp")
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.active == set()
    assert res.last_seq == 0 and res.records == 0
    assert res.torn_tail is False and res.needs_recovery is False
    assert res.header == h
    assert (h.nslots, h.extent_size, h.nextents, h.mirror_id) == (32, 1 << 20, NEXTENTS, MID)
    # Without a mirror id the scan does not check it.
    assert jm.scan(str(jpath)).header == h
    j = jm.Journal.open(str(jpath), mirror_id=MID)
    try:
        assert j.seq == 0 and j.active == set() and j.broken is None
        assert j.max_active == jm.max_active_for(32) == (32 - 4) // 2 * jm.CKPT_MIN
        j.append()  # nothing to do: no record
        j.append(rets=[5])  # retiring an inactive extent: no record
        assert j.seq == 0 and j.writes == 0
    finally:
        j.close()
    assert jm.scan(str(jpath)).last_seq == 0


def test_create_refuses_too_many_extents(jpath):
    with pytest.raises(ValueError):
        jm.create(str(jpath), mirror_id=MID, extent_size=4096, nextents=jm.MAX_EXTENTS + 1)


def test_append_rescan_reopen(jpath):
    make(jpath, nslots=16)
    j = jm.Journal.open(str(jpath), mirror_id=MID)
    j.append(adds=[1, 2, 3])
    assert j.seq == 1 and j.active == {1, 2, 3} and j.writes == 1
    check_scan(jpath, j, {1, 2, 3})
    j.append(adds=[4], rets=[2])
    j.append(adds=[2, 4, 5])  # 4 already active: only 2 and 5 are new
    j.append(rets=[1, 99])     # 99 is not active
    assert j.seq == 4 and j.writes == 4
    res = check_scan(jpath, j, {2, 3, 4, 5})
    assert res.records == 4 and res.torn_tail is False
    r4 = records(jpath)[-1]
    assert (r4.seq, r4.adds, r4.rets) == (4, (), (1,))
    j.close()
    j.close()  # idempotent

    j2 = jm.Journal.open(str(jpath), mirror_id=MID)
    assert j2.seq == 4 and j2.active == {2, 3, 4, 5}
    j2.append(adds=[10, 11])
    assert j2.seq == 5
    j2.append(rets=[3, 10])
    assert j2.seq == 6
    check_scan(jpath, j2, {2, 4, 5, 11})
    assert [r.seq for r in records(jpath)] == [1, 2, 3, 4, 5, 6]
    j2.close()
    j3 = jm.Journal.open(str(jpath))
    assert j3.seq == 6 and j3.active == {2, 4, 5, 11}
    j3.close()


def test_record_layout(jpath):
    """The record sits in slot 1 + seq % nslots and carries adds, rets and checkpoint."""
    h = make(jpath, nslots=16)
    j = jm.Journal.open(str(jpath))
    j.append(adds=[7, 3])
    j.append(adds=[9], rets=[3])
    j.close()
    buf = read_slot(jpath, 16, 2)
    assert buf[:4] == jm.RECORD_MAGIC
    assert buf[8:24] == h.journal_id
    r = jm.Record.unpack(buf, h.journal_id)
    assert r is not None
    assert (r.seq, r.adds, r.rets, r.ckpt_start, r.ckpt_total, r.ckpt_offset, r.ckpt) == \
        (2, (9,), (3,), 2, 2, 0, (3, 7))
    assert struct.unpack_from("<Q", buf, SLOT - 8)[0] == jm._checksum(buf)
    # Another journal's id does not read this record.
    assert jm.Record.unpack(buf, os.urandom(16)) is None


def test_journal_full_is_not_broken(jpath):
    make(jpath, nslots=8)
    j = jm.Journal.open(str(jpath))
    cap = j.max_active
    assert cap == 2 * jm.CKPT_MIN
    j.append(adds=range(cap))
    with pytest.raises(OSError) as ei:
        j.append(adds=[cap])
    assert ei.value.errno == errno.ENOSPC
    assert j.broken is None and len(j.active) == cap
    with pytest.raises(OSError):
        j.append(adds=[cap], rets=[0])  # the bound counts adds before retires
    assert j.broken is None and j.seq == 2
    j.append(rets=[0])
    j.append(adds=[cap])
    check_scan(jpath, j, set(range(1, cap + 1)))
    j.close()


# ---- 2. wrap-around, checkpoints, split appends ----------------------------------------------
def _random_round(rng: random.Random, j: jm.Journal, model: set[int], universe: int,
                  big: bool) -> None:
    room = j.max_active - len(model)
    if big and rng.random() < 0.5:
        n_add = rng.randint(0, min(room, 3 * jm.MAX_DELTA))
    else:
        n_add = rng.randint(0, min(room, 40))
    n_ret = rng.randint(0, min(len(model), 3 * jm.MAX_DELTA if big else 40))
    rets = set(rng.sample(sorted(model), n_ret)) if n_ret else set()
    adds = set()
    while len(adds) < n_add:
        e = rng.randrange(universe)
        if e not in model:
            adds.add(e)
    if rng.random() < 0.2:
        adds |= set(rng.sample(sorted(model), min(3, len(model))))  # already active
        rets |= {rng.randrange(universe, 2 * universe)}              # never active
        adds -= rets
    j.append(adds=adds, rets=rets)
    model.difference_update(rets)
    model.update(adds)
    assert j.active == model


@pytest.mark.parametrize("nslots,big", [(16, False), (16, True), (64, True)])
def test_wraparound_random(tmp_path, nslots, big):
    path = tmp_path / "journal"
    make(path, nslots=nslots)
    rng = random.Random(1000 + nslots + big)
    j = jm.Journal.open(str(path), mirror_id=MID)
    model: set[int] = set()
    universe = 4 * j.max_active
    multi_record_ckpt = False
    split = False
    for step in range(1500 if not big else 800):
        before = j.seq
        _random_round(rng, j, model, universe, big)
        split |= j.seq - before > 1
        if step % 5 == 0:
            check_scan(path, j, model)
            multi_record_ckpt |= any(r.ckpt_total > len(r.ckpt) for r in records(path))
        if step % 97 == 96:
            j.close()
            j = jm.Journal.open(str(path), mirror_id=MID)
            assert j.active == model
    check_scan(path, j, model)
    assert j.seq > 5 * nslots  # wrapped many times
    if big:
        assert split and multi_record_ckpt
    j.close()


def test_full_journal_checkpoint_survives_wrap(jpath):
    """Active set at the bound, every record full of deltas: checkpoints span the most records."""
    n = 16
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath))
    cap = j.max_active
    model = set(range(cap - 252))
    j.append(adds=model)
    rng = random.Random(7)
    nxt = cap
    for i in range(5 * n):
        # 503 deltas, the most one record takes, so each record carries the smallest
        # checkpoint slice and the checkpoint spans ceil(A / 503) = 6 records, the most the
        # bound allows for 16 slots. (The bound counts adds before retires.)
        nret = 252 if i % 2 == 0 else 251
        rets = set(rng.sample(sorted(model), nret))
        adds = set(range(nxt, nxt + 503 - nret))
        j.append(adds=adds, rets=rets)
        nxt += 503 - nret
        model = (model - rets) | adds
        assert len(model) >= cap - 253
        res = check_scan(jpath, j, model)
        assert res.records == min(j.seq, n - 1)
    assert max(r.ckpt_total for r in records(jpath)) > 5 * jm.CKPT_MIN
    j.close()


def test_reopen_mid_checkpoint_keeps_journal_recoverable(jpath):
    """Reopening while a checkpoint spans several records must not lose the last complete one.

    A new process starting a fresh checkpoint (abandoning the half-written one) puts the
    newest complete checkpoint up to three checkpoint lengths back, beyond what the ring keeps.
    """
    n = 16
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath))
    cap = j.max_active
    rng = random.Random(3)
    model = set(range(cap - 300))
    j.append(adds=model)
    nxt = cap
    resumed = 0
    for round_ in range(12):
        # Reopen after 1..5 records of a checkpoint that needs 6 (5..6 x 503 entries, 503 deltas
        # per record): the previous checkpoint is only partly written.
        for _ in range(rng.randint(1, 5)):
            rets = set(rng.sample(sorted(model), 252))
            adds = set(range(nxt, nxt + 251))
            j.append(adds=adds, rets=rets)
            nxt += 251
            model = (model - rets) | adds
            check_scan(jpath, j, model)
        j.close()
        res = jm.scan(str(jpath))
        assert res.active == model
        resumed += res.open_checkpoint is not None
        j = jm.Journal(str(jpath), res)
        seq = j.seq
        j.append(adds=[nxt])
        model.add(nxt)
        nxt += 1
        if res.open_checkpoint is not None:
            # The next record carries on with the checkpoint the last process left open.
            c, entries, done = res.open_checkpoint
            r = records(jpath)[-1]
            assert (r.seq, r.ckpt_start, r.ckpt_offset, r.ckpt_total) == \
                (seq + 1, c, done, len(entries))
        check_scan(jpath, j, model)
    assert resumed >= 6
    j.close()


def test_reopen_between_big_appends(jpath):
    """The sequence the rule-based test below found against the unfixed journal: big split
    appends with reopens in between, each reopen abandoning a checkpoint of ~25 records."""
    n = 64
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath), mirror_id=MID)
    cap = j.max_active
    model: set[int] = set()

    def fill() -> None:
        adds, x = set(), 0
        while len(adds) < cap - len(model) - jm.MAX_DELTA:
            if x not in model:
                adds.add(x)
            x += 1
        j.append(adds=adds)
        model.update(adds)

    def retire(frac: float) -> None:
        rets = set(sorted(model)[::2][:int(len(model) * frac)])
        j.append(rets=rets)
        model.difference_update(rets)

    def reopen() -> None:
        nonlocal j
        j.close()
        j = jm.Journal.open(str(jpath), mirror_id=MID)

    for step in (fill, reopen, lambda: retire(0.25), fill, lambda: retire(0.1875), reopen,
                 fill, lambda: retire(1.0), fill, reopen, lambda: retire(0.5), fill):
        step()
        check_scan(jpath, j, model)
    assert j.seq > n
    j.close()


# ---- hypothesis: rule-based model ------------------------------------------------------------
class JournalMachine(RuleBasedStateMachine):
    """A journal against a Python set, with reopens and torn final writes."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="fmj-")
        self.path = os.path.join(self.dir, "journal")
        self.j: jm.Journal | None = None
        self.model: set[int] = set()
        self.nslots = 0

    @initialize(nslots=st.sampled_from([8, 16, 32, 64]))
    def setup(self, nslots):
        self.nslots = nslots
        make(self.path, nslots=nslots)
        self.j = jm.Journal.open(self.path, mirror_id=MID)

    def teardown(self) -> None:
        if self.j is not None:
            self.j.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fresh(self, data, count: int) -> set[int]:
        """``count`` extents that are not active."""
        x = data.draw(st.integers(0, 200_000))
        step = data.draw(st.integers(1, 7))
        out: set[int] = set()
        while len(out) < count:
            if x not in self.model:
                out.add(x)
            x += step
        return out

    @rule(data=st.data(), n_add=st.integers(0, 1200), frac_ret=st.floats(0, 1))
    def append(self, data, n_add, frac_ret):
        j = self.j
        n_ret = int(len(self.model) * frac_ret)
        rets = set(sorted(self.model)[::2][:n_ret]) if n_ret else set()
        adds = self._fresh(data, n_add)
        if len(self.model) + len(adds) > j.max_active:
            with pytest.raises(OSError) as ei:
                j.append(adds=adds, rets=rets)
            assert ei.value.errno == errno.ENOSPC
            assert j.broken is None
            return
        seq0 = j.seq
        j.append(adds=adds, rets=rets)
        changes = len(adds) + len(rets & self.model)
        assert j.seq - seq0 == -(-changes // jm.MAX_DELTA)
        self.model -= rets
        self.model |= adds

    @precondition(lambda self: self.j is not None
                  and len(self.model) < self.j.max_active - 2 * jm.MAX_DELTA)
    @rule(data=st.data())
    def fill(self, data):
        """Grow the active set close to the bound: checkpoints then span the most records."""
        adds = self._fresh(data, self.j.max_active - len(self.model) - jm.MAX_DELTA)
        self.j.append(adds=adds)
        self.model |= adds

    @precondition(lambda self: self.j is not None and len(self.model) >= jm.MAX_DELTA)
    @rule(data=st.data(), n_add=st.integers(0, jm.MAX_DELTA))
    def churn(self, data, n_add):
        """One record full of deltas (the smallest checkpoint slice), the set size steady."""
        n_add = min(n_add, self.j.max_active - len(self.model))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        rets = set(rng.sample(sorted(self.model), jm.MAX_DELTA - n_add))
        adds = self._fresh(data, n_add)
        seq0 = self.j.seq
        self.j.append(adds=adds, rets=rets)
        assert self.j.seq == seq0 + 1
        self.model -= rets
        self.model |= adds

    @rule()
    def reopen(self):
        seq = self.j.seq
        self.j.close()
        self.j = jm.Journal.open(self.path, mirror_id=MID)
        assert self.j.seq == seq

    @precondition(lambda self: self.j is not None and self.j.max_active > len(self.model))
    @rule(data=st.data(), cut=st.integers(1, 7), mode=st.sampled_from(["zeros", "old", "junk"]))
    def torn_append(self, data, cut, mode):
        """Append one record, then tear its slot as a crash mid-write would, and recover."""
        j = self.j
        seq0, before = j.seq, set(self.model)
        off = slot_off(self.nslots, seq0 + 1)
        old = read_slot(self.path, self.nslots, seq0 + 1)
        adds = self._fresh(data, data.draw(st.integers(1, min(300, j.max_active - len(before)))))
        j.append(adds=adds)
        assert j.seq == seq0 + 1
        new = read_slot(self.path, self.nslots, seq0 + 1)
        k = cut * 512
        if mode == "zeros":
            torn = new[:k] + bytes(SLOT - k)
        elif mode == "old":
            torn = old[:k] + new[k:]
        else:
            torn = new[:k] + random.Random(k).randbytes(SLOT - k)
        write_at(self.path, off, torn)
        j.close()
        res = jm.scan(self.path, mirror_id=MID)
        assert res.torn_tail is True
        assert res.last_seq == seq0
        assert res.active == before
        self.j = jm.Journal(self.path, res)
        assert self.j.seq == seq0 and self.j.active == before
        self.model = before

    @invariant()
    def scan_matches_model(self):
        if self.j is None:
            return
        res = jm.scan(self.path, mirror_id=MID)
        assert res.active == self.model == self.j.active
        assert res.last_seq == self.j.seq
        assert res.records == min(self.j.seq, self.nslots - 1)


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(
    max_examples=30, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- 3. crash: torn final write ---------------------------------------------------------------
def _prepare(jpath, nslots: int, nrecords: int) -> tuple[jm.Journal, set[int]]:
    make(jpath, nslots=nslots)
    j = jm.Journal.open(str(jpath), mirror_id=MID)
    for i in range(nrecords):
        j.append(adds=[2 * i, 2 * i + 1], rets=[2 * i - 3] if i >= 2 else [])
    return j, set(j.active)


@pytest.mark.parametrize("nrecords", [0, 5, 14, 15, 16, 40])
@pytest.mark.parametrize("how", ["prefix-new", "prefix-old", "suffix-new", "junk-tail",
                                 "first-sector-old"])
def test_torn_last_record(jpath, nrecords, how):
    n = 16
    j, before = _prepare(jpath, n, nrecords)
    seq0 = j.seq
    old = read_slot(jpath, n, seq0 + 1)
    j.append(adds=[1000, 1001], rets=sorted(before)[:1])
    assert j.seq == seq0 + 1
    new = read_slot(jpath, n, seq0 + 1)
    j.close()
    if how == "prefix-new":
        torn = new[:2048] + old[2048:]
    elif how == "prefix-old":
        torn = old[:3584] + new[3584:]
    elif how == "suffix-new":
        torn = bytes(1024) + new[1024:]
    elif how == "junk-tail":
        torn = new[:512] + os.urandom(SLOT - 512)
    else:
        torn = old[:512] + new[512:]
    assert torn != new and torn != old
    write_slot(jpath, n, seq0 + 1, torn)
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.torn_tail is True
    assert res.last_seq == seq0
    assert res.active == before
    # Recovery continues from there: the torn slot is simply rewritten.
    j = jm.Journal.open(str(jpath), mirror_id=MID)
    assert j.seq == seq0 and j.active == before
    j.append(adds=[2000])
    assert j.seq == seq0 + 1
    res = check_scan(jpath, j, before | {2000})
    assert res.torn_tail is False
    j.close()


def test_last_record_slot_zeroed_before_wrap(jpath):
    """The last write never reached the disk (its slot still zero): the state before it, and
    nothing torn to report, since a zero slot is exactly what an unwritten one looks like."""
    n = 16
    j, before = _prepare(jpath, n, 6)
    seq0 = j.seq
    j.append(adds=[500])
    j.close()
    write_slot(jpath, n, seq0 + 1, bytes(SLOT))
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.last_seq == seq0 and res.active == before
    assert res.torn_tail is False


def test_last_record_slot_zeroed_after_wrap(jpath):
    n = 16
    j, before = _prepare(jpath, n, 30)
    seq0 = j.seq
    j.append(adds=[500])
    j.close()
    write_slot(jpath, n, seq0 + 1, bytes(SLOT))
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.last_seq == seq0 and res.active == before
    assert res.torn_tail is True  # the slot held record seq0 + 1 - n before


def test_torn_first_record(jpath):
    n = 16
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath))
    j.append(adds=[1, 2])
    j.close()
    new = read_slot(jpath, n, 1)
    write_slot(jpath, n, 1, new[:1000] + bytes(SLOT - 1000))
    res = jm.scan(str(jpath))
    assert (res.active, res.last_seq, res.torn_tail) == (set(), 0, True)
    j = jm.Journal.open(str(jpath))
    j.append(adds=[3])
    check_scan(jpath, j, {3})
    j.close()


def test_torn_tail_after_split_append(jpath):
    """Only the last record of a split append is torn: the earlier records count."""
    n = 32
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath))
    j.append(adds=range(10))
    seq0 = j.seq
    big = list(range(100, 100 + 2 * jm.MAX_DELTA + 7))
    j.append(adds=big)
    assert j.seq == seq0 + 3
    j.close()
    write_at(jpath, slot_off(n, seq0 + 3) + 100, os.urandom(200))
    res = jm.scan(str(jpath))
    assert res.torn_tail and res.last_seq == seq0 + 2
    assert res.active == set(range(10)) | set(big[:2 * jm.MAX_DELTA])


# ---- 4. corruption ---------------------------------------------------------------------------
def _corrupt_msg(jpath, **kw) -> str:
    with pytest.raises(CorruptError) as ei:
        jm.scan(str(jpath), **kw)
    return str(ei.value)


@pytest.mark.parametrize("nrecords,victim", [(10, 4), (10, 1), (10, 10), (40, 27), (40, 33),
                                             (40, 40)])
def test_bit_flip_inside_valid_run(jpath, nrecords, victim):
    """A damaged record followed by valid newer ones is corruption, not a torn tail."""
    n = 16
    j, _ = _prepare(jpath, n, nrecords + 1)  # record nrecords + 1 is the newest
    j.close()
    assert victim >= nrecords + 1 - n + 2  # inside the run the scan checks
    flip_bit(jpath, slot_off(n, victim) + 70, 3)
    msg = _corrupt_msg(jpath, mirror_id=MID)
    assert "corrupt" in msg and f"record {victim} " in msg
    assert str(jpath) in msg


def test_bit_flip_in_checksum_and_header_fields(jpath):
    n = 16
    j, _ = _prepare(jpath, n, 8)
    j.close()
    for off in (0, 24, 40, SLOT - 1):  # magic, seq, ckpt_total, checksum
        with open(jpath, "rb") as f:
            saved = f.read()
        flip_bit(jpath, slot_off(n, 3) + off, 1)
        assert "corrupt" in _corrupt_msg(jpath)
        with open(jpath, "wb") as f:
            f.write(saved)
        jm.scan(str(jpath))


def test_damaged_oldest_slot_after_wrap_is_a_torn_tail(jpath):
    """After a wrap the slot after the newest record holds the oldest one, which the scan no
    longer needs: damage there is what a crash during the next write leaves."""
    n = 16
    j, state = _prepare(jpath, n, 40)
    j.close()
    flip_bit(jpath, slot_off(n, 41), 0)
    res = jm.scan(str(jpath))
    assert res.torn_tail and res.active == state and res.last_seq == 40


def test_garbage_in_never_written_slot(jpath):
    n = 16
    j, _ = _prepare(jpath, n, 5)
    j.close()
    # Slot of record 8 (two after the end): never written, must be zero.
    write_at(jpath, slot_off(n, 8) + 300, b"\x01")
    msg = _corrupt_msg(jpath)
    assert "corrupt" in msg and "after the end" in msg


def test_valid_record_in_never_written_slot(jpath, tmp_path):
    """A record of this journal in a slot the log never reached is corruption too."""
    n = 16
    j, _ = _prepare(jpath, n, 5)
    j.close()
    rec = jm.Record(9, 9, 0, 0, (1,), (), ())
    hdr = jm.scan(str(jpath)).header
    write_slot(jpath, n, 9, rec.pack(hdr.journal_id))
    assert "corrupt" in _corrupt_msg(jpath)


def test_record_in_wrong_slot_or_from_other_journal(jpath, tmp_path):
    n = 16
    j, _ = _prepare(jpath, n, 6)
    j.close()
    with open(jpath, "rb") as f:
        saved = f.read()
    # Swap records 2 and 3.
    r2, r3 = read_slot(jpath, n, 2), read_slot(jpath, n, 3)
    write_slot(jpath, n, 2, r3)
    write_slot(jpath, n, 3, r2)
    assert "corrupt" in _corrupt_msg(jpath)
    # Record 3 replaced by record 3 of another journal (different journal id).
    with open(jpath, "wb") as f:
        f.write(saved)
    other = tmp_path / "other"
    j2, _ = _prepare(other, n, 6)
    j2.close()
    write_slot(jpath, n, 3, read_slot(other, n, 3))
    assert "corrupt" in _corrupt_msg(jpath)


def test_no_valid_record_but_data(jpath):
    n = 16
    make(jpath, nslots=n)
    write_at(jpath, slot_off(n, 5) + 10, b"junk")
    assert "hold data" in _corrupt_msg(jpath)


def test_header_damage(jpath):
    make(jpath, nslots=16)
    with open(jpath, "rb") as f:
        saved = f.read()
    flip_bit(jpath, 17, 0)  # nslots
    assert "checksum" in _corrupt_msg(jpath)
    write_at(jpath, 0, saved)
    flip_bit(jpath, SLOT - 3, 5)  # the checksum itself
    assert "checksum" in _corrupt_msg(jpath)
    write_at(jpath, 0, saved)
    write_at(jpath, 0, b"XMJRNL01")
    assert "not a fusemirror journal" in _corrupt_msg(jpath)
    # A well-formed header of an unknown version.
    buf = bytearray(saved[:SLOT])
    struct.pack_into("<I", buf, 8, 2)
    struct.pack_into("<Q", buf, SLOT - 8, jm._checksum(buf))
    write_at(jpath, 0, bytes(buf))
    assert "version 2" in _corrupt_msg(jpath)
    with pytest.raises(CorruptError):
        jm.Journal.open(str(jpath))


@pytest.mark.parametrize("size", [0, 100, SLOT, SLOT + 1, 17 * SLOT - 1])
def test_truncated(jpath, size):
    j, _ = _prepare(jpath, 16, 3)
    j.close()
    os.truncate(jpath, size)
    assert "truncated" in _corrupt_msg(jpath)


def test_missing(jpath):
    assert "missing" in _corrupt_msg(jpath)
    with pytest.raises(CorruptError):
        jm.Journal.open(str(jpath))


def test_another_mirror(jpath):
    j, _ = _prepare(jpath, 16, 3)
    j.close()
    assert "another mirror" in _corrupt_msg(jpath, mirror_id=OTHER_MID)
    with pytest.raises(CorruptError, match="another mirror"):
        jm.Journal.open(str(jpath), mirror_id=OTHER_MID)
    assert jm.scan(str(jpath), mirror_id=MID).last_seq == 3


def test_reset_keeps_damaged(jpath):
    j, _ = _prepare(jpath, 16, 3)
    j.close()
    write_at(jpath, 0, b"garbage!")
    h = jm.reset(str(jpath), mirror_id=MID, extent_size=1 << 20, nextents=NEXTENTS)
    assert h.nslots == jm.DEFAULT_SLOTS  # the damaged header could not tell
    kept = [p for p in os.listdir(jpath.parent) if p.startswith("journal.damaged-")]
    assert len(kept) == 1
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.active == set() and res.last_seq == 0


# ---- 5. a failed write breaks the journal ----------------------------------------------------
def test_failed_write_breaks_journal(jpath, monkeypatch):
    n = 16
    j, before = _prepare(jpath, n, 20)
    seq0 = j.seq
    with open(jpath, "rb") as f:
        image = f.read()
    monkeypatch.setitem(faults._armed, "journal.write", faults._Fault(errno.EIO, count=1))
    with pytest.raises(OSError) as ei:
        j.append(adds=[7777])
    assert ei.value.errno == errno.EIO
    assert isinstance(j.broken, OSError) and j.broken.errno == errno.EIO
    assert j.seq == seq0 and j.active == before
    # The fault fired once only, yet the journal stays broken.
    assert faults._armed["journal.write"].count == 0
    for args in ({"adds": [8888]}, {"rets": sorted(before)[:1]}, {}):
        with pytest.raises(OSError) as ei:
            j.append(**args)
        assert ei.value.errno == errno.EIO and "broken" in str(ei.value)
    assert j.seq == seq0
    j.close()
    with open(jpath, "rb") as f:
        assert f.read() == image  # nothing was written
    res = jm.scan(str(jpath), mirror_id=MID)
    assert res.last_seq == seq0 and res.active == before and not res.torn_tail


def test_failed_write_in_split_append(jpath, monkeypatch):
    """The second record of a split append fails: the first one is durable and counted."""
    n = 32
    make(jpath, nslots=n)
    j = jm.Journal.open(str(jpath))
    j.append(adds=[1, 2, 3])
    monkeypatch.setitem(faults._armed, "journal.write",
                        faults._Fault(errno.ENOSPC, skip=1))
    big = list(range(100, 100 + jm.MAX_DELTA + 50))
    with pytest.raises(OSError) as ei:
        j.append(adds=big, rets=[1])
    assert ei.value.errno == errno.ENOSPC and j.broken is not None
    assert j.seq == 2
    assert j.active == {1, 2, 3} | set(big[:jm.MAX_DELTA])
    with pytest.raises(OSError):
        j.append(adds=[5])
    j.close()
    res = jm.scan(str(jpath))
    assert res.last_seq == 2 and res.active == {1, 2, 3} | set(big[:jm.MAX_DELTA])


def test_fault_injection_inert_without_arming(jpath):
    assert not faults._armed
    j, _ = _prepare(jpath, 16, 3)
    assert j.broken is None
    j.close()


# ---- 6. group commit -------------------------------------------------------------------------
async def _run_writer(writer: jm.JournalWriter, body) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await body()
        nursery.cancel_scope.cancel()


def test_group_commit_concurrent(jpath):
    make(jpath, nslots=64)
    j = jm.Journal.open(str(jpath))
    writer = jm.JournalWriter(j)
    done: list[int] = []

    async def one(i: int) -> None:
        await writer.commit(adds=[i])
        assert i in j.active  # durable (and in memory) when commit returns
        done.append(i)

    async def body() -> None:
        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(one, i)

    trio.run(_run_writer, writer, body)
    assert sorted(done) == list(range(50))
    assert j.active == set(range(50))
    assert 1 <= j.writes <= 5 and writer.batches <= 5
    check_scan(jpath, j, set(range(50)))
    j.close()


def test_group_commit_batches_arrivals_during_a_write(jpath):
    """Commits that arrive while a write is in flight go out together in the next one."""
    make(jpath, nslots=64)
    j = jm.Journal.open(str(jpath))
    writer = jm.JournalWriter(j)
    release = threading.Event()
    calls: list[tuple[set[int], set[int]]] = []
    real_append = j.append

    def slow_append(adds, rets):
        calls.append((set(adds), set(rets)))
        if len(calls) == 1:
            assert release.wait(10)
        real_append(adds, rets)

    j.append = slow_append  # type: ignore[method-assign]

    async def body() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(writer.commit, [0])
            while not calls:
                await trio.sleep(0.001)
            for i in range(1, 40):
                n.start_soon(writer.commit, [i])
            n.start_soon(writer.commit, (), [0])
            # everything queued behind the stalled write before it is let go
            while writer._batch.adds != set(range(1, 40)) or writer._batch.rets != {0}:
                await trio.sleep(0.001)
            release.set()

    trio.run(_run_writer, writer, body)
    assert calls == [({0}, set()), (set(range(1, 40)), {0})]
    assert writer.batches == 2 and j.writes == 2
    check_scan(jpath, j, set(range(1, 40)))
    j.close()


def test_group_commit_error_reaches_every_waiter(jpath, monkeypatch):
    make(jpath, nslots=64)
    j = jm.Journal.open(str(jpath))
    writer = jm.JournalWriter(j)
    errors: dict[int, OSError] = {}

    async def one(i: int) -> None:
        try:
            await writer.commit(adds=[i])
        except OSError as e:
            errors[i] = e

    async def body() -> None:
        await writer.commit(adds=[1000])  # one good record first
        monkeypatch.setitem(faults._armed, "journal.write", faults._Fault(errno.EIO))
        async with trio.open_nursery() as n:
            for i in range(30):
                n.start_soon(one, i)
        # The journal is broken for good: a later commit fails too, even with no fault left.
        faults._armed.clear()
        with pytest.raises(OSError) as ei:
            await writer.commit(adds=[5000])
        assert ei.value.errno == errno.EIO

    trio.run(_run_writer, writer, body)
    assert sorted(errors) == list(range(30))
    assert all(e.errno == errno.EIO for e in errors.values())
    assert j.broken is not None and j.active == {1000} and j.seq == 1
    j.close()
    res = jm.scan(str(jpath))
    assert res.active == {1000} and res.last_seq == 1 and not res.torn_tail


def test_group_commit_noop_and_retire(jpath):
    make(jpath, nslots=16)
    j = jm.Journal.open(str(jpath))
    writer = jm.JournalWriter(j)

    async def body() -> None:
        await writer.commit()  # empty: returns without a record
        await writer.commit(adds=[1, 2, 3])
        await writer.commit(rets=[2])
        await writer.commit(adds=[1])  # already active: no record

    trio.run(_run_writer, writer, body)
    assert j.active == {1, 3} and j.writes == 2
    check_scan(jpath, j, {1, 3})
    j.close()
