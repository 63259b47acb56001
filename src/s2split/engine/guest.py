"""Guest passes in the fast engine: the twin of
:func:`s2split.selftest.memstress.memstress_pass` and ``VM.guest_access``, with the
replay of repeated fault classes.

Most faults of a pass are alike: a write to a write-protected page (relax
permissions at level 3), or a first touch of a page whose level-3 table
exists (map one page). For those two classes the counted work is a function
of a few inputs only -- the slot, the entry's attribute bits, the access, the
mapping decision -- and of nothing that changes during the pass. The first
fault of a class runs the real path and records the counter delta it
produced; later faults with the same key apply the same state change and
count one more replay; the deltas are added once per replay at the end of
the pass.

Finding the entry costs more than the replay: each vCPU keeps the table its
last lookup ended in, and what a level-3 fault there learns of the memslot
(the translation cache, ``TC_*``), until a fault takes the real path. A lone
vCPU walking its region in order then goes through a level-3 table in one
loop (:func:`_table_run`) and through a block it may access in one step
(:func:`_block_hits`); at 0 or 100 percent writes the generator's draws,
whose values decide nothing, are skipped in one step. tests/
test_differential.py and test_differential_guest.py pin all of this to the
reference engine.
"""

from __future__ import annotations

from numba import njit

from ..arm64.bits import ATTR_HI_MASK, ATTR_LO_MASK, S2AP_R, S2AP_W, VALID, XN, Prot
from ..counting import counters as C
from ..selftest.memstress import PRNG_MODULUS, PRNG_MULTIPLIER, guest_random_skip as _skip
from . import rules as R
from .lines import count_again, stamp_upper, touch_level3_again, touch_path
from .memory import cache_nobjs
from .mmu import (fault_supports_stage2_huge_mapping, fault_prot, gfn_to_memslot, search_memslots,
                  kvm_handle_guest_abort, slot_logging)
from .pte import make_leaf, prot_to_attr, table_pfn
from .state import (BACKING_ANON, BACKING_HUGETLB, COUNTERS, ROOT, S, SlotCol, VcpuReg, NREGS,
                    VARIANT_VISITORS, granule_size, kvm_count, level_shift, slot_index)

ATTR_MASK = ATTR_LO_MASK | ATTR_HI_MASK
guest_random_skip = njit(cache=True, _nrt=False)(_skip)
PROT_X = int(Prot.X)

#: The replay table R: R[0] classes recorded, then per class its key
#: (REPLAY_KEY fields), the replays since, and the counter delta.
REPLAY_KEY = 6
NCLASS = 4
REPLAY_STRIDE = REPLAY_KEY + 1 + C.SIZE
REPLAY_SIZE = 1 + NCLASS * REPLAY_STRIDE
CLASS_RELAX, CLASS_MAP = 1, 2
#: guest_access's result when a fault keeps coming back (the reference's AssertionError).
KEEPS_FAULTING = -1000

#: After the replay table, the translation cache: a generation, then one row
#: per vCPU (TC_* fields) holding the table its last lookup ended in and what
#: its last level-3 fault learnt of that table's memslot. A row is valid only
#: in the generation it was filled in; memstress_pass starts a new one at the
#: start of a pass and after every fault taken through the real path, the only
#: thing in a pass that changes tables above level 3, vCPU caches or the
#: recorded classes (a replay changes one level-3 entry, its table's reference
#: count and a dirty bit).
TC_GEN = REPLAY_SIZE
TC_BASE = TC_GEN + 1
TC_VGEN, TC_KEY, TC_SHIFT, TC_LEVEL, TC_PFN, TC_LSHIFT = 0, 1, 2, 3, 4, 5
TC_INFO_GEN, TC_INFO_KEY, TC_LO, TC_HI, TC_SLOT = 6, 7, 8, 9, 10
TC_LOGGING, TC_DECISION, TC_NOBJS_OK = 11, 12, 13
TC_STRIDE = 14


def replay_table_size(nvcpus: int) -> int:
    """The length of ``RT`` for ``nvcpus`` vCPUs."""
    return TC_BASE + max(nvcpus, 1) * TC_STRIDE


