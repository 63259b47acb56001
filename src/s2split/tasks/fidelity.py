"""Check the model against call counts of the real kernel (``s2split fidelity``).

A fixture (format ``s2split-real-kernel-counts/1``) records, per phase of a
``dirty_log_perf_test`` run, how often each stage-2 function was called in a
real kernel. This module re-runs the recorded command on the model and
compares, function by function and key by key (``level=``, ``visit=``,
``cb=``, ``force_pte=``), the phases that touch only the test memslots.
``populate``, ``create_vm`` and ``destroy_vm`` also contain the selftest's own
memslot 0 and are shown for information. ``__kvm_mmu_topup_memory_cache``
depends on rescheduling: the kernel's count must be at least the model's.
A function the fixture never mentions was not traced and is not compared.

The fixture says what ran: ``selftest_variant`` (a build whose name contains
``seedfix`` synced the seed into the guest: the model's ``--seed-synced``) and
``kernel_variant`` (a kernel implementing one of the model's split-walk
variants; compared with that variant). In runs whose fault path depends on how
vCPUs interleave (``-o`` with ``-v`` > 1), the fault-path counts of the
passes are compared as bounds (:mod:`s2split.tasks.interleaving`). Every field,
value, key or function that is not compared is reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arm64.versions import DEFAULT_KERNEL, KernelRules, kernel_for_release, kernel_rules
from ..counting.kernel_counters import LOWER_BOUND, comparable_key, kernel_counts
from ..model.pgtable.variants import VANILLA, Variant
from ..plumbing.errors import S2Error
from ..workload import PerfTestParams, RunResult, run_perf_test
from .background import (BACKGROUND_WALKERS, LOOPS, WALK, Background, loop_bound,
                         run_background, walk_bound)
from .background import note as background_note
from .interleaving import FAULT_PATH, NO_HINT_FUNCTION, NO_HINT_NOTE, PassBound

FIXTURE_FORMAT = "s2split-real-kernel-counts/1"
INFO_PHASES = ("create_vm", "populate", "destroy_vm")
#: Fields fidelity reads or knows to be descriptive; anything else is reported.
TOP_FIELDS = {"format", "name", "kernel_release", "qemu", "how", "caveats", "selftest_variant",
              "kernel_variant", "recorder", "host", "traced_functions", "missing_functions"}
RUN_FIELDS = {"label", "command", "exit_status", "guest_mode", "gpa_range",
              "eager_split_chunk_size", "printed_times_s_emulated", "phases", "config_key",
              "problems"}
PHASE_FIELDS = {"phase", "calls", "detail"}
#: selftest builds that behave like the upstream selftest plus ``-k`` for the
#: test memslots (the fixtures' own and ``s2split fidelity record``'s harness).
PLAIN_SELFTESTS = ("upstream", "upstream+k", "s2split-hw")
LABELS = {"no_manual_protect": False, "manual_protect": True}


@dataclass
class Row:
    phase: str
    function: str
    key: str  # "" for the call total
    field: str
    kernel: int
    model: int
    compared: bool
    ok: bool
    note: str = ""
    lo: int | None = None  # a bound row: the kernel's count must lie in [lo, hi]
    hi: int | None = None  # None with lo set: no upper bound

    @property
    def bound(self) -> bool:
        return self.lo is not None

    @property
    def excess(self) -> int:
        """How far the kernel's count lies outside what is allowed (0: inside)."""
        if not self.bound:
            return abs(self.kernel - self.model)
        if self.kernel < self.lo:
            return self.lo - self.kernel
        if self.hi is not None and self.kernel > self.hi:
            return self.kernel - self.hi
        return 0


@dataclass
class RunCheck:
    fixture: str
    label: str
    command: str
    params: PerfTestParams
    rows: list[Row] = field(default_factory=list)
    layout_ok: bool = True
    layout_note: str = ""
    variant: str = "vanilla"
    notes: list[str] = field(default_factory=list)  # this run's reported oddities
    fixture_notes: list[str] = field(default_factory=list)  # shared by a fixture's runs
    bound_notes: dict[str, str] = field(default_factory=dict)  # phase -> why bounds

    @property
    def mismatches(self) -> list[Row]:
        return [r for r in self.rows if r.compared and not r.ok]

    @property
    def compared(self) -> int:
        return sum(1 for r in self.rows if r.compared)

    @property
    def compared_exact(self) -> int:
        return sum(1 for r in self.rows if r.compared and not r.bound)

    @property
    def compared_bounds(self) -> int:
        return sum(1 for r in self.rows if r.compared and r.bound)


