"""``s2split fidelity record``: the real kernel's stage-2 call counts, as a fixture.

On an arm64 KVM host (root, tracefs with kprobe events and hist triggers),
this puts a kprobe event and a hist trigger on each stage-2 function the
real-kernel fixtures count, keyed as the fixtures key them; runs the
``dirty_log_perf_test`` workload through the real-KVM harness
(:mod:`s2split.hw.harness`, the ``hw run`` options); reads the cumulative
counters at every phase boundary; and writes the per-phase differences as a
fixture (format ``s2split-real-kernel-counts/1``) that ``s2split fidelity``
compares with the model. Everything installed in tracefs is removed again,
also on an error, Ctrl-C or SIGTERM.

Standard library only (like the harness), so it runs on a bare Python:
``python3 -m s2split.hw.record ...``.

How the keys are fetched (arm64 calling convention: arguments in x0-x7;
Linux 6.12 prototypes):

* ``__kvm_pgtable_walk(data, mm_ops, pgtable, s8 level)``: ``level`` = x3;
* the walker callbacks ``stage2_*_walker(ctx, visit)``: ``visit`` = x1, and
  ``level`` = the s8 at offset :data:`VISIT_CTX_LEVEL_OFFSET` of ``struct
  kvm_pgtable_visit_ctx`` (ptep, old, arg, mm_ops, start, addr, end: seven
  8-byte fields, then ``level``);
* ``kvm_pgtable_walk(pgt, addr, size, walker)``: ``size`` = x2, the callback
  = the first field of ``*walker`` (x3), shown by symbol name;
* ``kvm_pgtable_stage2_create_unlinked(pgt, phys, s8 level, prot, mc, bool
  force_pte)``: x2 and x5; ``kvm_pgtable_stage2_free_unlinked(mm_ops,
  pgtable, s8 level)``: x2;
* the TLB functions ``(mmu, ipa, int level)`` / ``(mmu, addr, size)`` /
  ``(mmu, start, pages)``: x2; ``__kvm_mmu_topup_memory_cache(mc, capacity,
  min)``: x2; ``kvm_pgtable_stage2_{map,unmap,wrprotect,split}(pgt, addr,
  size, ...)``: ``size`` = x2;
* functions counted as a whole are keyed by a constant (``all``).

A function the running kernel has no probe point for (inlined, renamed,
ambiguous) is recorded under ``missing_functions`` with the reason, and not
counted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import re
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..plumbing.errors import S2Error
from .probes import (PROBES, VISIT_CTX_LEVEL_OFFSET, Probe, Symbols, btf_args,  # noqa: F401
                     el2_functions, kvm_mode)

#: ``s2split.tasks.fidelity.FIXTURE_FORMAT`` (not imported: that module needs numpy).
FIXTURE_FORMAT = "s2split-real-kernel-counts/1"
TRACEFS_MOUNTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KALLSYMS = "/proc/kallsyms"
CMDLINE = "/proc/cmdline"


#: function -> key -> field -> cumulative count
Snapshot = dict[str, dict[str, dict[str, int]]]


# -- tracefs -------------------------------------------------------------------------------

class Tracefs:
    """File operations on a tracefs mount (relative paths); each write is one
    ``write()``, as the kernel parses it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def write(self, rel: str, text: str, append: bool = False) -> None:
        # os.open, not open(): Python seeks to the end of a file opened for
        # appending, which tracefs refuses (EINVAL); and no O_TRUNC, which on
        # a trigger file removes every trigger of the event.
        fd = os.open(self.root / rel, os.O_WRONLY | (os.O_APPEND if append else 0))
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.root / rel)

    def rmdir(self, rel: str) -> None:
        os.rmdir(self.root / rel)


def find_tracefs() -> str | None:
    """The mounted tracefs with kprobe events, if any."""
    for root in TRACEFS_MOUNTS:
        if os.path.exists(os.path.join(root, "kprobe_events")):
            return root
    return None


