"""The fast engine's compiled kernels (numba).

The same semantics and the same counters as the reference engine, over numpy
arrays instead of Python objects. numba cannot cache (mutually) recursive
functions, so the walker is iterative with an explicit stack, and the two
nested walks the stage-2 code makes -- ``create_unlinked`` filling a fresh
table and ``free_unlinked`` dropping a detached one -- are written as
specialised loops. Every rule restated here is pinned to the reference by
the differential tests (``tests/test_differential.py`` through the workload,
``tests/test_differential_ops.py`` operation by operation); ``create_unlinked``
fills at most two levels, all that splitting a block needs.

All state lives in three int64 arrays, passed to every kernel: ``T`` (table
entries, one row per table page), ``M`` (scalars, counters, scratch and the
variable-size regions -- reference counts, the free-page stack, caches, vCPU
registers, memslots -- at offsets kept in ``M`` itself) and ``B`` (dirty
bitmaps). Few, flat arguments keep the compiled code small; a tuple of many
arrays made compilation several times slower, and nothing here allocates, so
the kernels run without numba's reference counting (``_nrt=False``). No entry
uses bit 63.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import counters as C
from .. import errors as E
from .. import pte as P
from ..kvm.mmu import VCPU_CACHE_CAPACITY
from ..memstress import PRNG_MODULUS, PRNG_MULTIPLIER
from ..pgtable import tlb as TLB
from ..pgtable import walker as W
from ..uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_MEM_READONLY

# --- M: fixed part ----------------------------------------------------------------
S_PTRS, S_PS, S_BPL, S_START, S_PGDP, S_IPA, S_FMT, S_NEXT, S_FTOP, S_CAP, S_VHE, S_FWB, \
    S_RANGE, S_DIC, S_MINBLK, S_CHUNK, S_SCN, S_SCCAP, S_MANUAL, S_NSLOTS, S_NVCPU, \
    S_HOSTVA, S_LASTSLOT, S_PHYSBITS, S_TABLE_BASE, S_LEVELS, S_LPA2, \
    S_REFC, S_FSTACK, S_VCACHE, S_VCN, S_VREGS, S_SCACHE, S_SLOTS = range(34)
S_FREECLEAR, S_CHUNKDESTROY = 34, 35  # the kernel rules of versions.py
S_GPS = 36  # the guest's page shift: memstress's stride (the stage-2's is S_PS)
S_VF0 = 40  # variant walk flags per operation: M[S_VF0 + op]
NS = S_VF0 + C.NOPS + 5
CNT0 = NS  # counters: M[CNT0 + index]
W0 = CNT0 + C.SIZE  # walk state
NW = 16
K0 = W0 + NW  # walker stack: rows pfn / idx / saved entry, 8 deep
K20 = K0 + 24  # free_unlinked's stack
ROOT0 = K20 + 24
FIXED = ROOT0 + 16

# --- memslot columns ------------------------------------------------------------------
C_BASE, C_NPAGES, C_FLAGS, C_HVA, C_HPA, C_KIND, C_PAGESZ, C_HCLASS, C_BMOFF, C_HASBM, \
    C_ACTIVE, C_SIZE, C_ID = range(13)
NCOL = 13
KIND_ANON, KIND_THP, KIND_HUGETLB = 0, 1, 2
HC_NONE, HC_PUD, HC_CONT_PMD, HC_PMD, HC_CONT_PTE = 0, 1, 2, 3, 4
HCLASS = {"pud": HC_PUD, "cont_pmd": HC_CONT_PMD, "pmd": HC_PMD, "cont_pte": HC_CONT_PTE}
VCACHE_CAP = VCPU_CACHE_CAPACITY  # KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE

# --- walk state (M[W0 + ...]) ------------------------------------------------------------
W_ADDR, W_START, W_END, W_FLAGS, W_OP, W_BUILT, W_A0, W_A1, W_A2, W_A3 = range(10)
MC_NONE = -1
MC_SPLIT = -2

# --- constants ------------------------------------------------------------------------
# The reference engine's own constants (numba freezes module globals at compile time).
LEAF, PRE, POST, SHARED = W.LEAF, W.TABLE_PRE, W.TABLE_POST, W.SHARED
HANDLE_FAULT, SKIP_BBM, SKIP_CMO = W.HANDLE_FAULT, W.SKIP_BBM_TLBI, W.SKIP_CMO
SKIP_NEW, HINTS, SKIP_LEVEL_BASE = W.SKIP_NEW_CHILDREN, W.RETURN_HINTS, W.SKIP_LEVEL_BASE
HINT_SIBLINGS, HINT_CHILDREN = W.HINT_SKIP_SIBLINGS, W.HINT_SKIP_CHILDREN
DESCEND = 1 << 40
TABLE_DONE = 1 << 41
EAGAIN, ENOMEM, E2BIG, EINVAL, ERANGE = E.EAGAIN, E.ENOMEM, E.E2BIG, E.EINVAL, E.ERANGE
NK = C.NKINDS
SL = C.SLOTS
NL = C.NOLEVEL
MAX_TLBI_RANGE_PAGES = TLB.MAX_TLBI_RANGE_PAGES
PRNG_A, PRNG_M = PRNG_MULTIPLIER, PRNG_MODULUS
NOLV = -2  # "no level" (TLBI_TTL_UNKNOWN, walk totals): the NOLEVEL slot

VALID = P.VALID
TYPE = P.TYPE
LOCKED = P.LOCKED
ATTR_MASK = P.ATTR_LO_MASK | P.ATTR_HI_MASK
SW_MASK = P.SW_MASK
S2_PERMS = P.S2_PERMS
S2AP_R = P.S2AP_R
S2AP_W = P.S2AP_W
XN = P.XN
AF = P.AF
MEMATTR_MASK = P.MEMATTR_MASK
SH_INNER_BITS = P.SH_INNER << P.SH_SHIFT
NORMAL_FWB = P.MT_S2_FWB_NORMAL << P.MEMATTR_SHIFT
NORMAL_NOFWB = P.MT_S2_NORMAL << P.MEMATTR_SHIFT
DEVICE_FWB, DEVICE_NOFWB = P.memattr("DEVICE_nGnRE", True), P.memattr("DEVICE_nGnRE", False)
NC_FWB, NC_NOFWB = P.memattr("NORMAL_NC", True), P.memattr("NORMAL_NC", False)
PROT_DEVICE, PROT_NC = int(P.Prot.DEVICE), int(P.Prot.NORMAL_NC)
PROT_X, PROT_W, PROT_R = int(P.Prot.X), int(P.Prot.W), int(P.Prot.R)

(OP_MAP, OP_UNMAP, OP_WRPROTECT, OP_RELAX, OP_SPLIT, OP_CU, OP_FU, OP_DESTROY, OP_INIT,
 OP_GET_LEAF, OP_KVM) = range(C.NOPS)

K_LOOPS, K_RT, K_RL, K_RI, K_RELOAD = C.K_LOOPS, C.K_READ_TABLE, C.K_READ_LEAF, \
    C.K_READ_INVALID, C.K_RELOAD
K_VL, K_VPRE, K_VPOST, K_DESC = C.K_VISIT_LEAF, C.K_VISIT_PRE, C.K_VISIT_POST, C.K_DESCENT
K_SKL, K_SKC, K_SKS = C.K_SKIP_LEVEL, C.K_SKIP_CHILDREN, C.K_SKIP_SIBLINGS
K_WR, K_CAS, K_BBM, K_GET, K_PUT = C.K_PTE_WRITE, C.K_PTE_CAS, C.K_BBM, C.K_GET_PAGE, \
    C.K_PUT_PAGE
K_TAKEN, K_FREED = C.K_PAGE_TAKEN, C.K_PAGE_FREED


@njit(cache=True, inline="always", _nrt=False)
def add(M, op, kind, level, n):
    """Count ``n`` of ``(op, kind, level)``; level NOLV means no level."""
    M[CNT0 + (op * NK + kind) * SL + (NL if level == NOLV else level + 1)] += n


@njit(cache=True, inline="always", _nrt=False)
def shift(M, level):
    return M[S_BPL] * (4 - level) + 3


@njit(cache=True, inline="always", _nrt=False)
def gsize(M, level):
    return np.int64(1) << (M[S_BPL] * (4 - level) + 3)


# --- descriptors ------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def pte_phys(M, pte):
    ps = M[S_PS]
    if M[S_FMT] == 2:  # LPA2: OA[49:ps] in place, OA[51:50] in [9:8]
        return (pte & (((np.int64(1) << 50) - 1) & ~((np.int64(1) << ps) - 1))) | \
            (((pte >> 8) & 3) << 50)
    pa = pte & (((np.int64(1) << 48) - 1) & ~((np.int64(1) << ps) - 1))
    if M[S_FMT] == 1:  # 64K pages: OA[51:48] in [15:12]
        pa |= ((pte >> 12) & 0xF) << 48
    return pa


@njit(cache=True, _nrt=False)
def phys_pte(M, pa):
    ps = M[S_PS]
    if M[S_FMT] == 2:
        return (pa & (((np.int64(1) << 50) - 1) & ~((np.int64(1) << ps) - 1))) | \
            (((pa >> 50) & 3) << 8)
    pte = pa & (((np.int64(1) << 48) - 1) & ~((np.int64(1) << ps) - 1))
    if M[S_FMT] == 1:
        pte |= ((pa >> 48) & 0xF) << 12
    return pte


@njit(cache=True, _nrt=False)
def pfn_of(M, pte):
    return (pte_phys(M, pte) - M[S_TABLE_BASE]) >> M[S_PS]


@njit(cache=True, _nrt=False)
def table_pte(M, pfn):
    return phys_pte(M, M[S_TABLE_BASE] + (pfn << M[S_PS])) | TYPE | VALID


@njit(cache=True, _nrt=False)
def leaf_pte(M, pa, attr, level):
    pte = phys_pte(M, pa) | (attr & ATTR_MASK) | VALID
    if level == 3:
        pte |= TYPE
    return pte


@njit(cache=True, inline="always", _nrt=False)
def is_table(pte, level):
    return level < 3 and (pte & 3) == 3


@njit(cache=True, inline="always", _nrt=False)
def normal_memattr(M):
    return NORMAL_FWB if M[S_FWB] else NORMAL_NOFWB


@njit(cache=True, _nrt=False)
def prot_to_attr(M, prot):
    """``stage2_set_prot_attr()``: the attribute bits, or a negative errno."""
    kind = prot & (PROT_DEVICE | PROT_NC)
    if kind == PROT_DEVICE | PROT_NC:
        return -EINVAL
    if kind and prot & PROT_X:
        return -EINVAL  # no executable Device or Non-cacheable memory
    if kind == PROT_DEVICE:
        attr = DEVICE_FWB if M[S_FWB] else DEVICE_NOFWB
    elif kind == PROT_NC:
        attr = NC_FWB if M[S_FWB] else NC_NOFWB
    else:
        attr = normal_memattr(M)
    if not prot & PROT_X:
        attr |= XN
    if prot & PROT_R:
        attr |= S2AP_R
    if prot & PROT_W:
        attr |= S2AP_W
    if not M[S_LPA2]:
        attr |= SH_INNER_BITS
    attr |= AF
    attr |= prot & SW_MASK
    return attr


@njit(cache=True, _nrt=False)
def pte_prot(pte):
    """``kvm_pgtable_stage2_pte_prot()``."""
    prot = pte & SW_MASK
    if not pte & VALID:
        return prot
    if pte & S2AP_R:
        prot |= PROT_R
    if pte & S2AP_W:
        prot |= PROT_W
    if not pte & XN:
        prot |= PROT_X
    return prot


@njit(cache=True, _nrt=False)
def needs_update(old, new):
    if not old & VALID or not new & VALID:
        return True
    return ((old ^ new) & ~S2_PERMS) != 0


# --- table pages and caches ------------------------------------------------------------
@njit(cache=True, _nrt=False)
def page_alloc(T, M):
    if M[S_FTOP] > 0:
        M[S_FTOP] -= 1
        pfn = M[M[S_FSTACK] + M[S_FTOP]]
    else:
        pfn = M[S_NEXT]
        # FastVM sizes table memory for the worst case; running out means that
        # bound is wrong, and carrying on would write over the last page.
        assert pfn < M[S_CAP], "fast engine: table memory exhausted"
        M[S_NEXT] += 1
    T[pfn, :] = 0
    M[M[S_REFC] + pfn] = 1
    return pfn


@njit(cache=True, _nrt=False)
def page_free(M, pfn):
    M[M[S_REFC] + pfn] = 0
    M[M[S_FSTACK] + M[S_FTOP]] = pfn
    M[S_FTOP] += 1


@njit(cache=True, _nrt=False)
def get_page(M, op, pfn, level):
    M[M[S_REFC] + pfn] += 1
    add(M, op, K_GET, level, 1)


@njit(cache=True, _nrt=False)
def put_page(M, op, pfn, level):
    add(M, op, K_PUT, level, 1)
    r = M[S_REFC] + pfn
    M[r] -= 1
    if M[r] == 0:
        page_free(M, pfn)
        add(M, op, K_FREED, level, 1)


@njit(cache=True, _nrt=False)
def cache_n(M, mc):
    if mc == MC_SPLIT:
        return M[S_SCN]
    if mc < 0:
        return 0
    return M[M[S_VCN] + mc]


@njit(cache=True, _nrt=False)
def cache_alloc(M, mc):
    """``kvm_mmu_memory_cache_alloc()``: last in, first out; -1 when empty."""
    if mc == MC_SPLIT:
        if M[S_SCN] == 0:
            return -1
        M[S_SCN] -= 1
        return M[M[S_SCACHE] + M[S_SCN]]
    if mc < 0:
        return -1
    n = M[S_VCN] + mc
    if M[n] == 0:
        return -1
    M[n] -= 1
    return M[M[S_VCACHE] + mc * VCACHE_CAP + M[n]]


@njit(cache=True, _nrt=False)
def cache_topup(T, M, mc, capacity, minimum):
    """``__kvm_mmu_topup_memory_cache()``: fill to capacity when below minimum."""
    if cache_n(M, mc) >= minimum:
        return 0
    added = 0
    if mc == MC_SPLIT:
        if M[S_SCCAP] == 0:
            M[S_SCCAP] = capacity
        while M[S_SCN] < M[S_SCCAP]:
            M[M[S_SCACHE] + M[S_SCN]] = page_alloc(T, M)
            M[S_SCN] += 1
            added += 1
    else:
        n = M[S_VCN] + mc
        while M[n] < capacity:
            M[M[S_VCACHE] + mc * VCACHE_CAP + M[n]] = page_alloc(T, M)
            M[n] += 1
            added += 1
    return added


@njit(cache=True, _nrt=False)
def cache_free_all(T, M, mc):
    freed = 0
    while True:
        pfn = cache_alloc(M, mc)
        if pfn < 0:
            break
        r = M[S_REFC] + pfn
        M[r] -= 1
        if M[r] == 0:
            page_free(M, pfn)
        freed += 1
    if mc == MC_SPLIT:
        M[S_SCCAP] = 0
    return freed


# --- TLB maintenance, barriers, cache maintenance (as in pgtable/tlb.py) -----------------
@njit(cache=True, _nrt=False)
def _vmid_context(M, op, ish, body_dsbs):
    """tlb._vmid_context: the body's DSBs and ISB, and entering and leaving
    the guest's VMID context (VHE) or the hypercall (nVHE)."""
    dsb = C.K_DSB_ISH if ish else C.K_DSB_NSH
    if M[S_VHE]:
        add(M, op, C.K_DSB_ISHST if ish else C.K_DSB_NSHST, NOLV, TLB.VHE_DSB_ST)
        add(M, op, dsb, NOLV, body_dsbs)
        add(M, op, C.K_ISB, NOLV, TLB.VHE_ISBS)
    else:
        add(M, op, C.K_HYP_CALL, NOLV, 1)
        add(M, op, dsb, NOLV, TLB.NVHE_DSB + body_dsbs)
        add(M, op, C.K_ISB, NOLV, TLB.NVHE_ISBS)