@njit(cache=True, _nrt=False)
def lookup_ptep(T, M, ipa):
    """``Stage2PageTable.lookup``, also returning the table page and index of the
    entry: (entry, level, pfn, idx) as the MMU would find them, uncounted."""
    level = M[S.START_LEVEL]
    limit = 1 << M[S.IPA_BITS]
    pfn = M[ROOT + ((ipa & (limit - 1)) >> level_shift(M, level - 1))]
    ptrs = M[S.PTRS]
    while True:
        idx = (ipa >> level_shift(M, level)) & (ptrs - 1)
        e = T[pfn, idx]
        if level == 3 or (e & 3) != 3:
            return e, level, pfn, idx
        pfn = table_pfn(M, e)
        level += 1


@njit(cache=True, _nrt=False)
def _slot_class(M, v, s, gpa):
    """The part of a level-3 fault's class that holds for every page of one
    level-3 table in one memslot: (logging, the decision for an empty entry
    while not logging, or 0, and whether its faults may be replayed: the
    vCPU's cache can map without a top-up and the variant brings no visitor
    of its own for map or relax_perms). Constant over the table: the
    huge-mapping check asks about the PMD block of ``hva``, which is the
    table's own block whenever guest and host addresses agree modulo PMD
    size, and fails for all pages otherwise."""
    logging = slot_logging(M, s)
    # A variant's own map or relax_perms visitor may do different work for
    # each page, so no fault can stand for another's: nothing is replayed.
    nobjs_ok = cache_nobjs(M, v) >= M[S.LEVELS] - 1 and \
        M[VARIANT_VISITORS + C.OP_MAP] == 0 and M[VARIANT_VISITORS + C.OP_RELAX] == 0
    decision = 0
    backing = M[slot_index(M, s, SlotCol.BACKING)]
    if backing == BACKING_ANON:
        ps = M[S.PAGE_SHIFT]
        hva = M[slot_index(M, s, SlotCol.USERSPACE_ADDR)] + \
            (((gpa >> ps) - M[slot_index(M, s, SlotCol.BASE_GFN)]) << ps)
        if not fault_supports_stage2_huge_mapping(M, s, hva, granule_size(M, 2)):
            decision = 2
    elif backing == BACKING_HUGETLB and \
            M[slot_index(M, s, SlotCol.HUGETLB_CLASS)] == R.HC_CONT_PTE:
        decision = 3
    return logging, decision, nobjs_ok


@njit(cache=True, inline="always", _nrt=False)
def _entry_class(entry, write, logging, decision):
    """The rest of a level-3 fault's class, from the entry and the access:
    (class, attribute key, decision), class 0 if the fault is not replayable."""
    if entry & VALID:
        if write and logging and entry & S2AP_R and not entry & S2AP_W:
            return CLASS_RELAX, entry & ATTR_MASK, 1
        return 0, 0, 0
    if entry != 0:
        return 0, 0, 0
    if logging:
        return CLASS_MAP, 0, 1
    if decision:
        return CLASS_MAP, 0, decision
    return 0, 0, 0


@njit(cache=True, _nrt=False)
def _fault_class(T, M, v, gpa, write, entry, level):
    """(class, slot, attribute key, decision) of a replayable fault, class 0 if none."""
    if level != 3:
        return 0, -1, 0, 0
    s = gfn_to_memslot(M, gpa >> M[S.PAGE_SHIFT])
    if s < 0:
        return 0, -1, 0, 0
    logging, decision, nobjs_ok = _slot_class(M, v, s, gpa)
    if not nobjs_ok:
        return 0, -1, 0, 0
    cls, akey, decision = _entry_class(entry, write, logging, decision)
    if cls == 0:
        return 0, -1, 0, 0
    return cls, s, akey, decision


@njit(cache=True, inline="always", _nrt=False)
def _replay_consts(M, cls, s, write):
    """What one fault of a recorded class changes, for every page of memslot
    ``s``: (attribute bits to clear on a relaxed entry, attributes of a new
    leaf, the slot's first gfn, its host address, and the offset of the
    dirty bitmap to mark, -1 if none)."""
    writable = not (slot_logging(M, s) and not write)
    prot = fault_prot(M, writable)
    attr_clr = XN if prot & PROT_X else 0
    attr = prot_to_attr(M, prot) if cls == CLASS_MAP else 0
    bitmap = -1
    # Uncounted here: the recorded delta holds the class's dirty_marked.
    if writable and M[slot_index(M, s, SlotCol.HAS_BITMAP)]:
        bitmap = M[slot_index(M, s, SlotCol.BITMAP)]
    return (attr_clr, attr, M[slot_index(M, s, SlotCol.BASE_GFN)],
            M[slot_index(M, s, SlotCol.HOST_PA)], bitmap)


