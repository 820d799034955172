"""A real ``fusemirror serve`` agent (loopback) against bad input.

For every bad input — wrong secret, reflected challenge, a frame before authentication, an
oversized length, a truncated frame, a WRITE with a bad block checksum, a write beyond the
image's end, a unit name with "/" or "..", malformed requests, and 1000 connections of random
bytes — the agent must close that connection, log exactly one "disconnected:" line for it, stay
alive and keep serving a correct client, and write nothing: the slave image and the tree around
ROOT are unchanged. A correct write through the same hand-built path lands in ROOT/s1/image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
import trio

from fusemirror import protocol as P
from fusemirror.errors import exit_for_errno
from fusemirror.link import Channel, LinkDown, _Waiter

from conftest import run_fm, wait_for

SIZE = 8 << 20
BS = 4096
CLOSE_TIMEOUT = 5.0       # well below the agent's 10 s handshake timeout


# ---- the slave under test -----------------------------------------------------------------------
@dataclass
class Slave:
    agent: Any
    tmp: Path
    master: Path
    mirror: str
    mirror_id: str
    secret: bytes
    pattern: dict[int, bytes]

    @property
    def root(self) -> Path:
        return self.agent.root

    @property
    def unit(self) -> Path:
        return self.agent.root / "s1"

    @property
    def image(self) -> Path:
        return self.unit / "image"

    @property
    def addr(self) -> str:
        return self.agent.address("s1")

    def snapshot(self) -> dict[str, Any]:
        """What bad input must not change: the slave image and database, and every path under
        the test's directory (so nothing is created outside ROOT or inside it)."""
        paths = set()
        for dirpath, dirnames, filenames in os.walk(self.tmp):
            for n in dirnames + filenames:
                paths.add(os.path.relpath(os.path.join(dirpath, n), self.tmp))
        return {"log": self.log_mark(),
                "image": hashlib.sha256(self.image.read_bytes()).hexdigest(),
                "db": (self.unit / "mirror.json").read_bytes(),
                "paths": paths}

    def log_mark(self) -> int:
        return len(self.agent.log.read_bytes())

    def disconnected(self, port: int, since: int = 0) -> list[str]:
        """The agent's "disconnected:" lines for the connection from local ``port``."""
        text = self.agent.log.read_bytes()[since:].decode(errors="replace")
        pat = re.compile(rf" 127\.0\.0\.1:{port}: disconnected: ")
        return [line for line in text.splitlines() if pat.search(line)]


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return trio.run(fn, *args)


def settle_log(s: "Slave", since: int) -> int:
    """Serve one more correct client and wait for its "disconnected" line: a duplicate line
    for an earlier connection would have been logged by then. Returns the marker's port."""
    marker = run(correct_client, s)
    wait_for(lambda: s.disconnected(marker, since), timeout=10, what="the marker's end")
    return marker


class Opened:
    """``async with Opened(slave) as chan``: an authenticated channel, unit opened."""

    def __init__(self, s: Slave, unit: str = "s1", *, open: bool = True) -> None:
        self.s = s
        self.addr = s.agent.address(unit)
        self.open = open

    async def __aenter__(self) -> Channel:
        self.chan = await Channel.connect(self.addr, self.s.secret, self.s.mirror)
        self.port = self.chan.stream.socket.getsockname()[1]
        self._nursery_cm = trio.open_nursery()
        self.nursery = await self._nursery_cm.__aenter__()
        self.nursery.start_soon(self.chan.receiver)
        if self.open:
            info = await self.chan.request("open", mirror_id=self.s.mirror_id, size=SIZE)
            assert info["open"] and info["size"] == SIZE
        return self.chan

    async def __aexit__(self, *exc: Any) -> Any:
        await self.chan.aclose()
        self.nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)


def write_frame(seq: int, off: int, data: bytes, bs: int = BS, *, corrupt: str | None = None
                ) -> bytes:
    """A WRITE frame built by hand: seq, offset, block size, count, xxh3 per block, data."""
    digests = P.block_digests(data, bs)
    head = P._WRITE.pack(seq, off, bs, len(digests))
    body = bytearray(struct.pack(f">{len(digests)}Q", *digests) + data)
    if corrupt == "digest":
        body[8 * (len(digests) - 1) + 5] ^= 0x10          # the last block's digest
    elif corrupt == "data":
        body[8 * len(digests) + bs + 100] ^= 0x01         # one bit of block 1
    return P._frame(P.T_WRITE, head + bytes(body))


