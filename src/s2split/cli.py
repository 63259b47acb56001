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
import os
import sys
from typing import Any, Sequence

from .errors import S2Error
from .memstress import INT_MAX
from .sizes import strtol
from .versions import DEFAULT_KERNEL, KERNELS


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise S2Error(message)


def parse_command(text: str, where: str, add_options: Any,
                  program: str = "") -> tuple[argparse.Namespace, list[str]]:
    """Options written in a file -- a measurement's, a fixture's command, an
    imported output's ``--args`` -- parsed as the command line parses them,
    with errors as one line naming WHERE. A leading PROGRAM name is dropped;
    options the parser does not know are returned for the caller to judge."""
    import shlex
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise S2Error(f"{where}: cannot parse {text!r}: {e}") from None
    if program and argv and argv[0].endswith(program):
        argv = argv[1:]
    parser = _RaisingParser(prog=where, add_help=False)
    add_options(parser)
    try:
        return parser.parse_known_args(argv)
    except S2Error as e:
        raise S2Error(f"{where}: {e}") from None


def _console():
    from rich.console import Console
    return Console(highlight=False, soft_wrap=False, width=max(100, _term_width()))


def _term_width() -> int:
    import shutil
    return shutil.get_terminal_size((160, 40)).columns


# -- perf-test -----------------------------------------------------------------

def _size(what: str):
    def parse(text: str) -> int:
        from .sizes import parse_size
        try:
            return parse_size(text, what)
        except S2Error as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _int_arg(what: str, minimum: int | None = None, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = strtol(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not an integer") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{what} must be <= {maximum}, got {value}")
        return value
    return parse


def add_upstream_options(p: argparse.ArgumentParser, backing_type: Any = None,
                         backing_default: Any = "anonymous", backing_metavar: str = "TYPE",
                         backing_note: str = "") -> None:
    """The options of dirty_log_perf_test itself, shared by ``perf-test`` and
    ``hw run`` (same letters, destinations and defaults)."""
    from .kvm.backing import UPSTREAM_NAMES
    g = p.add_argument_group("dirty_log_perf_test options (upstream letters and meanings)")
    g.add_argument("-b", dest="vcpu_memory_bytes", type=_size("-b"), default=1 << 30,
                   metavar="SIZE", help="memory dirtied by each vCPU, e.g. 10M or 3G "
                   "(default: 1G)")
    g.add_argument("-v", dest="vcpus", type=_int_arg("-v", 1, INT_MAX), default=1, metavar="N",
                   help="number of vCPUs (default: 1)")
    g.add_argument("-s", dest="backing", type=backing_type, default=backing_default,
                   metavar=backing_metavar,
                   help="backing memory: " + ", ".join(n for n in UPSTREAM_NAMES
                                                       if not n.startswith("sh"))
                   + f"{backing_note} (default: anonymous)")
    g.add_argument("-g", dest="no_manual", action="store_true",
                   help="do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG "
                   "clears the log and enabling dirty logging write-protects and splits "
                   "everything at once (default: manual-protect + initially-set)")
    g.add_argument("-i", dest="iterations", type=_int_arg("-i", None, INT_MAX), default=2, metavar="N",
                   help="iterations, at least 2 (default: 2)")
    g.add_argument("-m", dest="mode", action="append", metavar="MODE",
                   help="guest mode ID or name, repeatable (default: 6, P40V48_4K; upstream "
                   "runs every supported mode); see the list below")
    g.add_argument("-x", dest="slots", type=_int_arg("-x", 1, INT_MAX), default=1, metavar="N",
                   help="split the test memory into N memslots (default: 1)")
    g.add_argument("-w", dest="write_percent", type=_int_arg("-w", 0, 100), default=100,
                   metavar="PCT", help="percentage of pages written (the rest are read) in "
                   "the dirtying passes, 0-100 (default: 100)")
    g.add_argument("-a", dest="random_access", action="store_true",
                   help="access pages at random instead of in order (default: in order)")
    g.add_argument("-o", dest="overlap", action="store_true",
                   help="overlap vCPU regions instead of partitioning them (default: "
                   "partitioned)")
    g.add_argument("-r", dest="seed", type=_int_arg("-r", 1, INT_MAX), default=1,
                   metavar="SEED", help="random seed (default: 1); see --seed-synced")


def add_mode_aliases(g: Any) -> None:
    """``--granule``/``--ipa-bits``, the friendlier spelling of ``-m`` that
    :func:`selected_modes` reads (``perf-test`` and ``hw run``)."""
    g.add_argument("--granule", default=None, metavar="SIZE",
                   help="page size 4K, 16K or 64K (with --ipa-bits, instead of -m)")
    g.add_argument("--ipa-bits", type=_int_arg("--ipa-bits"), default=None, metavar="N",
                   help="guest physical address bits (with --granule, instead of -m)")


def add_perf_test_options(p: argparse.ArgumentParser) -> None:
    from .pgtable.variants import DEFAULT_VARIANTS
    add_upstream_options(p)
    m = p.add_argument_group("model options")
    m.add_argument("-k", "--chunk-size", dest="chunk_size", type=_size("--chunk-size"),
                   default=None, metavar="SIZE",
                   help="KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, set right after the VM is created: "
                   "0 (eager splitting off, as upstream) or a supported block size "
                   "(default: 0)")
    add_mode_aliases(m)
    m.add_argument("--variant", action="append", metavar="NAME",
                   help="variant to run, repeatable; all run side by side on identical input "
                   f"(default: {', '.join(DEFAULT_VARIANTS)})")
    m.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help="hardware profile for the time estimates and CPU features "
                   "(default: server-vhe)")
    m.add_argument("--cpu", default=None, metavar="FEATURES",
                   help="override the profile's CPU features, e.g. '-fwb,-tlbirange,vhe'")
    m.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto",
                   help="auto: fast engine from 64M of guest memory (default: auto)")
    m.add_argument("--seed-synced", action="store_true",
                   help="let the guest see -r (seed + vCPU index); upstream 6.10+ never copies "
                   "the seed into the guest, so vCPU k is seeded with k (default: as upstream)")
    m.add_argument("--host-va-bits", type=_int_arg("--host-va-bits", 32, 52), default=48,
                   metavar="N", help="host VA bits, for the host page-table lookups of THP "
                   "faults (default: 48)")
    m.add_argument("--lpa2", action="store_true",
                   help="52-bit descriptors (FEAT_LPA2 on 4K/16K, FEAT_LPA on 64K)")
    m.add_argument("--host-page-size", default=None, metavar="SIZE",
                   help="the host kernel's page size: the stage-2 granule, and the unit of "
                   "backing pages and dirty bitmaps, while the guest writes one word per page "
                   "of the guest mode (default: the guest mode's page size)")
    m.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                   help="kernel rules: 6.19 tears the stage-2 down in chunks with the newer "
                   "free walker (only destroy_vm changes; default: 6.12)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")