@njit(cache=True, inline="always", _nrt=False)
def _replay_apply(T, M, B, cls, attr_clr, attr, base, host_pa, bitmap, gfn, entry, pfn, idx):
    """The state change of one fault of a recorded class, from :func:`_replay_consts`."""
    if cls == CLASS_RELAX:
        T[pfn, idx] = (entry & ~attr_clr) | S2AP_R | S2AP_W
    else:
        T[pfn, idx] = make_leaf(M, host_pa + ((gfn - base) << M[S.PAGE_SHIFT]), attr, 3)
        M[M[S.REFCOUNT] + pfn] += 1
    if bitmap >= 0:
        rel = gfn - base
        B[bitmap + (rel >> 6)] |= 1 << (rel & 63)


@njit(cache=True, inline="always", _nrt=False)
def _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx):
    """The state change of one fault of a recorded class."""
    attr_clr, attr, base, host_pa, bitmap = _replay_consts(M, cls, s, write)
    touch_path(T, M, _class_op(cls), gpa)
    _replay_apply(T, M, B, cls, attr_clr, attr, base, host_pa, bitmap, gpa >> M[S.PAGE_SHIFT],
                  entry, pfn, idx)


@njit(cache=True, inline="always", _nrt=False)
def _class_op(cls):
    """The operation whose walk a fault of class ``cls`` makes."""
    return C.OP_RELAX if cls == CLASS_RELAX else C.OP_MAP


@njit(cache=True, _nrt=False)
def _replayable_reads(M, RT, d, cls):
    """Whether the delta at ``RT[d:]`` read one entry per level, root to
    level 3, all in the walk of ``cls``'s operation -- what :func:`touch_path`
    replays in place of the recorded hit counts, which it zeroes (a replay's
    reads hit where its own touches say, not where the first fault's did)."""
    op = _class_op(cls)
    ok = True
    for o in range(C.NOPS):
        if o == C.OP_GET_LEAF:
            continue  # the host's tables: not classified
        for sl in range(C.SLOTS):
            n = 0
            for kind in (C.K_READ_TABLE, C.K_READ_LEAF, C.K_READ_INVALID):
                n += RT[d + (o * C.NKINDS + kind) * C.SLOTS + sl]
            want = 1 if o == op and M[S.START_LEVEL] + 1 <= sl <= 4 else 0
            ok = ok and n == want
            for kind in range(C.K_HIT_L1, C.K_HIT_L1 + 4):
                RT[d + (o * C.NKINDS + kind) * C.SLOTS + sl] = 0
    return ok


@njit(cache=True, inline="always", _nrt=False)
def _recorded(RT, cls, s, akey, write, decision):
    """The offset in ``RT`` of the recorded class with this key, or -1."""
    for c in range(RT[0]):
        k = 1 + c * REPLAY_STRIDE
        if RT[k] == cls and RT[k + 1] == s and RT[k + 2] == akey and RT[k + 3] == write \
                and RT[k + 4] == decision:
            return k
    return -1


