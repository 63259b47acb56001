"""Read the output of the upstream ``dirty_log_perf_test`` (numpy-free).

Every output format since ``-f`` became ``-w`` (Linux 6.2): ``Test
iterations``, then per guest mode ``Testing guest mode: ...``, the test
memory (``guest physical test memory: [start, end)``, or the older
``... offset: 0x...``), the phase lines ``... time: S.NNNNNNNNNs`` and the
totals ``Get dirty log over N iterations took ...``. Lines may carry the
kselftest runner's ``# `` prefix. A mode's run is

* ``ok``: it reached its totals line(s);
* ``failed``: a ``==== Test Assertion Failure ====`` came first (the message
  names the file, line, expression and the assertion's own message);
* ``skipped``: the test skipped (``1..0 # SKIP ...``, ``..., skipping test``,
  the hugetlb messages of ``get_def_hugetlb_pagesz``);
* ``incomplete``: the output stops before its totals.

Only ``ok`` runs become measurements; the others are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..plumbing.errors import S2Error
from ..selftest.modes import MODES, GuestMode
from ..selftest.phases import ITERATION_PHASES

_T = r"(\d+)\.(\d{9})s"
RE = {
    "iterations": re.compile(r"^Test iterations: (\d+)\s*$"),
    "mode": re.compile(r"^Testing guest mode: (.+?)\s*$"),
    "seed": re.compile(r"^Random seed: (0x[0-9a-fA-F]+|\d+)\s*$"),
    "memory": re.compile(r"^guest physical test memory: \[(0x[0-9a-fA-F]+), (0x[0-9a-fA-F]+)\)"),
    "offset": re.compile(r"^guest physical test memory offset: (0x[0-9a-fA-F]+)"),
    # printed by the test with s2split's patch (contrib/), which adds -k
    "chunk": re.compile(r"^Eager split chunk size: (0x[0-9a-fA-F]+)\s*$"),
    "populate": re.compile(rf"^Populate memory time: {_T}\s*$"),
    "enable": re.compile(rf"^Enabling dirty logging time: {_T}\s*$"),
    "iteration": re.compile(
        rf"^Iteration (\d+) (dirty memory|get dirty log|clear dirty log) time: {_T}\s*$"),
    "disable": re.compile(rf"^Disabling dirty logging time: {_T}\s*$"),
    "total": re.compile(rf"^(Get|Clear) dirty log over (\d+) iterations took {_T}\. "
                        rf"\(Avg {_T}/iteration\)\s*$"),
    "assert": re.compile(r"^==== Test Assertion Failure ====\s*$"),
    "tap_skip": re.compile(r"^(?:1\.\.0|ok \d+ .*?) # SKIP\s*(.*)$"),
    "skip_msg": re.compile(r"^(.*(?:, skipping test|not support(?:ed)? on this architecture, "
                           r"skipping\.?|HUGETLB is not (?:enabled|configured).*))\s*$"),
}
_ITER_PHASE = {v: k for k, v in ITERATION_PHASES.items()}
_MODE_STRING = re.compile(r"PA-bits:\s*(\d+|ANY),\s*VA-bits:\s*(\d+),\s*(\d+)K pages")


def _ns(sec: str, frac: str) -> int:
    return int(sec) * 1_000_000_000 + int(frac)


@dataclass
class ModeRun:
    """One guest mode's run in the output."""

    mode: str
    line: int
    status: str = "incomplete"
    phases: list[tuple[str, int]] = field(default_factory=list)  # (phase, ns)
    totals: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # n, total, avg
    memory: tuple[int, int] | None = None  # [start, end)
    offset: int | None = None
    chunk_size: int | None = None  # the eager-split chunk size the VM reported (-k)
    message: str = ""

    @property
    def manual_protect(self) -> bool:
        return any(p.endswith("_clear_dirty_log") for p, _ in self.phases)

    @property
    def iterations(self) -> int:
        return sum(1 for p, _ in self.phases if p.endswith("_dirty"))