def _fail(path: str, problem: str) -> S2Error:
    return S2Error(f"{path}: {problem}")


def load_fixture(path: str | Path) -> dict[str, Any]:
    """Read and validate a fixture (:data:`s2split.storage.schemas.FIXTURE`); errors
    name the file and the key. A function name the model does not know is an
    error too: its counts could never be compared, so "all match" would lie."""
    from ..counting.kernel_counters import KERNEL_FUNCTIONS
    from ..storage.schemas import FIXTURE
    from ..plumbing.validate import check, read_json
    p = str(path)
    data = read_json(path, "fixture", invalid="not valid JSON (truncated?)")
    if not isinstance(data, dict):
        raise _fail(p, "the top level must be a JSON object")
    if data.get("format") != FIXTURE_FORMAT:
        raise _fail(p, f"format is {data.get('format')!r}, expected {FIXTURE_FORMAT!r}")
    check(data, FIXTURE, p)  # selftest_variant and kernel_variant are strings there too
    known = set(KERNEL_FUNCTIONS)
    for i, run in enumerate(data["runs"]):
        for j, ph in enumerate(run["phases"]):
            for part in ("calls", "detail"):
                for fn in ph.get(part, {}):
                    if fn not in known:
                        raise _fail(p, f"runs[{i}].phases[{j}].{part}: unknown kernel "
                                       f"function {fn!r} (the model counts "
                                       f"{len(known)} functions; see counting/kernel_counters.py)")
    return data


@dataclass
class Description:
    """What a fixture says ran, as the model reads it."""

    seed_synced: bool
    variant: Variant
    notes: list[str]
    kernel: str = DEFAULT_KERNEL  # whose rules the model applies (kernel_release)
    selftest: str | None = None   # whose selftest source ran (None: the kernel's)


def describe_fixture(path: str, data: dict[str, Any]) -> Description:
    """The selftest build and kernel variant of a loaded fixture, and every
    field fidelity does not use (an unknown kernel variant is an error)."""
    from ..model.pgtable.variants import get

    notes = []
    selftest = data.get("selftest_variant")
    seed_synced = False
    if selftest is not None:
        if "seedfix" in selftest:
            seed_synced = True
            notes.append(f"selftest_variant {selftest!r}: the seed is synced into the guest "
                         "(compared with --seed-synced)")
        elif selftest not in PLAIN_SELFTESTS:
            notes.append(f"selftest_variant {selftest!r} not understood: compared as the "
                         "upstream selftest plus -k (guest vCPU k seeded with k)")
    variant = VANILLA
    if "kernel_variant" in data:
        try:
            variant = get(data["kernel_variant"])
        except S2Error as e:
            raise _fail(path, f"kernel_variant: {e}") from None
        notes.append(f"kernel_variant {variant.name!r}: compared with the model's "
                     f"{variant.name} split walk")
    for key in sorted(set(data) - TOP_FIELDS - {"runs"}):
        notes.append(f"field {key!r} not understood (not used)")
    missing = data.get("missing_functions")
    if isinstance(missing, dict) and missing:
        notes.append("not traced on that kernel: " + ", ".join(
            f"{fn} ({why})" for fn, why in sorted(missing.items())))
    kernel, why = kernel_for_release(str(data.get("kernel_release", "")))
    if why:
        notes.append(why)
    selftest = selftest_source(data)
    notes.append(f"modelled kernel: Linux {kernel} ({kernel_summary(kernel_rules(kernel))})"
                 + (f"; selftest built from Linux {selftest}'s source" if selftest else ""))
    return Description(seed_synced, variant, notes, kernel, selftest)