@njit(cache=True, _nrt=False)
def flush_vmid_ipa(M, op, level):
    add(M, op, C.K_TLBI_IPA, level, 1)
    add(M, op, C.K_TLBI_S1, NOLV, 1)
    _vmid_context(M, op, True, TLB.BODY_DSBS_IPA)


@njit(cache=True, _nrt=False)
def flush_vmid_ipa_nsh(M, op, level):
    add(M, op, C.K_TLBI_IPA_NSH, level, 1)
    add(M, op, C.K_TLBI_S1, NOLV, 1)
    _vmid_context(M, op, False, TLB.BODY_DSBS_IPA)


@njit(cache=True, _nrt=False)
def flush_vmid(M, op):
    add(M, op, C.K_TLBI_VMID, NOLV, 1)
    _vmid_context(M, op, True, TLB.BODY_DSBS_VMID)


@njit(cache=True, _nrt=False)
def range_tlbi_ops(pages, start_page, lpa2_align):
    ops = 0
    scale = 3
    addr = start_page
    while pages > 0:
        if pages == 1 or (lpa2_align != 0 and addr % lpa2_align != 0):
            ops += 1
            addr += 1
            pages -= 1
            continue
        unit = np.int64(1) << (5 * scale + 1)
        num = min(pages, 32 * unit) // unit - 1
        if num >= 0:
            ops += 1
            addr += (num + 1) * unit
            pages -= (num + 1) * unit
        scale -= 1
    return ops


