"""A modelled KVM VM: capabilities, memslots, vCPUs and guest memory accesses.

This is the reference engine's VM. Its methods are the ioctls the selftest
uses, with the kernel's checks and errnos (raised as
:class:`~s2split.errors.KernelError`), and :meth:`VM.guest_pass`, one
memstress pass over every vCPU's region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import pte as P
from ..arch import Geometry, size_name
from ..counters import (K_ABORTS, K_GUEST_ACCESSES, K_IOCTLS, K_MMIO_EXITS, NOLEVEL, OP_KVM,
                        SLOTS, Counts)
from ..errors import EEXIST, EFAULT, EINVAL, KernelError, S2Error
from ..hw import Features
from ..pgtable.memory import MemoryCache
from ..pgtable.stage2 import Stage2PageTable
from ..pgtable.variants import VANILLA, Variant
from . import dirty_log, mmu
from .backing import Backing
from .memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, VALID_FLAGS, Memslot

# Capability numbers (include/uapi/linux/kvm.h).
KVM_CAP_ARM_VM_IPA_SIZE = 165
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE = 228
KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES = 229
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET
KVM_USER_MEM_SLOTS = 32767  # SHRT_MAX - KVM_INTERNAL_MEM_SLOTS (none on arm64)

HVA_BASE = 0x7F00_0000_0000
GUEST_PA_BASE = 0x1000_0000_0000  # guest memory; table pages live below 1 TiB


@dataclass
class Vcpu:
    """A vCPU running memstress: its region, its generator state, its memcache."""

    index: int
    memcache: MemoryCache
    gpa: int = 0
    pages: int = 0
    rng: int = 0  # struct guest_random_state, persisting across passes


@dataclass
class VMConfig:
    geom: Geometry = field(default_factory=Geometry)
    features: Features = field(default_factory=Features)
    host_va_bits: int = 48


class VM:
    """A VM on the reference engine."""

    engine = "reference"

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, host_va_bits: int = 48):
        self.geom = geom
        self.features = features or Features()
        self.variant = variant
        self.host_va_bits = host_va_bits
        self.pgt = Stage2PageTable(geom, self.features, variant)
        self.tally = self.pgt.tally
        self.k = self.tally.ops[OP_KVM]
        self.memslots: dict[int, Memslot] = {}
        self.split_chunk_size = 0
        self.split_cache = MemoryCache(self.pgt.mem)
        self.manual_dirty_log_protect = 0
        self.vcpus: list[Vcpu] = []
        self._next_hva = HVA_BASE
        self._next_pa = GUEST_PA_BASE
        self._last_slot: Memslot | None = None

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
        slot = Memslot(slot_id, base_gfn, npages, 0, hva, backing, host_pa)
        self.memslots[slot_id] = slot
        mmu.kvm_arch_commit_memory_region(self, None, slot, "create")
        if flags:
            self.set_memslot_flags(slot_id, flags)
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
        # kvm_prepare_memory_region(): the dirty bitmap follows LOG_DIRTY_PAGES.
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            slot.dirty_bitmap = None
        elif not old_flags & KVM_MEM_LOG_DIRTY_PAGES:
            slot.dirty_bitmap = slot.new_bitmap(self.manual_protect_and_init_set)
        mmu.kvm_arch_commit_memory_region(self, slot, slot, "flags_only")

    def delete_memslot(self, slot_id: int) -> None:
        """Delete a slot: unmap its range (``kvm_arch_flush_shadow_memslot``)."""
        self._ioctl()
        slot = self.memslots.pop(slot_id, None)
        if slot is None:
            raise KernelError(EINVAL, f"memslot {slot_id} does not exist")
        self._last_slot = None
        self.pgt.unmap(slot.base_gpa, slot.size)
        mmu.kvm_arch_commit_memory_region(self, slot, None, "delete")

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        s = self._last_slot
        if s is not None and s.contains(gfn):
            return s
        for s in self.memslots.values():
            if s.contains(gfn):
                self._last_slot = s
                return s
        return None

    # -- dirty log -----------------------------------------------------------
    def _ioctl(self) -> None:
        self.k[K_IOCTLS * SLOTS + NOLEVEL] += 1

    def get_dirty_log(self, slot_id: int) -> list[int]:
        self._ioctl()
        return dirty_log.kvm_get_dirty_log_protect(self, slot_id)

    def clear_dirty_log(self, slot_id: int, first_page: int, num_pages: int,
                        bitmap: list[int]) -> None:
        self._ioctl()
        dirty_log.kvm_clear_dirty_log_protect(self, slot_id, first_page, num_pages, bitmap)

    # -- vCPUs and guest accesses -------------------------------------------
    def add_vcpu(self, gpa: int = 0, pages: int = 0, seed: int = 0) -> Vcpu:
        vcpu = Vcpu(len(self.vcpus), MemoryCache(self.pgt.mem), gpa, pages, seed)
        self.vcpus.append(vcpu)
        return vcpu

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
        from ..workload import memstress_pass
        memstress_pass(self, write_percent, random_access)

    def destroy(self) -> None:
        """Tear down: free the vCPU caches and the split cache, destroy the stage-2."""
        for vcpu in self.vcpus:
            vcpu.memcache.free_all()
        self.split_cache.free_all()
        self.pgt.destroy()

    # -- results -------------------------------------------------------------
    def take_counts(self) -> Counts:
        return self.tally.take()

    def dump_tables(self) -> bytes:
        return self.pgt.dump()

    def dirty_bitmap(self, slot_id: int) -> list[int] | None:
        slot = self.memslots[slot_id]
        return None if slot.dirty_bitmap is None else list(slot.dirty_bitmap)
