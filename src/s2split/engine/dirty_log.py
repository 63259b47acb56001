"""Getting and clearing the dirty log in the fast engine: the twin of
:mod:`s2split.model.kvm.dirty_log` (``kvm_main.c``), word by word over ``B``."""

from __future__ import annotations

from numba import njit

from ..counting import counters as C
from .mmu import kvm_flush_remote_tlbs_memslot
from .mmu_hooks import CLEAR, clear_words, kvm_arch_mmu_enable_log_dirty_pt_masked
from .state import VARIANT_MMU, S, SlotCol, kvm_count, slot_index


@njit(cache=True, _nrt=False)
def kvm_get_dirty_log_protect(T, M, B, s, out):
    """``kvm_get_dirty_log_protect()`` into ``out``: with manual-protect a
    copy; otherwise each non-zero word is taken, cleared and re-protected,
    then the slot is flushed once."""
    off = M[slot_index(M, s, SlotCol.BITMAP)]
    nwords = (M[slot_index(M, s, SlotCol.NPAGES)] + 63) // 64
    if M[S.MANUAL]:
        kvm_count(M, C.K_BITMAP_WORDS, nwords)
        for i in range(nwords):
            out[i] = B[off + i]
        return
    flush = False
    for i in range(nwords):
        kvm_count(M, C.K_BITMAP_WORDS, 1)
        w = B[off + i]
        out[i] = w
        if w == 0:
            continue
        flush = True
        B[off + i] = 0
        kvm_arch_mmu_enable_log_dirty_pt_masked(T, M, B, s, i * 64, w)
    if flush:
        kvm_flush_remote_tlbs_memslot(M, s)


@njit(cache=True, _nrt=False)
def kvm_clear_dirty_log_protect(T, M, B, s, first_page, num_pages, user):
    """``kvm_clear_dirty_log_protect()``: clear the bits set in ``user`` that
    are set in the log, re-protect them, flush the slot once if any was.
    With a variant's clear hook, ``user`` (the caller's copy) is left holding
    the bits cleared per word, and the hook protects them all at once."""
    off = M[slot_index(M, s, SlotCol.BITMAP)]
    base = first_page // 64
    flush = False
    hook = M[VARIANT_MMU + CLEAR] != 0
    n = (num_pages + 63) // 64
    for j in range(n):
        kvm_count(M, C.K_BITMAP_WORDS, 1)
        mask = user[j]
        if mask == 0:
            continue
        i = base + j
        mask &= B[off + i]
        B[off + i] &= ~mask
        if hook:
            user[j] = mask
        if mask != 0:
            flush = True
            if not hook:
                kvm_arch_mmu_enable_log_dirty_pt_masked(T, M, B, s, i * 64, mask)
    if hook and flush:
        clear_words(T, M, B, s, base, user[:n])
    if flush:
        kvm_flush_remote_tlbs_memslot(M, s)
