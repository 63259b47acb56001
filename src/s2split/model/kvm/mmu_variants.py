"""Built-in variants above the walker: MMU-layer hooks (:mod:`s2split.model.kvm.mmu_api`).

Each hook below is written once: the reference engine runs it as Python,
the fast engine compiles it into its cache (:mod:`s2split.engine.mmu_hooks`).
Each variant also comes combined with ``skip-levels`` (``skip-levels+NAME``).

``clear-coalesce``
    One ``KVM_CLEAR_DIRTY_LOG`` write-protects (and splits) each run of
    contiguous ranges of its words with one wrprotect and one split call,
    instead of one pair per 64-page word.
``wp-split-fused``
    ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` makes one walk that splits
    blocks into read-only tables and write-protects pages, instead of a
    wrprotect walk followed by a split walk over the same range.
``split-once``
    ``kvm_mmu_split_huge_pages()`` remembers, per memslot, the PMD-sized
    ranges it has split while dirty logging is on, and skips the split walk
    over a range it has split already.
``enable-split-then-wp``
    Turning dirty logging on splits the memslot first, building the new
    tables read-only and write-protecting the pages it passes, instead of a
    wrprotect walk over the slot followed by a split walk.
"""

from __future__ import annotations

from ..pgtable import api_visitors as AV
from ..pgtable.variants import FAST_MMU_HOOKS, SKIP_LEVELS, Variant, register
from . import mmu_api as api


def protect_pages(m, lo, hi):
    """What vanilla's per-word call does for slot pages ``[lo, hi)``: a
    write-protect, then (manual-protect + initially-set) a split."""
    shift = api.page_shift(m)
    start = (api.slot_base_gfn(m) + lo) << shift
    end = (api.slot_base_gfn(m) + hi) << shift
    api.wp_range(m, start, end)
    if api.manual_init_set(m):
        api.split_huge_pages(m, start, end)


def clear_coalesce(m):
    """The word loop of ``kvm_clear_dirty_log_protect()`` protecting each run
    of contiguous per-word ranges at once.

    Vanilla protects ``[__ffs(mask), __fls(mask)]`` of each word; the range of
    word ``j + 1`` continues that of word ``j`` exactly when word ``j`` has
    bit 63 and word ``j + 1`` bit 0. Merging only those protects exactly the
    pages vanilla protects, with one wrprotect and one split call per run."""
    n = api.nwords(m)
    base = api.first_word(m)
    j = 0
    while j < n:
        w = api.word(m, j)
        if w == 0:
            j += 1
            continue
        lo = (base + j) * 64 + api.ffs(w)
        hi = (base + j) * 64 + api.fls(w) + 1
        j += 1
        while j < n and hi == (base + j) * 64 and (api.word(m, j) & 1) != 0:
            hi = (base + j) * 64 + api.fls(api.word(m, j)) + 1
            j += 1
        protect_pages(m, lo, hi)
    return 0


def wp_split_fused(m):
    """``kvm_arch_mmu_enable_log_dirty_pt_masked()`` with one walk: the split
    walk (whose visitor is ``wp_split_walker``) write-protects as it splits.
    Without eager splitting (no chunk size, or not initially-set) it is
    vanilla's write-protect; if a split fails, the range is write-protected
    as vanilla would."""
    shift = api.page_shift(m)
    w = api.mask(m)
    start = (api.slot_base_gfn(m) + api.gfn_offset(m) + api.ffs(w)) << shift
    end = (api.slot_base_gfn(m) + api.gfn_offset(m) + api.fls(w) + 1) << shift
    if api.manual_init_set(m) and api.chunk_size(m) != 0:
        # every level: the walk write-protects pages, which skip-levels would skip
        if api.split_huge_pages_all_levels(m, start, end) != 0:
            api.wp_range(m, start, end)
    else:
        api.wp_range(m, start, end)
    return 0


def split_once(m):
    """``kvm_mmu_split_huge_pages()`` that skips ranges split already: one
    bit per PMD-sized, PMD-aligned range of guest frames the slot spans
    (bit ``k``: the ``k``-th from the one holding the slot's first page), set once a split call over a range that touches it succeeded. While
    dirty logging is on, faults map pages only, so a range split once stays
    split; the bits are cleared when logging is turned on again."""
    shift = api.page_shift(m)
    start = api.range_start(m)
    end = api.range_end(m)
    per = 1 << (shift - 3)  # pages per PMD block: one table of granule / 8 entries
    base = api.slot_base_gfn(m) // per
    first = (start >> shift) // per - base
    last = ((end - 1) >> shift) // per - base
    k = first
    while k <= last and api.marked(m, k):
        k += 1
    if k > last:
        return 0
    ret = api.split_huge_pages(m, start, end)
    if ret == 0:
        k = first
        while k <= last:
            api.mark(m, k)
            k += 1
    return ret


def enable_split_then_wp(m):
    """Turning dirty logging on: one split walk over the slot that builds the
    new tables read-only and write-protects the pages it passes (the split
    visitor ``wp_split_walker``), then the memslot flush of
    ``kvm_mmu_wp_memory_region()``. Without eager splitting, or if the split
    fails, vanilla's write-protect (and split)."""
    shift = api.page_shift(m)
    start = api.slot_base_gfn(m) << shift
    end = (api.slot_base_gfn(m) + api.slot_npages(m)) << shift
    if api.chunk_size(m) != 0 and api.split_huge_pages_all_levels(m, start, end) == 0:
        api.flush_memslot(m)
        return 0
    api.wp_memory_region(m)
    api.split_memory_region(m)
    return 0


for _fn in (clear_coalesce, wp_split_fused, split_once, enable_split_then_wp):
    FAST_MMU_HOOKS.add(_fn)

CLEAR_COALESCE = Variant(
    "clear-coalesce", "KVM_CLEAR_DIRTY_LOG protects each run of contiguous word ranges with "
    "one wrprotect and one split call, not one pair per 64-page word",
    mmu={"clear_dirty_log": clear_coalesce}, cache_differs=True)
WP_SPLIT_FUSED = Variant(
    "wp-split-fused", "kvm_arch_mmu_enable_log_dirty_pt_masked splits blocks into read-only "
    "tables and write-protects pages in one walk, not a wrprotect walk then a split walk",
    visitors={"split": AV.wp_split_walker},
    mmu={"enable_log_dirty_pt_masked": wp_split_fused})
SPLIT_ONCE = Variant(
    "split-once", "kvm_mmu_split_huge_pages skips PMD-sized ranges of the memslot it has "
    "split already since dirty logging was turned on (a per-memslot bitmap)",
    mmu={"split_huge_pages": split_once}, cache_differs=True)
ENABLE_SPLIT_THEN_WP = Variant(
    "enable-split-then-wp", "turning dirty logging on splits the memslot first, building "
    "the tables read-only and write-protecting the pages it passes, in one walk",
    visitors={"split": AV.wp_split_walker},
    mmu={"enable_log_dirty": enable_split_then_wp})

MMU_VARIANTS = (CLEAR_COALESCE, WP_SPLIT_FUSED, SPLIT_ONCE, ENABLE_SPLIT_THEN_WP)
for _v in MMU_VARIANTS:
    register(_v)
    register(SKIP_LEVELS + _v)
