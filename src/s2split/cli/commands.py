"""The subcommands around the results store: reproduce, explain, show, compare,
export, calibrate (and hw, in :mod:`s2split.hw.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..plumbing.console import rich_console
from ..plumbing.errors import S2Error
from ..selftest.memstress import INT_MAX
from ..selftest.options import int_arg, size_arg

#: More worker processes than this exhaust descriptors and memory before
#: they help (each holds a pipe and a model).
MAX_WORKERS = 1024
from ..plumbing.output import write_atomic


def _csv(what: str, parse=str):
    def f(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        try:
            return [parse(t) for t in items]
        except S2Error as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return f


def add_matrix_options(p: argparse.ArgumentParser, single: bool = False) -> None:
    from ..arm64.arch import parse_granule
    from ..storage.store import DEFAULT_DB
    g = p.add_argument_group("the matrix")
    g.add_argument("--size", type=size_arg("--size"), default=64 << 30, metavar="SIZE",
                   help="guest memory of the VM, e.g. 64G or 1T (default: 64G)")
    g.add_argument("--granule", type=_csv("--granule", parse_granule), default=None,
                   metavar="LIST", help="granules, e.g. 4K,16K (default: 4K,16K,64K)")
    g.add_argument("--backing", type=_csv("--backing"), default=None, metavar="LIST",
                   help="regular, thp, hugetlb (default: all three)")
    g.add_argument("--scenario", type=_csv("--scenario"), default=None, metavar="LIST",
                   help="clear (KVM_CLEAR_DIRTY_LOG with manual-protect) and/or enable "
                   "(enabling dirty logging) (default: both)")
    g.add_argument("--variant", type=_csv("--variant"), default=None, metavar="LIST",
                   help="variants; vanilla is always included (default: vanilla,skip-levels,"
                   "skip-levels+skip-children)")
    g.add_argument("--chunk-size", type=size_arg("--chunk-size"), default=None, metavar="SIZE",
                   help="eager-split chunk size (default: the PMD block size of each granule)")
    # -i of dirty_log_perf_test is an int: the stored commands must rerun
    g.add_argument("--iterations", type=int_arg("--iterations", 2, INT_MAX), default=2,
                   metavar="N", help="iterations of the test, as perf-test's -i; the clear "
                   "scenario's total depends on it (default: 2)")
    g.add_argument("--ipa-bits", type=int_arg("--ipa-bits", 32, 52), default=40, metavar="N",
                   help="guest physical address bits (default: 40)")
    g.add_argument("--hugetlb-1g", action="store_true",
                   help="back hugetlb with 1G pages on 4K (default: the default hugepage size)")
    g.add_argument("--profile", default="server-vhe", metavar="NAME|FILE",
                   help="hardware profile: CPU features and unit costs (default: server-vhe)")
    g.add_argument("--cpu", default=None, metavar="FEATURES",
                   help="change the profile's CPU features, e.g. +bbml2 or -tlbirange")
    r = p.add_argument_group("running")
    r.add_argument("--db", default=DEFAULT_DB, metavar="FILE",
                   help=f"results database (default: ./{DEFAULT_DB})")
    r.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto",
                   help="auto: the fast engine from 64M of guest memory (default: auto)")
    if not single:
        r.add_argument("--workers", type=int_arg("--workers", 1, MAX_WORKERS), default=None,
                       metavar="N",
                       help="parallel processes (default: one per CPU)")
        r.add_argument("--dask", default=None, metavar="ADDRESS",
                       help="run groups on a Dask cluster, e.g. tcp://10.0.0.5:8786")


def matrix_from(args: argparse.Namespace) -> Any:
    from ..estimate.cost import load_profile
    from ..model.pgtable.variants import DEFAULT_VARIANTS
    from ..tasks.reproduce import Matrix
    profile = load_profile(args.profile)  # a bad profile fails before the database is created
    variants = list(args.variant or DEFAULT_VARIANTS)
    if "vanilla" not in variants:
        variants.insert(0, "vanilla")
    kw: dict[str, Any] = dict(size=args.size, variants=tuple(variants),
                              iterations=args.iterations, ipa_bits=args.ipa_bits,
                              hugetlb_1g=args.hugetlb_1g, profile=args.profile,
                              chunk=args.chunk_size, cpu=getattr(args, "cpu", None))
    if args.granule:
        kw["granules"] = tuple(args.granule)
    if args.backing:
        kw["backings"] = tuple(args.backing)
    if args.scenario:
        kw["scenarios"] = tuple(args.scenario)
    matrix = Matrix(**kw)
    features = matrix.features(profile)
    from ..model.pgtable.variants import get
    for v in variants:
        get(v).check_cpu(features)  # a variant the CPU cannot run, before any work
    matrix.check_layouts(features)  # and a bad size too
    return matrix


def _run_matrix(args: argparse.Namespace, matrix: Any, show_progress: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from ..tasks.reproduce import DaskExecutor, LocalExecutor, reproduce
    from ..storage.store import Store
    store = Store.open(args.db)
    executor = None
    if getattr(args, "dask", None):
        executor = DaskExecutor(args.dask)
    elif getattr(args, "workers", None):
        executor = LocalExecutor(args.workers)
    try:
        if not show_progress:
            return reproduce(matrix, store, args.engine, executor)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=True, console=_err_console()) as prog:
            task = prog.add_task("groups", total=None)

            def progress(label: str, done: int, total: int) -> None:
                prog.update(task, completed=done, total=total,
                            description=f"groups (last: {label})" if label else "groups")
            return reproduce(matrix, store, args.engine, executor, progress)
    finally:
        store.close()
        if isinstance(executor, DaskExecutor):
            executor.close()


def _err_console():
    from rich.console import Console
    return Console(stderr=True)


def cmd_reproduce(args: argparse.Namespace) -> int:
    import time

    from ..report.reproduce import outcome_json, print_outcome
    from ..arm64.arch import granule_name
    from ..tasks.reproduce import matrix_summary

    matrix = matrix_from(args)
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        # Before the run, which may take hours.
        raise S2Error(f"--plots {args.plots}: exists and is not a directory")
    t0 = time.perf_counter()
    outcome = _run_matrix(args, matrix, not args.no_progress and not args.json)
    elapsed = time.perf_counter() - t0
    if args.plots:
        from ..report.plots import write_plots
        try:
            written = write_plots(outcome, args.plots)
        except OSError as e:
            raise S2Error(f"--plots {args.plots}: cannot write ({e.strerror or e}); the "
                          f"results are stored in {args.db}") from None
    if args.json:
        data = outcome_json(outcome)
        data["elapsed_s"] = elapsed
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    console = rich_console()
    console.print(f"Matrix: {matrix_summary(matrix)}", highlight=False)
    console.print(f"Profile: {outcome.profile.name} -- {outcome.profile.description}",
                  highlight=False)
    console.print(f"Measured: nothing. Counts are exact; every time and saving is an estimate "
                  f"under profile {outcome.profile.name} (only 's2split hw' measures).",
                  highlight=False)
    print_outcome(console, outcome)
    if args.explain:
        print_explanations(console, outcome)
    else:
        first = outcome.matrix.granules[0]
        console.print(f"Where the gains are ({granule_name(first)} cells; --explain for every "
                      "cell, with the changes per phase and level):", highlight=False)
        print_explanations(console, outcome, granules=[first], tables=False)
    if args.plots:
        console.print(f"Plots: {len(written)} files in {args.plots}", highlight=False)
    console.print(f"{outcome.ran} cell(s) computed, {outcome.skipped} found in {args.db}; "
                  f"{elapsed:.1f} s", highlight=False)
    return 0


def print_explanations(console: Any, outcome: Any, granules: Any = None,
                       tables: bool = True) -> None:
    """Where each variant's gains are, cell by cell: the changed counters per
    phase and level (``tables``) and plain sentences; a variant doing the same
    work as one already explained is only named as such."""
    from ..arm64.arch import granule_name
    from ..tasks.explain import (changes, changes_table, hit_sentences, hits_table, identical_work,
                                 same_work, sentences)
    from ..model.pgtable.variants import get as get_variant
    from ..tasks.reproduce import BACKING_LABELS, syscall_phases
    m = outcome.matrix
    for s in m.scenarios:
        for b in m.backings:
            for g in granules or m.granules:
                label = f"{granule_name(g)} {BACKING_LABELS[b]}, {s}"
                console.rule(label)
                phases = syscall_phases(s, m.iterations)
                syscall = "this ioctl" if s == "enable" else \
                    f"the {len(phases)} KVM_CLEAR_DIRTY_LOG calls"
                base = outcome.cells[(g, b, s, "vanilla")]
                summed = {v: outcome.phase_counts(g, b, s, v) for v in m.variants}
                if tables:
                    console.print(hits_table(
                        f"Where table reads hit, vanilla (classes counted by reuse distance "
                        f"over 64-byte lines; time an estimate under {outcome.profile.name})",
                        summed["vanilla"], outcome.profile))
                for line in hit_sentences(syscall, summed["vanilla"]):
                    console.print("  " + line, highlight=False)
                explained: list[str] = []
                for v in m.variants:
                    if v == "vanilla":
                        continue
                    if not tables and any(same_work(summed[v], summed[e]) for e in explained):
                        continue  # identical_work() below names it
                    explained.append(v)
                    rows = []
                    for ph in phases:
                        rows += changes(ph, base[ph], outcome.cells[(g, b, s, v)][ph],
                                        outcome.profile)
                    if rows and tables:
                        console.print(changes_table(f"{v} against vanilla", rows))
                    for line in sentences(syscall, summed["vanilla"], summed[v],
                                          outcome.profile, v):
                        console.print("  " + line, highlight=False)
                    if get_variant(v).extra_protection:
                        cell0, cell1 = outcome.cells[(g, b, s, "vanilla")], \
                            outcome.cells[(g, b, s, v)]
                        extra = sum(cell1[ph].get("kvm", "perm_faults")
                                    - cell0[ph].get("kvm", "perm_faults") for ph in cell0)
                        console.print(f"  {v} write-protects more than vanilla: the guest took "
                                      f"{extra:,} more write faults over the whole test.",
                                      highlight=False)
                for line in identical_work(summed, syscall):
                    console.print("  " + line, highlight=False)
                _print_per_iteration(console, outcome, g, b, s, explained)
                if tables:
                    console.print(tlbi_table(summed, syscall))


def _print_per_iteration(console: Any, outcome: Any, g: int, b: str, s: str,
                         variants: list[str]) -> None:
    """The first split and the steady state, for each variant explained."""
    from ..tasks.per_iteration import split_parts, steady_repeats, sentence
    m = outcome.matrix
    base = outcome.cells[(g, b, s, "vanilla")]
    for v in variants:
        cell = outcome.cells[(g, b, s, v)]
        parts = split_parts(outcome.profile, s, m.iterations, base, cell)
        repeats = steady_repeats(base, cell, parts[-1].phases) if s == "clear" else None
        console.print(f"  {v}: " + sentence(s, m.iterations, parts, outcome.profile.name,
                                            repeats), highlight=False)


def tlbi_table(summed: dict[str, Any], syscall: str) -> Any:
    """TLBI instructions by kind beside the calls, per variant."""
    from rich.table import Table

    from ..counting.kernel_counters import TLBI_KINDS, tlbi_instructions
    t = Table(title=f"TLB invalidation in {syscall} (exact counts)", title_justify="left")
    t.add_column("instruction")
    t.add_column("what")
    for v in summed:
        t.add_column(v, justify="right")
    kinds = {v: tlbi_instructions(c) for v, c in summed.items()}
    t.add_row("hyp TLB calls", "__kvm_tlb_flush_vmid*", *(f"{c.tlbi_calls():,}"
                                                            for c in summed.values()))
    for name, what in TLBI_KINDS:
        if any(k[name] for k in kinds.values()):
            t.add_row(name, what, *(f"{kinds[v][name]:,}" for v in summed))
    return t


def cmd_explain(args: argparse.Namespace) -> int:
    matrix = matrix_from(args)
    if len(matrix.granules) * len(matrix.backings) * len(matrix.scenarios) > 3:
        raise S2Error("explain one cell at a time: give --granule, --backing and --scenario")
    outcome = _run_matrix(args, matrix, False)
    console = rich_console()
    console.print(f"Times are estimates under profile {outcome.profile.name}, not "
                  "measurements (only 's2split hw' measures); counts are exact.",
                  highlight=False)
    print_explanations(console, outcome)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..arm64.arch import size_name
    from ..estimate.cost import load_profile
    from ..tasks.reproduce import syscall_phases
    from ..storage.store import Store
    store = Store.open(args.db, create=False)
    profile = load_profile(args.profile) if args.profile else None
    t = Table(title=f"{store.path}: {store.cell_count()} cell(s); syscall times are "
              f"estimates under {'profile ' + profile.name if profile else 'each cell profile'}"
              ", not measurements", title_justify="left")
    for col in ("key", "granule", "size", "backing", "mode", "variant", "profile", "engine"):
        t.add_column(col)
    t.add_column("syscall est.", justify="right")
    t.add_column("entries read", justify="right")
    n = 0
    try:
        cells = list(store.cells())
    finally:
        store.close()
    stored = sorted({c.variant for c in cells})
    for v in args.variant or ():
        if v not in stored:
            raise S2Error(f"--variant {v}: no stored cell of that variant in {store.path} "
                          f"(stored: {', '.join(stored) or 'none'})")
    for c in cells:
        cfg = c.config
        if args.variant and c.variant not in args.variant:
            continue
        wanted = syscall_phases("clear" if cfg["manual_protect"] else "enable",
                                cfg["iterations"])
        phases = [(name, cnt, est) for name, cnt, est in c.phases if name in wanted]
        est = sum(profile.estimate_ns(cnt) if profile else e for _, cnt, e in phases)
        reads = sum(cnt.entries_read() for _, cnt, _ in phases)
        t.add_row(c.key[:12], size_name(cfg["granule"]), size_name(cfg["vcpu_memory_bytes"]),
                  cfg["backing"], "clear" if cfg["manual_protect"] else "enable", c.variant,
                  profile.name if profile else c.profile, c.engine, f"{est / 1e6:,.2f} ms",
                  f"{reads:,}")
        n += 1
    rich_console().print(t)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Two variants across the stored cells: estimated time and work."""
    from rich.table import Table

    from ..arm64.arch import size_name
    from ..estimate.cost import load_profile
    from ..counting.counts import sum_counts
    from ..report import saving
    from ..tasks.reproduce import syscall_phases
    from ..storage.store import Store
    given = load_profile(args.profile) if args.profile else None
    store = Store.open(args.db, create=False)
    cells: dict[tuple, dict[str, Any]] = {}
    for c in store.cells():
        cfg = dict(c.config)
        cfg.pop("features", None)
        key = json.dumps(cfg, sort_keys=True)
        cells.setdefault(key, {})[c.variant] = c
    t = Table(title=f"{args.b} against {args.a} (times: estimates under "
              f"{'profile ' + given.name if given else 'the cells profile'}, not measurements)",
              title_justify="left")
    for col in ("granule", "backing", "scenario"):
        t.add_column(col)
    for col in (f"{args.a} est.", f"{args.b} est.", "time saved", "entries read saved",
                "visits saved"):
        t.add_column(col, justify="right")
    rows = 0
    for key, by_variant in cells.items():
        if args.a not in by_variant or args.b not in by_variant:
            continue
        ca, cb = by_variant[args.a], by_variant[args.b]
        manual = ca.config["manual_protect"]
        names = syscall_phases("clear" if manual else "enable", ca.config["iterations"])
        sa = sum_counts(ca.phase(n) for n in names)
        sb = sum_counts(cb.phase(n) for n in names)
        if given is None and ca.profile == cb.profile:
            # The estimates stored with the cells: the store keeps a profile's
            # name, which need not load again (a profile file elsewhere).
            ea = sum(e for n, _, e in ca.phases if n in names)
            eb = sum(e for n, _, e in cb.phases if n in names)
        else:
            try:
                profile = given or load_profile(ca.profile)
            except S2Error as e:
                store.close()
                raise S2Error(f"the cells were estimated under different profiles "
                              f"({ca.profile!r}, {cb.profile!r}) and {e}; give --profile") \
                    from None
            ea, eb = profile.estimate_ns(sa), profile.estimate_ns(sb)

        def pct(x: float, y: float) -> str:
            saved = saving(x, y)
            return "n/a" if saved is None else f"{saved:.1f}%"
        t.add_row(size_name(ca.config["granule"]), ca.config["backing"],
                  "clear" if manual else "enable", f"{ea / 1e6:,.2f} ms", f"{eb / 1e6:,.2f} ms",
                  pct(ea, eb), pct(sa.entries_read(), sb.entries_read()),
                  pct(sa.visitor_calls(), sb.visitor_calls()))
        rows += 1
    store.close()
    if not rows:
        raise S2Error(f"no stored configuration has both {args.a!r} and {args.b!r}")
    rich_console().print(t)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..storage.store import Store
    store = Store.open(args.db, create=False)
    data = json.dumps(store.export_json(), indent=1) + "\n" if args.format == "json" else \
        store.export_csv()
    store.close()
    if args.output in (None, "-"):
        sys.stdout.write(data)
    else:
        write_atomic(args.output, data)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """``s2split report`` (s2split.report.mail), on reproduce's machinery."""
    from ..plumbing.output import note_input, refuse_input
    from ..report.cover import build_cover
    from ..report.mail import run_report
    note_input(args.db)
    if args.output:
        refuse_input(args.output, "-o")  # before the matrix runs, which may take hours
    return run_report(args, matrix_from(args),
                      lambda matrix, show: _run_matrix(args, matrix, show),
                      lambda data: build_cover(data, args.full))


