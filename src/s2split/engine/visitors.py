"""The stage-2 visitors in the fast engine: the visitor half of
:mod:`s2split.pgtable.stage2`, function for function and by the same names.

The reference passes a visitor to the walker as a callable; compiled code
dispatches on the walk's operation instead (:func:`call_visitor`), so the
visitors sit below the walker in this module and the operations that start
walks above it (:mod:`s2split.engine.stage2`). numba cannot cache recursive
functions, so the two walks a visitor starts itself -- ``create_unlinked``
filling a fresh table and ``free_unlinked`` dropping a detached one -- are
loops of their own here, counted with the walker's own rule
(:func:`~s2split.engine.state.count_leaf_visit`); ``create_unlinked`` fills
at most two levels, all that splitting a block needs. The differential tests
pin every line to the reference.
"""

from __future__ import annotations

from numba import njit

from .. import counters as C
from ..bits import LOCKED, SW_MASK, VALID
from ..errors import E2BIG, EAGAIN, EINVAL, ENOMEM
from ..pgtable import walker as WK
from . import rules as R
from .memory import cache_alloc, get_page, mem_put, put_page
from .pte import (is_cacheable, is_executable, is_table, make_leaf, make_table, prot_to_attr,
                  pte_to_phys, table_pfn)
from .state import (FREE_STACK_IDX, FREE_STACK_OLD, FREE_STACK_PFN, MC_NONE, MC_SPLIT, NOLV, S, W,
                    count, count_leaf_visit, count_leaf_visits, granule_size)
from .tlb import dcache_clean_inval_poc, flush_vmid_ipa, flush_vmid_range, icache_inval_pou

LEAF, TABLE_PRE, TABLE_POST, SHARED = WK.LEAF, WK.TABLE_PRE, WK.TABLE_POST, WK.SHARED
SKIP_BBM_TLBI, SKIP_CMO = WK.SKIP_BBM_TLBI, WK.SKIP_CMO
SKIP_NEW_CHILDREN, RETURN_HINTS = WK.SKIP_NEW_CHILDREN, WK.RETURN_HINTS
HINT_SKIP_SIBLINGS, HINT_SKIP_CHILDREN = WK.HINT_SKIP_SIBLINGS, WK.HINT_SKIP_CHILDREN


# --- entries: set, break, make --------------------------------------------------------
@njit(cache=True, _nrt=False)
def _set(T, M, op, flags, pfn, idx, new, level):
    """``stage2_try_set_pte()``: a plain store, or a CAS for shared walks."""
    T[pfn, idx] = new
    count(M, op, C.K_PTE_CAS if flags & SHARED else C.K_PTE_WRITE, level, 1)


@njit(cache=True, _nrt=False)
def _try_break(T, M, op, flags, addr, pfn, idx, old, level):
    """``stage2_try_break_pte()``: lock, invalidate the old translation, drop its reference."""
    if not old & VALID and old & LOCKED:
        return False
    _set(T, M, op, flags, pfn, idx, LOCKED, level)
    count(M, op, C.K_BBM, level, 1)
    if not flags & SKIP_BBM_TLBI:
        if is_table(old, level):
            size = granule_size(M, level)
            flush_vmid_range(M, op, addr & ~(size - 1), size)
        elif old & VALID:
            flush_vmid_ipa(M, op, level)
    if old != 0:
        put_page(M, op, pfn, level)
    return True


@njit(cache=True, _nrt=False)
def _make(T, M, op, pfn, idx, new, level):
    """``stage2_make_pte()``: take a reference, then a release store."""
    if new != 0:
        get_page(M, op, pfn, level)
    T[pfn, idx] = new
    count(M, op, C.K_PTE_WRITE, level, 1)


# --- free_unlinked: the free walker over a detached subtree ------------------------------
@njit(cache=True, _nrt=False)
def _free_table(T, M, op, pfn, idx, old, level):
    """The TABLE_POST half of ``stage2_free_walker()``: drop a table entry's
    references (6.12 always; 6.19+ only once the child is empty, clearing
    the entry), by :func:`s2split.rules.free_drops_table`."""
    clears = M[S.FREE_CLEARS] != 0
    child = table_pfn(M, old)
    if not R.free_drops_table(clears, M[M[S.REFCOUNT] + child]):
        return
    put_page(M, op, pfn, level)
    put_page(M, op, child, level + 1)
    if R.free_clears_entry(clears):
        T[pfn, idx] = 0
        count(M, op, C.K_PTE_WRITE, level, 1)