def cannot_record(kvm_path: str, tracefs: str | None) -> str | None:
    """Why this host cannot record (None: it can)."""
    arch = platform.machine()
    if arch not in ("aarch64", "arm64"):
        return f"this host is {arch}, not arm64: the counted functions are arm64 KVM's stage-2 code"
    if os.geteuid() != 0:
        return "kprobe events need root"
    if not os.path.exists(kvm_path):
        return f"no KVM ({kvm_path} does not exist)"
    if tracefs is None:
        return ("no tracefs with kprobe events (mount -t tracefs nodev /sys/kernel/tracing; "
                "needs CONFIG_KPROBE_EVENTS)")
    try:
        readme = Tracefs(tracefs).read("README")
    except OSError:
        readme = ""
    if "hist:keys" not in readme:
        return f"the kernel has no hist triggers ({tracefs}/README; needs CONFIG_HIST_TRIGGERS)"
    return None


# -- hist output -----------------------------------------------------------------------------

_ENTRY = re.compile(r"^\{\s*(.*?)\s*\}\s*(.*)$")
_VALUE = re.compile(r"([A-Za-z_]\w*):\s*(-?\d+)")


def _key_value(text: str) -> str:
    text = text.strip()
    if text.startswith("["):  # .sym: "[ffff800080123456] stage2_map_walker"
        text = text.split("]", 1)[1].strip()
        text = text.split("+", 1)[0]
    return text


def parse_hist(text: str) -> tuple[dict[str, dict[str, int]], int]:
    """A hist file: fixture key -> {"hitcount": n, field: sum, ...}, and the
    number of dropped events. A constant key ``k`` becomes ``all``."""
    out: dict[str, dict[str, int]] = {}
    dropped = 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Dropped:"):
            dropped = int(line.split(":", 1)[1])
            continue
        m = _ENTRY.match(line)
        if not m:
            continue
        parts = []
        for part in m.group(1).split(","):
            name, _, value = part.partition(":")
            name = name.strip().removesuffix(".sym")
            parts.append((name, _key_value(value)))
        key = "all" if [n for n, _ in parts] == ["k"] else \
            ",".join(f"{n}={v}" for n, v in parts)
        values = {name: int(v) for name, v in _VALUE.findall(m.group(2))}
        slot = out.setdefault(key, {})
        for name, v in values.items():
            slot[name] = slot.get(name, 0) + v
    return out, dropped