@njit(cache=True, _nrt=False)
def flush_vmid_range(M, op, addr, size):
    add(M, op, C.K_FLUSH_RANGE, NOLV, 1)
    add(M, op, C.K_FLUSH_RANGE_BYTES, NOLV, size)
    if not M[S_RANGE]:
        flush_vmid(M, op)
        return
    ps = M[S_PS]
    pages = size >> ps
    align = ((np.int64(1) << 16) >> ps) if M[S_LPA2] else 0
    while pages > 0:
        inval = min(pages, MAX_TLBI_RANGE_PAGES)
        add(M, op, C.K_TLBI_RANGE, NOLV, 1)
        add(M, op, C.K_TLBI_RANGE_PAGES, NOLV, inval)
        add(M, op, C.K_TLBI_RANGE_OPS, NOLV, range_tlbi_ops(inval, addr >> ps, align))
        add(M, op, C.K_TLBI_S1, NOLV, 1)
        _vmid_context(M, op, True, TLB.BODY_DSBS_IPA)
        addr += inval << ps
        pages -= inval


@njit(cache=True, _nrt=False)
def dcache(M, op, level, size):
    if M[S_FWB]:
        return
    add(M, op, C.K_DCACHE_OPS, level, 1)
    add(M, op, C.K_DCACHE_BYTES, level, size)


@njit(cache=True, _nrt=False)
def icache(M, op, level, size):
    """tlb.icache_inval_pou: by line for a page, the whole I-cache for a block."""
    if level < 3:
        if not M[S_DIC]:
            add(M, op, C.K_ICACHE_OPS, level, 1)
            add(M, op, C.K_DSB_ISH, NOLV, 1)
        return
    if not M[S_DIC]:
        add(M, op, C.K_ICACHE_OPS, level, 1)
        add(M, op, C.K_ICACHE_BYTES, level, size)
        add(M, op, C.K_DSB_ISH, NOLV, 1)
    add(M, op, C.K_ISB, NOLV, 1)


@njit(cache=True, _nrt=False)
def result(M, op, ret):
    if ret == -EAGAIN:
        add(M, op, C.K_EAGAIN, NOLV, 1)
    elif ret != 0:
        add(M, op, C.K_ERRORS, NOLV, 1)
    return ret


# --- entries: set, break, make -----------------------------------------------------------
@njit(cache=True, _nrt=False)
def set_pte(T, M, op, flags, pfn, idx, new, level):
    T[pfn, idx] = new
    add(M, op, K_CAS if flags & SHARED else K_WR, level, 1)


@njit(cache=True, _nrt=False)
def try_break(T, M, op, flags, addr, pfn, idx, old, level):
    """``stage2_try_break_pte()``."""
    if not old & VALID and old & LOCKED:
        return False
    set_pte(T, M, op, flags, pfn, idx, LOCKED, level)
    add(M, op, K_BBM, level, 1)
    if not flags & SKIP_BBM:
        if is_table(old, level):
            size = gsize(M, level)
            flush_vmid_range(M, op, addr & ~(size - 1), size)
        elif old & VALID:
            flush_vmid_ipa(M, op, level)
    if old != 0:
        put_page(M, op, pfn, level)
    return True


@njit(cache=True, _nrt=False)
def make_pte(T, M, op, pfn, idx, new, level):
    if new != 0:
        get_page(M, op, pfn, level)
    T[pfn, idx] = new
    add(M, op, K_WR, level, 1)


# --- free_unlinked: drop a detached subtree (free walker, LEAF | TABLE_POST) ----------------
@njit(cache=True, _nrt=False)
def free_unlinked(T, M, pfn, level):
    """``kvm_pgtable_stage2_free_unlinked()``: the free walker over all entries of
    a detached table at ``level + 1`` and below, then the table itself."""
    op = OP_FU
    ptrs = M[S_PTRS]
    add(M, op, C.K_CALLS, level, 1)
    d = 0
    lv0 = level + 1
    M[K20] = pfn
    M[K20 + 8] = 0
    if lv0 <= 3:  # below level 3 the walker refuses at once
        add(M, op, K_LOOPS, lv0, 1)
    while lv0 <= 3:
        L = lv0 + d
        i = M[K20 + 8 + d]
        if i >= ptrs:
            if d == 0:
                break
            d -= 1
            L = lv0 + d
            # TABLE_POST on the parent entry, then the free visitor's puts.
            old = M[K20 + 16 + d]
            add(M, op, K_VPOST, L, 1)
            child = pfn_of(M, old)
            if not M[S_FREECLEAR]:
                put_page(M, op, M[K20 + d], L)
                put_page(M, op, child, L + 1)
            elif M[M[S_REFC] + child] == 1:
                put_page(M, op, M[K20 + d], L)
                put_page(M, op, child, L + 1)
                T[M[K20 + d], M[K20 + 8 + d]] = 0
                add(M, op, K_WR, L, 1)
            M[K20 + 8 + d] += 1
            continue
        old = T[M[K20 + d], i]
        if is_table(old, L):
            add(M, op, K_RT, L, 1)
            add(M, op, K_DESC, L, 1)
            M[K20 + 16 + d] = old
            d += 1
            M[K20 + d] = pfn_of(M, old)
            M[K20 + 8 + d] = 0
            add(M, op, K_LOOPS, L + 1, 1)
            continue
        add(M, op, K_RL if old & VALID else K_RI, L, 1)
        add(M, op, K_VL, L, 1)
        if old != 0:
            put_page(M, op, M[K20 + d], L)
        add(M, op, K_RELOAD, L, 1)
        M[K20 + 8 + d] = i + 1
    put_page(M, op, pfn, level + 1)


# --- create_unlinked: fill a fresh table with the map visitor --------------------------------
@njit(cache=True, _nrt=False)
def _fill_leaves(T, M, op, pfn, pa, attr, L):
    """The map visitor installing a leaf in every (zeroed) entry of an unlinked
    table: for each entry, an invalid read, a LEAF visit, the lock write, the
    reference and the publishing write, the re-read. Counted per table."""
    ptrs = M[S_PTRS]
    g = gsize(M, L)
    for i in range(ptrs):
        T[pfn, i] = leaf_pte(M, pa + i * g, attr, L)
    M[M[S_REFC] + pfn] += ptrs
    for kind in (K_RI, K_VL, K_BBM, K_GET, K_RELOAD):
        add(M, op, kind, L, ptrs)
    add(M, op, K_WR, L, 2 * ptrs)


@njit(cache=True, _nrt=False)
def _fill(T, M, pfn, L, phys, attr, force, mc):
    """The map walker (LEAF | SKIP_BBM_TLBI | SKIP_CMO) over every entry of a
    zeroed table at level ``L``: a leaf where a block of this level is allowed,
    otherwise a new table from the cache, filled one level down. Returns 0 or
    a negative errno."""
    op = OP_CU
    if L > 3:
        return -EINVAL  # a level-3 "block" has no table below it: the walker refuses
    ptrs = M[S_PTRS]
    g = gsize(M, L)
    add(M, op, K_LOOPS, L, 1)
    if not (force and L < 3) and L >= M[S_MINBLK]:
        _fill_leaves(T, M, op, pfn, phys, attr, L)
        return 0
    for i in range(ptrs):
        pa = phys + i * g
        add(M, op, K_RI, L, 1)
        add(M, op, K_VL, L, 1)
        if L == 3:
            add(M, op, K_RELOAD, L, 1)
            return -EINVAL
        child = cache_alloc(M, mc)
        if child < 0:
            add(M, op, K_RELOAD, L, 1)
            return -ENOMEM
        add(M, op, K_TAKEN, L, 1)
        set_pte(T, M, op, 0, pfn, i, LOCKED, L)
        add(M, op, K_BBM, L, 1)
        make_pte(T, M, op, pfn, i, table_pte(M, child), L)
        add(M, op, K_RELOAD, L, 1)
        add(M, op, K_DESC, L, 1)
        # One level down is level 3 here: every entry becomes a page.
        add(M, op, K_LOOPS, L + 1, 1)
        _fill_leaves(T, M, op, child, pa, attr, L + 1)
    return 0


