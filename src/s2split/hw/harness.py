"""``s2split hw run``: the ``dirty_log_perf_test`` phases on a real VM, timed.

The order of operations is the selftest's (``run_test`` of
dirty_log_perf_test.c, Linux 6.12): create the VM (with the eager-split chunk
size first, when one is given), memslot 0 and the test memslots, the vCPUs,
``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` (unless ``-g``); then the phases, each
timed with ``time.monotonic_ns()`` from userspace:

* ``populate``: every vCPU writes every page once, in order (the vCPU threads
  start inside this phase, as upstream);
* ``enable_dirty_logging``: ``KVM_MEM_LOG_DIRTY_PAGES`` on every test memslot;
* per iteration N: ``iterN_dirty`` (one pass of ``-w``/``-a`` accesses),
  ``iterN_get_dirty_log`` (``KVM_GET_DIRTY_LOG`` on every test memslot) and,
  with manual protect, ``iterN_clear_dirty_log`` (``KVM_CLEAR_DIRTY_LOG`` of
  exactly the bits just returned);
* ``disable_dirty_logging``: the flags back to 0.

Lines are printed in the upstream format, so ``s2split hw import`` reads them
back. With ``verify``, every bitmap KVM returns is checked against the pages
the guest program must have written (computed here from the same generator),
and the memory against the value each pass writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..arm64.arch import size_name
from ..arm64.uapi import KVM_MEM_LOG_DIRTY_PAGES
from ..plumbing.errors import S2Error
from ..selftest.phases import format_seconds, upstream_label
from ..selftest.phases import phase_names as _phase_names
from . import guest as G
from .kvm import (CAP_NAMES, KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
                  KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  KVM_CAP_USER_MEMORY2, KVM_DIRTY_LOG_INITIALLY_SET, Kvm,
                  backing_page_size, bitmap_pages, host_arch, host_page_size)
from .machine import Machine
from .params import HwParams, Layout, memstress_layout

Writer = Callable[[str], None]


def phase_line(phase: str, ns: int) -> str:
    # Upstream prints a blank line after enabling dirty logging.
    end = "\n" if phase == "enable_dirty_logging" else ""
    return f"{upstream_label(phase)} time: {format_seconds(ns)}{end}"


def phase_names(p: HwParams) -> list[str]:
    return _phase_names(p.iterations, p.manual_protect, vm=False)


@dataclass
class RunResult:
    params: HwParams
    layout: Layout
    phases: list[tuple[str, int]] = field(default_factory=list)  # (phase, ns)
    capabilities: dict[str, int] = field(default_factory=dict)
    bitmaps: list[dict[int, list[int]]] = field(default_factory=list)  # per iteration
    checks: list[str] = field(default_factory=list)  # what verify checked
    problems: list[str] = field(default_factory=list)  # what verify found wrong
    #: per test memslot: what backed it after populate (backing_check.Coverage)
    coverage: list[Any] = field(default_factory=list)
    pools: dict[str, dict[str, int]] = field(default_factory=dict)  # hugetlb, before populate
    allow_partial: bool = False

    def backing(self) -> dict[str, Any] | None:
        """What is stored with every result: the smallest coverage of the
        test memslots, each memslot's, and whether partial was allowed."""
        if not self.coverage:
            return None
        return {"coverage": min(c.fraction for c in self.coverage),
                "allow_partial": self.allow_partial, "pools": self.pools,
                "slots": [c.to_dict() for c in self.coverage]}

    def seconds(self, phase: str) -> float:
        return dict(self.phases)[phase] / 1e9


