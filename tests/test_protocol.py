"""Sans-I/O tests of :mod:`fusemirror.protocol`: no sockets, bytes passed in memory.

The handshake, the request/answer stream and every refusal (wrong secret, reflected challenge,
frames before authentication, oversized and truncated frames, bad checksums, sequence numbers,
unit names, the HMAC's binding to names), then a hypothesis fuzz of both ends: random bytes and
mutated recordings of a valid conversation, fed in random chunks. The only exception that may
leave a :class:`~fusemirror.protocol.Connection` is :class:`~fusemirror.protocol.ProtocolError`.

``FUSEMIRROR_LONG=1`` runs the fuzz long (>= 100000 generated frames per fuzz test);
``FUSEMIRROR_FUZZ_EXAMPLES=N`` sets the example count directly.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fusemirror import protocol as P

SECRET = b"correct horse battery staple 42"
OTHER = b"incorrect horse battery staple"
UNIT = "s1"
MIRROR = "m"
MASTER_NONCE = bytes(range(1, 33))
AGENT_NONCE = bytes(range(101, 133))

LONG = os.environ.get("FUSEMIRROR_LONG") == "1"
EXAMPLES = int(os.environ.get("FUSEMIRROR_FUZZ_EXAMPLES") or (5000 if LONG else 120))
LONG_FRAMES = 100_000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- helpers ------------------------------------------------------------------------------------
def drain(conn: P.Connection) -> list[P.Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def pair(*, unit: str = UNIT, mirror: str = MIRROR, master_secret: bytes = SECRET,
         agent_secret: bytes = SECRET) -> tuple[P.Connection, P.Connection]:
    return (P.Connection("master", master_secret, unit=unit, mirror=mirror,
                         nonce=MASTER_NONCE),
            P.Connection("agent", agent_secret, nonce=AGENT_NONCE))


def handshake(m: P.Connection, a: P.Connection) -> tuple[bytes, bytes]:
    """Run the handshake in memory; return the bytes sent each way (master->agent, back)."""
    m2a, a2m = bytearray(), bytearray()
    hello = m.hello()
    m2a += hello
    a.receive_data(hello)
    assert drain(a) == [P.Hello(m.unit, m.mirror, m._nonce)]
    challenge = a.data_to_send()
    a2m += challenge
    m.receive_data(challenge)
    evs = drain(m)
    assert len(evs) == 1 and isinstance(evs[0], P.Challenge)
    assert evs[0].nonce == a._nonce
    auth = m.data_to_send()
    m2a += auth
    a.receive_data(auth)
    evs = drain(a)
    assert evs == [P.Authenticated(m.unit, m.mirror)]
    auth_ok = a.data_to_send()
    a2m += auth_ok
    m.receive_data(auth_ok)
    assert drain(m) == [P.Authenticated(m.unit, m.mirror)]
    assert m.authenticated and a.authenticated
    assert m.state == a.state == "READY"
    assert m.data_to_send() == a.data_to_send() == b""
    return bytes(m2a), bytes(a2m)


def ready() -> tuple[P.Connection, P.Connection]:
    m, a = pair()
    handshake(m, a)
    return m, a


def frame(ftype: int, payload: bytes) -> bytes:
    return P.HEADER.pack(P.MAGIC, P.VERSION, ftype, len(payload)) + payload


def hello_frame(unit: Any = UNIT, mirror: Any = MIRROR, nonce: bytes = MASTER_NONCE,
                version: int = P.VERSION) -> bytes:
    return frame(P.T_HELLO, json.dumps({"version": version, "unit": unit, "mirror": mirror,
                                        "nonce": nonce.hex()}).encode())


def after_hello(unit: str = UNIT, mirror: str = MIRROR) -> P.Connection:
    """An agent that received a valid HELLO and sent its CHALLENGE."""
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    a.receive_data(hello_frame(unit, mirror))
    assert isinstance(a.next_event(), P.Hello)
    assert a.data_to_send()
    return a


def refused(conn: P.Connection, data: bytes, match: str | None = None) -> P.ProtocolError:
    """Feed ``data``: the connection must raise ProtocolError and stay dead afterwards."""
    conn.receive_data(data)
    with pytest.raises(P.ProtocolError, match=match) as ei:
        drain(conn)
    assert conn.state == "ERROR"
    with pytest.raises(P.ProtocolError):
        conn.next_event()
    with pytest.raises(P.ProtocolError):
        conn.receive_data(b"more")
    return ei.value


def master_waiting_for_challenge() -> P.Connection:
    m = P.Connection("master", SECRET, unit=UNIT, mirror=MIRROR, nonce=MASTER_NONCE)
    m.hello()
    return m


def master_waiting_for_auth_ok() -> P.Connection:
    m = master_waiting_for_challenge()
    m.receive_data(frame(P.T_CHALLENGE, json.dumps({"nonce": AGENT_NONCE.hex()}).encode()))
    assert isinstance(m.next_event(), P.Challenge)
    assert len(m.data_to_send()) == P.HEADER.size + P.MAC
    return m


def agent_mac(**kw: Any) -> bytes:
    args = dict(secret=SECRET, direction=b"agent->master", mirror=MIRROR, unit=UNIT,
                first=MASTER_NONCE, second=AGENT_NONCE)
    args.update(kw)
    return P._mac(args["secret"], args["direction"], args["mirror"], args["unit"],
                  args["first"], args["second"])


def master_mac(**kw: Any) -> bytes:
    args = dict(secret=SECRET, direction=b"master->agent", mirror=MIRROR, unit=UNIT,
                first=AGENT_NONCE, second=MASTER_NONCE)
    args.update(kw)
    return P._mac(args["secret"], args["direction"], args["mirror"], args["unit"],
                  args["first"], args["second"])


# ---- handshake and traffic --------------------------------------------------------------------
def test_handshake_then_round_trip() -> None:
    m, a = pair()
    m2a, a2m = handshake(m, a)
    # CHALLENGE carries the agent's nonce; AUTH and AUTH_OK are the two directional HMACs
    assert m2a.endswith(master_mac()) and a2m.endswith(agent_mac())
    assert a.unit == UNIT and a.mirror == MIRROR

    data = os.urandom(3 * 4096 + 1000)            # last block short
    reqs = [P.Write(m.next_seq(), 8192, data, 4096), P.Flush(m.next_seq()),
            P.Ping(m.next_seq()), P.Request(m.next_seq(), "open", {"size": 8 << 20}),
            P.ReadDigests(m.next_seq(), 0, 16384, 4096), P.Read(m.next_seq(), 4096, 512),
            P.Write(m.next_seq(), 0, b"x" * 512, 512)]
    wire = b"".join(m.send(r) for r in reqs)
    # the agent may be fed the stream byte by byte
    got: list[P.Event] = []
    for i in range(len(wire)):
        a.receive_data(wire[i:i + 1])
        got += drain(a)
    assert got == reqs
    assert P.block_digests(data, 4096) == [P.block_digests(data[i:i + 4096], 4096)[0]
                                           for i in range(0, len(data), 4096)]

    answers = [P.Ack(1), P.Ack(2), P.Ack(3), P.Reply(4, {"open": True}),
               P.Digests(5, P.block_digests(bytes(16384), 4096)), P.Data(6, b"d" * 512),
               P.Error(7, 28, "no space")]
    back = b"".join(a.send(ans) for ans in answers)
    m.receive_data(back)
    assert drain(m) == answers
    assert m.data_to_send() == a.data_to_send() == b""


def test_large_writes_arrive_in_place_and_stay_intact() -> None:
    """WRITE payloads of 64 KiB and more received through ``receive_buffer`` are handed out
    as views of the buffer they arrived in (no copy); a payload still held is never
    overwritten by later frames, and buffers whose payloads were dropped are reused."""
    m, a = pair()
    handshake(m, a)
    rnd = __import__("random").Random(5)
    sizes = [1 << 20, 64 * 1024, 1000, 0, 1 << 20, 300 * 1024, 4096, 1 << 20, 1 << 20]
    reqs: list[P.Event] = [P.Write(i + 1, i << 20, rnd.randbytes(n), 4096) if n else
                           P.Flush(i + 1) for i, n in enumerate(sizes)]
    wire = b"".join(P.encode_write(r) if isinstance(r, P.Write) else
                    P._frame(P.T_FLUSH, P._SEQ.pack(r.seq)) for r in reqs)  # type: ignore
    got: list[P.Event] = []
    for i in range(0, len(wire), 100_000):          # as a socket delivers it: in pieces
        _give(a, wire[i:i + 100_000], zero_copy=True)
        got += drain(a)
    assert got == reqs
    big = [ev for ev in got if isinstance(ev, P.Write) and len(ev.data) >= 64 * 1024]
    # large: views of the receive buffer itself; small: of a copy of their frame
    assert len(big) == 6 and all(isinstance(ev.data.obj, bytearray) for ev in big)  # type: ignore
    small = [ev for ev in got if isinstance(ev, P.Write) and len(ev.data) < 64 * 1024]
    assert small and all(isinstance(ev.data.obj, bytes) for ev in small)  # type: ignore
    # hold the first payload, drop the rest; then receive as much again
    held, first = got[0], bytes(got[0].data)  # type: ignore[union-attr]
    used = {id(ev.data.obj) for ev in big}  # type: ignore[union-attr]
    del got, big, small
    more = [P.Write(len(reqs) + k + 1, k << 20, rnd.randbytes(1 << 20), 4096) for k in range(6)]
    wire2 = b"".join(P.encode_write(r) for r in more)
    got2: list[P.Event] = []
    for i in range(0, len(wire2), 65536):
        _give(a, wire2[i:i + 65536], zero_copy=True)
        got2 += drain(a)
    assert got2 == more
    assert bytes(held.data) == first, "a held payload was overwritten"  # type: ignore[union-attr]
    assert id(held.data.obj) not in {id(ev.data.obj) for ev in got2}  # type: ignore[union-attr]
    assert used & {id(ev.data.obj) for ev in got2}, "no buffer was reused"  # type: ignore[union-attr]


def test_missing_counts_the_rest_of_the_frame() -> None:
    """``missing`` is what the frame being received still needs: the header first, then the
    rest of the announced payload (the agent sleeps until that much has arrived)."""
    m, a = pair()
    handshake(m, a)
    frame = P.encode_write(P.Write(m.next_seq(), 0, bytes(8192), 4096))
    assert a.missing() == P.HEADER.size
    a.receive_data(frame[:3])
    assert a.missing() == P.HEADER.size - 3
    a.receive_data(frame[3:100])
    assert a.missing() == len(frame) - 100
    a.receive_data(frame[100:])
    assert a.missing() == 1 and isinstance(a.next_event(), P.Write)
    assert a.missing() == P.HEADER.size


def test_buffer_grows_by_doubling(monkeypatch) -> None:
    """A large frame arriving in small reads moves to a bigger buffer a logarithmic number of
    times, not once per read: a 4 MiB frame must not cost gigabytes of copying (before
    authentication such a frame is refused on its header; see below)."""
    moves: list[int] = []
    real = P.Connection._rebuffer

    def counting(self: P.Connection, size: int) -> None:
        moves.append(size)
        real(self, size)

    monkeypatch.setattr(P.Connection, "_rebuffer", counting)
    head = P.HEADER.pack(P.MAGIC, P.VERSION, P.T_REQUEST, 4 << 20)
    for zero_copy in (True, False):
        m, a = ready()
        moves.clear()
        _give(a, head, zero_copy)
        for _ in range(((4 << 20) - 65536) // 8192):
            _give(a, bytes(8192), zero_copy)
            assert a.next_event() is P.NEED_DATA
        assert len(moves) <= 24, (zero_copy, len(moves))


def test_send_before_authentication_refused() -> None:
    m, a = pair()
    with pytest.raises(P.ProtocolError):
        m.send(P.Ping(1))
    with pytest.raises(P.ProtocolError):
        a.send(P.Ack(1))


def test_wrong_roles_cannot_send() -> None:
    m, a = ready()
    with pytest.raises(P.ProtocolError):
        a.send(P.Write(1, 0, b"x" * 512, 512))
    with pytest.raises(P.ProtocolError):
        m.send(P.Ack(1))


# ---- wrong secret -------------------------------------------------------------------------------
def test_wrong_secret_refused_by_agent() -> None:
    m, a = pair(master_secret=OTHER)
    a.receive_data(m.hello())
    drain(a)
    m.receive_data(a.data_to_send())
    drain(m)
    refused(a, m.data_to_send(), match="wrong secret")
    assert not a.authenticated
    assert a.data_to_send() == b""                 # no AUTH_OK for a wrong secret


def test_wrong_secret_refused_by_master() -> None:
    """An impostor agent (another secret) cannot produce an AUTH_OK the master accepts."""
    m = master_waiting_for_auth_ok()
    refused(m, frame(P.T_AUTH_OK, agent_mac(secret=OTHER)), match="wrong secret")
    assert not m.authenticated


def test_master_accepts_right_auth_ok() -> None:
    m = master_waiting_for_auth_ok()
    m.receive_data(frame(P.T_AUTH_OK, agent_mac()))
    assert drain(m) == [P.Authenticated(UNIT, MIRROR)]


# ---- reflected challenge ------------------------------------------------------------------------
def test_reflected_challenge_refused_by_agent() -> None:
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, hello_frame(nonce=AGENT_NONCE), match="reflected")
    assert a.data_to_send() == b""                 # no CHALLENGE sent


def test_reflected_challenge_from_a_master_connection() -> None:
    """The same, produced by a master Connection that happens to use the agent's nonce."""
    m = P.Connection("master", SECRET, unit=UNIT, mirror=MIRROR, nonce=AGENT_NONCE)
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, m.hello(), match="reflected")


