"""The replication protocol, sans-I/O: bytes in, events out; events in, bytes out (as h11).

This module does no I/O, keeps no clock and opens no file: :class:`Connection` is fed the bytes
that arrived and yields the events they make; it turns events to send into bytes. Every malformed,
oversized, unauthenticated or out-of-order input raises :class:`ProtocolError` — never a stray
``struct.error``, ``KeyError`` or ``UnicodeDecodeError`` — after which the connection is dead.

Frames, version 1 (big-endian)::

    0  2s  magic b"FM"
    2  B   protocol version (1)
    3  B   frame type
    4  I   payload length (at most MAX_PAYLOAD)
    8  ..  payload

Authentication comes first, in both directions (DRBD's ``drbd_do_auth``, bound to names)::

    master -> agent  HELLO      {"version", "unit", "mirror", "nonce"}          (JSON)
    agent  -> master CHALLENGE  {"nonce"}                                        (JSON)
    master -> agent  AUTH       HMAC(secret, "fusemirror/1 master->agent" | mirror | unit |
                                     agent nonce | master nonce)                 (32 bytes)
    agent  -> master AUTH_OK    HMAC(secret, "fusemirror/1 agent->master" | mirror | unit |
                                     master nonce | agent nonce)                 (32 bytes)

Digests are compared in constant time; a HELLO whose nonce equals the agent's own challenge
(a reflected challenge) is refused; any other frame before AUTH_OK is a protocol error.

After that the master sends requests, each with a sequence number one higher than the last on
this connection (so none is applied twice or out of order), and the agent answers each one with
ACK, ERROR or a data answer carrying the same sequence number, in order. WRITE carries an xxh3
digest for every block; the agent checks them before it writes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from typing import Any, Union

import xxhash

MAGIC = b"FM"
VERSION = 1
HEADER = struct.Struct(">2sBBI")
MAX_PAYLOAD = 4 << 20 | 65536     # one 4 MiB data frame plus its digests
MAX_DATA = 4 << 20
MAX_JSON = 1 << 20
MAX_HANDSHAKE = 8192              # a frame before authentication (HELLO is the largest)
NONCE = 32
MAC = 32
UNIT_NAME_MAX = 128

# frame types
T_HELLO, T_CHALLENGE, T_AUTH, T_AUTH_OK = 1, 2, 3, 4
T_WRITE, T_FLUSH, T_PING, T_REQUEST = 10, 11, 12, 13
T_READ_DIGESTS, T_READ = 14, 15
T_ACK, T_ERROR, T_DIGESTS, T_DATA, T_REPLY = 20, 21, 22, 23, 24

_SEQ = struct.Struct(">Q")
_WRITE = struct.Struct(">QQII")       # seq, offset, block size, number of blocks
_RANGE = struct.Struct(">QQQI")       # seq, offset, length, block size
_ERR = struct.Struct(">QI")           # seq, errno


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed (and logged, once)."""


# ---- events ---------------------------------------------------------------------------------
@dataclass
class Hello:
    unit: str
    mirror: str
    nonce: bytes
    version: int = VERSION


@dataclass
class Challenge:
    nonce: bytes


@dataclass
class Auth:
    mac: bytes


@dataclass
class AuthOk:
    mac: bytes


@dataclass
class Authenticated:
    """Local event: both sides proved knowledge of the secret."""

    unit: str
    mirror: str


@dataclass
class Write:
    seq: int
    offset: int
    data: bytes
    block_size: int


@dataclass
class Flush:
    seq: int


@dataclass
class Ping:
    seq: int


@dataclass
class Request:
    """A control request (open, create, database changes), JSON-encoded."""

    seq: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadDigests:
    seq: int
    offset: int
    length: int
    block_size: int


@dataclass
class Read:
    seq: int
    offset: int
    length: int


@dataclass
class Ack:
    seq: int


@dataclass
class Error:
    seq: int
    errno: int
    message: str


@dataclass
class Digests:
    seq: int
    digests: list[int]


@dataclass
class Data:
    seq: int
    data: bytes


