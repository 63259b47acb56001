"""Checking a variant above the walker (MMU-layer hooks) against vanilla.

A variant that replaces functions of the KVM MMU layer may walk other ranges
in another order than vanilla, so it is not held to vanilla's exact walks.
It is held to what matters, after every ioctl of random KVM workloads
(memslots of every backing, eager-split chunk sizes, manual-protect or not,
guest passes with random writes, ``KVM_GET_DIRTY_LOG``, ``KVM_CLEAR_DIRTY_LOG``
of random parts of the log, logging turned off and on again), run in
lockstep with vanilla on identical input:

* the dirty bitmaps returned to userspace, and the log KVM keeps, equal
  vanilla's;
* every page whose dirty bit is clear and that vanilla has write-protected
  is write-protected (else the guest could write it unseen: the check names
  the page);
* a page vanilla leaves writable is writable, unless the variant declares
  ``extra_protection=True``; then the check counts the extra write faults
  the guest took for it;
* the mappings (output address, level, attributes but the write bit) and
  the table pages per level equal vanilla's; the pages held in the split
  cache too, unless the variant declares ``cache_differs=True``;
* the TLB: both reference VMs run under the TLB model
  (:mod:`s2split.model.pgtable.tlb_model`: break-before-make, no stale writable
  entry when a write-protecting ioctl returns, freed tables, TLBI level
  hints), whose first finding fails the check; and a variant with
  ``same_maintenance`` issues exactly vanilla's TLB invalidations (kind and
  level) and break-before-make sequences in every step (the fault path's
  aside when it declares extra protection, whose faults add their own).
  More rules plug in through :data:`TLB_RULES`.

A variant the fast engine can run then runs the same workloads on both
engines, which must agree on every table and count after every step.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..arm64.arch import Geometry
from ..arm64.bits import S2AP_W, VALID
from ..arm64.features import Features
from ..arm64.uapi import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS,
                          KVM_MEM_LOG_DIRTY_PAGES)
from ..counting.counters import OPS
from ..counting.counts import Counts
from ..model.kvm.backing import parse_backing
from ..model.pgtable import tlb_model
from ..model.pgtable.variants import VANILLA, Variant
from ..plumbing.errors import KernelError

#: Counters of TLB maintenance a ``same_maintenance`` variant must match per ioctl.
TLB_KINDS = ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages", "tlbi_vmid",
             "flush_range", "flush_range_bytes", "bbm")

#: The operations of the fault path.
FAULT_OPS = ("map", "relax_perms", "get_leaf")

def tlb_model_findings(label: str, vm0, vm1, variant: Variant) -> list[str]:
    """The TLB model's first finding on either VM (vanilla's too: a finding
    there is the model's or the workload's problem, not the variant's)."""
    for name, vm in (("vanilla", vm0), (variant.name, vm1)):
        model = tlb_model.attached(vm)
        findings = model.findings if model is not None else getattr(vm, "findings", [])
        if findings:
            return [f"{label}: {name}: {findings[0]}"]
    return []


@dataclass
class _Frozen:
    """What the check reads of vanilla's VM after one step, kept: vanilla
    runs each workload once however many variants are checked."""

    dump: bytes
    bitmaps: dict
    cache: int
    findings: list

    def dump_tables(self) -> bytes:
        return self.dump

    def dirty_bitmap(self, slot_id: int):
        return self.bitmaps[slot_id]

    def split_cache_pages(self) -> int:
        return self.cache


#: Vanilla's steps per workload: [(_Frozen, returned, counts)].
_VANILLA: dict = {}


def _freeze(vm, slot_ids) -> _Frozen:
    model = tlb_model.attached(vm)
    return _Frozen(vm.dump_tables(), {s: vm.dirty_bitmap(s) for s in slot_ids},
                   vm.split_cache_pages(), list(model.findings) if model else [])


#: Rules on the TLB, ``rule(step, vanilla_vm, variant_vm, variant) -> [problems]``,
#: called after every step.
TLB_RULES: list[Callable] = [tlb_model_findings]

#: (granule, IPA bits) of the random workloads.
GEOMETRIES = ((4096, 40), (16384, 40), (65536, 42))
BACKINGS = ("anonymous", "anonymous_thp", "anonymous_hugetlb")