def test_reflected_challenge_refused_by_master() -> None:
    """A fake agent echoing the master's own nonce as its challenge."""
    m = master_waiting_for_challenge()
    refused(m, frame(P.T_CHALLENGE, json.dumps({"nonce": MASTER_NONCE.hex()}).encode()),
            match="reflected")
    assert m.data_to_send() == b""                 # no AUTH computed for it


def test_echoed_challenge_frame_refused_by_agent() -> None:
    """The agent's CHALLENGE frame sent back to it in place of AUTH."""
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    a.receive_data(hello_frame())
    drain(a)
    refused(a, a.data_to_send())


def test_own_auth_reflected_refused() -> None:
    """An AUTH_OK-direction MAC (what the agent would send) is no AUTH."""
    a = after_hello()
    refused(a, frame(P.T_AUTH, master_mac(direction=b"agent->master")))


# ---- frames before authentication ---------------------------------------------------------------
ALL_TYPES = [P.T_HELLO, P.T_CHALLENGE, P.T_AUTH, P.T_AUTH_OK, P.T_WRITE, P.T_FLUSH, P.T_PING,
             P.T_REQUEST, P.T_READ_DIGESTS, P.T_READ, P.T_ACK, P.T_ERROR, P.T_DIGESTS, P.T_DATA,
             P.T_REPLY, 0, 99, 255]


