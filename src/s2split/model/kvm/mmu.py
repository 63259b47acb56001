"""The arm64 KVM MMU layer (``arch/arm64/kvm/mmu.c``, Linux 6.12) over the model.

Functions keep the kernel's names and take the VM first, like ``struct kvm *``.
What they count goes to the ``kvm`` operation of the VM's tally; the stage-2
work they start is counted by the stage-2 operations themselves.
"""

from __future__ import annotations

from typing import Any, Callable

from ...arm64 import pte as P
from ...arm64 import rules as R
from ...arm64.arch import Geometry
from ...arm64.uapi import KVM_MEM_LOG_DIRTY_PAGES
from ...counting.counters import (K_ABORTS, K_CACHE_PAGES_ALLOC, K_DIRTY_MARKED, K_FLUSH_MEMSLOT,
                                  K_LOCK_DROPS, K_LOG_DIRTY_MASKED, K_MMIO_EXITS, K_PERM_FAULTS,
                                  K_SPLIT_CHUNKS, K_SPLIT_HUGE_PAGES, K_SPLIT_TOPUPS,
                                  K_TRANS_FAULTS, K_VCPU_TOPUPS, NOLEVEL, SLOTS, K_WALKS,
                                  K_WALK_BYTES, K_LOOPS, K_READ_TABLE, K_READ_LEAF, K_VISIT_LEAF,
                                  K_RELOAD, OP_GET_LEAF)
from ...plumbing.errors import EAGAIN
from ..pgtable import tlb
from ..pgtable.walker import HANDLE_FAULT, SHARED
from .kvm_host import Kvm, KvmArch, KvmVcpu
from .memslot import Memslot, ffs, fls


#: ``KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE`` on arm64.
VCPU_CACHE_CAPACITY = 40


class MmuCtx:
    """The reference engine's context of one MMU hook call
    (:mod:`s2split.model.kvm.mmu_api`): the VM, the memslot, two integer arguments
    and (for the clear hook) the words."""

    __slots__ = ("vm", "slot", "a0", "a1", "words")

    def __init__(self, vm: Kvm, slot: Memslot, a0: int, a1: int, words: Any = ()):
        self.vm, self.slot, self.a0, self.a1, self.words = vm, slot, a0, a1, words


def mmu_hook(vm: Kvm, name: str) -> Callable | None:
    """The variant's hook replacing MMU function ``name``, or None."""
    return vm.variant.mmu.get(name)


def _k(vm: Kvm, kind: int, n: int = 1) -> None:
    vm.k[kind * SLOTS + NOLEVEL] += n


def kvm_mmu_cache_min_pages(vm: Kvm) -> int:
    """Pages a fault may need: one per level below the root."""
    return vm.geom.levels - 1


def kvm_mmu_split_nr_page_tables(vm: KvmArch, size: int) -> int:
    """Table pages to split ``size`` bytes of blocks to pages (the split
    cache's capacity; :func:`s2split.arm64.rules.split_nr_page_tables`)."""
    geom = vm.geom
    return R.split_nr_page_tables(size, geom.min_block_level, geom.pud_size, geom.pmd_size)


def range_addr_end(addr: int, end: int, size: int) -> int:
    """``__stage2_range_addr_end()``: the next ``size`` boundary, or ``end``."""
    boundary = (addr + size) & ~(size - 1)
    return boundary if (boundary - 1) < (end - 1) else end


# -- write protection --------------------------------------------------------

def stage2_apply_range(geom: Geometry, addr: int, end: int,
                       fn: Callable[[int, int], int]) -> int:
    """``stage2_apply_range()``: ``fn(addr, size)`` on each
    ``granule(KVM_PGTABLE_MIN_BLOCK_LEVEL)`` piece of ``[addr, end)``, in
    order, stopping at the first error (the MMU lock may be dropped between
    pieces, which changes no count here)."""
    chunk = geom.granule_size(geom.min_block_level)
    while True:
        nxt = range_addr_end(addr, end, chunk)
        ret = fn(addr, nxt - addr)
        if ret:
            return ret
        addr = nxt
        if addr == end:
            return 0


