"""``KVM_GET_DIRTY_LOG`` and ``KVM_CLEAR_DIRTY_LOG`` (``virt/kvm/kvm_main.c``).

Both walk the slot's bitmap one 64-bit word at a time; each word with bits to
act on becomes one ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` call, and a
single memslot TLB flush follows if any word did. The ioctls' argument checks
live in :class:`s2split.model.kvm.vm.VMBase`.
"""

from __future__ import annotations

from typing import Sequence

from ...counting.counters import K_BITMAP_WORDS, NOLEVEL, SLOTS
from .kvm_host import Kvm
from .memslot import WORD_BITS, Memslot
from .mmu import (MmuCtx, kvm_arch_mmu_enable_log_dirty_pt_masked,
                  kvm_flush_remote_tlbs_memslot, mmu_hook)


def kvm_get_dirty_log_protect(vm: Kvm, slot: Memslot) -> list[int]:
    """Return the slot's dirty bitmap. With manual-protect it is only copied;
    without, each dirty word is taken (cleared) and its pages write-protected."""
    bitmap = slot.dirty_bitmap
    k = vm.k
    if vm.manual_dirty_log_protect:
        k[K_BITMAP_WORDS * SLOTS + NOLEVEL] += len(bitmap)  # copied to userspace
        return list(bitmap)
    out = [0] * len(bitmap)
    flush = False
    for i, word in enumerate(bitmap):
        k[K_BITMAP_WORDS * SLOTS + NOLEVEL] += 1
        if not word:
            continue
        flush = True
        bitmap[i] = 0
        out[i] = word
        kvm_arch_mmu_enable_log_dirty_pt_masked(vm, slot, i * WORD_BITS, word)
    if flush:
        kvm_flush_remote_tlbs_memslot(vm, slot)
    return out


def kvm_clear_dirty_log_protect(vm: Kvm, slot: Memslot, first_page: int, num_pages: int,
                                bitmap: Sequence[int]) -> None:
    """Clear the bits of ``bitmap`` (relative to ``first_page``) that are set in
    the kernel's bitmap, write-protecting (and maybe splitting) per word."""
    kernel = slot.dirty_bitmap
    flush = False
    k = vm.k
    base = first_page // WORD_BITS
    n = (num_pages + WORD_BITS - 1) // WORD_BITS
    hook = mmu_hook(vm, "clear_dirty_log")
    words = [0] * n if hook is not None else None
    for j in range(n):
        k[K_BITMAP_WORDS * SLOTS + NOLEVEL] += 1
        mask = int(bitmap[j])
        if not mask:
            continue
        i = base + j
        # atomic_long_fetch_andnot(): only bits the kernel had set really clear.
        mask &= kernel[i]
        kernel[i] &= ~mask
        if mask:
            flush = True
            if words is not None:
                words[j] = mask  # the variant's hook protects them all at once
            else:
                kvm_arch_mmu_enable_log_dirty_pt_masked(vm, slot, i * WORD_BITS, mask)
    if words is not None and flush:
        # Under the same MMU lock as the loop: no guest access comes between.
        hook(MmuCtx(vm, slot, base, n, words))
    if flush:
        kvm_flush_remote_tlbs_memslot(vm, slot)