@dataclass
class MmuReport:
    """What the check found: problems, and what the variant cost the guest."""

    problems: list[str] = field(default_factory=list)
    #: Write faults the guest took beyond vanilla's (extra protection).
    extra_faults: int = 0
    steps: int = 0
    workloads: int = 0


@dataclass(frozen=True)
class Workload:
    """One random KVM workload: a VM and a list of steps."""

    geom: Geometry
    backing: str
    chunk: int
    manual: bool
    slots: tuple[tuple[int, int, int], ...]  # (slot id, gpa, bytes)
    steps: tuple[tuple, ...]

    def describe(self) -> str:
        return (f"{self.geom.name}, {self.backing}, chunk {self.chunk:#x}, "
                f"{'manual-protect' if self.manual else 'no manual-protect'}, slots "
                + ", ".join(f"{i}@{gpa:#x}+{size:#x}" for i, gpa, size in self.slots))


def random_workload(rng: random.Random, nsteps: int = 14) -> Workload:
    """A small VM (one or two memslots of a few blocks) and random ioctls."""
    granule, ipa = rng.choice(GEOMETRIES)
    geom = Geometry(granule, ipa)
    backing = rng.choice(BACKINGS)
    pmd = geom.pmd_size
    # Guest passes cost per page: 4K VMs get up to eight 2M blocks, 16K two
    # 32M blocks, 64K one 512M block.
    big = granule != 4096
    nblocks = rng.randint(1, 1 if granule == 65536 else 2 if big else 4)
    slots = []
    gpa = pmd * rng.randint(1, 4)
    for i in range(rng.randint(1, 1 if big else 2)):
        size = nblocks * pmd
        if rng.random() < 0.3:
            size -= granule * rng.randint(1, 64)  # a slot that ends inside a block
        slots.append((i, gpa, size))
        gpa += nblocks * pmd
    chunk = rng.choice([0, pmd, pmd] + ([geom.pud_size] if geom.min_block_level == 1 else []))
    steps: list[tuple] = [("populate",), ("enable",)]
    for _ in range(nsteps):
        kind = rng.choices(("pass", "get", "clear", "toggle"), weights=(4, 3, 4, 1))[0]
        if kind == "pass":
            steps.append(("pass", rng.choice((100, 50, 10, 1)), rng.random() < 0.5))
        elif kind == "get":
            steps.append(("get",))
        elif kind == "clear":
            steps.append(("clear", rng.randrange(1 << 30)))
        else:
            steps += [("disable",), ("pass", 100, False), ("enable",)]
    return Workload(geom, backing, chunk, rng.random() < 0.7, tuple(slots), tuple(steps))