def kvm_stage2_wp_range(vm: Kvm, addr: int, end: int) -> None:
    """``kvm_stage2_wp_range()``: a wrprotect walk per piece of the range."""
    stage2_apply_range(vm.geom, addr, end, vm.pgt.wrprotect)


def kvm_stage2_unmap_range(vm: Kvm, addr: int, size: int) -> None:
    """``kvm_stage2_unmap_range()``, as ``kvm_arch_flush_shadow_memslot()``
    calls it on deleting a memslot: an unmap walk per piece, so a slot that
    crosses a 1G (4K pages) boundary takes two walks, and with FWB and
    TLBIRANGE two range flushes."""
    stage2_apply_range(vm.geom, addr, addr + size, vm.pgt.unmap)


def kvm_stage2_destroy(vm: Kvm) -> None:
    """Tear the stage-2 down: 6.12 frees it in one walk; 6.17+ walks it one
    ``granule(KVM_PGTABLE_MIN_BLOCK_LEVEL)`` chunk at a time (rescheduling in
    between), then frees the root."""
    pgt = vm.pgt
    if not pgt.rules.chunked_destroy:
        pgt.destroy()
        return
    chunk = vm.geom.granule_size(vm.geom.min_block_level)
    addr, end = 0, vm.geom.ipa_size
    while addr != end:
        nxt = range_addr_end(addr, end, chunk)
        pgt.destroy_range(addr, nxt - addr)
        addr = nxt
    pgt.destroy_pgd()


def kvm_flush_remote_tlbs_memslot(vm: Kvm, slot: Memslot) -> None:
    """``kvm_flush_remote_tlbs_memslot()`` -> ``kvm_tlb_flush_vmid_range()``."""
    _k(vm, K_FLUSH_MEMSLOT)
    tlb.flush_vmid_range(vm.k, vm.features, slot.base_gpa, slot.size, vm.geom.page_shift,
                         vm.geom.lpa2, vm.pgt.tracer)


def kvm_mmu_wp_memory_region(vm: Kvm, slot: Memslot) -> None:
    kvm_stage2_wp_range(vm, slot.base_gpa, slot.end_gpa)
    kvm_flush_remote_tlbs_memslot(vm, slot)


# -- eager splitting ---------------------------------------------------------

def kvm_mmu_split_huge_pages(vm: Kvm, slot: Memslot, addr: int, end: int) -> int:
    """``kvm_mmu_split_huge_pages()`` for ``[addr, end)`` of ``slot``: the
    variant's hook, or vanilla's :func:`split_huge_pages_body`."""
    hook = mmu_hook(vm, "split_huge_pages")
    if hook is not None:
        return hook(MmuCtx(vm, slot, addr, end))
    return split_huge_pages_body(vm, addr, end)


def split_huge_pages_body(vm: Kvm, addr: int, end: int) -> int:
    """Split ``[addr, end)`` chunk by chunk, topping the split cache up first.

    Best effort: a failed top-up or split ends the loop. The kernel also drops
    the lock when a reschedule is due; the model never reschedules, so every
    lock drop counted here is one the cache forced.
    """
    _k(vm, K_SPLIT_HUGE_PAGES)
    chunk = vm.split_chunk_size
    capacity = kvm_mmu_split_nr_page_tables(vm, chunk)
    if chunk == 0:
        return 0
    cache = vm.split_cache
    ret = 0
    while True:
        if cache.nobjs < capacity:
            # write_unlock(mmu_lock); cond_resched(); top up; write_lock()
            _k(vm, K_LOCK_DROPS)
            if vm.pgt.tracer is not None:
                vm.pgt.tracer.lock_release()
            _k(vm, K_SPLIT_TOPUPS)
            _k(vm, K_CACHE_PAGES_ALLOC, cache.topup(capacity, capacity))
        nxt = range_addr_end(addr, end, chunk)
        _k(vm, K_SPLIT_CHUNKS)
        ret = vm.pgt.split(addr, nxt - addr, cache)
        if ret:
            break
        addr = nxt
        if addr == end:
            break
    return ret


