"""``KVM_GET_DIRTY_LOG`` and ``KVM_CLEAR_DIRTY_LOG`` (``virt/kvm/kvm_main.c``).

Both walk the slot's bitmap one 64-bit word at a time; each word with bits to
act on becomes one ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` call, and a
single memslot TLB flush follows if any word did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..counters import K_BITMAP_WORDS, NOLEVEL, SLOTS
from ..errors import EINVAL, ENOENT, KernelError
from .memslot import WORD_BITS
from .mmu import kvm_arch_mmu_enable_log_dirty_pt_masked, kvm_flush_remote_tlbs_memslot

if TYPE_CHECKING:
    from .vm import VM


def _slot_with_log(vm: "VM", slot_id: int):
    slot = vm.memslots.get(slot_id)
    if slot is None or slot.dirty_bitmap is None:
        raise KernelError(ENOENT, f"memslot {slot_id} has no dirty log")
    return slot


def kvm_get_dirty_log_protect(vm: "VM", slot_id: int) -> list[int]:
    """Return the slot's dirty bitmap. With manual-protect it is only copied;
    without, each dirty word is taken (cleared) and its pages write-protected."""
    slot = _slot_with_log(vm, slot_id)
    bitmap = slot.dirty_bitmap
    if vm.manual_dirty_log_protect:
        # Only copied to userspace.
        vm.k[K_BITMAP_WORDS * SLOTS + NOLEVEL] += len(bitmap)
        return list(bitmap)
    out = [0] * len(bitmap)
    flush = False
    k = vm.k
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


def kvm_clear_dirty_log_protect(vm: "VM", slot_id: int, first_page: int, num_pages: int,
                                bitmap: list[int]) -> None:
    """Clear the bits of ``bitmap`` (relative to ``first_page``) that are set in
    the kernel's bitmap, write-protecting (and maybe splitting) per word."""
    if first_page & 63:
        raise KernelError(EINVAL, f"first_page {first_page} is not a multiple of 64")
    slot = _slot_with_log(vm, slot_id)
    if first_page > slot.npages or num_pages > slot.npages - first_page or \
            (num_pages < slot.npages - first_page and num_pages & 63):
        raise KernelError(EINVAL, f"pages [{first_page}, {first_page + num_pages}) do not fit "
                          f"memslot {slot_id} of {slot.npages} pages in whole 64-page words")
    nwords = (num_pages + WORD_BITS - 1) // WORD_BITS
    if len(bitmap) < nwords:
        raise KernelError(EINVAL, f"the bitmap holds {len(bitmap)} words, {nwords} are needed")
    kernel = slot.dirty_bitmap
    flush = False
    k = vm.k
    base = first_page // WORD_BITS
    for j in range(nwords):
        k[K_BITMAP_WORDS * SLOTS + NOLEVEL] += 1
        mask = bitmap[j]
        if not mask:
            continue
        i = base + j
        # atomic_long_fetch_andnot(): only bits the kernel had set really clear.
        mask &= kernel[i]
        kernel[i] &= ~mask
        if mask:
            flush = True
            kvm_arch_mmu_enable_log_dirty_pt_masked(vm, slot, i * WORD_BITS, mask)
    if flush:
        kvm_flush_remote_tlbs_memslot(vm, slot)