@njit(cache=True, _nrt=False)
def guest_access(T, M, B, RT, v, gpa, write):
    """``VM.guest_access``: one guest load or store -- translated, replayed as
    a recorded fault class, or taken through the real fault path until it
    goes through. 0, or a negative errno."""
    need = S2AP_W if write else S2AP_R
    kvm_count(M, C.K_GUEST_ACCESSES, 1)
    entry, level, pfn, idx = lookup_ptep(T, M, gpa)
    if entry & VALID and entry & need:
        return 0
    cls, s, akey, decision = _fault_class(T, M, v, gpa, write, entry, level)
    if cls:
        k = _recorded(RT, cls, s, akey, write, decision)
        if k >= 0:
            _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx)
            RT[k + REPLAY_KEY] += 1
            return 0
    # The real path; a first fault of a class records its delta.
    record = cls != 0 and RT[0] < NCLASS
    if record:
        d = 1 + RT[0] * REPLAY_STRIDE + REPLAY_KEY + 1
        for i in range(C.SIZE):
            RT[d + i] = M[COUNTERS + i]
    first = True
    for _ in range(8):
        if not first:
            entry, level, pfn, idx = lookup_ptep(T, M, gpa)
            if entry & VALID and entry & need:
                break
        first = False
        ret = kvm_handle_guest_abort(T, M, B, v, gpa, write, entry, level)
        if ret < 0:
            return ret
        if ret == 1 and gfn_to_memslot(M, gpa >> M[S.PAGE_SHIFT]) < 0:
            return 0  # MMIO: userspace handles it
        if record:
            e2, l2, p2, i2 = lookup_ptep(T, M, gpa)
            if ret == 0 and e2 & VALID and e2 & need:
                k = 1 + RT[0] * REPLAY_STRIDE
                RT[k] = cls
                RT[k + 1] = s
                RT[k + 2] = akey
                RT[k + 3] = write
                RT[k + 4] = decision
                RT[k + REPLAY_KEY] = 0
                d = k + REPLAY_KEY + 1
                for i in range(C.SIZE):
                    RT[d + i] = M[COUNTERS + i] - RT[d + i]
                if _replayable_reads(M, RT, d, cls):
                    RT[0] += 1
            record = False
    else:
        return KEEPS_FAULTING
    return 0


@njit(cache=True, _nrt=False)
def _fill_slot_info(M, RT, c, v, gpa):
    """Fill translation cache row ``c`` (vCPU ``v``) with the memslot holding
    ``gpa`` and :func:`_slot_class`'s answer, over the part of the level-3
    table at ``gpa`` that memslot covers (one page and no slot, outside
    every memslot). Searches without touching the last-found cache: the
    caller updates it where guest_access would have searched."""
    ps = M[S.PAGE_SHIFT]
    gfn = gpa >> ps
    shift2 = level_shift(M, 2)
    s = search_memslots(M, gfn)
    RT[c + TC_INFO_GEN] = RT[TC_GEN]
    RT[c + TC_INFO_KEY] = gpa >> shift2
    RT[c + TC_SLOT] = s
    if s < 0:
        RT[c + TC_LO] = gfn
        RT[c + TC_HI] = gfn + 1
        RT[c + TC_NOBJS_OK] = 0
        return
    logging, decision, nobjs_ok = _slot_class(M, v, s, gpa)
    base = M[slot_index(M, s, SlotCol.BASE_GFN)]
    first = (gpa >> shift2) << (shift2 - ps)
    RT[c + TC_LO] = max(base, first)
    RT[c + TC_HI] = min(base + M[slot_index(M, s, SlotCol.NPAGES)],
                        first + (1 << (shift2 - ps)))
    RT[c + TC_LOGGING] = logging
    RT[c + TC_DECISION] = decision
    RT[c + TC_NOBJS_OK] = nobjs_ok


