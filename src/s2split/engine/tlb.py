"""TLB invalidation, barriers and cache maintenance in the fast engine: the
twin of :mod:`s2split.model.pgtable.tlb`, whose barrier table and range rule it
compiles in (see that module for what each hyp TLB call executes)."""

from __future__ import annotations

from numba import njit

from ..arm64.rules import MAX_TLBI_RANGE_PAGES
from ..counting import counters as C
from ..model.pgtable import tlb as TLB
from . import rules as R
from .state import NOLV, S, count


@njit(cache=True, _nrt=False)
def dsb_ishst(M, op):
    """``dsb(ishst)``: publishing table updates to the walkers."""
    count(M, op, C.K_DSB_ISHST, NOLV, 1)


@njit(cache=True, _nrt=False)
def _vmid_context(M, op, ish, body_dsbs):
    """``enter_vmid_context()``/``exit_vmid_context()`` around a hyp TLB body:
    its DSBs and ISB, and the barriers of entering the guest's VMID context
    (VHE) or the hypercall (nVHE)."""
    dsb = C.K_DSB_ISH if ish else C.K_DSB_NSH
    if M[S.VHE]:
        count(M, op, C.K_DSB_ISHST if ish else C.K_DSB_NSHST, NOLV, TLB.VHE_DSB_ST)
        count(M, op, dsb, NOLV, body_dsbs)
        count(M, op, C.K_ISB, NOLV, TLB.VHE_ISBS)
        extra = R.hcr_erratum_barriers(True, M[S.AC04_CPU_23] != 0)
        count(M, op, C.K_DSB_NSH, NOLV, extra)
        count(M, op, C.K_ISB, NOLV, extra)
    else:
        count(M, op, C.K_HYP_CALL, NOLV, 1)
        count(M, op, dsb, NOLV, TLB.NVHE_DSB + body_dsbs)
        count(M, op, C.K_ISB, NOLV, TLB.NVHE_ISBS)


@njit(cache=True, _nrt=False)
def flush_vmid_ipa(M, op, level):
    """``__kvm_tlb_flush_vmid_ipa(mmu, ipa, level)``; NOLV is TLBI_TTL_UNKNOWN."""
    count(M, op, C.K_TLBI_IPA, level, 1)
    count(M, op, C.K_TLBI_S1, NOLV, 1)
    _vmid_context(M, op, True, TLB.BODY_DSBS_IPA)


@njit(cache=True, _nrt=False)
def flush_vmid_ipa_nsh(M, op, level):
    """``__kvm_tlb_flush_vmid_ipa_nsh()``: the local variant used by relax_perms."""
    count(M, op, C.K_TLBI_IPA_NSH, level, 1)
    count(M, op, C.K_TLBI_S1, NOLV, 1)
    _vmid_context(M, op, False, TLB.BODY_DSBS_IPA)


@njit(cache=True, _nrt=False)
def flush_vmid(M, op):
    """``__kvm_tlb_flush_vmid()``: everything for the VMID, both stages."""
    count(M, op, C.K_TLBI_VMID, NOLV, 1)
    _vmid_context(M, op, True, TLB.BODY_DSBS_VMID)


@njit(cache=True, _nrt=False)
def flush_vmid_range(M, op, addr, size):
    """``kvm_tlb_flush_vmid_range(mmu, addr, size)``."""
    count(M, op, C.K_FLUSH_RANGE, NOLV, 1)
    count(M, op, C.K_FLUSH_RANGE_BYTES, NOLV, size)
    if not M[S.TLBIRANGE]:
        flush_vmid(M, op)
        return
    ps = M[S.PAGE_SHIFT]
    pages = size >> ps
    align = R.lpa2_range_align(ps, M[S.LPA2] != 0)
    while pages > 0:
        inval = min(pages, MAX_TLBI_RANGE_PAGES)
        count(M, op, C.K_TLBI_RANGE, NOLV, 1)
        count(M, op, C.K_TLBI_RANGE_PAGES, NOLV, inval)
        count(M, op, C.K_TLBI_RANGE_OPS, NOLV, R.range_tlbi_ops(inval, addr >> ps, align))
        count(M, op, C.K_TLBI_S1, NOLV, 1)
        _vmid_context(M, op, True, TLB.BODY_DSBS_IPA)
        addr += inval << ps
        pages -= inval


@njit(cache=True, _nrt=False)
def dcache_clean_inval_poc(M, op, level, size):
    """``clean_dcache_guest_page()``: nothing with FWB."""
    if M[S.FWB]:
        return
    count(M, op, C.K_DCACHE_OPS, level, 1)
    count(M, op, C.K_DCACHE_BYTES, level, size)


@njit(cache=True, _nrt=False)
def icache_inval_pou(M, op, level, size):
    """``invalidate_icache_guest_page()``: by line for a page, the whole
    I-cache for a block."""
    if level < 3:
        if not M[S.DIC]:
            count(M, op, C.K_ICACHE_OPS, level, 1)
            count(M, op, C.K_DSB_ISH, NOLV, 1)
        return
    if not M[S.DIC]:
        count(M, op, C.K_ICACHE_OPS, level, 1)
        count(M, op, C.K_ICACHE_BYTES, level, size)
        count(M, op, C.K_DSB_ISH, NOLV, 1)
    count(M, op, C.K_ISB, NOLV, 1)
