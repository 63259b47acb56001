"""The report's section on the first split and the steady state
(:mod:`s2split.tasks.per_iteration`): why the clear scenario's total depends on
``--iterations``, per cell and variant."""

from __future__ import annotations

from typing import Any

from ..arm64.arch import granule_name
from .document import Column, Para, Section, Table


def _rows(data: Any, twins: bool = True):
    """``twins``: also variants doing exactly the work of one before them."""
    from ..tasks.explain import same_work
    from ..tasks.per_iteration import split_parts, steady_repeats
    o, m = data.outcome, data.matrix
    for s in m.scenarios:
        for b in m.backings:
            for g in m.granules:
                base = o.cells[(g, b, s, "vanilla")]
                shown: list[str] = []
                for v in m.variants:
                    if v == "vanilla":
                        continue
                    if not twins and any(same_work(o.phase_counts(g, b, s, v),
                                                   o.phase_counts(g, b, s, e)) for e in shown):
                        continue
                    shown.append(v)
                    parts = split_parts(o.profile, s, m.iterations, base, o.cells[(g, b, s, v)])
                    repeats = steady_repeats(base, o.cells[(g, b, s, v)], parts[-1].phases) \
                        if s == "clear" else None
                    yield (g, b, s), v, parts, repeats


def iterations_section(data: Any) -> Section:
    from ..estimate.intervals import fmt_interval
    from ..tasks.per_iteration import sentence
    from ..tasks.reproduce import BACKING_LABELS
    m, p = data.matrix, data.profile
    sec = Section("First split and steady state", [Para(
        f"The clear scenario times all {m.iterations} KVM_CLEAR_DIRTY_LOG calls (--iterations "
        f"{m.iterations}): the first one splits every huge page, the later ones only walk "
        "the split tables, and a variant saves a different share of each, so the total "
        "saving depends on --iterations. Per cell: each part's vanilla time, its own saving "
        "(in brackets its exact range over the cost ranges) and its points of the total "
        "(the points add up to the total saving). Enabling dirty logging is one ioctl; it "
        f"does not depend on --iterations. Estimates under profile {p.name}, not "
        "measurements. A variant doing exactly the work of one listed before it is "
        "left out.")])
    t = Table([Column("cell", wrap=22), Column("variant", wrap=14), Column("part", wrap=12),
               Column("vanilla\nest.", right=True), Column("own\nsaving", right=True),
               Column("points", right=True)], [])
    for (g, b, s), v, parts, _ in _rows(data, twins=False):
        for i, part in enumerate(parts):
            own = "n/a" if part.own is None else fmt_interval(
                part.own.point, part.own.low, part.own.high).replace(" (", "\n(")
            t.rows.append([f"{s}, {BACKING_LABELS[b]}, {granule_name(g)}" if i == 0 else "",
                           v if i == 0 else "",
                           f"{part.name} (x{part.calls})" if part.calls > 1 else part.name,
                           f"{part.vanilla_ns / 1e6:,.2f} ms", own, f"{part.points:.1f}"])
    sec.blocks.append(t)
    seen = set()
    for (g, b, s), v, parts, repeats in _rows(data, twins=False):
        if s != "clear" or (g, b, s) in seen:
            continue
        seen.add((g, b, s))
        sec.blocks.append(Para(f"{s}, {BACKING_LABELS[b]}, {granule_name(g)}, {v}: " +
                               sentence(s, m.iterations, parts, p.name, repeats)))
    return sec


def iterations_json(data: Any) -> list[dict[str, Any]]:
    out = []
    for (g, b, s), v, parts, repeats in _rows(data):
        out.append({"scenario": s, "backing": b, "granule": granule_name(g), "variant": v,
                    "iterations": data.matrix.iterations,
                    "steady_state_repeats": repeats,
                    "parts": [{"part": p.name, "phases": list(p.phases),
                               "vanilla_est_ns": p.vanilla_ns, "variant_est_ns": p.variant_ns,
                               "points_of_total": p.points,
                               "own_saved_pct": p.own.point if p.own else None,
                               "own_saved_pct_low": p.own.low if p.own else None,
                               "own_saved_pct_high": p.own.high if p.own else None}
                              for p in parts]})
    return out