def selftest_source(data: dict[str, Any]) -> str | None:
    """The modelled kernel whose selftest source a fixture ran, when its
    ``how`` names another tree (``linux-source-6.12``); None: the kernel's own."""
    import re

    from ..arm64.versions import nearest_kernel
    m = re.search(r"linux-source-(\d+\.\d+)", str(data.get("how", "")))
    return nearest_kernel(m.group(1)) if m else None


def kernel_summary(rules: KernelRules) -> str:
    return (f"teardown {' + '.join(rules.destroy_functions)}"
            f"{', chunked' if rules.chunked_destroy else ''}, "
            f"free walker {'6.19+' if rules.free_clears_tables else '6.12'}, "
            f"errata: {', '.join(sorted(rules.errata)) or 'none'}")


def params_from_command(command: str, fixture: str, host_va_bits: int = 52,
                        seed_synced: bool = False, kernel: str = DEFAULT_KERNEL,
                        selftest: str | None = None) -> PerfTestParams:
    """The model configuration of a recorded ``dirty_log_perf_test`` command
    (upstream's options and the fixtures' ``-k``, read as ``perf-test`` reads
    them), with the CPU features of the QEMU host the fixtures were traced on.
    ``seed_synced``: the selftest build synced the seed into the guest."""
    from ..selftest.options import add_perf_test_options, parse_command
    from .perftest import perf_test_params
    args, extra = parse_command(command, f"{fixture}: command", add_perf_test_options,
                                program="dirty_log_perf_test")
    if extra:
        raise _fail(fixture, f"option(s) {' '.join(extra)} of {command!r} are not modelled")
    args.profile, args.host_va_bits = "qemu-tcg", host_va_bits
    args.kernel, args.selftest = kernel, selftest
    args.seed_synced = args.seed_synced or seed_synced
    params = perf_test_params(args)
    if len(params) != 1:
        raise _fail(fixture, f"{command!r}: one guest mode per run")
    return params[0]


def _bounded_row(phase: str, fn: str, key: str, fld: str, kv: int, mv: int, compared: bool,
                 bound: PassBound) -> Row:
    no_hint = fn == NO_HINT_FUNCTION and bool(key) and mv == 0
    lo = 0 if no_hint else mv
    hi = bound.upper(fn, key, fld, mv)
    if hi == lo:  # an extra fault never reaches it: nothing to bound
        return Row(phase, fn, key, fld, kv, mv, compared, kv == mv)
    ok = kv >= lo and (hi is None or kv <= hi)
    return Row(phase, fn, key, fld, kv, mv, compared, ok,
               NO_HINT_NOTE if no_hint else "interleaving-dependent", lo, hi)


def _widen(row: Row, add_lo: int, add_hi: int, why: str) -> Row:
    """A row with the background's share added to what it allows."""
    lo = (row.lo if row.bound else row.model) + add_lo
    hi = None if row.bound and row.hi is None else \
        (row.hi if row.bound else row.model) + add_hi
    ok = row.kernel >= lo and (hi is None or row.kernel <= hi)
    return Row(row.phase, row.function, row.key, row.field, row.kernel, row.model,
               row.compared, ok, why, lo, hi)


def _background_rows(rows: list[Row], bg: Background, levels: int) -> list[Row]:
    """Background walks: their own ``cb=`` keys are shown, not compared; the
    walk and loop counts are widened by what they may add (tasks/background.py)."""
    out = []
    for r in rows:
        cb = r.key.removeprefix("cb=") if r.function == WALK else ""
        if cb in BACKGROUND_WALKERS:
            out.append(Row(r.phase, r.function, r.key, r.field, r.kernel, r.model, False,
                           True, "background: " + BACKGROUND_WALKERS[cb]))
        elif r.function == WALK and r.key == "":
            lo, hi = walk_bound(0, bg)
            out.append(_widen(r, lo, hi, f"model + {bg.own} background walk(s)"))
        elif r.function == LOOPS and r.field == "hitcount" or \
                r.function == LOOPS and r.key == "":
            per = levels if r.key == "" else 1
            lo, hi = loop_bound(0, bg, per)
            out.append(_widen(r, lo, hi, f"up to {bg.near} background walk(s) x {per} "
                                         "level(s)"))
        else:
            out.append(r)
    return out


