"""``s2split report`` sized for a cover letter, and ``--full`` with the appendix.

The default text report is what a patch series' cover letter carries: the
setup in a few lines, the savings table (each saving with its exact range
over the profile's cost ranges, and the measured saving under it when there
are measurements), where the gains are, the measurement plan's summary and
the one command that reproduces the report -- about 80 lines for the default
matrix, at most 80 columns. Variants that do the same work as another in
every cell are printed once, with the reason. ``--full`` appends the whole
report of :mod:`.mail` (every cell's invocations, the per-operation
breakdown, sensitivity, first split and steady state) as the appendix.
"""

from __future__ import annotations

from typing import Any

from ..arm64.arch import granule_name, size_name
from .document import Bullets, Code, Column, Document, Para, Section, Table
from .mail import ReportData, _label, build_document, gains_sentences, report_command


def twins(data: ReportData) -> dict[str, tuple[str, str]]:
    """Variant -> (the earlier variant whose work it does in every cell, why)."""
    from ..tasks.explain import same_work
    o, m = data.outcome, data.matrix
    cells = data.cells()
    out: dict[str, tuple[str, str]] = {}
    told: list[str] = []
    for v in m.variants:
        if v == "vanilla":
            continue
        twin = next((e for e in told if all(same_work(o.phase_counts(*c, v),
                                                      o.phase_counts(*c, e)) for c in cells)),
                    None)
        if twin is None:
            told.append(v)
            continue
        out[v] = (twin, _why_same(data, v, twin))
    return out


def _why_same(data: ReportData, v: str, twin: str) -> str:
    """Why ``v`` does ``twin``'s work: which of its skips never applies, or
    that it skips the same tables for another reason."""
    o = data.outcome
    kinds = ("skip_level", "skip_children", "skip_siblings")
    own = {k: sum(o.phase_counts(*c, v).total(k) for c in data.cells()) for k in kinds}
    other = {k: sum(o.phase_counts(*c, twin).total(k) for c in data.cells()) for k in kinds}
    if own == other:
        extra = [p for p in v.split("+") if p not in twin.split("+")]
        return (f"what {'+'.join(extra) or v} adds never applies in these cells: every "
                "counter, skips included, is equal")
    moved = {k: own[k] - other[k] for k in kinds if own[k] != other[k]}
    text = ", ".join(f"{n:+,} {k.replace('_', '-')}" for k, n in moved.items())
    return (f"it skips the same tables, some for another reason ({text} summed over the "
            "cells), and every other counter is equal")


def _iv(data: ReportData, s: str, b: str, v: str) -> dict:
    from .reproduce import time_intervals
    return time_intervals(data.outcome, s, b, v)


def _cell_text(iv: Any, measured: Any = None, show: bool = False) -> str:
    from ..estimate.intervals import fmt_interval
    text = "n/a" if iv is None else fmt_interval(iv.point, iv.low, iv.high).replace(" (", "\n(")
    if show:
        text += "\n" + ("m -" if measured is None or measured.saved is None
                        else f"m {measured.saved:.1f}%")
    return text


def savings_table(data: ReportData, shown: list[str]) -> Table:
    from ..tasks.reproduce import BACKING_LABELS
    from .reproduce import _avg_exact
    m = data.matrix
    many = len(shown) > 1
    cols = [Column("cell", wrap=16)] + ([Column("variant", wrap=14)] if many else []) + \
        [Column(granule_name(g), right=True) for g in m.granules] + [Column("avg", right=True)]
    t = Table(cols, [], title=("Estimated syscall time saved against vanilla" +
                               ("" if many else f" by {shown[0]}") +
                               f" (profile {data.profile.name}):"))
    for s in m.scenarios:
        for b in m.backings:
            for i, v in enumerate(shown):
                ivs = _iv(data, s, b, v)
                meas = data.labels is not None and v == data.measured_variant
                row = [f"{s}, {BACKING_LABELS[b]}" if i == 0 else ""] + ([v] if many else [])
                row += [_cell_text(ivs[g], data.measured.get((g, b, s)), meas)
                        for g in m.granules]
                row.append(_cell_text(ivs["avg"]).replace(")", ")*", 1)
                           if ivs["avg"] is not None and not _avg_exact(ivs) else
                           _cell_text(ivs["avg"]))
                t.rows.append(row)
    return t


