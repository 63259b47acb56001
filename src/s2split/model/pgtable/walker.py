"""The generic stage-2 page-table walker (``kvm_pgtable_walk`` and friends).

One walker, many small visitors -- the shape of ``arch/arm64/kvm/hyp/pgtable.c``.
The order of reads, visitor calls and descents is the kernel's, because every
count the tool reports depends on it. Visiting one entry:

1. read it; it is a *table* if valid with the type bit set below level 3,
   otherwise a *leaf* (invalid entries are leaves too);
2. call the visitor once: TABLE_PRE for a table if the walk asked for it,
   LEAF for a leaf if the walk asked for it;
3. if the visitor ran, read the entry again and decide table/leaf again -- a
   visitor that installed a table (map, split) makes the walker descend into it;
4. stop if the visitor's result says so (:func:`walk_continue`);
5. a leaf: advance the address to the next boundary of this level; done;
6. a table: walk the child table one level down, then, if asked, call the
   visitor with TABLE_POST (the entry as re-read in step 3).

A table loop starts at the entry covering the current address and ends at the
end of the table, when the address reaches the end of the range, or when a
visit returns non-zero. ``-EAGAIN`` is swallowed unless the walk carries
HANDLE_FAULT (in newer kernels the same rule is spelled IGNORE_EAGAIN; it lives
only in :func:`walk_continue`).

Model-only walk flags implement the variants under study (see
:mod:`s2split.model.pgtable.variants`): ``SKIP_LEVEL(n)`` (the walker does not
descend into tables whose entries are at level ``n``: it advances past the
table entry as if it were a leaf), ``SKIP_NEW_CHILDREN`` (it does not descend
into a subtree that the visitor has just built complete) and ``RETURN_HINTS``
(visitors may return positive hints: skip my siblings / skip my children).
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from ...arm64.arch import LAST_LEVEL
from ...counting.counters import (K_DESCENT, K_HIT_L1, K_LOOPS, K_READ_INVALID, K_READ_LEAF,
                                  K_READ_TABLE, K_RELOAD, K_SKIP_CHILDREN, K_SKIP_LEVEL,
                                  K_SKIP_SIBLINGS, K_VISIT_LEAF, K_VISIT_POST, K_VISIT_PRE,
                                  K_WALK_BYTES, K_WALKS, NOLEVEL, SLOTS)
from ...plumbing.errors import EAGAIN, EINVAL, ERANGE, S2Error


class WalkFlags(enum.IntFlag):
    """``enum kvm_pgtable_walk_flags`` plus the model's variant flags."""

    LEAF = 1 << 0
    TABLE_PRE = 1 << 1
    TABLE_POST = 1 << 2
    SHARED = 1 << 3
    HANDLE_FAULT = 1 << 4
    SKIP_BBM_TLBI = 1 << 5
    SKIP_CMO = 1 << 6
    # model extensions (variants); bit 8 + level + 1 skips a level
    SKIP_LEVEL0 = 1 << 9
    SKIP_LEVEL1 = 1 << 10
    SKIP_LEVEL2 = 1 << 11
    SKIP_LEVEL3 = 1 << 12
    SKIP_NEW_CHILDREN = 1 << 13
    RETURN_HINTS = 1 << 14


LEAF = int(WalkFlags.LEAF)
TABLE_PRE = int(WalkFlags.TABLE_PRE)
TABLE_POST = int(WalkFlags.TABLE_POST)
SHARED = int(WalkFlags.SHARED)
HANDLE_FAULT = int(WalkFlags.HANDLE_FAULT)
SKIP_BBM_TLBI = int(WalkFlags.SKIP_BBM_TLBI)
SKIP_CMO = int(WalkFlags.SKIP_CMO)
SKIP_NEW_CHILDREN = int(WalkFlags.SKIP_NEW_CHILDREN)
RETURN_HINTS = int(WalkFlags.RETURN_HINTS)
SKIP_LEVEL_BASE = 9  # the bit of SKIP_LEVEL0

#: Positive visitor results understood under RETURN_HINTS.
HINT_SKIP_SIBLINGS = 1
HINT_SKIP_CHILDREN = 2
_TABLE_DONE = 1 << 20  # internal: a table loop cut short by a hint


def skip_level(level: int) -> int:
    """The walk flag that makes the walker skip tables holding ``level`` entries."""
    if not 0 <= level <= 3:
        raise ValueError(f"no skip flag for level {level}")
    return 1 << (SKIP_LEVEL_BASE + level)


#: Every skip_level(l) flag.
SKIP_LEVELS_ALL = sum(1 << (SKIP_LEVEL_BASE + lv) for lv in range(4))

#: skip_level(l), indexed by l (the level of the children of a table entry).
_SKIP_CHILD_LEVEL = tuple(skip_level(level) for level in range(4))


def walk_continue(flags: int, ret: int) -> bool:
    """``kvm_pgtable_walk_continue()``: -EAGAIN only stops a fault walk."""
    if ret == -EAGAIN:
        return not flags & HANDLE_FAULT
    return ret == 0


#: A visitor: ``(walk, pfn, table, idx, old, level, visit) -> int``. ``table``
#: is the entry list of page ``pfn``; the entry is ``table[idx]``, read as ``old``.
Visitor = Callable[["Walk", int, list, int, int, int, int], int]


