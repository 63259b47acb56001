"""Where entry reads hit (``hit_l1`` .. ``hit_dram``, s2split.arm64.hierarchy).

The engines classify each entry read with a line clock
(:func:`s2split.arm64.rules.hit_class`): the ticks since a line's last touch, one
per touch of a line other than the one touched last. That counts the touches
of other lines in between, which is the LRU reuse distance when no line
repeats in between and an upper bound on it otherwise. Here it is checked
against an exact LRU simulation (:func:`exact_lru_classes`, independent of
the engines: a recency list per cache) over the lines the reference engine
touched:

* equal on every read when the caches hold 1 line, 2 lines or everything --
  the capacities at which the bound cannot cross a boundary (a distance of
  0 is the line just read; of 1, one other line, however often touched);
* never optimistic, and within a measured bound, at other capacities;

and the two engines give the same hit counters, at capacities small enough
for every class to occur.
"""

from __future__ import annotations

import pytest

from s2split.counting.counters import HIT_KINDS, OPS
from s2split.engine import get_engine
from s2split.model.pgtable.variants import get as get_variant
from s2split.workload import PerfTestParams, run_perf_test

MIB = 1 << 20
READS = ("read_table", "read_leaf", "read_invalid")
EVERYTHING = 1 << 40


def exact_lru_classes(trace, caps) -> list[int]:
    """The class of each read under exact LRU caches of ``caps`` lines
    (L1, L2, LLC; inclusive, so a line is in a cache of n lines iff fewer
    than n other lines were touched since): 0..3 per read, None resets."""
    out = []
    recency: list[int] = []  # most recent first
    for item in trace:
        if item is None:
            recency = []
            continue
        line = item[0]
        if line in recency:
            d = recency.index(line)  # distinct other lines touched since
            recency.pop(d)
            cls = next((i for i, c in enumerate(caps) if d < c), 3)
        else:
            cls = 3
        recency.insert(0, line)
        out.append(cls)
    return out


class SmallCaches:
    """An engine whose VMs classify against ``caps`` and, on the reference
    engine, keep the lines they touch."""

    def __init__(self, name: str, caps: tuple[int, int, int]):
        self.inner = get_engine(name)
        self.snapshots = getattr(self.inner, "snapshots", False)
        self.caps = caps
        self.vms: list = []

    def create_vm(self, *args, **kwargs):
        vm = self.inner.create_vm(*args, **kwargs)
        vm.set_cache_lines(*self.caps)
        if hasattr(vm, "pgt"):
            vm.pgt.mem.trace = []
        self.vms.append(vm)
        return vm


def params(size: int, backing: str, granule: int = 4096, **kw) -> PerfTestParams:
    from s2split.selftest.modes import mode_for
    return PerfTestParams(vcpu_memory_bytes=size, backing=backing,
                          mode=mode_for(granule, 40), **kw)


#: Small runs that cover every walk: THP blocks split by CLEAR (create_unlinked,
#: the split of a word's range after its write-protect), anonymous pages
#: (enable's two level-3 streams, guest faults replayed by the fast engine),
#: a whole-slot eager split without manual protect, 64K pages, random access.
CONFIGS = [
    params(8 * MIB, "anonymous_thp", iterations=2, chunk_size=2 * MIB),
    params(4 * MIB, "anonymous", iterations=2, chunk_size=2 * MIB),
    params(8 * MIB, "anonymous_thp", manual_protect=False, iterations=2, chunk_size=2 * MIB),
    params(64 * MIB, "anonymous", granule=65536, iterations=2),
    params(4 * MIB, "anonymous", iterations=2, random_access=True, write_percent=50,
           chunk_size=2 * MIB),
]


def _trace(p: PerfTestParams, caps, variant: str = "vanilla") -> list:
    eng = SmallCaches("reference", caps)
    run_perf_test(p, get_variant(variant), eng)
    return eng.vms[-1].pgt.mem.trace


@pytest.mark.parametrize("p", CONFIGS[:3], ids=["thp-clear", "anon", "thp-eager"])
@pytest.mark.parametrize("caps, classes", [((1, 2, EVERYTHING), {0, 1, 2, 3}),
                                            ((2, 2, 2), {0, 3}),
                                            ((1, 1, EVERYTHING), {0, 2, 3})])
def test_classification_equals_exact_lru_where_the_bound_is_exact(p, caps, classes):
    trace = _trace(p, caps)
    rule = [item[1] for item in trace if item is not None]
    exact = exact_lru_classes(trace, caps)
    assert len(rule) > 1000
    assert rule == exact
    # Every class the capacities allow occurs, so the equality is not vacuous.
    assert set(exact) == classes


