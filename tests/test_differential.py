"""Differential tests: the fast engine against the reference engine.

The reference engine (pure Python walker and visitors) is the oracle; the fast
engine (numba kernels) must reach bit-identical tables, identical dirty
bitmaps and identical counts in every phase, on any dirty_log_perf_test
configuration. Nothing here states an expected value: every expectation is
what the reference engine computes for the same input.

Beyond the results ``run_perf_test`` returns, both engines are watched after
every phase (tables, bitmaps, vCPU generator states, table pages in use), so a
failure names the first phase where the engines part, and the fast engine's
own invariants (refcounts, no locked entries) are checked there too.

Budgets: the reference engine costs roughly 40 us per guest page per pass on
top of its split and write-protect walks, so the sizes below are bounded in
*pages*, not bytes -- that keeps a generated example under about a second
(a few seconds in the "large" test) whatever the granule, while 16K and 64K
granules still reach hundreds of MiB.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _hyp import HYP

from s2split.arm64.arch import GRANULES, Geometry
from s2split.selftest.backing_names import ANONYMOUS_HUGETLB_SIZES
from s2split.engine import get_engine
from s2split.arm64.features import Features
from s2split.model.kvm.backing import parse_backing
from s2split.selftest.memstress import INT_MAX
from s2split.plumbing.errors import S2Error
from s2split.selftest.modes import MODES, mode_for, parse_mode
from s2split.model.pgtable.variants import get as get_variant, names as variant_names
from s2split.arm64.versions import DEFAULT_KERNEL, KERNELS
from s2split.workload import PerfTestParams, memstress_layout, run_perf_test, run_variants

MIB = 1 << 20
GIB = 1 << 30
U64 = (1 << 64) - 1
MAX_ROWS = 40  # differing counters shown in a failure
MAX_TEARDOWN_WALKS = 1 << 18  # about a second of the reference engine
#: Every variant: both engines run them all (split-batched-tlbi too).
VARIANTS = tuple(variant_names())
#: The modelled kernels, the default (the fixtures' 6.12) first.
KERNEL_VERSIONS = (DEFAULT_KERNEL, *sorted(k for k in KERNELS if k != DEFAULT_KERNEL))



# -- running both engines, watching every phase ---------------------------------

class Watched:
    """An engine that keeps its VMs, so each phase's end state can be read.

    ``run_variants`` takes an engine object as it is; this one hands out the
    wrapped engine's VMs unchanged (snapshots included), so the run under test
    is exactly the run the string engine name would give.
    """

    def __init__(self, name: str):
        self.inner = get_engine(name)
        self.snapshots = getattr(self.inner, "snapshots", False)
        self.vms: list = []
        self.states: list[tuple[str, dict]] = []

    def create_vm(self, *args, **kwargs):
        vm = self.inner.create_vm(*args, **kwargs)
        self.vms.append(vm)
        return vm

    def on_phase(self, name: str) -> None:
        self.states.append((name, phase_state(self.vms[-1], name)))

    def problems(self) -> list[str]:
        return [f"{name}: {p}" for name, s in self.states for p in s.get("invariants", ())]


def phase_state(vm, name: str) -> dict:
    """What both engines must agree on at the end of a phase (counters aside).

    The invariants (refcount = non-zero entries + 1, no locked entry left) are
    part of it: the reference must have none broken, so a broken one in the
    fast engine shows up as a difference in the phase that broke it.
    """
    pages = vm.pgt.mem.live_pages() if vm.engine == "reference" else vm.table_pages()
    state = {"table pages in use": pages,
             "vCPU generator states": [v.rng for v in vm.vcpus],
             "dirty bitmaps": {sid: _words(vm.dirty_bitmap(sid)) for sid in sorted(vm.memslots)}}
    if name != "destroy_vm":  # the tables are gone after it
        state["tables"] = vm.dump_tables()
        state["invariants"] = vm.pgt.check_invariants() if vm.engine == "reference" else \
            vm.check_invariants()
    return state


def _words(bitmap) -> list[int] | None:
    """A bitmap as unsigned 64-bit words (the fast engine hands out int64 arrays)."""
    return None if bitmap is None else [int(w) & U64 for w in bitmap]


def _first_difference(a: bytes, b: bytes) -> str:
    n = min(len(a), len(b))
    i = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{len(a)} vs {len(b)} bytes, first difference at byte {i}"


def describe(p: PerfTestParams, variant: str) -> str:
    return f"s2split perf-test {' '.join(p.argv())} --variant {variant}"


def compare_runs(ref, fast, ref_states=None, fast_states=None, what: str = "") -> None:
    """Fail at the first phase where the engines differ, with a readable diff."""
    where = what or describe(ref.params, ref.variant)
    assert fast.phase_names == ref.phase_names, f"{where}: phases differ"
    for (name, rc), (_, fc), (sname_r, rs), (sname_f, fs) in \
            _phases_with_states(ref.phases, fast.phases, ref_states, fast_states):
        if not np.array_equal(rc.array, fc.array):
            diff = rc.diff(fc)
            rows = "\n".join(f"  {op}/{kind}/{'-' if lv is None else lv}: reference {a}, "
                             f"fast {b}" for op, kind, lv, a, b in diff[:MAX_ROWS])
            more = f"\n  ... and {len(diff) - MAX_ROWS} more" if len(diff) > MAX_ROWS else ""
            raise AssertionError(f"{where}: counts differ in phase {name}:\n{rows}{more}")
        if rs is None:
            continue
        assert sname_r == sname_f == name
        for key in rs:
            if rs[key] != fs[key]:
                detail = _first_difference(rs[key], fs[key]) if key == "tables" else \
                    f"reference {rs[key]}, fast {fs[key]}"
                raise AssertionError(f"{where}: {key} differ after phase {name}: {detail}")
    assert fast.tables == ref.tables, \
        f"{where}: final tables differ: {_first_difference(ref.tables, fast.tables)}"
    assert {k: _words(v) for k, v in fast.bitmaps.items()} == \
        {k: _words(v) for k, v in ref.bitmaps.items()}, f"{where}: returned dirty bitmaps differ"


def _phases_with_states(ref_phases, fast_phases, ref_states, fast_states):
    none = (None, None)
    rs = ref_states or [none] * len(ref_phases)
    fs = fast_states or [none] * len(fast_phases)
    assert len(rs) == len(ref_phases) and len(fs) == len(fast_phases)
    return zip(ref_phases, fast_phases, rs, fs)


def with_required_features(p: PerfTestParams, variants) -> PerfTestParams:
    """``p`` on a CPU with every feature the variants require (bbml2): the
    feature changes nothing for a variant that does not use it."""
    need = {r: True for v in variants for r in v.requires}
    return replace(p, features=replace(p.features, **need)) if need else p


def run_both(p: PerfTestParams, variant: str) -> None:
    ref_eng, fast_eng = Watched("reference"), Watched("fast")
    v = get_variant(variant)
    p = with_required_features(p, [v])
    ref = run_perf_test(p, v, ref_eng, keep_tables=True, on_phase=ref_eng.on_phase)
    fast = run_perf_test(p, v, fast_eng, keep_tables=True, on_phase=fast_eng.on_phase)
    assert ref.engine == "reference" and fast.engine == "fast"
    # The reference is the oracle, but a broken invariant there is a bug too.
    assert not ref_eng.problems(), \
        f"{describe(p, variant)}: reference invariants: {ref_eng.problems()[:5]}"
    compare_runs(ref, fast, ref_eng.states, fast_eng.states)


# -- configurations --------------------------------------------------------------

def backings_for(granule: int) -> list[str]:
    """Every backing valid with this granule, simplest first (hypothesis shrinks
    toward the front), hugetlb sizes from the backing module's own table."""
    out = ["anonymous", "anonymous_thp", "anonymous_hugetlb"]
    sized = []
    for suffix in ANONYMOUS_HUGETLB_SIZES:
        try:
            b = parse_backing(f"anonymous_hugetlb_{suffix}", granule)
        except S2Error:
            continue
        sized.append((b.page_size, b.name))
    return out + [name for _, name in sorted(sized)]