@dataclass
class ParsedOutput:
    path: str
    iterations: int | None = None
    seed: str | None = None  # the -r seed, as printed
    runs: list[ModeRun] = field(default_factory=list)
    skipped: str = ""  # a skip before any mode started
    failure: str = ""  # a failure before any mode started
    notes: list[str] = field(default_factory=list)


def _clean(line: str) -> str:
    line = line.rstrip("\r\n")
    if line.startswith("# "):  # kselftest runner prefix
        line = line[2:]
    elif line == "#":
        line = ""
    return line


def parse_output(text: str, path: str = "<output>") -> ParsedOutput:
    """Parse one output (stdout and stderr together, in any interleaving)."""
    out = ParsedOutput(path)
    run: ModeRun | None = None
    lines = [_clean(x) for x in text.splitlines()]
    i = 0
    recognised = 0
    while i < len(lines):
        line = lines[i]
        n = i + 1
        i += 1
        m = RE["iterations"].match(line)
        if m:
            out.iterations = int(m.group(1))
            recognised += 1
            continue
        m = RE["seed"].match(line)
        if m:
            # Since 6.11 a library constructor prints a seed of its own
            # before anything else; the -r seed is printed when the first
            # VM is created, after the first mode line.
            if out.runs and out.seed is None:
                out.seed = m.group(1)
            continue
        m = RE["mode"].match(line)
        if m:
            run = ModeRun(m.group(1), n)
            out.runs.append(run)
            recognised += 1
            continue
        if RE["assert"].match(line):
            message, i = _assertion(lines, i)
            recognised += 1
            if run is not None and run.status == "incomplete":
                run.status, run.message = "failed", message
            else:
                out.failure = out.failure or message
            continue
        m = RE["tap_skip"].match(line) or RE["skip_msg"].match(line)
        if m:
            reason = m.group(1).strip() or "skipped"
            recognised += 1
            if run is not None and run.status == "incomplete":
                run.status, run.message = "skipped", reason
            else:
                out.skipped = out.skipped or reason
            continue
        if run is None or run.status != "incomplete":
            continue
        m = RE["memory"].match(line)
        if m:
            run.memory = (int(m.group(1), 16), int(m.group(2), 16))
            continue
        m = RE["offset"].match(line)
        if m:
            run.offset = int(m.group(1), 16)
            continue
        m = RE["chunk"].match(line)
        if m:
            run.chunk_size = int(m.group(1), 16)
            continue
        for key, phase in (("populate", "populate"), ("enable", "enable_dirty_logging"),
                           ("disable", "disable_dirty_logging")):
            m = RE[key].match(line)
            if m:
                run.phases.append((phase, _ns(m.group(1), m.group(2))))
                recognised += 1
                break
        else:
            m = RE["iteration"].match(line)
            if m:
                phase = f"iter{int(m.group(1))}_{_ITER_PHASE[m.group(2)]}"
                run.phases.append((phase, _ns(m.group(3), m.group(4))))
                recognised += 1
                continue
            m = RE["total"].match(line)
            if m:
                kind = m.group(1).lower()
                run.totals[kind] = (int(m.group(2)), _ns(m.group(3), m.group(4)),
                                    _ns(m.group(5), m.group(6)))
                recognised += 1
                if kind == "clear" or not run.manual_protect:
                    run.status = "ok"  # with manual protect, the Clear line comes last
    for run in out.runs:
        _check_run(run, out)
    if not recognised:
        raise S2Error(f"{path} does not look like dirty_log_perf_test output (no 'Testing "
                      "guest mode', phase, failure or skip line)")
    return out


def _assertion(lines: list[str], i: int) -> tuple[str, int]:
    """The failure after ``==== Test Assertion Failure ====``: where, what, and
    the assertion's message (the indented lines after the stack dump)."""
    where = ""
    message: list[str] = []
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            if where and message:
                break
            continue
        if not line.startswith((" ", "\t")):
            break
        text = line.strip()
        i += 1
        if not where and re.match(r"^\S+:\d+: ", text):
            where = text
        elif text.startswith("pid=") or re.match(r"^\d+\s+(0x[0-9a-fA-F]+:|\(inlined by\))", text):
            continue  # pid/tid/errno and the stack dump
        else:
            message.append(text)
    summary = where or "assertion failure"
    if message:
        summary += " -- " + " ".join(message)
    return summary, i