@njit(cache=True, _nrt=False)
def create_unlinked(T, M, phys, level, prot, mc, force):
    """``kvm_pgtable_stage2_create_unlinked()``: a table page or a negative errno."""
    op = OP_CU
    add(M, op, C.K_CALLS, level, 1)
    if force:
        add(M, op, C.K_CALLS_FORCE_PTE, level, 1)
    if phys & (gsize(M, level) - 1):
        return result(M, op, -EINVAL)
    attr = prot_to_attr(M, prot)
    if attr < 0:
        return result(M, op, attr)
    pgtable = cache_alloc(M, mc)
    if pgtable < 0:
        return result(M, op, -ENOMEM)
    add(M, op, K_TAKEN, level, 1)
    ret = _fill(T, M, pgtable, level + 1, phys, attr, force, mc)
    if ret != 0:
        free_unlinked(T, M, pgtable, level)
        return result(M, op, ret)
    return pgtable


# --- visitors ------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _map_phys(M):
    phys = M[W0 + W_A0]
    if phys >= (np.int64(1) << M[S_PHYSBITS]):
        return phys
    return phys + (M[W0 + W_ADDR] - M[W0 + W_START])


@njit(cache=True, _nrt=False)
def _leaf_allowed(M, level):
    if M[W0 + W_A3] and level < 3:  # force_pte
        return False
    if level < M[S_MINBLK]:
        return False
    g = gsize(M, level)
    if g > M[W0 + W_END] - M[W0 + W_ADDR]:
        return False
    phys = _map_phys(M)
    if phys < (np.int64(1) << M[S_PHYSBITS]) and phys & (g - 1):
        return False
    return (M[W0 + W_ADDR] & (g - 1)) == 0


@njit(cache=True, _nrt=False)
def _try_leaf(T, M, op, pfn, idx, old, level):
    """``stage2_map_walker_try_leaf()``."""
    flags = M[W0 + W_FLAGS]
    if not _leaf_allowed(M, level):
        return -E2BIG
    new = leaf_pte(M, _map_phys(M), M[W0 + W_A1], level)
    if not needs_update(old, new):
        return -EAGAIN
    if not flags & SHARED and ((old ^ new) & ~SW_MASK) == 0:
        if (old != 0) != (new != 0):
            if old != 0:
                put_page(M, op, pfn, level)
            else:
                get_page(M, op, pfn, level)
        set_pte(T, M, op, flags, pfn, idx, new, level)
        return 0
    if not try_break(T, M, op, flags, M[W0 + W_ADDR], pfn, idx, old, level):
        return -EAGAIN
    g = gsize(M, level)
    if not flags & SKIP_CMO:
        if new & VALID and (new & MEMATTR_MASK) == normal_memattr(M):
            dcache(M, op, level, g)
        if new & VALID and not new & XN:
            icache(M, op, level, g)
    make_pte(T, M, op, pfn, idx, new, level)
    return 0


@njit(cache=True, _nrt=False)
def _map_visitor(T, M, pfn, idx, old, level, visit):
    op = M[W0 + W_OP]
    if visit == PRE:
        child = pfn_of(M, old)
        if not _leaf_allowed(M, level):
            return 0
        ret = _try_leaf(T, M, op, pfn, idx, old, level)
        if ret != 0:
            return ret
        free_unlinked(T, M, child, level)
        return 0
    ret = _try_leaf(T, M, op, pfn, idx, old, level)
    if ret != -E2BIG:
        return ret
    if level == 3:
        return -EINVAL
    mc = M[W0 + W_A2]
    if mc == MC_NONE:
        return -ENOMEM
    child = cache_alloc(M, mc)
    if child < 0:
        return -ENOMEM
    add(M, op, K_TAKEN, level, 1)
    if not try_break(T, M, op, M[W0 + W_FLAGS], M[W0 + W_ADDR], pfn, idx, old, level):
        # Another walker holds the entry: the new table goes back unused
        # (mm_ops->put_page(childp), uncounted as in the reference).
        r = M[S_REFC] + child
        M[r] -= 1
        if M[r] == 0:
            page_free(M, child)
        return -EAGAIN
    make_pte(T, M, op, pfn, idx, table_pte(M, child), level)
    return 0


@njit(cache=True, _nrt=False)
def _unmap_visitor(T, M, pfn, idx, old, level, visit):
    op = M[W0 + W_OP]
    if not old & VALID:
        if old != 0:
            T[pfn, idx] = 0
            add(M, op, K_WR, level, 1)
            put_page(M, op, pfn, level)
        return 0
    child = -1
    need_flush = False
    if is_table(old, level):
        child = pfn_of(M, old)
        if M[M[S_REFC] + child] != 1:
            return 0
    elif (old & MEMATTR_MASK) == normal_memattr(M):
        need_flush = not M[S_FWB]
    # stage2_unmap_put_pte()
    T[pfn, idx] = 0
    add(M, op, K_WR, level, 1)
    if is_table(old, level):
        flush_vmid_ipa(M, op, NOLV)
    elif not (M[S_RANGE] and M[S_FWB]):
        flush_vmid_ipa(M, op, level)
    put_page(M, op, pfn, level)
    if need_flush:
        dcache(M, op, level, gsize(M, level))
    if child >= 0:
        put_page(M, op, child, level + 1)
    return 0


@njit(cache=True, _nrt=False)
def _attr_visitor(T, M, pfn, idx, old, level, visit):
    if not old & VALID:
        return -EAGAIN
    M[W0 + W_A3] = level  # for relax_perms' TLBI
    new = (old & ~M[W0 + W_A1]) | M[W0 + W_A0]
    if new != old:
        if not new & XN and old & XN:
            icache(M, M[W0 + W_OP], level, gsize(M, level))
        set_pte(T, M, M[W0 + W_OP], M[W0 + W_FLAGS], pfn, idx, new, level)
    return 0


@njit(cache=True, _nrt=False)
def _split_visitor(T, M, pfn, idx, old, level, visit):
    flags = M[W0 + W_FLAGS]
    if level == 3:
        return HINT_SIBLINGS if flags & HINTS else 0
    if not old & VALID:
        return 0
    if level == 1:
        nr = M[S_PTRS] + 1
    elif level == 2:
        nr = 1
    else:
        return -EINVAL
    n = M[S_SCN]
    force = n >= nr
    if not force:
        nr = 1
    if n < nr:
        return -ENOMEM
    child = create_unlinked(T, M, pte_phys(M, old), level, pte_prot(old), MC_SPLIT, force)
    if child < 0:
        return child
    try_break(T, M, OP_SPLIT, flags, M[W0 + W_ADDR], pfn, idx, old, level)
    make_pte(T, M, OP_SPLIT, pfn, idx, table_pte(M, child), level)
    if force:
        if flags & SKIP_NEW:
            M[W0 + W_BUILT] = 1
        if flags & HINTS:
            return HINT_CHILDREN
    return 0


@njit(cache=True, _nrt=False)
def _free_visitor(T, M, pfn, idx, old, level, visit):
    if old == 0:
        return 0
    op = M[W0 + W_OP]
    if M[S_FREECLEAR]:
        # 6.19+: a table goes only once empty, and its entry is cleared.
        if visit == LEAF:
            put_page(M, op, pfn, level)
            return 0
        if visit != POST:
            return -EINVAL
        child = pfn_of(M, old)
        if M[M[S_REFC] + child] != 1:
            return 0
        put_page(M, op, pfn, level)
        put_page(M, op, child, level + 1)
        T[pfn, idx] = 0
        add(M, op, K_WR, level, 1)
        return 0
    put_page(M, op, pfn, level)
    if is_table(old, level):
        put_page(M, op, pfn_of(M, old), level + 1)
    return 0


