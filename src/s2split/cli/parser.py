"""The ``s2split`` command line.

Subcommands match what users do: ``perf-test`` (one cell, upstream's options),
``reproduce`` (the experiment matrix), ``explain`` (where the gains are),
``show``/``compare``/``export`` (the results store), ``calibrate`` (fit a cost
profile), ``fidelity`` (check against real-kernel fixtures), ``variants``,
``geometry`` and ``demo``. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..plumbing.console import (flush_stdout, is_output_error, output_failed, rich_console,
                                run_command)
from ..selftest.options import Parser, add_perf_test_options, int_arg


# -- perf-test -----------------------------------------------------------------

def cmd_perf_test(args: argparse.Namespace) -> int:
    from ..estimate.cost import load_profile
    from ..tasks.perftest import perf_test_params
    from ..model.pgtable.variants import DEFAULT_VARIANTS, get
    from ..report.perftest import print_perf_test, result_json
    from ..workload import memstress_layout, run_variants

    profile = load_profile(args.profile)
    variants = [get(v) for v in (args.variant or DEFAULT_VARIANTS)]
    all_json = []
    console = rich_console()
    for params in perf_test_params(args):
        memstress_layout(params)  # layout errors before any work
        results = run_variants(params, variants, args.engine)
        if args.json:
            all_json.append(result_json(results, profile))
        else:
            print_perf_test(console, results, profile)
    if args.json:
        json.dump(all_json[0] if len(all_json) == 1 else all_json, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


# -- fidelity ------------------------------------------------------------------

def cmd_fidelity(args: argparse.Namespace) -> int:
    from ..report.fidelity import print_fidelity
    from ..tasks.fidelity import check_fixture

    checks = []
    for path in args.fixtures:
        checks.extend(check_fixture(path, args.engine, args.host_va_bits))
    ok = print_fidelity(rich_console(), checks, show_all=args.all)
    return 0 if ok else 1


# -- small commands --------------------------------------------------------------

def cmd_geometry(args: argparse.Namespace) -> int:
    from ..arm64.arch import Geometry, parse_granule
    g = Geometry(parse_granule(args.granule), args.ipa_bits, lpa2=args.lpa2)
    print(g.describe())
    for lv in range(g.start_level, 4):
        print(f"  level {lv}: shift {g.shift(lv)}, each entry maps {g.granule_size(lv):#x} bytes"
              f"{', blocks' if g.supports_block(lv) and lv < 3 else ''}")
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from ..model.pgtable import variants as V
    if args.check and V.get(args.check).mmu:
        return _check_mmu_variant(V.get(args.check), args.examples)
    if args.check:
        from ..tasks.variant_check import check_variant
        problems = check_variant(V.get(args.check), examples=args.examples)
        if problems:
            for p in problems:
                print(p)
            return 1
        v = V.get(args.check)
        same = ("same tables, TLBIs and cache maintenance as vanilla" if v.same_maintenance
                else "same tables and cache maintenance as vanilla, and it invalidates in "
                "every call where vanilla does")
        print(f"variant {args.check!r}: {same}, never more entries read, and the TLB model "
              "finds no break-before-make, dirty-tracking, freed-table or TLBI-level-hint "
              f"problem, on {args.examples} random workloads"
              + ("; the fast engine agrees" if v.fast_capable and not v.flag_only else ""))
        return 0
    for v in V.all_variants():
        flags = ", ".join(f"{op}: {flag_names(f)}" for op, f in v.walk_flags.items()) or "-"
        more = [f"{op} visitor" for op in v.visitors] + [f"replaces {h}" for h in v.mmu] + \
            [f"after {op} walk" for op in v.after_walk] + [f"needs {r}" for r in v.requires]
        print(f"{v.name:28} {v.description}  [{'; '.join([flags, *more])}]")
    return 0


def _check_mmu_variant(v, examples: int) -> int:
    from ..tasks.mmu_check import check_mmu
    r = check_mmu(v, examples)
    if r.problems:
        for p in r.problems:
            print(p)
        return 1
    extra = (f"; it write-protects more than vanilla (declared): the guests took "
             f"{r.extra_faults} more write faults" if v.extra_protection else
             "; no page write-protected that vanilla leaves writable")
    print(f"variant {v.name!r}: after each of {r.steps} steps of {r.workloads} workloads "
          f"({examples} random KVM workloads, perf-test runs of every granule and backing), "
          "the same dirty logs as vanilla, every page vanilla write-protected and whose dirty "
          "bit is clear write-protected, the same mappings and table pages"
          + (", the same TLB invalidations" if v.same_maintenance else "")
          + ", and the TLB model finds no break-before-make, dirty-tracking, freed-table or "
          "TLBI-level-hint problem" + extra
          + ("; the fast engine agrees" if v.fast_capable else ""))
    return 0


def flag_names(flags: int) -> str:
    from ..model.pgtable.walker import WalkFlags
    return "|".join(f.name for f in WalkFlags if f.value & flags and f.name)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..tasks.demo import run_demo
    run_demo(rich_console())
    return 0


# -- main --------------------------------------------------------------------------

def build_parser() -> Parser:
    from ..selftest.modes import modes_help
    p = Parser(prog="s2split", description="Exact work counts of arm64 KVM stage-2 huge-page "
               "splitting for dirty logging, and of walker optimizations.")
    p.add_argument("--variants", metavar="FILE", action="append", default=[],
                   help="a Python file registering more variants (repeatable; worker "
                   "processes load it too)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    pt = sub.add_parser("perf-test", help="run dirty_log_perf_test on the model",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run the upstream dirty_log_perf_test workload on the model "
                        "and print its phase lines (times estimated under a profile) and the "
                        "exact work of each phase, for each variant.", epilog=modes_help())
    from ..model.pgtable.variants import DEFAULT_VARIANTS
    add_perf_test_options(pt, DEFAULT_VARIANTS)
    pt.set_defaults(func=cmd_perf_test)

    fd = sub.add_parser("fidelity", help="compare the model with real-kernel call counts "
                        "('fidelity record': record them on this arm64 KVM host)",
                        description="Compare the model with real-kernel call counts. "
                        "'s2split fidelity record [hw run options] --output FIXTURE.json' "
                        "records such a fixture on an arm64 KVM host (see docs/hw.md).")
    fd.add_argument("fixtures", nargs="+", metavar="FIXTURE")
    fd.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto")
    fd.add_argument("--host-va-bits", type=int_arg("--host-va-bits", 32, 52), default=52,
                    help="host VA bits of the recorded kernel, for populate's THP lookups "
                    "(default: 52, Debian's arm64 kernel)")
    fd.add_argument("--all", action="store_true", help="show matching counts too")
    fd.set_defaults(func=cmd_fidelity)

    ge = sub.add_parser("geometry", help="describe a stage-2 geometry")
    ge.add_argument("--granule", default="4K")
    ge.add_argument("--ipa-bits", type=int_arg("--ipa-bits"), default=40)
    ge.add_argument("--lpa2", action="store_true")
    ge.set_defaults(func=cmd_geometry)

    va = sub.add_parser("variants", help="list variants, or check one against vanilla")
    va.add_argument("--check", metavar="NAME", help="check a variant on random workloads")
    va.add_argument("--examples", type=int_arg("--examples", 1, 1_000_000), default=25)
    va.set_defaults(func=cmd_variants)

    de = sub.add_parser("demo", help="split one 1G block under two variants")
    de.set_defaults(func=cmd_demo)

    from . import commands
    commands.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``s2split ARGV``: its exit status. Everything, argument parsing
    included, runs inside the error boundary (:func:`console.error_boundary`)."""
    from ..plumbing.console import error_boundary
    args = list(sys.argv[1:] if argv is None else argv)
    return error_boundary("s2split", lambda: _main(args))


def _main(argv: list[str]) -> int:
    try:
        if argv[:2] == ["fidelity", "record"]:  # a command of its own (numpy-free)
            from ..hw.record import main as record_main
            return record_main(argv[2:])
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        failed = flush_stdout("s2split")
        if failed is not None:
            return failed
        raise e
    except OSError as e:
        if not is_output_error(e):
            raise
        return output_failed("s2split", e)
    if not getattr(args, "func", None):
        try:
            parser.print_help()
        except OSError as e:
            if not is_output_error(e):
                raise
            return output_failed("s2split", e)
        return flush_stdout("s2split") or 2

    def load_variants() -> None:
        if args.variants:
            from ..model.pgtable.variants import load_user_variants, load_variant_files
            load_user_variants()
            load_variant_files(args.variants)  # any path, ':' included
    return run_command(args, args.command, load_variants)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