def _clear_args(seed: int, npages: int, log: list[int]) -> tuple[int, int, list[int]]:
    """A random part of the log to clear: (first page, pages, words)."""
    rng = random.Random(seed)
    nwords = (npages + 63) // 64
    first = rng.randrange(nwords) * 64 if rng.random() < 0.4 else 0
    num = npages - first if rng.random() < 0.6 else min(npages - first, 64 * rng.randint(1, 4))
    words = []
    for j in range((num + 63) // 64):
        w = log[first // 64 + j] if first // 64 + j < len(log) else 0
        choice = rng.random()
        if choice < 0.5:
            pass                                  # clear what was dirty
        elif choice < 0.7:
            w = (1 << 64) - 1                     # clear everything
        elif choice < 0.85:
            w &= rng.randrange(1 << 64)           # part of it
        else:
            w = 0
        words.append(w)
    return first, num, words


class _Run:
    """One VM running a workload, step by step."""

    def __init__(self, wl: Workload, variant: Variant, engine: str, features: Features):
        from ..engine import get_engine
        self.wl = wl
        self.vm = get_engine(engine, None, variant).create_vm(wl.geom, features, variant, 48)
        vm = self.vm
        if engine == "reference":
            tlb_model.attach(vm)
        vm.set_eager_split_chunk_size(wl.chunk)
        backing = parse_backing(wl.backing, wl.geom.granule)
        for slot_id, gpa, size in wl.slots:
            vm.add_memslot(slot_id, gpa, size, backing)
        if wl.manual:
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS)
        for i, (slot_id, gpa, size) in enumerate(wl.slots):
            vm.add_vcpu(gpa, size // wl.geom.granule, i + 1)
        self.logs: dict[int, list[int]] = {}
        self.returned: list = []

    def step(self, st: tuple) -> None:
        vm = self.vm
        kind = st[0]
        self.returned = []
        if kind == "populate":
            vm.guest_pass(100, False)
        elif kind == "pass":
            vm.guest_pass(st[1], st[2])
        elif kind in ("enable", "disable"):
            for slot_id, _, _ in self.wl.slots:
                vm.set_memslot_flags(slot_id, KVM_MEM_LOG_DIRTY_PAGES if kind == "enable" else 0)
        elif kind == "get":
            for slot_id, _, _ in self.wl.slots:
                try:
                    log = [int(w) for w in vm.get_dirty_log(slot_id)]
                except KernelError:
                    log = []
                self.logs[slot_id] = log
                self.returned.append(log)
        elif kind == "clear":
            if not self.wl.manual:
                return
            for slot_id, _, size in self.wl.slots:
                npages = size // self.wl.geom.granule
                first, num, words = _clear_args(st[1] + slot_id, npages,
                                                self.logs.get(slot_id, []))
                try:
                    vm.clear_dirty_log(slot_id, first, num, words)
                except KernelError:
                    pass  # logging is off: ENOENT on both


def _pages(geom: Geometry, dump: bytes) -> tuple[dict[int, tuple[int, int]], dict[int, int]]:
    """From a canonical table image: each mapped page's (level, entry of its
    leaf), and the table pages per level."""
    ptrs = geom.ptrs_per_table
    rec = 20 + 8 * ptrs
    pages: dict[int, tuple[int, int]] = {}
    tables: dict[int, int] = {}
    for off in range(0, len(dump), rec):
        _, level, base = struct.unpack_from("<qiq", dump, off)
        tables[level] = tables.get(level, 0) + 1
        entries = struct.unpack_from(f"<{ptrs}Q", dump, off + 20)
        g = geom.granule_size(level)
        for i, e in enumerate(entries):
            if e & VALID and (level == 3 or not e & 2):
                for k in range(g // geom.granule):
                    pages[base + i * g + k * geom.granule] = (level, e)
    return pages, tables


def _dirty(vm, slots_of, slot_ids, geom: Geometry) -> dict[int, bool]:
    """Each logged page's bit in the log KVM keeps (``vm``'s, with the
    memslots of ``slots_of``)."""
    out = {}
    for slot_id in slot_ids:
        slot = slots_of.memslots[slot_id]
        log = vm.dirty_bitmap(slot_id)
        if log is None:
            continue
        for i in range(slot.npages):
            out[(slot.base_gfn + i) * geom.granule] = bool((int(log[i >> 6]) >> (i & 63)) & 1)
    return out


def compare_step(label: str, geom: Geometry, slot_ids: list[int], vm0, vm1, returned0,
                 returned1, c0: Counts, c1: Counts, variant: Variant) -> tuple[list[str], int]:
    """Problems after one step (an ioctl, a guest pass, a phase) of vanilla's
    VM ``vm0`` and the variant's ``vm1``, and the extra write faults the
    variant's guest took in it."""
    problems = []
    if returned0 != returned1:
        problems.append(f"{label}: the dirty log returned to userspace differs from vanilla's")
    if [vm0.dirty_bitmap(s) for s in slot_ids] != [vm1.dirty_bitmap(s) for s in slot_ids]:
        problems.append(f"{label}: the dirty log KVM keeps differs from vanilla's")
    p0, t0 = _pages(geom, vm0.dump_tables())
    p1, t1 = _pages(geom, vm1.dump_tables())
    if t0 != t1:
        problems.append(f"{label}: table pages per level differ: vanilla {t0}, "
                        f"{variant.name} {t1}")
    dirty = _dirty(vm0, vm1, slot_ids, geom)
    for ipa in sorted(set(p0) | set(p1)):
        x, y = p0.get(ipa), p1.get(ipa)
        if x is None or y is None or x[0] != y[0] or (x[1] ^ y[1]) & ~S2AP_W:
            problems.append(f"{label}: page {ipa:#x} is mapped differently: vanilla "
                            f"{_leaf(x)}, {variant.name} {_leaf(y)}")
            break
        w0, w1 = x[1] & S2AP_W, y[1] & S2AP_W
        if w1 and not w0 and not dirty.get(ipa, True):
            problems.append(f"{label}: page {ipa:#x} is left writable, its dirty bit is clear "
                            "and vanilla write-protected it: a guest write would go unseen")
            break
        if w0 and not w1 and not variant.extra_protection:
            problems.append(f"{label}: page {ipa:#x} is write-protected where vanilla leaves it "
                            "writable, and the variant does not declare extra_protection")
            break
    if not variant.cache_differs and vm0.split_cache_pages() != vm1.split_cache_pages():
        problems.append(f"{label}: the split cache holds {vm1.split_cache_pages()} pages, "
                        f"vanilla's {vm0.split_cache_pages()}, and the variant does not "
                        "declare cache_differs")
    if variant.same_maintenance:
        # Extra protection brings extra faults, and their invalidations: the
        # fault path's are then not compared.
        ops = [op for op in OPS if not (variant.extra_protection and op in FAULT_OPS)]
        for kind in TLB_KINDS:
            x = [c0.by_level(op, kind) for op in ops]
            y = [c1.by_level(op, kind) for op in ops]
            if x != y:
                op = ops[next(i for i in range(len(ops)) if x[i] != y[i])]
                problems.append(f"{label}: {op}: {kind} differs: vanilla "
                                f"{c0.by_level(op, kind)}, {variant.name} {c1.by_level(op, kind)}")
                break
    for rule in TLB_RULES:
        problems += rule(label, vm0, vm1, variant)
    extra = c1.get("kvm", "perm_faults") - c0.get("kvm", "perm_faults")
    return problems, extra


def _leaf(x: tuple[int, int] | None) -> str:
    if x is None:
        return "nothing"
    return f"a level-{x[0]} {'page' if x[0] == 3 else 'block'} ({x[1]:#x})"


def _step_label(i: int, wl: Workload, st: tuple) -> str:
    return f"workload {i} ({wl.describe()}), step {st}"


def check_mmu_variant(variant: Variant, examples: int = 20, seed: int = 0,
                      features: Features | None = None,
                      engines: bool = True) -> MmuReport:
    """Run ``examples`` random KVM workloads under vanilla and ``variant`` in
    lockstep on the reference engine (then, for a variant the fast engine
    runs, on both engines); the first problem ends the check."""
    rng = random.Random(seed)
    report = MmuReport()
    cpu = features or Features()
    for i in range(examples):
        wl = random_workload(rng)
        report.workloads += 1
        slot_ids = [s for s, _, _ in wl.slots]
        key = (wl, cpu)
        if key not in _VANILLA:
            a = _Run(wl, VANILLA, "reference", cpu)
            trace = []
            for st in wl.steps:
                a.step(st)
                trace.append((_freeze(a.vm, slot_ids), a.returned, a.vm.take_counts()))
            _VANILLA[key] = trace
        b = _Run(wl, variant, "reference", cpu)
        f = _Run(wl, variant, "fast", cpu) if engines and variant.fast_capable else None
        for st, (v0, returned0, c0) in zip(wl.steps, _VANILLA[key]):
            label = _step_label(i, wl, st)
            b.step(st)
            c1 = b.vm.take_counts()
            problems, extra = compare_step(label, wl.geom, slot_ids, v0, b.vm, returned0,
                                           b.returned, c0, c1, variant)
            report.steps += 1
            report.extra_faults += extra
            if f is not None and not problems:
                f.step(st)
                c2 = f.vm.take_counts()
                if f.vm.dump_tables() != b.vm.dump_tables() or c2.to_dict() != c1.to_dict() \
                        or f.returned != b.returned:
                    problems.append(f"{label}: the fast engine differs from the reference "
                                    f"engine under {variant.name}")
            if problems:
                report.problems = problems
                return report
    return report


#: The perf-test runs of the check: every granule and backing, with the eager
#: split chunk at the PMD block size, with and without manual-protect.
PERF_GRANULES = (4096, 16384, 65536)


def perf_params(granule: int, backing: str, manual: bool, features: Features):
    """A small perf-test run: one PMD block per vCPU (2M, 32M, 512M), two iterations."""
    from ..arm64.arch import pmd_size
    from ..selftest.modes import mode_for
    from ..workload import PerfTestParams
    pmd = pmd_size(granule)
    return PerfTestParams(vcpu_memory_bytes=pmd, backing=backing, mode=mode_for(granule, 40),
                          chunk_size=pmd, manual_protect=manual, features=features)


def check_mmu_perf_tests(variant: Variant, features: Features | None = None,
                         engines: bool = True) -> MmuReport:
    """Every phase of small perf-test runs of every granule and backing (with
    and without manual-protect), vanilla and the variant in lockstep, held
    to the rules above at the end of each phase; then the fast engine, which
    must count and build exactly as the reference engine in every phase."""
    from ..engine import get_engine
    from ..workload import memstress_layout, phase_steps
    report = MmuReport()
    cpu = features or Features()
    for granule in PERF_GRANULES:
        for backing in BACKINGS:
            for manual in (True, False):
                p = perf_params(granule, backing, manual, cpu)
                layout = memstress_layout(p)
                slot_ids = [s for s, _, _ in layout.slots]
                geom = p.geometry()
                steps = [(n, st) for n, st in phase_steps(p, layout) if n != "destroy_vm"]
                if p not in _VANILLA:
                    van = get_engine("reference", None, VANILLA).create_vm(
                        geom, cpu, VANILLA, p.host_va_bits, p.kernel)
                    tlb_model.attach(van)
                    ctx: dict = {}
                    trace = []
                    for _, step in steps:
                        step(van, ctx)
                        trace.append((_freeze(van, slot_ids), _returned(ctx), van.take_counts()))
                    _VANILLA[p] = trace
                vms = [get_engine(e, None, variant).create_vm(geom, cpu, variant, p.host_va_bits,
                                                              p.kernel)
                       for e in ("reference", "fast")
                       if e == "reference" or (engines and variant.fast_capable)]
                tlb_model.attach(vms[0])
                ctxs: list[dict] = [{} for _ in vms]
                report.workloads += 1
                # (destroy_vm is left out: the tables were compared at the end of the phase before)
                for (name, step), (v0, returned0, c0) in zip(steps, _VANILLA[p]):
                    counts = []
                    for vm, ctx in zip(vms, ctxs):
                        step(vm, ctx)
                        counts.append(vm.take_counts())
                    returned = [_returned(ctx) for ctx in ctxs]
                    label = f"perf-test {' '.join(p.argv())}, phase {name}"
                    problems, extra = compare_step(label, geom, slot_ids, v0, vms[0], returned0,
                                                   returned[0], c0, counts[0], variant)
                    report.steps += 1
                    report.extra_faults += extra
                    if not problems and len(vms) == 2 and (
                            vms[1].dump_tables() != vms[0].dump_tables()
                            or counts[1].to_dict() != counts[0].to_dict()
                            or returned[1] != returned[0]):
                        problems.append(f"{label}: the fast engine differs from the reference "
                                        f"engine under {variant.name}")
                    if problems:
                        report.problems = problems
                        return report
    return report


def _returned(ctx: dict) -> dict:
    """The logs KVM_GET_DIRTY_LOG returned in a perf-test run, as integers."""
    return {k: [int(w) for w in v] for k, v in ctx.items() if isinstance(k, int)}


def check_mmu(variant: Variant, examples: int = 20, seed: int = 0) -> MmuReport:
    """The whole check of a variant above the walker: the random KVM
    workloads, then the perf-test runs (both on both engines)."""
    # the CPU with the features the variant requires (variant_check.cpu_for,
    # which imports this module)
    cpu = replace(Features(), **{r: True for r in variant.requires})
    report = check_mmu_variant(variant, examples, seed, cpu)
    if report.problems:
        return report
    perf = check_mmu_perf_tests(variant, cpu)
    return MmuReport(perf.problems, report.extra_faults + perf.extra_faults,
                     report.steps + perf.steps, report.workloads + perf.workloads)
