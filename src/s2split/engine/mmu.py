"""The KVM MMU layer in the fast engine: the twin of :mod:`s2split.model.kvm.mmu`
(write protection, eager splitting, the dirty-log mask, teardown and the
fault path), by the same kernel names. Memslots are rows of ``M``
(:class:`~s2split.engine.state.SlotCol`), found by their row index."""

from __future__ import annotations

from numba import njit

from ..arm64.bits import VALID
from ..arm64.bits import Prot
from ..arm64.uapi import KVM_MEM_READONLY
from ..counting import counters as C
from ..model.kvm import mmu as KM
from ..model.pgtable import walker as WK
from ..plumbing.errors import EAGAIN
from . import rules as R
from .memory import cache_topup
from .stage2 import (stage2_destroy_pgd, stage2_destroy_range, stage2_map, stage2_relax_perms,
                     stage2_split, stage2_wrprotect)
from .state import (BACKING_HUGETLB, BACKING_THP, MC_SPLIT, NOLV, S, SlotCol, count,
                    granule_size, kvm_count, level_shift, slot_index)
from .tlb import flush_vmid_range

HANDLE_FAULT, SHARED = WK.HANDLE_FAULT, WK.SHARED
PROT_X, PROT_W, PROT_R = int(Prot.X), int(Prot.W), int(Prot.R)
VCPU_CACHE_CAPACITY = KM.VCPU_CACHE_CAPACITY

range_addr_end = njit(cache=True, _nrt=False)(KM.range_addr_end)


@njit(cache=True, _nrt=False)
def kvm_stage2_wp_range(T, M, addr, end):
    """``kvm_stage2_wp_range()``: a wrprotect walk per MIN_BLOCK_LEVEL piece
    (``stage2_apply_range()``), stopping at the first error."""
    chunk = granule_size(M, M[S.MIN_BLOCK_LEVEL])
    while True:
        nxt = range_addr_end(addr, end, chunk)
        if stage2_wrprotect(T, M, addr, nxt - addr) != 0:
            break
        addr = nxt
        if addr == end:
            break


@njit(cache=True, _nrt=False)
def kvm_stage2_destroy(T, M):
    """``kvm_stage2_destroy()``: 6.12 frees the stage-2 in one walk; 6.17+
    walks it one MIN_BLOCK_LEVEL chunk at a time, then frees the root."""
    end = 1 << M[S.IPA_BITS]
    chunk = granule_size(M, M[S.MIN_BLOCK_LEVEL]) if M[S.CHUNKED_DESTROY] else end
    addr = 0
    while addr != end:
        nxt = range_addr_end(addr, end, chunk)
        stage2_destroy_range(T, M, addr, nxt - addr)
        addr = nxt
    stage2_destroy_pgd(T, M)


@njit(cache=True, _nrt=False)
def kvm_mmu_split_nr_page_tables(M, size):
    """``kvm_mmu_split_nr_page_tables()``: the split cache's capacity for ``size``."""
    return R.split_nr_page_tables(size, M[S.MIN_BLOCK_LEVEL], granule_size(M, 1),
                                  granule_size(M, 2))


@njit(cache=True, _nrt=False)
def kvm_mmu_split_huge_pages(T, M, addr, end):
    """Vanilla ``kvm_mmu_split_huge_pages()``: split chunk by chunk, topping the
    split cache up (dropping the MMU lock) whenever it is below its capacity
    (the call, with a variant's hook, is :func:`.mmu_hooks.split_huge_pages`)."""
    kvm_count(M, C.K_SPLIT_HUGE_PAGES, 1)
    chunk = M[S.CHUNK]
    if chunk == 0:
        return 0
    capacity = kvm_mmu_split_nr_page_tables(M, chunk)
    ret = 0
    while True:
        if M[S.SPLIT_NOBJS] < capacity:
            kvm_count(M, C.K_LOCK_DROPS, 1)
            kvm_count(M, C.K_SPLIT_TOPUPS, 1)
            kvm_count(M, C.K_CACHE_PAGES_ALLOC, cache_topup(T, M, MC_SPLIT, capacity, capacity))
        nxt = range_addr_end(addr, end, chunk)
        kvm_count(M, C.K_SPLIT_CHUNKS, 1)
        ret = stage2_split(T, M, addr, nxt - addr)
        if ret != 0:
            break
        addr = nxt
        if addr == end:
            break
    return ret


@njit(cache=True, _nrt=False)
def kvm_flush_remote_tlbs_memslot(M, s):
    """``kvm_flush_remote_tlbs_memslot()`` -> ``kvm_tlb_flush_vmid_range()``."""
    kvm_count(M, C.K_FLUSH_MEMSLOT, 1)
    ps = M[S.PAGE_SHIFT]
    flush_vmid_range(M, C.OP_KVM, M[slot_index(M, s, SlotCol.BASE_GFN)] << ps,
                     M[slot_index(M, s, SlotCol.NPAGES)] << ps)


