"""Crash-test kit shared by tests/test_crash.py and tools/crash-loop.

A writer thread does random block writes and fsyncs on a mounted image and keeps a ledger: for
each block slot, the newest version any returned fsync covered, and the newest version it tried
to write. After a crash and recovery, every slot must hold one version in between, intact —
never one older than its last fsync (a lost write) and never a mix (a torn or foreign block).
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
from dataclasses import dataclass, field

BLOCK = 4096
_HEAD = struct.Struct("<QQ")


def block_content(slot: int, version: int) -> bytes:
    """Version ``version`` of block ``slot``: a header and a payload derived from both."""
    if version == 0:
        return bytes(BLOCK)
    seed = hashlib.blake2b(f"{slot}:{version}".encode(), digest_size=32).digest()
    body = (seed * (BLOCK // len(seed) + 1))[:BLOCK - _HEAD.size]
    return _HEAD.pack(slot, version) + body


@dataclass
class Ledger:
    slots: int
    fsynced: list[int] = field(default_factory=list)
    attempted: list[int] = field(default_factory=list)
    acked_fsyncs: int = 0
    writes: int = 0

    def __post_init__(self) -> None:
        self.fsynced = [0] * self.slots
        self.attempted = [0] * self.slots

    def check(self, path: str) -> list[str]:
        """Problems found in the image at ``path`` (empty when the ledger holds).

        A slot must hold, intact, a version between its last fsync'ed one and its last
        attempted one; only a slot whose newest write no fsync covered may hold a torn block.
        """
        bad = []
        with open(path, "rb") as f:
            for slot in range(self.slots):
                f.seek(slot * BLOCK)
                data = f.read(BLOCK)
                s, v = _HEAD.unpack_from(data)
                if data == bytes(BLOCK):
                    s, v = slot, 0
                intact = s == slot and data == block_content(slot, v)
                if not intact and self.attempted[slot] > self.fsynced[slot]:
                    continue  # a write no fsync covered may be torn by a power cut
                if not intact or not self.fsynced[slot] <= v <= self.attempted[slot]:
                    bad.append(f"slot {slot}: found version {v} (slot {s}), fsynced "
                               f"{self.fsynced[slot]}, attempted {self.attempted[slot]}")
        return bad

    def lost(self, path: str) -> int:
        """Slots whose content is older than their last acknowledged fsync."""
        n = 0
        with open(path, "rb") as f:
            for slot in range(self.slots):
                f.seek(slot * BLOCK)
                data = f.read(BLOCK)
                v = 0 if data == bytes(BLOCK) else _HEAD.unpack_from(data)[1]
                if v < self.fsynced[slot]:
                    n += 1
        return n


class Writer(threading.Thread):
    """Random block writes with an fsync every few; stops at the first error (the crash)."""

    def __init__(self, image: str, ledger: Ledger, seed: int, direct: bool = False) -> None:
        super().__init__(daemon=True)
        self.image = image
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.direct = direct
        self.stop = threading.Event()
        self.error: OSError | None = None
        self.started_writing = threading.Event()

    def run(self) -> None:
        import mmap

        led = self.ledger
        written = list(led.fsynced)
        try:
            fd = os.open(self.image, os.O_RDWR | (os.O_DIRECT if self.direct else 0))
        except OSError as e:
            self.error = e
            return
        buf = mmap.mmap(-1, BLOCK)
        try:
            while not self.stop.is_set():
                slot = self.rng.randrange(led.slots)
                version = led.attempted[slot] + 1
                led.attempted[slot] = version
                buf[:] = block_content(slot, version)
                os.pwrite(fd, buf, slot * BLOCK)
                written[slot] = version
                led.writes += 1
                self.started_writing.set()
                if self.rng.random() < 0.2:
                    snapshot = list(written)
                    os.fsync(fd)
                    led.fsynced = [max(a, b) for a, b in zip(led.fsynced, snapshot)]
                    led.acked_fsyncs += 1
        except OSError as e:
            self.error = e
        finally:
            self.started_writing.set()
            try:
                os.close(fd)
            except OSError:
                pass


def images_equal(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True
