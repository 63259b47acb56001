"""Differential tests of the fast engine's guest passes: its translation cache
and its table runs against the reference engine's page-by-page accesses.

The fast engine skips work a page-by-page replay would repeat: a vCPU keeps
the table its last lookup ended in and what the last level-3 fault learnt
of that table's memslot (until a fault takes the real path), and a lone vCPU
walking its region in order goes through a level-3 table in one loop,
skipping the generator's draws at 0 or 100 percent writes. Every count,
table, bitmap and generator state must still be what the reference engine
gives page by page: the configurations here aim at where such a shortcut
could go wrong -- runs that start or stop inside a table, memslot edges
inside a table, mixed reads and writes (classes changing mid-run), guest
pages larger or smaller than the stage-2 granule, a vCPU cache running dry
mid-run, more fault classes than the replay table holds, several vCPUs in
lockstep (shared or partitioned memory, in order or at random), and both
ways of re-protecting (-g, and manual-protect clears).

The configurations and the comparison are test_differential's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _hyp import HYP
from test_differential import GIB, MIB, VARIANTS, _p, configs, run_both

from s2split.engine.guest import guest_random_skip as compiled_skip
from s2split.selftest.memstress import INT_MAX, guest_random_skip, guest_random_u32
from s2split.selftest.modes import mode_for


def one_vcpu_in_order(p):
    """The same guest memory walked by one vCPU in order: the table-run path
    (memstress's layout stays valid: same total pages, same slots)."""
    return replace(p, vcpus=1, vcpu_memory_bytes=p.vcpus * p.vcpu_memory_bytes,
                   random_access=False, partition=True)


@settings(HYP, max_examples=30)
@given(p=configs().map(one_vcpu_in_order), variant=st.sampled_from(VARIANTS))
def test_table_runs_agree(p, variant):
    # Every variant: a guest pass must also agree over tables a variant split.
    run_both(p, variant)


@settings(HYP, max_examples=15)
@given(p=configs(min_pages=2).filter(lambda p: p.vcpus > 1),
       variant=st.sampled_from(VARIANTS))
def test_translation_cache_agrees_with_several_vcpus(p, variant):
    run_both(p, variant)


@settings(HYP, max_examples=200)
@given(state=st.integers(0, (1 << 32) - 1), n=st.integers(0, 3000))
def test_generator_skip_is_n_draws(state, n):
    x = state
    for _ in range(n):
        x = guest_random_u32(x)
    assert guest_random_skip(state, n) == x
    assert compiled_skip(state, n) == x


def test_generator_skip_over_long_runs():
    # A 1 TiB pass draws 2^28 numbers; the skip must stay exact there too.
    x = 12345
    for _ in range(1 << 16):
        x = guest_random_u32(x)
    assert guest_random_skip(12345, 1 << 16) == x
    assert guest_random_skip(guest_random_skip(INT_MAX, 1 << 28), 5) == \
        guest_random_skip(INT_MAX, (1 << 28) + 5)


KIB = 1024
# Hand-picked: each names what it aims at.
CASES = [
    # Slots start and end inside 2M regions: runs cut at memslot edges inside
    # a table, and a table whose pages belong to two memslots.
    ("4K-x3-unaligned-w50", _p("P40V48_4K", 3 * (2 * MIB + 20 * KIB), slots=3, write_percent=50,
                                 chunk_size=2 * MIB)),
    ("4K-x3-unaligned-manual-w30", _p("P40V48_4K", 3 * (2 * MIB + 20 * KIB), slots=3,
                                      write_percent=30, chunk_size=2 * MIB, iterations=3)),
    # No writes at all, every write: the generator skipped over whole tables.
    ("4K-w0-g", _p("P40V48_4K", 6 * MIB + 12 * KIB, write_percent=0, manual_protect=False)),
    ("4K-w0-manual", _p("P40V48_4K", 6 * MIB + 12 * KIB, write_percent=0, seed=77,
                        seed_synced=True)),
    ("4K-w100-g-seeded", _p("P40V48_4K", 6 * MIB + 12 * KIB, manual_protect=False, seed=99,
                            seed_synced=True)),
    # One write in a hundred, and all but one: runs broken by rare classes.
    ("4K-w1", _p("P40V48_4K", 8 * MIB, write_percent=1, seed_synced=True, seed=3)),
    ("4K-w99-g", _p("P40V48_4K", 8 * MIB, write_percent=99, manual_protect=False,
                    chunk_size=2 * MIB)),
    # A region smaller than one table, and one page.
    ("4K-40-pages", _p("P40V48_4K", 40 * 4 * KIB, write_percent=60, seed_synced=True, seed=8)),
    ("4K-one-page", _p("P40V48_4K", 4 * KIB, manual_protect=False)),
    # Blocks: translation-cache hits on level-2 leaves, logging splits into
    # tables mid-pass (-g without eager splitting), hugetlb that falls back
    # to (contiguous) pages because the slot is smaller than a block.
    ("4K-thp-g-nochunk-w70", _p("P40V48_4K", 8 * MIB + 8 * KIB, "anonymous_thp",
                                manual_protect=False, write_percent=70)),
    ("4K-hugetlb-chunk-2M", _p("P40V48_4K", 8 * MIB, "anonymous_hugetlb", chunk_size=2 * MIB)),
    ("16K-hugetlb-2M-cont-pte", _p("P40V48_16K", 16 * MIB, "anonymous_hugetlb_2mb",
                                   write_percent=50)),
    ("4K-hugetlb-64K-cont-pte-x2", _p("P40V48_4K", 4 * MIB + 128 * KIB, "anonymous_hugetlb_64kb",
                                      slots=2, write_percent=50, chunk_size=2 * MIB)),
    ("64K-hugetlb-2M-cont-pte-g", _p("P40V48_64K", 64 * MIB, "anonymous_hugetlb_2mb",
                                     manual_protect=False, write_percent=80)),
    ("16K-thp-x2", _p("P36V48_16K", 2 * 32 * MIB, "anonymous_thp", slots=2, write_percent=50,
                      chunk_size=32 * MIB)),
    # Guest pages larger, then smaller, than the stage-2 granule.
    ("64K-guest-on-4K-host", replace(_p("P40V48_64K", 4 * MIB, write_percent=50),
                                     host_page_size=4 * KIB)),
    ("4K-guest-on-16K-host", replace(_p("P40V48_4K", 4 * MIB, write_percent=50,
                                        manual_protect=False), host_page_size=16 * KIB)),
    # The vCPU's cache runs dry mid-table (more than 39 new tables in a pass).
    ("4K-vcpu-cache-refill-in-order", _p("P40V48_4K", 96 * MIB, write_percent=50,
                                         seed_synced=True, seed=5)),
    # Four slots under logging: more fault classes than the replay table holds.
    ("4K-x4-classes-overflow", _p("P40V48_4K", 4 * (2 * MIB + 8 * KIB), slots=4, write_percent=50,
                                  chunk_size=4 * KIB)),
    # Several vCPUs: partitioned regions sharing a table at their edges,
    # shared memory (the same page at the same step), random pages.
    ("4K-v3-partition-unaligned", _p("P40V48_4K", 2 * MIB + 12 * KIB, vcpus=3, write_percent=50,
                                     seed_synced=True, seed=11)),
    ("4K-v2-overlap-w40-g", _p("P40V48_4K", 4 * MIB, vcpus=2, partition=False, write_percent=40,
                               manual_protect=False)),
    ("4K-v4-random-x2", _p("P40V48_4K", 2 * MIB, vcpus=4, slots=2, random_access=True,
                           write_percent=70)),
    ("4K-random-one-vcpu", _p("P40V48_4K", 4 * MIB, random_access=True, write_percent=50)),
    # 52-bit IPA, a level -1 start.
    ("4K-52bit-lpa2-w50", _p("P52V48_4K", 4 * MIB + 4 * KIB, write_percent=50)),
    ("16K-47bit-x2-w50", replace(
        _p("P40V48_16K", 64 * MIB, slots=2, write_percent=50), mode=mode_for(16384, 47))),
]


@pytest.mark.parametrize("case", [pytest.param(name, id=name) for name, _ in CASES])
def test_guest_pass_edge_cases(case):
    run_both(dict(CASES)[case], "vanilla")


def test_cases_are_valid_and_small():
    for name, p in CASES:
        assert p.vcpus * p.vcpu_memory_bytes <= GIB // 8, name


def test_large_table_memory_is_zeroed_writable_and_private():
    from s2split.engine.vm import HUGE_TABLE_BYTES, zeroed_tables
    for pages in (3, HUGE_TABLE_BYTES // 4096 + 5):
        a, b = zeroed_tables(pages, 512), zeroed_tables(pages, 512)
        assert a.shape == (pages, 512) and a.dtype.name == "int64" and a.flags.c_contiguous
        assert not a.any()
        a[-1, -1] = -1
        a[0, 0] = 7
        assert not b.any() and a[-1, -1] == -1 and a.sum() == 6
