"""Guest passes in the fast engine: the twin of
:func:`s2split.memstress.memstress_pass` and ``VM.guest_access``, with the
replay of repeated fault classes.

Most faults of a pass are alike: a write to a write-protected page (relax
permissions at level 3), or a first touch of a page whose level-3 table
exists (map one page). For those two classes the counted work is a function
of a few inputs only -- the slot, the entry's attribute bits, the access, the
mapping decision -- and of nothing that changes during the pass. The first
fault of a class runs the real path and records the counter delta it
produced; later faults with the same key apply the same state change and
count one more replay; the deltas are added once per replay at the end of
the pass. The differential tests pin this to the reference engine.
"""

from __future__ import annotations

from numba import njit

from .. import counters as C
from ..bits import ATTR_HI_MASK, ATTR_LO_MASK, S2AP_R, S2AP_W, VALID, XN, Prot
from ..memstress import PRNG_MODULUS, PRNG_MULTIPLIER
from . import rules as R
from .memory import cache_nobjs
from .mmu import (fault_supports_stage2_huge_mapping, fault_prot, gfn_to_memslot,
                  kvm_handle_guest_abort, slot_logging)
from .pte import make_leaf, prot_to_attr, table_pfn
from .state import (BACKING_ANON, BACKING_HUGETLB, COUNTERS, ROOT, S, SlotCol, VcpuReg, NREGS,
                    granule_size, kvm_count, level_shift, slot_index)

ATTR_MASK = ATTR_LO_MASK | ATTR_HI_MASK
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
def _fault_class(T, M, v, gpa, write, entry, level):
    """(class, slot, attribute key, decision) of a replayable fault, class 0 if none."""
    if level != 3:
        return 0, -1, 0, 0
    s = gfn_to_memslot(M, gpa >> M[S.PAGE_SHIFT])
    if s < 0:
        return 0, -1, 0, 0
    if cache_nobjs(M, v) < M[S.LEVELS] - 1:
        return 0, -1, 0, 0
    logging = slot_logging(M, s)
    if entry & VALID:
        if write and logging and entry & S2AP_R and not entry & S2AP_W:
            return CLASS_RELAX, s, entry & ATTR_MASK, 1
        return 0, -1, 0, 0
    if entry != 0:
        return 0, -1, 0, 0
    if logging:
        return CLASS_MAP, s, 0, 1
    backing = M[slot_index(M, s, SlotCol.BACKING)]
    if backing == BACKING_ANON:
        ps = M[S.PAGE_SHIFT]
        hva = M[slot_index(M, s, SlotCol.USERSPACE_ADDR)] + \
            (((gpa >> ps) - M[slot_index(M, s, SlotCol.BASE_GFN)]) << ps)
        if not fault_supports_stage2_huge_mapping(M, s, hva, granule_size(M, 2)):
            return CLASS_MAP, s, 0, 2
    elif backing == BACKING_HUGETLB and \
            M[slot_index(M, s, SlotCol.HUGETLB_CLASS)] == R.HC_CONT_PTE:
        return CLASS_MAP, s, 0, 3
    return 0, -1, 0, 0


@njit(cache=True, _nrt=False)
def _replay(T, M, B, cls, s, gpa, write, entry, pfn, idx):
    """The state change of one fault of a recorded class."""
    ps = M[S.PAGE_SHIFT]
    gfn = gpa >> ps
    writable = not (slot_logging(M, s) and not write)
    prot = fault_prot(M, writable)
    if cls == CLASS_RELAX:
        attr_clr = XN if prot & PROT_X else 0
        T[pfn, idx] = (entry & ~attr_clr) | S2AP_R | S2AP_W
    else:
        base = M[slot_index(M, s, SlotCol.BASE_GFN)]
        pa = M[slot_index(M, s, SlotCol.HOST_PA)] + ((gfn - base) << ps)
        T[pfn, idx] = make_leaf(M, pa, prot_to_attr(M, prot), 3)
        M[M[S.REFCOUNT] + pfn] += 1
    if writable:
        # Uncounted here: the recorded delta holds the class's dirty_marked.
        rel = gfn - M[slot_index(M, s, SlotCol.BASE_GFN)]
        if M[slot_index(M, s, SlotCol.HAS_BITMAP)]:
            B[M[slot_index(M, s, SlotCol.BITMAP)] + (rel >> 6)] |= 1 << (rel & 63)


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
        for c in range(RT[0]):
            k = 1 + c * REPLAY_STRIDE
            if RT[k] == cls and RT[k + 1] == s and RT[k + 2] == akey and RT[k + 3] == write \
                    and RT[k + 4] == decision:
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
                RT[0] += 1
            record = False
    else:
        return KEEPS_FAULTING
    return 0


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
    longest = 0
    for v in range(nv):
        longest = max(longest, M[regs + v * NREGS + VcpuReg.PAGES])
    ret = 0
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
            ret = guest_access(T, M, B, RT, v, M[r + VcpuReg.GPA] + (pg << gps),
                               M[r + VcpuReg.RNG] % 100 < write_percent)
            if ret != 0:
                break
        if ret != 0:
            break
    flush_replays(M, RT)
    if ret != 0:
        return ret
    for v in range(nv):
        # guest_mmio_exit(): the ucall ending the pass, one store outside every memslot.
        kvm_count(M, C.K_ABORTS, 1)
        kvm_count(M, C.K_MMIO_EXITS, 1)
    return 0