async def send_raw(chan: Channel, data: bytes, seq: int | None = None) -> _Waiter | None:
    """Send hand-built bytes on the channel's stream; with ``seq``, wait-able for its answer."""
    w = None
    async with chan._send_lock:
        if seq is not None:
            w = _Waiter(seq)
            chan._waiters[seq] = w
        await chan.stream.send_all(data)
    return w


async def correct_client(s: Slave) -> int:
    """The positive control after every fault: connect, open, ping, read back the pattern.
    Returns the local port it used."""
    async with Opened(s) as chan:
        port = chan.stream.socket.getsockname()[1]
        assert isinstance(await chan.call(lambda q: P.Ping(q)), P.Ack)
        for off, data in s.pattern.items():
            ans = await chan.call(lambda q: P.ReadDigests(q, off, len(data), BS))
            assert isinstance(ans, P.Digests) and ans.digests == P.block_digests(data, BS)
            ans = await chan.call(lambda q: P.Read(q, off, 4096))
            assert isinstance(ans, P.Data) and ans.data == data[:4096]
    return port


@pytest.fixture
def slave(tmp_path: Path, agent_factory: Any, secret_file: Path) -> Slave:
    agent = agent_factory()
    master = tmp_path / "m"
    run_fm("create", str(master), "--size", "8M", "--secret-file", str(secret_file))
    run_fm("add-slave", str(master), agent.address("s1"))
    assert (agent.root / "s1" / "image").stat().st_size == SIZE
    db = json.loads((master / "mirror.json").read_text())
    rnd = random.Random(7)
    s = Slave(agent, tmp_path, master, db["mirror"]["name"], db["mirror"]["id"],
              secret_file.read_bytes().rstrip(b"\r\n"),
              {0: rnd.randbytes(65536), SIZE - 65536: rnd.randbytes(65536)})
    assert s.mirror == "m"

    async def fill() -> None:       # a known, non-zero pattern, written the correct way
        async with Opened(s) as chan:
            for off, data in s.pattern.items():
                assert isinstance(await chan.call(lambda q: P.Write(q, off, data, BS)), P.Ack)
            assert isinstance(await chan.call(lambda q: P.Flush(q)), P.Ack)

    run(fill)
    img = s.image.read_bytes()
    for off, data in s.pattern.items():
        assert img[off:off + len(data)] == data
    return s


def check_aftermath(s: Slave, before: dict[str, Any], ports: list[int]) -> None:
    """One "disconnected" line per faulty connection, agent alive, nothing written, and a
    correct client still served."""
    for port in ports:
        wait_for(lambda: s.disconnected(port), timeout=10, what=f"disconnect of :{port}")
    assert s.agent.alive(), s.agent.log_text()[-3000:]
    after = s.snapshot()
    assert after["paths"] == before["paths"], after["paths"] ^ before["paths"]
    assert after["image"] == before["image"], "the slave image changed"
    assert after["db"] == before["db"], "the slave database changed"
    control = run(correct_client, s)
    wait_for(lambda: s.disconnected(control, after["log"]), timeout=10, what="control's end")
    settle_log(s, after["log"])
    for port in ports:
        lines = s.disconnected(port, before["log"])
        assert len(lines) == 1 + (port == control), lines
    assert s.agent.alive()


# ---- raw connections ----------------------------------------------------------------------------
async def connect(s: Slave) -> tuple[trio.SocketStream, int]:
    stream = await trio.open_tcp_stream("127.0.0.1", s.agent.port)
    return stream, stream.socket.getsockname()[1]


async def until_closed(stream: trio.SocketStream, timeout: float = CLOSE_TIMEOUT) -> bytes:
    """Read until the agent closes (EOF or reset) and return what it sent; fail on a timeout."""
    got = bytearray()
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(1 << 16)
            except trio.BrokenResourceError:       # connection reset: closed just as well
                break
            if not data:
                break
            got += data
    await stream.aclose()
    return bytes(got)


