"""The fast engine's state: three int64 arrays and the layout of the scalar one.

All state lives in three arrays passed to every compiled function: ``T`` (table
entries, one row per table page), ``M`` (scalars, counters, walk state and the
variable-size regions) and ``B`` (dirty bitmaps). Few, flat arguments keep the
compiled code small; a tuple of many arrays made compilation several times
slower, and nothing here allocates, so the kernels run without numba's
reference counting (``_nrt=False``). No entry uses bit 63.

The layout of ``M`` is declared here once, as enums whose members are the
offsets (numba compiles an ``IntEnum`` member as a constant):

* :class:`S`: the fixed scalars, and the offsets of the variable regions;
* the variant's walk flags per operation at ``VARIANT_FLAGS + op``, its
  visitors at ``VARIANT_VISITORS + op``, hooks at ``VARIANT_AFTER + op`` and
  MMU hooks at ``VARIANT_MMU + i``;
* the counters at ``COUNTERS + index`` (indices from :mod:`s2split.counting.counters`);
* :class:`W`: the state of the walk in progress, with one named field per
  walk argument (``struct stage2_map_data``, ``struct stage2_attr_data``);
* the walker's stack (``STACK_*``) and ``free_unlinked``'s (``FREE_STACK_*``);
* the root table pages (``ROOT``).

The entries a two-phase visitor defers (``visitor_api.defer_make``) are rows
of the ``deferred`` region, sized by the VM to what one
``kvm_pgtable_stage2_split()`` call can break (no rows for a variant that
does not defer).

Memslots (:class:`SlotCol`) and vCPU registers (:class:`VcpuReg`) are rows
in variable regions whose offsets are in ``M`` itself.
"""

from __future__ import annotations

import enum

from numba import njit

from ..counting import counters as C
from ..model.kvm.mmu import VCPU_CACHE_CAPACITY


class S(enum.IntEnum):
    """The fixed scalars of ``M``: geometry, CPU features, kernel rules, the
    page allocator, the caches, and the offsets of the variable regions."""

    PTRS = 0             # entries per table
    PAGE_SHIFT = enum.auto()        # the stage-2 granule's
    GUEST_PAGE_SHIFT = enum.auto()  # memstress's stride
    BITS_PER_LEVEL = enum.auto()
    START_LEVEL = enum.auto()
    PGD_PAGES = enum.auto()         # concatenated root pages
    IPA_BITS = enum.auto()
    OA_FORMAT = enum.auto()         # rules.OA_*
    LPA2 = enum.auto()
    PHYS_BITS = enum.auto()         # kvm_phys_is_valid() limit
    LEVELS = enum.auto()
    MIN_BLOCK_LEVEL = enum.auto()
    HOST_VA_BITS = enum.auto()
    TABLE_BASE = enum.auto()        # physical address of table page 0
    VHE = enum.auto()               # CPU features
    FWB = enum.auto()
    TLBIRANGE = enum.auto()
    DIC = enum.auto()
    AC04_CPU_23 = enum.auto()       # an erratum workaround the kernel applies
    FREE_CLEARS = enum.auto()       # kernel rules (arm64/versions.py)
    CHUNKED_DESTROY = enum.auto()
    NEXT_PAGE = enum.auto()         # table pages: next never used, free stack top, capacity
    FREE_TOP = enum.auto()
    CAPACITY = enum.auto()
    CHUNK = enum.auto()             # eager-split chunk size
    SPLIT_NOBJS = enum.auto()       # the split cache: pages held, capacity
    SPLIT_CAPACITY = enum.auto()
    MANUAL = enum.auto()            # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags
    NSLOTS = enum.auto()
    NVCPUS = enum.auto()
    LAST_SLOT = enum.auto()         # the last memslot found (kvm_vcpu_gfn_to_memslot)
    LINE_CLOCK = enum.auto()        # the line clock of s2split.arm64.hierarchy, the line
    LAST_LINE = enum.auto()         # touched last, and the capacities in lines
    L1_LINES = enum.auto()
    L2_LINES = enum.auto()
    LLC_LINES = enum.auto()
    REFCOUNT = enum.auto()          # offsets of the variable regions
    FREE_STACK = enum.auto()
    VCPU_CACHE = enum.auto()
    VCPU_NOBJS = enum.auto()
    VCPU_REGS = enum.auto()
    SPLIT_CACHE = enum.auto()
    SLOTS = enum.auto()
    STAMPS = enum.auto()            # a line's last tick, per line of table memory
    FLAGS_CLEAR = enum.auto()       # walk flags an MMU hook turned off (mmu_api)
    DEFERRED = enum.auto()          # visitor_api.defer_make's entries: the last region
    DEFER_FAULT = enum.auto()       # sticky: DEFER_OVERFLOW, or entries a walk never made


