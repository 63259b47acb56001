"""Work counters: what each operation did, per level, exactly.

A count is addressed by ``(op, kind, level)``. ``op`` is the operation that
started the work (the stage-2 function whose walk it is, or ``kvm`` for the
MMU layer); ``kind`` is what happened (an entry read, a visitor call, a TLBI,
a barrier...); ``level`` is the table level (-1..3) or ``None`` for events that
have no level (a range TLBI, a walk started, a lock drop).

Both engines count into the same integer layout -- ``op * KINDS * SLOTS +
kind * SLOTS + slot`` -- so the fast engine can write into a numpy array and
the reference engine into plain lists, and :class:`s2split.counting.counts.Counts`
compares them exactly. This module holds only the ids (numpy-free: the
real-KVM harness shares the core).
"""

from __future__ import annotations


# --- operations -------------------------------------------------------------
OPS: tuple[str, ...] = (
    "map",              # kvm_pgtable_stage2_map / stage2_map_walker
    "unmap",            # kvm_pgtable_stage2_unmap / stage2_unmap_walker
    "wrprotect",        # kvm_pgtable_stage2_wrprotect / stage2_attr_walker
    "relax_perms",      # kvm_pgtable_stage2_relax_perms / stage2_attr_walker
    "split",            # kvm_pgtable_stage2_split / stage2_split_walker
    "create_unlinked",  # kvm_pgtable_stage2_create_unlinked / stage2_map_walker
    "free_unlinked",    # kvm_pgtable_stage2_free_unlinked / stage2_free_walker
    "destroy",          # kvm_pgtable_stage2_destroy / stage2_free_walker
    "init",             # kvm_pgtable_stage2_init
    "get_leaf",         # kvm_pgtable_get_leaf / leaf_walker (host THP lookups)
    "kvm",              # the KVM MMU layer (faults, caches, dirty log, remote flushes)
)
OP = {name: i for i, name in enumerate(OPS)}
#: The operations that start walks with kvm_pgtable_walk() (create_unlinked and
#: free_unlinked walk a detached table directly).
WALK_OPS = ("map", "unmap", "wrprotect", "relax_perms", "split", "destroy", "get_leaf")
OP_MAP, OP_UNMAP, OP_WRPROTECT, OP_RELAX, OP_SPLIT, OP_CREATE_UNLINKED, OP_FREE_UNLINKED, \
    OP_DESTROY, OP_INIT, OP_GET_LEAF, OP_KVM = range(len(OPS))