class _Expected:
    """The guest program's accesses, replayed on the host."""

    def __init__(self, p: HwParams, layout: Layout, slot_ranges: dict[int, tuple[int, int]]):
        self.p = p
        self.layout = layout
        self.slot_ranges = slot_ranges  # slot -> (gpa, host pages)
        self.states = [p.vcpu_seed(i) for i in range(p.vcpus)]
        self.last_pass: dict[int, int] = {}  # guest page address -> last pass that wrote it

    def run_pass(self, number: int, write_percent: int, random_access: bool) -> dict[int, set]:
        dirty: dict[int, set] = {s: set() for s in self.slot_ranges}
        gps = self.p.granule
        hps = host_page_size()
        for i, (base, pages) in enumerate(self.layout.vcpus):
            self.states[i], written, _ = G.guest_pass(self.states[i], pages, write_percent,
                                                      random_access)
            for page in written:
                addr = base + page * gps
                self.last_pass[addr] = number
                for slot, (gpa, npages) in self.slot_ranges.items():
                    if gpa <= addr < gpa + npages * hps:
                        dirty[slot].add((addr - gpa) // hps)
                        break
        return dirty


#: The watchdog's default limit for one guest pass: a floor for VM start-up and
#: slow hosts, plus 20 us per page of a vCPU's region -- several times what a
#: stage-2 fault and a write cost on current hardware.
PASS_TIMEOUT_FLOOR = 600.0
PASS_TIMEOUT_PER_PAGE = 20e-6


def default_pass_timeout(layout: Layout) -> float:
    """Seconds one pass of this layout may take before the watchdog stops it."""
    pages = max(n for _, n in layout.vcpus)
    return PASS_TIMEOUT_FLOOR + PASS_TIMEOUT_PER_PAGE * pages


def run_config(p: HwParams, write: Writer = print, verify: bool = False,
               keep_bitmaps: bool = False, kvm: Kvm | None = None,
               pass_timeout: float | None = -1.0,
               on_phase: Callable[[str], None] | None = None,
               backing_check: str | None = None,
               smaps: Callable[[], str] | None = None) -> RunResult:
    """Run one configuration; print its lines with ``write``. A guest pass that
    takes longer than ``pass_timeout`` seconds is stopped and fails the run
    (negative: :func:`default_pass_timeout`; ``None``: no limit).
    ``on_phase(name)`` is called at every phase boundary, outside the timed
    part, when the phase ``name`` has ended (``create_vm`` just before
    populate, ``destroy_vm`` once the VM is closed).

    ``backing_check``: after populate, read what backs the test memory
    (:mod:`.backing_check`, from ``smaps()``, default /proc/self/smaps) and
    ``"refuse"`` to time memory not fully backed by its backing's page size
    (an S2Error), or ``"record"`` the coverage only; None: no check."""
    arch = host_arch()
    if arch == "x86_64" and p.granule != 4096:
        raise S2Error(f"guest mode {p.mode.id if p.mode.id >= 0 else p.mode.name} has "
                      f"{p.granule // 1024}K pages; x86-64 guests use 4K pages")
    check_backing_name(p)
    bps = backing_page_size(p.backing)
    layout = memstress_layout(p, bps)
    own = kvm is None
    kvm = kvm or Kvm()
    result = RunResult(p, layout)
    if pass_timeout is not None and pass_timeout < 0:
        pass_timeout = default_pass_timeout(layout)
    try:
        with Machine(kvm, p.mode.pa_bits, p.granule, p.x86_map, pass_timeout) as m:
            _run(m, p, layout, result, write, verify, keep_bitmaps, on_phase, backing_check,
                 smaps)
    finally:
        if own:
            kvm.close()
    if on_phase:
        on_phase("destroy_vm")
    return result


def check_backing_name(p: HwParams) -> None:
    """The model's rules for ``-s`` on this host (hugetlb sizes follow the
    host kernel's page size, not the guest mode's)."""
    from ..model.kvm.backing import parse_backing
    parse_backing(p.backing, host_page_size())


def _run(m: Machine, p: HwParams, layout: Layout, result: RunResult, write: Writer,
         verify: bool, keep_bitmaps: bool,
         on_phase: Callable[[str], None] | None = None, backing_check: str | None = None,
         smaps: Callable[[], str] | None = None) -> None:
    vm = m.vm
    caps = result.capabilities
    write(f"Testing guest mode: {p.mode.string}")
    for cap in (KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_USER_MEMORY2,
                KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES, KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE):
        caps[CAP_NAMES[cap]] = vm.check_extension(cap)
    if p.chunk_size is not None:
        vm.set_eager_split_chunk_size(p.chunk_size)
        caps["eager_split_chunk_size_set"] = vm.check_extension(KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE)
    m.add_system_memory()
    write(f"guest physical test memory: [{layout.gpa:#x}, {layout.gpa + layout.size:#x})")
    slot_ranges: dict[int, tuple[int, int]] = {}
    for slot, gpa, pages in layout.slots:
        ms = m.add_test_memory(slot, gpa, pages * p.granule, p.backing)
        slot_ranges[slot] = (gpa, ms.pages)
    for i, (gpa, pages) in enumerate(layout.vcpus):
        m.add_vcpu(gpa, pages, p.vcpu_seed(i))
    manual = 0
    if p.manual_protect:
        manual = vm.enable_manual_protect()
    caps["manual_protect_flags"] = manual
    bitmaps = {slot: vm.new_bitmap(slot) for slot in slot_ranges}
    expected = _Expected(p, layout, slot_ranges) if verify else None

    def timed(phase: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic_ns()
        fn()
        ns = time.monotonic_ns() - t0
        result.phases.append((phase, ns))
        write(phase_line(phase, ns))
        if on_phase:
            on_phase(phase)

    def set_flags(flags: int) -> Callable[[], None]:
        def run() -> None:
            for slot in slot_ranges:
                vm.set_memslot_flags(slot, flags)
        return run

    def get_log() -> None:
        for slot, bm in bitmaps.items():
            vm.get_dirty_log(slot, bm)

    def clear_log() -> None:
        for slot, bm in bitmaps.items():
            vm.clear_dirty_log(slot, bm, 0, slot_ranges[slot][1])

    try:
        m.set_control(100, False, G.VALUE_TAG | 0)
        if expected:
            expected.run_pass(0, 100, False)
        if on_phase:
            on_phase("create_vm")
        if backing_check and p.backing.startswith("anonymous_hugetlb"):
            from .backing_check import hugetlb_pool
            bps = backing_page_size(p.backing)
            result.pools[size_name(bps)] = hugetlb_pool(bps)
        timed("populate", m.run_pass)
        if backing_check:
            _check_backing(m, result, [ms for ms in (vm.memslots[s] for s in slot_ranges)],
                           backing_check, smaps)
        timed("enable_dirty_logging", set_flags(KVM_MEM_LOG_DIRTY_PAGES))
        get_total = clear_total = 0
        for it in range(1, p.iterations + 1):
            m.set_control(p.write_percent, p.random_access, G.VALUE_TAG | it)
            want = expected.run_pass(it, p.write_percent, p.random_access) if expected else None
            timed(f"iter{it}_dirty", m.run_pass)
            timed(f"iter{it}_get_dirty_log", get_log)
            get_total += result.phases[-1][1]
            got = {slot: bitmap_pages(bm, slot_ranges[slot][1]) for slot, bm in bitmaps.items()}
            if keep_bitmaps:
                result.bitmaps.append(got)
            if want is not None:
                _check_bitmaps(result, it, got, want, slot_ranges,
                               initially_set=bool(manual & KVM_DIRTY_LOG_INITIALLY_SET))
            if manual:
                timed(f"iter{it}_clear_dirty_log", clear_log)
                clear_total += result.phases[-1][1]
        timed("disable_dirty_logging", set_flags(0))
    finally:
        m.stop_vcpu_threads()
    if expected:
        _check_memory(result, m, layout, expected)
    n = p.iterations
    write(f"Get dirty log over {n} iterations took {format_seconds(get_total)}. "
          f"(Avg {format_seconds(get_total // n)}/iteration)")
    if manual:
        write(f"Clear dirty log over {n} iterations took {format_seconds(clear_total)}. "
              f"(Avg {format_seconds(clear_total // n)}/iteration)")


def _check_backing(m: Machine, result: RunResult, memslots: list[Any], mode: str,
                   smaps: Callable[[], str] | None) -> None:
    """After populate, outside the timed part: what backs each test memslot."""
    from .backing_check import SMAPS, coverage, parse_smaps, read_smaps, refusal
    vmas = parse_smaps(smaps()) if smaps else read_smaps(SMAPS)
    result.allow_partial = mode != "refuse"
    for ms in memslots:
        mem = ms.memory
        c = coverage(vmas, mem.address, mem.size, mem.backing, mem.page_size)
        result.coverage.append(c)
        if not c.full and mode == "refuse":
            raise S2Error(refusal(c))


def _check_bitmaps(result: RunResult, it: int, got: dict[int, list[int]],
                   want: dict[int, set], slot_ranges: dict[int, tuple[int, int]],
                   initially_set: bool) -> None:
    for slot, pages in got.items():
        npages = slot_ranges[slot][1]
        if it == 1 and initially_set:
            expect = set(range(npages))  # KVM_DIRTY_LOG_INITIALLY_SET: all bits set
            why = "all pages (initially set)"
        else:
            expect = want[slot]
            why = "the pages written in this iteration"
        result.checks.append(f"iteration {it} slot {slot}: {len(expect)} dirty pages, {why}")
        if set(pages) != expect:
            extra = sorted(set(pages) - expect)[:5]
            missing = sorted(expect - set(pages))[:5]
            result.problems.append(
                f"iteration {it}, memslot {slot}: KVM_GET_DIRTY_LOG returned {len(pages)} "
                f"pages, expected {len(expect)} ({why}); unexpected {extra}, missing {missing}")


def _check_memory(result: RunResult, m: Machine, layout: Layout, expected: _Expected) -> None:
    bad = 0
    first = None
    for slot, gpa, pages in layout.slots:
        mem = m.vm.memslots[slot].memory
        for k in range(pages):
            addr = gpa + k * result.params.granule
            want = G.VALUE_TAG | expected.last_pass.get(addr, 0)
            got = mem.read_u64(addr - gpa)
            if got != want:
                bad += 1
                first = first or (addr, got, want)
    result.checks.append(f"memory: {layout.guest_num_pages} guest pages hold the value of the "
                         "last pass that wrote them")
    if bad:
        addr, got, want = first
        result.problems.append(f"memory: {bad} guest pages hold the wrong value (first at "
                               f"{addr:#x}: {got:#x}, expected {want:#x})")


def measurement_rows(result: RunResult, label: str, repetition: int, host: dict[str, Any],
                     source: str = "hw run") -> list[dict[str, Any]]:
    """Rows for :meth:`s2split.storage.store.Store.add_measurements`."""
    config = result.params.to_config() | {"arch": host.get("arch"),
                                          "capabilities": result.capabilities}
    key = result.params.config_key()
    backing = result.backing()
    return [{"label": label, "config_key": key, "config": config, "phase": phase,
             "repetition": repetition, "seconds": ns / 1e9, "host": host, "source": source,
             **({"backing": backing} if backing is not None else {})}
            for phase, ns in result.phases]
