"""The terminal side of every command: the shared rich console, and how a
command ends -- its exit status, or one line on stderr and status 2.

Numpy-free, so the real-KVM harness (``python3 -m s2split.hw``) shares it;
rich is imported only when a console is made.
"""

from __future__ import annotations

import argparse
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


def run_command(args: argparse.Namespace, name: str, before: Any = None) -> int:
    """Run a parsed command the way every s2split command ends: its status, or
    a one-line error and 2 (130 on Ctrl-C)."""
    try:
        if before:
            before()
        return int(args.func(args) or 0)
    except S2Error as e:
        sys.stderr.write(f"s2split {name}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("s2split: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