def _plausible_payload(ftype: int) -> bytes:
    if ftype == P.T_WRITE:
        return P.encode_write(P.Write(1, 0, b"w" * 512, 512))[P.HEADER.size:]
    if ftype in (P.T_AUTH, P.T_AUTH_OK):
        return master_mac()
    if ftype == P.T_CHALLENGE:
        return json.dumps({"nonce": AGENT_NONCE.hex()}).encode()
    if ftype == P.T_REQUEST:
        return struct.pack(">Q", 1) + b'{"op":"create","args":{}}'
    if ftype in (P.T_READ_DIGESTS, P.T_READ):
        return struct.pack(">QQQI", 1, 0, 4096, 4096)
    return struct.pack(">Q", 1)


@pytest.mark.parametrize("ftype", [t for t in ALL_TYPES if t != P.T_HELLO])
def test_agent_refuses_frames_before_hello(ftype: int) -> None:
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, frame(ftype, _plausible_payload(ftype)), match="before authentication|unexpected")
    assert not a.authenticated and a.data_to_send() == b""


@pytest.mark.parametrize("ftype", [t for t in ALL_TYPES if t != P.T_AUTH])
def test_agent_refuses_frames_between_hello_and_auth(ftype: int) -> None:
    a = after_hello()
    refused(a, frame(ftype, _plausible_payload(ftype)))
    assert not a.authenticated and a.data_to_send() == b""