@njit(cache=True, _nrt=False)
def call_visitor(T, M, pfn, idx, old, level, visit):
    op = M[W0 + W_OP]
    if op == OP_MAP:
        return _map_visitor(T, M, pfn, idx, old, level, visit)
    if op == OP_SPLIT:
        return _split_visitor(T, M, pfn, idx, old, level, visit)
    if op == OP_WRPROTECT or op == OP_RELAX:
        return _attr_visitor(T, M, pfn, idx, old, level, visit)
    if op == OP_UNMAP:
        return _unmap_visitor(T, M, pfn, idx, old, level, visit)
    return _free_visitor(T, M, pfn, idx, old, level, visit)


# --- the walker ------------------------------------------------------------------------
@njit(cache=True, inline="always", _nrt=False)
def walk_continue(flags, ret):
    if ret == -EAGAIN:
        return not flags & HANDLE_FAULT
    return ret == 0


@njit(cache=True, _nrt=False)
def _advance(M, level):
    g = gsize(M, level)
    M[W0 + W_ADDR] = (M[W0 + W_ADDR] & ~(g - 1)) + g


@njit(cache=True, _nrt=False)
def _visit(T, M, d, level):
    """``__kvm_pgtable_visit()`` for the entry at stack depth ``d``. Returns 0,
    DESCEND (the child is in the stack at depth d + 1), TABLE_DONE or an error."""
    op = M[W0 + W_OP]
    flags = M[W0 + W_FLAGS]
    pfn = M[K0 + d]
    idx = M[K0 + 8 + d]
    old = T[pfn, idx]
    table = is_table(old, level)
    if table:
        add(M, op, K_RT, level, 1)
    elif old & VALID:
        add(M, op, K_RL, level, 1)
    else:
        add(M, op, K_RI, level, 1)
    ret = 0
    called = False
    if table:
        if flags & PRE:
            add(M, op, K_VPRE, level, 1)
            ret = call_visitor(T, M, pfn, idx, old, level, PRE)
            called = True
    elif flags & LEAF:
        add(M, op, K_VL, level, 1)
        ret = call_visitor(T, M, pfn, idx, old, level, LEAF)
        called = True
    if called:
        old = T[pfn, idx]
        add(M, op, K_RELOAD, level, 1)
        table = is_table(old, level)
    skip_new = False
    if ret > 0:
        if ret == HINT_SIBLINGS:
            add(M, op, K_SKS, level, 1)
            _advance(M, level - 1)
            return TABLE_DONE
        skip_new = ret == HINT_CHILDREN
        ret = 0
    if M[W0 + W_BUILT]:
        M[W0 + W_BUILT] = 0
        skip_new = True
    if not walk_continue(flags, ret):
        return ret
    if not table:
        _advance(M, level)
        return 0
    if skip_new or flags & (np.int64(1) << (SKIP_LEVEL_BASE + level + 1)):  # skip_level(child)
        add(M, op, K_SKC if skip_new else K_SKL, level, 1)
        _advance(M, level)
        if flags & POST:
            add(M, op, K_VPOST, level, 1)
            ret = call_visitor(T, M, pfn, idx, old, level, POST)
            return 0 if walk_continue(flags, ret) else ret
        return 0
    add(M, op, K_DESC, level, 1)
    M[K0 + 16 + d] = old
    M[K0 + d + 1] = pfn_of(M, old)
    return DESCEND


@njit(cache=True, _nrt=False)
def _leaf_run(T, M, d, op, aclr):
    """The rest of a level-3 table loop for the walks that dominate eager
    splitting -- write-protect (clear ``aclr`` on valid pages) and split (no
    work at level 3) -- with the visit rules of _visit for LEAF-only walks that
    do not handle faults: read, LEAF visit, re-read, advance. Returns the index
    where the loop stopped."""
    pfn = M[K0 + d]
    i = M[K0 + 8 + d]
    ptrs = M[S_PTRS]
    ps = M[S_PS]
    addr = M[W0 + W_ADDR]
    end = M[W0 + W_END]
    # The entries this loop visits, known up front: up to the end of the table
    # or of the range, whichever is first. The per-entry loop below is then
    # branch-free (select instead of if) so that LLVM can vectorize it.
    base = (addr >> ps) << ps
    n = 0
    if addr < end:
        n = min(ptrs - i, (end - base + (1 << ps) - 1) >> ps)
    nvalid = 0
    writes = 0
    # Unsigned indices: numba then drops the negative-index wraparound that
    # otherwise keeps these loops from vectorizing (3x slower).
    row = np.uint64(pfn)
    lo = np.uint64(i)
    hi = np.uint64(i + n)
    if aclr:
        for j in range(lo, hi):
            old = T[row, j]
            v = old & VALID
            new = old & ~(aclr * v)
            nvalid += v
            writes += (new ^ old) != 0
            T[row, j] = new
    else:
        # Split has nothing to do at level 3: only read (no stores, so that
        # the loop does not dirty the table pages).
        for j in range(lo, hi):
            nvalid += T[row, j] & VALID
    addr = base + (n << ps) if n else addr
    i += n
    M[W0 + W_ADDR] = addr
    add(M, op, K_RL, 3, nvalid)
    add(M, op, K_RI, 3, n - nvalid)
    add(M, op, K_VL, 3, n)
    add(M, op, K_RELOAD, 3, n)
    add(M, op, K_WR, 3, writes)
    return i


@njit(cache=True, _nrt=False)
def walk_tables(T, M, pfn, level):
    """``__kvm_pgtable_walk()`` from one table, iteratively."""
    op = M[W0 + W_OP]
    flags = M[W0 + W_FLAGS]
    ptrs = M[S_PTRS]
    d = 0
    M[K0] = pfn
    M[K0 + 8] = (M[W0 + W_ADDR] >> shift(M, level)) & (ptrs - 1)
    add(M, op, K_LOOPS, level, 1)
    fast = (op == OP_WRPROTECT or op == OP_SPLIT) and \
        not flags & (PRE | POST | SHARED | HANDLE_FAULT | HINTS)
    aclr = M[W0 + W_A1] if op == OP_WRPROTECT and M[W0 + W_A0] == 0 else 0
    while True:
        L = level + d
        if fast and L == 3 and (op == OP_SPLIT or aclr == S2AP_W):
            M[K0 + 8 + d] = _leaf_run(T, M, d, op, aclr)
        if M[K0 + 8 + d] >= ptrs or M[W0 + W_ADDR] >= M[W0 + W_END]:
            r = 0
        else:
            r = _visit(T, M, d, L)
            if r == DESCEND:
                d += 1
                M[K0 + 8 + d] = (M[W0 + W_ADDR] >> shift(M, L + 1)) & (ptrs - 1)
                add(M, op, K_LOOPS, L + 1, 1)
                continue
            if r == 0:
                M[K0 + 8 + d] += 1
                continue
            if r != TABLE_DONE:
                return r  # an error ends every loop on the way up
        # This table loop is done: back to the parent entry.
        if d == 0:
            return 0
        d -= 1
        L = level + d
        if flags & POST:
            add(M, op, K_VPOST, L, 1)
            r = call_visitor(T, M, M[K0 + d], M[K0 + 8 + d], M[K0 + 16 + d], L, POST)
            if not walk_continue(flags, r):
                return r
        M[K0 + 8 + d] += 1


@njit(cache=True, _nrt=False)
def kvm_pgtable_walk(T, M, op, addr, size, flags):
    add(M, op, C.K_WALKS, NOLV, 1)
    add(M, op, C.K_WALK_BYTES, NOLV, size)
    page = np.int64(1) << M[S_PS]
    start = addr & ~(page - 1)
    end = (start + size + page - 1) & ~(page - 1)
    M[W0 + W_ADDR] = start
    M[W0 + W_START] = start
    M[W0 + W_END] = end
    M[W0 + W_FLAGS] = flags
    M[W0 + W_OP] = op
    M[W0 + W_BUILT] = 0
    limit = np.int64(1) << M[S_IPA]
    if start > limit or end > limit:
        return -ERANGE
    ridx = (start & (limit - 1)) >> shift(M, M[S_START] - 1)
    ret = 0
    while M[W0 + W_ADDR] < end:
        ret = walk_tables(T, M, M[ROOT0 + ridx], M[S_START])
        if ret != 0:
            break
        ridx += 1
    return ret


