"""``s2split hw plan``: the measurement plan of a matrix, boot by boot.

On arm64 the stage-2 granule is the host kernel's page size, so every granule
of the matrix is its own host kernel, and every kernel under test (baseline,
patched) is built once per granule: one *boot* per (granule, kernel). For
each boot the plan gives what the host must be told (kernel command line,
sysfs and sysctl settings), what it must have (memory, hugetlb pools), the
``hw run`` commands (one label per kernel and granule, so that ``hw
compare`` never mixes host fingerprints) with the upstream selftest's
equivalent beside each, the repetitions each cell needs for the asked
confidence-interval width, and the expected wall time. Everything derives
from the matrix and the model's counts; the times are ESTIMATES under the
matrix's profile plus the stated per-run allowances.

Repetitions (docs/hw.md, "How many repetitions"): ``hw compare`` reports the
saving ``1 - median(B)/median(A)`` with a 95% interval. With a run-to-run
coefficient of variation ``c`` per run (the stated ``--cv``, widened by a
fixed timer/scheduling noise ``--noise`` relative to the model's estimated
time ``T`` of the measured syscalls: ``c_eff = sqrt(c^2 + (noise/T)^2)``), a
median of ``n`` runs has a relative standard error of ``sqrt(pi/2) c_eff /
sqrt(n)``, and the ratio of two such medians ``sqrt(pi) c_eff / sqrt(n)``.
The half-width ``1.96 sqrt(pi/n) c_eff`` is at most ``h`` (``--ci-width``,
percentage points of the baseline) when ``n >= pi (1.96 c_eff / h)^2``;
never fewer than ``hw compare``'s ``--min-reps`` (9).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from typing import Any

from ..arm64.arch import granule_name, size_name
from ..plumbing.errors import S2Error
from .commandline import matrix_argv

PLAN_FORMAT = "s2split-hw-plan/1"
#: The 95% normal quantile of the interval ``hw compare`` reports.
Z95 = 1.959964
#: ``hw compare``'s default --min-reps: fewer repetitions are warned about.
MIN_REPS = 9
#: The selftest patch that gives dirty_log_perf_test its ``-k``.
SELFTEST_PATCH = "contrib/dirty_log_perf_test-eager-split-chunk-size.patch"
#: khugepaged has no off switch (pages_to_scan refuses 0); both sleeps at
#: UINT_MAX milliseconds (49.7 days) keep it from scanning during the runs.
KHUGEPAGED_SLEEP_MS = 4294967295
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"


@dataclass(frozen=True)
class PlanOptions:
    labels: tuple[str, str] = ("baseline", "patched")
    variant: str = ""  # the variant the patched kernel implements ("" = first after vanilla)
    cv: float = 3.0  # percent, run to run
    noise_ns: float = 20_000.0  # fixed timer and scheduling noise per measurement
    ci_width: float = 2.0  # half-width of the saving's 95% interval, percentage points
    zero_rate: float = 8.0 * (1 << 30)  # bytes/s the host kernel clears new pages at
    run_overhead_s: float = 2.0  # VM creation and teardown, process start, per run
    boot_s: float = 300.0  # a reboot into the next kernel, with its checks
    margin: int = 4 << 30  # host OS, the harness, page cache
    db: str = "s2split-results.sqlite"

    def label(self, kernel: int, granule: int) -> str:
        return f"{self.labels[kernel]}-{granule_name(granule)}"


@dataclass
class RunLine:
    cell: tuple[int, str, str]  # (granule, backing, scenario)
    repeat: int
    measured_ns: float  # the measured syscalls' estimate (the faster kernel's)
    cv_eff: float  # percent
    run_s: float  # estimated wall time of one run on this boot's kernel
    command: str
    upstream: str


@dataclass
class Boot:
    granule: int
    kernel: str  # "baseline" or "patched"
    label: str
    variant: str  # what the model estimates this kernel as
    cmdline: list[str]
    settings: list[tuple[str, str]]  # (sysfs path or sysctl, value)
    memory: dict[str, int]  # what the host needs, bytes
    pools: list[tuple[int, int]]  # (hugepage size, pages)
    runs: list[RunLine] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.repeat * r.run_s for r in self.runs)

    @property
    def name(self) -> str:
        return f"{granule_name(self.granule)}-{self.kernel}"


@dataclass
class Plan:
    matrix: Any
    options: PlanOptions
    variant: str
    boots: list[Boot]
    compare: list[str]
    report: str

    @property
    def seconds(self) -> float:
        return sum(b.seconds + self.options.boot_s for b in self.boots)

    @property
    def runs(self) -> int:
        return sum(r.repeat for b in self.boots for r in b.runs)


# -- the numbers -----------------------------------------------------------------------------

def repetitions(measured_ns: float, opts: PlanOptions) -> tuple[int, float]:
    """Runs per kernel for the asked interval, and the effective CV (percent)."""
    if measured_ns <= 0:
        raise S2Error("the model estimates no time for a measured syscall; cannot size it")
    cv = math.hypot(opts.cv, 100.0 * opts.noise_ns / measured_ns)
    n = math.ceil(math.pi * (Z95 * cv / opts.ci_width) ** 2)
    return max(MIN_REPS, n), cv


def peak_table_pages(cell: dict[str, Any]) -> int:
    """Most stage-2 table pages in use at a phase boundary of one run (taken
    minus freed, phase by phase in the run's order)."""
    live = peak = 0
    for counts in cell.values():
        live += counts.total("page_taken") - counts.total("page_freed")
        peak = max(peak, live)
    return peak


def _backing(outcome: Any, cell: tuple[int, str, str]) -> Any:
    from ..model.kvm.backing import parse_backing
    g, b, s = cell
    return parse_backing(outcome.params[cell].backing, g)


def _pools(outcome: Any, granule: int) -> list[tuple[int, int]]:
    """hugetlb pages each hugetlb cell of the granule maps (memstress puts the
    whole test memory in hugetlb pages; memslot 0 is anonymous)."""
    m = outcome.matrix
    need: dict[int, int] = {}
    for s in m.scenarios:
        if "hugetlb" not in m.backings:
            continue
        cell = (granule, "hugetlb", s)
        size = _backing(outcome, cell).page_size
        pages = -(-outcome.params[cell].vcpu_memory_bytes * outcome.params[cell].vcpus // size)
        need[size] = max(need.get(size, 0), pages)
    return sorted(need.items())


def _cmdline(pools: list[tuple[int, int]]) -> list[str]:
    out = []
    for size, pages in pools:
        out += [f"hugepagesz={size_name(size)}", f"hugepages={pages}"]
    # Background walkers of the stage-2 tables or of the guest memory, off:
    # DAMON_STAT's page aging (on by default in distribution kernels since
    # 6.17), automatic NUMA balancing; THP only where madvised (the THP cells
    # madvise, the regular-page cells must not get THP).
    out += ["damon_stat.enabled=N", "numa_balancing=disable", "transparent_hugepage=madvise"]
    return out


def _settings() -> list[tuple[str, str]]:
    return [(f"{THP_SYSFS}/enabled", "madvise"),
            (f"{THP_SYSFS}/khugepaged/scan_sleep_millisecs", str(KHUGEPAGED_SLEEP_MS)),
            (f"{THP_SYSFS}/khugepaged/alloc_sleep_millisecs", str(KHUGEPAGED_SLEEP_MS)),
            ("kernel.numa_balancing", "0")]


def run_seconds(outcome: Any, cell: tuple[int, str, str], variant: str,
                opts: PlanOptions) -> float:
    """One ``hw run`` of a cell: the model's estimate of every phase, the host
    clearing the guest memory it hands out (not in the model's counts), and
    the per-run overhead."""
    g, b, s = cell
    phases = outcome.cells[(g, b, s, variant)]
    ns = sum(outcome.profile.estimate_ns(c) for c in phases.values())
    p = outcome.params[cell]
    return ns / 1e9 + p.vcpu_memory_bytes * p.vcpus / opts.zero_rate + opts.run_overhead_s


def upstream_command(params: Any) -> str:
    """The same run with the upstream selftest, once the patch gives it -k."""
    from ..selftest.memstress import upstream_argv
    argv = ["./dirty_log_perf_test", *upstream_argv(params)]
    if params.chunk_size is not None:
        argv += ["-k", size_name(params.chunk_size) if params.chunk_size else "0"]
    return " ".join(argv)


def build_plan(outcome: Any, opts: PlanOptions, report_command: str) -> Plan:
    from ..tasks.reproduce import syscall_phases
    from .mail import hw_params, hw_run_command
    m = outcome.matrix
    others = [v for v in m.variants if v != "vanilla"]
    variant = opts.variant or (others[0] if others else "vanilla")
    if variant not in m.variants:
        raise S2Error(f"--patched-variant {variant!r} is not in the matrix's variants "
                      f"({', '.join(m.variants)})")
    if opts.labels[0] == opts.labels[1]:
        raise S2Error("--labels: the two kernels need different labels")
    prof = outcome.profile
    boots: list[Boot] = []
    for g in m.granules:
        cells = [(g, b, s) for s in m.scenarios for b in m.backings]
        pools = _pools(outcome, g)
        tables = max(peak_table_pages(outcome.cells[c + (v,)]) * g
                     for c in cells for v in {"vanilla", variant})
        guest = max(outcome.params[c].vcpu_memory_bytes * outcome.params[c].vcpus
                    for c in cells if c[1] != "hugetlb") if any(
                        c[1] != "hugetlb" for c in cells) else 0
        pool_bytes = sum(size * n for size, n in pools)
        memory = {"hugetlb_pool": pool_bytes, "guest_anonymous": guest,
                  "stage2_tables": tables, "margin": opts.margin,
                  "total": pool_bytes + guest + tables + opts.margin}
        sized = {}
        for c in cells:
            gg, b, s = c
            phases = syscall_phases(s, m.iterations)
            est = min(sum(prof.estimate_ns(outcome.cells[c + (v,)][ph]) for ph in phases)
                      for v in ("vanilla", variant))
            sized[c] = (est, *repetitions(est, opts))
        for k, kernel in enumerate(("baseline", "patched")):
            v = "vanilla" if k == 0 else variant
            boot = Boot(g, kernel, opts.label(k, g), v, _cmdline(pools), _settings(), memory,
                        pools)
            for c in cells:
                est, n, cv = sized[c]
                p = outcome.params[c]
                boot.runs.append(RunLine(
                    c, n, est, cv, run_seconds(outcome, c, v, opts),
                    hw_run_command(p, n, boot.label) + f" --db {shlex.quote(opts.db)}",
                    upstream_command(hw_params(p))))
            boots.append(boot)
    compare = [f"s2split hw compare {shlex.quote(opts.label(0, g))} "
               f"{shlex.quote(opts.label(1, g))} --db {shlex.quote(opts.db)}"
               for g in m.granules]
    return Plan(m, opts, variant, boots, compare, report_command)


# -- formats ---------------------------------------------------------------------------------

def _duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def summary(plan: Plan) -> list[str]:
    """A few lines for the report: boots, runs, time, memory."""
    o = plan.options
    big = max(b.memory["total"] for b in plan.boots)
    return [
        f"{len(plan.boots)} boots ({len(plan.matrix.granules)} host kernels, one per "
        f"granule, x baseline and patched), {plan.runs} runs in all, about "
        f"{_duration(plan.seconds)} (estimate under profile {plan.matrix.profile}, "
        f"with {o.run_overhead_s:g} s per run and {_duration(o.boot_s)} per boot).",
        f"Repetitions sized for a 95% interval of +-{o.ci_width:g} points on the saving "
        f"with {o.cv:g}% run-to-run variation; host memory up to {_gib(big)}.",
    ]


def to_document(plan: Plan) -> Any:
    from .document import Bullets, Code, Column, Document, Para, Section, Table
    o = plan.options
    doc = Document(f"s2split hw plan: {size_name(plan.matrix.size)} VM, "
                   f"{len(plan.boots)} boots", [])
    doc.sections.append(Section("Summary", [Bullets(summary(plan)), Para(
        f"Times are estimates: the model's time of every phase under profile "
        f"{plan.matrix.profile}, plus clearing the guest memory at "
        f"{o.zero_rate / (1 << 30):g} GiB/s and {o.run_overhead_s:g} s per run. "
        f"Repetitions: n = max({MIN_REPS}, ceil(pi (1.96 c / h)^2)), c = "
        f"sqrt(cv^2 + (noise / T)^2) with cv {o.cv:g}%, noise {o.noise_ns / 1e3:g} us, T "
        f"the model's time of the measured syscalls and h {o.ci_width:g} points "
        "(docs/hw.md). The upstream lines need the selftest patch "
        f"{SELFTEST_PATCH}; 's2split hw import' reads their output.")]))
    for b in plan.boots:
        sec = Section(f"Boot {b.name}: label {b.label} ({b.kernel} kernel, "
                      f"{granule_name(b.granule)} pages)")
        sec.blocks.append(Bullets([
            f"Kernel: the {b.kernel} kernel built with CONFIG_ARM64_"
            f"{granule_name(b.granule)}_PAGES=y; modelled as {b.variant}.",
            "Command line: " + " ".join(b.cmdline),
            "Settings: " + "; ".join(f"{k} = {v}" for k, v in b.settings),
            "Host memory: " + ", ".join(f"{k.replace('_', ' ')} {_gib(v)}"
                                        for k, v in b.memory.items()),
            f"Runs: {sum(r.repeat for r in b.runs)}, about {_duration(b.seconds)} "
            "(estimate).",
        ]))
        t = Table([Column("cell", wrap=24), Column("runs", right=True),
                   Column("est. syscalls", right=True), Column("CV", right=True),
                   Column("est. per run", right=True)], [])
        lines: list[str] = []
        for r in b.runs:
            g, bk, s = r.cell
            name = f"{s}, {bk}"
            t.rows.append([name, str(r.repeat), f"{r.measured_ns / 1e6:,.2f} ms",
                           f"{r.cv_eff:.1f}%", _duration(r.run_s)])
            lines += [f"# {name}", r.command, f"# upstream: {r.upstream}"]
        sec.blocks += [t, Code(lines)]
        doc.sections.append(sec)
    doc.sections.append(Section("Reading the results", [
        Para("Per granule, patched against baseline (same host kernel's page size):"),
        Code(plan.compare),
        Para("The report with the measured column:"), Code([plan.report])]))
    return doc


def to_json(plan: Plan) -> dict[str, Any]:
    from dataclasses import asdict
    return {
        "format": PLAN_FORMAT,
        "times_are": f"estimates under profile {plan.matrix.profile} plus stated allowances",
        "options": asdict(plan.options), "patched_variant": plan.variant,
        "boots": [{"name": b.name, "granule": b.granule, "kernel": b.kernel,
                   "label": b.label, "modelled_as": b.variant, "cmdline": b.cmdline,
                   "settings": [list(s) for s in b.settings], "memory": b.memory,
                   "hugetlb_pools": [{"page_size": s, "pages": n} for s, n in b.pools],
                   "seconds": b.seconds,
                   "runs": [{"granule": r.cell[0], "backing": r.cell[1],
                             "scenario": r.cell[2], "repeat": r.repeat,
                             "measured_ns": r.measured_ns, "cv_eff_pct": r.cv_eff,
                             "seconds_per_run": r.run_s, "command": r.command,
                             "upstream": r.upstream} for r in b.runs]}
                  for b in plan.boots],
        "compare": plan.compare, "report": plan.report,
        "runs": plan.runs, "seconds": plan.seconds, "summary": summary(plan),
    }


def boot_script(plan: Plan, boot: Boot) -> str:
    """A bash script that checks this boot's host and runs its part; it stops
    at the first failed check or run."""
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# s2split hw plan, boot {boot.name}: label {boot.label} ({boot.kernel} kernel,",
        f"# {granule_name(boot.granule)} pages). Run as root on the booted kernel.",
        "set -euo pipefail",
        "",
        'fail() { echo "$0: $*" >&2; exit 1; }',
        "",
        f'[ "$(getconf PAGESIZE)" = {boot.granule} ] || '
        f'fail "host page size is $(getconf PAGESIZE), this boot needs {boot.granule}"',
        "cmdline=$(cat /proc/cmdline)",
    ]
    for arg in boot.cmdline:
        lines.append(f'case " $cmdline " in *" {arg} "*) ;; '
                     f'*) fail "kernel command line lacks {arg}" ;; esac')
    for key, value in boot.settings:
        if key.startswith("/"):
            # read back: the value itself, or selected in brackets (THP's
            # "always [madvise] never")
            lines += [f"echo {q(value)} > {q(key)}",
                      f'case "$(cat {q(key)})" in {q(value)}|*{q("[" + value + "]")}*) ;; '
                      f'*) fail "{key} is not {value}" ;; esac']
        else:
            lines += [f"sysctl -qw {q(key + '=' + value)}",
                      f'[ "$(sysctl -n {q(key)})" = {q(value)} ] || fail "{key} is not {value}"']
    lines += [
        "damon=/sys/module/damon_stat/parameters/enabled",
        'if [ -e "$damon" ] && [ "$(cat "$damon")" != N ]; then '
        'fail "DAMON_STAT is on"; fi',
        f"need_kb={boot.memory['total'] // 1024}",
        "have_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)",
        '[ "$have_kb" -ge "$need_kb" ] || '
        'fail "MemTotal is ${have_kb} kB, this boot needs ${need_kb} kB"',
    ]
    for size, pages in boot.pools:
        d = f"/sys/kernel/mm/hugepages/hugepages-{size // 1024}kB"
        lines.append(f'[ "$(cat {d}/free_hugepages 2>/dev/null || echo 0)" -ge {pages} ] || '
                     f'fail "fewer than {pages} free {size_name(size)} hugepages in {d}"')
    lines += ["", f"echo 'boot {boot.name}: checks passed; {len(boot.runs)} commands, "
              f"about {_duration(boot.seconds)} (estimate)'"]
    for r in boot.runs:
        lines += ["", f"# {r.cell[2]}, {r.cell[1]}; upstream: {r.upstream}", r.command]
    lines.append("")
    return "\n".join(lines)


def scripts(plan: Plan) -> dict[str, str]:
    """File name -> script, one per boot, numbered in boot order."""
    return {f"boot{i + 1}-{b.name}.sh": boot_script(plan, b) for i, b in enumerate(plan.boots)}


# -- the command -------------------------------------------------------------------------------

PLAN_FORMATS = ("text", "markdown", "json", "sh")


def add_plan_options(p: Any) -> None:
    """``hw plan``'s options beyond reproduce's matrix options."""
    from ..selftest.options import size_arg
    from .mail import _labels
    o = p.add_argument_group("the plan")
    o.add_argument("--labels", nargs=2, type=_labels, metavar=("BASE", "PATCHED"),
                   default=["baseline", "patched"],
                   help="the two kernels under test; each boot's label is NAME-GRANULE "
                   "(default: baseline patched)")
    o.add_argument("--patched-variant", default=None, metavar="NAME",
                   help="the variant the patched kernel implements (default: the first "
                   "after vanilla)")
    o.add_argument("--cv", type=_positive("--cv", "%"), default=3.0, metavar="PCT",
                   help="run-to-run coefficient of variation of a measured syscall time "
                   "(default: 3)")
    o.add_argument("--noise", type=_positive("--noise", "us", zero=True), default=20.0,
                   metavar="US", help="fixed timer and scheduling noise per measurement, in "
                   "microseconds, on top of --cv (default: 20)")
    o.add_argument("--ci-width", type=_positive("--ci-width", "%"), default=2.0, metavar="PTS",
                   help="half-width of the saving's 95%% interval, in percentage points "
                   "(default: 2)")
    o.add_argument("--zero-rate", type=size_arg("--zero-rate"), default=8 << 30,
                   metavar="SIZE", help="bytes per second the host clears new guest memory "
                   "at (default: 8G)")
    o.add_argument("--run-overhead", type=_positive("--run-overhead", "s", zero=True),
                   default=2.0, metavar="S", help="seconds per run beyond the model's phases: "
                   "VM creation and teardown, process start (default: 2)")
    o.add_argument("--boot-time", type=_positive("--boot-time", "s", zero=True),
                   default=300.0, metavar="S", help="seconds per reboot (default: 300)")
    o.add_argument("--margin", type=size_arg("--margin"), default=4 << 30, metavar="SIZE",
                   help="host memory beyond the guest and its tables (default: 4G)")
    o.add_argument("--format", choices=PLAN_FORMATS, default="text",
                   help="text (80 columns), markdown, json, or sh: one bash script per "
                   "boot, written into -o DIR (default: text)")
    o.add_argument("-o", "--output", default=None, metavar="FILE|DIR",
                   help="write there (for sh: the directory of the scripts; default: "
                   "standard output, for sh: ./hw-plan)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive(what: str, unit: str, zero: bool = False):
    import argparse

    def parse(text: str) -> float:
        try:
            v = float(text.strip().removesuffix(unit))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{what} must be a finite number {'>=' if zero else '>'} 0, got {text!r}")
        return v
    return parse


def plan_report_command(matrix: Any, opts: PlanOptions) -> str:
    """``s2split report`` over the plan's measurements (``{granule}`` in a
    label stands for each granule's name)."""
    argv = ["s2split", "report", *matrix_argv(matrix), "--measured",
            f"{opts.labels[0]}-{{granule}}", f"{opts.labels[1]}-{{granule}}",
            "--db", opts.db]
    if opts.variant:
        argv += ["--measured-variant", opts.variant]
    return shlex.join(argv)


def run_plan(args: Any, matrix: Any, run_matrix: Any) -> int:
    """``s2split hw plan``: gather the model's cells, build, render, write."""
    import os
    import sys

    from ..plumbing.output import write_atomic
    from .document import render_markdown, render_text
    opts = PlanOptions(labels=tuple(args.labels), variant=args.patched_variant or "",
                       cv=args.cv, noise_ns=args.noise * 1e3, ci_width=args.ci_width,
                       zero_rate=float(args.zero_rate), run_overhead_s=args.run_overhead,
                       boot_s=args.boot_time, margin=args.margin, db=args.db)
    if args.format == "sh" and args.output and os.path.exists(args.output) and \
            not os.path.isdir(args.output):
        raise S2Error(f"-o {args.output}: exists and is not a directory (sh writes one "
                      "script per boot into a directory)")
    outcome = run_matrix(matrix, sys.stderr.isatty() and not args.no_progress)
    plan = build_plan(outcome, opts, plan_report_command(matrix, opts))
    if args.format == "sh":
        out = args.output or "hw-plan"
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as e:
            raise S2Error(f"-o {out}: cannot make the directory ({e.strerror})") from None
        for name, text in scripts(plan).items():
            path = os.path.join(out, name)
            write_atomic(path, text)
            os.chmod(path, 0o755)
            print(path)
        return 0
    if args.format == "json":
        import json
        text = json.dumps(to_json(plan), indent=1) + "\n"
    elif args.format == "markdown":
        text = render_markdown(to_document(plan))
    else:
        text = render_text(to_document(plan))
    if args.output and args.output != "-":
        write_atomic(args.output, text)
        print(f"wrote the plan ({args.format}) to {args.output}")
    else:
        sys.stdout.write(text)
    return 0
