"""The MMU hook API: replace a function of the KVM MMU layer, written once.

A variant may replace four functions of ``arch/arm64/kvm/mmu.c`` and
``virt/kvm/kvm_main.c`` (``Variant(mmu={name: hook})``):

``"enable_log_dirty_pt_masked"``
    ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` for one 64-page word:
    :func:`gfn_offset` (of the word, in the slot) and :func:`mask`.
``"clear_dirty_log"``
    the word loop of ``kvm_clear_dirty_log_protect()``: the bits have been
    cleared in the kernel's bitmap already (that part is the ioctl's meaning,
    not the variant's) and :func:`word` gives, for ``0 <= j < nwords``, the
    bits cleared in word ``first_word + j`` of the slot (0: none); the hook
    write-protects (and splits) what vanilla's per-word calls would. The
    ioctl's one memslot TLB flush follows the hook, as it follows the loop.
``"split_huge_pages"``
    ``kvm_mmu_split_huge_pages()`` over ``[range_start, range_end)`` (IPAs).
``"enable_log_dirty"``
    the enable path of ``kvm_arch_commit_memory_region()``:
    ``kvm_mmu_wp_memory_region()`` then ``kvm_mmu_split_memory_region()``.

A hook is a function of one argument, the *context* ``m``, using only the
functions of this module, integer arithmetic, ``if``/``while`` and calls to
other such functions (as a visitor uses :mod:`s2split.model.pgtable.visitor_api`).
The reference engine calls it with a Python context; the fast engine
compiles the same function (the built-in hooks are compiled into its cache,
:mod:`s2split.engine.mmu_hooks`). Every function here keeps the kernel
function's counts: a hook costs what the kernel work it starts costs.

What a hook sees: the memslot (:func:`slot_base_gfn`, :func:`slot_npages`),
the VM's configuration and caches (:func:`page_shift`, :func:`chunk_size`:
the eager split chunk, :func:`manual_init_set`: manual-protect with
initially-set, :func:`split_cache_pages`) and its arguments. What it can do: the MMU layer's own functions
(:func:`wp_range` = ``kvm_stage2_wp_range``, :func:`split_huge_pages` =
vanilla ``kvm_mmu_split_huge_pages`` with the VM's split cache,
:func:`split_huge_pages_all_levels` = the same without the variant's
``skip_level`` flags,
:func:`enable_log_dirty_pt_masked` = vanilla's body,
:func:`wp_memory_region`, :func:`split_memory_region`,
:func:`flush_memslot`), the stage-2 operations (:func:`stage2_wrprotect`,
:func:`stage2_split` from the split cache as it is: both walk with the
variant's flags and visitors), and a per-memslot bitmap of its own
(:func:`marked`, :func:`mark`; one bit per page index of the slot, cleared
when dirty logging is turned on -- a kernel patch would keep it in
``memslot->arch``; its bit tests are not counted).
"""

from __future__ import annotations

from ..pgtable.walker import SKIP_LEVELS_ALL
from . import mmu as KM

__all__ = ["MmuCtx", "slot_base_gfn", "slot_npages", "page_shift", "chunk_size",
           "manual_init_set", "split_cache_pages", "gfn_offset", "mask", "range_start",
           "range_end", "first_word", "nwords", "word", "wp_range", "split_huge_pages",
           "split_huge_pages_all_levels", "enable_log_dirty_pt_masked", "wp_memory_region",
           "split_memory_region", "flush_memslot", "stage2_wrprotect", "stage2_split", "marked",
           "mark", "ffs", "fls"]


MmuCtx = KM.MmuCtx


# -- what the hook sees ---------------------------------------------------------------
def slot_base_gfn(m):
    """The memslot's first guest frame."""
    return m.slot.base_gfn


def slot_npages(m):
    """The memslot's pages."""
    return m.slot.npages


def page_shift(m):
    """``PAGE_SHIFT`` of the host (the stage-2 granule)."""
    return m.vm.geom.page_shift


def chunk_size(m):
    """``kvm->arch.mmu.split_page_chunk_size`` (0: no eager splitting)."""
    return m.vm.split_chunk_size


