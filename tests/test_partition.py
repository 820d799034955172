"""A real network partition: the agent on its own host (an ip netns joined by veth), the link
cut during writes and healed. The slave is caught up from its fracture log only."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from conftest import Mounted, run_fm, wait_for
from test_replication import images_equal, slave_status, streaming

MiB = 1 << 20


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr.strip()}"


def in_ns(ns: str) -> list[str]:
    """Run in the namespace's network only (nsenter: no /sys remount, works in a chroot)."""
    return ["nsenter", f"--net=/run/netns/{ns}"]


@pytest.fixture
def slave_host():
    """A network namespace with a veth pair to the host; removed even if the test fails."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"fm{tag}", f"fm{tag}a", f"fm{tag}b"
    net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{net}.1/24", "dev", here)
        sh("ip", "link", "set", here, "up")
        sh(*in_ns(ns), "ip", "addr", "add", f"{net}.2/24", "dev", there)
        sh(*in_ns(ns), "ip", "link", "set", there, "up")
        sh(*in_ns(ns), "ip", "link", "set", "lo", "up")
        yield {"ns": ns, "link": here, "addr": f"{net}.2"}
    finally:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()
        for p in pids:
            subprocess.run(["kill", "-9", p])
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_partition_during_writes_then_heal(tmp_path: Path, agent_factory, secret_file,
                                           mounter, slave_host) -> None:
    agent = agent_factory("remote", host=slave_host["addr"],
                          prefix=in_ns(slave_host["ns"]))
    unit = tmp_path / "m"
    run_fm("create", str(unit), "--size", "256M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(unit), agent.address("s1"))
    run_fm("set", str(unit), "heartbeat=0.2")
    run_fm("set", str(unit), "--image", "s1", "timeout=1.5")
    run_fm("activate", str(unit))
    m: Mounted = mounter(unit)
    wait_for(lambda: streaming(m), what="initial sync", timeout=60)
    synced = slave_status(m)["catchup_bytes"]
    assert synced == 256 * MiB

    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]
    rng = random.Random(3)
    hot = rng.sample(range(256), 40)      # the writer touches 40 of the 256 extents

    def writer() -> None:
        try:
            fd = os.open(m.image, os.O_RDWR)
            try:
                while not stop.is_set():
                    off = rng.choice(hot) * MiB + rng.randrange(0, MiB - 8192)
                    os.pwrite(fd, rng.randbytes(8192), off)
                    written[0] += 1
                    if rng.random() < 0.1:
                        os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_for(lambda: written[0] >= 50, what="writes before the partition")
        sh("ip", "link", "set", slave_host["link"], "down")      # the partition
        wait_for(lambda: not slave_status(m)["reachable"], what="UNREACHABLE", timeout=20)
        cut = written[0]
        wait_for(lambda: written[0] >= cut + 100, what="writes while cut off")
    finally:
        stop.set()
        t.join(timeout=60)
    assert not errors, errors
    assert m.status()["state"] == "ACTIVE"
    m.control("cleanup", idle=0)
    missed = slave_status(m)["fracture_extents"]
    assert 0 < missed <= 40
    sh("ip", "link", "set", slave_host["link"], "up")               # heal
    wait_for(lambda: streaming(m), what="catch-up after heal", timeout=60)
    copied = slave_status(m)["catchup_bytes"] - synced
    assert copied == missed * MiB, \
        f"catch-up copied {copied} bytes for {missed} fracture-logged extents of 1 MiB"
    assert copied < 256 * MiB / 2
    run_fm("umount", str(m.mnt))
    assert images_equal(unit / "image", agent.root / "s1" / "image")
