"""The tables ``s2split reproduce`` prints.

For each scenario x backing: the percentage of the syscall's estimated time
each variant saves against vanilla, per granule and averaged across granules
(how the patch series reported its results), and the same for work (entries
read, visitor calls), which is exact. Then, per cell, the one ``s2split
perf-test`` command that reproduces it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..arch import granule_name
from ..counts import Counts
from ..reproduce import BACKING_LABELS, SCENARIOS, Outcome, profile_option, \
    reproduce_command
from . import saving


def metric(outcome: Outcome, c: Counts, what: str) -> float:
    if what == "time":
        return outcome.profile.estimate_ns(c)
    if what == "reads":
        return float(c.entries_read())
    if what == "visits":
        return float(c.visitor_calls())
    raise ValueError(what)


def savings(outcome: Outcome, scenario: str, backing: str, variant: str,
            what: str) -> dict[int | str, float | None]:
    """% saved per granule and the mean over granules ('avg')."""
    out: dict[int | str, float | None] = {}
    for g in outcome.matrix.granules:
        base = metric(outcome, outcome.phase_counts(g, backing, scenario, "vanilla"), what)
        val = metric(outcome, outcome.phase_counts(g, backing, scenario, variant), what)
        out[g] = saving(base, val)
    vals = [v for v in out.values() if v is not None]
    out["avg"] = sum(vals) / len(vals) if vals else None
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def savings_table(outcome: Outcome, what: str) -> Table:
    m = outcome.matrix
    title = {"time": f"Estimated syscall time saved against vanilla (profile "
                     f"{outcome.profile.name}; estimates, not measurements)",
             "reads": "Entries read saved against vanilla (exact)",
             "visits": "Visitor calls saved against vanilla (exact)"}[what]
    t = Table(title=title, title_justify="left")
    t.add_column("scenario")
    t.add_column("backing")
    t.add_column("variant")
    for g in m.granules:
        t.add_column(granule_name(g), justify="right")
    t.add_column("avg", justify="right")
    for s in m.scenarios:
        for b in m.backings:
            for v in m.variants:
                if v == "vanilla":
                    continue
                row = savings(outcome, s, b, v, what)
                t.add_row(s, BACKING_LABELS[b], v, *(_fmt(row[g]) for g in m.granules),
                          _fmt(row["avg"]))
    return t


def vanilla_table(outcome: Outcome) -> Table:
    """The absolute numbers behind the percentages, for vanilla."""
    m = outcome.matrix
    t = Table(title="Vanilla, per cell: estimated syscall time and work", title_justify="left")
    for col in ("scenario", "backing", "granule"):
        t.add_column(col)
    for col in ("est. time", "entries read", "visitor calls", "TLBIs", "tables"):
        t.add_column(col, justify="right")
    for s in m.scenarios:
        for b in m.backings:
            for g in m.granules:
                c = outcome.phase_counts(g, b, s, "vanilla")
                t.add_row(s, BACKING_LABELS[b], granule_name(g),
                          f"{outcome.profile.estimate_ns(c) / 1e6:,.1f} ms",
                          f"{c.entries_read():,}", f"{c.visitor_calls():,}", f"{c.tlbi_calls():,}",
                          f"{c.total('page_taken'):,}")
    return t


def commands(outcome: Outcome) -> list[str]:
    m = outcome.matrix
    lines = []
    for s in m.scenarios:
        for b in m.backings:
            for g in m.granules:
                p = outcome.params[(g, b, s)]
                for v in m.variants:
                    lines.append(f"{s:6} {BACKING_LABELS[b]:13} {granule_name(g):>3} {v:26} "
                                 + reproduce_command(p, v, profile_option(outcome.profile)))
    return lines


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    m = outcome.matrix
    rows = []
    for s in m.scenarios:
        for b in m.backings:
            for v in m.variants:
                entry = {"scenario": s, "backing": b, "variant": v}
                for what in ("time", "reads", "visits"):
                    entry[f"{what}_saved_pct"] = {
                        granule_name(k) if isinstance(k, int) else k: val
                        for k, val in savings(outcome, s, b, v, what).items()}
                entry["commands"] = {granule_name(g): reproduce_command(
                    outcome.params[(g, b, s)], v, profile_option(outcome.profile))
                    for g in m.granules}
                rows.append(entry)
    return {"format": "s2split-reproduce/1", "profile": outcome.profile.name,
            "times_are": f"estimates under profile {outcome.profile.name}",
            "scenarios": SCENARIOS, "rows": rows,
            "cells": {"computed": outcome.ran, "found": outcome.skipped}}


def print_outcome(console: Console, outcome: Outcome) -> None:
    console.print(savings_table(outcome, "time"))
    console.print(savings_table(outcome, "reads"))
    console.print(savings_table(outcome, "visits"))
    console.print(vanilla_table(outcome))
    console.print("Each cell, reproduced exactly by:", highlight=False)
    for line in commands(outcome):
        console.print("  " + line, highlight=False, markup=False, soft_wrap=True)
