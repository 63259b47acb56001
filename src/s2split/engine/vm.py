"""The fast engine's VM: the twin of :mod:`s2split.model.kvm.vm`.

:class:`FastVM` keeps the ioctl rules of :class:`~s2split.model.kvm.vm.VMBase`
(shared with the reference engine) and runs every per-entry, per-page and
per-word loop in the engine's compiled modules (``stage2``, ``mmu``,
``dirty_log``, ``guest``), over the arrays laid out in
:mod:`s2split.engine.state`. Table memory is one
``(pages, entries)`` int64 array sized up front from the memslots (an upper
bound on the tables that faults, splits and caches can ever hold), so that
compiled code never needs to grow it; untouched pages stay unbacked
(:func:`zeroed_tables`), so only tables in use cost memory.
"""

from __future__ import annotations

import copy
import mmap
import struct
from typing import Sequence

import numpy as np

from ..arm64.arch import Geometry
from ..arm64.bits import LOCKED
from ..arm64.features import Features
from ..arm64.hierarchy import COUNTED, LINE_ENTRY_SHIFT
from ..arm64.rules import HUGETLB_CLASS, oa_format
from ..arm64.versions import DEFAULT_KERNEL
from ..counting.counters import K_CACHE_PAGES_FREED, OP, SIZE
from ..counting.counts import Counts
from ..model.kvm import mmu as KM
from ..model.kvm.memslot import Memslot
from ..model.kvm.vm import VMBase, Vcpu
from ..model.pgtable.memory import TABLE_PA_BASE
from ..model.pgtable.variants import FAST_MMU_HOOKS, VANILLA, VARIANT_OPS, Variant
from ..model.pgtable.variants import MMU_HOOKS
from ..plumbing.errors import S2Error
from . import compile_cache  # noqa: F401  (drops a stale compile cache on import)
from .dirty_log import kvm_clear_dirty_log_protect, kvm_get_dirty_log_protect
from .guest import KEEPS_FAULTING, memstress_pass, replay_table_size
from .memory import cache_free_all
from .mmu import kvm_mmu_wp_memory_region, kvm_stage2_destroy
from .mmu_hooks import enable_log_dirty, mmu_hook_id, split_memory_region
from .pte import table_pfn
from .stage2 import stage2_init, stage2_unmap
from .state import (BACKING, DEFER_OVERFLOW, FIXED, MC_SPLIT, NCOL, NREGS, REGIONS, ROOT,
                    VARIANT_AFTER, VARIANT_FLAGS, VARIANT_MMU, VARIANT_VISITORS, COUNTERS, S,
                    SlotCol, VcpuReg, kvm_count)
from .visitors import variant_hook_id, variant_visitor_id


#: Table memory at least this large comes from :func:`zeroed_tables`' own mapping.
HUGE_TABLE_BYTES = 4 << 20


def zeroed_tables(pages: int, ptrs: int) -> np.ndarray:
    """Table memory: ``pages`` rows of ``ptrs`` zero entries, backed only
    where touched. A large one is an anonymous mapping that asks for
    transparent huge pages: populating a big VM touches gigabytes of table
    memory row after row, and backing it 2M at a time costs several times
    less than a fault per 4K page (and fewer TLB misses after)."""
    nbytes = pages * ptrs * 8
    if nbytes < HUGE_TABLE_BYTES:
        return np.zeros((pages, ptrs), dtype=np.int64)
    buf = mmap.mmap(-1, nbytes)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass  # no transparent huge pages here: 4K pages, as np.zeros would give
    return np.frombuffer(buf, dtype=np.int64).reshape(pages, ptrs)


def require_flag_only(variant: Variant) -> None:
    """Refuse a variant whose visitor is not written with the visitor API:
    only the reference engine runs those."""
    if not variant.fast_capable:
        if all(fn in FAST_MMU_HOOKS for fn in variant.mmu.values()):
            what = "a visitor not written with the visitor API (s2split.model.pgtable.visitor_api)"
        else:
            what = "a function of the MMU layer with a hook that is not built in"
        raise S2Error(f"variant {variant.name!r} replaces {what}; only the reference engine "
                      "can run it")