@pytest.mark.parametrize("ftype", [t for t in ALL_TYPES if t != P.T_CHALLENGE])
def test_master_refuses_frames_before_challenge(ftype: int) -> None:
    m = master_waiting_for_challenge()
    refused(m, frame(ftype, _plausible_payload(ftype)))
    assert not m.authenticated and m.data_to_send() == b""


@pytest.mark.parametrize("ftype", [t for t in ALL_TYPES if t != P.T_AUTH_OK])
def test_master_refuses_frames_before_auth_ok(ftype: int) -> None:
    m = master_waiting_for_auth_ok()
    refused(m, frame(ftype, _plausible_payload(ftype)))
    assert not m.authenticated


def test_master_refuses_frames_before_hello_sent() -> None:
    m = P.Connection("master", SECRET, unit=UNIT, mirror=MIRROR)
    refused(m, frame(P.T_CHALLENGE, _plausible_payload(P.T_CHALLENGE)))


@pytest.mark.parametrize("ftype", [P.T_HELLO, P.T_AUTH, P.T_CHALLENGE, P.T_AUTH_OK])
def test_repeated_handshake_frames_refused(ftype: int) -> None:
    m, a = ready()
    payload = hello_frame()[P.HEADER.size:] if ftype == P.T_HELLO else _plausible_payload(ftype)
    refused(a, frame(ftype, payload))


def test_malformed_hello_refused() -> None:
    bad = [b"", b"not json", b"[]", b"\xff\xfe", b'{"version":1}',
           json.dumps({"version": 2, "unit": UNIT, "mirror": MIRROR,
                       "nonce": MASTER_NONCE.hex()}).encode(),
           json.dumps({"version": 1, "unit": UNIT, "mirror": MIRROR, "nonce": "zz"}).encode(),
           json.dumps({"version": 1, "unit": UNIT, "mirror": MIRROR, "nonce": 5}).encode(),
           json.dumps({"version": 1, "unit": UNIT, "mirror": MIRROR, "nonce": "00" * 31}).encode(),
           json.dumps({"version": 1, "unit": UNIT, "mirror": 7,
                       "nonce": MASTER_NONCE.hex()}).encode(),
           json.dumps({"version": 1, "unit": UNIT, "mirror": "m" * 300,
                       "nonce": MASTER_NONCE.hex()}).encode(),
           # nesting deeper than the recursion limit, within a handshake frame's size
           b"[" * (P.MAX_HANDSHAKE - 8),
           b'{"a":' * ((P.MAX_HANDSHAKE - 8) // 5)]
    for payload in bad:
        a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
        refused(a, frame(P.T_HELLO, payload))


def test_deeply_nested_json_after_authentication() -> None:
    m, a = ready()
    refused(a, frame(P.T_REQUEST, struct.pack(">Q", 1) + b"[" * 100_000))
    m, a = ready()
    seq = m.next_seq()
    m.send(P.Ping(seq))
    refused(m, frame(P.T_REPLY, struct.pack(">Q", seq) + b"{\"a\":" * 50_000))
    m = master_waiting_for_challenge()
    refused(m, frame(P.T_CHALLENGE, b"[" * P.MAX_HANDSHAKE), match="malformed")


# ---- frame sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [P.MAX_PAYLOAD + 1, 1 << 31, (1 << 32) - 1])
def test_oversized_length_refused_before_payload(length: int) -> None:
    header = P.HEADER.pack(P.MAGIC, P.VERSION, P.T_HELLO, length)
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, header, match="exceeds")              # only the header has arrived
    m, a = ready()
    refused(a, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_WRITE, length), match="exceeds")
    refused(m, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_DATA, length), match="exceeds")
    m = master_waiting_for_challenge()
    refused(m, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_CHALLENGE, length), match="exceeds")


