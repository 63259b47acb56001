"""The tables ``s2split reproduce`` prints.

For each scenario x backing: the percentage of the syscall's estimated time
each variant saves against vanilla, per granule and averaged across granules
(how the patch series reported its results), and the same for work (entries
read, visitor calls), which is exact. Then, per cell, the one ``s2split
perf-test`` command that reproduces it.

Every estimated saving carries its exact range over the profile's cost ranges
(:mod:`s2split.estimate.intervals`): ``15.1% (9.8-22.4)``.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..arm64.arch import granule_name
from ..counting.counts import Counts
from ..counting.kernel_counters import tlbi_instructions
from ..estimate.intervals import (Interval, MeanInterval, fmt_interval, mean_interval,
                                  saving_interval)
from ..tasks.reproduce import BACKING_LABELS, SCENARIOS, Outcome, profile_option, \
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


def time_intervals(outcome: Outcome, scenario: str, backing: str, variant: str
                   ) -> dict[int | str, "Interval | MeanInterval | None"]:
    """The estimated time saved per granule with its exact interval over the
    profile's cost ranges, and ('avg') their mean with the mean of the
    extremes (see :func:`s2split.estimate.intervals.mean_interval`). Computed once per
    outcome and row: the tables and the JSON ask again."""
    memo = outcome.__dict__.setdefault("_time_intervals", {})
    key = (scenario, backing, variant, outcome.profile.name, outcome.matrix.granules)
    if key not in memo:
        memo[key] = _time_intervals(outcome, scenario, backing, variant)
    return memo[key]


def _time_intervals(outcome: Outcome, scenario: str, backing: str, variant: str
                    ) -> dict[int | str, "Interval | MeanInterval | None"]:
    p = outcome.profile
    out: dict[int | str, Interval | MeanInterval | None] = {}
    parts, forms = [], []
    for g in outcome.matrix.granules:
        base = outcome.phase_counts(g, backing, scenario, "vanilla")
        val = outcome.phase_counts(g, backing, scenario, variant)
        iv = saving_interval(p, base, val)
        out[g] = iv
        if iv is not None:
            parts.append(iv)
            forms.append((p.coefficients(base), p.coefficients(val)))
    out["avg"] = mean_interval(parts, forms)
    return out


#: What ``avg``'s interval is, as reproduce --json and the report say it.
AVG_EXACT = "exact: one vertex of the cost box gives every granule its extreme, so the " \
    "mean of the granules' extremes is the mean's own"
AVG_OUTER = "outer bound: the mean of each granule's exact extremes; a mean of ratios is " \
    "not linear-fractional, and the mean's own extremes lie within this"


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def _fmt_iv(iv: "Interval | MeanInterval | None") -> str:
    return "n/a" if iv is None else fmt_interval(iv.point, iv.low, iv.high)


def savings_table(outcome: Outcome, what: str) -> Table:
    m = outcome.matrix
    title = {"time": f"Estimated syscall time saved against vanilla (profile "
                     f"{outcome.profile.name}; estimates, not measurements; in brackets the "
                     "exact range over the profile's cost ranges)",
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
                if what == "time":
                    ivs = time_intervals(outcome, s, b, v)
                    t.add_row(s, BACKING_LABELS[b], v, *(_fmt_iv(ivs[g]) for g in m.granules),
                              _fmt_iv(ivs["avg"]) + ("" if _avg_exact(ivs) else "*"))
                    continue
                row = savings(outcome, s, b, v, what)
                t.add_row(s, BACKING_LABELS[b], v, *(_fmt(row[g]) for g in m.granules),
                          _fmt(row["avg"]))
    return t


def _avg_exact(ivs: dict) -> bool:
    avg = ivs["avg"]
    return avg is None or avg.exact or avg.high - avg.low == 0


def vanilla_table(outcome: Outcome) -> Table:
    """The absolute numbers behind the percentages, for vanilla."""
    m = outcome.matrix
    t = Table(title=f"Vanilla, per cell: estimated syscall time (profile {outcome.profile.name}; "
              "an estimate) and work (exact; TLBI instr.: the TLBI instructions the calls "
              "issue, stage 2 and stage 1)", title_justify="left")
    for col in ("scenario", "backing", "granule"):
        t.add_column(col)
    for col in ("est. time", "entries read", "visitor calls", "TLBI calls", "TLBI instr.",
                "tables"):
        t.add_column(col, justify="right")
    for s in m.scenarios:
        for b in m.backings:
            for g in m.granules:
                c = outcome.phase_counts(g, b, s, "vanilla")
                t.add_row(s, BACKING_LABELS[b], granule_name(g),
                          f"{outcome.profile.estimate_ns(c) / 1e6:,.1f} ms",
                          f"{c.entries_read():,}", f"{c.visitor_calls():,}", f"{c.tlbi_calls():,}",
                          f"{sum(tlbi_instructions(c).values()):,}", f"{c.total('page_taken'):,}")
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
                ivs = time_intervals(outcome, s, b, v)
                for end in ("low", "high"):
                    entry[f"time_saved_pct_{end}"] = {
                        granule_name(k) if isinstance(k, int) else k:
                        None if iv is None else getattr(iv, end) for k, iv in ivs.items()}
                entry["time_saved_pct_avg_interval"] = AVG_EXACT if _avg_exact(ivs) \
                    else AVG_OUTER
                entry["time_saved_by_part"] = parts_json(outcome, s, b, v)
                entry["commands"] = {granule_name(g): reproduce_command(
                    outcome.params[(g, b, s)], v, profile_option(outcome.profile))
                    for g in m.granules}
                rows.append(entry)
    return {"format": "s2split-reproduce/1", "profile": outcome.profile.name,
            "times_are": f"estimates under profile {outcome.profile.name}",
            "measured": "nothing: counts are exact, times are estimates (only 's2split hw' "
                        "measures times)",
            "intervals_are": "time_saved_pct_low/high: the exact minimum and maximum of the "
                             "saving over the box of the profile's cost ranges (ranges_ns; a "
                             "cost without a range is exact), by linear-fractional "
                             "programming",
            "iterations": m.iterations,
            "scenarios": SCENARIOS, "rows": rows,
            "cells": {"computed": outcome.ran, "found": outcome.skipped}}


def parts_json(outcome: Outcome, s: str, b: str, v: str) -> dict[str, list[dict[str, Any]]]:
    """Per granule: the first split and the steady state (:mod:`s2split.tasks.per_iteration`)."""
    from ..tasks.per_iteration import split_parts
    out = {}
    for g in outcome.matrix.granules:
        parts = split_parts(outcome.profile, s, outcome.matrix.iterations,
                            outcome.cells[(g, b, s, "vanilla")], outcome.cells[(g, b, s, v)])
        out[granule_name(g)] = [{
            "part": p.name, "phases": list(p.phases), "vanilla_est_ns": p.vanilla_ns,
            "variant_est_ns": p.variant_ns, "points_of_total": p.points,
            "own_saved_pct": p.own.point if p.own else None,
            "own_saved_pct_low": p.own.low if p.own else None,
            "own_saved_pct_high": p.own.high if p.own else None} for p in parts]
    return out


def parts_table(outcome: Outcome) -> Table:
    """First split and steady state, per cell: where the total's dependence
    on ``--iterations`` comes from."""
    from ..tasks.per_iteration import split_parts
    m = outcome.matrix
    t = Table(title=f"Per syscall, first split and steady state ({m.iterations} iterations; "
              f"estimates under profile {outcome.profile.name}): the part's own saving, and "
              "its points of the total; a variant doing the work of one above is left out",
              title_justify="left")
    for col in ("scenario", "backing", "variant", "granule", "part", "calls"):
        t.add_column(col)
    for col in ("vanilla est.", "own saving", "points"):
        t.add_column(col, justify="right")
    from ..tasks.explain import same_work
    for s in m.scenarios:
        for b in m.backings:
            shown: list[str] = []
            for v in m.variants:
                if v == "vanilla" or any(all(same_work(outcome.phase_counts(g, b, s, v),
                                                       outcome.phase_counts(g, b, s, e))
                                             for g in m.granules) for e in shown):
                    continue
                shown.append(v)
                for g in m.granules:
                    for p in split_parts(outcome.profile, s, m.iterations,
                                         outcome.cells[(g, b, s, "vanilla")],
                                         outcome.cells[(g, b, s, v)]):
                        t.add_row(s, BACKING_LABELS[b], v, granule_name(g), p.name,
                                  str(p.calls), f"{p.vanilla_ns / 1e6:,.1f} ms",
                                  _fmt_iv(p.own), f"{p.points:.1f}")
    return t


def print_outcome(console: Console, outcome: Outcome) -> None:
    console.print(savings_table(outcome, "time"))
    if any(not _avg_exact(time_intervals(outcome, s, b, v)) for s in outcome.matrix.scenarios
           for b in outcome.matrix.backings for v in outcome.matrix.variants if v != "vanilla"):
        console.print("* avg: " + AVG_OUTER + ".", highlight=False)
    if "clear" in outcome.matrix.scenarios:
        console.print(parts_table(outcome))
        console.print(f"The clear scenario's total depends on --iterations (here "
                      f"{outcome.matrix.iterations}): the first KVM_CLEAR_DIRTY_LOG splits, "
                      "the later ones only walk the split tables.", highlight=False)
    console.print(savings_table(outcome, "reads"))
    console.print(savings_table(outcome, "visits"))
    console.print(vanilla_table(outcome))
    console.print("Each cell, reproduced exactly by:", highlight=False)
    for line in commands(outcome):
        console.print("  " + line, highlight=False, markup=False, soft_wrap=True)
