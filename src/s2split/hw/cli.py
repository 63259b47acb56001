"""``s2split hw``: run the real-KVM harness, import upstream output, compare.

* ``hw run``: the ``dirty_log_perf_test`` phases on this machine's /dev/kvm,
  timed from userspace, into the results store (or a JSON file);
* ``hw import``: the output of the upstream selftest, into the store;
* ``hw import-json``: results that ``hw run --json`` wrote elsewhere (e.g. in
  a minimal VM without numpy), into the store;
* ``hw compare``: two labelled result sets, phase by phase, with the model's
  estimate alongside.

``hw run`` imports nothing beyond the standard library and s2split's
numpy-free modules unless it writes to the store, so ``python3 -m s2split.hw
run ... --json FILE`` runs on a bare Python.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..plumbing.errors import S2Error
from ..selftest.memstress import INT_MAX
from ..selftest.options import (Parser, add_mode_aliases, add_upstream_options, int_arg,
                                selected_modes, size_arg)

DEFAULT_DB = "s2split-results.sqlite"  # s2split.storage.store.DEFAULT_DB, without importing numpy
JSON_FORMAT = "s2split-hw-run/1"
MIB = 1 << 20


def _list(what: str, parse):
    def f(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        return [parse(t) for t in items]
    return f


def _chunk(text: str) -> int:
    return 0 if text.strip() == "0" else size_arg("--chunk-size")(text)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of ``s2split perf-test`` that mean something on a real host
    (same letters, destinations and defaults), plus the harness's own."""
    add_upstream_options(p, backing_type=_list("-s", str), backing_default=["anonymous"],
                         backing_metavar="TYPE[,TYPE...]", backing_note="; a comma list runs each")
    h = p.add_argument_group("harness options")
    h.add_argument("-k", "--chunk-size", dest="chunk_size", type=_list("--chunk-size", _chunk),
                   default=None, metavar="SIZE[,SIZE...]",
                   help="KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, set before the first memslot: 0 "
                   "(off) or a supported block size; a comma list runs each (default: not "
                   "set, as upstream)")
    add_mode_aliases(h)
    h.add_argument("--seed-synced", action="store_true",
                   help="seed vCPU k with -r + k; upstream 6.10+ never copies the seed into the "
                   "guest, so vCPU k is seeded with k (default: as upstream)")
    h.add_argument("--x86-map", choices=("2M", "1G"), default="2M",
                   help="x86-64 only: guest page-table mappings of the test memory "
                   "(default: 2M)")
    h.add_argument("--pass-timeout", type=_nonnegative("--pass-timeout", "s"), default=None,
                   metavar="SECONDS", help="stop a guest pass (populate or dirtying) that "
                   "runs longer and fail the run, so that a hung guest cannot hang the "
                   "harness; 0 for no limit (default: 600 s + 20 us per page of a vCPU's "
                   "region)")
    h.add_argument("--repeat", type=int_arg("--repeat", 1, INT_MAX), default=1, metavar="N",
                   help="run every configuration N times, interleaved (default: 1)")
    h.add_argument("--label", default=None,
                   help="name of this result set, e.g. the kernel (default: the kernel "
                   "release)")
    h.add_argument("--db", default=None, metavar="PATH",
                   help=f"results store (default: {DEFAULT_DB}, unless --json)")
    h.add_argument("--json", default=None, metavar="FILE",
                   help="write the results as JSON instead (numpy-free; load them later with "
                   "'s2split hw import-json')")
    h.add_argument("--verify", action="store_true",
                   help="check every dirty bitmap against the pages the guest wrote, and the "
                   "memory against the values written (exit 1 on a mismatch)")
    h.add_argument("--allow-partial", action="store_true",
                   help="time THP or hugetlb memory that is not fully backed by its page size "
                   "(after populate, from /proc/self/smaps) and record the coverage, instead "
                   "of refusing")
    h.add_argument("--keep-bitmaps", action="store_true",
                   help="put each iteration's dirty bitmap in the JSON output")
    h.add_argument("--kvm", default="/dev/kvm", metavar="PATH", help="the KVM device")