def parse_kprobe_profile(text: str) -> dict[str, tuple[int, int]]:
    """``kprobe_profile``: event name -> (hits, misses)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out[parts[0].split("/")[-1]] = (int(parts[1]), int(parts[2]))
    return out


def difference(after: Snapshot, before: Snapshot) -> dict[str, Any]:
    """One phase: ``{"calls": {fn: n}, "detail": {fn: {key: {field: n}}}}``
    from two cumulative snapshots (zero counts left out)."""
    calls: dict[str, int] = {}
    detail: dict[str, dict[str, dict[str, int]]] = {}
    for fn, keys in after.items():
        for key, fields in keys.items():
            old = before.get(fn, {}).get(key, {})
            d = {f: v - old.get(f, 0) for f, v in fields.items()}
            if d.get("hitcount", 0) <= 0:
                continue
            detail.setdefault(fn, {})[key] = d
            calls[fn] = calls.get(fn, 0) + d["hitcount"]
    return {"calls": calls, "detail": detail}


# -- the recorder ----------------------------------------------------------------------------

@dataclass
class Recorder:
    """Installs the probes in its own tracefs instance, reads them, removes
    them. ``group``: the kprobe event group (unique per process)."""

    fs: Tracefs
    group: str = field(default_factory=lambda: f"s2split_{os.getpid()}")
    probes: tuple[Probe, ...] = PROBES
    #: the kernel's function names (None: probe every function by its name)
    symbols: Symbols | None = None
    btf: bool = False  # fetch arguments by name (BTF) first, registers as the fallback
    #: function -> why it cannot be counted (e.g. it runs at EL2); not defined
    unreachable: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    #: function -> how it is probed, when not plainly: "BTF arguments", "registers
    #: (the kernel refused the BTF arguments: ...)", "GCC clone(s) ..., counted whole"
    how: dict[str, str] = field(default_factory=dict)
    mode: str = "unknown"  # KVM's mode: vhe, nvhe, protected
    dropped: dict[str, int] = field(default_factory=dict)  # events hist tables dropped
    traced: list[str] = field(default_factory=list)  # functions defined, in order
    _events: list[Probe] = field(default_factory=list)
    _triggers: list[Probe] = field(default_factory=list)
    _enabled: list[Probe] = field(default_factory=list)
    _instance: bool = False

    @property
    def instance(self) -> str:
        return f"instances/{self.group}"

    def _event_dir(self, probe: Probe) -> str:
        return f"{self.instance}/events/{self.group}/{probe.event}"

    def _log_lines(self) -> list[str]:
        try:
            return [l for l in self.fs.read("error_log").splitlines() if l.strip()]
        except OSError:
            return []

    def _error_log(self, seen: int) -> str:
        """The kernel's reason for a refused definition, from the error_log
        lines after the first ``seen``: its message and the argument it points
        at."""
        lines = self._log_lines()[seen:]
        at = max((i for i, l in enumerate(lines) if "error:" in l), default=None)
        if at is None:
            return ""
        why = lines[at].split("error:", 1)[1].strip()
        if at + 2 < len(lines) and "Command:" in lines[at + 1]:
            command, caret = lines[at + 1], lines[at + 2]
            pos = caret.find("^")
            if pos >= 0:
                why += f" at '{command[pos:].split(' ')[0]}'"
        return why

    def install(self) -> None:
        """Define every probe the kernel has, with its trigger, and enable it.
        The instance's own ring buffer is off: hist triggers still see every
        event (the kernel hands them a scratch buffer), nothing is stored."""
        try:
            self.fs.mkdir(self.instance)
            self._instance = True
            self.fs.write(f"{self.instance}/tracing_on", "0")
        except OSError as e:
            raise S2Error(f"cannot make the tracefs instance {self.instance}: "
                          f"{e.strerror}") from None
        for probe in self.probes:
            if probe.function in self.unreachable:
                self.missing[probe.function] = self.unreachable[probe.function]
                continue
            symbols = self.symbols.resolve(probe.function) if self.symbols else \
                [probe.function]
            if not symbols:
                self.missing[probe.function] = ("not in available_filter_functions or "
                                                "kallsyms (inlined, renamed or absent)")
                continue
            clones = [s for s in symbols if s != probe.function]
            if clones:
                self.how[probe.function] = (
                    f"GCC clone{'s' if len(clones) > 1 else ''} {', '.join(clones)}, counted "
                    "whole (a clone's arguments need not be the original's)")
            installed = 0
            for sym in symbols:
                target = replace(probe, symbol=sym if sym != probe.function else "")
                if clones:
                    target = target.counted_whole()
                installed += self._install_one(target)
            if installed:
                self.traced.append(probe.function)
        if not self._events:
            fn, why = next(iter(self.missing.items()))
            raise S2Error(f"none of the stage-2 functions can be probed on this kernel "
                          f"({fn}: {why})")

    def _define(self, probe: Probe, fetch: str) -> str | None:
        """Write one kprobe definition; None when defined, else the reason."""
        definition = f"p:{self.group}/{probe.event} {probe.target} {fetch}".rstrip()
        seen = len(self._log_lines())
        try:
            self.fs.write("kprobe_events", definition, append=True)
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else str(e)
            if e.errno in (errno.ENOENT, errno.EINVAL, errno.EADDRNOTAVAIL):
                log = self._error_log(seen)
                return f"{why}{': ' + log if log else ''}"
            raise S2Error(f"cannot define a kprobe on {probe.target}: {why}") from None
        return None

    def _install_one(self, probe: Probe) -> int:
        """Define, trigger and enable one probe: by BTF argument names first
        when the kernel has them, by registers otherwise; 1 when it counts."""
        why = None
        if self.btf and probe.btf:
            why = self._define(probe, probe.btf)
            if why is None:
                probe = replace(probe, fetch=probe.btf)
                self.how.setdefault(probe.function, "BTF arguments")
            else:
                self.how[probe.function] = f"registers (the kernel refused the BTF arguments: {why})"
        if why is not None or not (self.btf and probe.btf):
            why = self._define(probe, probe.fetch)
            if why is not None:
                self.missing[probe.function] = why
                return 0
        self._events.append(probe)
        seen = len(self._log_lines())
        try:
            self.fs.write(f"{self._event_dir(probe)}/trigger", probe.trigger())
            self._triggers.append(probe)
            self.fs.write(f"{self._event_dir(probe)}/enable", "1")
            self._enabled.append(probe)
        except OSError as e:
            # a kernel that refuses this trigger (or event): not counted
            log = self._error_log(seen)
            self.missing[probe.function] = (f"hist trigger or enable refused: {e.strerror}"
                                            f"{': ' + log if log else ''}")
            self._undo(probe)
            return 0
        return 1

    def snapshot(self) -> Snapshot:
        """Every probe's cumulative counts."""
        out: Snapshot = {}
        for probe in self._triggers:
            counts, dropped = parse_hist(self.fs.read(f"{self._event_dir(probe)}/hist"))
            if dropped:
                self.dropped[probe.event] = dropped  # cumulative, like the counts
            # a function probed as several clones: their counts add up
            slot = out.setdefault(probe.function, {})
            for key, fields in counts.items():
                into = slot.setdefault(key, {})
                for name, v in fields.items():
                    into[name] = into.get(name, 0) + v
        return out

    def hits(self) -> dict[str, tuple[int, int]]:
        """kprobe hits and misses of this recorder's events."""
        try:
            profile = parse_kprobe_profile(self.fs.read("kprobe_profile"))
        except OSError:
            return {}
        out: dict[str, tuple[int, int]] = {}
        for p in self._events:
            if p.event in profile:
                h, m = out.get(p.function, (0, 0))
                out[p.function] = (h + profile[p.event][0], m + profile[p.event][1])
        return out

    def _undo(self, probe: Probe) -> None:
        """Take one probe out again (best effort: :meth:`remove` retries)."""
        try:
            if probe in self._triggers:
                self.fs.write(f"{self._event_dir(probe)}/trigger", "!" + probe.trigger())
                self._triggers.remove(probe)
            self.fs.write("kprobe_events", f"-:{self.group}/{probe.event}", append=True)
            self._events.remove(probe)
        except OSError:
            pass

    def remove(self) -> list[str]:
        """Undo everything :meth:`install` did, in reverse; every step is tried.
        Returns what could not be undone."""
        left = []
        for probe in reversed(self._enabled):
            try:
                self.fs.write(f"{self._event_dir(probe)}/enable", "0")
            except OSError as e:
                left.append(f"disable {probe.function}: {e.strerror}")
        self._enabled.clear()
        for probe in reversed(self._triggers):
            try:
                self.fs.write(f"{self._event_dir(probe)}/trigger", "!" + probe.trigger())
            except OSError as e:
                left.append(f"remove trigger of {probe.function}: {e.strerror}")
        self._triggers.clear()
        if self._instance:
            try:
                self.fs.rmdir(self.instance)
                self._instance = False
            except OSError as e:
                left.append(f"remove {self.instance}: {e.strerror}")
        for probe in reversed(self._events):
            try:
                self.fs.write("kprobe_events", f"-:{self.group}/{probe.event}", append=True)
            except OSError as e:
                left.append(f"remove kprobe {self.group}/{probe.event}: {e.strerror}")
        self._events.clear()
        return left


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so that cleanup runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