def _compare_phase(phase: str, kernel: dict, model_counts, traced: set[str],
                   bound: PassBound | None = None,
                   uncompared: dict[str, set[str]] | None = None,
                   rules: KernelRules | None = None) -> list[Row]:
    compared = phase not in INFO_PHASES
    model = kernel_counts(model_counts, rules)
    rows: list[Row] = []
    kcalls = kernel.get("calls", {})
    kdetail = kernel.get("detail", {})
    bounded = bound is not None and bound.extra != 0
    for fn in sorted(set(kcalls) | set(model)):
        if fn not in traced and fn not in kcalls:
            continue  # the kernel run did not trace it
        kv = kcalls.get(fn, 0)
        mv = model.get(fn, {}).get("calls", 0)
        known = fn in model or fn in _modelled()
        if fn in LOWER_BOUND:
            rows.append(Row(phase, fn, "", "calls", kv, mv, compared, kv >= mv,
                            "lower bound: the kernel also tops up when it reschedules", mv,
                            None))
            if uncompared is not None:
                for key in kdetail.get(fn, {}):
                    uncompared.setdefault(fn, set()).add(key.split("=")[0])
            continue
        by_interleaving = bounded and fn in FAULT_PATH
        if by_interleaving:
            rows.append(_bounded_row(phase, fn, "", "calls", kv, mv, compared, bound))
        else:
            rows.append(Row(phase, fn, "", "calls", kv, mv, compared, kv == mv,
                            "" if known else "not modelled"))
        md = model.get(fn, {}).get("detail", {})
        kd = kdetail.get(fn, {})
        for key in sorted(set(kd) | set(md)):
            if not comparable_key(fn, key):
                # an "all" key holding just the call count is compared as the calls
                same = key == "all" and kd.get(key) == {"hitcount": kv}
                if uncompared is not None and key in kd and not same:
                    uncompared.setdefault(fn, set()).add(key.split("=")[0])
                continue
            for fld in ("hitcount", "size", "pages"):
                a = kd.get(key, {}).get(fld)
                b = md.get(key, {}).get(fld)
                if a is None and b is None:
                    continue
                if a is None and key not in kd and b == 0:
                    continue
                if by_interleaving:
                    rows.append(_bounded_row(phase, fn, key, fld, a or 0, b or 0, compared,
                                             bound))
                else:
                    rows.append(Row(phase, fn, key, fld, a or 0, b or 0, compared,
                                    (a or 0) == (b or 0)))
            if uncompared is not None and key in kd:
                for fld in set(kd[key]) - {"hitcount", "size", "pages"}:
                    uncompared.setdefault(fn, set()).add(f"{key}.{fld}")
    return rows


def _modelled() -> set[str]:
    from ..counting.kernel_counters import KERNEL_FUNCTIONS
    return set(KERNEL_FUNCTIONS)


def _run_notes(run: dict, params: PerfTestParams) -> list[str]:
    """What the run's descriptive fields say that the command does not, and
    every field not understood."""
    notes = []
    for key in sorted(set(run) - RUN_FIELDS):
        notes.append(f"field {key!r} not understood (not used)")
    label = run.get("label")
    if label is not None:
        if label not in LABELS:
            notes.append(f"label {label!r} not understood (the command decides: "
                         f"{'manual_protect' if params.manual_protect else 'no_manual_protect'})")
        elif LABELS[label] != params.manual_protect:
            notes.append(f"label {label!r} disagrees with the command (compared as the command "
                         "says)")
    chunk = run.get("eager_split_chunk_size")
    if chunk is not None and chunk != params.chunk_size:
        notes.append(f"eager_split_chunk_size {chunk!r} disagrees with the command's -k "
                     f"({params.chunk_size}); compared as the command says")
    mode = run.get("guest_mode")
    if isinstance(mode, str) and " ".join(mode.split()) != " ".join(params.mode.string.split()):
        notes.append(f"guest_mode {mode!r} is not the command's ({params.mode.string!r})")
    status = run.get("exit_status")
    if status not in (None, 0):
        notes.append(f"the recorded run exited with status {status!r}")
    for phase in run["phases"]:
        for key in sorted(set(phase) - PHASE_FIELDS):
            notes.append(f"phases[{phase['phase']}]: field {key!r} not understood (not used)")
    return notes