@njit(cache=True, _nrt=False)
def free_unlinked(T, M, pfn, level):
    """``kvm_pgtable_stage2_free_unlinked()``: the free walker (LEAF |
    TABLE_POST) over every entry of a detached table at ``level + 1`` and
    below, then the table itself."""
    op = C.OP_FREE_UNLINKED
    ptrs = M[S.PTRS]
    count(M, op, C.K_CALLS, level, 1)
    d = 0
    top = level + 1
    M[FREE_STACK_PFN] = pfn
    M[FREE_STACK_IDX] = 0
    if top <= 3:  # below level 3 the walker refuses at once
        count(M, op, C.K_LOOPS, top, 1)
    while top <= 3:
        lv = top + d
        i = M[FREE_STACK_IDX + d]
        if i >= ptrs:
            if d == 0:
                break
            # This table is done: TABLE_POST on its parent entry.
            d -= 1
            lv = top + d
            count(M, op, C.K_VISIT_POST, lv, 1)
            _free_table(T, M, op, M[FREE_STACK_PFN + d], M[FREE_STACK_IDX + d], M[FREE_STACK_OLD + d], lv)
            M[FREE_STACK_IDX + d] += 1
            continue
        old = T[M[FREE_STACK_PFN + d], i]
        if is_table(old, lv):
            count(M, op, C.K_READ_TABLE, lv, 1)
            count(M, op, C.K_DESCENT, lv, 1)
            M[FREE_STACK_OLD + d] = old
            d += 1
            M[FREE_STACK_PFN + d] = table_pfn(M, old)
            M[FREE_STACK_IDX + d] = 0
            count(M, op, C.K_LOOPS, lv + 1, 1)
            continue
        count_leaf_visit(M, op, lv, old & VALID)
        if old != 0:
            put_page(M, op, M[FREE_STACK_PFN + d], lv)
        M[FREE_STACK_IDX + d] = i + 1
    put_page(M, op, pfn, level + 1)


# --- create_unlinked: the map walker over a fresh table -----------------------------------
@njit(cache=True, _nrt=False)
def _fill_leaves(T, M, op, pfn, pa, attr, level):
    """The map visitor installing a leaf in every (zeroed) entry of an unlinked
    table: per entry an invalid read, a LEAF visit, the lock write, the
    reference and the publishing write, the re-read -- counted per table."""
    ptrs = M[S.PTRS]
    g = granule_size(M, level)
    for i in range(ptrs):
        T[pfn, i] = make_leaf(M, pa + i * g, attr, level)
    M[M[S.REFCOUNT] + pfn] += ptrs
    count_leaf_visits(M, op, level, 0, ptrs)
    count(M, op, C.K_BBM, level, ptrs)
    count(M, op, C.K_GET_PAGE, level, ptrs)
    count(M, op, C.K_PTE_WRITE, level, 2 * ptrs)


@njit(cache=True, _nrt=False)
def _fill(T, M, pfn, level, phys, attr, force_pte, mc):
    """The map walker (LEAF | SKIP_BBM_TLBI | SKIP_CMO) over every entry of a
    zeroed table at ``level``: a leaf where a block of this level is allowed,
    otherwise a new table from the cache, filled one level down. Returns 0 or
    a negative errno."""
    op = C.OP_CREATE_UNLINKED
    if level > 3:
        return -EINVAL  # a level-3 "block" has no table below it: the walker refuses
    ptrs = M[S.PTRS]
    g = granule_size(M, level)
    count(M, op, C.K_LOOPS, level, 1)
    if not (force_pte and level < 3) and level >= M[S.MIN_BLOCK_LEVEL]:
        _fill_leaves(T, M, op, pfn, phys, attr, level)
        return 0
    for i in range(ptrs):
        count_leaf_visits(M, op, level, 0, 1)
        if level == 3:
            return -EINVAL
        child = cache_alloc(M, mc)
        if child < 0:
            return -ENOMEM
        count(M, op, C.K_PAGE_TAKEN, level, 1)
        _set(T, M, op, 0, pfn, i, LOCKED, level)
        count(M, op, C.K_BBM, level, 1)
        _make(T, M, op, pfn, i, make_table(M, child), level)
        count(M, op, C.K_DESCENT, level, 1)
        # One level down is level 3 here: every entry becomes a page.
        count(M, op, C.K_LOOPS, level + 1, 1)
        _fill_leaves(T, M, op, child, phys + i * g, attr, level + 1)
    return 0


@njit(cache=True, _nrt=False)
def _result(M, op, ret):
    """``Stage2PageTable._result``: count an error or -EAGAIN, pass ``ret`` on."""
    if ret == -EAGAIN:
        count(M, op, C.K_EAGAIN, NOLV, 1)
    elif ret != 0:
        count(M, op, C.K_ERRORS, NOLV, 1)
    return ret