def cmd_hw_plan(args: argparse.Namespace) -> int:
    """``s2split hw plan`` (s2split.report.plan), on reproduce's machinery."""
    from ..report.plan import run_plan
    return run_plan(args, matrix_from(args),
                    lambda matrix, show: _run_matrix(args, matrix, show))


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.savings:
        from ..tasks.calibrate_savings import savings_command
        from ..report.savings_fit import print_fit
        return savings_command(args, print_fit)
    from ..tasks.calibrate import calibrate_command
    return calibrate_command(args)


def register(sub: argparse._SubParsersAction) -> None:
    from ..storage.store import DEFAULT_DB
    rp = sub.add_parser("reproduce", help="run the experiment matrix (the main job)",
                        description="Run the patch series' experiment matrix on the model: "
                        "64 GiB VM x granule x backing x scenario x variant, with the savings "
                        "of each variant against vanilla, the command reproducing each cell, "
                        "and (with --explain) where the gains are.")
    add_matrix_options(rp)
    rp.add_argument("--explain", action="store_true", help="explain every cell")
    rp.add_argument("--plots", metavar="DIR", help="write PNG and SVG plots into DIR")
    rp.add_argument("--json", action="store_true", help="print the results as JSON")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_reproduce)

    ex = sub.add_parser("explain", help="where the gains of each variant are, for one cell")
    add_matrix_options(ex, single=True)
    ex.set_defaults(func=cmd_explain)

    sh = sub.add_parser("show", help="list the cells in the results database")
    sh.add_argument("--db", default=DEFAULT_DB)
    sh.add_argument("--variant", type=_csv("--variant"), default=None)
    sh.add_argument("--profile", default=None, help="re-estimate under another profile")
    sh.set_defaults(func=cmd_show)

    cp = sub.add_parser("compare", help="compare two variants over the stored cells")
    cp.add_argument("a", metavar="VARIANT_A")
    cp.add_argument("b", metavar="VARIANT_B")
    cp.add_argument("--db", default=DEFAULT_DB)
    cp.add_argument("--profile", default=None)
    cp.set_defaults(func=cmd_compare)

    xp = sub.add_parser("export", help="export the results database as JSON or CSV")
    xp.add_argument("--db", default=DEFAULT_DB)
    xp.add_argument("--format", choices=("json", "csv"), default="json")
    xp.add_argument("-o", "--output", default=None, help="file (default: standard output)")
    xp.set_defaults(func=cmd_export)

    ca = sub.add_parser("calibrate", help="fit a profile's unit costs to measured times")
    ca.add_argument("measurements", metavar="MEASUREMENTS", nargs="?", default=None,
                    help="CSV or JSON of (perf-test options, phase, seconds)")
    ca.add_argument("--profile", default="server-vhe", help="profile to start from")
    ca.add_argument("--fit", default=None, metavar="KEYS",
                    help="comma-separated cost keys to fit (default: the main walk, TLBI and "
                    "fault costs)")
    ca.add_argument("--name", default=None, help="name of the fitted profile")
    ca.add_argument("-o", "--output", default=None,
                    help="write the fitted profile to this file (JSON)")
    ca.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto")
    ca.add_argument("--db", default=None, help="use hw measurements from this database instead "
                    "of a file (MEASUREMENTS is then a label); with --savings: the results "
                    "database holding the cells (default: ./s2split-results.sqlite)")
    from ..tasks.calibrate_savings import add_savings_options
    add_savings_options(ca)
    ca.set_defaults(func=cmd_calibrate)

    from ..report.mail import DESCRIPTION, add_report_options
    rr = sub.add_parser("report", help="the results as a report for a mailing list (text, "
                        "Markdown, JSON)", description=DESCRIPTION)
    add_matrix_options(rr)
    add_report_options(rr)
    rr.set_defaults(func=cmd_report)

    from ..hw.cli import register as register_hw
    hsub = register_hw(sub)
    from ..report.plan import add_plan_options
    pl = hsub.add_parser("plan", help="the measurement plan of a matrix, boot by boot",
                         description="The measurement plan of reproduce's matrix on real "
                         "arm64 hosts: one boot per granule (the host kernel's page size) and "
                         "kernel under test, each with its kernel command line, settings, host "
                         "memory, 'hw run' commands (one label per kernel and granule) and "
                         "repetitions for the asked interval width; the expected wall time "
                         "(an estimate), and the 'hw compare' and 'report --measured' "
                         "commands that read the results.")
    add_matrix_options(pl)
    add_plan_options(pl)
    pl.set_defaults(func=cmd_hw_plan)