VARIANT_FLAGS = len(S)
#: A variant's visitor per operation: 0 the built-in one, a small id a
#: built-in visitor written with the visitor API (engine/visitors.py), else
#: the address of a compiled user visitor (engine/fnptr.py). Its after-walk
#: hook per operation, likewise (0: none). Set per process, never compared.
VARIANT_VISITORS = VARIANT_FLAGS + C.NOPS
VARIANT_AFTER = VARIANT_VISITORS + C.NOPS
#: A variant's MMU hooks, one per name of
#: :data:`s2split.model.pgtable.variants.MMU_HOOKS` in order (0: vanilla's
#: function; else the id of a built-in hook, engine/mmu_hooks.py).
VARIANT_MMU = VARIANT_AFTER + C.NOPS
NMMU_HOOKS = 4
COUNTERS = VARIANT_MMU + NMMU_HOOKS
_WALK = COUNTERS + C.SIZE


class W(enum.IntEnum):
    """The walk in progress (``struct kvm_pgtable_walk_data`` and its argument)."""

    ADDR = _WALK
    START = enum.auto()
    END = enum.auto()
    FLAGS = enum.auto()
    OP = enum.auto()
    BUILT_COMPLETE = enum.auto()  # set by a visitor under SKIP_NEW_CHILDREN
    MAP_PHYS = enum.auto()        # struct stage2_map_data
    MAP_ATTR = enum.auto()
    MAP_MEMCACHE = enum.auto()    # a cache id (MC_*, or a vCPU index)
    MAP_FORCE_PTE = enum.auto()
    ATTR_SET = enum.auto()        # struct stage2_attr_data
    ATTR_CLR = enum.auto()
    ATTR_LEVEL = enum.auto()      # the level the attr visitor last saw
    NDEFERRED = enum.auto()       # entries deferred by defer_make in this walk
    SCRATCH = enum.auto()         # visitor_api.scratch(): NSCRATCH (4) integers,
    SCRATCH_LAST = SCRATCH + 3    # up to this one


#: Deepest table nesting: levels -1..3.
MAX_DEPTH = 8
STACK_PFN = max(W) + 1          # the walker's stack: table page,
STACK_IDX = STACK_PFN + MAX_DEPTH   # entry index,
STACK_OLD = STACK_IDX + MAX_DEPTH   # and the table entry walked into, per depth
FREE_STACK_PFN = STACK_OLD + MAX_DEPTH  # the same for free_unlinked's walk
FREE_STACK_IDX = FREE_STACK_PFN + MAX_DEPTH
FREE_STACK_OLD = FREE_STACK_IDX + MAX_DEPTH
ROOT = FREE_STACK_OLD + MAX_DEPTH   # root table pages (at most 16 concatenated)
FIXED = ROOT + 16


class SlotCol(enum.IntEnum):
    """Columns of a memslot row (``struct kvm_memory_slot`` and its backing)."""

    BASE_GFN = 0
    NPAGES = enum.auto()
    FLAGS = enum.auto()
    USERSPACE_ADDR = enum.auto()
    HOST_PA = enum.auto()
    SIZE = enum.auto()
    BACKING = enum.auto()        # BACKING_*
    PAGE_SIZE = enum.auto()      # of the backing
    HUGETLB_CLASS = enum.auto()  # rules.HC_*
    BITMAP = enum.auto()         # offset of the dirty bitmap in B
    HAS_BITMAP = enum.auto()
    ACTIVE = enum.auto()
    VBITMAP = enum.auto()        # offset in B of a variant's own bitmap (mmu_api.mark)


NCOL = len(SlotCol)
BACKING_ANON, BACKING_THP, BACKING_HUGETLB = 0, 1, 2
BACKING = {"anonymous": BACKING_ANON, "thp": BACKING_THP, "hugetlb": BACKING_HUGETLB}


class VcpuReg(enum.IntEnum):
    """A vCPU's memstress registers: its region, pages and pRNG state."""

    GPA = 0
    PAGES = enum.auto()
    RNG = enum.auto()


