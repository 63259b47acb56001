"""TLB invalidation, barriers and cache maintenance, recorded as events.

Each function records what the corresponding kernel function executes, so
that the cost model can price it. Sequences (VHE, ``arch/arm64/kvm/hyp/vhe/tlb.c``):

* ``__kvm_tlb_flush_vmid_ipa``: DSB ISHST; TLBI IPAS2E1IS; DSB ISH; TLBI VMALLE1IS; DSB ISH; ISB
* ``__kvm_tlb_flush_vmid_ipa_nsh``: the same with non-shareable barriers and
  the local (non-IS) TLBIs
* ``__kvm_tlb_flush_vmid_range``: DSB ISHST; range TLBIs; DSB ISH; TLBI VMALLE1IS; DSB ISH; ISB
* ``__kvm_tlb_flush_vmid``: DSB ISHST; TLBI VMALLS12E1IS; DSB ISH; ISB

On nVHE each of them is also a hypercall (``hyp_call``).
``kvm_tlb_flush_vmid_range()`` splits a range into calls of at most
``MAX_TLBI_RANGE_PAGES`` pages, or falls back to a whole-VMID flush without
FEAT_TLBIRANGE.
"""

from __future__ import annotations

from ..counters import (K_DCACHE_BYTES, K_DCACHE_OPS, K_DSB_ISH, K_DSB_ISHST, K_DSB_NSH,
                        K_DSB_NSHST, K_FLUSH_RANGE, K_FLUSH_RANGE_BYTES, K_HYP_CALL,
                        K_ICACHE_BYTES, K_ICACHE_OPS, K_ISB, K_TLBI_IPA, K_TLBI_IPA_NSH,
                        K_TLBI_RANGE, K_TLBI_RANGE_OPS, K_TLBI_RANGE_PAGES, K_TLBI_S1,
                        K_TLBI_VMID, NOLEVEL, SLOTS)
from ..hw import Features

#: ``MAX_TLBI_RANGE_PAGES`` = ``__TLBI_RANGE_PAGES(31, 3)``.
MAX_TLBI_RANGE_PAGES = 32 << (5 * 3 + 1)


def _n(kind: int) -> int:
    return kind * SLOTS + NOLEVEL


_DSB_ISHST, _DSB_ISH, _DSB_NSHST, _DSB_NSH = _n(K_DSB_ISHST), _n(K_DSB_ISH), _n(K_DSB_NSHST), \
    _n(K_DSB_NSH)
_ISB, _TLBI_S1, _HYP = _n(K_ISB), _n(K_TLBI_S1), _n(K_HYP_CALL)


def range_tlbi_ops(pages: int, start_page: int = 0, lpa2_align: int = 0,
                   tlbirange: bool = True) -> int:
    """TLBI instructions ``__flush_s2_tlb_range_op`` issues for ``pages`` pages.

    Range operations cover ``(num + 1) << (5 * scale + 1)`` pages, scale from 3
    down to 0; a single page left over (or any page without FEAT_TLBIRANGE, or an
    LPA2 start that is not 64K aligned) takes a by-IPA TLBI of its own.
    """
    ops = 0
    scale = 3
    addr = start_page
    while pages > 0:
        if not tlbirange or pages == 1 or (lpa2_align and addr % lpa2_align):
            ops += 1
            addr += 1
            pages -= 1
            continue
        unit = 1 << (5 * scale + 1)
        num = (min(pages, 32 * unit) // unit) - 1
        if num >= 0:
            ops += 1
            addr += (num + 1) * unit
            pages -= (num + 1) * unit
        scale -= 1
    return ops


def dsb_ishst(c: list[int]) -> None:
    c[_DSB_ISHST] += 1


def _hyp(c: list[int], features: Features) -> None:
    if not features.vhe:
        c[_HYP] += 1


def flush_vmid_ipa(c: list[int], features: Features, level: int | None) -> None:
    """``__kvm_tlb_flush_vmid_ipa(mmu, ipa, level)``; ``None`` is TLBI_TTL_UNKNOWN."""
    _hyp(c, features)
    c[K_TLBI_IPA * SLOTS + (NOLEVEL if level is None else level + 1)] += 1
    c[_DSB_ISHST] += 1
    c[_DSB_ISH] += 2
    c[_TLBI_S1] += 1
    c[_ISB] += 1


def flush_vmid_ipa_nsh(c: list[int], features: Features, level: int | None) -> None:
    """``__kvm_tlb_flush_vmid_ipa_nsh()``: the local variant used by relax_perms."""
    _hyp(c, features)
    c[K_TLBI_IPA_NSH * SLOTS + (NOLEVEL if level is None else level + 1)] += 1
    c[_DSB_NSHST] += 1
    c[_DSB_NSH] += 2
    c[_TLBI_S1] += 1
    c[_ISB] += 1


def flush_vmid(c: list[int], features: Features) -> None:
    """``__kvm_tlb_flush_vmid()``: everything for the VMID, both stages."""
    _hyp(c, features)
    c[_n(K_TLBI_VMID)] += 1
    c[_DSB_ISHST] += 1
    c[_DSB_ISH] += 1
    c[_ISB] += 1


def flush_vmid_range(c: list[int], features: Features, addr: int, size: int, page_shift: int,
                     lpa2: bool = False) -> None:
    """``kvm_tlb_flush_vmid_range(mmu, addr, size)``."""
    c[_n(K_FLUSH_RANGE)] += 1
    c[_n(K_FLUSH_RANGE_BYTES)] += size
    if not features.tlbirange:
        flush_vmid(c, features)
        return
    pages = size >> page_shift
    while pages > 0:
        inval = min(pages, MAX_TLBI_RANGE_PAGES)
        _hyp(c, features)
        c[_n(K_TLBI_RANGE)] += 1
        c[_n(K_TLBI_RANGE_PAGES)] += inval
        c[_n(K_TLBI_RANGE_OPS)] += range_tlbi_ops(
            inval, addr >> page_shift, (1 << 16 >> page_shift) if lpa2 else 0)
        c[_DSB_ISHST] += 1
        c[_DSB_ISH] += 2
        c[_TLBI_S1] += 1
        c[_ISB] += 1
        addr += inval << page_shift
        pages -= inval


def dcache_clean_inval_poc(c: list[int], features: Features, level: int, size: int) -> None:
    """``clean_dcache_guest_page()``: returns at once with FWB, so only counted without."""
    if features.fwb:
        return
    c[K_DCACHE_OPS * SLOTS + level + 1] += 1
    c[K_DCACHE_BYTES * SLOTS + level + 1] += size


def icache_inval_pou(c: list[int], features: Features, level: int, size: int) -> None:
    """``invalidate_icache_guest_page()``: with DIC only an ISB remains."""
    if features.dic:
        c[_ISB] += 1
        return
    c[K_ICACHE_OPS * SLOTS + level + 1] += 1
    c[K_ICACHE_BYTES * SLOTS + level + 1] += size
