"""Entries and detached tables in the fast engine: ``stage2_try_set_pte``,
``stage2_try_break_pte``, ``stage2_make_pte``, ``create_unlinked`` and
``free_unlinked`` -- the primitives the visitors (:mod:`s2split.engine.visitors`)
and the visitor API (:mod:`s2split.engine.visitor_api`) are made of, the
twins of the methods of the same names of
:class:`s2split.model.pgtable.stage2.Stage2PageTable`.

numba cannot cache recursive functions, so the two walks that
``create_unlinked`` (filling a fresh table) and ``free_unlinked`` (dropping
a detached one) make are loops of their own here, counted with the walker's
own rule (:func:`~s2split.engine.state.count_leaf_visit`); ``create_unlinked``
fills at most two levels, all that splitting a block needs.
"""

from __future__ import annotations

from numba import njit

from ..arm64.bits import LOCKED, VALID
from ..counting import counters as C
from ..model.pgtable import walker as WK
from ..plumbing.errors import EAGAIN, EINVAL, ENOMEM
from . import rules as R
from .lines import touch, touch_run
from .memory import cache_alloc, get_page, put_page
from .pte import is_table, make_leaf, make_table, prot_to_attr, table_pfn
from .state import (FREE_STACK_IDX, FREE_STACK_OLD, FREE_STACK_PFN, NOLV, S, count,
                    count_leaf_visit, count_leaf_visits, granule_size)
from .tlb import flush_vmid_ipa, flush_vmid_range

SHARED, SKIP_BBM_TLBI = WK.SHARED, WK.SKIP_BBM_TLBI


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
    the entry), by :func:`s2split.arm64.rules.free_drops_table`."""
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
        touch(M, op, lv, M[FREE_STACK_PFN + d], i)
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
    touch_run(M, op, level, pfn, 0, ptrs)
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
        touch(M, op, level, pfn, i)
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
