#!/usr/bin/env python3
"""Micro-benchmarks of the pieces a fusemirror request is made of (`tools/bench --micro`).

    .venv/bin/python tools/microbench.py WORKDIR

They bound the figures in BENCHMARKS.md on this machine (docs/PERFORMANCE.md quotes them):

* the disk: a 4 KiB pwrite + fdatasync (what each O_DSYNC write costs at least), a 1 MiB
  pwrite into the page cache;
* Python and trio per request: ``trio.to_thread.run_sync`` round trip; xxh3 digests of 1 MiB in
  4 KiB blocks the way ``protocol.block_digests`` computes them;
* TCP on loopback between two trio processes, framed like fusemirror's WRITE (header + data,
  the receiver accumulating ``receive_some`` chunks in a bytearray and copying the payload out,
  then an 8-byte answer), for 4 KiB and 1 MiB frames; and the same receiver reading each frame
  with ``recv_into`` a preallocated buffer (no extra copy), as the agent and the link now do;
* interpreter start-up and ``import trio`` (part of every fsck.fusemirror run).

Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import trio

HDR = struct.Struct(">II")  # kind, length


def best_of(fn: Any, n: int) -> float:
    return min(fn() for _ in range(n))


def disk(work: str) -> dict[str, float]:
    path = os.path.join(work, "micro.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, os.urandom(64 << 20), 0)
        os.fsync(fd)
        buf4 = os.urandom(4096)
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            os.pwrite(fd, buf4, (i * 7919 % 16384) * 4096)
            os.fdatasync(fd)
        dsync_us = (time.perf_counter() - t0) / n * 1e6
        buf1m = os.urandom(1 << 20)
        t0 = time.perf_counter()
        for i in range(64):
            os.pwrite(fd, buf1m, i << 20)
        pw1m_us = (time.perf_counter() - t0) / 64 * 1e6
        t0 = time.perf_counter()
        os.fdatasync(fd)
        flush64_ms = (time.perf_counter() - t0) * 1e3
    finally:
        os.close(fd)
        os.unlink(path)
    return {"pwrite4k_fdatasync_us": round(dsync_us, 1), "pwrite4k_fdatasync_per_s": round(1e6 / dsync_us),
            "pwrite1m_pagecache_us": round(pw1m_us, 1), "fdatasync_64MiB_dirty_ms": round(flush64_ms, 1)}


async def _to_thread_cost() -> float:
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        await trio.to_thread.run_sync(int)
    return (time.perf_counter() - t0) / n * 1e6


def digests_cost() -> float:
    import xxhash

    data = os.urandom(1 << 20)

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(50):
            mv = memoryview(data)
            [xxhash.xxh3_64_intdigest(mv[i:i + 4096]) for i in range(0, len(mv), 4096)]
        return (time.perf_counter() - t0) / 50 * 1e6

    return best_of(once, 3)


SERVER = r"""
import socket, struct, sys, trio
HDR = struct.Struct(">II")
mode = sys.argv[1]

async def conn(stream):
    if mode == "into":
        sock = stream.socket
        hdr = bytearray(HDR.size)
        buf = bytearray(4 << 20)
        while True:
            got = 0
            while got < HDR.size:
                n = await sock.recv_into(memoryview(hdr)[got:])
                if n == 0:
                    return
                got += n
            kind, length = HDR.unpack(hdr)
            view = memoryview(buf)[:length]
            got = 0
            while got < length:
                n = await sock.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            await stream.send_all(b"\0" * 8)
    buf = bytearray()
    pos = 0
    while True:
        while len(buf) - pos < HDR.size or len(buf) - pos < HDR.size + HDR.unpack_from(buf, pos)[1]:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            if pos and pos >= len(buf) // 2:
                del buf[:pos]
                pos = 0
            buf += data
        kind, length = HDR.unpack_from(buf, pos)
        payload = bytes(memoryview(buf)[pos + HDR.size:pos + HDR.size + length])
        pos += HDR.size + length
        if pos == len(buf):
            buf.clear()
            pos = 0
        await stream.send_all(b"\0" * 8)

async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(conn, listeners)

trio.run(main)
"""


async def _tcp_client(port: int, size: int, n: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = os.urandom(size)
    hdr = HDR.pack(1, size)
    t0 = time.perf_counter()
    for _ in range(n):
        await stream.send_all(hdr)
        await stream.send_all(data)
        got = 0
        while got < 8:
            got += len(await stream.receive_some(8 - got))
    dt = (time.perf_counter() - t0) / n
    await stream.aclose()
    return dt * 1e6


def tcp(mode: str) -> dict[str, float]:
    p = subprocess.Popen([sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        small = trio.run(_tcp_client, port, 4096, 3000)
        big = trio.run(_tcp_client, port, 1 << 20, 300)
    finally:
        p.terminate()
        p.wait(timeout=10)
    return {"rtt_4k_us": round(small, 1), "rtt_1m_us": round(big, 1),
            "stream_1m_MBps": round((1 << 20) / big, 1)}


def startup() -> dict[str, float]:
    def t(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return (time.perf_counter() - t0) * 1e3

    return {"python_ms": round(best_of(lambda: t("pass"), 3), 1),
            "python_import_trio_ms": round(best_of(lambda: t("import trio"), 3), 1),
            "python_import_fsck_ms": round(best_of(lambda: t("import fusemirror.fsck, fusemirror.resync"), 3), 1)}


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    out: dict[str, Any] = {"disk": disk(work)}
    out["to_thread_us"] = round(trio.run(_to_thread_cost), 1)
    out["xxh3_1MiB_in_4KiB_blocks_us"] = round(digests_cost(), 1)
    out["tcp_loopback_trio_receive_some"] = tcp("some")
    out["tcp_loopback_trio_recv_into"] = tcp("into")
    out["startup"] = startup()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
