"""A modelled KVM VM: capabilities, memslots, vCPUs and guest memory accesses.

:class:`VMBase` holds what both engines share -- the ioctls' rules and
errnos (raised as :class:`~s2split.plumbing.errors.KernelError`), memslot bookkeeping
and host-memory placement, and the decisions of
``kvm_arch_commit_memory_region()``. :class:`VM` is the reference engine's VM:
the stage-2 work runs through :mod:`s2split.model.kvm.mmu` and the walker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ...arm64 import pte as P
from ...arm64.arch import Geometry, size_name
from ...arm64.features import Features
from ...arm64.uapi import (KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE, KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES,
                           KVM_CAP_ARM_VM_IPA_SIZE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                           KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_CAPS,
                           KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
from ...arm64.versions import DEFAULT_KERNEL, kernel_rules
from ...counting.counters import (K_ABORTS, K_CACHE_PAGES_FREED, K_GUEST_ACCESSES, K_IOCTLS,
                                  K_MMIO_EXITS, NOLEVEL, OP_KVM, SLOTS)
from ...counting.counts import Counts, Tally
from ...plumbing.errors import EEXIST, EFAULT, EINVAL, ENOENT, KernelError, S2Error
from ...selftest.memstress import memstress_pass
from ..pgtable.memory import MemoryCache
from ..pgtable.stage2 import Stage2PageTable
from ..pgtable.variants import VANILLA, Variant
from . import dirty_log, mmu
from .backing import Backing
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, VALID_FLAGS, WORD_BITS, Memslot

KVM_USER_MEM_SLOTS = 32767  # SHRT_MAX - KVM_INTERNAL_MEM_SLOTS (none on arm64)

HVA_BASE = 0x7F00_0000_0000
GUEST_PA_BASE = 0x1000_0000_0000  # guest memory; table pages live below 1 TiB


@dataclass
class Vcpu:
    """A vCPU running memstress: its region, its generator state, its memcache."""

    index: int
    memcache: MemoryCache | None
    gpa: int = 0
    pages: int = 0
    rng: int = 0  # struct guest_random_state, persisting across passes


class VMBase:
    """Engine-independent VM state and the rules of the VM ioctls."""

    engine = "base"

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, host_va_bits: int = 48,
                 kernel: str = DEFAULT_KERNEL):
        self.geom = geom
        self.rules = kernel_rules(kernel)
        self.features = self.rules.cpu_features(features or Features())
        self.variant = variant
        self.host_va_bits = host_va_bits
        self.memslots: dict[int, Memslot] = {}
        self.split_chunk_size = 0
        self.manual_dirty_log_protect = 0
        self.vcpus: list[Vcpu] = []
        #: The size of the pages the guest writes one word into (memstress's
        #: ``guest_page_size``, the guest mode's); the stage-2 uses the host's.
        self.guest_page_size = geom.granule
        self._next_hva = HVA_BASE
        self._next_pa = GUEST_PA_BASE

    def set_guest_page_size(self, size: int) -> None:
        if size not in (4096, 16384, 65536):
            raise S2Error(f"guest page size {size}: use 4K, 16K or 64K")
        self.guest_page_size = size

    # engine hooks ----------------------------------------------------------
    def _count(self, kind: int, n: int = 1) -> None:
        raise NotImplementedError

    def _slot_created(self, slot: Memslot) -> None:
        raise NotImplementedError

    def _bitmap_changed(self, slot: Memslot, enabled: bool, all_set: bool) -> None:
        raise NotImplementedError

    def _slot_deleted(self, slot: Memslot) -> None:
        raise NotImplementedError

    def _slot_unmapped(self, slot: Memslot) -> None:
        raise NotImplementedError

    def _get_dirty_log(self, slot: Memslot) -> Sequence[int]:
        raise NotImplementedError

    def _clear_dirty_log(self, slot: Memslot, first_page: int, num_pages: int,
                         bitmap: Sequence[int]) -> None:
        raise NotImplementedError

    def _vcpu_added(self, vcpu: Vcpu) -> None:
        raise NotImplementedError

    def wp_memory_region(self, slot: Memslot) -> None:
        raise NotImplementedError

    def split_memory_region(self, slot: Memslot) -> None:
        raise NotImplementedError

    def free_split_cache(self) -> None:
        raise NotImplementedError

    # -- capabilities ------------------------------------------------------
    @property
    def manual_protect_and_init_set(self) -> bool:
        """``kvm_dirty_log_manual_protect_and_init_set()``."""
        return bool(self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)

    def check_extension(self, cap: int) -> int:
        if cap == KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES:
            return self.geom.supported_block_sizes_bitmap
        if cap == KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE:
            return self.split_chunk_size
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return KVM_DIRTY_LOG_MANUAL_CAPS
        if cap == KVM_CAP_ARM_VM_IPA_SIZE:
            return 52 if (self.geom.lpa2 or self.geom.lpa) else 48
        return 0

    def enable_cap(self, cap: int, value: int) -> None:
        if cap == KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE:
            self.set_eager_split_chunk_size(value)
        elif cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            allowed = KVM_DIRTY_LOG_MANUAL_CAPS if value & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE \
                else KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if value & ~allowed:
                raise KernelError(EINVAL, f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: invalid flags "
                                  f"{value:#x}")
            self.manual_dirty_log_protect = value
        else:
            raise KernelError(EINVAL, f"capability {cap} cannot be enabled on this VM model")

    def set_eager_split_chunk_size(self, size: int) -> None:
        """``KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE``: 0 or a supported block size,
        and only while no memslot exists."""
        if self.memslots:
            raise KernelError(EINVAL, "the eager-split chunk size can only be set before any "
                              "memslot exists")
        if size and (size & (size - 1) or not size & self.geom.supported_block_sizes_bitmap):
            sizes = ", ".join(size_name(s) for s in self.geom.supported_block_sizes)
            raise KernelError(EINVAL, f"eager-split chunk size {size_name(size)} is not 0 or a "
                              f"supported block size ({sizes} with "
                              f"{size_name(self.geom.granule)} pages)")
        self.split_chunk_size = size

    # -- memslots ----------------------------------------------------------
    def _alloc(self, attr: str, size: int, align: int) -> int:
        base = (getattr(self, attr) + align - 1) & ~(align - 1)
        setattr(self, attr, base + size)
        return base

    def _ioctl(self) -> None:
        self._count(K_IOCTLS)

    def add_memslot(self, slot_id: int, gpa: int, size: int, backing: Backing,
                    flags: int = 0) -> Memslot:
        """``KVM_SET_USER_MEMORY_REGION`` creating a slot over fresh host memory."""
        self._ioctl()
        page = self.geom.granule
        if size <= 0 or size & (page - 1):
            raise KernelError(EINVAL, f"memory size {size:#x} is not a positive multiple of "
                              f"the {size_name(page)} page size")
        if gpa & (page - 1):
            raise KernelError(EINVAL, f"guest physical address {gpa:#x} is not page aligned")
        if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
            raise KernelError(EINVAL, f"memslot id {slot_id} out of range")
        if flags & ~VALID_FLAGS:
            raise KernelError(EINVAL, f"invalid memslot flags {flags:#x}")
        if flags & KVM_MEM_READONLY:
            # its fault rules (writes exit to userspace as MMIO) are not modelled
            raise S2Error("read-only memslots (KVM_MEM_READONLY) are not modelled")
        if slot_id in self.memslots:
            raise KernelError(EINVAL, f"memslot {slot_id} exists; change its flags instead")
        base_gfn, npages = gpa >> self.geom.page_shift, size >> self.geom.page_shift
        for s in self.memslots.values():
            if base_gfn < s.base_gfn + s.npages and s.base_gfn < base_gfn + npages:
                raise KernelError(EEXIST, f"memslot {slot_id} [{gpa:#x}, {gpa + size:#x}) "
                                  f"overlaps memslot {s.id}")
        if gpa + size > self.geom.ipa_size:
            raise KernelError(EFAULT, f"memslot {slot_id} ends at {gpa + size:#x}, beyond the "
                              f"{self.geom.ipa_bits}-bit IPA space")
        align = backing.host_alignment
        hva = self._alloc("_next_hva", size, align)
        host_pa = self._alloc("_next_pa", size, max(align, 1 << 30))
        if host_pa + size > 1 << 48:
            raise S2Error("guest memory does not fit the model's 48-bit physical space")
        # One KVM_MR_CREATE with its flags: a dirty bitmap from the start
        # (kvm_prepare_memory_region), then the commit write-protects and
        # splits at once unless manual-protect + initially-set defers it.
        slot = Memslot(slot_id, base_gfn, npages, flags, hva, backing, host_pa)
        self.memslots[slot_id] = slot
        self._slot_created(slot)
        if flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._bitmap_changed(slot, True, self.manual_protect_and_init_set)
        mmu.kvm_arch_commit_memory_region(self, None, slot, "create")
        return slot

    def set_memslot_flags(self, slot_id: int, flags: int) -> None:
        """``KVM_SET_USER_MEMORY_REGION`` on an existing slot with new flags."""
        self._ioctl()
        slot = self.memslots.get(slot_id)
        if slot is None:
            raise KernelError(EINVAL, f"memslot {slot_id} does not exist")
        if flags & ~VALID_FLAGS:
            raise KernelError(EINVAL, f"invalid memslot flags {flags:#x}")
        if (flags ^ slot.flags) & KVM_MEM_READONLY:
            raise KernelError(EINVAL, "KVM_MEM_READONLY cannot change on an existing memslot")
        if flags == slot.flags:
            return
        old_flags = slot.flags
        slot.flags = flags
        # kvm_prepare_memory_region(): the dirty bitmap follows LOG_DIRTY_PAGES,
        # all set with manual-protect + initially-set.
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._bitmap_changed(slot, False, False)
        elif not old_flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._bitmap_changed(slot, True, self.manual_protect_and_init_set)
        mmu.kvm_arch_commit_memory_region(self, slot, slot, "flags_only")

    def delete_memslot(self, slot_id: int) -> None:
        """Delete a slot: unmap its range (``kvm_arch_flush_shadow_memslot``)."""
        self._ioctl()
        slot = self.memslots.pop(slot_id, None)
        if slot is None:
            raise KernelError(EINVAL, f"memslot {slot_id} does not exist")
        self._slot_deleted(slot)
        mmu.kvm_arch_commit_memory_region(self, slot, None, "delete")

    def unmap_memslot_memory(self, slot_id: int) -> None:
        """``munmap()`` of a slot's host memory while the slot stays (the 7.3
        selftest's ``kvm_vm_free()``): the MMU notifier's
        ``kvm_unmap_gfn_range()`` unmaps the slot's stage-2 range -- the same
        ``kvm_stage2_unmap_range()`` walks as deleting the slot, with no ioctl
        and no commit."""
        slot = self.memslots.get(slot_id)
        if slot is None:
            raise KernelError(EINVAL, f"memslot {slot_id} does not exist")
        self._slot_unmapped(slot)

    # -- dirty log -----------------------------------------------------------
    def _slot_with_log(self, slot_id: int) -> Memslot:
        # an id no slot can have (or another address space) is EINVAL; only
        # a valid id without a dirty log is ENOENT
        if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
            raise KernelError(EINVAL, f"memslot id {slot_id} is out of range")
        slot = self.memslots.get(slot_id)
        if slot is None or not slot.flags & KVM_MEM_LOG_DIRTY_PAGES:
            raise KernelError(ENOENT, f"memslot {slot_id} has no dirty log")
        return slot

    def get_dirty_log(self, slot_id: int) -> Sequence[int]:
        """``KVM_GET_DIRTY_LOG``: the slot's bitmap, one 64-bit word per 64 pages."""
        self._ioctl()
        return self._get_dirty_log(self._slot_with_log(slot_id))

    def clear_dirty_log(self, slot_id: int, first_page: int, num_pages: int,
                        bitmap: Sequence[int]) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` with the kernel's checks on the range."""
        self._ioctl()
        if first_page & 63:
            raise KernelError(EINVAL, f"first_page {first_page} is not a multiple of 64")
        slot = self._slot_with_log(slot_id)
        if first_page > slot.npages or num_pages > slot.npages - first_page or \
                (num_pages < slot.npages - first_page and num_pages & 63):
            raise KernelError(EINVAL, f"pages [{first_page}, {first_page + num_pages}) do not "
                              f"fit memslot {slot_id} of {slot.npages} pages in whole 64-page "
                              "words")
        nwords = (num_pages + WORD_BITS - 1) // WORD_BITS
        if len(bitmap) < nwords:  # copy_from_user() runs past the buffer
            raise KernelError(EFAULT, f"the bitmap holds {len(bitmap)} words, {nwords} are "
                              "needed")
        self._clear_dirty_log(slot, first_page, num_pages, bitmap)

    # -- vCPUs ---------------------------------------------------------------
    def add_vcpu(self, gpa: int = 0, pages: int = 0, seed: int = 0) -> Vcpu:
        vcpu = Vcpu(len(self.vcpus), None, gpa, pages, seed)
        self.vcpus.append(vcpu)
        self._vcpu_added(vcpu)
        return vcpu

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        for s in self.memslots.values():
            if s.contains(gfn):
                return s
        return None


class VM(VMBase):
    """A VM on the reference engine."""

    engine = "reference"

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, host_va_bits: int = 48,
                 kernel: str = DEFAULT_KERNEL):
        super().__init__(geom, features, variant, host_va_bits, kernel)
        self.pgt = Stage2PageTable(geom, self.features, variant, kernel=kernel)
        self.tally: Tally = self.pgt.tally
        self.k = self.tally.ops[OP_KVM]
        self.split_cache = MemoryCache(self.pgt.mem)
        self._last_slot: Memslot | None = None

    def set_cache_lines(self, l1: int, l2: int, llc: int) -> None:
        """Classify entry reads against caches of these many lines (tests use
        small ones; runs keep s2split.arm64.hierarchy.COUNTED's)."""
        self.pgt.mem.cache_lines = (l1, l2, llc)

    def _count(self, kind: int, n: int = 1) -> None:
        self.k[kind * SLOTS + NOLEVEL] += n

    # -- ioctls, as an attached TLB model sees them (begin, end = lock released) --------
    def _traced(self, name: str, fn, *args):
        tr = self.pgt.tracer
        if tr is None:
            return fn(*args)
        tr.ioctl_begin(name)
        try:
            return fn(*args)
        finally:
            tr.ioctl_end()

    def add_memslot(self, slot_id: int, gpa: int, size: int, backing: Backing,
                    flags: int = 0) -> Memslot:
        return self._traced("KVM_SET_USER_MEMORY_REGION", super().add_memslot, slot_id, gpa,
                            size, backing, flags)

    def set_memslot_flags(self, slot_id: int, flags: int) -> None:
        self._traced("KVM_SET_USER_MEMORY_REGION", super().set_memslot_flags, slot_id, flags)

    def delete_memslot(self, slot_id: int) -> None:
        self._traced("KVM_SET_USER_MEMORY_REGION", super().delete_memslot, slot_id)

    def get_dirty_log(self, slot_id: int) -> Sequence[int]:
        return self._traced("KVM_GET_DIRTY_LOG", super().get_dirty_log, slot_id)

    def clear_dirty_log(self, slot_id: int, first_page: int, num_pages: int,
                        bitmap: Sequence[int]) -> None:
        self._traced("KVM_CLEAR_DIRTY_LOG", super().clear_dirty_log, slot_id, first_page,
                     num_pages, bitmap)

    def _slot_created(self, slot: Memslot) -> None:
        pass

    def _bitmap_changed(self, slot: Memslot, enabled: bool, all_set: bool) -> None:
        slot.dirty_bitmap = slot.new_bitmap(all_set) if enabled else None
        if enabled:
            slot.variant_bitmap = slot.new_bitmap(False)

    def _slot_deleted(self, slot: Memslot) -> None:
        self._last_slot = None
        mmu.kvm_stage2_unmap_range(self, slot.base_gpa, slot.size)

    def _slot_unmapped(self, slot: Memslot) -> None:
        mmu.kvm_stage2_unmap_range(self, slot.base_gpa, slot.size)

    def _get_dirty_log(self, slot: Memslot) -> list[int]:
        return dirty_log.kvm_get_dirty_log_protect(self, slot)

    def _clear_dirty_log(self, slot: Memslot, first_page: int, num_pages: int,
                         bitmap: Sequence[int]) -> None:
        dirty_log.kvm_clear_dirty_log_protect(self, slot, first_page, num_pages, bitmap)

    def _vcpu_added(self, vcpu: Vcpu) -> None:
        vcpu.memcache = MemoryCache(self.pgt.mem)

    def wp_memory_region(self, slot: Memslot) -> None:
        mmu.kvm_mmu_wp_memory_region(self, slot)

    def split_memory_region(self, slot: Memslot) -> None:
        mmu.kvm_mmu_split_memory_region(self, slot)

    def enable_log_dirty(self, slot: Memslot) -> None:
        """The enable path: write-protect and split the slot (or the
        variant's ``enable_log_dirty`` hook)."""
        hook = mmu.mmu_hook(self, "enable_log_dirty")
        if hook is not None:
            hook(mmu.MmuCtx(self, slot, 0, 0))
            return
        self.wp_memory_region(slot)
        self.split_memory_region(slot)

    def free_split_cache(self) -> None:
        self._count(K_CACHE_PAGES_FREED, self.split_cache.free_all())

    def split_cache_pages(self) -> int:
        """Pages held in the split cache."""
        return self.split_cache.nobjs

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        s = self._last_slot
        if s is not None and s.contains(gfn):
            return s
        s = super().gfn_to_memslot(gfn)
        if s is not None:
            self._last_slot = s
        return s

    # -- guest accesses --------------------------------------------------------
    def guest_access(self, vcpu: Vcpu, gpa: int, write: bool) -> None:
        """One guest load or store: the MMU translates it or KVM handles a fault,
        until the access goes through (a fault that only changed part of the
        picture -- e.g. -EAGAIN -- is taken again, as the vCPU would)."""
        need = P.S2AP_W if write else P.S2AP_R
        self.k[K_GUEST_ACCESSES * SLOTS + NOLEVEL] += 1
        for _ in range(8):
            entry, level = self.pgt.lookup(gpa)
            if entry & P.VALID and entry & need:
                return
            ret = mmu.kvm_handle_guest_abort(self, vcpu, gpa, write, entry, level)
            if ret < 0:
                raise S2Error(f"guest access to {gpa:#x} failed: errno {-ret}")
            if ret == 1 and self.gfn_to_memslot(gpa >> self.geom.page_shift) is None:
                return  # MMIO: userspace handles it
        raise AssertionError(f"guest access to {gpa:#x} keeps faulting")

    def guest_mmio_exit(self, vcpu: Vcpu) -> None:
        """The ucall at the end of a pass: one store outside every memslot."""
        self.k[K_ABORTS * SLOTS + NOLEVEL] += 1
        self.k[K_MMIO_EXITS * SLOTS + NOLEVEL] += 1

    def guest_pass(self, write_percent: int, random_access: bool) -> None:
        memstress_pass(self, write_percent, random_access)

    # -- results -------------------------------------------------------------
    def destroy(self) -> None:
        """Tear down: free the vCPU caches and the split cache, destroy the stage-2."""
        for vcpu in self.vcpus:
            vcpu.memcache.free_all()
        self.split_cache.free_all()
        mmu.kvm_stage2_destroy(self)

    def take_counts(self) -> Counts:
        # The end of a phase: taking the tally also empties the model's
        # caches of table lines (s2split.arm64.hierarchy).
        return self.tally.take()

    def dump_tables(self) -> bytes:
        return self.pgt.dump()

    def dirty_bitmap(self, slot_id: int) -> list[int] | None:
        slot = self.memslots[slot_id]
        return None if slot.dirty_bitmap is None else list(slot.dirty_bitmap)
