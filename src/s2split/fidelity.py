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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import S2Error
from .kernel_counters import LOWER_BOUND, comparable_key, kernel_counts
from .pgtable.variants import VANILLA
from .workload import PerfTestParams, RunResult, run_perf_test

FIXTURE_FORMAT = "s2split-real-kernel-counts/1"
INFO_PHASES = ("create_vm", "populate", "destroy_vm")


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


@dataclass
class RunCheck:
    fixture: str
    label: str
    command: str
    params: PerfTestParams
    rows: list[Row] = field(default_factory=list)
    layout_ok: bool = True
    layout_note: str = ""

    @property
    def mismatches(self) -> list[Row]:
        return [r for r in self.rows if r.compared and not r.ok]

    @property
    def compared(self) -> int:
        return sum(1 for r in self.rows if r.compared)


def _fail(path: str, problem: str) -> S2Error:
    return S2Error(f"{path}: {problem}")


def load_fixture(path: str | Path) -> dict[str, Any]:
    """Read and validate a fixture (:data:`s2split.schemas.FIXTURE`); errors
    name the file and the key. A function name the model does not know is an
    error too: its counts could never be compared, so "all match" would lie."""
    from .kernel_counters import KERNEL_FUNCTIONS
    from .schemas import FIXTURE
    from .validate import check, read_json
    p = str(path)
    data = read_json(path, "fixture", invalid="not valid JSON (truncated?)")
    if not isinstance(data, dict):
        raise _fail(p, "the top level must be a JSON object")
    if data.get("format") != FIXTURE_FORMAT:
        raise _fail(p, f"format is {data.get('format')!r}, expected {FIXTURE_FORMAT!r}")
    check(data, FIXTURE, p)
    known = set(KERNEL_FUNCTIONS)
    for i, run in enumerate(data["runs"]):
        for j, ph in enumerate(run["phases"]):
            for part in ("calls", "detail"):
                for fn in ph.get(part, {}):
                    if fn not in known:
                        raise _fail(p, f"runs[{i}].phases[{j}].{part}: unknown kernel "
                                       f"function {fn!r} (the model counts "
                                       f"{len(known)} functions; see kernel_counters.py)")
    return data


def params_from_command(command: str, fixture: str, host_va_bits: int = 52) -> PerfTestParams:
    """The model configuration of a recorded ``dirty_log_perf_test`` command
    (upstream's options and the fixtures' ``-k``, read as ``perf-test`` reads
    them), with the CPU features of the QEMU host the fixtures were traced on."""
    from .options import add_perf_test_options, parse_command
    from .perftest import perf_test_params
    args, extra = parse_command(command, f"{fixture}: command", add_perf_test_options,
                                program="dirty_log_perf_test")
    if extra:
        raise _fail(fixture, f"option(s) {' '.join(extra)} of {command!r} are not modelled")
    args.profile, args.host_va_bits = "qemu-tcg", host_va_bits
    params = perf_test_params(args)
    if len(params) != 1:
        raise _fail(fixture, f"{command!r}: one guest mode per run")
    return params[0]


def _compare_phase(phase: str, kernel: dict, model_counts, traced: set[str]) -> list[Row]:
    compared = phase not in INFO_PHASES
    model = kernel_counts(model_counts)
    rows: list[Row] = []
    kcalls = kernel.get("calls", {})
    kdetail = kernel.get("detail", {})
    for fn in sorted(set(kcalls) | set(model)):
        if fn not in traced and fn not in kcalls:
            continue  # the kernel run did not trace it
        kv = kcalls.get(fn, 0)
        mv = model.get(fn, {}).get("calls", 0)
        known = fn in model or fn in _modelled()
        if fn in LOWER_BOUND:
            rows.append(Row(phase, fn, "", "calls", kv, mv, compared, kv >= mv,
                            "lower bound: the kernel also tops up when it reschedules"))
            continue
        rows.append(Row(phase, fn, "", "calls", kv, mv, compared, kv == mv,
                        "" if known else "not modelled"))
        md = model.get(fn, {}).get("detail", {})
        kd = kdetail.get(fn, {})
        for key in sorted(set(kd) | set(md)):
            if not comparable_key(fn, key):
                continue
            for fld in ("hitcount", "size", "pages"):
                a = kd.get(key, {}).get(fld)
                b = md.get(key, {}).get(fld)
                if a is None and b is None:
                    continue
                if a is None and key not in kd and b == 0:
                    continue
                rows.append(Row(phase, fn, key, fld, a or 0, b or 0, compared,
                                (a or 0) == (b or 0)))
    return rows


def _modelled() -> set[str]:
    from .kernel_counters import KERNEL_FUNCTIONS
    return set(KERNEL_FUNCTIONS)


def check_run(fixture: str, run: dict, engine: str = "auto",
              host_va_bits: int = 52) -> tuple[RunCheck, RunResult]:
    params = params_from_command(run["command"], fixture, host_va_bits)
    res = run_perf_test(params, VANILLA, engine)
    check = RunCheck(fixture, str(run.get("label", "")), run["command"], params)
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
    traced = {fn for ph in run["phases"] for fn in ph.get("calls", {})}
    names = set(res.phase_names)
    for ph in run["phases"]:
        name = ph["phase"]
        if name not in names:
            check.rows.append(Row(name, "(phase)", "", "", 1, 0, name not in INFO_PHASES, False,
                                  "the model has no such phase"))
            continue
        check.rows.extend(_compare_phase(name, ph, res.phase(name), traced))
    return check, res


def check_fixture(path: str, engine: str = "auto", host_va_bits: int = 52) -> list[RunCheck]:
    data = load_fixture(path)
    return [check_run(str(path), run, engine, host_va_bits)[0] for run in data["runs"]]
