#!/usr/bin/env python3
"""Write a Linux initramfs (cpio "newc") from a directory, without root.

Usage: mkcpio.py OUTPUT DIR [--console]

Files, directories and symlinks are stored with uid/gid 0 and their modes;
``--console`` adds the character device ``/dev/console`` (5, 1), which the
kernel opens for init's standard streams (no mknod needed). Entries are
sorted, and mtimes are 0, so the same tree gives the same bytes.
"""

from __future__ import annotations

import os
import stat
import sys


def _entry(out, ino: int, name: str, mode: int, data: bytes = b"", rdev=(0, 0),
           nlink: int = 1) -> None:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(namez)
    out.write(b"\0" * ((-(110 + len(namez))) % 4))
    out.write(data)
    out.write(b"\0" * ((-len(data)) % 4))


def write_cpio(output: str, root: str, console: bool = False) -> None:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in dirnames + sorted(filenames):
            paths.append(os.path.join(dirpath, n))
    ino = 1
    with open(output, "wb") as out:
        seen_dev = False
        for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if rel == "dev":
                seen_dev = True
            if stat.S_ISLNK(st.st_mode):
                _entry(out, ino, rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                _entry(out, ino, rel, stat.S_IFDIR | (st.st_mode & 0o7777), nlink=2)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    _entry(out, ino, rel, stat.S_IFREG | (st.st_mode & 0o7777), f.read())
            ino += 1
        if console:
            if not seen_dev:
                _entry(out, ino, "dev", stat.S_IFDIR | 0o755, nlink=2)
                ino += 1
            _entry(out, ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
            ino += 1
        _entry(out, 0, "TRAILER!!!", 0)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: mkcpio.py OUTPUT DIR [--console]")
    write_cpio(sys.argv[1], sys.argv[2], "--console" in sys.argv[3:])
