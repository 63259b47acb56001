"""The stage-2 visitors in the fast engine: the visitor half of
:mod:`s2split.model.pgtable.stage2`, function for function and by the same names.

The reference passes a visitor to the walker as a callable; compiled code
dispatches on the walk's operation instead (:func:`call_visitor`), so the
visitors sit below the walker in this module and the operations that start
walks above it (:mod:`s2split.engine.stage2`). The entry primitives and the
walks a visitor starts itself (``create_unlinked``, ``free_unlinked``) are in
:mod:`s2split.engine.entries`. A variant's visitor written with the visitor
API is either built in (compiled here, cached) or a user's, called through
its address (:mod:`s2split.engine.fnptr`). The differential tests pin every
line to the reference.
"""

from __future__ import annotations

from numba import njit

from ..arm64.bits import SW_MASK, VALID
from ..counting import counters as C
from ..model.pgtable import api_visitors as AV
from ..model.pgtable import walker as WK
from ..model.pgtable.visitor_api import AFTER_WALK
from ..plumbing.errors import E2BIG, EAGAIN, EINVAL, ENOMEM
from . import rules as R
from .entries import (_free_table, _make, _result, _set, _try_break,  # noqa: F401
                      create_unlinked, free_unlinked)
from .fnptr import call_visitor_ptr
from .memory import cache_alloc, get_page, mem_put, put_page
from .pte import is_cacheable, is_executable, is_table, make_leaf, make_table, table_pfn
from .state import MC_NONE, NOLV, VARIANT_AFTER, VARIANT_VISITORS, S, W, count, granule_size
from .tlb import dcache_clean_inval_poc, flush_vmid_ipa, icache_inval_pou
from .visitor_api import FastCtx, compile_visitor, register_helpers

LEAF, TABLE_PRE, TABLE_POST, SHARED = WK.LEAF, WK.TABLE_PRE, WK.TABLE_POST, WK.SHARED
SKIP_BBM_TLBI, SKIP_CMO = WK.SKIP_BBM_TLBI, WK.SKIP_CMO
SKIP_NEW_CHILDREN, RETURN_HINTS = WK.SKIP_NEW_CHILDREN, WK.RETURN_HINTS
HINT_SKIP_SIBLINGS, HINT_SKIP_CHILDREN = WK.HINT_SKIP_SIBLINGS, WK.HINT_SKIP_CHILDREN


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
#: The visitors written once with the visitor API (model/pgtable/api_visitors.py),
#: compiled and cached here (their helpers first made callable from compiled code).
for _fn in (AV.stage2_split_walker, AV.bbml2_split_walker, AV.bbml2_flush_split,
            AV.wp_split_walker, AV.batched_split_walker, AV.batched_flush_make):
    register_helpers(_fn)
_stage2_split_walker = njit(cache=True, _nrt=False)(AV.stage2_split_walker)
_wp_split_walker = njit(cache=True, _nrt=False)(AV.wp_split_walker)
_bbml2_split_walker = njit(cache=True, _nrt=False)(AV.bbml2_split_walker)
_bbml2_flush_split = njit(cache=True, _nrt=False)(AV.bbml2_flush_split)
_batched_split_walker = njit(cache=True, _nrt=False)(AV.batched_split_walker)
_batched_flush_make = njit(cache=True, _nrt=False)(AV.batched_flush_make)

#: The id of the bbml2 variant's split visitor and of its hook.
BBML2 = 1
#: The id of the split visitor that write-protects as it splits.
WP_SPLIT = 2
#: The id of split-batched-tlbi's split visitor (phase one) and of its hook (phase two).
BATCHED = 3
#: Ids of built-in API visitors and hooks at ``VARIANT_VISITORS + op`` /
#: ``VARIANT_AFTER + op`` (any larger value is a compiled user visitor's address).
BUILTIN_VISITORS = {AV.bbml2_split_walker: BBML2, AV.wp_split_walker: WP_SPLIT,
                    AV.batched_split_walker: BATCHED}
BUILTIN_HOOKS = {AV.bbml2_flush_split: BBML2, AV.batched_flush_make: BATCHED}


def variant_visitor_id(fn) -> int:
    """What ``VARIANT_VISITORS + op`` holds for a variant's visitor ``fn``."""
    if fn is None:
        return 0
    return BUILTIN_VISITORS.get(fn) or compile_visitor(fn)


def variant_hook_id(fn) -> int:
    """What ``VARIANT_AFTER + op`` holds for a variant's after-walk hook ``fn``."""
    if fn is None:
        return 0
    return BUILTIN_HOOKS.get(fn) or compile_visitor(fn)


@njit(cache=True, _nrt=False)
def _split_visitor(T, M, pfn, idx, old, level, visit):
    """``stage2_split_walker()``: replace a block by a subtree of pages
    (the API form, :func:`s2split.model.pgtable.api_visitors.stage2_split_walker`)."""
    return _stage2_split_walker(FastCtx(T, M, pfn, idx, old, level, visit))


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
    """``kvm_pgtable_visitor_cb()``: the walk's visitor, chosen by its operation
    (or the variant's, :data:`~s2split.engine.state.VARIANT_VISITORS`)."""
    op = M[W.OP]
    vid = M[VARIANT_VISITORS + op]
    if vid != 0:
        if vid == BBML2:
            return _bbml2_split_walker(FastCtx(T, M, pfn, idx, old, level, visit))
        if vid == WP_SPLIT:
            return _wp_split_walker(FastCtx(T, M, pfn, idx, old, level, visit))
        if vid == BATCHED:
            return _batched_split_walker(FastCtx(T, M, pfn, idx, old, level, visit))
        return call_visitor_ptr(vid, T, M, pfn, idx, old, level, visit)
    if op == C.OP_MAP:
        return _map_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_SPLIT:
        return _split_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_WRPROTECT or op == C.OP_RELAX:
        return _attr_visitor(T, M, pfn, idx, old, level, visit)
    if op == C.OP_UNMAP:
        return _unmap_visitor(T, M, pfn, idx, old, level, visit)
    return _free_visitor(T, M, pfn, idx, old, level, visit)



@njit(cache=True, _nrt=False)
def call_after_walk(T, M, op):
    """A variant's after-walk hook of ``op``, if any (``kvm_pgtable_walk``'s
    last step in the reference, :func:`s2split.model.pgtable.walker.kvm_pgtable_walk`)."""
    hid = M[VARIANT_AFTER + op]
    if hid == 0:
        return 0
    if hid == BBML2:
        return _bbml2_flush_split(FastCtx(T, M, -1, -1, 0, NOLV, AFTER_WALK))
    if hid == BATCHED:
        return _batched_flush_make(FastCtx(T, M, -1, -1, 0, NOLV, AFTER_WALK))
    return call_visitor_ptr(hid, T, M, -1, -1, 0, NOLV, AFTER_WALK)
