"""Registration of the larger subcommands (reproduce, explain, store, calibrate, hw)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands that live in their own modules."""
