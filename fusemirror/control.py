"""The control channel: how admin commands reach a running daemon (or agent).

A UNIX socket ``DIR/control.sock`` that accepts one JSON request per connection and answers one
JSON reply: ``{"cmd": NAME, ...args}`` -> ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "exitcode": N}``. Only the unit's owner (mode 0600) can
connect. Paths longer than a socket address allows are reached through ``/proc/self/fd``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable

import trio

from .errors import EXIT_FAILURE, FusemirrorError, unwrap

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _sock_path(path: str) -> tuple[str, int | None]:
    """A path usable in a sockaddr_un (at most 107 bytes), and a dir fd to close afterwards."""
    if len(os.fsencode(path)) < 100:
        return path, None
    d, name = os.path.split(path)
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


async def serve(path: str, handler: Handler, *,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``path`` and answer requests with ``handler`` until cancelled."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sp, dfd = _sock_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        await sock.bind(sp)
    finally:
        os.umask(old)
        if dfd is not None:
            os.close(dfd)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handler)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        buf = b""
        try:
            with trio.fail_after(30):
                while b"\n" not in buf and len(buf) < MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    buf += chunk
            req = json.loads(buf.split(b"\n", 1)[0])
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("request is not an object with a cmd")
        except (ValueError, trio.TooSlowError, trio.BrokenResourceError) as e:
            log.warning("control: bad request: %s", e)
            return
        try:
            result = await handler(req)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception as raw:  # noqa: BLE001 - a failed command must not stop the daemon
            e = unwrap(raw)
            if isinstance(e, FusemirrorError):
                reply = {"ok": False, "error": e.msg, "exitcode": e.exitcode}
            elif isinstance(e, OSError):
                reply = {"ok": False, "error": f"{req['cmd']}: {e.strerror or e}",
                         "exitcode": EXIT_FAILURE}
            else:
                log.exception("control command %r failed", req["cmd"])
                reply = {"ok": False, "error": f"{req['cmd']} failed: {e!r} (a bug; see the "
                         "log)", "exitcode": EXIT_FAILURE}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class NotRunning(Exception):
    """Nobody answers on the control socket."""


def request(path: str, cmd: str, timeout: float = 60.0, **args: Any) -> Any:
    """Send one request to the daemon at ``path``; return its result or raise its error.

    Raises :class:`NotRunning` when no process listens there.
    """
    sp, dfd = _sock_path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sp)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(path) from None
        finally:
            if dfd is not None:
                os.close(dfd)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                raise FusemirrorError(f"the daemon did not answer {cmd!r} within "
                                      f"{timeout:.0f}s") from None
            if not chunk:
                raise FusemirrorError(f"the daemon closed the control connection during "
                                      f"{cmd!r}")
            buf += chunk
    finally:
        s.close()
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not reply.get("ok"):
        raise FusemirrorError(reply.get("error", "unknown error"),
                              int(reply.get("exitcode", EXIT_FAILURE)))
    return reply.get("result")