def selected_modes(args: argparse.Namespace) -> list[Any]:
    """The guest modes of ``-m`` (each once, in ID order, as the selftest's
    ``for_each_guest_mode`` runs them) or of ``--granule/--ipa-bits``."""
    from .arch import parse_granule
    from .modes import DEFAULT_MODE, mode_for, parse_mode
    if (args.granule is None) != (args.ipa_bits is None):
        raise S2Error("--granule and --ipa-bits go together (or use -m)")
    if args.granule is not None:
        if args.mode:
            raise S2Error("use either -m or --granule/--ipa-bits, not both")
        return [mode_for(parse_granule(args.granule), args.ipa_bits)]
    if not args.mode:
        return [DEFAULT_MODE]
    return sorted({m.id: m for m in map(parse_mode, args.mode)}.values(), key=lambda m: m.id)


def perf_test_params(args: argparse.Namespace) -> list[Any]:
    """Params for each selected mode, from parsed options."""
    from .arch import parse_granule
    from .cost import load_profile
    from .features import Features
    from .workload import PerfTestParams

    profile = load_profile(args.profile)
    features = profile.features
    if args.cpu:
        features = Features.parse(args.cpu, base=features)
    modes = selected_modes(args)
    host_page = None if args.host_page_size is None else parse_granule(args.host_page_size)
    out = []
    for mode in modes:
        p = PerfTestParams(
            vcpu_memory_bytes=args.vcpu_memory_bytes, vcpus=args.vcpus, backing=args.backing,
            manual_protect=not args.no_manual, iterations=args.iterations, mode=mode,
            slots=args.slots, write_percent=args.write_percent,
            random_access=args.random_access, partition=not args.overlap, seed=args.seed,
            chunk_size=args.chunk_size or 0, seed_synced=args.seed_synced, features=features,
            host_va_bits=args.host_va_bits, lpa2=args.lpa2, kernel=args.kernel,
            host_page_size=host_page)
        p.geometry()  # validate the IPA size for this granule now
        p.backing_type()
        out.append(p)
    return out