@njit(cache=True, _nrt=False)
def _slot_range(M, s):
    """The guest-physical range of memslot ``s``: (start, end)."""
    ps = M[S.PAGE_SHIFT]
    start = M[slot_index(M, s, SlotCol.BASE_GFN)] << ps
    return start, start + (M[slot_index(M, s, SlotCol.NPAGES)] << ps)


@njit(cache=True, _nrt=False)
def kvm_mmu_wp_memory_region(T, M, s):
    """``kvm_mmu_wp_memory_region()``: write-protect a memslot, then flush it."""
    start, end = _slot_range(M, s)
    kvm_stage2_wp_range(T, M, start, end)
    kvm_flush_remote_tlbs_memslot(M, s)


@njit(cache=True, _nrt=False)
def ffs(word):
    """``__ffs()``: index of the lowest set bit."""
    n = 0
    while not (word >> n) & 1:
        n += 1
    return n


@njit(cache=True, _nrt=False)
def fls(word):
    """``__fls()``: index of the highest set bit."""
    n = 63
    while not (word >> n) & 1:
        n -= 1
    return n


@njit(cache=True, _nrt=False)
def enable_log_dirty_pt_masked_body(T, M, s, gfn_offset, mask):
    """The range of ``kvm_arch_mmu_enable_log_dirty_pt_masked()`` (the call
    itself, a variant's hook and the split are in :mod:`.mmu_hooks`):
    write-protected from the lowest to the highest page set in the word;
    returns ``(start, end)`` for the split."""
    base = M[slot_index(M, s, SlotCol.BASE_GFN)] + gfn_offset
    ps = M[S.PAGE_SHIFT]
    start = (base + ffs(mask)) << ps
    end = (base + fls(mask) + 1) << ps
    kvm_stage2_wp_range(T, M, start, end)
    return start, end


# --- faults ---------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _in_slot(M, s, gfn):
    """Whether active memslot ``s`` holds ``gfn``."""
    base = M[slot_index(M, s, SlotCol.BASE_GFN)]
    return M[slot_index(M, s, SlotCol.ACTIVE)] != 0 and \
        base <= gfn < base + M[slot_index(M, s, SlotCol.NPAGES)]


@njit(cache=True, _nrt=False)
def search_memslots(M, gfn):
    """``search_memslots()``: the row of the memslot holding ``gfn``, or -1,
    leaving the cache of the last one found as it is. Active memslots do not
    overlap, so at most one holds ``gfn``."""
    for s in range(M[S.NSLOTS]):
        if _in_slot(M, s, gfn):
            return s
    return -1


@njit(cache=True, _nrt=False)
def gfn_to_memslot(M, gfn):
    """``kvm_vcpu_gfn_to_memslot()``: the row of the memslot holding ``gfn``, or -1
    (the last one found is tried first, as the kernel's cache of it)."""
    last = M[S.LAST_SLOT]
    if last >= 0 and _in_slot(M, last, gfn):
        return last
    s = search_memslots(M, gfn)
    if s >= 0:
        M[S.LAST_SLOT] = s
    return s


@njit(cache=True, _nrt=False)
def slot_logging(M, s):
    """``memslot_is_logging()``: a dirty bitmap and not read-only."""
    return M[slot_index(M, s, SlotCol.HAS_BITMAP)] != 0 and \
        not M[slot_index(M, s, SlotCol.FLAGS)] & KVM_MEM_READONLY


@njit(cache=True, _nrt=False)
def fault_supports_stage2_huge_mapping(M, s, hva, map_size):
    """``fault_supports_stage2_huge_mapping()``."""
    ps = M[S.PAGE_SHIFT]
    return R.fault_supports_huge_mapping(M[slot_index(M, s, SlotCol.BASE_GFN)] << ps,
                                         M[slot_index(M, s, SlotCol.USERSPACE_ADDR)],
                                         M[slot_index(M, s, SlotCol.SIZE)], hva, map_size,
                                         1 << ps)


@njit(cache=True, _nrt=False)
def _host_mapping_size(M, s, hva):
    """``get_user_mapping_size()``: a counted ``kvm_pgtable_get_leaf`` on the
    host page tables. THP backs aligned PMD ranges inside the slot."""
    pmd = granule_size(M, 2)
    start = hva & ~(pmd - 1)
    ustart = M[slot_index(M, s, SlotCol.USERSPACE_ADDR)]
    thp = M[slot_index(M, s, SlotCol.BACKING)] == BACKING_THP and start >= ustart and \
        start + pmd <= ustart + M[slot_index(M, s, SlotCol.SIZE)]
    leaf = 2 if thp else 3
    host_start = 4 - (M[S.HOST_VA_BITS] - 4) // (M[S.PAGE_SHIFT] - 3)
    op = C.OP_GET_LEAF
    count(M, op, C.K_WALKS, NOLV, 1)
    count(M, op, C.K_WALK_BYTES, NOLV, 1 << M[S.PAGE_SHIFT])
    for level in range(host_start, leaf + 1):
        count(M, op, C.K_LOOPS, level, 1)
        count(M, op, C.K_READ_LEAF if level == leaf else C.K_READ_TABLE, level, 1)
    count(M, op, C.K_VISIT_LEAF, leaf, 1)
    count(M, op, C.K_RELOAD, leaf, 1)
    return pmd if thp else 1 << M[S.PAGE_SHIFT]


