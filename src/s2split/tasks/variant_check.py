"""Checking a variant against vanilla on randomized workloads.

A variant may only change how much walking is done. For every random
sequence of stage-2 operations (and a few small perf-test runs) this checks
that the variant ends with bit-identical tables, issues exactly the same TLB
invalidations (kind and level) and cache maintenance, returns the same
results, and never reads more entries than vanilla.

A variant that says it changes the maintenance (``same_maintenance=False``:
``bbml2``) is held to the same tables, results, page allocations and cache
maintenance, and instead of the same TLBIs to this: every operation call in
which vanilla invalidated anything invalidates too (the variant's deferred
flush included), and no entry is left locked. Visitors written with the
visitor API are checked as they run: a make without a break, or a replace of
a block by a table that translates differently, stops the check with the
address and level (:class:`~s2split.model.pgtable.visitor_api.VisitorRuleError`).
A variant the fast engine can run is then run on both engines, which must
agree on every table and count.

Every workload, vanilla's included, also runs under the TLB model
(:mod:`s2split.model.pgtable.tlb_model`), which follows what the TLBs and walk
caches may still hold and checks four rules at every event: break-before-make
(FEAT_BBM level 2 aside), no writable translation left cached when a
write-protecting ioctl returns, no table page freed while a walk cache may
point to it, and no TLBI whose level hint misses the entry it follows. The
random examples draw the CPU's TLBI and FWB features too (with FWB and range
TLBIs an unmap defers its invalidation to one range flush).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from ..arm64.arch import Geometry
from ..arm64.features import Features
from ..arm64.pte import Prot
from ..counting.counts import Counts
from ..model.pgtable import tlb_model
from ..model.pgtable.memory import MemoryCache
from ..model.pgtable.stage2 import Stage2PageTable
from ..model.pgtable.variants import VANILLA, Variant
from ..model.pgtable.visitor_api import VisitorRuleError
from ..selftest.modes import parse_mode
from ..workload import PerfTestParams, run_perf_test

#: Counters that must not change under any variant.
INVARIANT_KINDS = ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages",
                   "tlbi_range_ops", "tlbi_vmid", "flush_range", "flush_range_bytes",
                   "dcache_ops", "dcache_bytes", "icache_ops", "icache_bytes", "page_taken",
                   "page_freed", "bbm")
#: Of those, the ones a variant with ``same_maintenance=False`` may change.
MAINTENANCE_KINDS = ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages",
                     "tlbi_range_ops", "tlbi_vmid", "flush_range", "flush_range_bytes", "bbm")
#: Any of these is a TLB invalidation.
TLBI_KINDS = ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_vmid")


def cpu_for(variant: Variant, base: Features | None = None) -> Features:
    """The CPU both runs use: ``base`` with the features the variant requires."""
    return replace(base or Features(), **{r: True for r in variant.requires})

#: CPU feature sets the random examples draw (the variant's requirements added).
CPUS = ({}, {"tlbirange": False}, {"fwb": False}, {"vhe": False, "tlbirange": False},
        {"fwb": False, "tlbirange": False})

GEOMETRIES = ((4096, 32), (4096, 40), (4096, 48), (16384, 36), (16384, 40), (16384, 47),
              (65536, 40), (65536, 42))


@dataclass(frozen=True)
class Op:
    name: str
    addr: int
    size: int
    arg: int = 0  # phys for map, cache pages for split, prot for relax

    def __str__(self) -> str:
        return f"{self.name}({self.addr:#x}, {self.size:#x}, {self.arg:#x})"


def random_ops(rng: random.Random, geom: Geometry, n: int) -> list[Op]:
    """A random sequence over a small region, biased towards blocks so that
    splitting has work to do."""
    page = geom.granule
    pmd = geom.pmd_size
    big = geom.pud_size if geom.min_block_level == 1 and geom.start_level <= 1 else pmd
    # Mostly PMD-sized regions; a level-1 block on 4K now and then (costly to split).
    unit = big if (big != pmd and rng.random() < 0.1) else pmd
    nblocks = rng.randint(1, 3)
    base = rng.randrange(0, max(1, geom.ipa_size // unit - nblocks)) * unit
    span = nblocks * unit
    ops = []
    for _ in range(n):
        kind = rng.choices(("map", "unmap", "wrprotect", "split", "relax"),
                           weights=(4, 1, 2, 3, 1))[0]
        if rng.random() < 0.5:
            start = base + rng.randrange(nblocks) * unit
            size = unit * rng.randint(1, nblocks - (start - base) // unit)
        else:
            start = base + rng.randrange(span // page) * page
            size = page * rng.randint(1, min(64, (base + span - start) // page))
        if kind == "map":
            # PA congruent to the IPA modulo the block size, so blocks are possible.
            ops.append(Op("map", start, size, (1 << 44) + start))
        elif kind == "split":
            ops.append(Op("split", start, size, rng.choice((0, 1, 2, 8, geom.ptrs_per_table + 1))))
        elif kind == "relax":
            ops.append(Op("relax", start, page, int(Prot.RW)))
        else:
            ops.append(Op(kind, start, size))
    return ops


def apply_ops(geom: Geometry, variant: Variant, ops: list[Op],
              features: Features | None = None,
              tlb: bool = False) -> tuple[Stage2PageTable, list[int], list[Counts]]:
    """Run ``ops``: the page table, each op's result and each op's counts.
    With ``tlb``, under a TLB model (``tlb_model.attached(pgt).findings``),
    each operation one hold of the MMU lock."""
    pgt = Stage2PageTable(geom, features or cpu_for(variant), variant=variant)
    model = tlb_model.attach(pgt) if tlb else None
    mc = MemoryCache(pgt.mem)
    results = []
    counts = []
    for op in ops:
        if op.name == "map":
            mc.topup(40, geom.levels)
            results.append(pgt.map(op.addr, op.size, op.arg, Prot.RW, mc))
        elif op.name == "unmap":
            results.append(pgt.unmap(op.addr, op.size))
        elif op.name == "wrprotect":
            results.append(pgt.wrprotect(op.addr, op.size))
        elif op.name == "relax":
            results.append(pgt.relax_perms(op.addr, op.arg))
        elif op.name == "split":
            cache = MemoryCache(pgt.mem)
            cache.topup(max(op.arg, 1), op.arg) if op.arg else None
            results.append(pgt.split(op.addr, op.size, cache))
            cache.free_all()
        if model is not None:
            model.lock_release()
        counts.append(pgt.tally.take())
    return pgt, results, counts


def _describe_leaf(leaf: tuple[int, int, int] | None, page: int) -> str:
    if leaf is None:
        return "nothing"
    _, level, entry = leaf
    what = "page" if level == 3 else "block"
    return f"a level-{level} {what} ({'writable' if entry & 0x80 else 'read-only'})"


def first_difference(p0: Stage2PageTable, p1: Stage2PageTable) -> str:
    """Where two page tables first translate differently: address, levels,
    and what the second left (unsplit, writable), in one phrase."""
    page = p0.geom.granule
    l0 = {ipa: (ipa, lv, e) for ipa, lv, e in p0.leaves()}
    l1 = {ipa: (ipa, lv, e) for ipa, lv, e in p1.leaves()}
    for ipa in sorted(set(l0) | set(l1)):
        a, b = l0.get(ipa), l1.get(ipa)
        if a == b:
            continue
        why = ""
        if a and b and b[1] < a[1]:
            why = ": left unsplit"
        elif a and b and b[2] & 0x80 and not a[2] & 0x80:
            why = ": left writable"
        return (f"at IPA {ipa:#x}, level {(b or a)[1]}: vanilla has {_describe_leaf(a, page)}, "
                f"the variant {_describe_leaf(b, page)}{why}")
    return "the tables are laid out differently (same translations)"


def _tlb_problems(label: str, c0: list[Counts], c1: list[Counts], ops: list[Op],
                  variant: Variant) -> list[str]:
    for op, a, b in zip(ops, c0, c1):
        if any(a.total(k) for k in TLBI_KINDS) and not any(b.total(k) for k in TLBI_KINDS):
            return [f"{label}: {op} invalidates nothing under {variant.name}, but vanilla "
                    "invalidates: stale translations stay in the TLBs"]
    return []


def compare_runs(label: str, base: tuple, other: tuple, variant: Variant,
                 ops: list[Op] | None = None) -> list[str]:
    (p0, r0, c0), (p1, r1, c1) = base, other
    c0s, c1s = (c0, c1) if isinstance(c0, list) else ([c0], [c1])
    t0, t1 = sum(c0s[1:], c0s[0]), sum(c1s[1:], c1s[0])
    problems = []
    if p0.dump() != p1.dump():
        problems.append(f"{label}: final tables differ {first_difference(p0, p1)}")
    if r0 != r1:
        problems.append(f"{label}: results differ: vanilla {r0} vs {variant.name} {r1}")
    problems += [f"{label}: {variant.name}: {p}" for p in p1.check_invariants()[:1]]
    skip = () if variant.same_maintenance else MAINTENANCE_KINDS
    for kind in INVARIANT_KINDS:
        if kind in skip:
            continue
        if t0.by_level(None, kind) != t1.by_level(None, kind):
            problems.append(f"{label}: {kind} differs: vanilla {t0.by_level(None, kind)} vs "
                            f"{variant.name} {t1.by_level(None, kind)}")
    if not variant.same_maintenance and ops is not None:
        problems += _tlb_problems(label, c0s, c1s, ops, variant)
    if t1.entries_read() > t0.entries_read():
        problems.append(f"{label}: {variant.name} reads more entries ({t1.entries_read()}) than "
                        f"vanilla ({t0.entries_read()})")
    return problems


_GIB = 1 << 30
#: Examples every check runs first: a level-1 block (rare in random ops),
#: split in part from a two-page cache (a page of level-2 blocks, then one of
#: them to pages), then whole from a full cache (force_pte).
FIXED_EXAMPLES = (((4096, 40), (Op("map", _GIB, _GIB, (1 << 44) + _GIB),
                                Op("wrprotect", _GIB, _GIB),
                                Op("split", _GIB, 2 << 20, 2),
                                Op("split", _GIB, _GIB, 513))),)


def check_variant(variant: Variant, examples: int = 25, seed: int = 0,
                  ops_per_example: int = 12) -> list[str]:
    """Problems found (empty when the variant is safe on these workloads).
    A variant with MMU-layer hooks is checked by :mod:`s2split.tasks.mmu_check`."""
    if variant.mmu or variant.extra_protection or variant.cache_differs:
        from .mmu_check import check_mmu
        return check_mmu(variant, examples, seed).problems
    rng = random.Random(seed)
    cpu_rng = random.Random(seed + 1)  # apart, so that the operations drawn stay as they were
    problems: list[str] = []
    fixed = [(Geometry(*g), list(ops)) for g, ops in FIXED_EXAMPLES]
    for i in range(len(fixed) + examples):
        cpu = cpu_for(variant)
        if i < len(fixed):
            geom, ops = fixed[i]
        else:
            granule, ipa = rng.choice(GEOMETRIES)
            geom = Geometry(granule, ipa)
            ops = random_ops(rng, geom, ops_per_example)
            cpu = cpu_for(variant, replace(Features(), **cpu_rng.choice(CPUS)))
        label = f"example {i} ({geom.name}, {cpu.spec()}: {', '.join(map(str, ops))})"
        try:
            other = apply_ops(geom, variant, ops, cpu, tlb=True)
        except VisitorRuleError as e:
            return [f"example {i} ({geom.name}): {variant.name}: {e}"]
        base = apply_ops(geom, VANILLA, ops, cpu, tlb=True)
        problems += compare_runs(label, base, other, variant, ops)
        if not problems:
            problems += _tlb_findings(label, "vanilla", base[0])
            problems += _tlb_findings(label, variant.name, other[0])
        if problems:
            break
    if not problems:
        problems += _check_workloads(variant)
    if not problems and not variant.flag_only and variant.fast_capable:
        problems += _check_engines(variant)
    return problems


def _tlb_findings(label: str, name: str, target) -> list[str]:
    """The TLB model's first finding, as a problem (in vanilla: a bug of the model)."""
    model = tlb_model.attached(target)
    if model is None or not model.findings:
        return []
    note = " (vanilla: the TLB model is wrong, or the kernel is)" if name == "vanilla" else ""
    return [f"{label}: {name}{note}: {model.findings[0]}"]


