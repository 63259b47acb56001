"""Stage-2 page-table operations: ``kvm_pgtable_stage2_*`` and their visitors.

Each operation is one walk with one small visitor, as in
``arch/arm64/kvm/hyp/pgtable.c`` (Linux 6.12). Operations return ``0`` or a
negative errno like the kernel; invalid Python arguments raise
:class:`~s2split.plumbing.errors.S2Error`.

Ordering that matters for the counts:

* break-before-make (:meth:`Stage2PageTable._try_break`) locks the entry, then
  invalidates the old translation (one by-IPA TLBI for a valid leaf, a range
  flush for a table) unless the walk has SKIP_BBM_TLBI, then drops the table
  page's reference; :meth:`_make` takes a reference and publishes the new
  entry with a release store;
* the split visitor first builds the new subtree off-line
  (:meth:`create_unlinked`, which walks the new page with the map visitor and
  SKIP_BBM_TLBI|SKIP_CMO), then breaks the block and publishes the table -- and
  the walker re-reads the entry and descends into what was just built.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterator

from ...arm64 import pte as P
from ...arm64 import rules as R
from ...arm64.arch import LAST_LEVEL, Geometry
from ...arm64.features import Features
from ...arm64.versions import DEFAULT_KERNEL, kernel_rules
from ...counting.counters import (OP, K_BBM, K_CALLS, K_CALLS_FORCE_PTE, K_EAGAIN, K_ERRORS,
                                  K_GET_PAGE, K_PAGE_FREED, K_PAGE_TAKEN, K_PTE_CAS, K_PTE_WRITE,
                                  K_PUT_PAGE, NOLEVEL, OP_CREATE_UNLINKED, OP_DESTROY,
                                  OP_FREE_UNLINKED, OP_GET_LEAF, OP_INIT, OP_MAP, OP_RELAX,
                                  OP_SPLIT, OP_UNMAP, OP_WRPROTECT, OPS, SLOTS)
from ...counting.counts import Tally
from ...plumbing.errors import E2BIG, EAGAIN, EINVAL, ENOMEM, S2Error, require_int
from . import tlb
from .api_visitors import stage2_split_walker
from .memory import MemoryCache, TableMemory
from .variants import VANILLA, Variant
from .variants import is_api_visitor as _takes_context
from .visitor_api import AFTER_WALK, TTL_UNKNOWN, VisitCtx
from .walker import (HANDLE_FAULT, LEAF, RETURN_HINTS, SHARED, SKIP_BBM_TLBI, SKIP_CMO,
                     SKIP_NEW_CHILDREN, TABLE_POST, TABLE_PRE, HINT_SKIP_CHILDREN,
                     HINT_SKIP_SIBLINGS, Walk, kvm_pgtable_walk, walk_table)



@dataclass(slots=True)
class MapData:
    """``struct stage2_map_data``."""

    phys: int
    attr: int
    memcache: MemoryCache | None
    force_pte: bool = False


#: ``AttrData.level`` before a visitor records one.
LEVEL_UNSET = -2


@dataclass(slots=True)
class AttrData:
    """``struct stage2_attr_data``."""

    attr_set: int
    attr_clr: int
    pte: int = 0
    level: int = -2  # LEVEL_UNSET until the visitor records the leaf's level



def _require_cache(mc: object, optional: bool = False) -> None:
    if mc is None and optional:
        return
    if not isinstance(mc, MemoryCache):
        raise S2Error(f"the memory cache must be a MemoryCache{' or None' if optional else ''}, "
                      f"got {mc!r}")

class Stage2PageTable:
    """One VM's stage-2 page table (``struct kvm_pgtable`` + its ``kvm_s2_mmu``).

    ``tally`` collects the counters; the KVM layer takes them (``tally.take()``)
    at each phase boundary. ``variant`` adds walk flags (or
    replaces visitors) for the operations it names.
    """

    def __init__(self, geom: Geometry, features: Features | None = None,
                 variant: Variant = VANILLA, tally: Tally | None = None,
                 mem: TableMemory | None = None, kernel: str = DEFAULT_KERNEL):
        self.geom = geom
        self.rules = kernel_rules(kernel)
        self.features = self.rules.cpu_features(features or Features())
        variant.check_cpu(self.features)
        self.variant = variant
        # Visitors written with the API take a context (visitor_api.VisitCtx).
        self._visitors = {op: (_from_api(fn) if _takes_context(fn) else fn)
                          for op, fn in variant.visitors.items()}
        #: A variant's after-walk hooks by operation id (kvm_pgtable_walk calls them).
        self.after_walk = {OP[op]: _hook_from_api(fn) for op, fn in variant.after_walk.items()}
        self.tally = tally or Tally()
        self.mem = mem or TableMemory(geom)
        self.tally.on_take = self.mem.forget_lines
        self.ptrs = geom.ptrs_per_table
        self.shifts = geom.shifts
        self._addr_mask = P.addr_mask(geom)
        self.root: list[int] | None = None
        #: An attached TLB model (:mod:`s2split.model.pgtable.tlb_model`), told of
        #: every descriptor write, TLB maintenance and barrier; None (the
        #: default) costs one test per event.
        self.tracer = None
        self._init()

    # -- helpers -----------------------------------------------------------
    def pte_to_phys(self, pte: int) -> int:
        if self.geom.lpa2 or self.geom.granule == 65536:
            return P.pte_to_phys(pte, self.geom)
        return pte & self._addr_mask

    def _c(self, op: int) -> list[int]:
        return self.tally.ops[op]

    def _phys_valid(self, phys: int) -> bool:
        """``kvm_phys_is_valid()``: below the largest PA KVM supports."""
        return phys < (1 << (52 if (self.geom.lpa2 or self.geom.lpa) else 48))

    #: Walk flags an MMU hook has turned off for the walks it starts
    #: (``mmu_api.split_huge_pages_all_levels``: the variant's skip flags).
    flags_clear = 0

    def _flags(self, op_name: str, flags: int) -> int:
        return (flags | self.variant.flags_for(op_name)) & ~self.flags_clear

    def _visitor(self, op_name: str, default):
        return self._visitors.get(op_name, default)

    @staticmethod
    def _result(c: list[int], ret: int) -> int:
        if ret == -EAGAIN:
            c[K_EAGAIN * SLOTS + NOLEVEL] += 1
        elif ret:
            c[K_ERRORS * SLOTS + NOLEVEL] += 1
        return ret

    def _check_range(self, addr: int, size: int) -> None:
        require_int("address", addr)
        require_int("size", size)

    # -- entries: set, break, make (stage2_try_set_pte & co) ---------------
    def _set(self, w: Walk, table: list, idx: int, old: int, new: int, level: int) -> bool:
        """``stage2_try_set_pte()``: a plain store, or a CAS for shared walks."""
        tr = self.tracer
        if not w.flags & SHARED:
            if tr is not None:
                tr.write(table, idx, level, table[idx], new)
            table[idx] = new
            w.c[K_PTE_WRITE * SLOTS + level + 1] += 1
            return True
        if table[idx] != old:  # pragma: no cover - one thread in the model
            return False
        if tr is not None:
            tr.write(table, idx, level, old, new)
        table[idx] = new
        w.c[K_PTE_CAS * SLOTS + level + 1] += 1
        return True

    def _get_page(self, c: list[int], pfn: int, level: int) -> None:
        self.mem.get(pfn)
        c[K_GET_PAGE * SLOTS + level + 1] += 1

    def _put_page(self, c: list[int], pfn: int, level: int) -> None:
        """Drop a reference on the table page at ``level`` (freeing it at zero)."""
        c[K_PUT_PAGE * SLOTS + level + 1] += 1
        if self.mem.put(pfn):
            c[K_PAGE_FREED * SLOTS + level + 1] += 1

    def _try_break(self, w: Walk, pfn: int, table: list, idx: int, old: int, level: int) -> bool:
        """``stage2_try_break_pte()``."""
        if P.is_locked(old):
            return False
        if not self._set(w, table, idx, old, P.LOCKED, level):
            return False
        c = w.c
        c[K_BBM * SLOTS + level + 1] += 1
        if not w.flags & SKIP_BBM_TLBI:
            if P.is_table(old, level):
                size = self.geom.granule_size(level)
                tlb.flush_vmid_range(c, self.features, w.addr & ~(size - 1), size,
                                     self.geom.page_shift, self.geom.lpa2, self.tracer)
            elif old & P.VALID:
                tlb.flush_vmid_ipa(c, self.features, level, self.tracer, w.addr)
        if old:
            self._put_page(c, pfn, level)
        return True

    def _make(self, w: Walk, pfn: int, table: list, idx: int, new: int, level: int) -> None:
        """``stage2_make_pte()``: take a reference, then a release store."""
        if new:
            self._get_page(w.c, pfn, level)
        if self.tracer is not None:
            self.tracer.write(table, idx, level, table[idx], new)
        table[idx] = new
        w.c[K_PTE_WRITE * SLOTS + level + 1] += 1

    def _take_page(self, c: list[int], mc: MemoryCache | None, level: int) -> int | None:
        pfn = mc.alloc() if mc is not None else None
        if pfn is not None:
            c[K_PAGE_TAKEN * SLOTS + level + 1] += 1
        return pfn

    # -- init / destroy ----------------------------------------------------
    def _init(self) -> None:
        """``kvm_pgtable_stage2_init()``: zeroed, concatenated root pages."""
        c = self._c(OP_INIT)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        self.root = [self.mem.alloc() for _ in range(self.geom.pgd_pages)]
        tlb.dsb_ishst(c, self.tracer)

    def destroy(self) -> None:
        """``kvm_pgtable_stage2_destroy()``: drop every reference, free the root."""
        self.destroy_range(0, self.geom.ipa_size)
        self.destroy_pgd()

    def destroy_range(self, addr: int, size: int) -> None:
        """The free walk over ``[addr, addr+size)`` (``kvm_pgtable_stage2_destroy_range()``
        since 6.17; the first half of ``kvm_pgtable_stage2_destroy()`` before)."""
        if self.root is None:
            raise S2Error("this page table was already destroyed")
        self._check_range(addr, size)
        c = self._c(OP_DESTROY)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        if self.tracer is not None:
            self.tracer.retire()
        kvm_pgtable_walk(self, addr, size, self._visitor("destroy", _free_visitor),
                         self._flags("destroy", LEAF | TABLE_POST), None, OP_DESTROY)

    def destroy_pgd(self) -> None:
        """Free the (concatenated) root pages, whatever references remain."""
        if self.root is None:
            raise S2Error("this page table was already destroyed")
        c = self._c(OP_DESTROY)
        if self.tracer is not None:
            self.tracer.retire()
        for pfn in self.root:
            self.mem.free(pfn)
            c[K_PAGE_FREED * SLOTS + self.geom.start_level + 1] += 1
        self.root = None

    # -- map ---------------------------------------------------------------
    def map(self, addr: int, size: int, phys: int, prot: int, mc: MemoryCache | None,
            flags: int = 0) -> int:
        """``kvm_pgtable_stage2_map()``: map ``[addr, addr+size)`` to ``phys``."""
        self._check_range(addr, size)
        require_int("physical address", phys)
        require_int("prot", prot)
        _require_cache(mc, optional=True)
        c = self._c(OP_MAP)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        attr = P.prot_to_attr(prot, self.geom, self.features.fwb)
        if attr < 0:
            return self._result(c, attr)
        data = MapData(phys & ~(self.geom.granule - 1), attr, mc)
        ret = kvm_pgtable_walk(self, addr, size, self._visitor("map", _map_visitor),
                               self._flags("map", flags | TABLE_PRE | LEAF), data, OP_MAP)
        tlb.dsb_ishst(c, self.tracer)
        return self._result(c, ret)

    def _map_phys(self, w: Walk, data: MapData) -> int:
        if not self._phys_valid(data.phys):
            return data.phys
        return data.phys + (w.addr - w.start)

    def _leaf_allowed(self, w: Walk, level: int, data: MapData) -> bool:
        """``stage2_leaf_mapping_allowed()`` / ``kvm_block_mapping_supported()``."""
        if data.force_pte and level < LAST_LEVEL:
            return False
        if not self.geom.supports_block(level):
            return False
        granule = 1 << self.shifts[level + 1]
        if granule > w.end - w.addr:
            return False
        phys = self._map_phys(w, data)
        if self._phys_valid(phys) and phys & (granule - 1):
            return False
        return not w.addr & (granule - 1)

    def _try_leaf(self, w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                  data: MapData) -> int:
        """``stage2_map_walker_try_leaf()``."""
        if not self._leaf_allowed(w, level, data):
            return -E2BIG
        new = P.make_leaf(self._map_phys(w, data), data.attr, level, self.geom)
        if not P.needs_update(old, new):
            # Only permissions differ: let the vCPU fault again and relax them.
            return -EAGAIN
        if not w.flags & SHARED and not (old ^ new) & ~P.SW_MASK:
            # Only software bits change: store them in place.
            if bool(old) != bool(new):
                (self._put_page if old else self._get_page)(w.c, pfn, level)
            self._set(w, table, idx, old, new, level)
            return 0
        if not self._try_break(w, pfn, table, idx, old, level):
            return -EAGAIN
        granule = 1 << self.shifts[level + 1]
        if not w.flags & SKIP_CMO:
            if P.is_cacheable(new, self.features.fwb):
                tlb.dcache_clean_inval_poc(w.c, self.features, level, granule)
            if P.is_executable(new):
                tlb.icache_inval_pou(w.c, self.features, level, granule, self.tracer)
        self._make(w, pfn, table, idx, new, level)
        return 0

    def _map_leaf(self, w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                  data: MapData) -> int:
        """``stage2_map_walk_leaf()``: a leaf here, or a new table to descend into."""
        ret = self._try_leaf(w, pfn, table, idx, old, level, data)
        if ret != -E2BIG:
            return ret
        if level == LAST_LEVEL:
            return -EINVAL
        if data.memcache is None:
            return -ENOMEM
        child = self._take_page(w.c, data.memcache, level)
        if child is None:
            return -ENOMEM
        if not self._try_break(w, pfn, table, idx, old, level):  # pragma: no cover
            self.mem.put(child)
            return -EAGAIN
        # A block in the way is replaced by a table; the rest of the old block
        # (outside [addr, end)) is mapped lazily by later faults.
        self._make(w, pfn, table, idx, P.make_table(self.mem.pa(child), self.geom), level)
        return 0

    def _map_table_pre(self, w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                       data: MapData) -> int:
        """``stage2_map_walk_table_pre()``: collapse a table into a block if one fits."""
        child = self.mem.pfn(self.pte_to_phys(old))
        if not self._leaf_allowed(w, level, data):
            return 0
        ret = self._try_leaf(w, pfn, table, idx, old, level, data)
        if ret:
            return ret
        # The kernel defers this through RCU; the model frees at once.
        self.free_unlinked(child, level)
        return 0

    # -- unmap -------------------------------------------------------------
    def _unmap_defers_tlbi(self) -> bool:
        """``stage2_unmap_defer_tlb_flush()`` (:func:`s2split.arm64.rules.unmap_defers_tlbi`)."""
        return R.unmap_defers_tlbi(self.features.tlbirange, self.features.fwb)

    def unmap(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_unmap()``."""
        self._check_range(addr, size)
        c = self._c(OP_UNMAP)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        ret = kvm_pgtable_walk(self, addr, size, self._visitor("unmap", _unmap_visitor),
                               self._flags("unmap", LEAF | TABLE_POST), None, OP_UNMAP)
        if self._unmap_defers_tlbi():
            tlb.flush_vmid_range(c, self.features, addr, size, self.geom.page_shift,
                                 self.geom.lpa2, self.tracer)
        return self._result(c, ret)

    def _unmap_put(self, w: Walk, pfn: int, table: list, idx: int, old: int,
                   level: int) -> None:
        """``stage2_unmap_put_pte()`` (6.12: a table is invalidated by IPA, TTL unknown)."""
        if old & P.VALID:
            tr = self.tracer
            # The kernel invalidates at ctx->addr, the walk's address when the
            # entry was visited: inside the entry's range, as its base is.
            ipa = tr.entry_ipa(table, idx) if tr is not None else 0
            if tr is not None:
                tr.write(table, idx, level, table[idx], 0)
            table[idx] = 0
            w.c[K_PTE_WRITE * SLOTS + level + 1] += 1
            if P.is_table(old, level):
                tlb.flush_vmid_ipa(w.c, self.features, None, tr, ipa)
            elif not self._unmap_defers_tlbi():
                tlb.flush_vmid_ipa(w.c, self.features, level, tr, ipa)
        self._put_page(w.c, pfn, level)

    # -- attributes: wrprotect, relax_perms --------------------------------
    def _update_leaf_attrs(self, addr: int, size: int, attr_set: int, attr_clr: int,
                           flags: int, op: int, op_name: str) -> tuple[int, AttrData]:
        """``stage2_update_leaf_attrs()``."""
        mask = P.ATTR_LO_MASK | P.ATTR_HI_MASK
        data = AttrData(attr_set & mask, attr_clr & mask)
        ret = kvm_pgtable_walk(self, addr, size, self._visitor(op_name, _attr_visitor),
                               self._flags(op_name, flags | LEAF), data, op)
        return ret, data

    def wrprotect(self, addr: int, size: int) -> int:
        """``kvm_pgtable_stage2_wrprotect()``: clear S2AP.W on valid leaves in place."""
        self._check_range(addr, size)
        c = self._c(OP_WRPROTECT)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        ret, _ = self._update_leaf_attrs(addr, size, 0, P.S2AP_W, 0, OP_WRPROTECT, "wrprotect")
        if self.tracer is not None:
            self.tracer.protected(addr, size)
        return self._result(c, ret)

    def relax_perms(self, addr: int, prot: int) -> int:
        """``kvm_pgtable_stage2_relax_perms()`` (6.12): one-page walk, then a local TLBI."""
        self._check_range(addr, 0)
        require_int("prot", prot)
        c = self._c(OP_RELAX)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        if prot & P.SW_MASK:
            return self._result(c, -EINVAL)
        attr_set = attr_clr = 0
        if prot & P.Prot.R:
            attr_set |= P.S2AP_R
        if prot & P.Prot.W:
            attr_set |= P.S2AP_W
        if prot & P.Prot.X:
            attr_clr |= P.XN
        ret, data = self._update_leaf_attrs(addr, 1, attr_set, attr_clr, HANDLE_FAULT | SHARED,
                                            OP_RELAX, "relax_perms")
        if ret == 0 or ret == -EAGAIN:
            # A variant's own visitor may not record the leaf's level (it stays
            # unset): the TLBI then goes without a level hint, as on -EAGAIN.
            level = data.level if ret == 0 and data.level != LEVEL_UNSET else None
            tlb.flush_vmid_ipa_nsh(c, self.features, level, self.tracer, addr)
        return self._result(c, ret)

    # -- split -------------------------------------------------------------
    def split(self, addr: int, size: int, mc: MemoryCache) -> int:
        """``kvm_pgtable_stage2_split()``: split every block in the range to pages."""
        self._check_range(addr, size)
        _require_cache(mc)
        c = self._c(OP_SPLIT)
        c[K_CALLS * SLOTS + NOLEVEL] += 1
        ret = kvm_pgtable_walk(self, addr, size, self._visitor("split", _split_visitor),
                               self._flags("split", LEAF), mc, OP_SPLIT)
        tlb.dsb_ishst(c, self.tracer)
        return self._result(c, ret)

    def block_nr_page_tables(self, level: int) -> int:
        """``stage2_block_get_nr_page_tables()``: pages to split a block to pages."""
        return R.block_nr_page_tables(level, self.ptrs)

    def create_unlinked(self, phys: int, level: int, prot: int, mc: MemoryCache | None,
                        force_pte: bool) -> int:
        """``kvm_pgtable_stage2_create_unlinked()``: a detached subtree mapping
        ``granule(level)`` bytes at ``phys``; returns its page or a negative errno."""
        require_int("physical address", phys)
        if require_int("level", level, minimum=-1) > LAST_LEVEL:
            raise S2Error(f"level must be at most {LAST_LEVEL}, got {level}")
        require_int("prot", prot)
        _require_cache(mc, optional=True)
        c = self._c(OP_CREATE_UNLINKED)
        c[K_CALLS * SLOTS + level + 1] += 1
        if force_pte:
            c[K_CALLS_FORCE_PTE * SLOTS + level + 1] += 1
        size = self.geom.granule_size(level)
        if phys & (size - 1):
            return self._result(c, -EINVAL)
        attr = P.prot_to_attr(prot, self.geom, self.features.fwb)
        if attr < 0:
            return self._result(c, attr)
        pgtable = self._take_page(c, mc, level)
        if pgtable is None:
            return self._result(c, -ENOMEM)
        # The input address is irrelevant for an unlinked table: walk [0, size).
        w = Walk(self, _map_visitor, LEAF | SKIP_BBM_TLBI | SKIP_CMO,
                 MapData(phys, attr, mc, force_pte), 0, size, c)
        ret = walk_table(w, pgtable, level + 1)
        if ret:
            self.free_unlinked(pgtable, level)
            return self._result(c, ret)
        return pgtable

    def free_unlinked(self, pfn: int, level: int) -> None:
        """``kvm_pgtable_stage2_free_unlinked()``: drop a detached subtree."""
        c = self._c(OP_FREE_UNLINKED)
        c[K_CALLS * SLOTS + level + 1] += 1
        w = Walk(self, _free_visitor, LEAF | TABLE_POST, None, 0, self.geom.granule_size(level),
                 c)
        walk_table(w, pfn, level + 1)
        self._put_page(c, pfn, level + 1)

    # -- lookups (uncounted: the hardware walker, and the model's views) ----
    def lookup(self, ipa: int) -> tuple[int, int]:
        """The entry translating ``ipa`` and its level, as the MMU sees it."""
        if self.root is None:
            raise S2Error("this page table was destroyed")
        geom = self.geom
        level = geom.start_level
        table = self.mem.pages[self.root[geom.pgd_page_index(ipa)]]
        while True:
            entry = table[(ipa >> self.shifts[level + 1]) & (self.ptrs - 1)]
            if level == LAST_LEVEL or (entry & 3) != 3:
                return entry, level
            table = self.mem.pages[self.mem.pfn(self.pte_to_phys(entry))]
            level += 1

    def get_leaf(self, addr: int) -> tuple[int, int, int]:
        """``kvm_pgtable_get_leaf()``: a counted one-page walk; ``(ret, pte, level)``."""
        data = [0, -2]
        ret = kvm_pgtable_walk(self, addr & ~(self.geom.granule - 1), self.geom.granule,
                               _leaf_visitor, LEAF, data, OP_GET_LEAF)
        return ret, data[0], data[1]

    def translate(self, ipa: int) -> tuple[int, P.Prot] | None:
        """``(pa, prot)`` for ``ipa``, or None when unmapped."""
        entry, level = self.lookup(ipa)
        if not entry & P.VALID:
            return None
        offset = ipa & ((1 << self.shifts[level + 1]) - 1)
        return self.pte_to_phys(entry) + offset, P.pte_prot(entry)

    def tables(self) -> Iterator[tuple[int, int, int, list[int]]]:
        """Every reachable table: ``(pfn, level, base_ipa, entries)``, root first."""
        geom = self.geom
        span = geom.granule_size(geom.start_level - 1)
        stack = [(pfn, geom.start_level, i * span) for i, pfn in enumerate(self.root or ())]
        stack.reverse()
        while stack:
            pfn, level, base = stack.pop()
            entries = self.mem.table(pfn)
            yield pfn, level, base, entries
            if level < LAST_LEVEL:
                g = geom.granule_size(level)
                children = [(self.mem.pfn(self.pte_to_phys(e)), level + 1, base + i * g)
                            for i, e in enumerate(entries) if (e & 3) == 3]
                stack.extend(reversed(children))

    def leaves(self) -> Iterator[tuple[int, int, int]]:
        """Every valid leaf: ``(ipa, level, entry)`` in address order."""
        found = []
        # tables() is pre-order (a table's own blocks come before its
        # children's pages), so sort to get address order.
        for _, level, base, entries in self.tables():
            g = self.geom.granule_size(level)
            for i, e in enumerate(entries):
                if e & P.VALID and (level == LAST_LEVEL or not e & P.TYPE):
                    found.append((base + i * g, level, e))
        found.sort()
        yield from found

    def dump(self) -> bytes:
        """A canonical, bit-exact image of the reachable tables (for comparisons)."""
        import struct

        out = bytearray()
        for pfn, level, base, entries in self.tables():
            out += struct.pack("<qiq", self.mem.pa(pfn), level, base)
            out += struct.pack(f"<{len(entries)}Q", *entries)
        return bytes(out)

    def check_invariants(self) -> list[str]:
        """Problems found: refcounts that are not 1 + non-zero entries, locked entries."""
        problems = []
        for pfn, level, base, entries in self.tables():
            nz = sum(1 for e in entries if e)
            if self.mem.refcount[pfn] != nz + 1:
                problems.append(f"table {pfn} (level {level}, ipa {base:#x}): refcount "
                                f"{self.mem.refcount[pfn]} != {nz} entries + 1")
            for i, e in enumerate(entries):
                if P.is_locked(e):
                    problems.append(f"locked entry left at level {level} index {i}")
        return problems


