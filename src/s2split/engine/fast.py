"""The fast engine: the reference engine's semantics over numpy arrays, compiled.

:class:`FastVM` keeps the ioctl rules of :class:`~s2split.kvm.vm.VMBase`
(shared with the reference engine) and runs every per-entry, per-page and
per-word loop in :mod:`s2split.engine.kernels`. Table memory is one
``(pages, entries)`` int64 array sized up front from the memslots (an upper
bound on the tables that faults, splits and caches can ever hold), so that
compiled code never needs to grow it; ``np.zeros`` leaves untouched pages
unbacked, so only tables in use cost memory.
"""

from __future__ import annotations

import copy
import struct
from typing import Sequence

import numpy as np

from ..arch import Geometry
from ..counters import K_CACHE_PAGES_FREED, NKINDS, NOLEVEL, OP, SIZE, SLOTS, Counts
from ..errors import S2Error
from ..features import Features
from ..kvm.memslot import Memslot
from ..kvm import mmu
from ..kvm.mmu import kvm_mmu_split_nr_page_tables
from ..kvm.vm import VMBase, Vcpu
from ..pgtable.memory import TABLE_PA_BASE
from ..pgtable.variants import VANILLA, VARIANT_OPS as WALK_OPS, Variant
from ..versions import DEFAULT_KERNEL
from . import kernels as KN

#: The variable regions of M, in order: (scalar holding the offset, columns).
_REGIONS = (("refc", KN.S_REFC, 1), ("fstack", KN.S_FSTACK, 1),
            ("vcache", KN.S_VCACHE, KN.VCACHE_CAP), ("vcn", KN.S_VCN, 1),
            ("vregs", KN.S_VREGS, 3), ("scache", KN.S_SCACHE, 1),
            ("slots", KN.S_SLOTS, KN.NCOL))


def require_flag_only(variant: Variant) -> None:
    if not variant.flag_only:
        raise S2Error(f"variant {variant.name!r} replaces a visitor; only the reference "
                      "engine can run it")