async def send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    """Send, ignoring a connection the agent has already closed."""
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def half_close(stream: trio.SocketStream) -> None:
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def frame_types(data: bytes) -> list[int]:
    types, i = [], 0
    while i + P.HEADER.size <= len(data):
        magic, _, ftype, length = P.HEADER.unpack_from(data, i)
        assert magic == P.MAGIC
        types.append(ftype)
        i += P.HEADER.size + length
    return types


def hello_frame(unit: str, mirror: str = "m", nonce: bytes | None = None) -> bytes:
    return P._frame(P.T_HELLO, P._json({"version": P.VERSION, "unit": unit, "mirror": mirror,
                                        "nonce": (nonce or os.urandom(P.NONCE)).hex()}))


async def handshake_until_challenge(stream: trio.SocketStream, conn: P.Connection) -> bytes:
    """Send HELLO, read the CHALLENGE; return the raw CHALLENGE bytes (AUTH is queued)."""
    await stream.send_all(conn.hello())
    raw = bytearray()
    with trio.fail_after(CLOSE_TIMEOUT):
        while True:
            ev = conn.next_event()
            if ev is not None:
                assert isinstance(ev, P.Challenge)
                return bytes(raw)
            data = await stream.receive_some(1 << 16)
            assert data, "the agent closed before its challenge"
            raw += data
            conn.receive_data(data)


# ---- the positive control -----------------------------------------------------------------------
def test_correct_hand_built_write_lands(slave: Slave) -> None:
    s = slave
    data = random.Random(1).randbytes(3 * BS + 512)      # last block short
    off = 1 << 20

    async def go() -> None:
        async with Opened(s) as chan:
            seq = chan.conn.next_seq()
            w = await send_raw(chan, write_frame(seq, off, data), seq)
            assert w is not None
            with trio.fail_after(10):
                await w.event.wait()
            assert w.answer == P.Ack(seq)
            assert isinstance(await chan.call(lambda q: P.Flush(q)), P.Ack)

    run(go)
    with open(s.image, "rb") as f:
        f.seek(off)
        assert f.read(len(data)) == data
    assert s.agent.alive()
    run(correct_client, s)


def test_write_behind_starts_the_slave_write_back(slave: Slave) -> None:
    """Each 4 MiB (the default ``--write-behind``) written to a unit, the agent starts its
    write-back in the background; the writes and a later FLUSH are answered as usual."""
    from fusemirror import control

    s = slave
    sock = str(s.root / ".fusemirror-agent.sock")
    before = control.request(sock, "status")
    assert before["write_behind"] == 4 << 20
    data = random.Random(2).randbytes(1 << 20)

    async def go() -> None:
        async with Opened(s) as chan:
            for i in range(1, 7):     # 6 MiB: past 4 MiB once (the fixture wrote 128 KiB)
                assert isinstance(await chan.call(lambda q: P.Write(q, i << 20, data, BS)),
                                  P.Ack)
            with trio.fail_after(10):
                while control.request(sock, "status")["writebacks"].get("s1", 0) < 1:
                    await trio.sleep(0.01)
            assert isinstance(await chan.call(lambda q: P.Flush(q)), P.Ack)

    run(go)
    assert control.request(sock, "status")["writebacks"]["s1"] == 1
    with open(s.image, "rb") as f:
        f.seek(6 << 20)
        assert f.read(len(data)) == data
    assert s.agent.alive()


# ---- faults before authentication ---------------------------------------------------------------
def test_wrong_secret(slave: Slave) -> None:
    s = slave
    before = s.snapshot()

    async def go() -> int:
        stream, port = await connect(s)
        conn = P.Connection("master", b"not the secret at all", unit="s1", mirror=s.mirror)
        await handshake_until_challenge(stream, conn)
        await stream.send_all(conn.data_to_send())       # an AUTH made with the wrong secret
        rest = await until_closed(stream)
        assert P.T_AUTH_OK not in frame_types(rest), "the agent authenticated a wrong secret"
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "wrong secret" in s.disconnected(port)[0]