# --- kinds ------------------------------------------------------------------
KIND_DOCS: tuple[tuple[str, str], ...] = (
    # the walker
    ("loops", "table loops entered (__kvm_pgtable_walk), by table level"),
    ("read_table", "entries read that were tables"),
    ("read_leaf", "entries read that were valid leaves (blocks or pages)"),
    ("read_invalid", "entries read that were invalid"),
    ("reload", "entries re-read after a visitor call"),
    ("visit_leaf", "visitor calls with LEAF"),
    ("visit_pre", "visitor calls with TABLE_PRE"),
    ("visit_post", "visitor calls with TABLE_POST"),
    ("descent", "child tables walked, by the level of the parent entry"),
    ("skip_level", "tables not descended into: their level is skipped"),
    ("skip_children", "new tables not descended into: built complete"),
    ("skip_siblings", "table loops cut short by a skip-siblings hint"),
    # entries and table pages
    ("pte_write", "plain or release stores to an entry"),
    ("pte_cas", "compare-and-swap updates of an entry"),
    ("bbm", "entries broken before make (locked)"),
    ("get_page", "table-page references taken"),
    ("put_page", "table-page references dropped"),
    ("page_taken", "table pages taken from a memory cache"),
    ("page_freed", "table pages freed (last reference dropped), by table level"),
    # TLB maintenance and barriers
    ("tlbi_ipa", "__kvm_tlb_flush_vmid_ipa calls (IPAS2E1IS), by TTL level"),
    ("tlbi_ipa_nsh", "__kvm_tlb_flush_vmid_ipa_nsh calls (IPAS2E1), by TTL level"),
    ("tlbi_range", "__kvm_tlb_flush_vmid_range calls"),
    ("tlbi_range_pages", "pages covered by __kvm_tlb_flush_vmid_range"),
    ("tlbi_range_ops", "TLBI instructions issued for range invalidations"),
    ("tlbi_vmid", "__kvm_tlb_flush_vmid calls (VMALLS12E1IS)"),
    ("tlbi_s1", "stage-1 invalidations following a stage-2 one (VMALLE1[IS])"),
    ("flush_range", "kvm_tlb_flush_vmid_range calls"),
    ("flush_range_bytes", "bytes passed to kvm_tlb_flush_vmid_range"),
    ("hyp_call", "calls into EL2 (nVHE only)"),
    ("dsb_ishst", "DSB ISHST"),
    ("dsb_ish", "DSB ISH"),
    ("dsb_nshst", "DSB NSHST"),
    ("dsb_nsh", "DSB NSH"),
    ("isb", "ISB"),
    ("dcache_ops", "D-cache clean+invalidate to PoC calls"),
    ("dcache_bytes", "bytes cleaned+invalidated to PoC"),
    ("icache_ops", "I-cache invalidate to PoU calls"),
    ("icache_bytes", "bytes invalidated in the I-cache"),
    # calls
    ("walks", "kvm_pgtable_walk calls"),
    ("walk_bytes", "bytes passed to kvm_pgtable_walk"),
    ("calls", "calls of the operation's API function (by level for create_unlinked)"),
    ("calls_force_pte", "create_unlinked calls with force_pte"),
    ("errors", "calls that returned an error other than -EAGAIN"),
    ("eagain", "calls that returned -EAGAIN"),
    # the KVM MMU layer
    ("aborts", "kvm_handle_guest_abort calls"),
    ("mmio_exits", "aborts outside any memslot (MMIO, e.g. GUEST_SYNC)"),
    ("trans_faults", "translation faults handled by user_mem_abort"),
    ("perm_faults", "permission faults handled by user_mem_abort"),
    ("vcpu_topups", "__kvm_mmu_topup_memory_cache calls on a vCPU cache"),
    ("split_topups", "__kvm_mmu_topup_memory_cache calls on the split cache"),
    ("cache_pages_alloc", "pages allocated into memory caches by top-ups"),
    ("cache_pages_freed", "cached pages freed unused (kvm_mmu_free_memory_cache)"),
    ("lock_drops", "MMU-lock drops in kvm_mmu_split_huge_pages"),
    ("split_huge_pages", "kvm_mmu_split_huge_pages calls"),
    ("split_chunks", "kvm_pgtable_stage2_split calls issued per chunk"),
    ("log_dirty_masked", "kvm_arch_mmu_enable_log_dirty_pt_masked calls"),
    ("bitmap_words", "dirty-bitmap words examined by get/clear dirty log"),
    ("dirty_marked", "pages marked dirty (mark_page_dirty_in_slot)"),
    ("flush_memslot", "kvm_flush_remote_tlbs_memslot calls"),
    ("guest_accesses", "guest loads and stores to test memory (one per page per pass)"),
    ("ioctls", "VM ioctls from userspace (memslot changes, get and clear dirty log)"),
    # where the entry reads hit (s2split.arm64.hierarchy): these four partition
    # read_table + read_leaf + read_invalid of every operation but get_leaf
    # (host page tables, not laid out); re-reads (reload) are not in them
    ("hit_l1", "entry reads that hit L1 (reuse distance below L1's lines)"),
    ("hit_l2", "entry reads that hit L2"),
    ("hit_llc", "entry reads that hit the last-level cache"),
    ("hit_dram", "entry reads from DRAM (first touch, or reuse distance beyond the LLC)"),
)
KINDS: tuple[str, ...] = tuple(k for k, _ in KIND_DOCS)
KIND = {name: i for i, name in enumerate(KINDS)}
NOPS = len(OPS)
NKINDS = len(KINDS)
SLOTS = 6  # levels -1..3, then "no level"
NOLEVEL = 5
SIZE = NOPS * NKINDS * SLOTS

# Module-level integer constants (K_LOOPS, K_READ_TABLE, ...) for hot paths
# and for the compiled engine, which reads them as compile-time constants.
for _i, _name in enumerate(KINDS):
    globals()["K_" + _name.upper()] = _i
del _i, _name

#: The hit kinds in order of distance: K_HIT_L1 + class (hierarchy.L1..DRAM).
HIT_KINDS = ("hit_l1", "hit_l2", "hit_llc", "hit_dram")
assert [KIND[k] for k in HIT_KINDS] == list(range(KIND["hit_l1"], KIND["hit_l1"] + 4))


def slot(level: int | None) -> int:
    return NOLEVEL if level is None else level + 1


def slot_level(s: int) -> int | None:
    return None if s == NOLEVEL else s - 1
