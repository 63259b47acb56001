"""What the KVM layer's functions use of a VM and of a vCPU, after
``include/linux/kvm_host.h``'s ``struct kvm`` and ``struct kvm_vcpu``.

In the kernel, ``kvm_main.c`` and ``mmu.c`` call each other through
``struct kvm``. Here the imports run one way: :mod:`.vm` (the ioctls) calls
:mod:`.mmu` and :mod:`.dirty_log`, and those name the VM only by these
protocols: :class:`~s2split.model.kvm.vm.VM` has the shape of :class:`Kvm`,
the fast engine's VM that of :class:`KvmArch` (the decisions both engines
share). The few calls back into the VM (enable dirty logging, free the split
cache, find a memslot) are methods named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .memslot import Memslot

if TYPE_CHECKING:
    # Types of the fields only: importing them at run time would pull numpy
    # into the KVM layer's numpy-free modules (the harness reads memslot
    # backings through this package).
    from ...arm64.arch import Geometry
    from ...arm64.features import Features
    from ...counting.counts import Tally
    from ..pgtable.memory import MemoryCache
    from ..pgtable.stage2 import Stage2PageTable
    from ..pgtable.variants import Variant


@runtime_checkable
class KvmArch(Protocol):
    """The part of a VM both engines share: what the decisions made in one
    place for both (:func:`~s2split.model.kvm.mmu.kvm_arch_commit_memory_region`,
    the split cache's size) read, and the work they hand back to the engine."""

    geom: Geometry

    @property
    def manual_protect_and_init_set(self) -> bool:
        """``kvm_dirty_log_manual_protect_and_init_set()``."""
        ...

    def enable_log_dirty(self, slot: Memslot) -> None:
        """Write-protect and split ``slot`` now (dirty logging turned on)."""
        ...

    def free_split_cache(self) -> None:
        """``kvm_mmu_free_memory_cache(&kvm->arch.mmu.split_page_cache)``."""
        ...


@runtime_checkable
class Kvm(KvmArch, Protocol):
    """A reference-engine VM as ``mmu.c`` and the dirty-log ioctls use it."""

    features: Features
    host_va_bits: int
    variant: Variant
    manual_dirty_log_protect: int
    split_chunk_size: int
    #: ``kvm->arch.mmu.pgt``.
    pgt: Stage2PageTable
    tally: Tally
    #: The counters of the ``kvm`` operation in :attr:`tally`.
    k: list[int]
    #: ``kvm->arch.mmu.split_page_cache``.
    split_cache: MemoryCache

    def gfn_to_memslot(self, gfn: int) -> Memslot | None:
        """The memslot holding guest frame ``gfn``."""
        ...


@runtime_checkable
class KvmVcpu(Protocol):
    """A vCPU as the fault path uses it."""

    #: ``vcpu->arch.mmu_page_cache``.
    memcache: MemoryCache | None
