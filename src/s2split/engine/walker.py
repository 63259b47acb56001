"""The generic walker in the fast engine: the twin of :mod:`s2split.model.pgtable.walker`.

The same visit order and counts, iteratively: numba cannot cache recursive
functions, so the descent keeps an explicit stack in ``M`` (``STACK_*``: the
table page, the entry index and the table entry walked into, per depth).
The walk flags, hints and ``walk_continue`` are the reference's own, compiled.

For the two walks that dominate eager splitting -- write-protect and split
over level-3 tables, LEAF-only and not handling faults -- the rest of a
level-3 table loop runs as one branch-free loop (:func:`_leaf_run`) that LLVM
vectorizes; its counts follow the same rule as a visit
(:func:`~s2split.engine.state.count_leaf_visits`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..arm64.bits import S2AP_W, VALID
from ..counting import counters as C
from ..model.pgtable import walker as WK
from ..plumbing.errors import ERANGE
from . import rules as R
from .lines import touch, touch_run
from .pte import is_table, table_pfn
from .state import (NOLV, ROOT, STACK_IDX, STACK_OLD, STACK_PFN, VARIANT_VISITORS, S, W, count,
                    count_leaf_visit, count_leaf_visits, granule_size, level_shift)
from .visitors import BATCHED, BBML2, WP_SPLIT, call_after_walk, call_visitor

LEAF, TABLE_PRE, TABLE_POST, SHARED = WK.LEAF, WK.TABLE_PRE, WK.TABLE_POST, WK.SHARED
HANDLE_FAULT, RETURN_HINTS, SKIP_LEVEL_BASE = WK.HANDLE_FAULT, WK.RETURN_HINTS, WK.SKIP_LEVEL_BASE
HINT_SKIP_SIBLINGS, HINT_SKIP_CHILDREN = WK.HINT_SKIP_SIBLINGS, WK.HINT_SKIP_CHILDREN
#: _visit's results besides 0 and errors: the child is on the stack one
#: deeper; the table loop was cut short by a hint (``_TABLE_DONE`` in the reference).
DESCEND = 1 << 40
TABLE_DONE = 1 << 41

walk_continue = njit(cache=True, inline="always", _nrt=False)(WK.walk_continue)


@njit(cache=True, _nrt=False)
def _advance(M, level):
    """Move the walk's address to the next boundary of ``level`` (``__kvm_pgtable_visit``)."""
    g = granule_size(M, level)
    M[W.ADDR] = (M[W.ADDR] & ~(g - 1)) + g


@njit(cache=True, _nrt=False)
def _visit(T, M, d, level):
    """``__kvm_pgtable_visit()`` for the entry at stack depth ``d``. Returns 0,
    DESCEND (the child is on the stack at depth d + 1), TABLE_DONE or an error."""
    op = M[W.OP]
    flags = M[W.FLAGS]
    pfn = M[STACK_PFN + d]
    idx = M[STACK_IDX + d]
    old = T[pfn, idx]
    touch(M, op, level, pfn, idx)
    table = is_table(old, level)
    ret = 0
    called = False
    if table:
        count(M, op, C.K_READ_TABLE, level, 1)
        if flags & TABLE_PRE:
            count(M, op, C.K_VISIT_PRE, level, 1)
            count(M, op, C.K_RELOAD, level, 1)
            ret = call_visitor(T, M, pfn, idx, old, level, TABLE_PRE)
            called = True
    elif flags & LEAF:
        count_leaf_visit(M, op, level, old & VALID)
        ret = call_visitor(T, M, pfn, idx, old, level, LEAF)
        called = True
    else:
        count(M, op, C.K_READ_LEAF if old & VALID else C.K_READ_INVALID, level, 1)
    if called:
        # Re-read: a visitor that installed or replaced a table is descended into.
        old = T[pfn, idx]
        table = is_table(old, level)
    skip_new = False
    if ret > 0:
        # Only RETURN_HINTS visitors return positive values.
        if ret == HINT_SKIP_SIBLINGS:
            count(M, op, C.K_SKIP_SIBLINGS, level, 1)
            _advance(M, level - 1)
            return TABLE_DONE
        skip_new = ret == HINT_SKIP_CHILDREN
        ret = 0
    if M[W.BUILT_COMPLETE]:
        M[W.BUILT_COMPLETE] = 0
        skip_new = True
    if not walk_continue(flags, ret):
        return ret
    if not table:
        _advance(M, level)
        return 0
    if skip_new or flags & (1 << (SKIP_LEVEL_BASE + level + 1)):  # skip_level(child level)
        count(M, op, C.K_SKIP_CHILDREN if skip_new else C.K_SKIP_LEVEL, level, 1)
        _advance(M, level)
        if flags & TABLE_POST:
            count(M, op, C.K_VISIT_POST, level, 1)
            ret = call_visitor(T, M, pfn, idx, old, level, TABLE_POST)
            return 0 if walk_continue(flags, ret) else ret
        return 0
    count(M, op, C.K_DESCENT, level, 1)
    M[STACK_OLD + d] = old
    M[STACK_PFN + d + 1] = table_pfn(M, old)
    return DESCEND