def kvm_mmu_split_memory_region(vm: Kvm, slot: Memslot) -> None:
    kvm_mmu_split_huge_pages(vm, slot, slot.base_gpa, slot.end_gpa)


def kvm_arch_mmu_enable_log_dirty_pt_masked(vm: Kvm, slot: Memslot, gfn_offset: int,
                                            mask: int) -> None:
    """One call per bitmap word: the variant's hook, or vanilla's
    :func:`enable_log_dirty_pt_masked_body`."""
    _k(vm, K_LOG_DIRTY_MASKED)
    hook = mmu_hook(vm, "enable_log_dirty_pt_masked")
    if hook is not None:
        hook(MmuCtx(vm, slot, gfn_offset, mask))
        return
    enable_log_dirty_pt_masked_body(vm, slot, gfn_offset, mask)


def enable_log_dirty_pt_masked_body(vm: Kvm, slot: Memslot, gfn_offset: int,
                                    mask: int) -> None:
    """Write-protect (and with manual-protect + initially-set, eagerly split)
    from the lowest to the highest page set in one 64-bit bitmap word."""
    base_gfn = slot.base_gfn + gfn_offset
    shift = vm.geom.page_shift
    start = (base_gfn + ffs(mask)) << shift
    end = (base_gfn + fls(mask) + 1) << shift
    kvm_stage2_wp_range(vm, start, end)
    if vm.manual_protect_and_init_set:
        kvm_mmu_split_huge_pages(vm, slot, start, end)


def kvm_arch_commit_memory_region(vm: KvmArch, old: Memslot | None, new: Memslot | None,
                                  change: str) -> None:
    """Dirty logging turned on: write-protect and split now, unless
    manual-protect + initially-set defers both to KVM_CLEAR_DIRTY_LOG.
    Anything else frees what is left in the split cache.

    The decision is shared by both engines; the work is each engine's
    ``wp_memory_region``, ``split_memory_region`` and ``free_split_cache``."""
    if new is not None and new.flags & KVM_MEM_LOG_DIRTY_PAGES:
        if change == "delete":
            return
        if vm.manual_protect_and_init_set:
            return
        vm.enable_log_dirty(new)
    else:
        vm.free_split_cache()


# -- faults ------------------------------------------------------------------

def _host_mapping_size(vm: Kvm, slot: Memslot, hva: int) -> int:
    """``get_user_mapping_size()``: a counted ``kvm_pgtable_get_leaf`` on the host
    page tables. THP backs aligned PMD ranges inside the slot; anything else is
    a base page."""
    backing = slot.backing
    pmd = vm.geom.pmd_size
    start = hva & ~(pmd - 1)
    thp = backing.kind == "thp" and start >= slot.userspace_addr and \
        start + pmd <= slot.userspace_addr + slot.size
    leaf_level = 2 if thp else 3
    host_start = 4 - (vm.host_va_bits - 4) // (vm.geom.page_shift - 3)
    c = vm.tally.ops[OP_GET_LEAF]
    c[K_WALKS * SLOTS + NOLEVEL] += 1
    c[K_WALK_BYTES * SLOTS + NOLEVEL] += vm.geom.granule
    for level in range(host_start, leaf_level + 1):
        c[K_LOOPS * SLOTS + level + 1] += 1
        c[(K_READ_LEAF if level == leaf_level else K_READ_TABLE) * SLOTS + level + 1] += 1
    c[K_VISIT_LEAF * SLOTS + leaf_level + 1] += 1
    c[K_RELOAD * SLOTS + leaf_level + 1] += 1
    return pmd if thp else vm.geom.granule


def _fault_supports_stage2_huge_mapping(slot: Memslot, hva: int, map_size: int,
                                        page_size: int) -> bool:
    """``fault_supports_stage2_huge_mapping()``
    (:func:`s2split.arm64.rules.fault_supports_huge_mapping`)."""
    return R.fault_supports_huge_mapping(slot.base_gpa, slot.userspace_addr, slot.size, hva,
                                         map_size, page_size)


