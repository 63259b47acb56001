"""Writing output files (``-o``, ``--json FILE``, plots, fitted profiles).

:func:`write_atomic` is the one writer. What it does at each kind of target:

* **a regular file, or nothing yet**: the data goes to a temporary file with
  a unique name (``mkstemp``) in the same directory, is flushed to disk, and
  is renamed over the target. Readers see the old file or the new one, never
  a part; two concurrent writers never share a temporary file; a failed
  write (full disk, a signal) removes its temporary file. The new file gets
  the mode (and, where permitted, the owner) of the file it replaces, or
  ``0666`` less the umask when it is new, as ``open()`` would give it;
* **a symbolic link**: followed; its target is written as above and the
  link stays a link;
* **a character device or a FIFO** (``/dev/stdout``, ``/dev/null``, a named
  pipe read by another program): written directly, in place, never
  replaced -- s2split must never turn a device node into a file;
* **a block device, a socket, a directory**: refused;
* **a missing parent directory**: an error; nothing is created.

Standard library only: ``hw run --json`` uses it on a bare Python.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import S2Error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fail(path: str, e: OSError) -> S2Error:
    return S2Error(f"{path}: cannot write ({e.strerror or e})")


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write DATA to PATH completely or not at all (see the module docstring)."""
    shown = str(path)
    payload = data.encode() if isinstance(data, str) else bytes(data)
    target = Path(os.path.realpath(path))  # follows every symlink, dangling ones too
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(shown, e) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise S2Error(f"{shown}: is a directory, cannot write a file there")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            _write_in_place(shown, target, payload)
            return
        kind = "a block device" if stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise S2Error(f"{shown}: is {kind}; refusing to write there")
    parent = target.parent
    if not parent.is_dir():
        raise S2Error(f"{shown}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise _fail(shown, e) from None
    try:
        try:
            if st is not None:
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    except PermissionError:
                        pass  # not ours to give away: the writer keeps it
            else:
                os.fchmod(fd, 0o666 & ~_umask())
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _fail(shown, e) from None
        raise


def _write_in_place(shown: str, target: Path, payload: bytes) -> None:
    """A device or FIFO: opened for writing as it is (no O_CREAT, no rename)."""
    try:
        fd = os.open(target, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _fail(shown, e) from None
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise _fail(shown, e) from None
    finally:
        os.close(fd)
