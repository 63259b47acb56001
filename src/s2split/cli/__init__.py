"""The command line: :mod:`.parser` builds ``s2split``'s argument parser and
runs one subcommand inside the error boundary; :mod:`.commands` holds the
subcommands that need more than a few lines. The ``hw`` subcommands are the
harness's own (:mod:`s2split.hw.cli`), so that it runs without numpy."""

from .parser import main

__all__ = ["main"]