def user_mem_abort(vm: Kvm, vcpu: KvmVcpu, fault_ipa: int, slot: Memslot, hva: int,
                   fault_is_perm: bool, fault_granule: int, write_fault: bool) -> int:
    """Resolve a stage-2 fault on memslot memory: map at the size the backing
    allows (pages only while logging), or relax permissions in place."""
    geom = vm.geom
    page = geom.granule
    ps = geom.page_shift
    logging = slot.logging
    if not fault_is_perm or (logging and write_fault):
        _k(vm, K_VCPU_TOPUPS)
        _k(vm, K_CACHE_PAGES_ALLOC,
           vcpu.memcache.topup(VCPU_CACHE_CAPACITY, kvm_mmu_cache_min_pages(vm)))

    backing = slot.backing
    pud, pmd = geom.pud_size, geom.pmd_size
    if logging:
        force_pte = True
        vma_shift = ps
    else:
        hclass = R.HUGETLB_CLASS[backing.hugetlb_class] if backing.vma_shift != ps else R.HC_NONE
        vma_shift, force_pte = R.vma_mapping_shift(
            hclass, backing.vma_shift, ps, pmd.bit_length() - 1,
            _fault_supports_stage2_huge_mapping(slot, hva, pud, page),
            _fault_supports_stage2_huge_mapping(slot, hva, pmd, page))
    vma_pagesize = 1 << vma_shift
    if vma_pagesize in (pmd, pud):
        fault_ipa &= ~(vma_pagesize - 1)

    gfn = fault_ipa >> ps
    pa = slot.hva_to_pa(slot.gfn_to_hva(gfn))
    # Every host page is writable once populated (the populate pass writes all
    # of them); while logging only a write fault maps writable.
    writable = not (logging and not write_fault)

    if vma_pagesize == page and not force_pte:
        if fault_is_perm and fault_granule > page:
            vma_pagesize = fault_granule
        elif _fault_supports_stage2_huge_mapping(slot, hva, pmd, page) and \
                _host_mapping_size(vm, slot, hva) >= pmd:
            # transparent_hugepage_adjust(): map the whole THP as a block.
            vma_pagesize = pmd
            fault_ipa &= ~(pmd - 1)
            pa &= ~(pmd - 1)

    prot = P.Prot.R
    if writable:
        prot |= P.Prot.W
    if vm.features.dic:
        prot |= P.Prot.X
    if fault_is_perm and vma_pagesize == fault_granule:
        ret = vm.pgt.relax_perms(fault_ipa, prot)
    else:
        ret = vm.pgt.map(fault_ipa, vma_pagesize, pa, prot, vcpu.memcache,
                         HANDLE_FAULT | SHARED)
    if writable and not ret:
        mark_page_dirty_in_slot(vm, slot, gfn)
    return 0 if ret == -EAGAIN else ret


def mark_page_dirty_in_slot(vm: Kvm, slot: Memslot, gfn: int) -> None:
    if slot.dirty_bitmap is not None:
        _k(vm, K_DIRTY_MARKED)
        slot.mark_dirty(gfn)


def kvm_handle_guest_abort(vm: Kvm, vcpu: KvmVcpu, ipa: int, write_fault: bool, entry: int,
                           level: int) -> int:
    """A stage-2 abort: MMIO outside memslots, else a translation or
    permission fault for :func:`user_mem_abort`."""
    _k(vm, K_ABORTS)
    gfn = ipa >> vm.geom.page_shift
    slot = vm.gfn_to_memslot(gfn)
    if slot is None:
        _k(vm, K_MMIO_EXITS)
        return 1
    fault_is_perm = bool(entry & P.VALID)
    _k(vm, K_PERM_FAULTS if fault_is_perm else K_TRANS_FAULTS)
    granule = vm.geom.granule_size(level) if fault_is_perm else 0
    return user_mem_abort(vm, vcpu, ipa, slot, slot.gfn_to_hva(gfn), fault_is_perm, granule,
                          write_fault)
