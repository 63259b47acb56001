"""TLB invalidation, barriers and cache maintenance, recorded as events.

Each function records what the corresponding kernel function executes, so
that the cost model can price it. The hyp TLB functions of Linux 6.12
(``arch/arm64/kvm/hyp/{vhe,nvhe}/tlb.c``) put their TLBIs between
``enter_vmid_context()`` and ``exit_vmid_context()``:

* ``__kvm_tlb_flush_vmid_ipa``: TLBI IPAS2E1IS; DSB ISH; TLBI VMALLE1IS; DSB ISH; ISB
* ``__kvm_tlb_flush_vmid_ipa_nsh``: the same with the local (non-IS) TLBIs and
  DSB NSH
* ``__kvm_tlb_flush_vmid_range``: range TLBIs; DSB ISH; TLBI VMALLE1IS; DSB ISH; ISB
* ``__kvm_tlb_flush_vmid``: TLBI VMALLS12E1IS; DSB ISH; ISB

Around that body (:func:`_vmid_context`):

* VHE: DSB ISHST (NSHST) first; ISBs end ``enter_vmid_context`` (after
  clearing HCR_EL2.TGE) and ``exit_vmid_context`` (after restoring it), and
  ``kvm_call_hyp()`` adds one after the call: 1 DSB xSHST, 4 ISBs in all.
* nVHE: a hypercall; ``enter_vmid_context`` issues DSB ISH (NSH) in place of
  the DSB xSHST, and, as the host calls these with no vCPU loaded at EL2, it
  switches to the guest's VMID and back, each followed by an ISB: 1 more DSB
  xSH, 3 ISBs in all. (The ARM64_WORKAROUND_SPECULATIVE_AT errata paths are
  not modelled.)
* AmpereOne's AC04_CPU_23 workaround (``features.ampere_ac04_cpu_23``, on
  kernels that have it): each HCR_EL2 write gains a DSB NSH and an ISB
  (:func:`s2split.arm64.rules.hcr_erratum_barriers`).

``kvm_tlb_flush_vmid_range()`` splits a range into calls of at most
``MAX_TLBI_RANGE_PAGES`` pages, or falls back to a whole-VMID flush without
FEAT_TLBIRANGE.
"""

from __future__ import annotations

from typing import Any

from ...arm64.arch import LAST_LEVEL
from ...arm64.features import Features
from ...arm64.rules import (MAX_TLBI_RANGE_PAGES, hcr_erratum_barriers, lpa2_range_align,
                            range_tlbi_ops)
from ...counting.counters import (K_DCACHE_BYTES, K_DCACHE_OPS, K_DSB_ISH, K_DSB_ISHST, K_DSB_NSH,
                                  K_DSB_NSHST, K_FLUSH_RANGE, K_FLUSH_RANGE_BYTES, K_HYP_CALL,
                                  K_ICACHE_BYTES, K_ICACHE_OPS, K_ISB, K_TLBI_IPA, K_TLBI_IPA_NSH,
                                  K_TLBI_RANGE, K_TLBI_RANGE_OPS, K_TLBI_RANGE_PAGES, K_TLBI_S1,
                                  K_TLBI_VMID, NOLEVEL, SLOTS)

def _n(kind: int) -> int:
    return kind * SLOTS + NOLEVEL


_DSB_ISHST, _DSB_ISH, _DSB_NSHST, _DSB_NSH = _n(K_DSB_ISHST), _n(K_DSB_ISH), _n(K_DSB_NSHST), \
    _n(K_DSB_NSH)
_ISB, _TLBI_S1, _HYP = _n(K_ISB), _n(K_TLBI_S1), _n(K_HYP_CALL)

#: Barriers of :func:`_vmid_context` (see the module docstring), shared with
#: the fast engine: VHE's leading DSB xSHST and ISBs; nVHE's extra DSB xSH and
#: ISBs.
VHE_DSB_ST, VHE_ISBS = 1, 4
NVHE_DSB, NVHE_ISBS = 1, 3
#: DSBs in the body of each hyp TLB function: by-IPA (both kinds) and range
#: flushes wait for the stage-2 and then the stage-1 invalidation; a whole-VMID
#: flush for its one TLBI.
BODY_DSBS_IPA, BODY_DSBS_VMID = 2, 1


def dsb_ishst(c: list[int], tr: Any = None) -> None:
    c[_DSB_ISHST] += 1
    if tr is not None:
        tr.dsb("ishst")