def gains_items(data: ReportData, shown: list[str]) -> list[str]:
    """Per scenario and backing, at the first granule: the sentences on the
    largest change of each shown variant (the saving itself is in the table),
    one bullet for the backings that say the same."""
    from ..tasks.reproduce import BACKING_LABELS
    m = data.matrix
    g = m.granules[0]
    out: list[str] = []
    for s in m.scenarios:
        said: dict[str, list[str]] = {}
        for b in m.backings:
            lines = gains_sentences(data.outcome, (g, b, s))
            # the first sentence of each variant restates the table's saving;
            # the identical-work sentences are said once, under the table
            keep = [x for x in lines if not x.startswith(tuple(f"{v} saves" for v in shown))
                    and "do identical work" not in x and "does exactly the work" not in x]
            said.setdefault(" ".join(keep[:2]), []).append(BACKING_LABELS[b])
        for text, backings in said.items():
            if text:
                out.append(f"{s}, {' and '.join(backings)} ({granule_name(g)}): {text}")
    return out


def measured_notes(data: ReportData) -> list[str]:
    """hw compare's notes and its warnings, each warning once with the cells."""
    by: dict[str, list[str]] = {}
    for cell, mc in data.measured.items():
        for w in (mc.row.warnings if mc.row is not None else []):
            by.setdefault(w, []).append(_label(cell))
    return list(data.compare_notes) + [f"{w} ({len(c)} cell{'s' if len(c) > 1 else ''})"
                                       for w, c in by.items()]


def cover_sections(data: ReportData, plan_lines: list[str], plan_command: str) -> list[Section]:
    from ..tasks.reproduce import SCENARIOS
    from ..arm64.versions import DEFAULT_KERNEL
    from s2split import __version__
    m, p = data.matrix, data.profile
    same = twins(data)
    shown = [v for v in m.variants if v != "vanilla" and v not in same]
    chunk = size_name(m.chunk) if m.chunk else "the PMD block size"
    setup = Section("Setup", [Bullets([
        f"s2split {__version__}, a model of arm64 KVM's stage-2 code (Linux "
        f"{DEFAULT_KERNEL}): work counted exactly; every time is an ESTIMATE under "
        f"profile {p.name}, not a measurement{' (except m, below)' if data.labels else ''}.",
        f"{size_name(m.size)} VM, 1 vCPU, 1 memslot, {m.ipa_bits}-bit IPA; granules "
        f"{', '.join(granule_name(g) for g in m.granules)}; eager-split chunk {chunk}; "
        f"{m.iterations} iterations.",
        *(f"{s}: {SCENARIOS[s]}." for s in m.scenarios)])])
    notes = ["In brackets: the exact range over the profile's cost ranges; avg is the mean "
             "over the granules (* its bracket is an outer bound)."]
    if data.labels:
        base, patched = data.labels
        notes.append(f"m: measured on real hardware, 1 - median({patched}) / median({base}) "
                     f"of the same syscalls ('s2split hw compare'); the patched kernel is "
                     f"modelled as {data.measured_variant}.")
    notes += [f"{v}: the same work as {twin} in every cell, because {why}."
              for v, (twin, why) in same.items()]
    table = savings_table(data, shown)
    table.notes = []
    savings = Section("Estimated saving", [table, Bullets(notes)])
    gains = Section("Where the gains are", [Bullets(gains_items(data, shown))])
    secs = [setup, savings, gains]
    if data.labels:
        extra = measured_notes(data)
        if extra:
            secs.append(Section("Measurement notes", [Bullets(extra)]))
    secs.append(Section("Measuring it", [Bullets(plan_lines), Code([plan_command])]))
    secs.append(Section("Reproducing this report", [Code([report_command(data)]), Para(
        "--full adds the appendix: every cell's commands (model and real hardware), the "
        "per-operation breakdown, sensitivity, first split and steady state.")]))
    return secs


def build_cover(data: ReportData, full: bool = False) -> Document:
    """The cover letter; with ``full``, the whole report after it as the appendix."""
    from .commandline import matrix_argv
    from .plan import PlanOptions, build_plan, summary
    import shlex
    opts = PlanOptions(db="s2split-results.sqlite")
    plan = build_plan(data.outcome, opts, "")
    plan_command = shlex.join(["s2split", "hw", "plan", *matrix_argv(data.matrix),
                               "--format", "sh", "-o", "hw-plan"])
    doc = Document(f"Stage-2 splitting for dirty logging: {size_name(data.matrix.size)} VM "
                   f"(s2split report)", cover_sections(data, summary(plan), plan_command))
    if full:
        # top-level sections, as in the report without the cover
        doc.sections.append(Section("Appendix", [Para(
            "The whole report: every number above and its derivation.")]))
        doc.sections += build_document(data).sections
    return doc