def _check_engines(variant: Variant) -> list[str]:
    """One small perf-test run on both engines: same tables, same counts."""
    p = PerfTestParams(vcpu_memory_bytes=8 << 20, backing="anonymous_thp", mode=parse_mode(6),
                       chunk_size=2 << 20, manual_protect=True, features=cpu_for(variant))
    a = run_perf_test(p, variant, "reference", keep_tables=True)
    b = run_perf_test(p, variant, "fast", keep_tables=True)
    label = f"perf-test {' '.join(p.argv())} --variant {variant.name}"
    if a.tables != b.tables:
        return [f"{label}: the fast engine's tables differ from the reference engine's"]
    for (name, c0), (_, c1) in zip(a.phases, b.phases):
        if c0.to_dict() != c1.to_dict():
            kind = next(d for d in c0.diff(c1))
            return [f"{label}: phase {name}: the engines count differently ({kind})"]
    return []


def _check_workloads(variant: Variant) -> list[str]:
    """Small perf-test runs through the KVM layer (chunking, partial splits)."""
    problems = []
    for backing, mode, chunk, manual in (("anonymous_thp", 6, 2 << 20, True),
                                         ("anonymous_hugetlb", 6, 1 << 30, False),
                                         ("anonymous_hugetlb", 7, 32 << 20, True)):
        p = PerfTestParams(vcpu_memory_bytes=32 << 20 if mode == 6 else 128 << 20,
                           backing=backing, mode=parse_mode(mode), chunk_size=chunk,
                           manual_protect=manual, features=cpu_for(variant))
        vms: dict[str, object] = {}
        a = run_perf_test(p, VANILLA, "reference", keep_tables=True,
                          on_vm=lambda vm: vms.setdefault("vanilla", tlb_model.attach(vm)))
        try:
            b = run_perf_test(p, variant, "reference", keep_tables=True,
                              on_vm=lambda vm: vms.setdefault("variant", tlb_model.attach(vm)))
        except VisitorRuleError as e:
            return [f"perf-test {' '.join(p.argv())}: {variant.name}: {e}"]
        label = f"perf-test {' '.join(p.argv())}"
        if a.tables != b.tables:
            problems.append(f"{label}: final tables differ")
        for (name, c0), (_, c1) in zip(a.phases, b.phases):
            for kind in INVARIANT_KINDS:
                if not variant.same_maintenance and kind in MAINTENANCE_KINDS:
                    continue
                if c0.by_level(None, kind) != c1.by_level(None, kind):
                    problems.append(f"{label}: phase {name}: {kind} differs")
            if c1.entries_read() > c0.entries_read():
                problems.append(f"{label}: phase {name}: more entries read")
        if not problems:
            for name, key in (("vanilla", "vanilla"), (variant.name, "variant")):
                problems += _tlb_findings(label, name, vms[key])
    return problems