def exact_lru_distances(trace) -> list[int]:
    """Per read, the distinct other lines touched since its line's last
    touch (-1: never touched since the caches were emptied)."""
    out = []
    recency: list[int] = []
    for item in trace:
        if item is None:
            recency = []
            continue
        line = item[0]
        d = recency.index(line) if line in recency else -1
        if d >= 0:
            recency.pop(d)
        recency.insert(0, line)
        out.append(d)
    return out


BOUNDED = [*CONFIGS, params(16 * MIB, "anonymous", manual_protect=False, chunk_size=2 * MIB),
           params(32 * MIB, "anonymous_thp", manual_protect=False, chunk_size=2 * MIB)]


@pytest.mark.parametrize("p", BOUNDED, ids=lambda p: f"{p.vcpu_memory_bytes >> 20}M-{p.backing}-"
                         f"{'clear' if p.manual_protect else 'enable'}-{p.mode.page_size >> 10}K")
def test_clock_distance_is_exact_lru_distance_within_a_bound(p):
    """The clock's distance d' is never below the LRU distance d, and at
    most 2d + 16. What repeats between two touches of a line: upper-level
    table lines (about one per level-3 table crossed and a few per walk),
    and, where a block is split, the new table's lines -- read once by
    create_unlinked filling it and again by the walks of its words, which
    doubles d' for the lines read next (measured worst over these runs:
    d = 579, d' = 1171). A read is put one cache further out than exact LRU
    would only when a capacity lies in (d, d'], never nearer; at these
    capacities that is at most 1 read in 90,000."""
    for caps in ((4, 16, 64), (64, 256, 1024)):
        trace = _trace(p, caps)
        reads = [item for item in trace if item is not None]
        exact = exact_lru_distances(trace)
        assert [d < 0 for d in exact] == [r[2] < 0 for r in reads]  # first touches agree
        pairs = [(d, r[2]) for d, r in zip(exact, reads) if d >= 0]
        assert pairs
        assert all(d <= dc <= 2 * d + 16 for d, dc in pairs), max((dc - d, d) for d, dc in pairs)
        lru = exact_lru_classes(trace, caps)
        assert all(r[1] >= e for r, e in zip(reads, lru))
        wrong = 0
        for r, e, d in zip(reads, lru, exact):
            if r[1] != e:
                wrong += 1
                assert any(d < c <= r[2] for c in caps)
        assert wrong <= len(reads) // 1000


def _partition_problems(c) -> list[str]:
    out = []
    for op in OPS:
        for lv in range(-1, 4):
            reads = sum(c.get(op, k, lv) for k in READS)
            hits = sum(c.get(op, k, lv) for k in HIT_KINDS)
            if op == "get_leaf":
                if hits:
                    out.append(f"get_leaf@{lv}: {hits} hits counted")
            elif hits != reads:
                out.append(f"{op}@{lv}: {reads} reads, {hits} hits")
    return out


@pytest.mark.parametrize("i", range(len(CONFIGS)))
@pytest.mark.parametrize("variant", ["vanilla", "skip-levels"])
def test_engines_count_the_same_hits_at_small_capacities(i, variant):
    """Capacities of a few lines make every class occur in small runs; the
    fast engine's runs, batched level-3 loops and replayed faults must
    classify like the reference's entry-by-entry walk, phase by phase."""
    p = CONFIGS[i]
    caps = (3, 12, 100)
    runs = {}
    for name in ("reference", "fast"):
        eng = SmallCaches(name, caps)
        runs[name] = run_perf_test(p, get_variant(variant), eng)
    ref, fast = runs["reference"], runs["fast"]
    seen = set()
    for (name, rc), (_, fc) in zip(ref.phases, fast.phases, strict=True):
        assert not _partition_problems(rc), (name, _partition_problems(rc))
        for kind in HIT_KINDS:
            for op in OPS:
                for lv in range(-1, 4):
                    assert rc.get(op, kind, lv) == fc.get(op, kind, lv), (name, op, kind, lv)
                    if rc.get(op, kind, lv):
                        seen.add(kind)
    # The counts compared are not all of one class (64K granule: too few
    # lines for the LLC class; the others see all four).
    assert seen == set(HIT_KINDS) or (i == 3 and len(seen) == 3)


def _split_level3(c) -> dict[str, int]:
    return {k: c.get("split", k, 3) for k in HIT_KINDS}