def _check_run(run: ModeRun, out: ParsedOutput) -> None:
    if run.status != "ok":
        return
    for kind, suffix in (("get", "_get_dirty_log"), ("clear", "_clear_dirty_log")):
        if kind in run.totals:
            n, total, _avg = run.totals[kind]
            parts = [ns for p, ns in run.phases if p.endswith(suffix)]
            if len(parts) != n or sum(parts) != total:
                out.notes.append(f"mode '{run.mode}' (line {run.line}): the {kind} total "
                                 f"({total} ns over {n}) is not the sum of its iteration lines "
                                 f"({sum(parts)} ns over {len(parts)})")


def mode_from_string(text: str) -> GuestMode:
    """A guest mode from ``vm_guest_mode_string()``, including modes of other
    architectures and of later kernels (which get id -1)."""
    norm = " ".join(text.split()).lower()
    for m in MODES:
        if " ".join(m.string.split()).lower() == norm:
            return m
    mm = _MODE_STRING.search(text)
    if not mm:
        raise S2Error(f"unknown guest mode {text!r}")
    pa = 0 if mm.group(1) == "ANY" else int(mm.group(1))
    va, page = int(mm.group(2)), int(mm.group(3)) * 1024
    name = f"P{pa if pa else 'XX'}V{va}_{mm.group(3)}K"
    return GuestMode(-1, name, pa, va, page, arm64=bool(pa))


def _add_selftest_options(p) -> None:
    """Every option of the upstream test: -c and -p are read and ignored (they
    steer the host, or move memory the output's own lines place), -e and -n
    are refused; -b, -i and -r default to None, "not given", so the output's
    own figures can be checked against them."""
    from ..selftest.options import add_upstream_options, int_arg
    add_upstream_options(p)
    p.add_argument("-c", dest="pin", default=None)
    p.add_argument("-e", dest="evil", action="store_true")
    p.add_argument("-f", dest="wr_fract", type=int_arg("-f", 1), default=None)
    p.add_argument("-k", dest="chunk_size", type=_chunk_size, default=None)
    p.add_argument("-n", dest="nested", action="store_true")
    p.add_argument("-p", dest="phys_offset", default=None)
    p.set_defaults(vcpu_memory_bytes=None, iterations=None, seed=None)


def _chunk_size(text: str) -> int:
    """``-k`` of the patched test (contrib/): a size, ``0`` for off."""
    from ..selftest.options import size_arg
    return 0 if text.strip() == "0" else size_arg("-k")(text)


def _parse_args(text: str) -> dict[str, Any]:
    """The upstream options that shape the configuration."""
    from ..selftest.options import parse_command
    where = f"--args {text!r}"
    ns, extra = parse_command(text, where, _add_selftest_options)
    if extra:
        raise S2Error(f"{where}: unknown option(s) {' '.join(extra)}")
    if ns.evil or ns.nested:
        what = ("-e (vCPUs keep running while dirty logging is disabled)" if ns.evil
                else "-n (a nested guest)")
        raise S2Error(f"{where}: {what} changes what the phases time, and no configuration "
                      "here has it; not imported")
    if ns.wr_fract is not None:
        raise S2Error("--args: -f (write fraction) is the pre-6.2 option; this importer reads "
                      "outputs since -w replaced it")
    return vars(ns)