@njit(cache=True, _nrt=False)
def _fast_access(T, M, B, RT, v, gpa, write):
    """:func:`guest_access` for an access that translates or replays a
    recorded class, from vCPU ``v``'s translation cache row: True if done
    (uncounted: the caller counts the access), False for the real path
    (nothing changed then but ``LAST_SLOT``, as guest_access would leave it).

    Same answers as guest_access: the cached table is the one lookup_ptep
    would reach (same generation, same address bits above the table), and a
    table entry met in a cached block-level table sends to a full lookup."""
    c = TC_BASE + v * TC_STRIDE
    gen = RT[TC_GEN]
    hit = RT[c + TC_VGEN] == gen and (gpa >> RT[c + TC_SHIFT]) == RT[c + TC_KEY]
    if hit:
        level = RT[c + TC_LEVEL]
        pfn = RT[c + TC_PFN]
        idx = (gpa >> RT[c + TC_LSHIFT]) & (M[S.PTRS] - 1)
        entry = T[pfn, idx]
        hit = level == 3 or (entry & 3) != 3
    if not hit:
        entry, level, pfn, idx = lookup_ptep(T, M, gpa)
        shift = level_shift(M, level - 1)
        RT[c + TC_VGEN] = gen
        RT[c + TC_KEY] = gpa >> shift
        RT[c + TC_SHIFT] = shift
        RT[c + TC_LEVEL] = level
        RT[c + TC_PFN] = pfn
        RT[c + TC_LSHIFT] = level_shift(M, level)
    need = S2AP_W if write else S2AP_R
    if level != 3:
        return (entry & VALID) != 0 and (entry & need) != 0
    ps = M[S.PAGE_SHIFT]
    gfn = gpa >> ps
    shift2 = level_shift(M, 2)
    if RT[c + TC_INFO_GEN] != gen or RT[c + TC_INFO_KEY] != gpa >> shift2 or \
            not RT[c + TC_LO] <= gfn < RT[c + TC_HI]:
        _fill_slot_info(M, RT, c, v, gpa)
    if entry & VALID and entry & need:
        return True
    s = RT[c + TC_SLOT]
    if s < 0:
        return False
    M[S.LAST_SLOT] = s  # where gfn_to_memslot would leave it
    logging = RT[c + TC_LOGGING]
    decision = RT[c + TC_DECISION]
    nobjs_ok = RT[c + TC_NOBJS_OK]
    if not nobjs_ok:
        return False
    cls, akey, decision = _entry_class(entry, write, logging, decision)
    if cls == 0:
        return False
    k = _recorded(RT, cls, s, akey, write, decision)
    if k < 0:
        return False
    _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx)
    RT[k + REPLAY_KEY] += 1
    return True


@njit(cache=True, _nrt=False)
def _run_length(M, RT, v, gpa, left):
    """How many of vCPU ``v``'s next ``left`` sequential accesses, from
    ``gpa``, fall in its cached level-3 table and in the memslot part of it
    its cached class holds for (0 if the row is stale or the vCPU's cache
    would need a top-up)."""
    c = TC_BASE + v * TC_STRIDE
    gen = RT[TC_GEN]
    if RT[c + TC_VGEN] != gen or RT[c + TC_LEVEL] != 3 or \
            (gpa >> RT[c + TC_SHIFT]) != RT[c + TC_KEY] or RT[c + TC_INFO_GEN] != gen or \
            RT[c + TC_INFO_KEY] != RT[c + TC_KEY] or not RT[c + TC_NOBJS_OK]:
        return 0
    ps = M[S.PAGE_SHIFT]
    gfn = gpa >> ps
    if not RT[c + TC_LO] <= gfn < RT[c + TC_HI]:
        return 0
    end = min((RT[c + TC_KEY] + 1) << RT[c + TC_SHIFT], RT[c + TC_HI] << ps)
    gps = M[S.GUEST_PAGE_SHIFT]
    return min(left, (end - gpa + (1 << gps) - 1) >> gps)


