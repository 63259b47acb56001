"""Estimated time per kernel operation: the counters mapped to what the kernel does.

The counters (:mod:`s2split.counting.counters`) are addressed by operation x kind x
level; a reader of the series thinks in kernel operations instead. This module
is the ONE place where counters become operations. Every ``(op, kind)`` pair
belongs to exactly one category, so the categories of a cell add up to its
whole estimate (``Profile.estimate_ns``), nothing counted twice or left out:

``split walk``
    The walk of ``kvm_pgtable_stage2_split()`` (``stage2_split_walker``): its
    table loops, entries read and re-read, visitor calls, descents, skipped
    subtrees, and the walk and call overhead -- everything of ``op=split``
    except the table it installs and the maintenance it issues (below).
    Per level: the level of the entry read or visited.
``write-protect walk``
    ``kvm_pgtable_stage2_wrprotect()`` (``stage2_attr_walker``): the walk and
    the permission updates it makes (``op=wrprotect``, except maintenance).
``table building``
    What a split builds and installs: the detached table of
    ``kvm_pgtable_stage2_create_unlinked()`` (its walk, PTE writes, page
    references), the split visitor's break-before-make and store of the new
    table entry and its page references, pages taken from and freed to the
    memory caches and the split cache's top-ups (``kvm`` cache counters).
    Per level: the level of the entries built.
``TLB maintenance and barriers``
    Every TLBI (by IPA, range, VMID, stage 1), the flush calls around them,
    hypercalls into EL2 (nVHE), DSB and ISB barriers, and cache maintenance
    to the PoC/PoU -- whichever operation issued them.
``dirty-bitmap work``
    The KVM side of the dirty log: words of the bitmap examined by get/clear,
    ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` calls and pages marked
    dirty.
``KVM MMU layer``
    The rest of ``op=kvm``: the ioctl itself, ``kvm_mmu_split_huge_pages()``
    and its per-chunk loop, MMU-lock drops, faults and guest accesses.
``other page-table walks``
    Walks of other operations (map, unmap, relax-permissions, destroy, free,
    host lookups, init). The dirty-log ioctls make none; kept so that the
    partition is complete for any phase.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..counting.counters import KINDS, NKINDS, NOPS, OPS, SLOTS, slot_level
from ..counting.counts import Counts

SPLIT_WALK = "split walk"
WRPROTECT_WALK = "write-protect walk"
TABLE_BUILDING = "table building"
TLB_BARRIERS = "TLB maintenance and barriers"
DIRTY_BITMAP = "dirty-bitmap work"
KVM_LAYER = "KVM MMU layer"
OTHER_WALKS = "other page-table walks"

#: The categories, in the order reports list and stack them.
CATEGORIES: tuple[str, ...] = (SPLIT_WALK, WRPROTECT_WALK, TABLE_BUILDING, TLB_BARRIERS,
                               DIRTY_BITMAP, KVM_LAYER, OTHER_WALKS)
#: Categories whose time is shown per level: where the variants differ.
BY_LEVEL: frozenset[str] = frozenset({SPLIT_WALK, WRPROTECT_WALK, TABLE_BUILDING})

_MAINTENANCE = frozenset({
    "tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages", "tlbi_range_ops",
    "tlbi_vmid", "tlbi_s1", "flush_range", "flush_range_bytes", "hyp_call", "dsb_ishst",
    "dsb_ish", "dsb_nshst", "dsb_nsh", "isb", "dcache_ops", "dcache_bytes", "icache_ops",
    "icache_bytes", "flush_memslot"})
# The split visitor replaces a block with the table create_unlinked built:
# these are that installation, not the walk.
_INSTALL = frozenset({"pte_write", "pte_cas", "bbm", "get_page", "put_page"})
_PAGES = frozenset({"page_taken", "page_freed", "cache_pages_alloc", "cache_pages_freed",
                    "split_topups", "vcpu_topups"})
_BITMAP = frozenset({"bitmap_words", "log_dirty_masked", "dirty_marked"})


def category_of(op: str, kind: str) -> str:
    """The kernel operation that a counter's time belongs to (see the module
    docstring); defined for every operation and kind."""
    if kind in _MAINTENANCE:
        return TLB_BARRIERS
    if kind in _PAGES:
        return TABLE_BUILDING
    if op == "kvm":
        return DIRTY_BITMAP if kind in _BITMAP else KVM_LAYER
    if op == "create_unlinked":
        return TABLE_BUILDING
    if op == "split":
        return TABLE_BUILDING if kind in _INSTALL else SPLIT_WALK
    if op == "wrprotect":
        return WRPROTECT_WALK
    return OTHER_WALKS


def _index() -> np.ndarray:
    idx = np.empty((NOPS, NKINDS), dtype=np.int64)
    for o, op in enumerate(OPS):
        for k, kind in enumerate(KINDS):
            idx[o, k] = CATEGORIES.index(category_of(op, kind))
    return idx


#: Category index of every (op, kind): the mapping as an array.
CATEGORY_INDEX = _index()

Key = tuple[str, "int | None"]  # (category, level or None)


def category_masks() -> dict[str, np.ndarray]:
    """Per category, a boolean mask over the counters' (op, kind, slot) array."""
    full = np.broadcast_to(CATEGORY_INDEX[:, :, None], (NOPS, NKINDS, SLOTS))
    return {c: full == i for i, c in enumerate(CATEGORIES)}