def test_maximum_length_is_accepted_as_need_data() -> None:
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    a.receive_data(P.HEADER.pack(P.MAGIC, P.VERSION, P.T_HELLO, P.MAX_HANDSHAKE))
    assert a.next_event() is P.NEED_DATA
    assert a.state == "AWAIT_HELLO"
    m, a = ready()
    a.receive_data(P.HEADER.pack(P.MAGIC, P.VERSION, P.T_WRITE, P.MAX_PAYLOAD))
    assert a.next_event() is P.NEED_DATA


@pytest.mark.parametrize("length", [P.MAX_HANDSHAKE + 1, P.MAX_PAYLOAD])
def test_large_frame_before_authentication_refused_on_its_header(length: int) -> None:
    """Before authentication a peer gets a few KiB per frame: a HELLO (or a CHALLENGE to a
    master) announcing megabytes is refused on its header, before any payload is held."""
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_HELLO, length),
            match="before authentication")
    m = master_waiting_for_challenge()
    refused(m, P.HEADER.pack(P.MAGIC, P.VERSION, P.T_CHALLENGE, length),
            match="before authentication")
    # after authentication the same size is an ordinary frame
    m, a = ready()
    a.receive_data(P.HEADER.pack(P.MAGIC, P.VERSION, P.T_REQUEST, length))
    assert a.next_event() is P.NEED_DATA


def test_bad_magic_and_version_refused() -> None:
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, b"GET / HTTP/1.1\r\n", match="magic")
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, P.HEADER.pack(P.MAGIC, 2, P.T_HELLO, 0), match="version")


def test_sending_an_oversized_frame_refused() -> None:
    m, a = ready()
    with pytest.raises(P.ProtocolError):
        a.send(P.Data(1, bytes(P.MAX_PAYLOAD)))


def test_truncated_frames_need_data() -> None:
    hello = hello_frame()
    for cut in range(len(hello)):
        a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
        a.receive_data(hello[:cut])
        assert a.next_event() is P.NEED_DATA
        assert a.next_event() is P.NEED_DATA       # asking again changes nothing
        assert a.state == "AWAIT_HELLO" and a.data_to_send() == b""
        a.receive_data(hello[cut:])
        assert isinstance(a.next_event(), P.Hello)

    m, a = ready()
    w = m.send(P.Write(m.next_seq(), 0, os.urandom(4096 + 7), 4096))
    for cut in (1, P.HEADER.size - 1, P.HEADER.size, P.HEADER.size + 8, len(w) - 1):
        m2, a2 = ready()
        m2.next_seq()
        a2.receive_data(w[:cut])
        assert a2.next_event() is P.NEED_DATA
        assert a2.state == "READY"
        a2.receive_data(w[cut:])
        ev = a2.next_event()
        assert isinstance(ev, P.Write) and ev.seq == 1

    # the master side too
    m, a = ready()
    seq = m.next_seq()
    a.receive_data(m.send(P.Read(seq, 0, 4096)))
    assert drain(a) == [P.Read(seq, 0, 4096)]
    d = a.send(P.Data(seq, b"z" * 4096))
    m.receive_data(d[:-1])
    assert m.next_event() is P.NEED_DATA and m.state == "READY"
    m.receive_data(d[-1:])
    assert m.next_event() == P.Data(seq, b"z" * 4096)


# ---- WRITE checksums ----------------------------------------------------------------------------
def test_bad_block_checksum_refused() -> None:
    data = os.urandom(4 * 4096)
    for what in ("digest", "data", "last-byte", "count"):
        m, a = ready()
        w = bytearray(m.send(P.Write(m.next_seq(), 0, data, 4096)))
        dstart = P.HEADER.size + P._WRITE.size
        if what == "digest":
            w[dstart + 8 * 2 + 3] ^= 0x40             # digest of block 2
        elif what == "data":
            w[dstart + 8 * 4 + 4096 + 17] ^= 1        # one bit of block 1
        elif what == "last-byte":
            w[-1] ^= 0x80
        else:                                         # one digest fewer than blocks
            struct.pack_into(">I", w, P.HEADER.size + 20, 3)
        refused(a, bytes(w), match="checksum" if what != "count" else None)