@njit(cache=True, _nrt=False)
def _table_run(T, M, B, RT, v, gpa, n, rng, write_percent):
    """:func:`_fast_access` for ``n`` sequential accesses of vCPU ``v`` from
    ``gpa`` that :func:`_run_length` found in one level-3 table and one
    memslot: one table, one slot and one class decision for all, no lookup.
    Stops before the first access that needs the real path. Returns the
    accesses done and the generator's state after them; at 0 or 100 percent
    writes the decision does not depend on the draws, which are then skipped
    over in one step at the end."""
    c = TC_BASE + v * TC_STRIDE
    pfn = RT[c + TC_PFN]
    s = RT[c + TC_SLOT]
    logging = RT[c + TC_LOGGING]
    decision = RT[c + TC_DECISION]
    ps = M[S.PAGE_SHIFT]
    gps = M[S.GUEST_PAGE_SHIFT]
    mask = M[S.PTRS] - 1
    fixed = write_percent <= 0 or write_percent >= 100
    write = write_percent >= 100
    # The class of the last replay (k: its offset in RT, or -1), and replays
    # of it not yet added to RT: most runs replay one class throughout.
    k = -1
    kcls = kakey = kdec = kwrite = -1
    attr_clr = attr = base = host_pa = 0
    bitmap = -1
    nrep = 0
    done = 0
    # Where the replays' reads hit: the first replay touches its whole walk;
    # the others come back to the same upper lines (touch_level3_again), whose
    # reads -- and the level-3 reads of the line the fault before read -- are
    # counted per operation and stamped when the run ends.
    touched = False
    again_relax = 0
    again_map = 0
    same_relax = 0
    same_map = 0
    l3_line = -1
    last_a = 0
    while done < n:
        nxt = rng
        if not fixed:
            nxt = rng * PRNG_MULTIPLIER % PRNG_MODULUS
            write = nxt % 100 < write_percent
        a = gpa + (done << gps)
        idx = (a >> ps) & mask
        entry = T[pfn, idx]
        need = S2AP_W if write else S2AP_R
        if not (entry & VALID and entry & need):
            cls, akey, dec = _entry_class(entry, write, logging, decision)
            if cls == 0:
                break
            if cls != kcls or akey != kakey or dec != kdec or write != kwrite:
                k2 = _recorded(RT, cls, s, akey, write, dec)
                if k2 < 0:
                    break
                if nrep:
                    RT[k + REPLAY_KEY] += nrep
                    nrep = 0
                k, kcls, kakey, kdec, kwrite = k2, cls, akey, dec, write
                attr_clr, attr, base, host_pa, bitmap = _replay_consts(M, cls, s, write)
            if touched:
                line = touch_level3_again(M, _class_op(cls), pfn, idx, l3_line)
                if cls == CLASS_RELAX:
                    again_relax += 1
                    same_relax += line == l3_line
                else:
                    again_map += 1
                    same_map += line == l3_line
                l3_line = line
            else:
                touch_path(T, M, _class_op(cls), a)
                touched = True
                l3_line = M[S.LAST_LINE]
            last_a = a
            _replay_apply(T, M, B, cls, attr_clr, attr, base, host_pa, bitmap, a >> ps, entry,
                          pfn, idx)
            nrep += 1
        rng = nxt
        done += 1
    if nrep:
        RT[k + REPLAY_KEY] += nrep
    if touched:
        count_again(M, C.OP_RELAX, again_relax, same_relax)
        count_again(M, C.OP_MAP, again_map, same_map)
        # The last replay's ticks: its m upper lines, then its level-3 line.
        M[M[S.STAMPS] + l3_line] = M[S.LINE_CLOCK]
        M[S.LAST_LINE] = l3_line
        stamp_upper(T, M, last_a, M[S.LINE_CLOCK] - (3 - M[S.START_LEVEL]) - 1)
    if k >= 0:
        M[S.LAST_SLOT] = s  # where gfn_to_memslot would have left it
    if fixed:
        rng = guest_random_skip(rng, done)
    return done, rng


@njit(cache=True, _nrt=False)
def _block_hits(T, M, RT, v, gpa, left, write_percent):
    """How many of vCPU ``v``'s next ``left`` sequential accesses, from
    ``gpa``, go through the block its translation cache holds without a
    fault: all that fall in the block when it is writable and readable (or
    allows the one kind of access a 0/100 percent pass makes), else none.
    Nothing changes a block its accesses go through, so they need no look."""
    c = TC_BASE + v * TC_STRIDE
    level = RT[c + TC_LEVEL]
    if RT[c + TC_VGEN] != RT[TC_GEN] or level == 3 or (gpa >> RT[c + TC_SHIFT]) != RT[c + TC_KEY]:
        return 0
    shift = RT[c + TC_LSHIFT]
    entry = T[RT[c + TC_PFN], (gpa >> shift) & (M[S.PTRS] - 1)]
    if not entry & VALID or (entry & 3) == 3:
        return 0
    if not (entry & S2AP_R and entry & S2AP_W):
        if 0 < write_percent < 100:
            return 0
        if not entry & (S2AP_W if write_percent >= 100 else S2AP_R):
            return 0
    end = ((gpa >> shift) + 1) << shift
    gps = M[S.GUEST_PAGE_SHIFT]
    return min(left, (end - gpa + (1 << gps) - 1) >> gps)


