"""``s2split report``: the results as a mailing-list report.

What the series' reviewer asked for, from the results database (cells that
are missing are computed, exactly as ``s2split reproduce`` computes them):

* **Setup** -- version, profile and its CPU features, the matrix;
* **Estimated saving** -- per scenario and backing, vanilla's estimated
  syscall time and each variant's saved share per granule and averaged over
  granules (the numbers of ``reproduce --json``);
* **Measured beside modelled** -- with ``--measured BASE PATCHED``, the
  saving that ``hw compare BASE PATCHED`` computes from ``hw run``
  measurements of the same configurations (median, 95% bootstrap CI, runs);
* **Exact invocations** -- the model's command per cell and variant, and the
  ``s2split hw run`` commands that measure each cell on a real host;
* **Where the gains are** -- :mod:`s2split.tasks.explain`'s sentences;
* **Sensitivity** -- each saving's exact range over the cost ranges under
  every shipped profile, and the costs that move it most (:mod:`.sensitivity`);
* **Per-operation breakdown** -- each cell's estimate per kernel operation
  (:mod:`.breakdown`), as tables and (``--plots DIR``) stacked bars.

Formats: ``text`` (ASCII, 80 columns: for mail), ``markdown``, ``json`` and
``rich`` (the terminal view). Without ``--format``: ``rich`` on a terminal,
``text`` when standard output is not a terminal (a pipe, a redirect: what
goes into a mail), and for ``-o FILE`` the format its suffix names (``.md``,
``.json``; ``text`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from s2split import __version__
from ..arm64.arch import granule_name, size_name
from ..counting.counters import HIT_KINDS
from ..plumbing.errors import S2Error
from .document import Bullets, Code, Column, Document, Para, Section, Table
from .iterations import iterations_json, iterations_section

REPORT_FORMAT = "s2split-report/1"
FORMATS = ("text", "markdown", "json", "rich")
SUFFIX_FORMATS = {".md": "markdown", ".markdown": "markdown", ".json": "json"}
#: The ``hw run``/``hw compare`` phase that times each scenario's syscalls
#: (``clear_dirty_log_total``: every iteration's KVM_CLEAR_DIRTY_LOG, summed
#: per repetition, as the model sums them).
HW_PHASE = {"clear": "clear_dirty_log_total", "enable": "enable_dirty_logging"}
#: ``hw compare`` warns below 9 repetitions (its --min-reps default).
DEFAULT_REPEAT = 9
SELFTEST_NOTE = (
    "The upstream dirty_log_perf_test cannot enable eager splitting: it never "
    "sets KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, which is 0 (off) by default, so it "
    "measures none of the split walk the variants change. 's2split hw run' sets "
    "it (--chunk-size) before the first memslot and otherwise runs the selftest's "
    "phases in its order; contrib/dirty_log_perf_test-eager-split-chunk-size.patch "
    "gives the selftest the same as -k SIZE ('s2split hw plan' prints both).")
HOST_PAGE_NOTE = (
    "On arm64 the stage-2 granule is the host kernel's page size: a 16K or 64K "
    "cell is measured on a host kernel built with 16K or 64K pages (a 16K or "
    "64K guest mode on a 4K host measures a 4K stage-2). hugetlb cells need a "
    "pool of huge pages of the block size.")

Cell = tuple[int, str, str]  # (granule, backing, scenario)
#: (matrix, show progress) -> its Outcome: the command line's way of running a
#: matrix against the results database (``commands``).
RunMatrix = Callable[[Any, bool], Any]


@dataclass
class MeasuredCell:
    config_key: str
    phase: str
    row: Any  # s2split.hw.compare.Row, or None when not measured under both labels

    @property
    def saved(self) -> float | None:
        """Percent saved: the negated relative change of the medians."""
        return None if self.row is None else -100.0 * self.row.stats.change

    @property
    def ci(self) -> tuple[float, float] | None:
        st = self.row.stats if self.row is not None else None
        if st is None or st.ci_low is None:
            return None
        return -100.0 * st.ci_high, -100.0 * st.ci_low


@dataclass
class ReportData:
    outcome: Any  # s2split.tasks.reproduce.Outcome of the matrix's profile
    by_profile: dict[str, Any]  # profile name -> Outcome (sensitivity)
    labels: tuple[str, str] | None = None
    measured_variant: str = ""
    measured: dict[Cell, MeasuredCell] = field(default_factory=dict)
    compare_notes: list[str] = field(default_factory=list)
    repeat: int = DEFAULT_REPEAT
    plots: list[str] = field(default_factory=list)

    @property
    def matrix(self) -> Any:
        return self.outcome.matrix

    @property
    def profile(self) -> Any:
        return self.outcome.profile

    def cells(self) -> list[Cell]:
        m = self.matrix
        return [(g, b, s) for s in m.scenarios for b in m.backings for g in m.granules]


# -- gathering ---------------------------------------------------------------------------

def hw_params(params: Any) -> Any:
    """The ``hw run`` configuration of a model cell (same options, same key
    as the measurements ``hw run`` stores)."""
    from ..hw.params import HwParams
    shared = {f.name for f in fields(HwParams)} & {f.name for f in fields(params)}
    return HwParams(**{name: getattr(params, name) for name in shared})


def hw_run_command(params: Any, repeat: int, label: str) -> str:
    return ("s2split hw run " + " ".join(hw_params(params).argv()) +
            f" --repeat {repeat} --label {shlex.quote(label)}")


def _check_db(path: str) -> None:
    """An existing file must be a results database with something in it; a
    missing one is created, as reproduce does."""
    if not os.path.exists(path):
        return
    from ..storage.store import Store
    Store.open(path, create=False).close()


def gather(args: argparse.Namespace, matrix: Any, run_matrix: RunMatrix,
           show_progress: bool = False) -> ReportData:
    """Every number the report shows: cells (computed where missing, by
    ``run_matrix``, reproduce's machinery) under the matrix's profile and every
    shipped profile, and the measurements."""
    from ..estimate.cost import builtin_profiles, load_profile

    _check_db(args.db)
    if args.measured:
        _check_labels(args.db, [label_for(x, g) for x in args.measured
                                for g in matrix.granules])
    others = [v for v in matrix.variants if v != "vanilla"]
    variant = args.measured_variant or (others[0] if others else "vanilla")
    if variant not in matrix.variants:
        raise S2Error(f"--measured-variant {variant!r} is not in the matrix's variants "
                      f"({', '.join(matrix.variants)})")
    outcome = run_matrix(matrix, show_progress)
    by_profile = {outcome.profile.name: outcome}
    for name in builtin_profiles():
        if load_profile(name).name not in by_profile:
            by_profile[name] = run_matrix(replace(matrix, profile=name), show_progress)
    data = ReportData(outcome, dict(sorted(by_profile.items())), measured_variant=variant,
                      repeat=args.repeat)
    if args.measured:
        _add_measurements(data, args.db, *args.measured)
    return data


def label_for(label: str, granule: int) -> str:
    """A ``--measured`` label for one granule: ``{granule}`` stands for the
    granule's name (``baseline-{granule}`` -> ``baseline-4K``), as ``hw plan``
    labels its boots."""
    return label.replace("{granule}", granule_name(granule))


def _check_labels(db: str, labels: list[str]) -> None:
    from ..storage.store import Store
    if not os.path.exists(db):
        raise S2Error(f"{db}: no such results database, so no measurements labelled "
                      f"'{labels[0]}'")
    store = Store.open(db, create=False)
    try:
        known = store.labels()
    finally:
        store.close()
    for label in labels:
        if label not in known:
            raise S2Error(f"no measurements labelled '{label}' in {db} (labels: "
                          f"{', '.join(known) or 'none'})")


def _add_measurements(data: ReportData, db: str, base: str, patched: str) -> None:
    """``hw compare BASE PATCHED`` with its defaults, and its rows of the cells."""
    from ..hw.compare import compare_labels
    from ..storage.store import Store
    store = Store.open(db, create=False)
    rows: dict[tuple[int, str, str], Any] = {}
    data.compare_notes = []
    try:
        # One comparison per pair of labels: with {granule} in them, one per
        # granule (each granule is its own host kernel, 'hw plan').
        pairs: dict[tuple[str, str], list[int]] = {}
        for g in data.matrix.granules:
            pairs.setdefault((label_for(base, g), label_for(patched, g)), []).append(g)
        for (a, b), granules in pairs.items():
            report = compare_labels(store, a, b, model=False)
            for r in report.rows:
                for g in granules:
                    rows[(g, r.config_key, r.phase)] = r
            prefix = f"{a} vs {b}: " if len(pairs) > 1 else ""
            data.compare_notes += [prefix + n for n in report.notes]
    finally:
        store.close()
    data.labels = (base, patched)
    for g, b, s in data.cells():
        key = hw_params(data.outcome.params[(g, b, s)]).config_key()
        data.measured[(g, b, s)] = MeasuredCell(key, HW_PHASE[s],
                                                rows.get((g, key, HW_PHASE[s])))
    if all(m.row is None for m in data.measured.values()):
        some = next(iter(data.measured.values()))
        raise S2Error(f"'{base}' and '{patched}' have no measurement of this matrix's "
                      f"configurations (such as '{some.config_key}', phase {some.phase}); "
                      "run the report's 'hw run' commands on both kernels")


# -- numbers shared by the formats ---------------------------------------------------------

def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def _unit(ns_values: list[float]) -> tuple[str, float]:
    top = max(ns_values, default=0.0)
    if top >= 1e6:
        return "ms", 1e6
    if top >= 1e3:
        return "us", 1e3
    return "ns", 1.0


def _time(ns: float, unit: tuple[str, float]) -> str:
    name, div = unit
    return f"{ns / div:,.2f} {name}" if div > 1 else f"{ns:,.0f} ns"


def vanilla_ns(outcome: Any, cell: Cell) -> float:
    g, b, s = cell
    return outcome.profile.estimate_ns(outcome.phase_counts(g, b, s, "vanilla"))


def _label(cell: Cell) -> str:
    from ..tasks.reproduce import BACKING_LABELS
    g, b, s = cell
    return f"{s}, {BACKING_LABELS[b]}, {granule_name(g)}"


def _variant_header(v: str) -> str:
    return v.replace("+", "+\n")


# -- the document ------------------------------------------------------------------------

def setup_section(data: ReportData) -> Section:
    from ..tasks.reproduce import SCENARIOS
    from ..arm64.versions import DEFAULT_KERNEL
    p, m = data.profile, data.matrix
    chunk = size_name(m.chunk) if m.chunk else "the PMD block size of each granule (" + \
        ", ".join(f"{granule_name(g)}: {size_name(m.chunk_for(g))}" for g in m.granules) + ")"
    items = [
        f"s2split {__version__}: an executable model of arm64 KVM's stage-2 page tables "
        f"(Linux {DEFAULT_KERNEL}); exact counts, times estimated under a profile.",
        f"Profile: {p.name} -- {p.description}",
        f"CPU features: {p.features.describe()}.",
        f"VM: {size_name(m.size)} of guest memory, 1 vCPU, 1 memslot, {m.ipa_bits}-bit IPA; "
        f"granules {', '.join(granule_name(g) for g in m.granules)}; backings "
        f"{', '.join(m.backings)}{' (1G hugetlb on 4K)' if m.hugetlb_1g else ''}.",
        f"Eager-split chunk: {chunk}; {m.iterations} iterations.",
        f"Variants: {', '.join(m.variants)}.",
        *(f"Scenario {s}: {SCENARIOS[s]}." for s in m.scenarios),
    ]
    return Section("Setup", [Bullets(items), Para("This report, reproduced by:"),
                             Code([report_command(data)])])


def report_command(data: ReportData) -> str:
    """The ``s2split report`` command that computes this report's numbers."""
    from ..tasks.reproduce import profile_option
    from .commandline import matrix_argv
    m = data.matrix
    argv = ["s2split", "report", *matrix_argv(m, profile_option(data.profile))]
    if data.labels:
        argv += ["--measured", *data.labels]
        others = [v for v in m.variants if v != "vanilla"]
        if others and data.measured_variant != others[0]:
            argv += ["--measured-variant", data.measured_variant]
    return shlex.join(argv)


def savings_section(data: ReportData) -> Section:
    from ..tasks.reproduce import BACKING_LABELS, SCENARIOS
    from .reproduce import _avg_exact, time_intervals
    o, m = data.outcome, data.matrix
    sec = Section("Estimated saving against vanilla", [Para(
        f"Per scenario and backing: vanilla's estimated time of the scenario's syscalls, "
        f"then the share of it each variant saves, per granule and averaged over the "
        f"granules, as the series reports it. Estimates under profile {o.profile.name}, "
        "not measurements; the work they rest on is counted exactly.")])
    for s in m.scenarios:
        t = Table([Column("backing", wrap=13), Column("variant", wrap=26),
                   *(Column(granule_name(g), right=True) for g in m.granules),
                   Column("avg", right=True)], [], title=f"{s}: {SCENARIOS[s]}")
        for b in m.backings:
            ns = [vanilla_ns(o, (g, b, s)) for g in m.granules]
            unit = _unit(ns)
            t.rows.append([BACKING_LABELS[b], "vanilla: est. time",
                           *(_time(x, unit) for x in ns), ""])
            for v in m.variants:
                if v == "vanilla":
                    continue
                ivs = time_intervals(o, s, b, v)
                t.rows.append(["", v, *(_pct_iv(ivs[g]) for g in m.granules),
                               _pct_iv(ivs["avg"]) + ("" if _avg_exact(ivs) else "*")])
        sec.blocks.append(t)
    sec.blocks.append(Para(
        "In brackets under each saving: its exact minimum and maximum over the box of the "
        f"profile's cost ranges (every unit cost of {o.profile.name} between its low and high "
        "value at once; 'Sensitivity of each estimate' says which costs move it). avg is the "
        "mean of the granules' savings; its bracket is the mean of their extremes, marked * "
        "where that is an outer bound rather than the mean's own extremes (a mean of ratios "
        "is not linear-fractional)."))
    return sec


def _pct_iv(iv: Any) -> str:
    from ..estimate.intervals import fmt_interval
    return "n/a" if iv is None else fmt_interval(iv.point, iv.low, iv.high).replace(" (", "\n(")


def measured_section(data: ReportData) -> Section:
    from .reproduce import savings
    sec = Section("Measured beside modelled")
    if data.labels is None:
        sec.blocks.append(Para(
            "No measurements in this report. Run the 's2split hw run' commands under "
            "'Exact invocations' on the baseline and on the patched kernel, then add "
            "--measured BASE PATCHED (their labels) to this command."))
        return sec
    base, patched = data.labels
    v = data.measured_variant
    sec.blocks.append(Para(
        f"Measured on real hardware: '{patched}' against '{base}', computed as 's2split "
        f"hw compare {base} {patched}' computes it -- saved = 1 - median({patched}) / "
        f"median({base}) of the scenario's syscall time per run ({HW_PHASE['clear']} for "
        f"clear: every iteration's KVM_CLEAR_DIRTY_LOG summed per run), with its 95% "
        f"bootstrap confidence interval and the runs on each kernel. Modelled: what "
        f"{v} saves, estimated under profile {data.profile.name}."))
    t = Table([Column("cell", wrap=26), Column(f"modelled\n({v})", right=True),
               Column("measured", right=True), Column("95% CI", right=True),
               Column("runs", right=True)], [],
              notes=[f"runs: {base}/{patched}; 95% CI: of the measured saving, in percent."])
    for cell in data.cells():
        g, b, s = cell
        model = savings(data.outcome, s, b, v, "time")[g]
        mc = data.measured[cell]
        if mc.row is None:
            t.rows.append([_label(cell), _pct(model), "not measured", "", ""])
            continue
        ci = mc.ci
        t.rows.append([_label(cell), _pct(model), _pct(mc.saved),
                       f"[{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "-",
                       f"{mc.row.stats.n_a}/{mc.row.stats.n_b}"])
        t.notes += [f"{_label(cell)}: {w}" for w in mc.row.warnings]
    t.notes += [f"note: {n}" for n in data.compare_notes]
    sec.blocks.append(t)
    return sec


def invocations_section(data: ReportData) -> Section:
    from ..tasks.reproduce import profile_option, reproduce_command
    o, m = data.outcome, data.matrix
    # one label per kernel and granule, as hw plan labels its boots
    base, patched = data.labels or ("baseline-{granule}", "patched-{granule}")
    model: list[str] = []
    hw: list[str] = []
    for cell in data.cells():
        g, b, s = cell
        p = o.params[cell]
        model.append(f"# {_label(cell)}")
        model += [reproduce_command(p, v, profile_option(o.profile)) for v in m.variants]
        hw += [f"# {_label(cell)}", hw_run_command(p, data.repeat, label_for(base, g))]
    hw += [f"# then boot the patched kernels, run the same commands with --label "
           f"{shlex.quote(patched)}, and compare each granule:",
           *dict.fromkeys(f"s2split hw compare {shlex.quote(label_for(base, g))} "
                          f"{shlex.quote(label_for(patched, g))}" for g in m.granules)]
    return Section("Exact invocations", [
        Para("The model, one command per cell and variant; each prints the selftest's "
             "phase lines (times estimated) and the exact work of every phase:"),
        Code(model),
        Para(f"Real hardware (arm64, Linux 6.5 or newer, /dev/kvm): each cell as 's2split "
             f"hw run' measures it, with the eager-split chunk size of the cell and "
             f"{data.repeat} repetitions, on the baseline kernel:"),
        Code(hw),
        Para(SELFTEST_NOTE),
        Para(HOST_PAGE_NOTE),
    ])


def gains_sentences(outcome: Any, cell: Cell) -> list[str]:
    """:mod:`s2split.tasks.explain`'s sentences for one cell: each variant that does
    other work than one already explained, then which do identical work."""
    from ..tasks.explain import identical_work, same_work, sentences
    from ..tasks.reproduce import syscall_phases
    g, b, s = cell
    m = outcome.matrix
    n = len(syscall_phases(s, m.iterations))
    syscall = "this ioctl" if s == "enable" else f"the {n} KVM_CLEAR_DIRTY_LOG calls"
    summed = {v: outcome.phase_counts(g, b, s, v) for v in m.variants}
    out: list[str] = []
    explained: list[str] = []
    for v in m.variants:
        if v == "vanilla" or any(same_work(summed[v], summed[e]) for e in explained):
            continue
        explained.append(v)
        out += sentences(syscall, summed["vanilla"], summed[v], outcome.profile, v)
    return out + identical_work(summed, syscall)


def gains_section(data: ReportData) -> Section:
    sec = Section("Where the gains are", [Para(
        f"Per cell, from the exact counts (time shares are estimates under profile "
        f"{data.profile.name}).")])
    for cell in data.cells():
        sec.blocks.append(Section(_label(cell), [Bullets(gains_sentences(data.outcome, cell))]))
    return sec


def sensitivity_rows(data: ReportData) -> list[dict[str, Any]]:
    """Per scenario, backing, variant and granule: the saving's interval under
    every shipped profile, and what moves it under the report's profile
    (:mod:`.sensitivity`); a variant doing exactly the work of one before it
    shares that one's analysis."""
    from ..tasks.explain import same_work
    from ..estimate.intervals import saving_interval
    from .sensitivity import analyse
    m, o = data.matrix, data.outcome
    out = []
    for s in m.scenarios:
        for b in m.backings:
            for g in m.granules:
                base = o.phase_counts(g, b, s, "vanilla")
                done: dict[str, Any] = {}
                for v in m.variants:
                    if v == "vanilla":
                        continue
                    other = o.phase_counts(g, b, s, v)
                    twin = next((e for e in done if same_work(other, o.phase_counts(
                        g, b, s, e))), None)
                    sens = done[twin] if twin else analyse(base, other, o.profile)
                    done.setdefault(v, sens)
                    entry: dict[str, Any] = {
                        "scenario": s, "backing": b, "variant": v, "granule": granule_name(g),
                        "same_work_as": twin, "sensitivity": sens, "profiles": {}}
                    for name, po in data.by_profile.items():
                        entry["profiles"][name] = saving_interval(
                            po.profile, po.phase_counts(g, b, s, "vanilla"),
                            po.phase_counts(g, b, s, v))
                    out.append(entry)
    order = {(s, b, v): i for i, (s, b, v) in enumerate(
        (s, b, v) for s in m.scenarios for b in m.backings for v in m.variants)}
    return sorted(out, key=lambda r: (order[(r["scenario"], r["backing"], r["variant"])],
                                      m.granules.index(_granule_bytes(r["granule"]))))


def _granule_bytes(name: str) -> int:
    from ..arm64.arch import parse_granule
    return parse_granule(name)


def sensitivity_section(data: ReportData, rows: list[dict[str, Any]]) -> Section:
    from ..estimate.intervals import fmt_interval
    from ..tasks.reproduce import BACKING_LABELS
    from .sensitivity import statement
    m = data.matrix
    names = list(data.by_profile)
    sec = Section("Sensitivity of each estimate", [Para(
        "Each saving is a ratio of two linear forms in the profile's unit costs, and every "
        "cost has a plausible range (the profile's ranges_ns, with its provenance). In "
        "brackets: the saving's exact minimum and maximum over the box of those ranges "
        "(linear-fractional programming, not sampling), under every shipped profile (each "
        "with its own CPU features, so its own counts, and its own costs and ranges). "
        "Then, per cell under the report's profile, the costs that move the saving most: "
        "Sobol total indices (the share of the saving's variance, interactions included, "
        "when every ranged cost is drawn uniformly from its range; sampled with a fixed "
        "seed), and whether the saving grows or falls as each rises. All of it is about "
        "estimates, not measurements. The profiles:"),
        Bullets([f"{n}: {o.profile.description}" for n, o in data.by_profile.items()])])
    for s in m.scenarios:
        for b in m.backings:
            t = Table([Column("variant", wrap=26), Column("gran.")] +
                      [Column(n.replace("-", "-\n", 1), right=True, wrap=12) for n in names],
                      [], title=f"{s}, {BACKING_LABELS[b]}: estimated saving (exact range)")
            for r in rows:
                if (r["scenario"], r["backing"]) != (s, b):
                    continue
                t.rows.append([r["variant"], r["granule"], *(
                    "n/a" if iv is None else fmt_interval(iv.point, iv.low, iv.high)
                    .replace(" (", "\n(") for iv in (r["profiles"][n] for n in names))])
            sec.blocks.append(t)
    items = []
    for r in rows:
        where = f"{r['scenario']}, {BACKING_LABELS[r['backing']]}, {r['variant']}, " \
            f"{r['granule']}: "
        if r["same_work_as"]:
            items.append(where + f"does exactly the work of {r['same_work_as']}: the same.")
        else:
            items.append(where + statement(r["sensitivity"], data.profile.name))
    sec.blocks.append(Bullets(items))
    return sec


def breakdown_section(data: ReportData) -> Section:
    from . import breakdown as B
    o, m = data.outcome, data.matrix
    sec = Section("Per-operation breakdown", [Para(
        f"Each cell's estimated syscall time (profile {o.profile.name}) by kernel "
        "operation: the split walk and the write-protect walk (entries read, visitor "
        "calls, table loops, per level of the entry), table building (the new tables of "
        "kvm_pgtable_stage2_create_unlinked and their installation, pages from the "
        "memory caches), TLB maintenance and barriers (TLBIs, DSB, ISB, cache "
        "maintenance), dirty-bitmap work, and the KVM MMU layer (the ioctl, the chunk "
        "loop, lock drops). The operations add up to the total exactly. Below each, "
        "'where table reads hit' splits those walks' entry reads by the cache level their "
        "64-byte line would be found in (L1, L2, LLC, DRAM; counted by reuse distance, "
        "priced by the profile's memory_hierarchy, already inside the times above)." +
        (f" Plots: {len(data.plots)} files (PNG and SVG)." if data.plots else ""))])
    for cell in data.cells():
        g, b, s = cell
        parts = {v: B.breakdown_ns(o.phase_counts(g, b, s, v), o.profile) for v in m.variants}
        totals = {v: o.profile.estimate_ns(o.phase_counts(g, b, s, v)) for v in m.variants}
        unit = _unit(list(totals.values()))
        keys = B.ordered_keys(k for p in parts.values() for k in p)
        t = Table([Column("operation", wrap=40)] +
                  [Column(_variant_header(v), right=True) for v in m.variants], [],
                  title=f"{_label(cell)} (estimated {unit[0]})")
        for k in keys:
            t.rows.append([B.key_label(k), *(_num(parts[v].get(k, 0.0), unit)
                                             for v in m.variants)])
        t.rows.append(["total (estimate)", *(_num(totals[v], unit) for v in m.variants)])
        t.notes += tlbi_notes({v: o.phase_counts(g, b, s, v) for v in m.variants})
        sec.blocks.append(t)
        hits = {v: B.read_hits(o.phase_counts(g, b, s, v)) for v in m.variants}
        keys = B.ordered_keys(k for h in hits.values() for k in h)
        if keys:
            sec.blocks.append(Table(
                [Column("walk", wrap=30)] + [Column(_variant_header(v)) for v in m.variants],
                [[B.key_label(k), *(B.hits_text(hits[v][k]) if k in hits[v] else "-"
                                    for v in m.variants)] for k in keys],
                title=f"{_label(cell)}: where table reads hit (share of the entries read)"))
    return sec


def tlbi_notes(counts: dict[str, Any]) -> list[str]:
    """TLBI instructions by kind (exact), per variant; variants with the same
    instructions share a line."""
    from ..counting.kernel_counters import tlbi_instructions
    lines: dict[str, list[str]] = {}
    for v, c in counts.items():
        kinds = tlbi_instructions(c)
        text = ", ".join(f"{n:,} {k.removeprefix('TLBI ')}" for k, n in kinds.items() if n) \
            or "none"
        lines.setdefault(f"{text} ({c.tlbi_calls():,} hyp TLB calls)", []).append(v)
    return [f"TLBI instructions (exact), {' and '.join(vs)}: {text}"
            for text, vs in lines.items()]


def _num(ns: float, unit: tuple[str, float]) -> str:
    return f"{ns / unit[1]:,.3f}" if unit[1] > 1 else f"{ns:,.0f}"


def build_document(data: ReportData) -> Document:
    rows = sensitivity_rows(data)
    doc = Document(f"s2split report: stage-2 splitting for dirty logging, "
                   f"{size_name(data.matrix.size)} VM", [])
    doc.sections = [
        Section("About these numbers", [Para(
            f"Every time below is an estimate under the hardware profile "
            f"'{data.profile.name}' (s2split's cost model), not a measurement -- except "
            "the measured column of 'Measured beside modelled', which 's2split hw' measured "
            "on real hardware. Counts of work (entries read, visitor calls, TLBIs, tables) "
            "are exact. Each estimated saving comes with its exact range over the profile's "
            "cost ranges; the clear scenario's total depends on --iterations (see 'First "
            "split and steady state').")]),
        setup_section(data), savings_section(data), iterations_section(data),
        measured_section(data),
        invocations_section(data), gains_section(data), sensitivity_section(data, rows),
        breakdown_section(data)]
    return doc


# -- JSON ------------------------------------------------------------------------------------

def report_json(data: ReportData) -> dict[str, Any]:
    from dataclasses import asdict

    from ..tasks.reproduce import matrix_summary, profile_option, reproduce_command
    from ..counting.kernel_counters import tlbi_instructions
    from ..arm64.versions import DEFAULT_KERNEL
    from . import breakdown as B
    from .reproduce import outcome_json
    o, m, p = data.outcome, data.matrix, data.profile
    base, patched = data.labels or ("baseline-{granule}", "patched-{granule}")

    def cellinfo(cell: Cell) -> dict[str, Any]:
        g, b, s = cell
        return {"scenario": s, "backing": b, "granule": granule_name(g)}

    measured = None
    if data.labels:
        from .reproduce import savings
        measured = {"base": base, "patched": patched, "variant": data.measured_variant,
                    "notes": data.compare_notes, "cells": []}
        for cell, mc in data.measured.items():
            g, b, s = cell
            entry = cellinfo(cell) | {
                "config_key": mc.config_key, "phase": mc.phase,
                "model_saved_pct": savings(o, s, b, data.measured_variant, "time")[g],
                "measured": None}
            if mc.row is not None:
                entry["measured"] = asdict(mc.row.stats) | {
                    "saved_pct": mc.saved, "saved_ci_pct": list(mc.ci) if mc.ci else None,
                    "p_adjusted": mc.row.p_adjusted, "verdict": mc.row.verdict,
                    "warnings": mc.row.warnings}
            measured["cells"].append(entry)
    from .sensitivity import to_json as sensitivity_json
    sens = []
    for r in sensitivity_rows(data):
        sens.append({k: r[k] for k in ("scenario", "backing", "variant", "granule",
                                       "same_work_as")} | {
            "analysis": sensitivity_json(r["sensitivity"]),
            "profiles": {n: None if iv is None else {"saved_pct": iv.point, "low_pct": iv.low,
                                                     "high_pct": iv.high}
                         for n, iv in r["profiles"].items()}})
    breakdown = []
    for cell in data.cells():
        g, b, s = cell
        for v in m.variants:
            c = o.phase_counts(g, b, s, v)
            parts = B.breakdown_ns(c, p)
            hits = B.read_hits(c)
            breakdown.append(cellinfo(cell) | {
                "variant": v, "estimate_ns": p.estimate_ns(c),
                "tlbi_instructions": tlbi_instructions(c), "tlbi_calls": c.tlbi_calls(),
                "parts": [{"operation": k[0], "level": k[1], "ns": parts[k]}
                          for k in B.ordered_keys(parts)],
                "read_hits": [{"operation": k[0], "level": k[1], **dict(zip(HIT_KINDS, hits[k]))}
                              for k in B.ordered_keys(hits)]})
    return {
        "format": REPORT_FORMAT,
        "version": __version__,
        "times_are": f"estimates under profile {p.name}, not measurements (except "
                     "'measured', from 's2split hw')",
        "intervals_are": "low/high: the exact extremes of each saving over the box of the "
                         "profile's cost ranges (ranges_ns)",
        "setup": {"profile": p.name, "profile_description": p.description,
                  "profile_source": profile_option(p), "features": p.features.as_dict(),
                  "kernel": DEFAULT_KERNEL, "size": m.size, "granules": list(m.granules),
                  "backings": list(m.backings), "scenarios": list(m.scenarios),
                  "variants": list(m.variants),
                  "chunk": {granule_name(g): m.chunk_for(g) for g in m.granules},
                  "iterations": m.iterations, "ipa_bits": m.ipa_bits,
                  "summary": matrix_summary(m)},
        "rows": outcome_json(o)["rows"],
        "vanilla": [cellinfo(c) | {"estimate_ns": vanilla_ns(o, c)} for c in data.cells()],
        "measured": measured,
        "invocations": {
            "cells": [cellinfo(c) | {
                "model": {v: reproduce_command(o.params[c], v, profile_option(p))
                          for v in m.variants},
                "hw_run": {x: hw_run_command(o.params[c], data.repeat, label_for(x, c[0]))
                           for x in (base, patched)}}
                for c in data.cells()],
            # one comparison per granule when the labels name it ({granule})
            "hw_compare": "; ".join(dict.fromkeys(
                f"s2split hw compare {shlex.quote(label_for(base, g))} "
                f"{shlex.quote(label_for(patched, g))}" for g in m.granules)),
            "notes": [SELFTEST_NOTE, HOST_PAGE_NOTE]},
        "explanations": [cellinfo(c) | {"sentences": gains_sentences(o, c)}
                         for c in data.cells()],
        "sensitivity": sens,
        "per_iteration": iterations_json(data),
        "breakdown": breakdown,
        "plots": data.plots,
    }


# -- the command -----------------------------------------------------------------------------

def choose_format(given: str | None, output: str | None, isatty: bool) -> str:
    """The format: as given; else by the suffix of ``-o FILE`` (text unless
    .md/.markdown/.json); else rich on a terminal and text otherwise."""
    if given:
        return given
    if output and output != "-":
        return SUFFIX_FORMATS.get(os.path.splitext(output)[1].lower(), "text")
    return "rich" if isatty else "text"


def render(data: ReportData, fmt: str, build: Callable[[ReportData], Document] | None = None
           ) -> str:
    """The report in a file format (``rich`` as its plain-text export);
    ``build`` makes the document (default: the whole report)."""
    from .document import render_markdown, render_rich, render_text
    if fmt == "json":
        return json.dumps(report_json(data), indent=1) + "\n"
    doc = (build or build_document)(data)
    if fmt == "text":
        return render_text(doc)
    if fmt == "markdown":
        return render_markdown(doc)
    import io

    from rich.console import Console
    buf = io.StringIO()
    render_rich(doc, Console(file=buf, width=120, color_system=None, highlight=False))
    return buf.getvalue()


def run_report(args: argparse.Namespace, matrix: Any, run_matrix: RunMatrix,
               build: Callable[[ReportData], Document] | None = None) -> int:
    """``s2split report`` (see the module docstring): gather, render, write;
    ``build`` makes the document (default: the whole report)."""
    to_file = args.output not in (None, "-")
    fmt = choose_format(args.format, args.output, sys.stdout.isatty())
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        raise S2Error(f"--plots {args.plots}: exists and is not a directory")
    if to_file and os.path.isdir(args.output):
        raise S2Error(f"-o {args.output}: is a directory")
    data = gather(args, matrix, run_matrix,
                  show_progress=sys.stderr.isatty() and not args.no_progress)
    if args.plots:
        from .breakdown_plot import write_breakdown_plots
        try:
            data.plots = write_breakdown_plots(data.outcome, args.plots)
        except OSError as e:
            raise S2Error(f"--plots {args.plots}: cannot write ({e.strerror or e})") from None
    if fmt == "rich" and not to_file:
        from ..plumbing.console import rich_console
        from .document import render_rich
        render_rich((build or build_document)(data), rich_console())
        return 0
    text = render(data, fmt, build)
    if to_file:
        from ..plumbing.output import write_atomic
        write_atomic(args.output, text)
        print(f"wrote the report ({fmt}) to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _labels(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a label must not be empty")
    return text


DESCRIPTION = (
    "The experiment matrix as a report: setup, estimated savings, measured savings beside "
    "them (--measured), exact invocations, where the gains are, sensitivity to the "
    "profile, and a per-operation breakdown. Cells missing from the database are "
    "computed as 'reproduce' computes them. Without --format: rich on a terminal, text "
    "(ASCII, 80 columns) when standard output is not a terminal, and by its suffix for "
    "-o FILE (.md, .json; text otherwise).")


def add_report_options(p: argparse.ArgumentParser) -> None:
    """The options of ``s2split report`` beyond reproduce's matrix options."""
    from ..selftest.options import int_arg
    o = p.add_argument_group("the report")
    o.add_argument("--format", choices=FORMATS, default=None,
                   help="text (ASCII, 80 columns, for mail), markdown, json or rich "
                   "(default: see above)")
    o.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write the report to FILE, completely or not at all (default: "
                   "standard output)")
    o.add_argument("--measured", nargs=2, type=_labels, metavar=("BASE", "PATCHED"),
                   default=None, help="put the savings measured by 'hw run' under these two "
                   "labels (e.g. kernels) beside the model's, as 'hw compare' computes them; "
                   "{granule} in a label stands for each granule (4K, 16K, 64K), as 'hw "
                   "plan' labels its boots")
    o.add_argument("--measured-variant", default=None, metavar="NAME",
                   help="the variant the patched kernel implements (default: the first "
                   "variant after vanilla)")
    o.add_argument("--repeat", type=int_arg("--repeat", 1), default=DEFAULT_REPEAT,
                   metavar="N", help="repetitions in the printed 'hw run' commands "
                   f"(default: {DEFAULT_REPEAT})")
    o.add_argument("--full", action="store_true",
                   help="the cover letter and the whole report as its appendix")
    o.add_argument("--plots", metavar="DIR",
                   help="write the per-operation stacked bars into DIR (PNG and SVG)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