def test_reflected_challenge(slave: Slave) -> None:
    """The agent's challenge cannot be turned against it. Its nonce is fresh per connection
    and revealed only after HELLO, so the reflection is (1) the CHALLENGE frame echoed back as
    the answer on its own connection, and (2) a second connection whose HELLO reuses the first
    connection's challenge nonce and answers its own challenge with that nonce. Neither gets an
    AUTH_OK; both are closed. (The agent-side "HELLO nonce == own nonce" refusal is covered
    sans-I/O in test_protocol.py.)"""
    s = slave
    before = s.snapshot()

    async def go() -> list[int]:
        st1, p1 = await connect(s)
        c1 = P.Connection("master", s.secret, unit="s1", mirror=s.mirror)
        challenge1 = await handshake_until_challenge(st1, c1)
        n1 = c1._peer_nonce

        st2, p2 = await connect(s)
        m2 = P.Connection("master", s.secret, unit="s1", mirror=s.mirror, nonce=n1)
        await handshake_until_challenge(st2, m2)                 # HELLO with nonce n1
        assert m2._peer_nonce != n1                              # fresh nonce per connection
        await st2.send_all(P._frame(P.T_AUTH, n1))               # the challenge as the answer
        await st1.send_all(challenge1)                           # echo the CHALLENGE frame
        rest1, rest2 = await until_closed(st1), await until_closed(st2)
        assert P.T_AUTH_OK not in frame_types(rest1) + frame_types(rest2)
        return [p1, p2]

    ports = run(go)
    check_aftermath(s, before, ports)


@pytest.mark.parametrize("kind", ["ping", "write", "auth", "request-create"])
def test_frame_before_authentication(slave: Slave, kind: str) -> None:
    s = slave
    before = s.snapshot()
    frames = {
        "ping": P._frame(P.T_PING, struct.pack(">Q", 1)),
        "write": write_frame(1, 0, b"\xee" * (2 * BS)),
        "auth": P._frame(P.T_AUTH, os.urandom(P.MAC)),
        "request-create": P._frame(P.T_REQUEST, struct.pack(">Q", 1) + P._json(
            {"op": "create", "args": {"db": {}}})),
    }

    async def go() -> int:
        stream, port = await connect(s)
        t0 = trio.current_time()
        await stream.send_all(frames[kind])
        rest = await until_closed(stream)
        assert trio.current_time() - t0 < CLOSE_TIMEOUT
        assert frame_types(rest) == []                       # not even a CHALLENGE
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "before authentication" in s.disconnected(port)[0]


@pytest.mark.parametrize("when", ["first-frame", "handshake-sized", "after-open"])
def test_oversized_length(slave: Slave, when: str) -> None:
    s = slave
    before = s.snapshot()

    async def go() -> int:
        if when != "after-open":
            # a HELLO announcing more than a handshake needs is refused on its header too:
            # an unauthenticated peer cannot make the agent hold megabytes per connection
            length = P.MAX_PAYLOAD + 1 if when == "first-frame" else P.MAX_HANDSHAKE + 1
            stream, port = await connect(s)
            await stream.send_all(P.HEADER.pack(P.MAGIC, P.VERSION, P.T_HELLO, length))
            assert frame_types(await until_closed(stream)) == []  # closed, payload not awaited
            return port
        async with Opened(s) as chan:
            port = chan.stream.socket.getsockname()[1]
            seq = chan.conn.next_seq()
            w = await send_raw(chan, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_WRITE, 1 << 31)
                               + struct.pack(">Q", seq), seq)
            await closed_by_agent(chan, w)
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    why = s.disconnected(port)[0]
    assert ("before authentication" if when == "handshake-sized" else "exceeds") in why, why