@njit(cache=True, _nrt=False)
def _log2(x):
    """The shift of a power of two."""
    n = 0
    while (x >> n) > 1:
        n += 1
    return n


@njit(cache=True, _nrt=False)
def fault_prot(M, writable):
    """The ``prot`` ``user_mem_abort()`` maps with: R, W if writable, X with DIC."""
    prot = PROT_R
    if writable:
        prot |= PROT_W
    if M[S.DIC]:
        prot |= PROT_X
    return prot


@njit(cache=True, _nrt=False)
def mark_page_dirty_in_slot(M, B, s, gfn):
    """``mark_page_dirty_in_slot()``: set the page's bit, if the slot logs."""
    if M[slot_index(M, s, SlotCol.HAS_BITMAP)]:
        kvm_count(M, C.K_DIRTY_MARKED, 1)
        rel = gfn - M[slot_index(M, s, SlotCol.BASE_GFN)]
        B[M[slot_index(M, s, SlotCol.BITMAP)] + (rel >> 6)] |= 1 << (rel & 63)


@njit(cache=True, _nrt=False)
def user_mem_abort(T, M, B, v, fault_ipa, s, hva, fault_is_perm, fault_granule, write_fault):
    """``user_mem_abort()``: map at the size the backing allows (pages only
    while logging), or relax permissions in place."""
    ps = M[S.PAGE_SHIFT]
    page = 1 << ps
    logging = slot_logging(M, s)
    if not fault_is_perm or (logging and write_fault):
        kvm_count(M, C.K_VCPU_TOPUPS, 1)
        kvm_count(M, C.K_CACHE_PAGES_ALLOC,
                  cache_topup(T, M, v, VCPU_CACHE_CAPACITY, M[S.LEVELS] - 1))
    pud = granule_size(M, 1)
    pmd = granule_size(M, 2)
    if logging:
        force_pte = True
        vma_shift = ps
    else:
        if M[slot_index(M, s, SlotCol.BACKING)] == BACKING_HUGETLB:
            vma_shift = _log2(M[slot_index(M, s, SlotCol.PAGE_SIZE)])
        else:
            vma_shift = ps
        hclass = M[slot_index(M, s, SlotCol.HUGETLB_CLASS)] if vma_shift != ps else R.HC_NONE
        vma_shift, force_pte = R.vma_mapping_shift(
            hclass, vma_shift, ps, level_shift(M, 2),
            fault_supports_stage2_huge_mapping(M, s, hva, pud),
            fault_supports_stage2_huge_mapping(M, s, hva, pmd))
    vma_pagesize = 1 << vma_shift
    if vma_pagesize == pmd or vma_pagesize == pud:
        fault_ipa &= ~(vma_pagesize - 1)
    base = M[slot_index(M, s, SlotCol.BASE_GFN)]
    gfn = fault_ipa >> ps
    pa = M[slot_index(M, s, SlotCol.HOST_PA)] + ((gfn - base) << ps)
    writable = not (logging and not write_fault)
    if vma_pagesize == page and not force_pte:
        if fault_is_perm and fault_granule > page:
            vma_pagesize = fault_granule
        elif fault_supports_stage2_huge_mapping(M, s, hva, pmd) and \
                _host_mapping_size(M, s, hva) >= pmd:
            # transparent_hugepage_adjust(): map the whole THP as a block.
            vma_pagesize = pmd
            fault_ipa &= ~(pmd - 1)
            pa &= ~(pmd - 1)
    prot = fault_prot(M, writable)
    if fault_is_perm and vma_pagesize == fault_granule:
        ret = stage2_relax_perms(T, M, fault_ipa, prot)
    else:
        ret = stage2_map(T, M, fault_ipa, vma_pagesize, pa, prot, v, HANDLE_FAULT | SHARED)
    if writable and ret == 0:
        mark_page_dirty_in_slot(M, B, s, gfn)
    return 0 if ret == -EAGAIN else ret


@njit(cache=True, _nrt=False)
def kvm_handle_guest_abort(T, M, B, v, ipa, write_fault, entry, level):
    """``kvm_handle_guest_abort()``: MMIO outside memslots (1), else a
    translation or permission fault for :func:`user_mem_abort`."""
    kvm_count(M, C.K_ABORTS, 1)
    gfn = ipa >> M[S.PAGE_SHIFT]
    s = gfn_to_memslot(M, gfn)
    if s < 0:
        kvm_count(M, C.K_MMIO_EXITS, 1)
        return 1
    fault_is_perm = (entry & VALID) != 0
    kvm_count(M, C.K_PERM_FAULTS if fault_is_perm else C.K_TRANS_FAULTS, 1)
    granule = granule_size(M, level) if fault_is_perm else 0
    hva = M[slot_index(M, s, SlotCol.USERSPACE_ADDR)] + \
        ((gfn - M[slot_index(M, s, SlotCol.BASE_GFN)]) << M[S.PAGE_SHIFT])
    return user_mem_abort(T, M, B, v, ipa, s, hva, fault_is_perm, granule, write_fault)
