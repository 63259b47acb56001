"""Numbers and size strings as the selftests parse them (``strtol`` with
base 0, ``parse_size``)."""

from __future__ import annotations

import re

from ..plumbing.errors import S2Error

#: What ``strtol(s, &end, 0)`` consumes whole: ``0x`` hexadecimal, a leading
#: ``0`` octal, else decimal (surrounding blanks allowed).
_STRTOL = re.compile(r"\s*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\s*")


def strtol(text: str) -> int:
    """An integer as the selftests read one (``atoi_paranoid``: ``strtol``
    with base 0, the whole string); ValueError otherwise."""
    m = _STRTOL.fullmatch(text)
    if not m:
        raise ValueError(text)
    body = m.group(1)
    base = 16 if body[:2].lower() == "0x" else 8 if len(body) > 1 and body[0] == "0" else 10
    value = int(body, base)
    return -value if text.strip().startswith("-") else value

_SHIFT = {"t": 40, "g": 30, "m": 20, "k": 10, "b": 0}


def parse_size(text: str, what: str = "size") -> int:
    """``[0-9]+[kmgtb]?`` with C base prefixes (``0x``, leading ``0``), like the
    selftests' ``parse_size``; characters after the suffix letter are ignored
    (``1GB`` is 1 GiB)."""
    s = str(text).strip()
    if not s or not s[0].isdigit():
        raise S2Error(f"{what} {text!r}: need at least one digit")
    i = 0
    if s[:2].lower() == "0x":
        i = 2
        while i < len(s) and s[i] in "0123456789abcdefABCDEF":
            i += 1
        digits, base = s[2:i], 16
    else:
        while i < len(s) and s[i].isdigit():
            i += 1
        digits = s[:i]
        base = 8 if len(digits) > 1 and digits.startswith("0") else 10
    try:
        value = int(digits, base)
    except ValueError:
        raise S2Error(f"{what} {text!r}: not a number") from None
    rest = s[i:]
    shift = 0
    if rest:
        letter = rest[0].lower()
        if letter not in _SHIFT:
            raise S2Error(f"{what} {text!r}: unknown size letter {rest[0]!r} (use k, m, g or t)")
        shift = _SHIFT[letter]
    return value << shift