@njit(cache=True, _nrt=False)
def _sequential_pass(T, M, B, RT, write_percent):
    """The pass of a lone vCPU walking its region in order: runs of block
    hits (:func:`_block_hits`) and table runs (:func:`_table_run`) wherever
    its translation cache covers the next pages, one access at a time
    elsewhere. Returns (0 or the failing
    access's result, the accesses done without guest_access)."""
    r = M[S.VCPU_REGS]
    pages = M[r + VcpuReg.PAGES]
    base = M[r + VcpuReg.GPA]
    gps = M[S.GUEST_PAGE_SHIFT]
    fast = 0
    ret = 0
    i = 0
    while i < pages:
        gpa = base + (i << gps)
        h = _block_hits(T, M, RT, 0, gpa, pages - i, write_percent)
        if h > 0:
            M[r + VcpuReg.RNG] = guest_random_skip(M[r + VcpuReg.RNG], h)
            i += h
            fast += h
            continue
        n = _run_length(M, RT, 0, gpa, pages - i)
        if n > 0:
            done, rng = _table_run(T, M, B, RT, 0, gpa, n, M[r + VcpuReg.RNG], write_percent)
            M[r + VcpuReg.RNG] = rng
            i += done
            fast += done
            if done == n:
                continue
            gpa = base + (i << gps)
        M[r + VcpuReg.RNG] = M[r + VcpuReg.RNG] * PRNG_MULTIPLIER % PRNG_MODULUS
        write = M[r + VcpuReg.RNG] % 100 < write_percent
        i += 1
        if _fast_access(T, M, B, RT, 0, gpa, write):
            fast += 1
            continue
        ret = guest_access(T, M, B, RT, 0, gpa, write)
        RT[TC_GEN] += 1
        if ret != 0:
            break
    return ret, fast


@njit(cache=True, _nrt=False)
def flush_replays(M, RT):
    """Add each recorded class's delta once per replay, and forget the classes."""
    for c in range(RT[0]):
        k = 1 + c * REPLAY_STRIDE
        n = RT[k + REPLAY_KEY]
        if n:
            d = k + REPLAY_KEY + 1
            for i in range(C.SIZE):
                M[COUNTERS + i] += n * RT[d + i]
    RT[0] = 0


@njit(cache=True, _nrt=False)
def memstress_pass(T, M, B, RT, write_percent, random_access):
    """``memstress_pass``: one pass of ``memstress_guest_code`` for every vCPU,
    in lockstep; each draws one number for the page (random access only),
    then one for the write decision."""
    nv = M[S.NVCPUS]
    gps = M[S.GUEST_PAGE_SHIFT]
    regs = M[S.VCPU_REGS]
    RT[0] = 0
    RT[TC_GEN] += 1  # tables, caches and slots may have changed since the last pass
    fast = 0
    longest = 0
    for v in range(nv):
        longest = max(longest, M[regs + v * NREGS + VcpuReg.PAGES])
    ret = 0
    if nv == 1 and not random_access:
        ret, fast = _sequential_pass(T, M, B, RT, write_percent)
        longest = 0
    for i in range(longest):
        for v in range(nv):
            r = regs + v * NREGS
            pages = M[r + VcpuReg.PAGES]
            if i >= pages:
                continue
            if random_access:
                M[r + VcpuReg.RNG] = M[r + VcpuReg.RNG] * PRNG_MULTIPLIER % PRNG_MODULUS
                pg = M[r + VcpuReg.RNG] % pages
            else:
                pg = i
            M[r + VcpuReg.RNG] = M[r + VcpuReg.RNG] * PRNG_MULTIPLIER % PRNG_MODULUS
            gpa = M[r + VcpuReg.GPA] + (pg << gps)
            write = M[r + VcpuReg.RNG] % 100 < write_percent
            if _fast_access(T, M, B, RT, v, gpa, write):
                fast += 1
                continue
            ret = guest_access(T, M, B, RT, v, gpa, write)
            RT[TC_GEN] += 1
            if ret != 0:
                break
        if ret != 0:
            break
    kvm_count(M, C.K_GUEST_ACCESSES, fast)
    flush_replays(M, RT)
    if ret != 0:
        return ret
    for v in range(nv):
        # guest_mmio_exit(): the ucall ending the pass, one store outside every memslot.
        kvm_count(M, C.K_ABORTS, 1)
        kvm_count(M, C.K_MMIO_EXITS, 1)
    return 0
