"""Memslots and their dirty bitmaps (``struct kvm_memory_slot``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .backing import Backing

from ...arm64.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

WORD_BITS = 64


@dataclass
class Memslot:
    """A memslot: ``npages`` host pages at ``base_gfn``, backed at ``userspace_addr``.

    ``host_pa`` is the physical address of the first backing page; the model
    backs a slot with physically contiguous memory aligned to the backing's
    page size, which is what THP and hugetlb give and all that matters for
    block mappings.
    """

    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    backing: Backing
    host_pa: int
    dirty_bitmap: list[int] | None = field(default=None, repr=False)
    #: A variant's own per-memslot bitmap (:func:`s2split.model.kvm.mmu_api.mark`).
    variant_bitmap: list[int] | None = field(default=None, repr=False)

    @property
    def page_shift(self) -> int:
        return self.backing.granule.bit_length() - 1

    @property
    def base_gpa(self) -> int:
        return self.base_gfn << self.page_shift

    @property
    def size(self) -> int:
        return self.npages << self.page_shift

    @property
    def end_gpa(self) -> int:
        return self.base_gpa + self.size

    @property
    def logging(self) -> bool:
        """``memslot_is_logging()``: a dirty bitmap exists and the slot is writable."""
        return self.dirty_bitmap is not None and not self.flags & KVM_MEM_READONLY

    @property
    def nwords(self) -> int:
        return (self.npages + WORD_BITS - 1) // WORD_BITS

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << self.page_shift)

    def hva_to_pa(self, hva: int) -> int:
        return self.host_pa + (hva - self.userspace_addr)

    def new_bitmap(self, all_set: bool) -> list[int]:
        words = [0] * self.nwords
        if all_set:
            for i in range(self.nwords):
                bits = min(WORD_BITS, self.npages - i * WORD_BITS)
                words[i] = (1 << bits) - 1
        return words

    def mark_dirty(self, gfn: int) -> None:
        rel = gfn - self.base_gfn
        self.dirty_bitmap[rel >> 6] |= 1 << (rel & 63)


def ffs(word: int) -> int:
    """Index of the lowest set bit (``__ffs``)."""
    return (word & -word).bit_length() - 1


def fls(word: int) -> int:
    """Index of the highest set bit (``__fls``)."""
    return word.bit_length() - 1