def test_write_geometry_refused() -> None:
    cases = [(0, 1, b"x"),            # block size below 512
             (1000, 1, b"x" * 1000),  # not a power of two
             (512, 0, b""),           # no data
             ]
    for bs, n, data in cases:
        m, a = ready()
        head = P._WRITE.pack(1, 0, bs, n)
        digests = struct.pack(f">{n}Q", *P.block_digests(data, max(bs, 1))[:n])
        refused(a, frame(P.T_WRITE, head + digests + data))
    m, a = ready()                    # a digest count far beyond the payload
    refused(a, frame(P.T_WRITE, P._WRITE.pack(1, 0, 512, 0xFFFFFFFF) + b"x" * 512))


# ---- sequence numbers ---------------------------------------------------------------------------
def test_out_of_order_and_duplicate_requests_refused() -> None:
    for seqs in ([1, 1], [2], [0], [1, 3], [1, 2, 2], [1 << 63]):
        m, a = ready()
        *good, bad = seqs
        for s in good:
            a.receive_data(frame(P.T_PING, struct.pack(">Q", s)))
            assert drain(a) == [P.Ping(s)]
        refused(a, frame(P.T_PING, struct.pack(">Q", bad)), match="out of order")
    # a duplicated WRITE (replayed frame) is refused, not applied twice
    m, a = ready()
    w = m.send(P.Write(m.next_seq(), 0, b"a" * 512, 512))
    a.receive_data(w)
    assert len(drain(a)) == 1
    refused(a, w, match="out of order")


def test_out_of_order_and_duplicate_answers_refused() -> None:
    m, a = ready()
    for _ in range(3):
        m.send(P.Ping(m.next_seq()))
    m.receive_data(frame(P.T_ACK, struct.pack(">Q", 1)))
    assert drain(m) == [P.Ack(1)]
    refused(m, frame(P.T_ACK, struct.pack(">Q", 1)), match="out of order")   # duplicate

    m, a = ready()
    m.send(P.Ping(m.next_seq()))
    m.send(P.Ping(m.next_seq()))
    refused(m, frame(P.T_ACK, struct.pack(">Q", 2)), match="out of order")   # skips 1

    m, a = ready()
    m.send(P.Ping(m.next_seq()))
    m.receive_data(frame(P.T_ACK, struct.pack(">Q", 1)))
    drain(m)
    refused(m, frame(P.T_ACK, struct.pack(">Q", 2)), match="out of order")   # never sent


def test_agent_answers_in_order_only() -> None:
    m, a = ready()
    with pytest.raises(P.ProtocolError):
        a.send(P.Ack(2))
    a.send(P.Ack(1))
    with pytest.raises(P.ProtocolError):
        a.send(P.Ack(1))


# ---- unit names ---------------------------------------------------------------------------------
BAD_NAMES = ["a/b", "..", ".", "", "x" * 200, ".hidden", "../evil", "/abs", "a\0b", "tab\there",
             "x" * (P.UNIT_NAME_MAX + 1), "\ud800"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_unit_names_refused(name: str) -> None:
    assert not P.valid_unit_name(name)
    m = P.Connection("master", SECRET, unit=name, mirror=MIRROR)
    with pytest.raises(P.ProtocolError):
        m.hello()
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, hello_frame(unit=name), match="unit name")
    assert a.unit is None and a.data_to_send() == b""


@pytest.mark.parametrize("unit", [None, 5, ["s1"], {"a": 1}, True])
def test_non_string_unit_refused(unit: Any) -> None:
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    refused(a, hello_frame(unit=unit))


@pytest.mark.parametrize("name", ["s1", "x" * P.UNIT_NAME_MAX, "a.b", "a..b", "é-unit", "a b"])
def test_good_unit_names_accepted(name: str) -> None:
    assert P.valid_unit_name(name)
    m, a = pair(unit=name)
    handshake(m, a)
    assert a.unit == name


# ---- the HMAC's binding -------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"mirror": "other"}, {"unit": "s2"}, {"mirror": MIRROR + "\0" + UNIT, "unit": ""},
    {"direction": b"agent->master"}, {"first": MASTER_NONCE, "second": AGENT_NONCE},
    {"secret": OTHER}, {"first": bytes(32)},
], ids=str)
def test_auth_bound_to_names_and_nonces(kw: dict[str, Any]) -> None:
    a = after_hello()
    refused(a, frame(P.T_AUTH, master_mac(**kw)), match="wrong secret")
    a = after_hello()                                 # the control: the right MAC passes
    a.receive_data(frame(P.T_AUTH, master_mac()))
    assert drain(a) == [P.Authenticated(UNIT, MIRROR)]