# --- stage-2 operations -------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def s2_map(T, M, addr, size, phys, prot, mc, flags):
    add(M, OP_MAP, C.K_CALLS, NOLV, 1)
    M[W0 + W_A0] = phys & ~((np.int64(1) << M[S_PS]) - 1)
    attr = prot_to_attr(M, prot)
    if attr < 0:
        return result(M, OP_MAP, attr)
    M[W0 + W_A1] = attr
    M[W0 + W_A2] = mc
    M[W0 + W_A3] = 0
    ret = kvm_pgtable_walk(T, M, OP_MAP, addr, size, flags | PRE | LEAF | M[S_VF0 + OP_MAP])
    add(M, OP_MAP, C.K_DSB_ISHST, NOLV, 1)
    return result(M, OP_MAP, ret)


@njit(cache=True, _nrt=False)
def s2_unmap(T, M, addr, size):
    add(M, OP_UNMAP, C.K_CALLS, NOLV, 1)
    ret = kvm_pgtable_walk(T, M, OP_UNMAP, addr, size, LEAF | POST | M[S_VF0 + OP_UNMAP])
    if M[S_RANGE] and M[S_FWB]:
        flush_vmid_range(M, OP_UNMAP, addr, size)
    return result(M, OP_UNMAP, ret)


@njit(cache=True, _nrt=False)
def _leaf_attrs(T, M, op, addr, size, aset, aclr, flags):
    M[W0 + W_A0] = aset & ATTR_MASK
    M[W0 + W_A1] = aclr & ATTR_MASK
    M[W0 + W_A3] = -2
    return kvm_pgtable_walk(T, M, op, addr, size, flags | LEAF | M[S_VF0 + op])


@njit(cache=True, _nrt=False)
def s2_wrprotect(T, M, addr, size):
    add(M, OP_WRPROTECT, C.K_CALLS, NOLV, 1)
    ret = _leaf_attrs(T, M, OP_WRPROTECT, addr, size, 0, S2AP_W, 0)
    return result(M, OP_WRPROTECT, ret)


@njit(cache=True, _nrt=False)
def s2_relax_perms(T, M, addr, prot):
    add(M, OP_RELAX, C.K_CALLS, NOLV, 1)
    if prot & SW_MASK:
        return result(M, OP_RELAX, -EINVAL)
    aset = 0
    aclr = 0
    if prot & PROT_R:
        aset |= S2AP_R
    if prot & PROT_W:
        aset |= S2AP_W
    if prot & PROT_X:
        aclr |= XN
    ret = _leaf_attrs(T, M, OP_RELAX, addr, 1, aset, aclr, HANDLE_FAULT | SHARED)
    if ret == 0:
        flush_vmid_ipa_nsh(M, OP_RELAX, M[W0 + W_A3])
    elif ret == -EAGAIN:
        flush_vmid_ipa_nsh(M, OP_RELAX, NOLV)
    return result(M, OP_RELAX, ret)


@njit(cache=True, _nrt=False)
def s2_split(T, M, addr, size):
    add(M, OP_SPLIT, C.K_CALLS, NOLV, 1)
    ret = kvm_pgtable_walk(T, M, OP_SPLIT, addr, size, LEAF | M[S_VF0 + OP_SPLIT])
    add(M, OP_SPLIT, C.K_DSB_ISHST, NOLV, 1)
    return result(M, OP_SPLIT, ret)


@njit(cache=True, _nrt=False)
def s2_destroy(T, M):
    end = np.int64(1) << M[S_IPA]
    flags = LEAF | POST | M[S_VF0 + OP_DESTROY]
    # 6.17+ (mmu.c): one destroy_range walk per MIN_BLOCK_LEVEL granule.
    chunk = gsize(M, M[S_MINBLK]) if M[S_CHUNKDESTROY] else end
    addr = np.int64(0)
    while addr != end:
        nxt = range_addr_end(addr, end, chunk)
        add(M, OP_DESTROY, C.K_CALLS, NOLV, 1)
        kvm_pgtable_walk(T, M, OP_DESTROY, addr, nxt - addr, flags)
        addr = nxt
    for i in range(M[S_PGDP]):
        page_free(M, M[ROOT0 + i])
        add(M, OP_DESTROY, K_FREED, M[S_START], 1)


@njit(cache=True, _nrt=False)
def alloc_root(T, M):
    add(M, OP_INIT, C.K_CALLS, NOLV, 1)
    for i in range(M[S_PGDP]):
        M[ROOT0 + i] = page_alloc(T, M)
    add(M, OP_INIT, C.K_DSB_ISHST, NOLV, 1)


# --- the KVM MMU layer -----------------------------------------------------------------------
@njit(cache=True, inline="always", _nrt=False)
def kc(M, kind, n):
    add(M, OP_KVM, kind, NOLV, n)


@njit(cache=True, inline="always", _nrt=False)
def sl(M, s, col):
    """Index in M of memslot row ``s``, column ``col``."""
    return M[S_SLOTS] + s * NCOL + col


@njit(cache=True, _nrt=False)
def range_addr_end(addr, end, size):
    boundary = (addr + size) & ~(size - 1)
    return boundary if (boundary - 1) < (end - 1) else end


@njit(cache=True, _nrt=False)
def wp_range(T, M, addr, end):
    chunk = gsize(M, M[S_MINBLK])
    while True:
        nxt = range_addr_end(addr, end, chunk)
        if s2_wrprotect(T, M, addr, nxt - addr) != 0:
            break
        addr = nxt
        if addr == end:
            break


@njit(cache=True, _nrt=False)
def split_nr_page_tables(M, size):
    n = 0
    if M[S_MINBLK] < 2:
        pud = gsize(M, 1)
        n += (size + pud - 1) // pud
    pmd = gsize(M, 2)
    n += (size + pmd - 1) // pmd
    return n


@njit(cache=True, _nrt=False)
def split_huge_pages(T, M, addr, end):
    kc(M, C.K_SPLIT_HUGE_PAGES, 1)
    chunk = M[S_CHUNK]
    if chunk == 0:
        return 0
    capacity = split_nr_page_tables(M, chunk)
    ret = 0
    while True:
        if M[S_SCN] < capacity:
            kc(M, C.K_LOCK_DROPS, 1)
            kc(M, C.K_SPLIT_TOPUPS, 1)
            kc(M, C.K_CACHE_PAGES_ALLOC, cache_topup(T, M, MC_SPLIT, capacity, capacity))
        nxt = range_addr_end(addr, end, chunk)
        kc(M, C.K_SPLIT_CHUNKS, 1)
        ret = s2_split(T, M, addr, nxt - addr)
        if ret != 0:
            break
        addr = nxt
        if addr == end:
            break
    return ret


@njit(cache=True, _nrt=False)
def flush_memslot(M, s):
    kc(M, C.K_FLUSH_MEMSLOT, 1)
    ps = M[S_PS]
    flush_vmid_range(M, OP_KVM, M[sl(M, s, C_BASE)] << ps, M[sl(M, s, C_NPAGES)] << ps)


@njit(cache=True, _nrt=False)
def wp_memory_region(T, M, s):
    ps = M[S_PS]
    start = M[sl(M, s, C_BASE)] << ps
    wp_range(T, M, start, start + (M[sl(M, s, C_NPAGES)] << ps))
    flush_memslot(M, s)


@njit(cache=True, _nrt=False)
def split_memory_region(T, M, s):
    ps = M[S_PS]
    start = M[sl(M, s, C_BASE)] << ps
    split_huge_pages(T, M, start, start + (M[sl(M, s, C_NPAGES)] << ps))


@njit(cache=True, _nrt=False)
def _ffs(w):
    n = 0
    while not (w >> n) & 1:
        n += 1
    return n


@njit(cache=True, _nrt=False)
def _fls(w):
    n = 63
    while not (w >> n) & 1:
        n -= 1
    return n


@njit(cache=True, _nrt=False)
def enable_log_dirty_masked(T, M, s, offset, mask):
    kc(M, C.K_LOG_DIRTY_MASKED, 1)
    base = M[sl(M, s, C_BASE)] + offset
    ps = M[S_PS]
    start = (base + _ffs(mask)) << ps
    end = (base + _fls(mask) + 1) << ps
    wp_range(T, M, start, end)
    if M[S_MANUAL] & KVM_DIRTY_LOG_INITIALLY_SET:
        split_huge_pages(T, M, start, end)