def run_params(args: argparse.Namespace) -> list[Any]:
    """Every configuration the options ask for (modes x backings x chunk sizes)."""
    from .params import HwParams

    modes = selected_modes(args)
    chunks = args.chunk_size if args.chunk_size is not None else [None]
    out = []
    for mode in modes:
        for backing in args.backing:
            for chunk in chunks:
                out.append(HwParams(
                    vcpu_memory_bytes=args.vcpu_memory_bytes, vcpus=args.vcpus,
                    backing=backing, manual_protect=not args.no_manual,
                    iterations=args.iterations, mode=mode, slots=args.slots,
                    write_percent=args.write_percent, random_access=args.random_access,
                    partition=not args.overlap, seed=args.seed, chunk_size=chunk,
                    seed_synced=args.seed_synced,
                    x86_map=1 << 30 if args.x86_map == "1G" else 1 << 21))
    return out


def _bitmap_hex(pages: list[int], npages: int) -> str:
    value = 0
    for p in pages:
        value |= 1 << p
    return value.to_bytes((npages + 63) // 64 * 8, "little").hex()


def cmd_run(args: argparse.Namespace) -> int:
    import platform

    from .fingerprint import fingerprint
    from .harness import check_backing_name, measurement_rows, run_config
    from .kvm import Kvm
    from .params import memstress_layout

    from .kvm import backing_page_size

    if args.json is not None and args.db is not None:
        raise S2Error("use either --db or --json, not both")
    configs = run_params(args)
    for p in configs:  # layout errors before any work
        check_backing_name(p)
        memstress_layout(p, backing_page_size(p.backing))
    store = None
    if args.json is None:
        store = _open_store(args.db or DEFAULT_DB)
    kvm = Kvm(args.kvm)
    try:
        host = fingerprint(kvm)
        label = args.label or platform.release()
        from .backing_check import damon_stat_on
        if damon_stat_on(host.get("settings")):
            print("warning: DAMON_STAT is on (damon_stat.enabled=N on the kernel command "
                  "line turns it off): it samples the guest memory during the runs",
                  file=sys.stderr)
        rows: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        problems = 0
        print(f"Test iterations: {args.iterations}")
        for rep in range(args.repeat):
            shift = rep % len(configs)
            order = configs[shift:] + configs[:shift]  # interleaved, rotated each round
            for p in order:
                if args.repeat > 1:
                    print(f"# repetition {rep + 1}/{args.repeat}: {p.config_key()}")
                result = run_config(p, print, verify=args.verify,
                                    keep_bitmaps=args.keep_bitmaps, kvm=kvm,
                                    pass_timeout=pass_timeout_option(args.pass_timeout),
                                    backing_check="record" if args.allow_partial else "refuse")
                rows += measurement_rows(result, label, rep, host)
                run = {"config_key": p.config_key(), "repetition": rep,
                       "capabilities": result.capabilities, "layout":
                       {"gpa": result.layout.gpa, "size": result.layout.size,
                        "slots": [list(s) for s in result.layout.slots]},
                       "checks": result.checks, "problems": result.problems,
                       "backing": result.backing()}
                if args.keep_bitmaps:
                    npages = {s: pages * p.granule // _host_page() for s, _, pages in
                              result.layout.slots}
                    run["bitmaps"] = [{str(s): _bitmap_hex(v, npages[s]) for s, v in it.items()}
                                      for it in result.bitmaps]
                runs.append(run)
                for problem in result.problems:
                    print(f"verify: {problem}", file=sys.stderr)
                problems += len(result.problems)
                if args.verify and not result.problems:
                    print(f"verify: {len(result.checks)} checks passed")
    finally:
        kvm.close()
    if args.json is not None:
        doc = {"format": JSON_FORMAT, "label": label, "host": host, "rows": rows,
               "runs": runs}
        _write_json(args.json, doc)
        print(f"wrote {len(rows)} measurements of {len(configs)} configuration(s) as "
              f"'{label}' to {args.json}")
    else:
        n = _add_rows(store, rows)
        print(f"stored {n} measurements of {len(configs)} configuration(s) as '{label}' in "
              f"{store.path}")
        store.close()
    return 1 if problems else 0


def _host_page() -> int:
    from .kvm import host_page_size
    return host_page_size()


def _write_json(path: str, doc: dict[str, Any]) -> None:
    from ..plumbing.output import write_atomic  # numpy-free, like the rest of hw run
    write_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _open_store(path: str, create: bool = True):
    try:
        from ..storage.store import Store
    except ImportError as e:
        raise S2Error(f"the results store cannot be opened here ({e}); write the results "
                      "with --json FILE and load them with 's2split hw import-json FILE' "
                      "where s2split is fully installed") from None
    return Store.open(path, create=create)


def _add_rows(store, rows: list[dict[str, Any]] | list[list[dict[str, Any]]]) -> int:
    """Add rows in one transaction, numbering repetitions after those already
    stored for the same label and configuration. ROWS may be a list of
    batches (one per imported file), each numbered after the ones before."""
    batches = rows if rows and isinstance(rows[0], list) else [rows]
    offsets: dict[tuple[str, str], int] = {}
    for label in {r.get("label") for b in batches for r in b} - {None}:
        for m in store.measurements(label):
            k = (label, m["config_key"])
            offsets[k] = max(offsets.get(k, 0), m["repetition"] + 1)
    out = []
    for batch in batches:
        moved = [dict(r, repetition=r["repetition"] + offsets.get((r["label"], r["config_key"]),
                                                                   0))
                 if isinstance(r.get("repetition"), int) else r for r in batch]
        for r in moved:
            if isinstance(r.get("repetition"), int):
                k = (r["label"], r["config_key"])
                offsets[k] = max(offsets.get(k, 0), r["repetition"] + 1)
        out += moved
    return store.add_measurements(out)


def _check_rows(batches: list[list[dict[str, Any]]], db: str) -> None:
    """Every row passes the store's own check (repetitions are numbered
    after the stored ones later, and checked again then)."""
    try:
        from ..storage.store import check_new_measurements
    except ImportError:
        return  # _open_store says why the store cannot be used
    check_new_measurements([r for b in batches for r in b], db)


# -- import ------------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from .selftest import import_rows, parse_output

    from ..plumbing.validate import read_bytes
    every: list[list[dict[str, Any]]] = []
    for path in args.files:  # every file is read and checked before anything is stored
        text = read_bytes(path, "selftest output").decode("utf-8", errors="replace")
        parsed = parse_output(text, path)
        rows, notes = import_rows(parsed, args.label, args.args, source=f"import {path}")
        for note in notes:
            print(f"{path}: {note}")
        every.append(rows)
    _check_rows(every, args.db)  # before a database is created
    store = _open_store(args.db)
    try:
        total = _add_rows(store, every) if any(every) else 0  # all rows or none
    finally:
        store.close()
    print(f"stored {total} measurements as '{args.label}' in {store.path}")
    return 0


def cmd_import_json(args: argparse.Namespace) -> int:
    from ..storage.schemas import HW_RUN
    from ..plumbing.validate import check, read_json
    docs = []
    for path in args.files:  # every file is checked before anything is stored
        doc = read_json(path, "hw run JSON", invalid="is not JSON")
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise S2Error(f"{path} is not the output of 's2split hw run --json' (format "
                          f"{JSON_FORMAT!r})")
        check(doc, HW_RUN, path)
        docs.append((path, doc))
    every: list[list[dict[str, Any]]] = []
    for path, doc in docs:
        rows = doc.get("rows", [])
        if args.label:
            rows = [dict(r, label=args.label) for r in rows]
        every.append(rows)
        bad = sum(len(r.get("problems", [])) for r in doc.get("runs", []))
        if bad:
            print(f"{path}: warning: verification found {bad} problem(s) in these runs")
    _check_rows(every, args.db)  # before a database is created
    store = _open_store(args.db)
    try:
        total = _add_rows(store, every) if any(every) else 0  # all rows or none
    finally:
        store.close()
    print(f"stored {total} measurements in {store.path}")
    return 0


# -- compare -------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_labels, print_comparison

    store = _open_store(args.db, create=False)
    try:
        report = compare_labels(store, args.a, args.b, threshold=args.threshold / 100,
                                alpha=args.alpha, min_reps=args.min_reps, max_cv=args.max_cv / 100,
                                model=not args.no_model, profile=args.profile,
                                config=args.config, seed=args.bootstrap_seed)
    finally:
        store.close()
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_comparison(report)
    return 1 if report.regressions else 0


def _nonnegative(what: str, unit: str):
    """A finite number >= 0, optionally written with its UNIT ("5%", "30s")."""
    def parse(text: str) -> float:
        try:
            v = float(text.strip().removesuffix(unit))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise argparse.ArgumentTypeError(f"{what} must be a finite number >= 0, "
                                             f"got {text!r}")
        return v
    return parse


def _significance(text: str) -> float:
    v = _nonnegative("--alpha", "")(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"--alpha must be between 0 and 1, got {text!r}")
    return v


def pass_timeout_option(seconds: float | None) -> float | None:
    """``--pass-timeout`` for :func:`run_config`: not given is its default
    (negative), 0 is no limit."""
    if seconds is None:
        return -1.0
    return seconds or None


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The hw subcommands; returns their subparsers, for the subcommands that
    need the model (``hw plan``, registered by :mod:`s2split.cli.commands`)."""
    hw = sub.add_parser("hw", help="real KVM: time the dirty-log ioctls, import upstream "
                        "results, compare kernels",
                        description="The real-KVM harness: 'run' times the "
                        "dirty_log_perf_test phases on /dev/kvm from userspace, 'import' "
                        "reads the upstream selftest's output, 'compare' tells whether two "
                        "labelled result sets (e.g. kernels) differ.")
    hsub = hw.add_subparsers(dest="hw_command", metavar="SUBCOMMAND", parser_class=Parser)
    hw.set_defaults(func=lambda a: (hw.print_help(), 2)[1])

    from ..selftest.modes import modes_help
    rp = hsub.add_parser("run", help="run the phases on this machine's KVM and store the times",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run dirty_log_perf_test's phases on a real VM created on "
                         "/dev/kvm (arm64 or x86-64), timing each from userspace, and store "
                         "the times with a fingerprint of the host.", epilog=modes_help())
    add_run_options(rp)
    rp.set_defaults(func=cmd_run)

    ip = hsub.add_parser("import", help="import dirty_log_perf_test output",
                         description="Parse the output of the upstream dirty_log_perf_test "
                         "(any version since -f became -w; every guest mode in it) into the "
                         "results store. Failed and skipped runs are reported, not stored.")
    ip.add_argument("files", nargs="+", metavar="FILE")
    ip.add_argument("--label", required=True, help="name of this result set, e.g. the kernel")
    ip.add_argument("--args", default="", metavar="OPTIONS",
                    help="the options the selftest ran with, e.g. \"-b 1G -s anonymous_thp "
                    "-v 4\" (what the output does not say: backing, vCPUs, ...)")
    ip.add_argument("--db", default=DEFAULT_DB)
    ip.set_defaults(func=cmd_import)

    jp = hsub.add_parser("import-json", help="import the JSON of 'hw run --json'")
    jp.add_argument("files", nargs="+", metavar="FILE")
    jp.add_argument("--label", default=None, help="store under this label instead")
    jp.add_argument("--db", default=DEFAULT_DB)
    jp.set_defaults(func=cmd_import_json)

    cp = hsub.add_parser("compare", help="compare two labelled result sets",
                         description="Per configuration and phase: the medians of A and B, "
                         "the relative change (B vs A) with a bootstrap confidence interval, "
                         "the Mann-Whitney U p-value, and the model's estimate. Exit status 1 "
                         "when B is significantly slower than A by more than the threshold.")
    cp.add_argument("a", metavar="LABEL_A", help="the baseline")
    cp.add_argument("b", metavar="LABEL_B", help="the candidate")
    cp.add_argument("--db", default=DEFAULT_DB)
    cp.add_argument("--threshold", type=_nonnegative("--threshold", "%"), default=5.0,
                    metavar="PCT",
                    help="smallest slowdown that counts as a regression (default: 5)")
    cp.add_argument("--alpha", type=_significance, default=0.05,
                    help="significance level, Holm-corrected over all rows (default: 0.05)")
    cp.add_argument("--min-reps", type=int_arg("--min-reps", 1, INT_MAX), default=9,
                    help="warn below this many repetitions (default: 9)")
    cp.add_argument("--max-cv", type=_nonnegative("--max-cv", "%"), default=10.0, metavar="PCT",
                    help="warn when a sample's coefficient of variation exceeds this "
                    "(default: 10)")
    cp.add_argument("--config", default=None, metavar="KEY",
                    help="only this configuration (its options, as listed)")
    cp.add_argument("--no-model", action="store_true", help="leave out the model's estimates")
    cp.add_argument("--profile", default=None, help="cost profile for the model's estimates")
    cp.add_argument("--bootstrap-seed", type=int_arg("--bootstrap-seed", 0, (1 << 64) - 1),
                    default=0, help=argparse.SUPPRESS)
    cp.add_argument("--json", action="store_true", help="print the comparison as JSON")
    cp.set_defaults(func=cmd_compare)
    return hsub