def deferred_rows(chunk: int, level2_granule: int) -> int:
    """The most entries one ``kvm_pgtable_stage2_split()`` call can defer:
    it splits one chunk-aligned window of at most ``chunk`` bytes (chunks are
    block sizes, so powers of two), and each deferred entry is a distinct
    block, of level 2 or above, that meets the window -- at most
    ``chunk / level-2 block`` of them, or the one block holding the window
    when the chunk is smaller than a level-2 block."""
    return max(1, chunk // level2_granule)


class FastVM(VMBase):
    engine = "fast"

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, host_va_bits: int = 48,
                 kernel: str = DEFAULT_KERNEL):
        require_flag_only(variant)
        super().__init__(geom, features, variant, host_va_bits, kernel)
        g = geom
        self._rows = {"refc": 0, "fstack": 0, "vcache": 1, "vcn": 1, "vregs": 1, "scache": 1,
                      "slots": 4, "stamps": 0, "deferred": 0}
        self.M = np.zeros(FIXED, dtype=np.int64)
        self._layout(self._rows)
        M = self.M
        M[S.PTRS] = g.ptrs_per_table
        M[S.PAGE_SHIFT] = g.page_shift
        M[S.GUEST_PAGE_SHIFT] = g.page_shift
        M[S.BITS_PER_LEVEL] = g.bits_per_level
        M[S.START_LEVEL] = g.start_level
        M[S.PGD_PAGES] = g.pgd_pages
        M[S.IPA_BITS] = g.ipa_bits
        M[S.OA_FORMAT] = oa_format(g.page_shift, g.lpa2)
        M[S.LPA2] = int(g.lpa2)
        f = self.features
        M[S.VHE], M[S.FWB], M[S.TLBIRANGE], M[S.DIC] = f.vhe, f.fwb, f.tlbirange, f.dic
        M[S.AC04_CPU_23] = f.ampere_ac04_cpu_23
        M[S.MIN_BLOCK_LEVEL] = g.min_block_level
        M[S.HOST_VA_BITS] = host_va_bits
        M[S.LAST_SLOT] = -1
        M[S.PHYS_BITS] = 52 if (g.lpa2 or g.lpa) else 48
        M[S.TABLE_BASE] = TABLE_PA_BASE
        M[S.LEVELS] = g.levels
        M[S.FREE_CLEARS] = self.rules.free_clears_tables
        M[S.CHUNKED_DESTROY] = self.rules.chunked_destroy
        M[S.LAST_LINE] = -1
        M[S.L1_LINES], M[S.L2_LINES], M[S.LLC_LINES] = COUNTED.lines()
        self.set_variant(variant)
        self.T = np.zeros((0, g.ptrs_per_table), dtype=np.int64)
        self.B = np.zeros(0, dtype=np.int64)
        self._replays = np.zeros(replay_table_size(0), dtype=np.int64)
        self._slot_row: dict[int, int] = {}
        self._table_bound = g.pgd_pages + 64
        self._grow_tables()
        stage2_init(self.T, self.M)

    # -- memory layout -----------------------------------------------------------
    def _layout(self, rows: dict[str, int]) -> None:
        """(Re)build M with room for ``rows`` of each region, keeping contents."""
        old = self.M
        size = FIXED + sum(rows[name] * cols for name, _, cols in REGIONS)
        M = np.zeros(size, dtype=np.int64)
        M[:FIXED] = old[:FIXED]
        off = FIXED
        for name, key, cols in REGIONS:
            n = rows[name] * cols
            prev = self._rows.get(name, 0) * cols
            if old is not M and int(old[key]) >= FIXED:
                keep = min(prev, n)
                M[off:off + keep] = old[int(old[key]):int(old[key]) + keep]
            M[key] = off
            off += n
        self.M = M
        self._rows = dict(rows)

    def _region(self, name: str) -> np.ndarray:
        key = dict((n, k) for n, k, _ in REGIONS)[name]
        cols = dict((n, c) for n, _, c in REGIONS)[name]
        off = int(self.M[key])
        return self.M[off:off + self._rows[name] * cols]

    def _ensure_rows(self, name: str, need: int) -> None:
        if need > self._rows[name]:
            rows = dict(self._rows)
            rows[name] = max(need, 2 * rows[name])
            self._layout(rows)

    def _grow_tables(self) -> None:
        """Size table memory for the worst case: every slot fully split, every
        vCPU cache and the split cache full (it never shrinks)."""
        need = self._table_bound + KM.VCPU_CACHE_CAPACITY * len(self.vcpus) + \
            KM.kvm_mmu_split_nr_page_tables(self, self.split_chunk_size)
        cap = self._rows["refc"]
        if need <= cap:
            return
        used = int(self.M[S.NEXT_PAGE])
        T = zeroed_tables(need, self.geom.ptrs_per_table)
        T[:used] = self.T[:used]
        self.T = T
        rows = dict(self._rows)
        rows["refc"] = rows["fstack"] = need
        rows["stamps"] = need * (self.geom.ptrs_per_table >> LINE_ENTRY_SHIFT)
        self._layout(rows)
        self.M[S.CAPACITY] = need

    def _tables_for(self, slot: Memslot) -> int:
        g = self.geom
        n = 0
        for level in range(g.start_level + 1, 4):
            span = g.granule_size(level - 1)
            n += (slot.end_gpa - 1) // span - slot.base_gpa // span + 1
        return n

    def _count(self, kind: int, n: int = 1) -> None:
        kvm_count(self.M, kind, n)

    def _row(self, slot: Memslot) -> int:
        return self._slot_row[slot.id]

    def _slot_col(self, slot: Memslot, col: int) -> int:
        return int(self.M[S.SLOTS]) + self._row(slot) * NCOL + col

    def set_cache_lines(self, l1: int, l2: int, llc: int) -> None:
        self.M[S.L1_LINES], self.M[S.L2_LINES], self.M[S.LLC_LINES] = l1, l2, llc

    # -- VMBase hooks -------------------------------------------------------------
    def set_eager_split_chunk_size(self, size: int) -> None:
        super().set_eager_split_chunk_size(size)
        self.M[S.CHUNK] = size
        self._ensure_rows("scache", KM.kvm_mmu_split_nr_page_tables(self, size) + 1)
        self._grow_tables()
        self._size_deferred()

    def _size_deferred(self) -> None:
        """Room for the entries one split call defers, only for a variant
        that defers (the others keep an empty region)."""
        if self.variant.defers:
            self._ensure_rows("deferred",
                              deferred_rows(self.split_chunk_size, self.geom.granule_size(2)))

    def _check_deferred(self) -> None:
        """Refuse, after the call, a walk whose two-phase changes went wrong."""
        fault = int(self.M[S.DEFER_FAULT])
        if fault == 0:
            return
        self.M[S.DEFER_FAULT] = 0
        if fault == DEFER_OVERFLOW:
            raise S2Error(f"a walk deferred more than {self._rows['deferred']} entries with "
                          "defer_make, the most one kvm_pgtable_stage2_split() call can break "
                          "(defer_make is for the split walk's blocks)")
        raise S2Error(f"{fault} entries broken with defer_make were never made "
                      "(call make_deferred in the after-walk hook)")

    def enable_cap(self, cap: int, value: int) -> None:
        super().enable_cap(cap, value)
        self.M[S.MANUAL] = self.manual_dirty_log_protect

    def _slot_created(self, slot: Memslot) -> None:
        n = int(self.M[S.NSLOTS])
        self._ensure_rows("slots", n + 1)
        b = slot.backing
        row = {SlotCol.BASE_GFN: slot.base_gfn, SlotCol.NPAGES: slot.npages,
               SlotCol.FLAGS: slot.flags, SlotCol.USERSPACE_ADDR: slot.userspace_addr,
               SlotCol.HOST_PA: slot.host_pa, SlotCol.SIZE: slot.size,
               SlotCol.BACKING: BACKING[b.kind], SlotCol.PAGE_SIZE: b.page_size,
               SlotCol.HUGETLB_CLASS: HUGETLB_CLASS[b.hugetlb_class], SlotCol.ACTIVE: 1}
        self._slot_row[slot.id] = n
        self.M[S.NSLOTS] = n + 1
        for col, value in row.items():
            self.M[self._slot_col(slot, col)] = value
        self._table_bound += self._tables_for(slot)
        self._grow_tables()

    def _bitmap_changed(self, slot: Memslot, enabled: bool, all_set: bool) -> None:
        self.M[self._slot_col(slot, SlotCol.FLAGS)] = slot.flags
        if not enabled:
            self.M[self._slot_col(slot, SlotCol.HAS_BITMAP)] = 0
            return
        words = np.array(slot.new_bitmap(all_set), dtype=np.uint64).view(np.int64)
        self.M[self._slot_col(slot, SlotCol.BITMAP)] = len(self.B)
        self.M[self._slot_col(slot, SlotCol.HAS_BITMAP)] = 1
        # then a variant's own bitmap (mmu_api.mark), cleared
        self.M[self._slot_col(slot, SlotCol.VBITMAP)] = len(self.B) + len(words)
        self.B = np.concatenate([self.B, words, np.zeros(len(words), dtype=np.int64)])

    def set_memslot_flags(self, slot_id: int, flags: int) -> None:
        super().set_memslot_flags(slot_id, flags)
        if slot_id in self._slot_row:
            self.M[self._slot_col(self.memslots[slot_id], SlotCol.FLAGS)] = flags

    def set_guest_page_size(self, size: int) -> None:
        super().set_guest_page_size(size)
        self.M[S.GUEST_PAGE_SHIFT] = size.bit_length() - 1

    def _slot_deleted(self, slot: Memslot) -> None:
        KM.stage2_apply_range(self.geom, slot.base_gpa, slot.end_gpa,
                               lambda addr, size: stage2_unmap(self.T, self.M, addr, size))
        self.M[self._slot_col(slot, SlotCol.ACTIVE)] = 0
        self.M[S.LAST_SLOT] = -1

    def _slot_unmapped(self, slot: Memslot) -> None:
        KM.stage2_apply_range(self.geom, slot.base_gpa, slot.end_gpa,
                               lambda addr, size: stage2_unmap(self.T, self.M, addr, size))

    def _get_dirty_log(self, slot: Memslot) -> np.ndarray:
        out = np.zeros(slot.nwords, dtype=np.int64)
        kvm_get_dirty_log_protect(self.T, self.M, self.B, self._row(slot), out)
        self._check_deferred()
        return out.view(np.uint64)  # unsigned words, like the reference's ints

    def _clear_dirty_log(self, slot: Memslot, first_page: int, num_pages: int,
                         bitmap: Sequence[int]) -> None:
        if isinstance(bitmap, np.ndarray):
            user = bitmap.view(np.int64) if bitmap.dtype == np.uint64 else \
                bitmap.astype(np.int64)
        else:
            user = np.array([int(w) for w in bitmap], dtype=np.uint64).view(np.int64)
        # A copy: a variant's clear hook gets the cleared bits back in it.
        kvm_clear_dirty_log_protect(self.T, self.M, self.B, self._row(slot), first_page, num_pages,
                                    np.array(user, dtype=np.int64, order="C"))
        self._check_deferred()

    def _vcpu_added(self, vcpu: Vcpu) -> None:
        n = len(self.vcpus)
        for name in ("vcache", "vcn", "vregs"):
            self._ensure_rows(name, n)
        regs = self._region("vregs")
        row = (n - 1) * NREGS
        regs[row + VcpuReg.GPA] = vcpu.gpa
        regs[row + VcpuReg.PAGES] = vcpu.pages
        regs[row + VcpuReg.RNG] = vcpu.rng
        self.M[S.NVCPUS] = n
        self._replays = np.zeros(replay_table_size(n), dtype=np.int64)
        self._grow_tables()

    def wp_memory_region(self, slot: Memslot) -> None:
        kvm_mmu_wp_memory_region(self.T, self.M, self._row(slot))

    def split_memory_region(self, slot: Memslot) -> None:
        split_memory_region(self.T, self.M, self.B, self._row(slot))
        self._check_deferred()

    def enable_log_dirty(self, slot: Memslot) -> None:
        enable_log_dirty(self.T, self.M, self.B, self._row(slot))
        self._check_deferred()

    def split_cache_pages(self) -> int:
        """Pages held in the split cache."""
        return int(self.M[S.SPLIT_NOBJS])

    def free_split_cache(self) -> None:
        self._count(K_CACHE_PAGES_FREED, cache_free_all(self.T, self.M, MC_SPLIT))

    # -- snapshots (for running several variants off one run) ------------------
    def set_variant(self, variant: Variant) -> None:
        """Switch the walk flags, visitors and hooks to another variant's."""
        require_flag_only(variant)
        variant.check_cpu(self.features)
        self.variant = variant
        for op in VARIANT_OPS:
            self.M[VARIANT_FLAGS + OP[op]] = variant.flags_for(op)
            self.M[VARIANT_VISITORS + OP[op]] = variant_visitor_id(variant.visitors.get(op))
            self.M[VARIANT_AFTER + OP[op]] = variant_hook_id(variant.after_walk.get(op))
        for i, name in enumerate(MMU_HOOKS):
            self.M[VARIANT_MMU + i] = mmu_hook_id(name, variant.mmu.get(name))
        self._size_deferred()

    def snapshot(self) -> tuple:
        used = int(self.M[S.NEXT_PAGE])
        return (self.T[:used].copy(), self.M.copy(), self.B.copy(), dict(self._rows),
                copy.deepcopy((self.memslots, self.vcpus, self.manual_dirty_log_protect,
                               self.split_chunk_size, self._slot_row, self._table_bound)))

    def restore(self, snap: tuple) -> None:
        T, M, B, rows, py = snap
        if len(self.T) < len(T) or self.T.shape[1] != T.shape[1]:
            raise AssertionError("a snapshot from another VM")
        self.T[:len(T)] = T
        self.T[len(T):int(self.M[S.NEXT_PAGE])] = 0
        self.M = M.copy()
        self.B = B.copy()
        self._rows = dict(rows)
        (self.memslots, self.vcpus, self.manual_dirty_log_protect, self.split_chunk_size,
         self._slot_row, self._table_bound) = copy.deepcopy(py)

    def _state_parts(self, T: np.ndarray, M: np.ndarray, B: np.ndarray) -> tuple:
        """Everything but the counters, the scratch and the variant flags
        (and the deferred makes' rows, walk scratch a variant may add)."""
        used = int(M[S.NEXT_PAGE])
        return T[:used], M[:VARIANT_FLAGS], M[ROOT:int(M[S.DEFERRED])], B

    def state_equals(self, snap: tuple) -> bool:
        """True when the live state equals the snapshot's (counters aside)."""
        T, M, B, rows, _ = snap
        if {**rows, "deferred": 0} != {**self._rows, "deferred": 0} or \
                int(M[S.NEXT_PAGE]) != int(self.M[S.NEXT_PAGE]):
            return False
        return all(np.array_equal(a, b) for a, b in
                   zip(self._state_parts(self.T, self.M, self.B), self._state_parts(T, M, B)))

    # -- guest and results -----------------------------------------------------
    def guest_pass(self, write_percent: int, random_access: bool) -> None:
        ret = memstress_pass(self.T, self.M, self.B, self._replays, write_percent,
                            bool(random_access))
        if ret == KEEPS_FAULTING:
            raise AssertionError("a guest access keeps faulting")
        if ret != 0:
            raise S2Error(f"a guest access failed (error {ret})")
        regs = self._region("vregs")
        for v in self.vcpus:
            v.rng = int(regs[v.index * NREGS + VcpuReg.RNG])

    def destroy(self) -> None:
        for v in range(len(self.vcpus)):
            cache_free_all(self.T, self.M, v)
        cache_free_all(self.T, self.M, MC_SPLIT)
        kvm_stage2_destroy(self.T, self.M)

    def take_counts(self) -> Counts:
        cnt = self.M[COUNTERS:COUNTERS + SIZE]
        c = Counts.from_flat(cnt)
        cnt[:] = 0
        # The end of a phase: its table lines leave the model's caches
        # (s2split.arm64.hierarchy: the guest and userspace run in between).
        if self.M[S.LINE_CLOCK]:  # a phase that touched no line left none to forget
            self.M[S.LINE_CLOCK] = 0
            self.M[S.LAST_LINE] = -1
            self._region("stamps")[:] = 0
        return c

    def _pfn(self, entry: int) -> int:
        return int(table_pfn(self.M, np.int64(entry)))

    def dump_tables(self) -> bytes:
        """The reference's canonical image (:meth:`Stage2PageTable.dump`)."""
        g = self.geom
        out = bytearray()
        span = g.granule_size(g.start_level - 1)
        stack = [(int(self.M[ROOT + i]), g.start_level, i * span)
                 for i in range(g.pgd_pages)]
        stack.reverse()
        while stack:
            pfn, level, base = stack.pop()
            row = self.T[pfn]
            out += struct.pack("<qiq", TABLE_PA_BASE + pfn * g.granule, level, base)
            out += row.tobytes()
            if level < 3:
                gs = g.granule_size(level)
                for i in np.nonzero((row & 3) == 3)[0][::-1]:
                    stack.append((self._pfn(int(row[i])), level + 1, base + int(i) * gs))
        return bytes(out)

    def dirty_bitmap(self, slot_id: int) -> list[int] | None:
        slot = self.memslots[slot_id]
        if not self.M[self._slot_col(slot, SlotCol.HAS_BITMAP)]:
            return None
        off = int(self.M[self._slot_col(slot, SlotCol.BITMAP)])
        return [int(w) for w in self.B[off:off + slot.nwords].view(np.uint64)]

    def table_pages(self) -> int:
        """Table pages in use (reachable, or held by a cache)."""
        return int(self.M[S.NEXT_PAGE]) - int(self.M[S.FREE_TOP])

    def check_invariants(self) -> list[str]:
        problems = []
        g = self.geom
        refc = self._region("refc")
        stack = [(int(self.M[ROOT + i]), g.start_level) for i in range(g.pgd_pages)]
        while stack:
            pfn, level = stack.pop()
            row = self.T[pfn]
            nz = int(np.count_nonzero(row))
            if int(refc[pfn]) != nz + 1:
                problems.append(f"table {pfn} (level {level}): refcount {int(refc[pfn])} "
                                f"!= {nz} + 1")
            if np.any(((row & 1) == 0) & ((row & LOCKED) != 0)):
                problems.append(f"locked entry left in table {pfn}")
            if level < 3:
                for e in row[(row & 3) == 3]:
                    stack.append((self._pfn(int(e)), level + 1))
        return problems


class FastEngine:
    name = "fast"
    snapshots = True  # run_variants may share phases between variants

    def create_vm(self, geom, features, variant, host_va_bits, kernel=DEFAULT_KERNEL):
        return FastVM(geom, features, variant, host_va_bits, kernel)
