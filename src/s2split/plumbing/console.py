"""The terminal side of every command: the shared rich console, and how a
command ends -- its exit status, or one line on stderr and status 2.

Numpy-free, so the real-KVM harness (``python3 -m s2split.hw``) shares it;
rich is imported only when a console is made.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from typing import Any

from .errors import S2Error


def rich_console() -> Any:
    """The console the reports print on: no highlighting, no soft wrap, at
    least 100 columns wide (tables stay readable in a narrow or piped
    terminal)."""
    from rich.console import Console
    return Console(highlight=False, soft_wrap=False, width=max(100, _term_width()))


def _term_width() -> int:
    return shutil.get_terminal_size((160, 40)).columns


def note(line: str) -> None:
    """One line on stderr for someone watching a terminal, such as "this will
    take a while"; nothing when stderr is a pipe or a file (logs, scripts and
    captured output see only results and errors)."""
    try:
        if sys.stderr.isatty():
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def run_command(args: argparse.Namespace, name: str, before: Any = None) -> int:
    """Run a parsed command the way every s2split command ends: its status, or
    a one-line error and 2 (130 on Ctrl-C; 1 when standard output cannot be
    written: a full disk, a closed pipe)."""
    try:
        if before:
            before()
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except S2Error as e:
        return _say(f"s2split {name}: error: {e}", 2)
    except KeyboardInterrupt:
        return _say("s2split: interrupted", 130)
    except OSError as e:
        if not is_output_error(e):
            raise
        return output_failed(f"s2split {name}", e)


#: Exit statuses (README "Failure behaviour").
BAD_INPUT, OUTPUT_FAILED, INTERRUPTED = 2, 1, 130


def error_boundary(who: str, run: Any) -> int:
    """RUN() -- the whole command, argument parsing included -- with every
    failure that is not a bug in s2split turned into one line on stderr and
    the documented status: 2 for bad input and exhausted limits (memory,
    file descriptors, recursion depth, any other OSError), 1 for standard
    output that cannot be written, 130 for Ctrl-C. While it runs, SIGTERM
    and SIGHUP remove temporary output files, and no output may replace a
    file the command reads (:mod:`s2split.plumbing.output`)."""
    from .output import inputs_guarded, temporaries_removed_on_signals
    try:
        with temporaries_removed_on_signals(), inputs_guarded():
            return run()
    except KeyboardInterrupt:
        return _say("s2split: interrupted", INTERRUPTED)
    except S2Error as e:
        return _say(f"{who}: error: {e}", BAD_INPUT)
    except MemoryError:
        return _say(f"{who}: error: out of memory (a memory limit such as ulimit -v, or too "
                    "large a model for this machine)", BAD_INPUT)
    except RecursionError:
        return _say(f"{who}: error: nested too deeply (Python's recursion limit; a "
                    "visitor or input that recurses without end?)", BAD_INPUT)
    except OSError as e:
        if is_output_error(e):
            return output_failed(who, e)
        return _say(f"{who}: error: {describe_os_error(e)}", BAD_INPUT)
    except ImportError as e:
        # A module that cannot load for want of memory or descriptors
        # (ulimit -v / -n) is a limit, not a bug; anything else is a bug.
        limits = ("memory", "too many open files", "failed to map", "errno")
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if any(w in ln.lower() for w in limits)), None)
        if why is None:
            raise
        return _say(f"{who}: error: cannot load a module ({why[:200]}); a resource limit "
                    "(ulimit -v, ulimit -n)?", BAD_INPUT)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError nobody caught nearer: what failed, and for a
    resource limit the limit."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e) or type(e).__name__
    where = f"{e.filename}: " if e.filename is not None else ""
    if name in ("EMFILE", "ENFILE"):
        return f"{where}too many open files ({what}); raise the limit (ulimit -n)"
    if name == "ENOMEM":
        return f"{where}out of memory ({what})"
    if name in ("ENOSPC", "EDQUOT"):
        return f"{where}no space left to write ({what})"
    return f"{where}{what}"


#: errno values of a write to standard output that cannot succeed.
_OUTPUT_ERRNOS = {"EPIPE", "ENOSPC", "EIO", "EFBIG", "EDQUOT", "ECONNRESET"}


def is_output_error(e: OSError) -> bool:
    """Whether E is a write to standard output that cannot succeed (a closed
    pipe, a full or failing device) rather than a bug to show."""
    return isinstance(e, BrokenPipeError) or \
        errno.errorcode.get(e.errno or 0, "") in _OUTPUT_ERRNOS


def one_line(text: str) -> str:
    """TEXT with line breaks and other control characters written as escapes
    (``\\n``), so that a path holding a newline keeps an error on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _say(line: str, code: int) -> int:
    """Write one line to stderr; a broken stderr cannot change the status."""
    try:
        sys.stderr.write(one_line(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


def output_failed(who: str, e: OSError) -> int:
    """Standard output failed: one line on stderr, status 1. Whatever is still
    buffered goes to /dev/null (as the Python docs advise for EPIPE), so that
    the interpreter's exit does not fail on it again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    return _say(f"{who}: error: cannot write standard output ({e.strerror or e})", 1)


def flush_stdout(who: str) -> int | None:
    """Flush standard output: None when that worked (or stdout is closed),
    else the status :func:`output_failed` gives."""
    try:
        sys.stdout.flush()
    except OSError as e:
        if not is_output_error(e):
            raise
        return output_failed(who, e)
    except ValueError:  # closed
        pass
    return None
