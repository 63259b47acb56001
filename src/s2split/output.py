"""Writing result files: completely or not at all (numpy-free)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import S2Error


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file completely or not at all (temp file + rename)."""
    p = Path(path)
    if p.is_dir():
        raise S2Error(f"{p}: is a directory, cannot write a file there")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    except OSError as e:
        raise S2Error(f"{p}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, p)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise S2Error(f"{p}: cannot write ({e.strerror or e})") from None
        raise