@njit(cache=True, _nrt=False)
def create_unlinked(T, M, phys, level, prot, mc, force_pte):
    """``kvm_pgtable_stage2_create_unlinked()``: a table page or a negative errno."""
    op = C.OP_CREATE_UNLINKED
    count(M, op, C.K_CALLS, level, 1)
    if force_pte:
        count(M, op, C.K_CALLS_FORCE_PTE, level, 1)
    if phys & (granule_size(M, level) - 1):
        return _result(M, op, -EINVAL)
    attr = prot_to_attr(M, prot)
    if attr < 0:
        return _result(M, op, attr)
    pgtable = cache_alloc(M, mc)
    if pgtable < 0:
        return _result(M, op, -ENOMEM)
    count(M, op, C.K_PAGE_TAKEN, level, 1)
    ret = _fill(T, M, pgtable, level + 1, phys, attr, force_pte, mc)
    if ret != 0:
        free_unlinked(T, M, pgtable, level)
        return _result(M, op, ret)
    return pgtable


# --- map ---------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _map_phys(M):
    """``Stage2PageTable._map_phys``: the output address at the walk's address."""
    phys = M[W.MAP_PHYS]
    if phys >= (1 << M[S.PHYS_BITS]):
        return phys
    return phys + (M[W.ADDR] - M[W.START])


@njit(cache=True, _nrt=False)
def _leaf_allowed(M, level):
    """``stage2_leaf_mapping_allowed()`` / ``kvm_block_mapping_supported()``."""
    if M[W.MAP_FORCE_PTE] and level < 3:
        return False
    if level < M[S.MIN_BLOCK_LEVEL]:
        return False
    g = granule_size(M, level)
    if g > M[W.END] - M[W.ADDR]:
        return False
    phys = _map_phys(M)
    if phys < (1 << M[S.PHYS_BITS]) and phys & (g - 1):
        return False
    return (M[W.ADDR] & (g - 1)) == 0


@njit(cache=True, _nrt=False)
def _try_leaf(T, M, op, pfn, idx, old, level):
    """``stage2_map_walker_try_leaf()``."""
    flags = M[W.FLAGS]
    if not _leaf_allowed(M, level):
        return -E2BIG
    new = make_leaf(M, _map_phys(M), M[W.MAP_ATTR], level)
    if not R.needs_update(old, new):
        return -EAGAIN  # only permissions differ: the vCPU faults again and relaxes them
    if not flags & SHARED and ((old ^ new) & ~SW_MASK) == 0:
        if (old != 0) != (new != 0):
            if old != 0:
                put_page(M, op, pfn, level)
            else:
                get_page(M, op, pfn, level)
        _set(T, M, op, flags, pfn, idx, new, level)
        return 0
    if not _try_break(T, M, op, flags, M[W.ADDR], pfn, idx, old, level):
        return -EAGAIN
    g = granule_size(M, level)
    if not flags & SKIP_CMO:
        if is_cacheable(M, new):
            dcache_clean_inval_poc(M, op, level, g)
        if is_executable(new):
            icache_inval_pou(M, op, level, g)
    _make(T, M, op, pfn, idx, new, level)
    return 0


@njit(cache=True, _nrt=False)
def _map_leaf(T, M, op, pfn, idx, old, level):
    """``stage2_map_walk_leaf()``: a leaf here, or a new table to descend into."""
    ret = _try_leaf(T, M, op, pfn, idx, old, level)
    if ret != -E2BIG:
        return ret
    if level == 3:
        return -EINVAL
    mc = M[W.MAP_MEMCACHE]
    if mc == MC_NONE:
        return -ENOMEM
    child = cache_alloc(M, mc)
    if child < 0:
        return -ENOMEM
    count(M, op, C.K_PAGE_TAKEN, level, 1)
    if not _try_break(T, M, op, M[W.FLAGS], M[W.ADDR], pfn, idx, old, level):
        # Another walker holds the entry: the new table goes back unused
        # (mm_ops->put_page(childp), uncounted as in the reference).
        mem_put(M, child)
        return -EAGAIN
    _make(T, M, op, pfn, idx, make_table(M, child), level)
    return 0


@njit(cache=True, _nrt=False)
def _map_table_pre(T, M, op, pfn, idx, old, level):
    """``stage2_map_walk_table_pre()``: collapse a table into a block if one fits."""
    child = table_pfn(M, old)
    if not _leaf_allowed(M, level):
        return 0
    ret = _try_leaf(T, M, op, pfn, idx, old, level)
    if ret != 0:
        return ret
    free_unlinked(T, M, child, level)  # the kernel defers this through RCU
    return 0


