"""The options of dirty_log_perf_test, defined and parsed in one place.

``perf-test`` (the model), ``hw run`` (the real-KVM harness), the recorded
commands of the fidelity fixtures, calibration's measurement files and
imported selftest output all read the same letters with the same
destinations, defaults and checks. Numpy-free: the harness runs on a bare
Python. Bad input is one line (argparse's ``error``) and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Sequence

from ..arm64.arch import parse_granule
from ..arm64.versions import DEFAULT_KERNEL, KERNELS
from ..plumbing.errors import S2Error
from .backing_names import UPSTREAM_NAMES
from .memstress import INT_MAX
from .modes import DEFAULT_MODE, GuestMode, mode_for, parse_mode
from .sizes import parse_size, strtol


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from ..plumbing.console import one_line
        sys.stderr.write(one_line(f"{self.prog}: error: {message}") + "\n")
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


def size_arg(what: str):
    """An argparse type: a size as the selftests' ``parse_size`` reads it."""
    def parse(text: str) -> int:
        try:
            return parse_size(text, what)
        except S2Error as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def int_arg(what: str, minimum: int | None = None, maximum: int | None = None):
    """An argparse type: an integer as ``strtol`` reads it, within bounds."""
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
    g = p.add_argument_group("dirty_log_perf_test options (upstream letters and meanings)")
    g.add_argument("-b", dest="vcpu_memory_bytes", type=size_arg("-b"), default=1 << 30,
                   metavar="SIZE", help="memory dirtied by each vCPU, e.g. 10M or 3G "
                   "(default: 1G)")
    g.add_argument("-v", dest="vcpus", type=int_arg("-v", 1, INT_MAX), default=1, metavar="N",
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
    g.add_argument("-i", dest="iterations", type=int_arg("-i", None, INT_MAX), default=2, metavar="N",
                   help="iterations, at least 2 (default: 2)")
    g.add_argument("-m", dest="mode", action="append", metavar="MODE",
                   help="guest mode ID or name, repeatable (default: 6, P40V48_4K; upstream "
                   "runs every supported mode); see the list below")
    g.add_argument("-x", dest="slots", type=int_arg("-x", 1, INT_MAX), default=1, metavar="N",
                   help="split the test memory into N memslots (default: 1)")
    g.add_argument("-w", dest="write_percent", type=int_arg("-w", 0, 100), default=100,
                   metavar="PCT", help="percentage of pages written (the rest are read) in "
                   "the dirtying passes, 0-100 (default: 100)")
    g.add_argument("-a", dest="random_access", action="store_true",
                   help="access pages at random instead of in order (default: in order)")
    g.add_argument("-o", dest="overlap", action="store_true",
                   help="overlap vCPU regions instead of partitioning them (default: "
                   "partitioned)")
    g.add_argument("-r", dest="seed", type=int_arg("-r", 1, INT_MAX), default=1,
                   metavar="SEED", help="random seed (default: 1); see --seed-synced")


def add_mode_aliases(g: Any) -> None:
    """``--granule``/``--ipa-bits``, the friendlier spelling of ``-m`` that
    :func:`selected_modes` reads (``perf-test`` and ``hw run``)."""
    g.add_argument("--granule", default=None, metavar="SIZE",
                   help="page size 4K, 16K or 64K (with --ipa-bits, instead of -m)")
    g.add_argument("--ipa-bits", type=int_arg("--ipa-bits"), default=None, metavar="N",
                   help="guest physical address bits (with --granule, instead of -m)")


def add_perf_test_options(p: argparse.ArgumentParser,
                          default_variants: Sequence[str] = ()) -> None:
    """``perf-test``'s options: upstream's, and the model's own. The variants
    run when ``--variant`` is not given are named in its help when
    DEFAULT_VARIANTS is passed (they are the page-table layer's to define)."""
    add_upstream_options(p)
    m = p.add_argument_group("model options")
    m.add_argument("-k", "--chunk-size", dest="chunk_size", type=size_arg("--chunk-size"),
                   default=None, metavar="SIZE",
                   help="KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, set right after the VM is created: "
                   "0 (eager splitting off, as upstream) or a supported block size "
                   "(default: 0)")
    add_mode_aliases(m)
    m.add_argument("--variant", action="append", metavar="NAME",
                   help="variant to run, repeatable; all run side by side on identical input"
                   + (f" (default: {', '.join(default_variants)})" if default_variants else ""))
    m.add_argument("--profile", default=None, metavar="NAME|FILE",
                   help="hardware profile for the time estimates and CPU features "
                   "(default: server-vhe)")
    m.add_argument("--cpu", default=None, metavar="FEATURES",
                   help="override the profile's CPU features, e.g. '-fwb,-tlbirange,vhe'; "
                   "errata too: '+ampere-ac04-cpu-23' (AmpereOne, on kernels with the "
                   "workaround)")
    m.add_argument("--engine", choices=("auto", "reference", "fast"), default="auto",
                   help="auto: fast engine from 64M of guest memory (default: auto)")
    m.add_argument("--seed-synced", action="store_true",
                   help="let the guest see -r (seed + vCPU index); upstream 6.10+ never copies "
                   "the seed into the guest, so vCPU k is seeded with k (default: as upstream)")
    m.add_argument("--host-va-bits", type=int_arg("--host-va-bits", 32, 52), default=48,
                   metavar="N", help="host VA bits, for the host page-table lookups of THP "
                   "faults (default: 48)")
    m.add_argument("--lpa2", action="store_true",
                   help="52-bit descriptors (FEAT_LPA2 on 4K/16K, FEAT_LPA on 64K)")
    m.add_argument("--host-page-size", default=None, metavar="SIZE",
                   help="the host kernel's page size: the stage-2 granule, and the unit of "
                   "backing pages and dirty bitmaps, while the guest writes one word per page "
                   "of the guest mode (default: the guest mode's page size)")
    m.add_argument("--kernel", choices=tuple(KERNELS), default=DEFAULT_KERNEL,
                   help="the modelled kernel (arm64/versions.py): 6.12 frees the stage-2 in "
                   "one walk; 6.19 and 7.3 walk it chunk by chunk with the newer free walker "
                   "and have the AC04_CPU_23 workaround; 7.3's selftest unmaps the memory "
                   "instead of deleting the memslots, and numbers -m modes from 15 on as "
                   "6.16+ does "
                   f"(only destroy_vm differs on the default CPU; default: {DEFAULT_KERNEL})")
    m.add_argument("--selftest", choices=tuple(KERNELS), default=None,
                   help="the kernel whose selftest source was built, if not --kernel's own "
                   "(its teardown and -m numbering; the fixtures' selftest is 6.12's)")
    m.add_argument("--json", action="store_true", help="print the results as JSON")


def selected_modes(args: argparse.Namespace) -> list[GuestMode]:
    """The guest modes of ``-m`` (each once, in ID order, as the selftest's
    ``for_each_guest_mode`` runs them) or of ``--granule/--ipa-bits``."""
    if (args.granule is None) != (args.ipa_bits is None):
        raise S2Error("--granule and --ipa-bits go together (or use -m)")
    if args.granule is not None:
        if args.mode:
            raise S2Error("use either -m or --granule/--ipa-bits, not both")
        return [mode_for(parse_granule(args.granule), args.ipa_bits)]
    if not args.mode:
        return [DEFAULT_MODE]
    numbered_by = getattr(args, "selftest", None) or getattr(args, "kernel", None)
    return sorted({m.id: m for m in (parse_mode(t, numbered_by) for t in args.mode)}.values(),
                  key=lambda m: m.id)