@njit(cache=True, _nrt=False)
def get_dirty_log(T, M, B, s, out):
    """``kvm_get_dirty_log_protect()`` into ``out``."""
    off = M[sl(M, s, C_BMOFF)]
    nwords = (M[sl(M, s, C_NPAGES)] + 63) // 64
    if M[S_MANUAL]:
        kc(M, C.K_BITMAP_WORDS, nwords)
        for i in range(nwords):
            out[i] = B[off + i]
        return
    flush = False
    for i in range(nwords):
        kc(M, C.K_BITMAP_WORDS, 1)
        w = B[off + i]
        out[i] = w
        if w == 0:
            continue
        flush = True
        B[off + i] = 0
        enable_log_dirty_masked(T, M, s, i * 64, w)
    if flush:
        flush_memslot(M, s)


@njit(cache=True, _nrt=False)
def clear_dirty_log(T, M, B, s, first_page, num_pages, user):
    off = M[sl(M, s, C_BMOFF)]
    base = first_page // 64
    flush = False
    for j in range((num_pages + 63) // 64):
        kc(M, C.K_BITMAP_WORDS, 1)
        mask = user[j]
        if mask == 0:
            continue
        i = base + j
        mask &= B[off + i]
        B[off + i] &= ~mask
        if mask != 0:
            flush = True
            enable_log_dirty_masked(T, M, s, i * 64, mask)
    if flush:
        flush_memslot(M, s)


# --- faults and the guest ----------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _in_slot(M, s, gfn):
    base = M[sl(M, s, C_BASE)]
    return M[sl(M, s, C_ACTIVE)] != 0 and base <= gfn < base + M[sl(M, s, C_NPAGES)]


@njit(cache=True, _nrt=False)
def find_slot(M, gfn):
    last = M[S_LASTSLOT]
    if last >= 0 and _in_slot(M, last, gfn):
        return last
    for s in range(M[S_NSLOTS]):
        if _in_slot(M, s, gfn):
            M[S_LASTSLOT] = s
            return s
    return -1


@njit(cache=True, _nrt=False)
def _supports_huge(M, s, hva, map_size):
    """``fault_supports_stage2_huge_mapping()``."""
    if map_size == np.int64(1) << M[S_PS]:
        return True
    gpa_start = M[sl(M, s, C_BASE)] << M[S_PS]
    ustart = M[sl(M, s, C_HVA)]
    uend = ustart + M[sl(M, s, C_SIZE)]
    if (gpa_start & (map_size - 1)) != (ustart & (map_size - 1)):
        return False
    aligned = hva & ~(map_size - 1)
    return aligned >= ustart and aligned + map_size <= uend


@njit(cache=True, _nrt=False)
def _host_mapping_size(M, s, hva):
    """``get_user_mapping_size()``: a counted host page-table lookup."""
    pmd = gsize(M, 2)
    start = hva & ~(pmd - 1)
    ustart = M[sl(M, s, C_HVA)]
    thp = M[sl(M, s, C_KIND)] == KIND_THP and start >= ustart and \
        start + pmd <= ustart + M[sl(M, s, C_SIZE)]
    leaf = 2 if thp else 3
    host_start = 4 - (M[S_HOSTVA] - 4) // (M[S_PS] - 3)
    add(M, OP_GET_LEAF, C.K_WALKS, NOLV, 1)
    add(M, OP_GET_LEAF, C.K_WALK_BYTES, NOLV, np.int64(1) << M[S_PS])
    for level in range(host_start, leaf + 1):
        add(M, OP_GET_LEAF, K_LOOPS, level, 1)
        add(M, OP_GET_LEAF, K_RL if level == leaf else K_RT, level, 1)
    add(M, OP_GET_LEAF, K_VL, leaf, 1)
    add(M, OP_GET_LEAF, K_RELOAD, leaf, 1)
    return pmd if thp else (np.int64(1) << M[S_PS])


@njit(cache=True, _nrt=False)
def _log2(x):
    n = 0
    while (x >> n) > 1:
        n += 1
    return n


@njit(cache=True, _nrt=False)
def user_mem_abort(T, M, B, v, fault_ipa, s, hva, perm, fault_granule, write):
    ps = M[S_PS]
    page = np.int64(1) << ps
    logging = M[sl(M, s, C_HASBM)] != 0 and not M[sl(M, s, C_FLAGS)] & KVM_MEM_READONLY
    if not perm or (logging and write):
        kc(M, C.K_VCPU_TOPUPS, 1)
        kc(M, C.K_CACHE_PAGES_ALLOC, cache_topup(T, M, v, VCACHE_CAP, M[S_LEVELS] - 1))
    force = False
    pud = gsize(M, 1)
    pmd = gsize(M, 2)
    if logging:
        force = True
        vma_shift = ps
        hk = HC_NONE
    else:
        if M[sl(M, s, C_KIND)] == KIND_HUGETLB:
            vma_shift = _log2(M[sl(M, s, C_PAGESZ)])
        else:
            vma_shift = ps
        hk = M[sl(M, s, C_HCLASS)] if vma_shift != ps else HC_NONE
    if hk == HC_PUD and not _supports_huge(M, s, hva, pud):
        hk = HC_PMD
    if hk == HC_CONT_PMD:
        hk = HC_PMD
    if hk == HC_PMD:
        vma_shift = shift(M, 2)
        if not _supports_huge(M, s, hva, pmd):
            hk = HC_CONT_PTE
    if hk == HC_CONT_PTE:
        vma_shift = ps
        force = True
    vps = np.int64(1) << vma_shift
    if vps == pmd or vps == pud:
        fault_ipa &= ~(vps - 1)
    base = M[sl(M, s, C_BASE)]
    gfn = fault_ipa >> ps
    pa = M[sl(M, s, C_HPA)] + ((gfn - base) << ps)
    writable = not (logging and not write)
    if vps == page and not force:
        if perm and fault_granule > page:
            vps = fault_granule
        elif _supports_huge(M, s, hva, pmd) and _host_mapping_size(M, s, hva) >= pmd:
            vps = pmd
            fault_ipa &= ~(pmd - 1)
            pa &= ~(pmd - 1)
    prot = PROT_R
    if writable:
        prot |= PROT_W
    if M[S_DIC]:
        prot |= PROT_X
    if perm and vps == fault_granule:
        ret = s2_relax_perms(T, M, fault_ipa, prot)
    else:
        ret = s2_map(T, M, fault_ipa, vps, pa, prot, v, HANDLE_FAULT | SHARED)
    if writable and ret == 0 and M[sl(M, s, C_HASBM)]:
        kc(M, C.K_DIRTY_MARKED, 1)
        rel = gfn - base
        B[M[sl(M, s, C_BMOFF)] + (rel >> 6)] |= np.int64(1) << (rel & 63)
    return 0 if ret == -EAGAIN else ret


@njit(cache=True, _nrt=False)
def handle_abort(T, M, B, v, ipa, write, entry, level):
    kc(M, C.K_ABORTS, 1)
    gfn = ipa >> M[S_PS]
    s = find_slot(M, gfn)
    if s < 0:
        kc(M, C.K_MMIO_EXITS, 1)
        return 1
    perm = (entry & VALID) != 0
    kc(M, C.K_PERM_FAULTS if perm else C.K_TRANS_FAULTS, 1)
    g = gsize(M, level) if perm else 0
    hva = M[sl(M, s, C_HVA)] + ((gfn - M[sl(M, s, C_BASE)]) << M[S_PS])
    return user_mem_abort(T, M, B, v, ipa, s, hva, perm, g, write)


# --- guest passes, with replay of repeated fault classes ------------------------------------
# Most faults of a pass are alike: a write to a write-protected page (relax
# permissions at level 3), or a first touch of a page whose level-3 table
# exists (map one page). For those two classes the counted work is a function
# of a few inputs only -- the slot, the entry's attribute bits, the access, the
# mapping decision -- and of nothing that changes during the pass. The first
# fault of a class runs the real path and records the counter delta it
# produced; later faults with the same key apply the same state change and
# count one more replay; the deltas are added once per replay at the end of
# the pass. The differential tests pin this to the reference engine.
R_KEYLEN = 6
NCLASS = 4
R_STRIDE = R_KEYLEN + 1 + C.SIZE
R_SIZE = 1 + NCLASS * R_STRIDE
CLASS_RELAX, CLASS_MAP = 1, 2


@njit(cache=True, _nrt=False)
def lookup_ptep(T, M, ipa):
    """Like lookup(), also returning the table page and index of the entry."""
    level = M[S_START]
    limit = np.int64(1) << M[S_IPA]
    pfn = M[ROOT0 + ((ipa & (limit - 1)) >> shift(M, level - 1))]
    ptrs = M[S_PTRS]
    while True:
        idx = (ipa >> shift(M, level)) & (ptrs - 1)
        e = T[pfn, idx]
        if level == 3 or (e & 3) != 3:
            return e, level, pfn, idx
        pfn = pfn_of(M, e)
        level += 1


@njit(cache=True, _nrt=False)
def _fault_class(T, M, v, gpa, write, entry, level):
    """(class, slot, attribute key, decision) of a replayable fault, class 0 if none."""
    if level != 3:
        return 0, -1, 0, 0
    s = find_slot(M, gpa >> M[S_PS])
    if s < 0:
        return 0, -1, 0, 0
    if cache_n(M, v) < M[S_LEVELS] - 1:
        return 0, -1, 0, 0
    logging = M[sl(M, s, C_HASBM)] != 0 and not M[sl(M, s, C_FLAGS)] & KVM_MEM_READONLY
    if entry & VALID:
        if write and logging and entry & S2AP_R and not entry & S2AP_W:
            return CLASS_RELAX, s, entry & ATTR_MASK, 1
        return 0, -1, 0, 0
    if entry != 0:
        return 0, -1, 0, 0
    if logging:
        return CLASS_MAP, s, 0, 1
    kind = M[sl(M, s, C_KIND)]
    if kind == KIND_ANON:
        ps = M[S_PS]
        hva = M[sl(M, s, C_HVA)] + (((gpa >> ps) - M[sl(M, s, C_BASE)]) << ps)
        if not _supports_huge(M, s, hva, gsize(M, 2)):
            return CLASS_MAP, s, 0, 2
    elif kind == KIND_HUGETLB and M[sl(M, s, C_HCLASS)] == HC_CONT_PTE:
        return CLASS_MAP, s, 0, 3
    return 0, -1, 0, 0


@njit(cache=True, _nrt=False)
def _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx):
    """The state change of one fault of a recorded class."""
    ps = M[S_PS]
    gfn = gpa >> ps
    logging = M[sl(M, s, C_HASBM)] != 0 and not M[sl(M, s, C_FLAGS)] & KVM_MEM_READONLY
    writable = not (logging and not write)
    prot = PROT_R
    if writable:
        prot |= PROT_W
    if M[S_DIC]:
        prot |= PROT_X
    if cls == CLASS_RELAX:
        aset = S2AP_R | S2AP_W
        aclr = XN if prot & PROT_X else 0
        T[pfn, idx] = (entry & ~aclr) | aset
    else:
        base = M[sl(M, s, C_BASE)]
        pa = M[sl(M, s, C_HPA)] + ((gfn - base) << ps)
        T[pfn, idx] = leaf_pte(M, pa, prot_to_attr(M, prot), 3)
        M[M[S_REFC] + pfn] += 1
    if writable and M[sl(M, s, C_HASBM)]:
        rel = gfn - M[sl(M, s, C_BASE)]
        B[M[sl(M, s, C_BMOFF)] + (rel >> 6)] |= np.int64(1) << (rel & 63)