def selftest_modes(granule: int) -> list:
    """The arm64 guest modes with this page size, the default 40-bit one first."""
    return sorted((m for m in MODES if m.arm64 and m.page_size == granule),
                  key=lambda m: (m.pa_bits != 40, m.pa_bits, m.id))


def _pages_multiple(vcpus: int, slots: int, slot_quantum: int) -> int:
    """Smallest step of per-vCPU pages keeping memstress's layout valid:
    ``vcpus * pages`` divides into ``slots`` slots of whole backing pages."""
    need = slots * slot_quantum
    return need // math.gcd(vcpus, need)


@st.composite
def configs(draw, max_pages: int = 8192, max_bytes: int = 256 * MIB, min_pages: int = 1):
    """A valid ``PerfTestParams``: choices are derived from the model's own
    tables (modes, backings, block sizes, layout rules) so that almost nothing
    is rejected, and every draw shrinks toward upstream's defaults and small
    sizes. ``max_pages`` bounds the total guest pages (the reference engine's
    cost), ``max_bytes`` the guest memory."""
    granule = draw(st.sampled_from(sorted(GRANULES)))
    if draw(st.booleans()):  # a --granule/--ipa-bits mode, outside the selftest list
        lpa2 = draw(st.booleans())
        mode = mode_for(granule, draw(st.integers(32, 52 if lpa2 else 48)))
    else:
        mode = draw(st.sampled_from(selftest_modes(granule)))
        lpa2 = mode.pa_bits > 48 or draw(st.booleans())
    geom = Geometry(granule, mode.pa_bits, lpa2=lpa2 and granule != 65536,
                    lpa=lpa2 and granule == 65536)
    backing = draw(st.sampled_from(backings_for(granule)))
    backing_pages = parse_backing(backing, granule).page_size // granule
    block_pages = geom.pmd_size // granule
    cap = min(max_pages, max_bytes // granule)

    vcpus = draw(st.integers(1, 8))
    # With several slots every slot must start on a backing page, so slots of
    # hugetlb/THP memory are whole backing pages; only the slot counts that fit
    # the budget are offered (e.g. one 1G-hugetlb slot on 4K, never two).
    fits = [s for s in range(1, 5)
            if vcpus * _pages_multiple(vcpus, s, backing_pages if s > 1 else 1) <= cap]
    slots = draw(st.sampled_from(fits))
    step = _pages_multiple(vcpus, slots, backing_pages if slots > 1 else 1)
    # Block-aligned per-vCPU sizes are the common real-world case and the
    # unaligned ones the edge case: offer both (aligned only when it fits).
    aligned = step * block_pages // math.gcd(step, block_pages)
    if vcpus * aligned <= cap and draw(st.booleans()):
        step = aligned
    lo = max(1, -(-min_pages // (vcpus * step)))
    hi = cap // (vcpus * step)
    vcpu_pages = step * draw(st.integers(min(lo, hi), hi))

    chunk = draw(st.sampled_from([0, *sorted(geom.supported_block_sizes)]))
    # A chunked teardown (6.17+) walks the whole IPA space one MIN_BLOCK_LEVEL
    # granule at a time, a few us per walk in the reference engine: 2^27 walks
    # (minutes) for a 52-bit IPA on 16K. Such kernels are offered only where
    # the teardown stays cheap; the edge cases below cover the wide ones.
    teardown_walks = geom.ipa_size // geom.granule_size(geom.min_block_level)
    kernels = [k for k in KERNEL_VERSIONS
               if not KERNELS[k].chunked_destroy or teardown_walks <= MAX_TEARDOWN_WALKS]
    seed_synced = draw(st.booleans())
    p = PerfTestParams(
        vcpu_memory_bytes=vcpu_pages * granule, vcpus=vcpus, backing=backing,
        manual_protect=not draw(st.booleans()), iterations=draw(st.integers(2, 4)),
        mode=mode, slots=slots, write_percent=draw(st.sampled_from([100, 0, 50, 1, 99])
                                                   | st.integers(0, 100)),
        random_access=draw(st.booleans()), partition=not draw(st.booleans()),
        seed=draw(st.integers(1, INT_MAX)) if seed_synced else 1, chunk_size=chunk,
        seed_synced=seed_synced,
        features=Features(vhe=not draw(st.booleans()), fwb=not draw(st.booleans()),
                          tlbirange=not draw(st.booleans()), dic=not draw(st.booleans()),
                          ampere_ac04_cpu_23=draw(st.booleans())),
        host_va_bits=draw(st.sampled_from([48, 39, 42, 47, 52])), lpa2=lpa2,
        kernel=draw(st.sampled_from(kernels)),
        # the selftest's teardown: deleting the memslots or unmapping them (7.3)
        selftest=draw(st.sampled_from([None, *KERNEL_VERSIONS])))
    memstress_layout(p)  # derived to be valid: an S2Error here is a bug in this strategy
    # A host kernel whose page size (the stage-2 granule) differs from the
    # guest mode's, wherever the configuration stays valid and within budget.
    hosts = [h for h in sorted(GRANULES) if h != granule and _fits_host(p, h, max_pages)]
    if hosts and draw(st.booleans()):
        p = replace(p, host_page_size=draw(st.sampled_from(hosts)))
    return p


def _fits_host(p: PerfTestParams, host: int, max_pages: int) -> bool:
    try:
        q = replace(p, host_page_size=host)
        geom = q.geometry()
        q.backing_type()
        memstress_layout(q)
    except S2Error:
        return False
    if q.chunk_size and q.chunk_size not in geom.supported_block_sizes:
        return False
    if KERNELS[q.kernel].chunked_destroy and \
            geom.ipa_size // geom.granule_size(geom.min_block_level) > MAX_TEARDOWN_WALKS:
        return False
    return q.vcpus * q.vcpu_memory_bytes // host <= max_pages


# -- the tests -------------------------------------------------------------------

@settings(HYP, max_examples=40)
@given(p=configs(), variant=st.sampled_from(VARIANTS))
def test_engines_agree(p, variant):
    run_both(p, variant)


# A few larger configurations (up to a few hundred MiB): long walks over many
# tables, several 1G/512M blocks, split caches refilled many times. Few
# examples, since each costs the reference engine seconds.
@settings(HYP, max_examples=5)
@given(p=configs(max_pages=40960, max_bytes=512 * MIB, min_pages=8192),
       variant=st.sampled_from(VARIANTS))
def test_engines_agree_large(p, variant):
    run_both(p, variant)


@settings(HYP, max_examples=15)
@given(p=configs(max_pages=4096), order=st.permutations(VARIANTS))
def test_shared_variant_runs_match_independent_reference_runs(p, order):
    """``run_variants`` on the fast engine runs each phase once and re-runs from a
    snapshot only the phases a variant changes; every variant's result must
    still be what an independent reference run of that variant gives, in any
    order (the first variant, whose run is shared, may be one with flags)."""
    variants = [get_variant(n) for n in order]
    p = with_required_features(p, variants)
    fast_eng = Watched("fast")
    fast = run_variants(p, variants, fast_eng, keep_tables=True, on_phase=fast_eng.on_phase)
    assert [r.variant for r in fast] == list(order)
    # One VM per set of MMU-layer hooks: a hook may leave other state than
    # vanilla's, so only variants with the same hooks share phases.
    groups = {tuple(sorted((k, id(fn)) for k, fn in v.mmu.items())) for v in variants}
    assert len(fast_eng.vms) == len(groups), \
        "the fast engine should share one VM between variants with the same MMU hooks"
    assert not fast_eng.problems(), f"{describe(p, order[0])}: {fast_eng.problems()[:5]}"
    for v, f in zip(variants, fast):
        ref = run_perf_test(p, v, "reference", keep_tables=True)
        compare_runs(ref, f, what=describe(p, v.name) + " (fast engine: run_variants)")


def _p(mode, size, backing="anonymous", **kw) -> PerfTestParams:
    # The edge cases were written for 6.12's one-walk teardown (a 52-bit IPA
    # is 2^22..2^27 chunked teardown walks: minutes in the reference engine);
    # the 6.19 cases below name their kernel.
    kw.setdefault("kernel", "6.12")
    lpa2 = kw.pop("lpa2", parse_mode(mode).pa_bits > 48)
    return PerfTestParams(vcpu_memory_bytes=size, backing=backing, mode=parse_mode(mode),
                          lpa2=lpa2, **kw)


# Known edge cases. Variants change only the split walks, so a case about
# faults or teardown alone runs under one or two variants. The 1G split cases
# are the slowest in the file (1 GiB of 4K pages through the reference, ~10 s
# each), so the manual-protect one runs only the three variants whose split
# walks differ most.
EDGE_CASES = [
    # A 1G block split with a 1G chunk: the whole PUD subtree from one cache
    # fill. -g splits it all when logging starts; manual-protect splits it on
    # the first KVM_CLEAR_DIRTY_LOG. 1 GiB is the least memory that maps a PUD.
    ("4K-hugetlb-1G-chunk-1G-manual", ("vanilla", "skip-children", "return-hints"),
     _p("P40V48_4K", GIB, "anonymous_hugetlb_1gb", chunk_size=GIB)),
    ("4K-hugetlb-1G-chunk-1G-g", VARIANTS,
     _p("P40V48_4K", GIB, "anonymous_hugetlb_1gb", chunk_size=GIB, manual_protect=False,
        write_percent=50, random_access=True)),
    # 512M blocks at level 2 of a 64K table, split into 8192 pages each.
    ("64K-hugetlb-512M", VARIANTS,
     _p("P40V48_64K", 512 * MIB, "anonymous_hugetlb_512mb", chunk_size=512 * MIB)),
    ("64K-hugetlb-512M-g-2slots", VARIANTS,
     _p("P48V48_64K", GIB, "anonymous_hugetlb_512mb", slots=2, chunk_size=512 * MIB,
        manual_protect=False)),
    # 52-bit IPAs: LPA2 descriptors on 4K/16K (a level -1 start on 4K), LPA on 64K.
    ("4K-52bit-lpa2-thp", VARIANTS,
     _p("P52V48_4K", 16 * MIB, "anonymous_thp", chunk_size=2 * MIB)),
    ("16K-52bit-lpa2-hugetlb", VARIANTS,
     _p("P52V48_16K", 64 * MIB, "anonymous_hugetlb", chunk_size=32 * MIB,
        manual_protect=False)),
    ("64K-52bit-lpa-hugetlb-2M", VARIANTS,
     _p("P52V48_64K", 64 * MIB, "anonymous_hugetlb_2mb", chunk_size=64 * 1024)),
    # -x 3 over sizes that are no multiple of 2M: slots begin and end inside a
    # 2M region, so neighbouring slots share level-3 tables.
    ("4K-x3-unaligned", VARIANTS,
     _p("P40V48_4K", 3 * (2 * MIB + 5 * 4096), slots=3, chunk_size=2 * MIB)),
    ("4K-x3-thp-v2-overlap", VARIANTS,
     _p("P40V48_4K", 6 * MIB, "anonymous_thp", slots=3, vcpus=2, partition=False,
        chunk_size=2 * MIB)),
    ("16K-x3-unaligned-v3", VARIANTS,
     _p("P36V48_16K", 3 * (32 * MIB + 16384), slots=3, vcpus=3, chunk_size=32 * MIB,
        random_access=True, write_percent=30)),
    # Blocks, then a table of pages (the slot's tail, too short for a block),
    # in one split walk: only a 1G chunk on 4K covers both. What a variant
    # decided for a block it split must not carry over to the table.
    ("4K-thp-tail-chunk-1G-g", VARIANTS,
     _p("P40V48_4K", 4 * MIB + 12 * 1024, "anonymous_thp", chunk_size=GIB,
        manual_protect=False)),
    ("4K-hugetlb-tail-chunk-1G-g-v3", VARIANTS,
     _p("P40V48_4K", 3 * (2 * MIB + 64 * 1024), "anonymous_hugetlb", vcpus=3, chunk_size=GIB,
        manual_protect=False, write_percent=40, random_access=True)),
    # A chunk of one page: every split call covers a single page.
    ("4K-chunk-page-thp", VARIANTS, _p("P40V48_4K", 8 * MIB, "anonymous_thp", chunk_size=4096)),
    ("16K-chunk-page-hugetlb-g", VARIANTS,
     _p("P40V48_16K", 64 * MIB, "anonymous_hugetlb", chunk_size=16384, manual_protect=False)),
    ("64K-chunk-page-thp", VARIANTS,
     _p("P36V48_64K", GIB, "anonymous_thp", chunk_size=65536)),
    # A vCPU's memory cache (40 pages) runs dry mid-pass and is topped up
    # again: more than 39 level-3 tables from one vCPU (one per 2M on 4K),
    # among faults the fast engine replays instead of running.
    ("4K-vcpu-cache-refill", ("vanilla",),
     _p("P40V48_4K", 96 * MIB, write_percent=50, random_access=True, seed_synced=True)),
    ("4K-vcpu-cache-refill-logging-hugetlb", ("vanilla",),
     _p("P40V48_4K", 96 * MIB, "anonymous_hugetlb")),
    # 6.19's teardown: one destroy walk per MIN_BLOCK_LEVEL granule (1G on 4K,
    # 32M on 16K, 512M on 64K), tables cleared once empty; teardown walks do
    # not depend on the variant.
    ("4K-thp-tail-48bit-kernel-6.19", ("vanilla", "return-hints"),
     _p("P48V48_4K", 6 * MIB + 12 * 1024, "anonymous_thp", vcpus=2, chunk_size=GIB,
        kernel="6.19")),
    # Level-2 tables spanning several teardown chunks (a 3-level 16K table from
    # 43 bits, 64K from 47), which 6.19 walks once per chunk: 2^19 chunks each,
    # the most this file affords the reference engine.
    ("16K-44bit-hugetlb-x2-kernel-6.19", ("vanilla", "skip-levels"),
     PerfTestParams(vcpu_memory_bytes=64 * MIB, backing="anonymous_hugetlb", slots=2,
                    mode=mode_for(16384, 44), chunk_size=32 * MIB, kernel="6.19")),
    ("64K-hugetlb-512M-48bit-kernel-6.19", ("vanilla", "skip-children"),
     _p("P48V48_64K", GIB + 64 * MIB, "anonymous_hugetlb_512mb", chunk_size=512 * MIB,
        kernel="6.19")),
    # Everything off that a feature switch can turn off (nVHE, no FWB, no range
    # TLBIs, no DIC).
    ("4K-no-features", VARIANTS,
     _p("P40V48_4K", 8 * MIB, "anonymous_hugetlb", chunk_size=2 * MIB,
        features=Features(vhe=False, fwb=False, tlbirange=False, dic=False))),
]


@pytest.mark.parametrize("case,variant", [
    pytest.param(name, v, id=f"{name}-{v}") for name, variants, _ in EDGE_CASES for v in variants])
def test_engines_agree_edge_cases(case, variant):
    run_both(next(p for name, _, p in EDGE_CASES if name == case), variant)