async def closed_by_agent(chan: Channel, w: _Waiter | None) -> None:
    """The agent (not we) closed the channel, and never acknowledged the bad request."""
    with trio.fail_after(CLOSE_TIMEOUT):
        await chan.closed.wait()
    assert isinstance(chan.dead, LinkDown) and str(chan.dead) != "closed", chan.dead
    if w is not None:
        assert isinstance(w.answer, LinkDown), f"the agent answered {w.answer}"


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(tx_queue, rx_queue) of the IPv4 socket local_port -> remote_port (/proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport = int(fields[1].rsplit(":", 1)[1], 16)
            rport = int(fields[2].rsplit(":", 1)[1], 16)
            if (lport, rport) == (local_port, remote_port):
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


async def agent_has_read_all(s: Slave, client_port: int) -> None:
    """Wait until every byte we sent has left our socket and the agent has read it from its
    own: the agent then holds what we sent (a truncated frame) and waits for the rest."""
    with trio.fail_after(CLOSE_TIMEOUT):
        while (_tcp_queues(client_port, s.agent.port) or (1, 1))[0] or \
                (_tcp_queues(s.agent.port, client_port) or (1, 1))[1]:
            await trio.sleep(0.005)


@pytest.mark.parametrize("when", ["hello", "header", "after-open"])
def test_truncated_frame_then_close(slave: Slave, when: str) -> None:
    s = slave
    before = s.snapshot()

    async def go() -> int:
        if when in ("hello", "header"):
            stream, port = await connect(s)
            hello = hello_frame("s1", s.mirror)
            await stream.send_all(hello[:-5] if when == "hello" else hello[:5])
            await agent_has_read_all(s, port)      # the agent waits for the rest ...
            await half_close(stream)               # ... and closes when none comes
            assert frame_types(await until_closed(stream)) == []
            return port
        async with Opened(s) as chan:
            port = chan.stream.socket.getsockname()[1]
            seq = chan.conn.next_seq()
            frame = write_frame(seq, 0, b"\xab" * (4 * BS))
            w = await send_raw(chan, frame[:-100], seq)
            await agent_has_read_all(s, port)
            await chan.stream.send_eof()
            await closed_by_agent(chan, w)
        return port

    port = run(go)
    check_aftermath(s, before, [port])


# ---- faults after a correct handshake and "open" ------------------------------------------------
@pytest.mark.parametrize("corrupt", ["digest", "data"])
def test_bad_block_checksum(slave: Slave, corrupt: str) -> None:
    s = slave
    before = s.snapshot()

    async def go() -> int:
        async with Opened(s) as chan:
            port = chan.stream.socket.getsockname()[1]
            seq = chan.conn.next_seq()
            w = await send_raw(chan, write_frame(seq, 0, b"\x5a" * (4 * BS), corrupt=corrupt),
                               seq)
            await closed_by_agent(chan, w)
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "checksum" in s.disconnected(port)[0]


@pytest.mark.parametrize("off", [SIZE - BS // 2 - 512, SIZE, SIZE + (1 << 30), (1 << 64) - BS])
def test_write_beyond_image_end(slave: Slave, off: int) -> None:
    s = slave
    before = s.snapshot()

    async def go() -> int:
        async with Opened(s) as chan:
            port = chan.stream.socket.getsockname()[1]
            seq = chan.conn.next_seq()
            w = await send_raw(chan, write_frame(seq, off, b"\xc3" * BS, 512), seq)
            await closed_by_agent(chan, w)
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "outside unit" in s.disconnected(port)[0]
    assert s.image.stat().st_size == SIZE


MALFORMED = [
    ("s1", "open", {"size": "not a number"}),
    ("s1", "open", {"size": [1]}),
    ("s1", "create", {}),
    ("s1", "create", {"db": 5}),
    ("s2", "create", {"db": {"mirror": {"size": 8 << 20, "id": "x"}}}),
    ("s2", "create", {"db": {"mirror": {"size": "8M", "id": "x"}, "images": []}}),
    ("s1", "db_write", {}),
    ("s1", "db_write", {"db": []}),
    ("s1", "no-such-op", {}),
]
# database copies an authenticated master might send: each wrong in one place (see
# test_malformed_databases); before validation the agent stored such a copy as its own
BAD_DB = [
    ("mirror size a string", lambda d: d["mirror"].__setitem__("size", "8M")),
    ("block size not a power of two", lambda d: d["mirror"].__setitem__("block_size", 3000)),
    ("unknown mirror state", lambda d: d["mirror"].__setitem__("state", "HAPPY")),
    ("write policy", lambda d: d["mirror"].__setitem__("write_policy", "sometimes")),
    ("heartbeat negative", lambda d: d["mirror"].__setitem__("heartbeat", -1)),
    ("generation counter a string", lambda d: d["generation"].__setitem__("counter", "7")),
    ("history entry", lambda d: d["generation"]["history"].append(["x"])),
    ("images not a list", lambda d: d.__setitem__("images", {})),
    ("image role", lambda d: d["images"][-1].__setitem__("role", "boss")),
    ("image state", lambda d: d["images"][-1].__setitem__("state", 3)),
    ("image address", lambda d: d["images"][-1].__setitem__("address", ["h", 1])),
    ("image id twice", lambda d: d["images"].append(dict(d["images"][0]))),
    ("sync_progress past the end", lambda d: d["images"][-1].__setitem__("sync_progress", 1 << 40)),
    ("recovery policy", lambda d: d["images"][-1].__setitem__("recovery_policy", "maybe")),
]


def refused_as_protocol_error(s: Slave, unit: str, op: str, args: dict[str, Any], *,
                              open: bool) -> None:
    """Send request ``op`` (after opening ``unit`` if ``open``): the agent must end the
    connection without an answer, log a protocol error for it, and change nothing."""
    before = s.snapshot()

    async def go() -> int:
        opener = Opened(s, unit, open=open)
        async with opener as chan:
            with pytest.raises(LinkDown):
                await chan.request(op, **args)
            await closed_by_agent(chan, None)
        return opener.port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "protocol error" in s.disconnected(port, before["log"])[0]


def test_malformed_requests(slave: Slave) -> None:
    """An authenticated master's malformed request ends that connection, not the agent
    (before the fix, a KeyError/ValueError/TypeError from the arguments killed the agent).
    One agent for all cases (each checked in full before the next) to keep the run short."""
    s = slave
    for unit, op, args in MALFORMED:
        if op == "open":
            args = dict(args, mirror_id=s.mirror_id)
        try:
            refused_as_protocol_error(s, unit, op, args, open=op in ("db_write", "no-such-op"))
        except Exception as e:
            raise AssertionError(f"case {unit} {op} {args}: {e}") from e


def test_promote_on_the_connection_that_holds_the_unit_is_refused(slave: Slave) -> None:
    """A promote asked for on a connection that has the unit open is refused with an error
    answer on that connection (exit 3 for a CLI) instead of the agent fencing the asking
    session itself (before the fix: the connection ended as "fenced by a newer connection",
    nothing was promoted, the unit stayed held with no session). The unit stays a slave, the
    connection stays usable, and a later client is served."""
    s = slave
    db_before = (s.unit / "mirror.json").read_bytes()

    async def go() -> None:
        async with Opened(s) as chan:
            with pytest.raises(OSError) as ei:
                await chan.request("promote", force=True)
            assert exit_for_errno(ei.value.errno) == 3
            assert "open on this connection" in str(ei.value)
            assert isinstance(await chan.call(lambda q: P.Ping(q)), P.Ack)

    run(go)
    assert (s.unit / "mirror.json").read_bytes() == db_before
    run(correct_client, s)
    assert "Traceback" not in s.agent.log.read_text()


def test_malformed_databases(slave: Slave) -> None:
    """A database copy that fails validation, in db_write or db_prepare, is a protocol error:
    the connection ends, nothing is stored (mirror.json and the prepared copy unchanged), the
    agent lives. A well-formed copy of another size is refused with an error answer."""
    s = slave
    good = json.loads((s.master / "mirror.json").read_text())
    for what, spoil in BAD_DB:
        for op in ("db_write", "db_prepare"):
            db = json.loads(json.dumps(good))
            spoil(db)
            try:
                refused_as_protocol_error(s, "s1", op, {"db": db}, open=op == "db_write")
                assert not (s.unit / "mirror.json.prepared").exists()
            except Exception as e:
                raise AssertionError(f"case {what!r} by {op}: {e}") from e
    before = s.snapshot()
    db = json.loads(json.dumps(good))
    db["mirror"]["size"] = 2 * SIZE

    async def other_size() -> None:
        async with Opened(s) as chan:
            with pytest.raises(OSError, match="size .* differs"):
                await chan.request("db_write", db=db)
            assert isinstance(await chan.call(lambda q: P.Ping(q)), P.Ack)   # still served

    run(other_size)
    assert (s.unit / "mirror.json").read_bytes() == before["db"]
    assert s.agent.alive()


# ---- unit names ---------------------------------------------------------------------------------
BAD_NAMES = ["a/b", "..", "../evil", "../../evil", "/tmp/evil", ".", "", ".hidden",
             "s1/../../evil", "s1/..", "x" * 200]


def test_bad_unit_names(slave: Slave) -> None:
    """HELLOs naming units with "/" or ".." (and other bad names) are refused at HELLO: no
    CHALLENGE, no directory anywhere. One agent for all names, each checked in full."""
    s = slave
    for name in BAD_NAMES:
        before = s.snapshot()

        async def go() -> int:
            stream, port = await connect(s)
            await stream.send_all(hello_frame(name, s.mirror))
            assert frame_types(await until_closed(stream)) == []     # refused at HELLO
            return port

        try:
            port = run(go)
            check_aftermath(s, before, [port])
            assert "bad unit name" in s.disconnected(port, before["log"])[0]
            assert not (s.tmp / "evil").exists() and not Path("/tmp/evil").exists()
        except Exception as e:
            raise AssertionError(f"unit name {name!r}: {e}") from e


def test_huge_nested_hello(slave: Slave) -> None:
    """A HELLO nesting JSON deeper than Python's recursion limit (it used to kill the agent)."""
    s = slave
    before = s.snapshot()

    async def go() -> int:
        stream, port = await connect(s)
        # deeper than the recursion limit, within what a frame before authentication may hold
        await stream.send_all(P._frame(P.T_HELLO, b"[" * (P.MAX_HANDSHAKE - 100)))
        await until_closed(stream)
        return port

    port = run(go)
    check_aftermath(s, before, [port])
    assert "malformed" in s.disconnected(port)[0]


# ---- many connections of random bytes -----------------------------------------------------------
def test_thousand_random_connections(slave: Slave) -> None:
    s = slave
    before = s.snapshot()
    rnd = random.Random(1234)
    prefixes = [b"", b"", b"FM", b"FM\x01", b"FM\x01\x01", hello_frame("s1", s.mirror)]
    payloads = [rnd.choice(prefixes) + rnd.randbytes(rnd.randint(1, 3000)) for _ in range(1000)]
    ports: list[int] = []

    async def one(data: bytes) -> None:
        stream, port = await connect(s)
        ports.append(port)
        await send_quietly(stream, data)
        await half_close(stream)
        got = await until_closed(stream, timeout=15)
        assert P.T_AUTH_OK not in frame_types(got)

    async def go() -> None:
        with trio.fail_after(90):
            for i in range(0, len(payloads), 100):
                async with trio.open_nursery() as n:
                    for data in payloads[i:i + 100]:
                        n.start_soon(one, data)

    mark = s.log_mark()
    run(go)                           # trio.fail_after(90) inside: a hang fails the test
    assert len(ports) == 1000
    # a local port may be reused by a later connection: count lines per port
    uses: dict[int, int] = {}
    for p in ports:
        uses[p] = uses.get(p, 0) + 1

    def counts() -> dict[int, int]:
        text = s.agent.log.read_bytes()[mark:].decode(errors="replace")
        c: dict[int, int] = {}
        for m in re.finditer(r" 127\.0\.0\.1:(\d+): disconnected: ", text):
            c[int(m.group(1))] = c.get(int(m.group(1)), 0) + 1
        return c

    wait_for(lambda: all(counts().get(p, 0) >= n for p, n in uses.items()), timeout=20,
             what="1000 disconnected lines")
    assert s.agent.alive()
    after = s.snapshot()
    assert {k: v for k, v in after.items() if k != "log"} == \
        {k: v for k, v in before.items() if k != "log"}
    end = s.log_mark()
    marker = settle_log(s, mark)      # also the positive control: a correct client is served
    c = counts()
    c[marker] -= 1                    # the marker's own line
    assert sum(c.values()) == 1000, sum(c.values())
    for p, n in uses.items():
        assert c[p] == n, (p, n, c[p])
    text = s.agent.log.read_bytes()[mark:end].decode(errors="replace")
    assert "authenticated for unit" not in text
    assert s.agent.alive()