# -- visitors ----------------------------------------------------------------
# Small and single-purpose, like the kernel's; ``w.pgt`` is the page table.

def _api_call(fn, what: str, ctx: VisitCtx) -> int:
    """FN(CTX), held to what the fast engine's compiled call allows: an
    integer back (0, a negative errno, a hint), and no recursion without
    end; anything else is a one-line error naming the function."""
    try:
        ret = fn(ctx)
    except RecursionError:
        raise S2Error(f"{what} {_api_name(fn)} recursed too deeply (it calls itself "
                      "without end?)") from None
    if isinstance(ret, bool) or not isinstance(ret, numbers.Integral):
        raise S2Error(f"{what} {_api_name(fn)} returned {type(ret).__name__} {ret!r:.40}; it "
                      "must return an integer (0, a negative errno or a hint)")
    return int(ret)


def _api_name(fn) -> str:
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{getattr(fn, '__qualname__', fn)!s}{where}"


def _from_api(fn):
    """A visitor written with :mod:`~s2split.model.pgtable.visitor_api`, as the walker calls it."""
    def visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                visit: int) -> int:
        return _api_call(fn, "visitor", VisitCtx(w, pfn, table, idx, old, level, visit))
    return visitor


def _hook_from_api(fn):
    """An after-walk hook, as :func:`~s2split.model.pgtable.walker.kvm_pgtable_walk` calls it."""
    def hook(w: Walk) -> int:
        return _api_call(fn, "after-walk hook",
                         VisitCtx(w, -1, None, -1, 0, TTL_UNKNOWN, AFTER_WALK))
    return hook


