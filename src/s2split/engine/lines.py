"""Where entry reads hit, in the fast engine: the twin of
:meth:`s2split.model.pgtable.memory.TableMemory.touch` over the line clock in ``M``
(``S.LINE_CLOCK``, ``S.LAST_LINE``, a stamp per line of table memory at
``S.STAMPS``), classified by the shared rule :func:`s2split.arm64.rules.hit_class`.

A run of reads along one table page (the walker's level-3 runs, a fresh
table filled) touches each of its lines once: the first read of a line is
classified, the others read the line just read and hit L1 -- the same as
touching entry by entry, one tick per line instead of one call per entry.
"""

from __future__ import annotations

from numba import njit

from ..arm64.hierarchy import LINE_ENTRY_SHIFT
from ..counting import counters as C
from .pte import table_pfn
from .rules import hit_class
from .state import ROOT, S, count, level_shift


@njit(cache=True, inline="always", _nrt=False)
def _tick(M, line, stamp_at):
    """Touch ``line`` (not the line touched last): its class."""
    M[S.LINE_CLOCK] += 1
    now = M[S.LINE_CLOCK]
    cls = hit_class(M[stamp_at], now, M[S.L1_LINES], M[S.L2_LINES], M[S.LLC_LINES])
    M[stamp_at] = now
    M[S.LAST_LINE] = line
    return cls


@njit(cache=True, _nrt=False)
def touch(M, op, level, pfn, idx):
    """One entry read of ``idx`` in page ``pfn``, counted where it hits."""
    ln = (pfn * M[S.PTRS] + idx) >> LINE_ENTRY_SHIFT
    cls = 0
    if ln != M[S.LAST_LINE]:
        cls = _tick(M, ln, M[S.STAMPS] + ln)
    count(M, op, C.K_HIT_L1 + cls, level, 1)


@njit(cache=True, _nrt=False)
def touch_run(M, op, level, pfn, i, n):
    """The ``n`` entry reads ``i .. i + n - 1`` of page ``pfn``, in order."""
    if n <= 0:
        return
    base = pfn * M[S.PTRS]
    first = (base + i) >> LINE_ENTRY_SHIFT
    last = (base + i + n - 1) >> LINE_ENTRY_SHIFT
    stamps = M[S.STAMPS]
    c1 = 0
    c2 = 0
    c3 = 0
    for ln in range(first, last + 1):
        if ln == M[S.LAST_LINE]:
            continue  # only the first line can be the one just read
        cls = _tick(M, ln, stamps + ln)
        c1 += cls == 1
        c2 += cls == 2
        c3 += cls == 3
    count(M, op, C.K_HIT_L1, level, n - c1 - c2 - c3)
    count(M, op, C.K_HIT_L2, level, c1)
    count(M, op, C.K_HIT_LLC, level, c2)
    count(M, op, C.K_HIT_DRAM, level, c3)


@njit(cache=True, _nrt=False)
def touch_path(T, M, op, ipa):
    """The reads of a one-page walk down to the entry of ``ipa`` (a replayed
    fault: one read per level, root to level 3, as the walk it stands for)."""
    level = M[S.START_LEVEL]
    limit = 1 << M[S.IPA_BITS]
    pfn = M[ROOT + ((ipa & (limit - 1)) >> level_shift(M, level - 1))]
    ptrs = M[S.PTRS]
    while True:
        idx = (ipa >> level_shift(M, level)) & (ptrs - 1)
        touch(M, op, level, pfn, idx)
        e = T[pfn, idx]
        if level == 3 or (e & 3) != 3:
            return
        pfn = table_pfn(M, e)
        level += 1


@njit(cache=True, _nrt=False)
def touch_level3_again(M, op, pfn, idx, prev):
    """:func:`touch_path` for a fault that follows another one through the
    same upper tables, nothing touched in between (a run of replayed faults
    in one level-3 table), whose level-3 read was of line ``prev``: the
    upper lines come back after the m = 3 - START_LEVEL other lines of a
    walk, one tick each, and so does ``prev`` if this read is of it again --
    all at distance m, counted by the caller (:func:`count_again`). Only a
    read of another level-3 line is classified here; ``prev``'s stamp is
    written as it is left, the line read last and the upper ones when the
    run ends (:func:`stamp_upper`). Returns the level-3 line read."""
    m = 3 - M[S.START_LEVEL]
    M[S.LINE_CLOCK] += m + 1
    line = (pfn * M[S.PTRS] + idx) >> LINE_ENTRY_SHIFT
    if line != prev:
        stamps = M[S.STAMPS]
        M[stamps + prev] = M[S.LINE_CLOCK] - m - 1  # the previous fault's level-3 tick
        cls = hit_class(M[stamps + line], M[S.LINE_CLOCK], M[S.L1_LINES], M[S.L2_LINES],
                        M[S.LLC_LINES])
        count(M, op, C.K_HIT_L1 + cls, 3, 1)
    return line


@njit(cache=True, _nrt=False)
def count_again(M, op, n, same):
    """The reads at distance m of :func:`touch_level3_again`: the upper reads
    of ``n`` faults, and ``same`` level-3 reads of the line read before."""
    if n == 0:
        return
    m = 3 - M[S.START_LEVEL]
    cls = hit_class(1, m + 2, M[S.L1_LINES], M[S.L2_LINES], M[S.LLC_LINES])
    for level in range(M[S.START_LEVEL], 3):
        count(M, op, C.K_HIT_L1 + cls, level, n)
    count(M, op, C.K_HIT_L1 + cls, 3, same)


@njit(cache=True, _nrt=False)
def stamp_upper(T, M, ipa, t):
    """The upper lines of the walk to ``ipa`` as last touched by a fault
    whose first tick was ``t + 1``: level START_LEVEL + j at ``t + 1 + j``."""
    level = M[S.START_LEVEL]
    limit = 1 << M[S.IPA_BITS]
    pfn = M[ROOT + ((ipa & (limit - 1)) >> level_shift(M, level - 1))]
    ptrs = M[S.PTRS]
    j = 0
    while level < 3:
        idx = (ipa >> level_shift(M, level)) & (ptrs - 1)
        M[M[S.STAMPS] + ((pfn * ptrs + idx) >> LINE_ENTRY_SHIFT)] = t + 1 + j
        pfn = table_pfn(M, T[pfn, idx])
        level += 1
        j += 1


COMPILED = (touch, touch_run, touch_path, touch_level3_again, count_again, stamp_upper)
