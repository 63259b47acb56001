"""What ``s2split perf-test`` prints: the selftest's lines (estimated times)
and per-phase work tables per variant, with savings against ``vanilla``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..arm64.arch import size_name
from ..arm64.versions import kernel_rules
from ..counting.counts import Counts
from ..counting.kernel_counters import kernel_counts
from ..estimate.cost import Profile, format_seconds
from ..selftest.phases import upstream_label
from ..workload import RunResult
from . import saving

def phase_line_label(phase: str) -> str | None:
    """The selftest's line for a phase, or None (create/destroy are not printed)."""
    label = upstream_label(phase)
    return None if label is None else f"{label} time"


def upstream_lines(res: RunResult, profile: Profile) -> list[str]:
    """The selftest's output with each time replaced by an estimate (and marked)."""
    mark = f"  [estimate: {profile.name}]"
    out = []
    # Totals sum the printed (whole-nanosecond) times and averages truncate,
    # as the selftest's timespec arithmetic does, so the lines add up.
    get_total = clear_total = 0
    for name, c in res.phases:
        label = phase_line_label(name)
        if label is None:
            continue
        ns = round(profile.estimate_ns(c))
        if name.endswith("get_dirty_log"):
            get_total += ns
        elif name.endswith("clear_dirty_log"):
            clear_total += ns
        out.append(f"{label}: {format_seconds(ns)}{mark}")
        if name == "enable_dirty_logging":
            out.append("")
    it = res.params.iterations
    out.append(f"Get dirty log over {it} iterations took {format_seconds(get_total)}. "
               f"(Avg {format_seconds(get_total // it)}/iteration){mark}")
    if res.params.manual_protect:
        out.append(f"Clear dirty log over {it} iterations took {format_seconds(clear_total)}. "
                   f"(Avg {format_seconds(clear_total // it)}/iteration){mark}")
    return out


def header_lines(res: RunResult) -> list[str]:
    p = res.params
    lay = res.layout
    return [
        f"Test iterations: {p.iterations}",
        f"Testing guest mode: {p.mode.string}",
        f"Random seed: {p.seed:#x}" + ("" if p.seed_synced else
                                       "  (the guest sees 0: vCPU k is seeded with k, as upstream)"),
        f"guest physical test memory: [{lay.gpa:#x}, {lay.gpa + lay.size:#x})",
        *([f"Host kernel pages: {size_name(p.granule)} (the stage-2 granule; the guest "
           f"writes one word per {size_name(p.guest_page_size)} page)"]
          if p.host_page_size else []),
        f"Backing: {p.backing_type().describe()}, {p.slots} memslot(s), {p.vcpus} vCPU(s), "
        f"eager-split chunk {size_name(p.chunk_size) if p.chunk_size else '0 (off)'}, "
        f"{'manual-protect + initially-set' if p.manual_protect else 'no manual-protect (-g)'}",
        f"Modelled kernel: Linux {p.kernel}"
        + (f", selftest of Linux {p.selftest}" if p.selftest else ""),
    ]


def _levels(res: RunResult) -> list[int]:
    g = res.params.geometry()
    return list(range(g.start_level, 4))


def work_row(c: Counts, levels: list[int], profile: Profile) -> list[str]:
    reads = {lv: c.by_level(None, "read_table").get(lv, 0) + c.by_level(None, "read_leaf").get(lv, 0)
             + c.by_level(None, "read_invalid").get(lv, 0) for lv in levels}
    return [f"{c.total('walks'):,}", *(f"{reads[lv]:,}" for lv in levels),
            f"{c.visitor_calls():,}", f"{c.total('pte_write') + c.total('pte_cas'):,}",
            f"{c.tlbi_calls():,}", f"{c.total('page_taken'):,}", f"{c.get('kvm', 'lock_drops'):,}",
            f"{c.get('kvm', 'aborts'):,}", format_seconds(profile.estimate_ns(c))]


def work_table(res: RunResult, profile: Profile) -> Table:
    levels = _levels(res)
    t = Table(title=f"Work per phase -- variant {res.variant} ({res.engine} engine)",
              title_justify="left")
    t.add_column("phase")
    for col in ["walks", *(f"read L{lv}" for lv in levels), "visits", "PTE writes", "TLBIs",
                "tables", "lock drops", "aborts", f"est. time ({profile.name})"]:
        t.add_column(col, justify="right")
    for name, c in res.phases:
        t.add_row(name, *work_row(c, levels, profile))
    return t


def pct(base: float, value: float) -> str:
    if base == 0:
        return "0.0%" if value == 0 else "n/a"
    return f"{saving(base, value):.1f}%"


def savings_table(results: list[RunResult], profile: Profile) -> Table | None:
    base = next((r for r in results if r.variant == "vanilla"), None)
    if base is None or len(results) < 2:
        return None
    t = Table(title="Saved against vanilla (time: estimate under profile "
              f"{profile.name}; work: exact)", title_justify="left")
    t.add_column("phase")
    others = [r for r in results if r is not base]
    for r in others:
        t.add_column(f"{r.variant}\ntime", justify="right")
        t.add_column("reads", justify="right")
        t.add_column("visits", justify="right")
    for name, c0 in base.phases:
        row = [name]
        for r in others:
            c = r.phase(name)
            row += [pct(profile.estimate_ns(c0), profile.estimate_ns(c)),
                    pct(c0.entries_read(), c.entries_read()),
                    pct(c0.visitor_calls(), c.visitor_calls())]
        t.add_row(*row)
    return t


def result_json(results: list[RunResult], profile: Profile) -> dict[str, Any]:
    first = results[0]
    return {
        "format": "s2split-perf-test/1",
        "params": first.params.to_dict(),
        "layout": {"gpa": first.layout.gpa, "size": first.layout.size,
                   "slots": [list(s) for s in first.layout.slots],
                   "vcpus": [list(v) for v in first.layout.vcpus]},
        "profile": profile.name,
        "times_are": f"estimates under profile {profile.name}, not measurements",
        "variants": {
            r.variant: {
                "engine": r.engine,
                "phases": [{"phase": n, "estimate_ns": profile.estimate_ns(c),
                            "counts": c.to_dict(),
                            "kernel": kernel_counts(c, kernel_rules(r.params.kernel))}
                           for n, c in r.phases],
            } for r in results
        },
    }


def print_perf_test(console: Console, results: list[RunResult], profile: Profile) -> None:
    for line in header_lines(results[0]):
        console.print(line, highlight=False, markup=False)
    console.print(f"# Times are estimates under profile '{profile.name}' "
                  "(s2split cost model), not measurements.", highlight=False, markup=False)
    for r in results:
        console.print(f"\n== variant {r.variant}", highlight=False, markup=False)
        for line in upstream_lines(r, profile):
            console.print(line, highlight=False, markup=False)
    console.print()
    for r in results:
        console.print(work_table(r, profile))
    st = savings_table(results, profile)
    if st is not None:
        console.print(st)