def manual_init_set(m):
    """``kvm_dirty_log_manual_protect_and_init_set()``."""
    return 1 if m.vm.manual_protect_and_init_set else 0


def split_cache_pages(m):
    """Pages in the VM's split cache (``kvm->arch.mmu.split_page_cache``)."""
    return m.vm.split_cache.nobjs


def gfn_offset(m):
    """enable_log_dirty_pt_masked: the word's first page, relative to the slot."""
    return m.a0


def mask(m):
    """enable_log_dirty_pt_masked: the word (bit ``i`` = page ``gfn_offset + i``)."""
    return m.a1


def range_start(m):
    """split_huge_pages: the first IPA."""
    return m.a0


def range_end(m):
    """split_huge_pages: the end IPA."""
    return m.a1


def first_word(m):
    """clear_dirty_log: the slot's word of ``word(m, 0)``."""
    return m.a0


def nwords(m):
    """clear_dirty_log: the words of the call."""
    return m.a1


def word(m, j):
    """clear_dirty_log: the bits cleared in word ``first_word + j`` (0 <= j < nwords)."""
    return m.words[j]


# -- what the hook can do -----------------------------------------------------------------
def wp_range(m, start, end):
    """``kvm_stage2_wp_range()``: a wrprotect walk per MIN_BLOCK_LEVEL piece."""
    KM.kvm_stage2_wp_range(m.vm, start, end)


def split_huge_pages(m, start, end):
    """Vanilla ``kvm_mmu_split_huge_pages()`` (chunked, topping the split
    cache up): 0 or a negative errno."""
    return KM.split_huge_pages_body(m.vm, start, end)


def split_huge_pages_all_levels(m, start, end):
    """:func:`split_huge_pages` whose walks visit every level whatever the
    variant's ``skip_level`` flags say: for a split visitor that has work at
    the last level too (``wp_split_walker`` write-protects pages there)."""
    pgt = m.vm.pgt
    pgt.flags_clear = SKIP_LEVELS_ALL
    try:
        return KM.split_huge_pages_body(m.vm, start, end)
    finally:
        pgt.flags_clear = 0


def enable_log_dirty_pt_masked(m, offset, bits):
    """Vanilla ``kvm_arch_mmu_enable_log_dirty_pt_masked()``'s body for one
    word (uncounted as a call: the hook is the call)."""
    KM.enable_log_dirty_pt_masked_body(m.vm, m.slot, offset, bits)


def wp_memory_region(m):
    """``kvm_mmu_wp_memory_region()``: the slot write-protected, then flushed."""
    KM.kvm_mmu_wp_memory_region(m.vm, m.slot)


def split_memory_region(m):
    """``kvm_mmu_split_memory_region()``: the slot split (the variant's
    ``split_huge_pages`` hook, if any)."""
    KM.kvm_mmu_split_memory_region(m.vm, m.slot)


def flush_memslot(m):
    """``kvm_flush_remote_tlbs_memslot()``."""
    KM.kvm_flush_remote_tlbs_memslot(m.vm, m.slot)


def stage2_wrprotect(m, addr, size):
    """``kvm_pgtable_stage2_wrprotect()``: one walk, no chunking."""
    return m.vm.pgt.wrprotect(addr, size)


def stage2_split(m, addr, size):
    """``kvm_pgtable_stage2_split()`` from the split cache as it is (no top-up)."""
    return m.vm.pgt.split(addr, size, m.vm.split_cache)


def marked(m, i):
    """Whether bit ``i`` of the variant's per-memslot bitmap is set."""
    return (m.slot.variant_bitmap[i >> 6] >> (i & 63)) & 1


def mark(m, i):
    """Set bit ``i`` of the variant's per-memslot bitmap."""
    m.slot.variant_bitmap[i >> 6] |= 1 << (i & 63)


# -- helpers (plain functions: both engines run them as they are) -------------------------
def ffs(w):
    """``__ffs()``: the lowest set bit of a non-zero word."""
    n = 0
    while not (w >> n) & 1:
        n += 1
    return n


def fls(w):
    """``__fls()``: the highest set bit of a non-zero 64-bit word."""
    n = 63
    while not (w >> n) & 1:
        n -= 1
    return n