def _vmid_context(c: list[int], features: Features, body_dsbs: int,
                  local: bool = False) -> None:
    """The call of a hyp TLB function: its body's DSBs and ISB, and the
    barriers of entering and leaving the guest's VMID context."""
    dsb, dsb_st = (_DSB_NSH, _DSB_NSHST) if local else (_DSB_ISH, _DSB_ISHST)
    if features.vhe:
        c[dsb_st] += VHE_DSB_ST
        c[dsb] += body_dsbs
        c[_ISB] += VHE_ISBS
        extra = hcr_erratum_barriers(True, features.ampere_ac04_cpu_23)
        c[_DSB_NSH] += extra
        c[_ISB] += extra
    else:
        c[_HYP] += 1
        c[dsb] += NVHE_DSB + body_dsbs
        c[_ISB] += NVHE_ISBS


def flush_vmid_ipa(c: list[int], features: Features, level: int | None, tr: Any = None,
                   ipa: int = 0) -> None:
    """``__kvm_tlb_flush_vmid_ipa(mmu, ipa, level)``; ``None`` is TLBI_TTL_UNKNOWN.
    ``tr``: an attached TLB model (:mod:`s2split.model.pgtable.tlb_model`), told the
    instructions at ``ipa``."""
    c[K_TLBI_IPA * SLOTS + (NOLEVEL if level is None else level + 1)] += 1
    c[_TLBI_S1] += 1
    _vmid_context(c, features, BODY_DSBS_IPA)
    if tr is not None:
        tr.hyp_flush_ipa(ipa, level)


def flush_vmid_ipa_nsh(c: list[int], features: Features, level: int | None, tr: Any = None,
                       ipa: int = 0) -> None:
    """``__kvm_tlb_flush_vmid_ipa_nsh()``: the local variant used by relax_perms."""
    c[K_TLBI_IPA_NSH * SLOTS + (NOLEVEL if level is None else level + 1)] += 1
    c[_TLBI_S1] += 1
    _vmid_context(c, features, BODY_DSBS_IPA, local=True)
    if tr is not None:
        tr.hyp_flush_ipa(ipa, level, local=True)


def flush_vmid(c: list[int], features: Features, tr: Any = None) -> None:
    """``__kvm_tlb_flush_vmid()``: everything for the VMID, both stages."""
    c[_n(K_TLBI_VMID)] += 1
    _vmid_context(c, features, BODY_DSBS_VMID)
    if tr is not None:
        tr.hyp_flush_vmid()


def flush_vmid_range(c: list[int], features: Features, addr: int, size: int, page_shift: int,
                     lpa2: bool = False, tr: Any = None) -> None:
    """``kvm_tlb_flush_vmid_range(mmu, addr, size)``."""
    c[_n(K_FLUSH_RANGE)] += 1
    c[_n(K_FLUSH_RANGE_BYTES)] += size
    if not features.tlbirange:
        flush_vmid(c, features, tr)
        return
    pages = size >> page_shift
    while pages > 0:
        inval = min(pages, MAX_TLBI_RANGE_PAGES)
        c[_n(K_TLBI_RANGE)] += 1
        c[_n(K_TLBI_RANGE_PAGES)] += inval
        c[_n(K_TLBI_RANGE_OPS)] += range_tlbi_ops(inval, addr >> page_shift,
                                                  lpa2_range_align(page_shift, lpa2))
        c[_TLBI_S1] += 1
        _vmid_context(c, features, BODY_DSBS_IPA)
        if tr is not None:
            tr.hyp_flush_range(addr, inval)
        addr += inval << page_shift
        pages -= inval


def dcache_clean_inval_poc(c: list[int], features: Features, level: int, size: int) -> None:
    """``clean_dcache_guest_page()``: returns at once with FWB, so only counted without."""
    if features.fwb:
        return
    c[K_DCACHE_OPS * SLOTS + level + 1] += 1
    c[K_DCACHE_BYTES * SLOTS + level + 1] += size


def icache_inval_pou(c: list[int], features: Features, level: int, size: int,
                     tr: Any = None) -> None:
    """``invalidate_icache_guest_page()``. A page is invalidated by line
    (``icache_inval_pou``: IC IVAU per line, DSB ISH, ISB; with DIC only the
    ISB). A block is larger than ``MAX_DVM_OPS`` (``PTRS_PER_PTE``) lines
    for any line size, so the whole I-cache goes (``icache_inval_all_pou``:
    IC IALLUIS, counted as one I-cache operation of no bytes, and DSB ISH;
    with DIC nothing at all)."""
    if level < LAST_LEVEL:
        if not features.dic:
            c[K_ICACHE_OPS * SLOTS + level + 1] += 1
            c[_DSB_ISH] += 1
            if tr is not None:
                tr.dsb("ish")
        return
    if not features.dic:
        c[K_ICACHE_OPS * SLOTS + level + 1] += 1
        c[K_ICACHE_BYTES * SLOTS + level + 1] += size
        c[_DSB_ISH] += 1
        if tr is not None:
            tr.dsb("ish")
    c[_ISB] += 1
