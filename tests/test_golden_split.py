"""Golden counts of splitting, derived in closed form in the comments.

Shapes: a level-1 block on 4K (1G), a level-2 block on 16K (32M) and 64K
(512M), an already-split region, a partial range, and caches too small for a
full subtree.
"""

import pytest

from s2split.arm64.arch import Geometry
from s2split.plumbing.errors import ENOMEM
from s2split.model.pgtable.memory import MemoryCache
from s2split.model.pgtable.stage2 import Stage2PageTable
from s2split.model.pgtable.variants import get
from s2split.arm64.pte import Prot

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PA = 1 << 44  # guest memory PA base, aligned to every block size


def mapped(geom, ipa, size, variant="vanilla", page_only=False):
    """A table with [ipa, ipa+size) mapped (as blocks where possible), counters reset."""
    pgt = Stage2PageTable(geom, variant=get(variant))
    mc = MemoryCache(pgt.mem)
    if page_only:
        for a in range(ipa, ipa + size, geom.granule):
            mc.topup(40, geom.levels)
            assert pgt.map(a, geom.granule, PA + a, Prot.RW, mc) == 0
    else:
        mc.topup(40, geom.levels)
        assert pgt.map(ipa, size, PA + ipa, Prot.RW, mc) == 0
    pgt.tally.reset()
    return pgt


def split(pgt, ipa, size, cache_pages):
    cache = MemoryCache(pgt.mem)
    if cache_pages:
        cache.topup(cache_pages, cache_pages)
    ret = pgt.split(ipa, size, cache)
    return ret, pgt.tally.take(), cache


def reads(c, op="split"):
    """Entries read by the walk of ``op``, per level."""
    out = {}
    for kind in ("read_table", "read_leaf", "read_invalid"):
        for lv, n in c.by_level(op, kind).items():
            out[lv] = out.get(lv, 0) + n
    return out


G4 = Geometry(4096, 40)  # start level 1, 512 entries per table


# -- one 1G block on 4K, full cache ---------------------------------------------
# The split visitor sees the level-1 block, needs 1 + 512 pages (a level-2 table
# and 512 level-3 tables), has them, builds the whole subtree (force_pte), and
# breaks the block with one by-IPA TLBI at level 1. Vanilla then descends: 512
# level-2 table entries, and under each 512 level-3 pages: 1 + 512 + 262,144
# entries read. skip-levels stops above level 3: 1 + 512. skip-children and
# return-hints do not descend into the new subtree at all: 1.
@pytest.mark.parametrize("variant,expected", [
    ("vanilla", {1: 1, 2: 512, 3: 512 * 512}),
    ("skip-levels", {1: 1, 2: 512}),
    ("skip-children", {1: 1}),
    ("skip-levels+skip-children", {1: 1}),
    ("return-hints", {1: 1}),
])
def test_split_1g_block_full_cache(variant, expected):
    pgt = mapped(G4, GIB, GIB, variant)
    assert [lv for _, lv, _ in pgt.leaves()] == [1]
    ret, c, cache = split(pgt, GIB, GIB, 513)
    assert ret == 0
    assert c.total("page_taken") == 513 and cache.nobjs == 0
    assert c.by_level(None, "tlbi_ipa") == {1: 1}
    assert c.total("tlbi_range") == c.total("tlbi_vmid") == c.total("tlbi_ipa_nsh") == 0
    assert reads(c) == expected
    # create_unlinked(level 1, force_pte) maps 512 tables and 512 * 512 pages.
    assert c.by_level("create_unlinked", "calls_force_pte") == {1: 1}
    assert c.by_level("create_unlinked", "visit_leaf") == {2: 512, 3: 512 * 512}
    # Every IPA still translates to the same PA, now through 4K pages.
    assert pgt.translate(GIB + 12345 * 4096 + 7) == (PA + GIB + 12345 * 4096 + 7, Prot.RW)
    assert {lv for _, lv, _ in pgt.leaves()} == {3}
    assert pgt.check_invariants() == []


def test_split_1g_visitor_calls_and_writes():
    # Vanilla: the split visitor runs on the level-1 block and on each of the
    # 262,144 new pages (tables are not LEAF-visited): 262,145 calls. Each new
    # entry is written twice (locked, then published) and so is the block:
    # 2 * (512 + 262,144) + 2 = 525,314 writes.
    pgt = mapped(G4, GIB, GIB)
    _, c, _ = split(pgt, GIB, GIB, 513)
    assert c.visitor_calls("split") == 1 + 512 * 512
    assert c.total("pte_write") == 2 * (512 + 512 * 512) + 2


# -- one level-2 block on 16K and 64K ---------------------------------------------
# 16K/40 starts at level 2 (16 concatenated roots): a 32M block is a root entry
# and needs one page of 2048 pages. 64K/40 also starts at level 2: a 512M block,
# one page of 8192 pages.
@pytest.mark.parametrize("granule,block,ptrs", [(16384, 32 * MIB, 2048), (65536, 512 * MIB, 8192)])
@pytest.mark.parametrize("variant,l3", [("vanilla", True), ("skip-levels", False),
                                        ("skip-children", False), ("return-hints", False)])