NREGS = len(VcpuReg)

#: A deferred make's row (``visitor_api.defer_make``): the entry (table page,
#: index, level) and its new value, until ``make_deferred``.
DEFER_PFN, DEFER_IDX, DEFER_LEVEL, DEFER_NEW = range(4)
DEFER_COLS = 4
#: ``S.DEFER_FAULT`` when a walk deferred more entries than the region holds
#: (else the number of entries a walk left unmade, 0 when all is well).
DEFER_OVERFLOW = -1

#: The variable regions of M, in order: (name, the scalar holding its offset,
#: columns per row). ``deferred`` is last: its rows run to the end of ``M``
#: (:func:`defer_capacity`), and state comparisons leave it out (walk scratch).
REGIONS = (("refc", S.REFCOUNT, 1), ("fstack", S.FREE_STACK, 1),
           ("vcache", S.VCPU_CACHE, VCPU_CACHE_CAPACITY), ("vcn", S.VCPU_NOBJS, 1),
           ("vregs", S.VCPU_REGS, NREGS), ("scache", S.SPLIT_CACHE, 1),
           ("slots", S.SLOTS, NCOL), ("stamps", S.STAMPS, 1),
           ("deferred", S.DEFERRED, DEFER_COLS))

assert REGIONS[-1][0] == "deferred"


@njit(cache=True, inline="always", _nrt=False)
def defer_capacity(M):
    """Rows of the ``deferred`` region: those up to the end of ``M``."""
    return (len(M) - M[S.DEFERRED]) // DEFER_COLS


#: Memory-cache ids: a vCPU's is its index; these two are not vCPUs.
MC_NONE = -1
MC_SPLIT = -2

#: The "no level" of a count (TLBI_TTL_UNKNOWN, walk totals): the NOLEVEL slot.
NOLV = -2


@njit(cache=True, inline="always", _nrt=False)
def count(M, op, kind, level, n):
    """Count ``n`` of ``(op, kind, level)`` (the reference's ``Tally``)."""
    M[COUNTERS + (op * C.NKINDS + kind) * C.SLOTS + (C.NOLEVEL if level == NOLV else level + 1)] \
        += n


@njit(cache=True, inline="always", _nrt=False)
def kvm_count(M, kind, n):
    """Count ``n`` of ``kind`` for the KVM MMU layer (``vm.k``)."""
    count(M, C.OP_KVM, kind, NOLV, n)


@njit(cache=True, inline="always", _nrt=False)
def level_shift(M, level):
    """The address shift of an entry at ``level`` (``ARM64_HW_PGTABLE_LEVEL_SHIFT``)."""
    return M[S.BITS_PER_LEVEL] * (4 - level) + 3


@njit(cache=True, inline="always", _nrt=False)
def granule_size(M, level):
    """Bytes mapped by one entry at ``level`` (``kvm_granule_size()``)."""
    return 1 << level_shift(M, level)


@njit(cache=True, inline="always", _nrt=False)
def slot_index(M, s, col):
    """Index in ``M`` of memslot row ``s``, column ``col``."""
    return M[S.SLOTS] + s * NCOL + col


@njit(cache=True, inline="always", _nrt=False)
def count_leaf_visit(M, op, level, valid):
    """The walker's counts for a LEAF visit of an entry that is a leaf: it is
    read (a valid leaf or an invalid entry), visited, and read again after the
    visit (``__kvm_pgtable_visit()``). :func:`count_leaf_visits` is the same
    rule for many entries at once."""
    count(M, op, C.K_READ_LEAF if valid else C.K_READ_INVALID, level, 1)
    count(M, op, C.K_VISIT_LEAF, level, 1)
    count(M, op, C.K_RELOAD, level, 1)


@njit(cache=True, inline="always", _nrt=False)
def count_leaf_visits(M, op, level, nvalid, ninvalid):
    """:func:`count_leaf_visit` for ``nvalid + ninvalid`` entries: the rule
    shared by the walker's level-3 run and the nested walks that
    ``create_unlinked``/``free_unlinked`` make."""
    count(M, op, C.K_READ_LEAF, level, nvalid)
    count(M, op, C.K_READ_INVALID, level, ninvalid)
    count(M, op, C.K_VISIT_LEAF, level, nvalid + ninvalid)
    count(M, op, C.K_RELOAD, level, nvalid + ninvalid)