def test_auth_for_another_unit_or_mirror_via_real_masters() -> None:
    """A whole handshake whose AUTH comes from a master of another mirror / unit is refused."""
    for unit, mirror in (("s2", MIRROR), (UNIT, "other")):
        m_other = P.Connection("master", SECRET, unit=unit, mirror=mirror, nonce=MASTER_NONCE)
        m_other.hello()
        m_other.receive_data(frame(P.T_CHALLENGE,
                                   json.dumps({"nonce": AGENT_NONCE.hex()}).encode()))
        drain(m_other)
        forged_auth = m_other.data_to_send()
        a = after_hello()                            # announced UNIT / MIRROR
        refused(a, forged_auth, match="wrong secret")


@pytest.mark.parametrize("kw", [{"mirror": "other"}, {"unit": "s2"},
                                {"direction": b"master->agent"},
                                {"first": AGENT_NONCE, "second": MASTER_NONCE}], ids=str)
def test_auth_ok_bound_to_names(kw: dict[str, Any]) -> None:
    m = master_waiting_for_auth_ok()
    refused(m, frame(P.T_AUTH_OK, agent_mac(**kw)), match="wrong secret")


# ---- fuzzing ------------------------------------------------------------------------------------
def _record() -> tuple[bytes, bytes, int, int, int]:
    """A valid conversation: (master->agent bytes, agent->master bytes, frames each way,
    number of requests)."""
    m, a = pair()
    m2a, a2m = handshake(m, a)
    out, back = bytearray(m2a), bytearray(a2m)
    reqs: list[P.Event] = []
    for i in range(12):
        reqs.append(P.Write(m.next_seq(), i * 4096, bytes([i]) * (4096 + 512 * (i % 3)), 512))
    reqs += [P.Flush(m.next_seq()), P.Ping(m.next_seq()),
             P.Request(m.next_seq(), "open", {"mirror_id": "ab" * 8, "size": 8 << 20}),
             P.ReadDigests(m.next_seq(), 0, 8192, 4096), P.Read(m.next_seq(), 512, 1024),
             P.Request(m.next_seq(), "info", {})]
    for r in reqs:
        out += m.send(r)
    a.receive_data(bytes(out[len(m2a):]))
    assert drain(a) == reqs
    answers: list[P.Event] = []
    for r in reqs:
        s = r.seq  # type: ignore[union-attr]
        if isinstance(r, P.ReadDigests):
            answers.append(P.Digests(s, P.block_digests(bytes(8192), 4096)))
        elif isinstance(r, P.Read):
            answers.append(P.Data(s, bytes(1024)))
        elif isinstance(r, P.Request):
            answers.append(P.Reply(s, {"open": True, "size": 8 << 20}))
        elif s == 5:
            answers.append(P.Error(s, 5, "EIO"))
        else:
            answers.append(P.Ack(s))
    for ans in answers:
        back += a.send(ans)
    m.receive_data(bytes(back[len(a2m):]))
    assert drain(m) == answers
    return bytes(out), bytes(back), 2 + len(reqs), 2 + len(answers), len(reqs)


M2A, A2M, M2A_FRAMES, A2M_FRAMES, NREQ = _record()


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)] if sizes else len(data)
        out.append(data[i:i + n])
        i += n
        k += 1
    return out


def _give(conn: P.Connection, chunk: bytes, zero_copy: bool) -> None:
    """Pass ``chunk`` in as the agent does (into :meth:`receive_buffer`, which may take
    less than all of it) or as the master does (:meth:`receive_data`)."""
    if not zero_copy:
        conn.receive_data(chunk)
        return
    while chunk:
        buf = conn.receive_buffer()
        k = min(len(buf), len(chunk))
        buf[:k] = chunk[:k]
        conn.received(k)
        chunk = chunk[k:]


def feed_agent(data: bytes, sizes: list[int]) -> int:
    """Feed an agent Connection (with the recording's nonce); answer every request as the
    real agent would. Returns the number of events. Only ProtocolError may escape the
    Connection, and it ends the connection for good. Odd chunks go through
    :meth:`receive_buffer`, even ones through :meth:`receive_data`, so both paths (and
    their mix) see every input."""
    a = P.Connection("agent", SECRET, nonce=AGENT_NONCE)
    n = 0
    try:
        for i, chunk in enumerate(_chunks(data, sizes)):
            _give(a, chunk, zero_copy=bool(i % 2))
            while (ev := a.next_event()) is not None:
                n += 1
                a.data_to_send()
                if isinstance(ev, (P.Write, P.Flush, P.Ping, P.Request, P.ReadDigests, P.Read)):
                    a.send(P.Ack(ev.seq))
    except P.ProtocolError:
        assert a.state == "ERROR"
        with pytest.raises(P.ProtocolError):
            a.next_event()
    return n