def phase_bounds(params: PerfTestParams, res: RunResult) -> dict[str, PassBound]:
    """For a run whose fault path depends on interleaving: each phase in which
    vCPUs run -> its bound (empty for other runs)."""
    from .interleaving import depends_on_interleaving, pass_bound, write_accesses
    if not depends_on_interleaving(params):
        return {}
    writes = write_accesses(params, res.layout)
    rules = kernel_rules(params.kernel)
    out = {"populate": pass_bound(kernel_counts(res.phase("populate"), rules), None)}
    for it in range(1, params.iterations + 1):
        name = f"iter{it}_dirty"
        out[name] = pass_bound(kernel_counts(res.phase(name), rules), writes[it])
    return out


def check_run(fixture: str, run: dict, engine: str = "auto", host_va_bits: int = 52,
              description: Description | None = None,
              traced: set[str] | None = None) -> tuple[RunCheck, RunResult]:
    desc = description or Description(False, VANILLA, [])
    params = params_from_command(run["command"], fixture, host_va_bits, desc.seed_synced,
                                 desc.kernel, desc.selftest)
    res = run_perf_test(params, desc.variant, engine)
    check = RunCheck(fixture, str(run.get("label", "")), run["command"], params,
                     variant=desc.variant.name, fixture_notes=desc.notes)
    check.notes = _run_notes(run, params)
    rng = run.get("gpa_range")
    if isinstance(rng, list) and len(rng) == 2:
        try:
            want = (int(str(rng[0]), 0), int(str(rng[1]), 0))
        except ValueError:
            raise _fail(fixture, f"gpa_range {rng!r} is not a pair of addresses") from None
        got = (res.layout.gpa, res.layout.gpa + res.layout.size)
        check.layout_ok = want == got
        check.layout_note = (f"test memory [{got[0]:#x}, {got[1]:#x})" if check.layout_ok else
                             f"test memory: kernel [{want[0]:#x}, {want[1]:#x}) vs model "
                             f"[{got[0]:#x}, {got[1]:#x})")
    elif rng is not None:
        check.notes.append(f"gpa_range {rng!r} not understood (not checked)")
    if traced is None:
        traced = {fn for ph in run["phases"] for fn in ph.get("calls", {})}
    bounds = phase_bounds(params, res)
    check.bound_notes = {name: b.reason for name, b in bounds.items()}
    names = set(res.phase_names)
    rules = kernel_rules(params.kernel)
    background = run_background(run["phases"])
    levels = params.geometry().levels
    uncompared: dict[str, set[str]] = {}
    counted = {ph["phase"] for ph in run["phases"]}
    skipped = [n for n in res.phase_names if n not in counted]
    if skipped:
        check.notes.append(f"not counted in this fixture, so not compared: {', '.join(skipped)}")
    for ph in run["phases"]:
        name = ph["phase"]
        if name not in names:
            check.rows.append(Row(name, "(phase)", "", "", 1, 0, name not in INFO_PHASES, False,
                                  "the model has no such phase"))
            continue
        rows = _compare_phase(name, ph, res.phase(name), traced, bounds.get(name), uncompared,
                              rules)
        bg = background.get(name)
        if bg is not None and bg.any:
            rows = _background_rows(rows, bg, levels)
            why = background_note(bg)
            check.bound_notes[name] = f"{check.bound_notes[name]}; {why}" \
                if name in check.bound_notes else why
        check.rows.extend(rows)
    if uncompared:
        check.notes.append("not compared (the model does not count them): " + "; ".join(
            f"{fn} {', '.join(sorted(k + ('=*' if '.' not in k and k != 'all' else '') for k in keys))}"
            for fn, keys in sorted(uncompared.items())))
    return check, res


def check_fixture(path: str, engine: str = "auto", host_va_bits: int = 52) -> list[RunCheck]:
    data = load_fixture(path)
    desc = describe_fixture(str(path), data)
    traced = data.get("traced_functions")
    traced = set(traced) if isinstance(traced, list) else None
    return [check_run(str(path), run, engine, host_va_bits, desc, traced)[0]
            for run in data["runs"]]
