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
* **a missing parent directory**: an error; nothing is created;
* **a file the command reads** (the results database, a profile, a fixture,
  ...; the same device and inode, so a symbolic or hard link to it too): an
  error, before anything is written -- an output never replaces an input.
  The command line records its inputs (:func:`note_input`) while
  :func:`inputs_guarded` is active; library callers are not restricted.

A temporary file in flight is removed when SIGTERM or SIGHUP ends the
process (:func:`temporaries_removed_on_signals`), as when a write fails.

Standard library only: ``hw run --json`` uses it on a bare Python.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import S2Error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fail(path: str, e: OSError) -> S2Error:
    return S2Error(f"{path}: cannot write ({e.strerror or e})")


# -- inputs are never outputs -------------------------------------------------------

#: (st_dev, st_ino) -> the path as the user named it, of every regular file
#: the running command reads; None outside :func:`inputs_guarded`.
_INPUTS: dict[tuple[int, int], str] | None = None


def note_input(path: str | Path) -> None:
    """Record PATH (a file the command reads) so that no output replaces it."""
    if _INPUTS is None:
        return
    try:
        st = os.stat(path)
    except OSError:
        return  # nothing there yet (a database about to be created is noted after)
    if stat.S_ISREG(st.st_mode):
        _INPUTS.setdefault((st.st_dev, st.st_ino), str(path))


def refuse_input(path: str | Path, what: str = "") -> None:
    """Raise a one-line S2Error when PATH (followed through symbolic links)
    is a file the command reads."""
    if not _INPUTS:
        return
    try:
        st = os.stat(path)
    except OSError:
        return  # a new file: no input is there
    source = _INPUTS.get((st.st_dev, st.st_ino))
    if source is not None:
        same = "" if os.path.abspath(source) == os.path.abspath(path) else f" ({source})"
        raise S2Error(f"{what + ' ' if what else ''}{path}: is an input of this command"
                      f"{same}; refusing to write over it (name another file)")


@contextlib.contextmanager
def inputs_guarded() -> Iterator[None]:
    """While active, :func:`note_input` records inputs and :func:`write_atomic`
    refuses to write over them (one command of the command line)."""
    global _INPUTS
    old, _INPUTS = _INPUTS, {}
    try:
        yield
    finally:
        _INPUTS = old


# -- temporary files and signals --------------------------------------------------------

#: Temporary files being written now, removed if SIGTERM or SIGHUP ends us.
_TEMPORARIES: set[str] = set()
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _remove_temporaries() -> None:
    for tmp in list(_TEMPORARIES):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _TEMPORARIES.discard(tmp)


@contextlib.contextmanager
def temporaries_removed_on_signals() -> Iterator[None]:
    """Handle SIGTERM and SIGHUP by removing the temporary files in flight,
    then ending as the signal would have (the previous handler, or the
    default action: death by that signal). Child processes (workers, which
    write no outputs) and other threads see the default behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    me = os.getpid()
    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        if os.getpid() == me:
            _remove_temporaries()
        prev = previous.get(signum, signal.SIG_DFL)
        if callable(prev) and os.getpid() == me:
            prev(signum, frame)
            return
        if prev == signal.SIG_IGN:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for sig in _SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for sig, prev in previous.items():
            try:
                signal.signal(sig, prev)  # type: ignore[arg-type]
            except (OSError, ValueError, TypeError):
                pass


def _temporary(parent: Path, name: str) -> tuple[int, str]:
    """mkstemp beside the target, registered for removal on SIGTERM/SIGHUP
    (signals held back meanwhile, so that none falls between the two). A long
    NAME gets a short temporary name: a name of up to 255 bytes stays usable."""
    prefix = f".{name}." if len(os.fsencode(name)) <= 200 else ".s2split-output."
    masked = hasattr(signal, "pthread_sigmask") and \
        threading.current_thread() is threading.main_thread()
    if masked:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(_SIGNALS))
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
        _TEMPORARIES.add(tmp)
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return fd, tmp


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
    refuse_input(path)
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
        fd, tmp = _temporary(parent, target.name)
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
        _TEMPORARIES.discard(tmp)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _TEMPORARIES.discard(tmp)
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