def import_rows(parsed: ParsedOutput, label: str, args: str = "",
                source: str = "import") -> tuple[list[dict[str, Any]], list[str]]:
    """Measurement rows of the ``ok`` runs, and notes on everything else."""
    from .params import HwParams

    opts = _parse_args(args)
    notes = list(parsed.notes)
    seed = opts["seed"]
    if parsed.seed is not None:
        printed = int(parsed.seed, 0)
        if seed is not None and seed != printed:
            raise S2Error(f"{parsed.path}: --args says -r {seed} but the output's random seed "
                          f"is {parsed.seed}")
        seed = printed
    if seed is None:
        seed = 1
    if parsed.failure:
        notes.append(f"test assertion failure before any guest mode: {parsed.failure}")
    if parsed.skipped and not any(r.status == "skipped" for r in parsed.runs):
        notes.append(f"skipped: {parsed.skipped}")
    rows: list[dict[str, Any]] = []
    for run in parsed.runs:
        if run.status != "ok":
            what = {"failed": "failed", "skipped": "skipped",
                    "incomplete": "stopped before its totals"}[run.status]
            notes.append(f"guest mode '{run.mode}' (line {run.line}) {what}"
                         f"{': ' + run.message if run.message else ''}; not imported")
            continue
        mode = mode_from_string(run.mode)
        iterations = run.iterations
        if parsed.iterations is not None and parsed.iterations != iterations:
            notes.append(f"guest mode '{run.mode}': 'Test iterations: {parsed.iterations}' "
                         f"but {iterations} iteration lines")
        if opts["iterations"] is not None and opts["iterations"] != iterations:
            raise S2Error(f"{parsed.path}: --args says -i {opts['iterations']} but the output "
                          f"has {iterations} iterations")
        if opts["mode"] and mode.id >= 0 and str(mode.id) not in opts["mode"] and \
                mode.name not in opts["mode"]:
            notes.append(f"guest mode '{run.mode}' is not among -m {','.join(opts['mode'])} "
                         "of --args")
        vcpus = opts["vcpus"]
        if run.memory:
            total = run.memory[1] - run.memory[0]
            if total % vcpus:
                raise S2Error(f"{parsed.path}: the test memory ({total:#x} bytes) is not "
                              f"divisible among -v {vcpus} vCPUs")
            per_vcpu = total // vcpus
            if opts["vcpu_memory_bytes"] is not None and opts["vcpu_memory_bytes"] != per_vcpu:
                raise S2Error(f"{parsed.path}: the output's test memory ({total:#x} bytes) is "
                              f"not -b {opts['vcpu_memory_bytes']:#x} x -v {vcpus} from --args")
        elif opts["vcpu_memory_bytes"] is not None:
            per_vcpu = opts["vcpu_memory_bytes"]
        else:
            per_vcpu = 1 << 30
            notes.append(f"guest mode '{run.mode}': the output does not give the memory size; "
                         "assumed the default -b 1G (give --args)")
        chunk = opts["chunk_size"]
        if run.chunk_size is not None:
            if chunk is not None and chunk != run.chunk_size:
                raise S2Error(f"{parsed.path}: --args says -k {chunk:#x} but the VM reported "
                              f"an eager-split chunk size of {run.chunk_size:#x}")
            chunk = run.chunk_size
        params = HwParams(vcpu_memory_bytes=per_vcpu, vcpus=vcpus, backing=opts["backing"],
                          manual_protect=run.manual_protect, iterations=iterations, mode=mode,
                          slots=opts["slots"], write_percent=opts["write_percent"],
                          random_access=opts["random_access"], partition=not opts["overlap"],
                          seed=seed, chunk_size=chunk)
        config = params.to_config() | {
            "arch": "arm64" if mode.arm64 else "x86_64", "selftest_args": args,
            "mode_string": run.mode,
            "test_memory": list(run.memory) if run.memory else None,
            "known_from_args": bool(args.strip())}
        key = params.config_key()
        host = {"source_file": parsed.path}
        for phase, ns in run.phases:
            rows.append({"label": label, "config_key": key, "config": config,
                         "phase": phase, "repetition": 0, "seconds": ns / 1e9,
                         "host": host, "source": source})
    if not rows and not notes:
        notes.append("no guest mode ran")
    imported = sum(1 for r in parsed.runs if r.status == "ok")
    notes.append(f"{imported} of {len(parsed.runs)} guest mode run(s) imported "
                 f"({len(rows)} measurements)")
    return rows, notes