@dataclass
class Reply:
    seq: int
    result: dict[str, Any]


Event = Union[Hello, Challenge, Auth, AuthOk, Authenticated, Write, Flush, Ping, Request,
              ReadDigests, Read, Ack, Error, Digests, Data, Reply]

NEED_DATA = None
RECV_ROOM = 256 * 1024        # room offered for the next read beyond the current frame
HANDSHAKE_ROOM = 4096         # ... before authentication: grows only as bytes arrive
ZERO_COPY_MIN = 64 * 1024     # WRITE payloads this large are handed out without a copy
SPARES = 4                    # handed-out buffers kept for reuse


def block_digests(data: bytes | memoryview, block_size: int) -> list[int]:
    """xxh3-64 of each block of ``data`` (the last block may be short)."""
    mv = memoryview(data)
    return [xxhash.xxh3_64_intdigest(mv[i:i + block_size]) for i in range(0, len(mv), block_size)]


def valid_unit_name(name: str) -> bool:
    """A slave unit name: one path component, no '..', printable, at most 128 characters."""
    return (0 < len(name) <= UNIT_NAME_MAX and "/" not in name and "\0" not in name
            and name not in (".", "..") and name.isprintable() and not name.startswith("."))


def _mac(secret: bytes, direction: bytes, mirror: str, unit: str, first: bytes,
         second: bytes) -> bytes:
    msg = b"fusemirror/1 " + direction + b"\0" + mirror.encode() + b"\0" + unit.encode() \
        + b"\0" + first + second
    return hmac.new(secret, msg, hashlib.sha256).digest()