@njit(cache=True, _nrt=False)
def _map_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_map_walker()``."""
    op = M[W.OP]
    if visit == TABLE_PRE:
        return _map_table_pre(T, M, op, pfn, idx, old, level)
    if visit == LEAF:
        return _map_leaf(T, M, op, pfn, idx, old, level)
    return -EINVAL


# --- unmap -------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _unmap_put(T, M, op, pfn, idx, old, level):
    """``stage2_unmap_put_pte()`` (6.12: a table is invalidated by IPA, TTL unknown)."""
    if old & VALID:
        T[pfn, idx] = 0
        count(M, op, C.K_PTE_WRITE, level, 1)
        if is_table(old, level):
            flush_vmid_ipa(M, op, NOLV)
        elif not R.unmap_defers_tlbi(M[S.TLBIRANGE] != 0, M[S.FWB] != 0):
            flush_vmid_ipa(M, op, level)
    put_page(M, op, pfn, level)


@njit(cache=True, _nrt=False)
def _unmap_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_unmap_walker()``: clear leaves, free tables that became empty."""
    op = M[W.OP]
    if not old & VALID:
        if old != 0:  # an invalid but counted entry (ownership annotation)
            T[pfn, idx] = 0
            count(M, op, C.K_PTE_WRITE, level, 1)
            put_page(M, op, pfn, level)
        return 0
    child = -1
    need_flush = False
    if is_table(old, level):
        child = table_pfn(M, old)
        if M[M[S.REFCOUNT] + child] != 1:
            return 0
    elif is_cacheable(M, old):
        need_flush = not M[S.FWB]
    _unmap_put(T, M, op, pfn, idx, old, level)
    if need_flush:
        dcache_clean_inval_poc(M, op, level, granule_size(M, level))
    if child >= 0:
        put_page(M, op, child, level + 1)
    return 0


# --- attributes ----------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _attr_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_attr_walker()``: change attribute bits of a valid leaf in place."""
    if not old & VALID:
        return -EAGAIN
    M[W.ATTR_LEVEL] = level  # for relax_perms' TLBI
    new = (old & ~M[W.ATTR_CLR]) | M[W.ATTR_SET]
    if new != old:
        if is_executable(new) and not is_executable(old):
            icache_inval_pou(M, M[W.OP], level, granule_size(M, level))
        _set(T, M, M[W.OP], M[W.FLAGS], pfn, idx, new, level)
    return 0


# --- split ---------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _split_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_split_walker()``: replace a block by a subtree of pages."""
    flags = M[W.FLAGS]
    if level == 3:
        return HINT_SKIP_SIBLINGS if flags & RETURN_HINTS else 0  # no huge pages here
    if not old & VALID:
        return 0
    # Enough pages for the whole tree down to pages (force_pte), else one
    # page of next-level blocks that the walker splits as it descends.
    force_pte = R.split_force_pte(level, M[S.PTRS], M[S.SPLIT_NOBJS])
    if force_pte < 0:
        return force_pte
    child = create_unlinked(T, M, pte_to_phys(M, old), level, R.pte_prot(old), MC_SPLIT,
                            force_pte != 0)
    if child < 0:
        return child
    if not _try_break(T, M, C.OP_SPLIT, flags, M[W.ADDR], pfn, idx, old, level):
        free_unlinked(T, M, child, level)
        return -EAGAIN
    _make(T, M, C.OP_SPLIT, pfn, idx, make_table(M, child), level)
    if force_pte:
        if flags & SKIP_NEW_CHILDREN:
            M[W.BUILT_COMPLETE] = 1
        if flags & RETURN_HINTS:
            return HINT_SKIP_CHILDREN
    return 0


# --- free ----------------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _free_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_free_walker()``: drop the references an entry holds."""
    if old == 0:
        return 0
    op = M[W.OP]
    if not is_table(old, level):
        put_page(M, op, pfn, level)
        return 0
    if visit != TABLE_POST and M[S.FREE_CLEARS]:
        return -EINVAL  # 6.19 expects tables only after their children
    _free_table(T, M, op, pfn, idx, old, level)
    return 0


@njit(cache=True, _nrt=False)
def call_visitor(T, M, pfn, idx, old, level, visit):
    """``kvm_pgtable_visitor_cb()``: the walk's visitor, chosen by its operation."""
    op = M[W.OP]
    if op == C.OP_MAP:
        return _map_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_SPLIT:
        return _split_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_WRPROTECT or op == C.OP_RELAX:
        return _attr_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_UNMAP:
        return _unmap_visitor(T, M, pfn, idx, old, level, visit)
    return _free_visitor(T, M, pfn, idx, old, level, visit)