def feed_master(data: bytes, sizes: list[int]) -> int:
    m = P.Connection("master", SECRET, unit=UNIT, mirror=MIRROR, nonce=MASTER_NONCE)
    m.hello()
    n = 0
    try:
        for chunk in _chunks(data, sizes):
            m.receive_data(chunk)
            while (ev := m.next_event()) is not None:
                n += 1
                m.data_to_send()
                if isinstance(ev, P.Authenticated):
                    for _ in range(NREQ):              # the requests of the recording
                        m.send(P.Ping(m.next_seq()))
    except P.ProtocolError:
        assert m.state == "ERROR"
        with pytest.raises(P.ProtocolError):
            m.next_event()
    return n


def test_recorded_streams_replay_cleanly() -> None:
    assert feed_agent(M2A, [len(M2A)]) == M2A_FRAMES
    assert feed_agent(M2A, [1]) == M2A_FRAMES
    assert feed_master(A2M, [7]) == A2M_FRAMES


mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "dup", "cut"]),
                     st.integers(0, 1 << 30), st.integers(0, 255), st.integers(1, 64))
chunk_sizes = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 70000)), min_size=1,
                       max_size=12)


def mutate(data: bytes, muts: list[tuple[str, int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, byte, n in muts:
        if not b:
            b = bytearray([byte])
            continue
        i = pos % len(b)
        if kind == "flip":
            b[i] ^= 1 << (byte % 8)
        elif kind == "set":
            b[i] = byte
        elif kind == "insert":
            b[i:i] = bytes([byte]) * n
        elif kind == "delete":
            del b[i:i + n]
        elif kind == "dup":
            b[i:i] = b[i:i + n * 16]
        else:
            del b[i:]
    return bytes(b)


def _run_fuzz(run: Any, counter: list[int]) -> None:
    """Run the hypothesis test; in the long mode, again until >= LONG_FRAMES frames were
    generated (each round draws new examples: no example database, random seed)."""
    run()
    while LONG and counter[0] < LONG_FRAMES:
        run()
    assert counter[0] >= (LONG_FRAMES if LONG else 1), counter[0]


def test_fuzz_random_bytes() -> None:

    @FUZZ
    @given(data=st.binary(max_size=4096), sizes=chunk_sizes,
           prefix=st.sampled_from([b"", b"FM", b"FM\x01", M2A[:P.HEADER.size]]))
    def run(data: bytes, sizes: list[int], prefix: bytes) -> None:
        feed_agent(prefix + data, sizes)
        feed_master(prefix + data, sizes)

    run()


def test_fuzz_mutated_agent_stream() -> None:
    counter = [0]

    @FUZZ
    @given(muts=st.lists(mutation, min_size=1, max_size=4), sizes=chunk_sizes)
    def run(muts: list[tuple[str, int, int, int]], sizes: list[int]) -> None:
        counter[0] += M2A_FRAMES
        feed_agent(mutate(M2A, muts), sizes)

    _run_fuzz(run, counter)


def test_fuzz_mutated_master_stream() -> None:
    counter = [0]

    @FUZZ
    @given(muts=st.lists(mutation, min_size=1, max_size=4), sizes=chunk_sizes)
    def run(muts: list[tuple[str, int, int, int]], sizes: list[int]) -> None:
        counter[0] += A2M_FRAMES
        feed_master(mutate(A2M, muts), sizes)

    _run_fuzz(run, counter)


fuzz_frame = st.tuples(
    st.sampled_from(ALL_TYPES + [7, 16, 25]),
    st.one_of(st.binary(max_size=64), st.binary(min_size=8, max_size=600)),
    st.booleans())


def test_fuzz_random_frames_after_handshake() -> None:
    """Well-framed garbage after a valid handshake reaches the per-type decoders (the seq
    number is made right half the time so the payload is parsed)."""
    counter = [0]
    m, a = pair()
    hs_m2a, hs_a2m = handshake(m, a)

    @FUZZ
    @given(frames=st.lists(fuzz_frame, min_size=1, max_size=24), sizes=chunk_sizes)
    def run(frames: list[tuple[int, bytes, bool]], sizes: list[int]) -> None:
        counter[0] += 2 * len(frames)
        to_agent, to_master = bytearray(hs_m2a), bytearray(hs_a2m)
        for i, (ftype, payload, good_seq) in enumerate(frames, 1):
            if good_seq and len(payload) >= 8:
                payload = struct.pack(">Q", i) + payload[8:]
            to_agent += frame(ftype, payload)
            to_master += frame(ftype, payload)
        feed_agent(bytes(to_agent), sizes)
        feed_master(bytes(to_master), sizes)

    _run_fuzz(run, counter)