class Walk:
    """``struct kvm_pgtable_walk_data`` + walker: the state of one walk."""

    __slots__ = ("pgt", "cb", "flags", "arg", "start", "addr", "end", "c", "built_complete",
                 "scratch", "deferred")

    def __init__(self, pgt: Any, cb: Visitor, flags: int, arg: Any, start: int, end: int,
                 c: list[int]):
        self.pgt = pgt
        self.cb = cb
        self.flags = flags
        self.arg = arg
        self.start = start
        self.addr = start
        self.end = end
        self.c = c  # the operation's counters in the tally
        self.built_complete = False  # set by a visitor under SKIP_NEW_CHILDREN
        self.scratch = [0, 0, 0, 0]  # a variant's per-walk state (visitor_api.NSCRATCH)
        self.deferred = None  # entries broken, to be made later (visitor_api.defer_make)


def walk_table(w: Walk, pfn: int, level: int) -> int:
    """``__kvm_pgtable_walk()``: one table loop."""
    pgt = w.pgt
    # The kernel warns and refuses a table below the last level (reachable
    # only through create_unlinked/free_unlinked of a level-3 "block").
    if not -1 <= level <= LAST_LEVEL:
        return -EINVAL
    w.c[K_LOOPS * SLOTS + level + 1] += 1
    table = pgt.mem.pages[pfn]
    ptrs = pgt.ptrs
    idx = (w.addr >> pgt.shifts[level + 1]) & (ptrs - 1)
    ret = 0
    while idx < ptrs:
        if w.addr >= w.end:
            break
        ret = _visit(w, pfn, table, idx, level)
        if ret:
            if ret == _TABLE_DONE:
                ret = 0
            break
        idx += 1
    return ret


def _advance(w: Walk, level: int) -> None:
    size = 1 << w.pgt.shifts[level + 1]
    w.addr = (w.addr & ~(size - 1)) + size


def _visit(w: Walk, pfn: int, table: list, idx: int, level: int) -> int:
    """``__kvm_pgtable_visit()``."""
    c = w.c
    flags = w.flags
    lv = level + 1
    old = table[idx]
    is_table = level < 3 and (old & 3) == 3
    if is_table:
        c[K_READ_TABLE * SLOTS + lv] += 1
    elif old & 1:
        c[K_READ_LEAF * SLOTS + lv] += 1
    else:
        c[K_READ_INVALID * SLOTS + lv] += 1
    c[(K_HIT_L1 + w.pgt.mem.touch(pfn, idx)) * SLOTS + lv] += 1

    ret = 0
    called = False
    if is_table:
        if flags & TABLE_PRE:
            c[K_VISIT_PRE * SLOTS + lv] += 1
            ret = w.cb(w, pfn, table, idx, old, level, TABLE_PRE)
            called = True
    elif flags & LEAF:
        c[K_VISIT_LEAF * SLOTS + lv] += 1
        ret = w.cb(w, pfn, table, idx, old, level, LEAF)
        called = True

    if called:
        # Re-read: a visitor that installed or replaced a table is descended into.
        old = table[idx]
        c[K_RELOAD * SLOTS + lv] += 1
        is_table = level < 3 and (old & 3) == 3

    skip_new = False
    if ret > 0:
        # Only RETURN_HINTS visitors return positive values.
        if ret == HINT_SKIP_SIBLINGS:
            c[K_SKIP_SIBLINGS * SLOTS + lv] += 1
            _advance(w, level - 1)
            return _TABLE_DONE
        skip_new = ret == HINT_SKIP_CHILDREN
        ret = 0
    if w.built_complete:
        w.built_complete = False
        skip_new = True

    if not walk_continue(flags, ret):
        return ret

    if not is_table:
        _advance(w, level)
        return 0

    if skip_new or flags & _SKIP_CHILD_LEVEL[level + 1]:
        c[(K_SKIP_CHILDREN if skip_new else K_SKIP_LEVEL) * SLOTS + lv] += 1
        _advance(w, level)
    else:
        c[K_DESCENT * SLOTS + lv] += 1
        child = w.pgt.mem.pfn(w.pgt.pte_to_phys(old))
        ret = walk_table(w, child, level + 1)
        if not walk_continue(flags, ret):
            return ret

    if flags & TABLE_POST:
        c[K_VISIT_POST * SLOTS + lv] += 1
        ret = w.cb(w, pfn, table, idx, old, level, TABLE_POST)

    return 0 if walk_continue(flags, ret) else ret


def kvm_pgtable_walk(pgt: Any, addr: int, size: int, cb: Visitor, flags: int, arg: Any,
                     op: int) -> int:
    """``kvm_pgtable_walk()`` over ``[addr, addr + size)`` of ``pgt``, counted as ``op``."""
    c = pgt.tally.ops[op]
    c[K_WALKS * SLOTS + NOLEVEL] += 1
    c[K_WALK_BYTES * SLOTS + NOLEVEL] += size
    page = pgt.geom.granule
    start = addr & ~(page - 1)
    end = (start + size + page - 1) & ~(page - 1)
    w = Walk(pgt, cb, flags, arg, start, end, c)
    limit = pgt.geom.ipa_size
    if w.addr > limit or w.end > limit:
        return -ERANGE
    if pgt.root is None:
        return -EINVAL
    idx = pgt.geom.pgd_page_index(w.addr)
    ret = 0
    while w.addr < w.end:
        ret = walk_table(w, pgt.root[idx], pgt.geom.start_level)
        if ret:
            break
        idx += 1
    after = pgt.after_walk.get(op)
    if after is not None:
        # A variant's hook: what it deferred to the end of the call (whatever ret).
        after(w)
    if w.deferred:
        raise S2Error(f"{len(w.deferred)} entries broken with defer_make were never made "
                      "(call make_deferred in the after-walk hook)")
    return ret