def test_split_level2_block(granule, block, ptrs, variant, l3):
    geom = Geometry(granule, 40)
    assert geom.start_level == 2
    ipa = 7 * block
    pgt = mapped(geom, ipa, block, variant)
    ret, c, _ = split(pgt, ipa, block, 1)
    assert ret == 0
    assert c.total("page_taken") == 1
    assert c.by_level(None, "tlbi_ipa") == {2: 1}
    assert reads(c) == ({2: 1, 3: ptrs} if l3 else {2: 1})
    assert c.by_level("create_unlinked", "visit_leaf") == {3: ptrs}
    assert pgt.check_invariants() == []


# -- an already-split region -----------------------------------------------------------
# 2M mapped as 512 pages: the split walk reads the level-1 and level-2 tables and
# 512 pages, calls the visitor 512 times, allocates nothing, invalidates nothing.
# skip-levels reads the two tables only; return-hints reads one page then skips
# its 511 siblings; skip-children changes nothing (nothing is split).
@pytest.mark.parametrize("variant,expected_reads,expected_visits", [
    ("vanilla", {1: 1, 2: 1, 3: 512}, 512),
    ("skip-levels", {1: 1, 2: 1}, 0),
    ("skip-children", {1: 1, 2: 1, 3: 512}, 512),
    ("return-hints", {1: 1, 2: 1, 3: 1}, 1),
])
def test_split_already_split(variant, expected_reads, expected_visits):
    ipa = 3 * GIB + 4 * 2 * MIB
    pgt = mapped(G4, ipa, 2 * MIB, variant, page_only=True)
    before = pgt.dump()
    ret, c, _ = split(pgt, ipa, 2 * MIB, 2)
    assert ret == 0
    assert reads(c) == expected_reads
    assert c.visitor_calls("split") == expected_visits
    assert c.total("page_taken") == 0 and c.total("tlbi_ipa") == 0
    assert pgt.dump() == before


# -- a partial range ----------------------------------------------------------------
# Splitting pages 10..29 of a 2M block splits the whole block (one page of 512
# pages, one TLBI at level 2) and vanilla then reads only the 20 new pages in the
# range: the level-3 loop starts at index 10 and stops at the end of the range.
def test_split_partial_range():
    ipa = 5 * GIB
    pgt = mapped(G4, ipa, 2 * MIB)
    ret, c, _ = split(pgt, ipa + 10 * 4 * KIB, 20 * 4 * KIB, 2)
    assert ret == 0
    assert reads(c) == {1: 1, 2: 1, 3: 20}
    assert c.visitor_calls("split") == 1 + 20
    assert c.by_level(None, "tlbi_ipa") == {2: 1}
    assert c.total("page_taken") == 1
    # The pages outside the range were split too (same translations, all pages).
    assert [lv for _, lv, _ in pgt.leaves()] == [3] * 512


# -- caches too small for a full subtree -------------------------------------------------
# 1G block, cache of 2 pages (< 513): the visitor builds one page of 512 level-2
# blocks (force_pte off) and breaks the level-1 block. Vanilla descends into it:
# the first 2M block takes the last page (force_pte, one page suffices) and its
# 512 pages are read; the second 2M block finds the cache empty: -ENOMEM ends the
# walk. So: 2 pages taken, TLBIs at level 1 and level 2, 2 level-2 entries read.
def test_split_cache_too_small_vanilla():
    pgt = mapped(G4, GIB, GIB)
    ret, c, _ = split(pgt, GIB, GIB, 2)
    assert ret == -ENOMEM
    assert c.total("page_taken") == 2
    assert c.by_level(None, "tlbi_ipa") == {1: 1, 2: 1}
    assert reads(c) == {1: 1, 2: 2, 3: 512}
    assert c.by_level("create_unlinked", "calls") == {1: 1, 2: 1}
    assert c.by_level("create_unlinked", "calls_force_pte") == {2: 1}
    levels = [lv for _, lv, _ in pgt.leaves()]
    assert levels.count(3) == 512 and levels.count(2) == 511
    assert pgt.translate(GIB + 3 * 2 * MIB + 5) == (PA + GIB + 3 * 2 * MIB + 5, Prot.RW)
    assert pgt.check_invariants() == []


@pytest.mark.parametrize("variant", ["skip-children", "return-hints"])
def test_split_partial_subtree_is_still_descended(variant):
    # A subtree built without force_pte still holds blocks, so these variants
    # must descend into it like vanilla; only the complete level-2 split after
    # it is not descended: no level-3 reads, same pages and TLBIs as vanilla.
    pgt = mapped(G4, GIB, GIB, variant)
    ret, c, _ = split(pgt, GIB, GIB, 2)
    assert ret == -ENOMEM
    assert reads(c) == {1: 1, 2: 2}
    assert c.total("page_taken") == 2
    assert c.by_level(None, "tlbi_ipa") == {1: 1, 2: 1}


def test_split_with_empty_cache_is_enomem_and_changes_nothing():
    ipa = 9 * 2 * MIB
    pgt = mapped(G4, ipa, 2 * MIB)
    before = pgt.dump()
    ret, c, _ = split(pgt, ipa, 2 * MIB, 0)
    assert ret == -ENOMEM
    assert pgt.dump() == before
    assert reads(c) == {1: 1, 2: 1}
    assert c.total("page_taken") == 0 and c.total("tlbi_ipa") == 0