@njit(cache=True, _nrt=False)
def _leaf_run(T, M, d, op, attr_clr):
    """The rest of a level-3 table loop of a LEAF-only walk that does not
    handle faults: write-protect (clear ``attr_clr`` on valid pages) or split
    (no work at level 3), with :func:`_visit`'s counts. Returns the index
    where the loop stopped."""
    pfn = M[STACK_PFN + d]
    i = M[STACK_IDX + d]
    ptrs = M[S.PTRS]
    ps = M[S.PAGE_SHIFT]
    addr = M[W.ADDR]
    end = M[W.END]
    # The entries this loop visits, known up front: up to the end of the table
    # or of the range, whichever is first. The per-entry loop below is then
    # branch-free (select instead of if) so that LLVM can vectorize it.
    base = (addr >> ps) << ps
    n = 0
    if addr < end:
        n = min(ptrs - i, (end - base + (1 << ps) - 1) >> ps)
    nvalid = 0
    writes = 0
    # Unsigned indices: numba then drops the negative-index wraparound that
    # otherwise keeps these loops from vectorizing (3x slower).
    row = np.uint64(pfn)
    lo = np.uint64(i)
    hi = np.uint64(i + n)
    if attr_clr:
        for j in range(lo, hi):
            old = T[row, j]
            v = old & VALID
            new = old & ~(attr_clr * v)
            nvalid += v
            writes += (new ^ old) != 0
            T[row, j] = new
    else:
        # Split has nothing to do at level 3: only read (no stores, so that
        # the loop does not dirty the table pages).
        for j in range(lo, hi):
            nvalid += T[row, j] & VALID
    M[W.ADDR] = base + (n << ps) if n else addr
    touch_run(M, op, 3, pfn, i, n)
    count_leaf_visits(M, op, 3, nvalid, n - nvalid)
    count(M, op, C.K_PTE_WRITE, 3, writes)
    return i + n


@njit(cache=True, _nrt=False)
def _unmap_leaf_run(T, M, d):
    """The rest of a level-3 table loop of an unmap walk whose leaves need
    no TLBI or cache maintenance each (range TLBIs with FWB: one range flush
    at the end): every entry cleared, and one reference dropped on the table
    per non-zero entry, with :func:`_visit`'s counts and the unmap visitor's.
    Returns the index where the loop stopped: where it started (nothing
    done) if those references would free the table, which the entry-by-entry
    path then does at the right entry."""
    pfn = M[STACK_PFN + d]
    i = M[STACK_IDX + d]
    ptrs = M[S.PTRS]
    ps = M[S.PAGE_SHIFT]
    addr = M[W.ADDR]
    end = M[W.END]
    base = (addr >> ps) << ps
    n = 0
    if addr < end:
        n = min(ptrs - i, (end - base + (1 << ps) - 1) >> ps)
    nvalid = 0
    nonzero = 0
    row = np.uint64(pfn)
    lo = np.uint64(i)
    hi = np.uint64(i + n)
    for j in range(lo, hi):
        old = T[row, j]
        nvalid += old & VALID
        nonzero += old != 0
    refc = M[S.REFCOUNT] + pfn
    if n == 0 or M[refc] - nonzero < 1:
        return i
    for j in range(lo, hi):
        T[row, j] = 0
    M[refc] -= nonzero
    M[W.ADDR] = base + (n << ps)
    op = M[W.OP]
    touch_run(M, op, 3, pfn, i, n)
    count_leaf_visits(M, op, 3, nvalid, n - nvalid)
    count(M, op, C.K_PTE_WRITE, 3, nonzero)
    count(M, op, C.K_PUT_PAGE, 3, nonzero)
    return i + n