@njit(cache=True, _nrt=False)
def guest_access(T, M, B, R, v, gpa, write):
    need = S2AP_W if write else S2AP_R
    kc(M, C.K_GUEST_ACCESSES, 1)
    entry, level, pfn, idx = lookup_ptep(T, M, gpa)
    if entry & VALID and entry & need:
        return 0
    cls, s, akey, decision = _fault_class(T, M, v, gpa, write, entry, level)
    if cls:
        for c in range(R[0]):
            k = 1 + c * R_STRIDE
            if R[k] == cls and R[k + 1] == s and R[k + 2] == akey and R[k + 3] == write \
                    and R[k + 4] == decision:
                _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx)
                R[k + R_KEYLEN] += 1
                return 0
    # The real path; a first fault of a class records its delta.
    record = cls != 0 and R[0] < NCLASS
    if record:
        d = 1 + R[0] * R_STRIDE + R_KEYLEN + 1
        for i in range(C.SIZE):
            R[d + i] = M[CNT0 + i]
    first = True
    for _ in range(8):
        if not first:
            entry, level, pfn, idx = lookup_ptep(T, M, gpa)
            if entry & VALID and entry & need:
                break
        first = False
        ret = handle_abort(T, M, B, v, gpa, write, entry, level)
        if ret < 0:
            return ret
        if ret == 1 and find_slot(M, gpa >> M[S_PS]) < 0:
            return 0
        if record:
            e2, l2, p2, i2 = lookup_ptep(T, M, gpa)
            if ret == 0 and e2 & VALID and e2 & need:
                k = 1 + R[0] * R_STRIDE
                R[k] = cls
                R[k + 1] = s
                R[k + 2] = akey
                R[k + 3] = write
                R[k + 4] = decision
                R[k + R_KEYLEN] = 0
                d = k + R_KEYLEN + 1
                for i in range(C.SIZE):
                    R[d + i] = M[CNT0 + i] - R[d + i]
                R[0] += 1
            record = False
    else:
        return -1000
    return 0


@njit(cache=True, _nrt=False)
def _flush_replays(M, R):
    for c in range(R[0]):
        k = 1 + c * R_STRIDE
        n = R[k + R_KEYLEN]
        if n:
            d = k + R_KEYLEN + 1
            for i in range(C.SIZE):
                M[CNT0 + i] += n * R[d + i]
    R[0] = 0


@njit(cache=True, _nrt=False)
def guest_pass(T, M, B, R, write_percent, random_access):
    """One memstress pass over every vCPU, in lockstep (see workload.memstress_pass)."""
    nv = M[S_NVCPU]
    gps = M[S_GPS]
    regs = M[S_VREGS]
    R[0] = 0
    longest = 0
    for v in range(nv):
        longest = max(longest, M[regs + v * 3 + 1])
    ret = 0
    for i in range(longest):
        for v in range(nv):
            r = regs + v * 3
            pages = M[r + 1]
            if i >= pages:
                continue
            if random_access:
                M[r + 2] = M[r + 2] * PRNG_A % PRNG_M
                pg = M[r + 2] % pages
            else:
                pg = i
            M[r + 2] = M[r + 2] * PRNG_A % PRNG_M
            ret = guest_access(T, M, B, R, v, M[r] + (pg << gps),
                               M[r + 2] % 100 < write_percent)
            if ret != 0:
                break
        if ret != 0:
            break
    _flush_replays(M, R)
    if ret != 0:
        return ret
    for v in range(nv):
        kc(M, C.K_ABORTS, 1)
        kc(M, C.K_MMIO_EXITS, 1)
    return 0


# --- a compile cache that follows the reference modules -------------------------------
# The kernels compile in constants of the modules imported above (counter
# indices, descriptor bits, walk flags, barrier counts...). numba's cache is
# keyed on this file alone, so a cache built before one of those modules
# changed would go on giving the old numbers. A hash of their sources,
# compiled in too, tells a stale cache from a current one.
def _sources_hash() -> int:
    import hashlib
    from pathlib import Path

    from .. import memstress, uapi
    from ..kvm import mmu
    h = hashlib.sha256()
    for mod in (C, E, P, TLB, W, mmu, memstress, uapi):
        h.update(Path(mod.__file__).read_bytes())
    return int.from_bytes(h.digest()[:7], "little")


SOURCES_HASH = _sources_hash()


@njit(cache=True)
def compiled_sources_hash():
    return SOURCES_HASH


def drop_stale_cache() -> bool:
    """Empty the compile cache of every kernel if it was built from other
    sources of the reference modules (they then compile afresh on first
    use); True if it did."""
    from numba.core.dispatcher import Dispatcher
    if compiled_sources_hash() == SOURCES_HASH:
        return False
    for obj in list(globals().values()):
        if isinstance(obj, Dispatcher) and obj._cache is not None:
            obj._cache.flush()
    compiled_sources_hash.recompile()
    return True


#: Whether importing found (and dropped) a stale compile cache.
STALE_CACHE_DROPPED = drop_stale_cache()