def breakdown_ns(counts: Counts, profile) -> dict[Key, float]:
    """Estimated ns per (category, level) -- level None for categories not
    shown by level and for counters without a level -- every key present
    whose estimate is not zero."""
    prod = counts.array * profile.array
    out: dict[Key, float] = {}
    for o, k, s in zip(*np.nonzero(prod)):
        cat = CATEGORIES[CATEGORY_INDEX[o, k]]
        level = slot_level(int(s)) if cat in BY_LEVEL else None
        out[(cat, level)] = out.get((cat, level), 0.0) + float(prod[o, k, s])
    return out


def by_category(parts: dict[Key, float]) -> dict[str, float]:
    """Levels folded: ns per category."""
    out: dict[str, float] = {}
    for (cat, _), ns in parts.items():
        out[cat] = out.get(cat, 0.0) + ns
    return out


#: What the counters without a level are, in the categories shown by level.
_NO_LEVEL = {SPLIT_WALK: "per walk", WRPROTECT_WALK: "per walk",
             TABLE_BUILDING: "memory-cache top-ups"}


def key_label(key: Key) -> str:
    """``split walk, L3``: a table row."""
    cat, level = key
    if cat not in BY_LEVEL:
        return cat
    return f"{cat}, L{level}" if level is not None else f"{cat}, {_NO_LEVEL[cat]}"


def key_phrase(key: Key) -> str:
    """``the split walk at level 3``: the same in a sentence."""
    cat, level = key
    if cat not in BY_LEVEL:
        return cat
    return f"the {cat} at level {level}" if level is not None else \
        f"the {cat} ({_NO_LEVEL[cat]})"


def ordered_keys(keys: Iterable[Key]) -> list[Key]:
    """Categories in :data:`CATEGORIES` order, levels from the root down,
    per-call overhead last."""
    return sorted(set(keys), key=lambda k: (CATEGORIES.index(k[0]),
                                            99 if k[1] is None else k[1]))


# -- where table reads hit ---------------------------------------------------------------

#: The category of each walk whose reads are shown by where they hit.
_HIT_CATEGORY = {"split": SPLIT_WALK, "wrprotect": WRPROTECT_WALK,
                 "create_unlinked": TABLE_BUILDING}


def read_hits(counts: Counts) -> dict[Key, tuple[int, ...]]:
    """"Where table reads hit": the entry reads of the split walk, the
    write-protect walk and table building per (category, level), as counts
    in L1, L2, LLC and DRAM (the ``hit_*`` counters; their estimated time is
    already in the category's row above)."""
    from ..tasks.explain import read_hits as by_op
    return {(_HIT_CATEGORY[op], level): h for op, level, h in by_op(counts)}


def hits_text(h: tuple[int, ...]) -> str:
    """``L1 87.5%, DRAM 12.5%``."""
    from ..tasks.explain import hits_text as text
    return text(h)


__all__ = ["CATEGORIES", "BY_LEVEL", "category_of", "breakdown_ns", "by_category",
           "category_masks", "key_label", "key_phrase", "ordered_keys", "read_hits", "hits_text"]
