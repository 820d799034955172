"""The one error type for user-facing failures, and the exit codes it carries.

Commands raise :class:`FusemirrorError` with a one-line message; the CLI prints it on stderr
without a traceback and exits with its code. Exit codes (documented in ``fusemirror --help``):

====  ==========================================================================
0     success
1     the operation failed (I/O error, peer refused, bad on-disk data)
2     usage error (bad option, bad value, unknown key)
3     refused in the current state (the message names the state and the remedy)
4     the unit is busy (another process holds its lock, or the image is open)
5     the unit needs recovery: run ``fsck.fusemirror DIR``
====  ==========================================================================

``fsck.fusemirror`` uses the fsck(8) codes instead (see :mod:`fusemirror.fsck`).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_BUSY = 4
EXIT_RECOVERY = 5


class FusemirrorError(Exception):
    """A failure to report to the user as one line, with an exit code (S3QL's QuietError)."""

    def __init__(self, msg: str, exitcode: int = EXIT_FAILURE) -> None:
        super().__init__(msg)
        self.msg = msg
        self.exitcode = exitcode

    def __str__(self) -> str:
        return self.msg


class UsageError(FusemirrorError):
    """Bad input from the user: an option, a size, a key or a value."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_USAGE)


class StateError(FusemirrorError):
    """An operation refused in the current state; the message says which state and what to do."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_STATE)


class BusyError(FusemirrorError):
    """The unit is held by another process, or the image is still open."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_BUSY)


class NeedsRecoveryError(FusemirrorError):
    """The unit was not stopped cleanly and must be recovered before use."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, EXIT_RECOVERY)


class CorruptError(FusemirrorError):
    """On-disk metadata (journal, mirror database) failed validation."""


# A refusal answered over the protocol carries its exit code in the answer's error number,
# above every real errno, so that `fusemirror promote HOST:PORT/NAME` exits as the same refusal
# on the local unit would, and a real OS error the agent met (EPERM, EBUSY...) stays exit 1.
REFUSAL_ERRNO_BASE = 0x10000


def errno_for(e: FusemirrorError) -> int:
    """The error number an agent answers a refusal with (see exit_for_errno)."""
    return REFUSAL_ERRNO_BASE + e.exitcode


def exit_for_errno(n: int | None) -> int:
    """The exit code of an answer with error number ``n``: a refusal's own, else 1."""
    if n is not None and REFUSAL_ERRNO_BASE < n <= REFUSAL_ERRNO_BASE + 255:
        return n - REFUSAL_ERRNO_BASE
    return EXIT_FAILURE


def unwrap(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups, as trio nurseries wrap them; the
    group itself when it holds several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