def cmd_perf_test(args: argparse.Namespace) -> int:
    from .cost import load_profile
    from .pgtable.variants import DEFAULT_VARIANTS, get
    from .report.perftest import print_perf_test, result_json
    from .workload import memstress_layout, run_variants

    profile = load_profile(args.profile)
    variants = [get(v) for v in (args.variant or DEFAULT_VARIANTS)]
    all_json = []
    console = _console()
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
    from .report.fidelity import print_fidelity
    from .fidelity import check_fixture

    checks = []
    for path in args.fixtures:
        checks.extend(check_fixture(path, args.engine, args.host_va_bits))
    ok = print_fidelity(_console(), checks, show_all=args.all)
    return 0 if ok else 1


# -- small commands --------------------------------------------------------------

def cmd_geometry(args: argparse.Namespace) -> int:
    from .arch import Geometry, parse_granule
    g = Geometry(parse_granule(args.granule), args.ipa_bits, lpa2=args.lpa2)
    print(g.describe())
    for lv in range(g.start_level, 4):
        print(f"  level {lv}: shift {g.shift(lv)}, each entry maps {g.granule_size(lv):#x} bytes"
              f"{', blocks' if g.supports_block(lv) and lv < 3 else ''}")
    return 0


def cmd_variants(args: argparse.Namespace) -> int:
    from .pgtable import variants as V
    if args.check:
        from .pgtable.check import check_variant
        problems = check_variant(V.get(args.check), examples=args.examples)
        if problems:
            for p in problems:
                print(p)
            return 1
        print(f"variant {args.check!r}: same tables, TLBIs and cache maintenance as vanilla, "
              f"never more entries read, on {args.examples} random workloads")
        return 0
    for v in V.all_variants():
        flags = ", ".join(f"{op}: {flag_names(f)}" for op, f in v.walk_flags.items()) or "-"
        print(f"{v.name:28} {v.description}  [{flags}]")
    return 0


def flag_names(flags: int) -> str:
    from .pgtable.walker import WalkFlags
    return "|".join(f.name for f in WalkFlags if f.value & flags and f.name)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(_console())
    return 0


# -- main --------------------------------------------------------------------------

def build_parser() -> Parser:
    from .modes import modes_help
    p = Parser(prog="s2split", description="Exact work counts of arm64 KVM stage-2 huge-page "
               "splitting for dirty logging, and of walker optimizations.")
    p.add_argument("--variants", metavar="FILE", action="append", default=[],
                   help="a Python file registering more variants (repeatable; sets "
                   "S2SPLIT_VARIANTS for worker processes too)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    pt = sub.add_parser("perf-test", help="run dirty_log_perf_test on the model",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run the upstream dirty_log_perf_test workload on the model "
                        "and print its phase lines (times estimated under a profile) and the "
                        "exact work of each phase, for each variant.", epilog=modes_help())
    add_perf_test_options(pt)
    pt.set_defaults(func=cmd_perf_test)

    fd = sub.add_parser("fidelity", help="compare the model with real-kernel call counts")
    fd.add_argument("fixtures", nargs="+", metavar="FIXTURE")
    fd.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto")
    fd.add_argument("--host-va-bits", type=_int_arg("--host-va-bits", 32, 52), default=52,
                    help="host VA bits of the recorded kernel, for populate's THP lookups "
                    "(default: 52, Debian's arm64 kernel)")
    fd.add_argument("--all", action="store_true", help="show matching counts too")
    fd.set_defaults(func=cmd_fidelity)

    ge = sub.add_parser("geometry", help="describe a stage-2 geometry")
    ge.add_argument("--granule", default="4K")
    ge.add_argument("--ipa-bits", type=_int_arg("--ipa-bits"), default=40)
    ge.add_argument("--lpa2", action="store_true")
    ge.set_defaults(func=cmd_geometry)

    va = sub.add_parser("variants", help="list variants, or check one against vanilla")
    va.add_argument("--check", metavar="NAME", help="check a variant on random workloads")
    va.add_argument("--examples", type=_int_arg("--examples", 1), default=25)
    va.set_defaults(func=cmd_variants)

    de = sub.add_parser("demo", help="split one 1G block under two variants")
    de.set_defaults(func=cmd_demo)

    from . import commands
    commands.register(sub)
    return p


def run_command(args: argparse.Namespace, name: str, before: Any = None) -> int:
    """Run a parsed command the way every s2split command ends: its status, or
    a one-line error and 2 (130 on Ctrl-C)."""
    try:
        if before:
            before()
        return int(args.func(args) or 0)
    except S2Error as e:
        sys.stderr.write(f"s2split {name}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("s2split: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    def load_variants() -> None:
        if args.variants:
            from .pgtable.variants import ENV, load_user_variants
            files = [os.path.abspath(f) for f in args.variants]
            os.environ[ENV] = os.pathsep.join(filter(None, [os.environ.get(ENV), *files]))
            load_user_variants()
    return run_command(args, args.command, load_variants)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