def _map_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                 visit: int) -> int:
    """``stage2_map_walker()``."""
    if visit == TABLE_PRE:
        return w.pgt._map_table_pre(w, pfn, table, idx, old, level, w.arg)
    if visit == LEAF:
        return w.pgt._map_leaf(w, pfn, table, idx, old, level, w.arg)
    return -EINVAL


def _unmap_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                   visit: int) -> int:
    """``stage2_unmap_walker()``: clear leaves, free tables that became empty."""
    pgt = w.pgt
    if not old & P.VALID:
        if old:  # an invalid but counted entry (ownership annotation)
            if pgt.tracer is not None:
                pgt.tracer.write(table, idx, level, old, 0)
            table[idx] = 0
            w.c[K_PTE_WRITE * SLOTS + level + 1] += 1
            pgt._put_page(w.c, pfn, level)
        return 0
    child = None
    need_flush = False
    if P.is_table(old, level):
        child = pgt.mem.pfn(pgt.pte_to_phys(old))
        if pgt.mem.refcount[child] != 1:
            return 0
    elif P.is_cacheable(old, pgt.features.fwb):
        need_flush = not pgt.features.fwb
    pgt._unmap_put(w, pfn, table, idx, old, level)
    if need_flush:
        tlb.dcache_clean_inval_poc(w.c, pgt.features, level, pgt.geom.granule_size(level))
    if child is not None:
        pgt._put_page(w.c, child, level + 1)
    return 0