@njit(cache=True, _nrt=False)
def walk_table(T, M, pfn, level):
    """``__kvm_pgtable_walk()`` from one table, iteratively down its subtree."""
    op = M[W.OP]
    flags = M[W.FLAGS]
    ptrs = M[S.PTRS]
    d = 0
    M[STACK_PFN] = pfn
    M[STACK_IDX] = (M[W.ADDR] >> level_shift(M, level)) & (ptrs - 1)
    count(M, op, C.K_LOOPS, level, 1)
    # The run restates the built-in visitors at level 3 (the built-in API split
    # visitors too: they do nothing there, or clear S2AP.W on valid pages as a
    # wrprotect walk, WP_SPLIT); a user's visitor is called.
    vid = M[VARIANT_VISITORS + op]
    run = (op == C.OP_WRPROTECT or op == C.OP_SPLIT) and \
        not flags & (TABLE_PRE | TABLE_POST | SHARED | HANDLE_FAULT | RETURN_HINTS) and \
        (vid == 0 or (op == C.OP_SPLIT and (vid == BBML2 or vid == WP_SPLIT or vid == BATCHED)))
    attr_clr = M[W.ATTR_CLR] if op == C.OP_WRPROTECT and M[W.ATTR_SET] == 0 else 0
    if op == C.OP_SPLIT and vid == WP_SPLIT:
        attr_clr = S2AP_W
    # TABLE_POST is no matter at level 3, where no entry is a table.
    unmap_run = op == C.OP_UNMAP and flags & LEAF and M[S.FWB] and \
        M[VARIANT_VISITORS + op] == 0 and \
        not flags & (TABLE_PRE | SHARED | HANDLE_FAULT | RETURN_HINTS) and \
        R.unmap_defers_tlbi(M[S.TLBIRANGE] != 0, M[S.FWB] != 0)
    while True:
        lv = level + d
        if run and lv == 3 and (op == C.OP_SPLIT or attr_clr == S2AP_W):
            M[STACK_IDX + d] = _leaf_run(T, M, d, op, attr_clr)
        elif unmap_run and lv == 3:
            M[STACK_IDX + d] = _unmap_leaf_run(T, M, d)
        if M[STACK_IDX + d] >= ptrs or M[W.ADDR] >= M[W.END]:
            r = 0
        else:
            r = _visit(T, M, d, lv)
            if r == DESCEND:
                d += 1
                M[STACK_IDX + d] = (M[W.ADDR] >> level_shift(M, lv + 1)) & (ptrs - 1)
                count(M, op, C.K_LOOPS, lv + 1, 1)
                continue
            if r == 0:
                M[STACK_IDX + d] += 1
                continue
            if r != TABLE_DONE:
                return r  # an error ends every loop on the way up
        # This table loop is done: back to the parent entry.
        if d == 0:
            return 0
        d -= 1
        lv = level + d
        if flags & TABLE_POST:
            count(M, op, C.K_VISIT_POST, lv, 1)
            r = call_visitor(T, M, M[STACK_PFN + d], M[STACK_IDX + d], M[STACK_OLD + d], lv,
                             TABLE_POST)
            if not walk_continue(flags, r):
                return r
        M[STACK_IDX + d] += 1


@njit(cache=True, _nrt=False)
def kvm_pgtable_walk(T, M, op, addr, size, flags):
    """``kvm_pgtable_walk()`` over ``[addr, addr + size)``, counted as ``op``;
    the visitor is the operation's, and its argument is in the ``W`` fields."""
    count(M, op, C.K_WALKS, NOLV, 1)
    count(M, op, C.K_WALK_BYTES, NOLV, size)
    page = 1 << M[S.PAGE_SHIFT]
    start = addr & ~(page - 1)
    end = (start + size + page - 1) & ~(page - 1)
    M[W.ADDR] = start
    M[W.START] = start
    M[W.END] = end
    M[W.FLAGS] = flags
    M[W.OP] = op
    M[W.BUILT_COMPLETE] = 0
    M[W.NDEFERRED] = 0
    for i in range(W.SCRATCH, W.SCRATCH_LAST + 1):
        M[i] = 0
    limit = 1 << M[S.IPA_BITS]
    if start > limit or end > limit:
        return -ERANGE
    ridx = (start & (limit - 1)) >> level_shift(M, M[S.START_LEVEL] - 1)
    ret = 0
    while M[W.ADDR] < end:
        ret = walk_table(T, M, M[ROOT + ridx], M[S.START_LEVEL])
        if ret != 0:
            break
        ridx += 1
    # A variant's hook: what it deferred to the end of the call (whatever ret).
    call_after_walk(T, M, op)
    if M[W.NDEFERRED] != 0 and M[S.DEFER_FAULT] == 0:
        # Entries broken with defer_make and never made: the VM refuses the
        # run after the call, as the reference does at this point.
        M[S.DEFER_FAULT] = M[W.NDEFERRED]
    return ret