# ---- the connection -------------------------------------------------------------------------
class Connection:
    """One end of a replication connection: ``role`` is "master" (client) or "agent" (server).

    States: master: START -> SENT_HELLO -> SENT_AUTH -> READY; agent: AWAIT_HELLO ->
    SENT_CHALLENGE -> READY. ERROR is final.
    """

    def __init__(self, role: str, secret: bytes, *, unit: str | None = None,
                 mirror: str | None = None, nonce: bytes | None = None) -> None:
        if role not in ("master", "agent"):
            raise ValueError(role)
        self.role = role
        self._secret = secret
        self.unit = unit
        self.mirror = mirror
        self._nonce = nonce or os.urandom(NONCE)
        self._peer_nonce = b""
        self.state = "START" if role == "master" else "AWAIT_HELLO"
        # received bytes are _buf[_pos:_end]; a large payload is handed out as a view of
        # _buf, which is then never written again (see next_event)
        self._buf = bytearray(HANDSHAKE_ROOM)
        self._pos = 0
        self._end = 0
        self._spares: list[bytearray] = []
        self._out = bytearray()
        self._recv_seq = 0     # agent: last request seq received; master: last answer seq
        self._send_seq = 0     # master: last request seq sent
        self._answered = 0     # agent: last seq answered
        self.authenticated = False

    # ---- sending -------------------------------------------------------------------------
    def hello(self) -> bytes:
        """Master: the first frame."""
        assert self.role == "master" and self.state == "START"
        if self.unit is None or self.mirror is None or not valid_unit_name(self.unit):
            raise ProtocolError(f"bad unit name {self.unit!r}")
        self.state = "SENT_HELLO"
        return _frame(T_HELLO, _json({"version": VERSION, "unit": self.unit,
                                      "mirror": self.mirror, "nonce": self._nonce.hex()}))

    def next_seq(self) -> int:
        self._send_seq += 1
        return self._send_seq

    def send_parts(self, ev: Event) -> list[bytes]:
        """Like :meth:`send`, as buffers to send in order (a write's data is not copied)."""
        if isinstance(ev, Write) and self.role == "master" and self.authenticated:
            return list(encode_write_parts(ev))
        return [self.send(ev)]

    def send(self, ev: Event) -> bytes:
        """The bytes of an event this side may send now."""
        if not self.authenticated:
            raise ProtocolError("not authenticated")
        if self.role == "master":
            if isinstance(ev, Write):
                return encode_write(ev)
            if isinstance(ev, (Flush, Ping)):
                return _frame(T_FLUSH if isinstance(ev, Flush) else T_PING, _SEQ.pack(ev.seq))
            if isinstance(ev, Request):
                return _frame(T_REQUEST, _SEQ.pack(ev.seq) + _json({"op": ev.op, "args": ev.args}))
            if isinstance(ev, ReadDigests):
                return _frame(T_READ_DIGESTS, _RANGE.pack(ev.seq, ev.offset, ev.length,
                                                          ev.block_size))
            if isinstance(ev, Read):
                return _frame(T_READ, _RANGE.pack(ev.seq, ev.offset, ev.length, 0))
        else:
            if not isinstance(ev, (Ack, Error, Digests, Data, Reply)):
                raise ProtocolError(f"agent cannot send {type(ev).__name__}")
            if ev.seq != self._answered + 1:
                raise ProtocolError(f"answer {ev.seq} out of order (expected "
                                    f"{self._answered + 1})")
            self._answered = ev.seq
            if isinstance(ev, Ack):
                return _frame(T_ACK, _SEQ.pack(ev.seq))
            if isinstance(ev, Error):
                return _frame(T_ERROR, _ERR.pack(ev.seq, ev.errno)
                              + ev.message.encode()[:1000])
            if isinstance(ev, Digests):
                return _frame(T_DIGESTS, _SEQ.pack(ev.seq)
                              + struct.pack(f">{len(ev.digests)}Q", *ev.digests))
            if isinstance(ev, Data):
                return _frame(T_DATA, _SEQ.pack(ev.seq) + ev.data)
            if isinstance(ev, Reply):
                return _frame(T_REPLY, _SEQ.pack(ev.seq) + _json(ev.result))
        raise ProtocolError(f"{self.role} cannot send {type(ev).__name__}")

    # ---- receiving -----------------------------------------------------------------------
    def receive_data(self, data: bytes | memoryview) -> None:
        """Bytes from the peer (copied; :meth:`receive_buffer` avoids the copy)."""
        if self.state == "ERROR":
            raise ProtocolError("connection already failed")
        n = len(data)
        if self._end - self._pos + n > MAX_PAYLOAD + HEADER.size + (16 << 20):
            self._fail("peer sends faster than it is read")
        if len(self._buf) - self._end < n:
            have = self._end - self._pos
            self._rebuffer(max(have + n, 2 * have))   # doubling: no quadratic copying
        self._buf[self._end:self._end + n] = data
        self._end += n

    def receive_buffer(self) -> memoryview:
        """Where the next bytes from the peer should go (``socket.recv_into``); then call
        :meth:`received` with how many arrived.

        The buffer has room for the rest of the frame being received, so a large frame
        arrives in one piece where :meth:`next_event` hands its payload out: a WRITE's data
        goes from the socket to the image without being copied in between (two copies of
        every replicated byte fewer on the slave than with :meth:`receive_data`).
        """
        if self.state == "ERROR":
            raise ProtocolError("connection already failed")
        have = self._end - self._pos
        if not self.authenticated:
            # an unauthenticated peer gets room only for what it actually sends: a header
            # announcing megabytes must not make us allocate them; the buffer doubles, so a
            # large frame is not copied once per read
            want = have + HANDSHAKE_ROOM
            size = max(want, 2 * have)
        else:
            want = have + RECV_ROOM
            if have >= HEADER.size:
                length = HEADER.unpack_from(self._buf, self._pos)[3]
                if length <= MAX_PAYLOAD:      # a bigger one fails in next_event
                    # the whole frame and room beyond it, as a spare is sized: exactly the
                    # frame would be outgrown (and copied) once per read near its end
                    want = max(want, HEADER.size + length + RECV_ROOM)
            size = want
        if len(self._buf) - self._pos < want:
            self._rebuffer(size)
        return memoryview(self._buf)[self._end:]

    def missing(self) -> int:
        """How many more bytes the frame being received needs (at least 1): the receiver may
        sleep until that many have arrived (``SO_RCVLOWAT``) instead of waking per segment."""
        have = self._end - self._pos
        if have < HEADER.size:
            return HEADER.size - have
        length = HEADER.unpack_from(self._buf, self._pos)[3]
        return max(1, HEADER.size + min(length, MAX_PAYLOAD) - have)

    def received(self, n: int) -> None:
        """``n`` bytes were written into the view :meth:`receive_buffer` returned."""
        if not 0 <= n <= len(self._buf) - self._end:
            raise ValueError(f"received {n} bytes into a buffer of "
                             f"{len(self._buf) - self._end}")
        self._end += n

    def _rebuffer(self, size: int) -> None:
        """Move the unread bytes to the start of a buffer of at least ``size`` bytes."""
        old, have = self._buf, self._end - self._pos
        if size <= len(old):
            old[:have] = old[self._pos:self._end]        # compact in place
        else:
            self._buf = self._spare(size)
            self._buf[:have] = old[self._pos:self._end]
        self._pos, self._end = 0, have

    def _spare(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes: a large one handed out before whose payload
        nobody holds any more, or a new one (reuse spares the allocator and the page faults
        of a fresh megabyte per frame)."""
        spares = self._spares
        for i in range(len(spares)):
            # referenced only by the list (and getrefcount's argument): no view is alive
            if len(spares[i]) >= size and sys.getrefcount(spares[i]) == 2:
                return spares.pop(i)
        return bytearray(max(size, RECV_ROOM))

    def next_event(self) -> Event | None:
        """The next complete event, or None (NEED_DATA) until more bytes arrive.

        Handshake frames queue their answer: send :meth:`data_to_send` after each event.
        """
        if self.state == "ERROR":
            raise ProtocolError("connection already failed")
        pos = self._pos
        if self._end - pos < HEADER.size:
            return NEED_DATA
        magic, version, ftype, length = HEADER.unpack_from(self._buf, pos)
        if magic != MAGIC:
            self._fail("bad magic (not a fusemirror peer)")
        if version != VERSION:
            self._fail(f"protocol version {version} not supported (this side speaks {VERSION})")
        if length > MAX_PAYLOAD:
            self._fail(f"frame of {length} bytes exceeds the maximum {MAX_PAYLOAD}")
        if length > MAX_HANDSHAKE and not self.authenticated:
            # refused on the header: an unauthenticated peer must not make us hold megabytes
            # (the payload would otherwise be received before anything looks at it)
            self._fail(f"frame of {length} bytes before authentication (at most "
                       f"{MAX_HANDSHAKE})")
        if self._end - pos < HEADER.size + length:
            return NEED_DATA
        start = pos + HEADER.size
        stop = start + length
        payload: bytes | memoryview
        if length >= ZERO_COPY_MIN and ftype == T_WRITE:
            # hand the payload out as a view and never write this buffer again: what was
            # received after the frame moves to another buffer, and this one becomes a
            # spare once the payload is dropped
            payload = memoryview(self._buf)[start:stop]
            old, rest = self._buf, self._end - stop
            # room for another frame of this size: writes come in runs of one size, and a
            # frame that does not fit is copied (what arrived of it) into a bigger buffer
            self._buf = self._spare(max(RECV_ROOM + rest, HEADER.size + length + RECV_ROOM))
            self._buf[:rest] = old[stop:self._end]
            self._pos, self._end = 0, rest
            self._spares.append(old)
            del self._spares[:-SPARES]
        else:
            payload = bytes(memoryview(self._buf)[start:stop])
            self._pos = stop
            if stop == self._end:
                self._pos = self._end = 0
        try:
            return self._dispatch(ftype, payload)
        except ProtocolError:
            self.state = "ERROR"
            raise
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError,
                AttributeError, OverflowError, RecursionError) as e:
            self._fail(f"malformed frame type {ftype}: {e}")
        raise AssertionError("unreachable")

    def data_to_send(self) -> bytes:
        """Bytes the handshake wants sent to the peer (empty when there are none)."""
        out, self._out = bytes(self._out), bytearray()
        return out

    def _fail(self, why: str) -> None:
        self.state = "ERROR"
        raise ProtocolError(why)

    def _dispatch(self, ftype: int, p: bytes) -> Event:
        if self.role == "agent":
            return self._agent_frame(ftype, p)
        return self._master_frame(ftype, p)

    def _agent_frame(self, ftype: int, p: bytes) -> Event:
        if self.state == "AWAIT_HELLO":
            if ftype != T_HELLO:
                self._fail(f"frame type {ftype} before authentication")
            d = _unjson(p)
            if type(d.get("version")) is not int or d["version"] != VERSION:
                self._fail(f"protocol version {d.get('version')!r} not supported")
            unit, mirror, nonce = d["unit"], d["mirror"], bytes.fromhex(d["nonce"])
            if not isinstance(unit, str) or not valid_unit_name(unit):
                self._fail(f"bad unit name {unit!r}")
            if not isinstance(mirror, str) or len(mirror) > 256 or not mirror.isprintable():
                self._fail("bad mirror name")
            if len(nonce) != NONCE:
                self._fail("bad nonce")
            if hmac.compare_digest(nonce, self._nonce):
                self._fail("reflected challenge")
            self.unit, self.mirror, self._peer_nonce = unit, mirror, nonce
            self.state = "SENT_CHALLENGE"
            self._out += _frame(T_CHALLENGE, _json({"nonce": self._nonce.hex()}))
            return Hello(unit, mirror, nonce)
        if self.state == "SENT_CHALLENGE":
            if ftype != T_AUTH or len(p) != MAC:
                self._fail(f"frame type {ftype} before authentication")
            assert self.unit is not None and self.mirror is not None
            want = _mac(self._secret, b"master->agent", self.mirror, self.unit, self._nonce,
                        self._peer_nonce)
            if not hmac.compare_digest(p, want):
                self._fail("authentication failed (wrong secret)")
            self.state = "READY"
            self.authenticated = True
            self._out += _frame(T_AUTH_OK, _mac(self._secret, b"agent->master", self.mirror,
                                                   self.unit, self._peer_nonce, self._nonce))
            return Authenticated(self.unit, self.mirror)
        if self.state != "READY":
            self._fail(f"unexpected frame in state {self.state}")
        if ftype in (T_HELLO, T_AUTH, T_CHALLENGE, T_AUTH_OK):
            self._fail("repeated handshake frame")
        seq = _SEQ.unpack_from(p, 0)[0]
        if seq != self._recv_seq + 1:
            self._fail(f"request {seq} out of order (expected {self._recv_seq + 1})")
        self._recv_seq = seq
        if ftype == T_WRITE:
            return decode_write(p)
        if ftype == T_FLUSH:
            _exact(p, 8)
            return Flush(seq)
        if ftype == T_PING:
            _exact(p, 8)
            return Ping(seq)
        if ftype == T_REQUEST:
            d = _unjson(p[8:])
            if not isinstance(d.get("op"), str) or not isinstance(d.get("args", {}), dict):
                raise ValueError("bad request")
            return Request(seq, d["op"], d.get("args", {}))
        if ftype in (T_READ_DIGESTS, T_READ):
            _exact(p, _RANGE.size)
            _, off, length, bs = _RANGE.unpack(p)
            if length > MAX_DATA * (1 if ftype == T_READ else 64):
                raise ValueError("range too long")
            if ftype == T_READ:
                return Read(seq, off, length)
            if bs < 512 or bs & (bs - 1) or length // bs > (MAX_DATA // 8):
                raise ValueError("bad block size")
            return ReadDigests(seq, off, length, bs)
        self._fail(f"unknown frame type {ftype}")
        raise AssertionError

    def _master_frame(self, ftype: int, p: bytes) -> Event:
        if self.state == "SENT_HELLO":
            if ftype != T_CHALLENGE:
                self._fail(f"frame type {ftype} before authentication")
            nonce = bytes.fromhex(_unjson(p)["nonce"])
            if len(nonce) != NONCE:
                self._fail("bad nonce")
            if hmac.compare_digest(nonce, self._nonce):
                self._fail("reflected challenge")
            self._peer_nonce = nonce
            assert self.unit is not None and self.mirror is not None
            self.state = "SENT_AUTH"
            self._out += _frame(T_AUTH, _mac(self._secret, b"master->agent", self.mirror,
                                                self.unit, nonce, self._nonce))
            return Challenge(nonce)
        if self.state == "SENT_AUTH":
            if ftype != T_AUTH_OK or len(p) != MAC:
                self._fail("authentication refused by the agent")
            assert self.unit is not None and self.mirror is not None
            want = _mac(self._secret, b"agent->master", self.mirror, self.unit, self._nonce,
                        self._peer_nonce)
            if not hmac.compare_digest(p, want):
                self._fail("the agent failed to authenticate (wrong secret)")
            self.state = "READY"
            self.authenticated = True
            return Authenticated(self.unit, self.mirror)
        if self.state != "READY":
            self._fail(f"unexpected frame in state {self.state}")
        seq = _SEQ.unpack_from(p, 0)[0]
        if seq != self._recv_seq + 1 or seq > self._send_seq:
            self._fail(f"answer {seq} out of order (expected {self._recv_seq + 1})")
        self._recv_seq = seq
        if ftype == T_ACK:
            _exact(p, 8)
            return Ack(seq)
        if ftype == T_ERROR:
            _, err = _ERR.unpack_from(p, 0)
            return Error(seq, err, p[_ERR.size:].decode(errors="replace"))
        if ftype == T_DIGESTS:
            n = (len(p) - 8) // 8
            if (len(p) - 8) % 8:
                raise ValueError("ragged digests")
            return Digests(seq, list(struct.unpack_from(f">{n}Q", p, 8)))
        if ftype == T_DATA:
            return Data(seq, p[8:])
        if ftype == T_REPLY:
            return Reply(seq, _unjson(p[8:]))
        self._fail(f"unknown frame type {ftype}")
        raise AssertionError


# ---- encoding helpers -----------------------------------------------------------------------
def _frame(ftype: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the maximum")
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload)) + payload


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _unjson(p: bytes) -> dict[str, Any]:
    if len(p) > MAX_JSON:
        raise ValueError("JSON payload too large")
    d = json.loads(p.decode())
    if not isinstance(d, dict):
        raise ValueError("JSON payload is not an object")
    return d


def _exact(p: bytes, n: int) -> None:
    if len(p) != n:
        raise ValueError(f"payload of {len(p)} bytes, expected {n}")


def encode_write(ev: Write) -> bytes:
    head, data = encode_write_parts(ev)
    return head + data


def encode_write_parts(ev: Write) -> tuple[bytes, bytes]:
    """A WRITE frame as (header and digests, data), so the data is sent without a copy."""
    digests = block_digests(ev.data, ev.block_size)
    body = _WRITE.pack(ev.seq, ev.offset, ev.block_size, len(digests)) + \
        struct.pack(f">{len(digests)}Q", *digests)
    total = len(body) + len(ev.data)
    if total > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {total} bytes exceeds the maximum")
    return HEADER.pack(MAGIC, VERSION, T_WRITE, total) + body, ev.data


def decode_write(p: bytes) -> Write:
    seq, off, bs, n = _WRITE.unpack_from(p, 0)
    if bs < 512 or bs & (bs - 1) or bs > MAX_DATA:
        raise ValueError(f"bad block size {bs}")
    start = _WRITE.size + 8 * n
    data = memoryview(p)[start:]
    if not data or len(data) > MAX_DATA or n != -(-len(data) // bs):
        raise ValueError("digest count does not match the data")
    want = struct.unpack_from(f">{n}Q", p, _WRITE.size)
    got = block_digests(data, bs)
    for i, (a, b) in enumerate(zip(want, got)):
        if a != b:
            raise ProtocolError(f"block {i} of write {seq} at offset {off} fails its xxh3 "
                                "checksum")
    return Write(seq, off, data, bs)  # type: ignore[arg-type]  # a view, not a copy