def test_clear_rereads_hit_l1_and_enable_streams():
    """The issue's two cases, at 64 MiB of 4K pages with the caches scaled
    down with it (L1 16 lines, L2 64, LLC 256; the level-3 tables are 64 MiB
    / 4 KiB * 8 B = 128 KiB = 2048 lines):

    * CLEAR: each dirty-bitmap word write-protects 64 pages -- 8 lines of a
      level-3 table -- and the split walk reads the same 8 lines next, with
      at most the word's few upper-level lines in between: all L1.
    * enable (no manual protect): write-protect streams all 2048 lines, then
      split streams them again: each line comes back after ~2048 others,
      beyond the LLC: DRAM for the first read of each line, L1 for the 7
      others in it."""
    caps = (16, 64, 256)
    clear_run = run_perf_test(params(64 * MIB, "anonymous", iterations=2, chunk_size=2 * MIB),
                              get_variant("vanilla"), SmallCaches("fast", caps))
    clear = [_split_level3(c) for n, c in clear_run.phases if "clear_dirty_log" in n]
    assert len(clear) == 2
    assert all(c["hit_l1"] == 64 * MIB // 4096 and c["hit_l2"] == c["hit_llc"] == c["hit_dram"]
               == 0 for c in clear)
    enable_run = run_perf_test(params(64 * MIB, "anonymous", iterations=2, manual_protect=False,
                                      chunk_size=2 * MIB),
                               get_variant("vanilla"), SmallCaches("fast", caps))
    phase = enable_run.phase("enable_dirty_logging")
    enable = _split_level3(phase)
    reads = 64 * MIB // 4096
    assert phase.get("split", "read_leaf", 3) == reads
    # Every line the write-protect walk brought in (a first touch: DRAM)
    # comes back from DRAM to the split walk: at least reads / 8 of them.
    assert enable["hit_dram"] == phase.get("wrprotect", "hit_dram", 3) >= reads // 8
    assert enable["hit_l1"] == reads - enable["hit_dram"]
    assert enable["hit_l2"] == enable["hit_llc"] == 0


# -- pricing ------------------------------------------------------------------------------

def _profile(tmp_path, **extra) -> str:
    import json
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "s2split-profile/1", "name": "p",
                             "inherits": "server-vhe", **extra}))
    return str(p)


def test_a_read_is_priced_once_for_its_instructions_and_once_for_where_it_hits():
    import numpy as np

    from s2split.estimate.cost import load_profile
    from s2split.counting.counters import KIND, OP, slot
    from s2split.counting.counts import Counts
    prof = load_profile("server-vhe")
    arr = np.zeros_like(prof.array, dtype=np.int64)
    arr[OP["split"], KIND["read_leaf"], slot(3)] = 8  # one line: 1 DRAM read, 7 in L1
    arr[OP["split"], KIND["hit_dram"], slot(3)] = 1
    arr[OP["split"], KIND["hit_l1"], slot(3)] = 7
    lat = prof.memory_hierarchy.latency_ns
    assert prof.estimate_ns(Counts(arr)) == pytest.approx(
        8 * prof.unit_costs_ns["read_leaf@3"] + lat[3] + 7 * lat[0])
    # an L1 hit costs what an entry read cost before reads were classified
    assert prof.unit_costs_ns["read_leaf@3"] + lat[0] == pytest.approx(2.5)
    # host lookups are not classified: their reads keep the whole cost
    assert prof.unit_cost("get_leaf", "read_leaf", 3) == 2.5


def test_memory_hierarchy_latencies_price_the_classes_and_keys_override(tmp_path):
    from s2split.estimate.cost import load_profile
    p = load_profile(_profile(tmp_path, memory_hierarchy={"dram": {"latency_ns": 80}},
                              unit_costs_ns={"hit_llc": 7}))
    assert p.unit_cost("split", "hit_dram", 3) == 80
    assert p.unit_cost("split", "hit_llc", 3) == 7
    assert p.unit_cost("split", "hit_l1", 3) == load_profile("server-vhe").unit_costs_ns["hit_l1"]


@pytest.mark.parametrize("section, message", [
    ({"l2": {"size_bytes": 2 << 20}}, "memory_hierarchy.l2.size_bytes 2097152 differs"),
    ({"line_bytes": 128}, "line_bytes must be 64"),
])
def test_a_hierarchy_the_counts_cannot_follow_is_one_line_and_status_2(tmp_path, capsys,
                                                                        section, message):
    from _cli import run_cli
    code, out, err = run_cli(["explain", "--size", "64M", "--granule", "4K", "--backing",
                              "regular", "--scenario", "clear", "--profile",
                              _profile(tmp_path, memory_hierarchy=section),
                              "--db", str(tmp_path / "r.sqlite")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
