"""Checking a variant against vanilla on randomized workloads.

A variant may only change how much walking is done. For every random
sequence of stage-2 operations (and a few small perf-test runs) this checks
that the variant ends with bit-identical tables, issues exactly the same TLB
invalidations (kind and level) and cache maintenance, returns the same
results, and never reads more entries than vanilla.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .arch import Geometry
from .counts import Counts
from .modes import parse_mode
from .pgtable.memory import MemoryCache
from .pgtable.stage2 import Stage2PageTable
from .pgtable.variants import VANILLA, Variant
from .pte import Prot
from .workload import PerfTestParams, run_perf_test

#: Counters that must not change under any variant.
INVARIANT_KINDS = ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages",
                   "tlbi_range_ops", "tlbi_vmid", "flush_range", "flush_range_bytes",
                   "dcache_ops", "dcache_bytes", "icache_ops", "icache_bytes", "page_taken",
                   "page_freed", "bbm")

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


def apply_ops(geom: Geometry, variant: Variant, ops: list[Op]) -> tuple[Stage2PageTable,
                                                                         list[int], Counts]:
    pgt = Stage2PageTable(geom, variant=variant)
    mc = MemoryCache(pgt.mem)
    results = []
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
    return pgt, results, pgt.tally.take()


def compare_runs(label: str, base: tuple, other: tuple, variant: Variant) -> list[str]:
    (p0, r0, c0), (p1, r1, c1) = base, other
    problems = []
    if r0 != r1:
        problems.append(f"{label}: results differ: vanilla {r0} vs {variant.name} {r1}")
    if p0.dump() != p1.dump():
        problems.append(f"{label}: final tables differ")
    for kind in INVARIANT_KINDS:
        if c0.by_level(None, kind) != c1.by_level(None, kind):
            problems.append(f"{label}: {kind} differs: vanilla {c0.by_level(None, kind)} vs "
                            f"{variant.name} {c1.by_level(None, kind)}")
    if c1.entries_read() > c0.entries_read():
        problems.append(f"{label}: {variant.name} reads more entries ({c1.entries_read()}) than "
                        f"vanilla ({c0.entries_read()})")
    return problems


def check_variant(variant: Variant, examples: int = 25, seed: int = 0,
                  ops_per_example: int = 12) -> list[str]:
    """Problems found (empty when the variant is safe on these workloads)."""
    rng = random.Random(seed)
    problems: list[str] = []
    for i in range(examples):
        granule, ipa = rng.choice(GEOMETRIES)
        geom = Geometry(granule, ipa)
        ops = random_ops(rng, geom, ops_per_example)
        label = f"example {i} ({geom.name}: {', '.join(map(str, ops))})"
        problems += compare_runs(label, apply_ops(geom, VANILLA, ops),
                                 apply_ops(geom, variant, ops), variant)
        if problems:
            break
    if not problems:
        problems += _check_workloads(variant)
    return problems


def _check_workloads(variant: Variant) -> list[str]:
    """Small perf-test runs through the KVM layer (chunking, partial splits)."""
    problems = []
    for backing, mode, chunk, manual in (("anonymous_thp", 6, 2 << 20, True),
                                         ("anonymous_hugetlb", 6, 1 << 30, False),
                                         ("anonymous_hugetlb", 7, 32 << 20, True)):
        p = PerfTestParams(vcpu_memory_bytes=32 << 20 if mode == 6 else 128 << 20, backing=backing, mode=parse_mode(mode),
                           chunk_size=chunk, manual_protect=manual)
        a = run_perf_test(p, VANILLA, "reference", keep_tables=True)
        b = run_perf_test(p, variant, "reference", keep_tables=True)
        label = f"perf-test {' '.join(p.argv())}"
        if a.tables != b.tables:
            problems.append(f"{label}: final tables differ")
        for (name, c0), (_, c1) in zip(a.phases, b.phases):
            for kind in INVARIANT_KINDS:
                if c0.by_level(None, kind) != c1.by_level(None, kind):
                    problems.append(f"{label}: phase {name}: {kind} differs")
            if c1.entries_read() > c0.entries_read():
                problems.append(f"{label}: phase {name}: more entries read")
    return problems