# -- the command -------------------------------------------------------------------------------

def selftest_command(p: Any, host_page: int, cpu: str | None) -> str:
    """The recorded run as a ``dirty_log_perf_test`` command (``-k`` for the
    chunk size, as the fixtures' selftest; ``--host-page-size`` and ``--cpu``
    only where the model must be told)."""
    from ..arm64.arch import size_name
    from ..selftest.memstress import upstream_argv
    argv = ["dirty_log_perf_test", *upstream_argv(p)]
    if p.chunk_size is not None:
        argv += ["-k", size_name(p.chunk_size) if p.chunk_size else "0"]
    if host_page != p.granule:
        argv += ["--host-page-size", size_name(host_page)]
    if cpu:
        argv.append(f"--cpu={cpu}")
    return " ".join(argv)


def record_runs(args: argparse.Namespace, recorder: Recorder, write: Callable[[str], None]
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every configuration through the harness with the probes installed:
    the fixture's runs, and the host's fingerprint."""
    from .cli import pass_timeout_option, run_params
    from .fingerprint import fingerprint
    from .harness import run_config
    from .kvm import Kvm, host_page_size

    configs = run_params(args)
    runs = []
    kvm = Kvm(args.kvm)
    try:
        for rep in range(args.repeat):
            for p in configs:
                snaps: list[tuple[str, Snapshot]] = [("", recorder.snapshot())]
                result = run_config(p, write, verify=args.verify, kvm=kvm,
                                    pass_timeout=pass_timeout_option(args.pass_timeout),
                                    on_phase=lambda name: snaps.append(
                                        (name, recorder.snapshot())))
                layout = result.layout
                phases = [{"phase": name, **difference(snap, snaps[i][1])}
                          for i, (name, snap) in enumerate(snaps[1:])]
                runs.append({
                    "label": "manual_protect" if p.manual_protect else "no_manual_protect",
                    "command": selftest_command(p, host_page_size(), args.cpu),
                    "config_key": p.config_key(),
                    "exit_status": 1 if result.problems else 0,
                    "problems": result.problems,
                    "guest_mode": p.mode.string,
                    "gpa_range": [hex(layout.gpa), hex(layout.gpa + layout.size)],
                    "eager_split_chunk_size": p.chunk_size or 0,
                    "phases": phases})
        host = fingerprint(kvm)
    finally:
        kvm.close()
    return runs, host


def cmd_record(args: argparse.Namespace) -> int:
    from ..plumbing.output import write_atomic
    from .cli import run_params

    if args.db is not None or args.json is not None:
        raise S2Error("fidelity record writes a fixture (--output); --db and --json do not apply")
    if args.kernel_variant is not None:
        _check_variant(args.kernel_variant)
    run_params(args)  # option errors before anything is installed
    tracefs = args.tracefs or find_tracefs()
    why = cannot_record(args.kvm, tracefs)
    if why:
        raise S2Error(f"cannot record on this host: {why}")
    recorder = host_recorder(Tracefs(tracefs), args.kvm_mode)
    if recorder.unreachable:
        print(f"KVM runs in {recorder.mode} mode: {', '.join(recorder.unreachable)} run at EL2, "
              "where kprobes cannot see them, and are not counted; recording the other "
              f"{len(recorder.probes) - len(recorder.unreachable)} functions")
    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    left: list[str] = []
    try:
        recorder.install()
        before = recorder.hits()
        runs, host = record_runs(args, recorder, print)
        after = recorder.hits()
    except Terminated as e:
        raise S2Error(f"terminated by {e}; nothing written") from None
    finally:
        left = recorder.remove()
        for s, h in old.items():
            signal.signal(s, h)
        if left:
            sys.stderr.write("s2split fidelity record: could not undo in tracefs: "
                             + "; ".join(left) + "\n")
    caveats = [f"{fn}: the hist table dropped {n} events: its counts are low"
               for fn, n in recorder.dropped.items()]
    for fn, (hits, missed) in after.items():
        h0, m0 = before.get(fn, (0, 0))
        counted = sum(ph["calls"].get(fn, 0) for r in runs for ph in r["phases"])
        if missed - m0:
            caveats.append(f"{fn}: the kprobe missed {missed - m0} calls (recursion)")
        if hits - h0 != counted:
            caveats.append(f"{fn}: the phases counted {counted} calls, the kprobe hit "
                           f"{hits - h0} (another VM running, or events lost)")
    caveats += ["__kvm_mmu_topup_memory_cache depends on rescheduling timing and is not exact",
                "populate and create/destroy also include the harness's own memslot 0"]
    doc: dict[str, Any] = {
        "format": FIXTURE_FORMAT, "name": Path(args.output).stem,
        "kernel_release": platform.release(),
        "how": "s2split fidelity record: s2split's real-KVM harness (the dirty_log_perf_test "
               "phases, hw run) with kprobe events and hist triggers on the stage-2 functions; "
               "cumulative counters read at every phase boundary, per-phase differences",
        "caveats": caveats,
        "selftest_variant": "s2split-hw-seedfix" if args.seed_synced else "s2split-hw",
        "recorder": {"tracefs": tracefs, "probes": {
            p.function: f"{p.fetch} | {p.trigger()}" for p in recorder.probes},
            "kvm_mode": recorder.mode, "probe_methods": recorder.how},
        "host": host,
        "traced_functions": recorder.traced,
        "missing_functions": recorder.missing,
        "runs": runs,
    }
    if args.kernel_variant is not None:
        doc["kernel_variant"] = args.kernel_variant
    write_atomic(args.output, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(runs)} run(s), {len(recorder.traced)} functions traced"
          f"{f', {len(recorder.missing)} missing' if recorder.missing else ''}, to {args.output}"
          f"; compare with: s2split fidelity {args.output}")
    return 1 if any(r["problems"] for r in runs) else 0


def _kernel_log() -> str:
    """What the kernel log still holds (/dev/kmsg, read without blocking)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    lines = []
    try:
        while True:
            try:
                lines.append(os.read(fd, 8192).decode(errors="replace"))
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten; keep reading
                continue
    finally:
        os.close(fd)
    return "".join(lines)


def host_recorder(fs: Tracefs, mode: str | None = None) -> Recorder:
    """A recorder for this kernel: its function names (clones resolved), BTF
    arguments if it has them, and the functions KVM's mode puts at EL2."""
    def read(path: str, rel: bool = False) -> str:
        try:
            return fs.read(path) if rel else Path(path).read_text()
        except OSError:
            return ""
    aff = read("available_filter_functions", rel=True)
    kallsyms = read(KALLSYMS)
    symbols = Symbols.parse(aff, kallsyms) if (aff or kallsyms) else None
    mode = mode or kvm_mode(read(CMDLINE), _kernel_log())
    rec = Recorder(fs, symbols=symbols, btf=btf_args(read("README", rel=True)))
    rec.mode = mode or "unknown"
    rec.unreachable = {fn: f"runs at EL2 in KVM's {mode} mode; kprobes see EL1 only"
                       for fn in el2_functions(mode)}
    return rec


def _check_variant(name: str) -> None:
    try:
        from ..model.pgtable.variants import get
    except ImportError:
        return  # a bare Python: 's2split fidelity' checks the name
    get(name)


def add_record_options(p: argparse.ArgumentParser) -> None:
    from .cli import add_run_options
    add_run_options(p)
    r = p.add_argument_group("recorder options")
    r.add_argument("--output", required=True, metavar="FIXTURE.json",
                   help="the fixture to write (-o is dirty_log_perf_test's overlap option)")
    r.add_argument("--kernel-variant", default=None, metavar="NAME",
                   help="the model's name of the split-walk variant this kernel implements "
                   "(a patched kernel; default: a stock kernel, vanilla)")
    r.add_argument("--cpu", default=None, metavar="FEATURES",
                   help="this host's CPU features for the model, as perf-test's --cpu (e.g. "
                   "'vhe,fwb,tlbirange,dic'; default: the QEMU host of the shipped fixtures)")
    r.add_argument("--kvm-mode", choices=("vhe", "nvhe", "protected"), default=None,
                   help="KVM's mode, when the kernel command line (kvm-arm.mode=) and log do "
                   "not tell: under nvhe the TLB functions, under protected also the stage-2 "
                   "table code run at EL2 and cannot be counted")
    r.add_argument("--tracefs", default=None, metavar="DIR",
                   help="the tracefs mount (default: /sys/kernel/tracing, or under debugfs)")


def build_parser():
    from ..selftest.options import Parser
    p = Parser(prog="s2split fidelity record",
               description="Record the real kernel's stage-2 call counts while the "
               "dirty_log_perf_test phases run on this host's KVM (the 'hw run' options), "
               "as a fixture for 's2split fidelity'. arm64, root, tracefs with kprobe events "
               "and hist triggers.")
    add_record_options(p)
    p.set_defaults(func=cmd_record)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..plumbing.console import run_command
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(args, "fidelity record")


if __name__ == "__main__":
    sys.exit(main())
