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


#: errno values of a write to standard output that cannot succeed.
_OUTPUT_ERRNOS = {"EPIPE", "ENOSPC", "EIO", "EFBIG", "EDQUOT", "ECONNRESET"}


def is_output_error(e: OSError) -> bool:
    """Whether E is a write to standard output that cannot succeed (a closed
    pipe, a full or failing device) rather than a bug to show."""
    return isinstance(e, BrokenPipeError) or \
        errno.errorcode.get(e.errno or 0, "") in _OUTPUT_ERRNOS


def _say(line: str, code: int) -> int:
    """Write one line to stderr; a broken stderr cannot change the status."""
    try:
        sys.stderr.write(line + "\n")
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