class FastVM(VMBase):
    engine = "fast"

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, host_va_bits: int = 48,
                 kernel: str = DEFAULT_KERNEL):
        require_flag_only(variant)
        super().__init__(geom, features, variant, host_va_bits, kernel)
        g = geom
        self._rows = {"refc": 0, "fstack": 0, "vcache": 1, "vcn": 1, "vregs": 1, "scache": 1,
                      "slots": 4}
        self.M = np.zeros(KN.FIXED, dtype=np.int64)
        self._layout(self._rows)
        M = self.M
        M[KN.S_PTRS] = g.ptrs_per_table
        M[KN.S_PS] = g.page_shift
        M[KN.S_GPS] = g.page_shift
        M[KN.S_BPL] = g.bits_per_level
        M[KN.S_START] = g.start_level
        M[KN.S_PGDP] = g.pgd_pages
        M[KN.S_IPA] = g.ipa_bits
        M[KN.S_FMT] = 2 if g.lpa2 else 1 if g.granule == 65536 else 0
        M[KN.S_LPA2] = int(g.lpa2)
        f = self.features
        M[KN.S_VHE], M[KN.S_FWB], M[KN.S_RANGE], M[KN.S_DIC] = f.vhe, f.fwb, f.tlbirange, f.dic
        M[KN.S_MINBLK] = g.min_block_level
        M[KN.S_HOSTVA] = host_va_bits
        M[KN.S_LASTSLOT] = -1
        M[KN.S_PHYSBITS] = 52 if (g.lpa2 or g.lpa) else 48
        M[KN.S_TABLE_BASE] = TABLE_PA_BASE
        M[KN.S_LEVELS] = g.levels
        M[KN.S_FREECLEAR] = self.rules.free_clears_tables
        M[KN.S_CHUNKDESTROY] = self.rules.chunked_destroy
        self.set_variant(variant)
        self.T = np.zeros((0, g.ptrs_per_table), dtype=np.int64)
        self.B = np.zeros(0, dtype=np.int64)
        self._replays = np.zeros(KN.R_SIZE, dtype=np.int64)
        self._slot_row: dict[int, int] = {}
        self._table_bound = g.pgd_pages + 64
        self._grow_tables()
        KN.alloc_root(self.T, self.M)

    # -- memory layout -----------------------------------------------------------
    def _layout(self, rows: dict[str, int]) -> None:
        """(Re)build M with room for ``rows`` of each region, keeping contents."""
        old = self.M
        size = KN.FIXED + sum(rows[name] * cols for name, _, cols in _REGIONS)
        M = np.zeros(size, dtype=np.int64)
        M[:KN.FIXED] = old[:KN.FIXED]
        off = KN.FIXED
        for name, key, cols in _REGIONS:
            n = rows[name] * cols
            prev = self._rows.get(name, 0) * cols
            if old is not M and int(old[key]) >= KN.FIXED:
                keep = min(prev, n)
                M[off:off + keep] = old[int(old[key]):int(old[key]) + keep]
            M[key] = off
            off += n
        self.M = M
        self._rows = dict(rows)

    def _region(self, name: str) -> np.ndarray:
        key = dict((n, k) for n, k, _ in _REGIONS)[name]
        cols = dict((n, c) for n, _, c in _REGIONS)[name]
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
        need = self._table_bound + KN.VCACHE_CAP * len(self.vcpus) + \
            kvm_mmu_split_nr_page_tables(self, self.split_chunk_size)
        cap = self._rows["refc"]
        if need <= cap:
            return
        used = int(self.M[KN.S_NEXT])
        T = np.zeros((need, self.geom.ptrs_per_table), dtype=np.int64)
        T[:used] = self.T[:used]
        self.T = T
        rows = dict(self._rows)
        rows["refc"] = rows["fstack"] = need
        self._layout(rows)
        self.M[KN.S_CAP] = need

    def _tables_for(self, slot: Memslot) -> int:
        g = self.geom
        n = 0
        for level in range(g.start_level + 1, 4):
            span = g.granule_size(level - 1)
            n += (slot.end_gpa - 1) // span - slot.base_gpa // span + 1
        return n

    def _count(self, kind: int, n: int = 1) -> None:
        self.M[KN.CNT0 + (OP["kvm"] * NKINDS + kind) * SLOTS + NOLEVEL] += n

    def _row(self, slot: Memslot) -> int:
        return self._slot_row[slot.id]

    def _slot_col(self, slot: Memslot, col: int) -> int:
        return int(self.M[KN.S_SLOTS]) + self._row(slot) * KN.NCOL + col

    # -- VMBase hooks -------------------------------------------------------------
    def set_eager_split_chunk_size(self, size: int) -> None:
        super().set_eager_split_chunk_size(size)
        self.M[KN.S_CHUNK] = size
        self._ensure_rows("scache", kvm_mmu_split_nr_page_tables(self, size) + 1)
        self._grow_tables()

    def enable_cap(self, cap: int, value: int) -> None:
        super().enable_cap(cap, value)
        self.M[KN.S_MANUAL] = self.manual_dirty_log_protect

    def _slot_created(self, slot: Memslot) -> None:
        n = int(self.M[KN.S_NSLOTS])
        self._ensure_rows("slots", n + 1)
        b = slot.backing
        kind = {"anonymous": KN.KIND_ANON, "thp": KN.KIND_THP, "hugetlb": KN.KIND_HUGETLB}[b.kind]
        row = {KN.C_BASE: slot.base_gfn, KN.C_NPAGES: slot.npages, KN.C_FLAGS: slot.flags,
               KN.C_HVA: slot.userspace_addr, KN.C_HPA: slot.host_pa, KN.C_SIZE: slot.size,
               KN.C_KIND: kind, KN.C_PAGESZ: b.page_size,
               KN.C_HCLASS: KN.HCLASS[b.hugetlb_class] if b.hugetlb_class else KN.HC_NONE,
               KN.C_ACTIVE: 1, KN.C_ID: slot.id}
        self._slot_row[slot.id] = n
        self.M[KN.S_NSLOTS] = n + 1
        for col, value in row.items():
            self.M[self._slot_col(slot, col)] = value
        self._table_bound += self._tables_for(slot)
        self._grow_tables()

    def _bitmap_changed(self, slot: Memslot, enabled: bool, all_set: bool) -> None:
        self.M[self._slot_col(slot, KN.C_FLAGS)] = slot.flags
        if not enabled:
            self.M[self._slot_col(slot, KN.C_HASBM)] = 0
            return
        words = np.array(slot.new_bitmap(all_set), dtype=np.uint64).view(np.int64)
        self.M[self._slot_col(slot, KN.C_BMOFF)] = len(self.B)
        self.M[self._slot_col(slot, KN.C_HASBM)] = 1
        self.B = np.concatenate([self.B, words])

    def set_memslot_flags(self, slot_id: int, flags: int) -> None:
        super().set_memslot_flags(slot_id, flags)
        if slot_id in self._slot_row:
            self.M[self._slot_col(self.memslots[slot_id], KN.C_FLAGS)] = flags

    def set_guest_page_size(self, size: int) -> None:
        super().set_guest_page_size(size)
        self.M[KN.S_GPS] = size.bit_length() - 1

    def _slot_deleted(self, slot: Memslot) -> None:
        mmu.stage2_apply_range(self.geom, slot.base_gpa, slot.end_gpa,
                               lambda addr, size: KN.s2_unmap(self.T, self.M, addr, size))
        self.M[self._slot_col(slot, KN.C_ACTIVE)] = 0
        self.M[KN.S_LASTSLOT] = -1

    def _get_dirty_log(self, slot: Memslot) -> np.ndarray:
        out = np.zeros(slot.nwords, dtype=np.int64)
        KN.get_dirty_log(self.T, self.M, self.B, self._row(slot), out)
        return out.view(np.uint64)  # unsigned words, like the reference's ints

    def _clear_dirty_log(self, slot: Memslot, first_page: int, num_pages: int,
                         bitmap: Sequence[int]) -> None:
        if isinstance(bitmap, np.ndarray):
            user = bitmap.view(np.int64) if bitmap.dtype == np.uint64 else \
                bitmap.astype(np.int64)
        else:
            user = np.array([int(w) for w in bitmap], dtype=np.uint64).view(np.int64)
        KN.clear_dirty_log(self.T, self.M, self.B, self._row(slot), first_page, num_pages,
                           np.ascontiguousarray(user))

    def _vcpu_added(self, vcpu: Vcpu) -> None:
        n = len(self.vcpus)
        for name in ("vcache", "vcn", "vregs"):
            self._ensure_rows(name, n)
        regs = self._region("vregs")
        regs[(n - 1) * 3:(n - 1) * 3 + 3] = (vcpu.gpa, vcpu.pages, vcpu.rng)
        self.M[KN.S_NVCPU] = n
        self._grow_tables()

    def wp_memory_region(self, slot: Memslot) -> None:
        KN.wp_memory_region(self.T, self.M, self._row(slot))

    def split_memory_region(self, slot: Memslot) -> None:
        KN.split_memory_region(self.T, self.M, self._row(slot))

    def free_split_cache(self) -> None:
        self._count(K_CACHE_PAGES_FREED, KN.cache_free_all(self.T, self.M, KN.MC_SPLIT))

    # -- snapshots (for running several variants off one run) ------------------
    def set_variant(self, variant: Variant) -> None:
        """Switch the walk flags to another (flag-only) variant."""
        require_flag_only(variant)
        self.variant = variant
        for op in WALK_OPS:
            self.M[KN.S_VF0 + OP[op]] = variant.flags_for(op)

    def snapshot(self) -> tuple:
        used = int(self.M[KN.S_NEXT])
        return (self.T[:used].copy(), self.M.copy(), self.B.copy(), dict(self._rows),
                copy.deepcopy((self.memslots, self.vcpus, self.manual_dirty_log_protect,
                               self.split_chunk_size, self._slot_row, self._table_bound)))

    def restore(self, snap: tuple) -> None:
        T, M, B, rows, py = snap
        if len(self.T) < len(T) or self.T.shape[1] != T.shape[1]:
            raise AssertionError("a snapshot from another VM")
        self.T[:len(T)] = T
        self.T[len(T):int(self.M[KN.S_NEXT])] = 0
        self.M = M.copy()
        self.B = B.copy()
        self._rows = dict(rows)
        (self.memslots, self.vcpus, self.manual_dirty_log_protect, self.split_chunk_size,
         self._slot_row, self._table_bound) = copy.deepcopy(py)

    def _state_parts(self, T: np.ndarray, M: np.ndarray, B: np.ndarray) -> tuple:
        """Everything but the counters, the scratch and the variant flags."""
        used = int(M[KN.S_NEXT])
        return T[:used], M[:KN.S_VF0], M[KN.ROOT0:], B

    def state_equals(self, snap: tuple) -> bool:
        """True when the live state equals the snapshot's (counters aside)."""
        T, M, B, rows, _ = snap
        if rows != self._rows or int(M[KN.S_NEXT]) != int(self.M[KN.S_NEXT]):
            return False
        return all(np.array_equal(a, b) for a, b in
                   zip(self._state_parts(self.T, self.M, self.B), self._state_parts(T, M, B)))

    # -- guest and results -----------------------------------------------------
    def guest_pass(self, write_percent: int, random_access: bool) -> None:
        ret = KN.guest_pass(self.T, self.M, self.B, self._replays, write_percent,
                            bool(random_access))
        if ret != 0:
            raise S2Error(f"a guest access failed (error {ret})")
        regs = self._region("vregs")
        for v in self.vcpus:
            v.rng = int(regs[v.index * 3 + 2])

    def destroy(self) -> None:
        for v in range(len(self.vcpus)):
            KN.cache_free_all(self.T, self.M, v)
        KN.cache_free_all(self.T, self.M, KN.MC_SPLIT)
        KN.s2_destroy(self.T, self.M)

    def take_counts(self) -> Counts:
        cnt = self.M[KN.CNT0:KN.CNT0 + SIZE]
        c = Counts.from_flat(cnt)
        cnt[:] = 0
        return c

    def _pfn(self, entry: int) -> int:
        return int(KN.pfn_of(self.M, np.int64(entry)))

    def dump_tables(self) -> bytes:
        """The reference's canonical image (:meth:`Stage2PageTable.dump`)."""
        g = self.geom
        out = bytearray()
        span = g.granule_size(g.start_level - 1)
        stack = [(int(self.M[KN.ROOT0 + i]), g.start_level, i * span)
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
        if not self.M[self._slot_col(slot, KN.C_HASBM)]:
            return None
        off = int(self.M[self._slot_col(slot, KN.C_BMOFF)])
        return [int(w) for w in self.B[off:off + slot.nwords].view(np.uint64)]

    def table_pages(self) -> int:
        """Table pages in use (reachable, or held by a cache)."""
        return int(self.M[KN.S_NEXT]) - int(self.M[KN.S_FTOP])

    def check_invariants(self) -> list[str]:
        problems = []
        g = self.geom
        refc = self._region("refc")
        stack = [(int(self.M[KN.ROOT0 + i]), g.start_level) for i in range(g.pgd_pages)]
        while stack:
            pfn, level = stack.pop()
            row = self.T[pfn]
            nz = int(np.count_nonzero(row))
            if int(refc[pfn]) != nz + 1:
                problems.append(f"table {pfn} (level {level}): refcount {int(refc[pfn])} "
                                f"!= {nz} + 1")
            if np.any(((row & 1) == 0) & ((row & KN.LOCKED) != 0)):
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
