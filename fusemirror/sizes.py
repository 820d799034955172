"""Parsing and printing of sizes with binary suffixes (``4K``, ``512M``, ``1T``)."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """Return the number of bytes that ``text`` names; suffixes are powers of 1024.

    Accepts ``4096``, ``4K``, ``4k``, ``4KiB``, ``4KB`` (all 4096). Anything else raises
    :class:`UsageError` naming the accepted forms.
    """
    if isinstance(text, int):
        return text
    m = _RE.match(text)
    if not m:
        raise UsageError(
            f"bad {what} {text!r}: use a number of bytes with an optional suffix "
            "K, M, G, T or P (powers of 1024), e.g. 4K, 512M, 1T"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    """Print ``n`` bytes exactly when it is a whole number of a binary unit, else with one decimal."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if n >= unit:
            if n % unit == 0:
                return f"{n // unit}{suffix}iB"
            return f"{n / unit:.1f}{suffix}iB"
    return f"{n}B"