def _attr_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                  visit: int) -> int:
    """``stage2_attr_walker()``: change attribute bits of a valid leaf in place."""
    if not old & P.VALID:
        return -EAGAIN
    data: AttrData = w.arg
    data.level = level
    data.pte = old
    new = (old & ~data.attr_clr) | data.attr_set
    if new != old:
        pgt = w.pgt
        if P.is_executable(new) and not P.is_executable(old):
            tlb.icache_inval_pou(w.c, pgt.features, level, pgt.geom.granule_size(level),
                                 pgt.tracer)
        if not pgt._set(w, table, idx, old, new, level):  # pragma: no cover
            return -EAGAIN
    return 0


def _split_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                   visit: int) -> int:
    """``stage2_split_walker()``: replace a block by a subtree of pages
    (:func:`s2split.model.pgtable.api_visitors.stage2_split_walker`, written once
    for both engines)."""
    return stage2_split_walker(VisitCtx(w, pfn, table, idx, old, level, visit))


def _free_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                  visit: int) -> int:
    """``stage2_free_walker()``: drop the references an entry holds. A leaf
    drops its table page's; a table, at TABLE_POST, also its child's -- in
    6.12 always, since 6.19 only once the child is empty, and then its entry
    is cleared (:func:`s2split.arm64.rules.free_drops_table`)."""
    if not old:
        return 0
    pgt = w.pgt
    if not P.is_table(old, level):
        pgt._put_page(w.c, pfn, level)
        return 0
    clears = pgt.rules.free_clears_tables
    if visit != TABLE_POST and clears:
        return -EINVAL  # 6.19 expects tables only after their children
    child = pgt.mem.pfn(pgt.pte_to_phys(old))
    if not R.free_drops_table(clears, pgt.mem.refcount[child]):
        return 0
    pgt._put_page(w.c, pfn, level)
    pgt._put_page(w.c, child, level + 1)
    if R.free_clears_entry(clears):
        if pgt.tracer is not None:
            pgt.tracer.write(table, idx, level, old, 0)
        table[idx] = 0
        w.c[K_PTE_WRITE * SLOTS + level + 1] += 1
    return 0


def _leaf_visitor(w: Walk, pfn: int, table: list, idx: int, old: int, level: int,
                  visit: int) -> int:
    """``leaf_walker()``."""
    w.arg[0] = old
    w.arg[1] = level
    return 0


__all__ = ["Stage2PageTable", "MapData", "AttrData", "OPS"]
