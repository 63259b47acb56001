"""The stage-2 operations in the fast engine: the ``kvm_pgtable_stage2_*``
half of :mod:`s2split.model.pgtable.stage2` (``Stage2PageTable.map`` is
:func:`stage2_map`, and so on). Each sets the walk's argument in the ``W``
fields of ``M`` and starts one walk; the visitors are in
:mod:`s2split.engine.visitors`."""

from __future__ import annotations

from numba import njit

from ..arm64.bits import ATTR_HI_MASK, ATTR_LO_MASK, S2AP_R, S2AP_W, SW_MASK, XN
from ..arm64.bits import Prot
from ..counting import counters as C
from ..model.pgtable import walker as WK
from ..plumbing.errors import EAGAIN, EINVAL
from . import rules as R
from .memory import mem_alloc, mem_free
from .pte import prot_to_attr
from .state import NOLV, ROOT, VARIANT_FLAGS, S, W, count
from .tlb import dsb_ishst, flush_vmid_ipa_nsh, flush_vmid_range
from .visitors import _result
from .walker import kvm_pgtable_walk

LEAF, TABLE_PRE, TABLE_POST = WK.LEAF, WK.TABLE_PRE, WK.TABLE_POST
SHARED, HANDLE_FAULT = WK.SHARED, WK.HANDLE_FAULT
ATTR_MASK = ATTR_LO_MASK | ATTR_HI_MASK
PROT_X, PROT_W, PROT_R = int(Prot.X), int(Prot.W), int(Prot.R)


@njit(cache=True, inline="always", _nrt=False)
def _flags(M, op, flags):
    """``Stage2PageTable._flags``: the operation's flags plus the variant's
    (less those an MMU hook turned off)."""
    return (flags | M[VARIANT_FLAGS + op]) & ~M[S.FLAGS_CLEAR]


@njit(cache=True, _nrt=False)
def stage2_init(T, M):
    """``kvm_pgtable_stage2_init()``: zeroed, concatenated root pages."""
    count(M, C.OP_INIT, C.K_CALLS, NOLV, 1)
    for i in range(M[S.PGD_PAGES]):
        M[ROOT + i] = mem_alloc(T, M)
    dsb_ishst(M, C.OP_INIT)


@njit(cache=True, _nrt=False)
def stage2_map(T, M, addr, size, phys, prot, mc, flags):
    """``kvm_pgtable_stage2_map()``: map ``[addr, addr+size)`` to ``phys``."""
    op = C.OP_MAP
    count(M, op, C.K_CALLS, NOLV, 1)
    attr = prot_to_attr(M, prot)
    if attr < 0:
        return _result(M, op, attr)
    M[W.MAP_PHYS] = phys & ~((1 << M[S.PAGE_SHIFT]) - 1)
    M[W.MAP_ATTR] = attr
    M[W.MAP_MEMCACHE] = mc
    M[W.MAP_FORCE_PTE] = 0
    ret = kvm_pgtable_walk(T, M, op, addr, size, _flags(M, op, flags | TABLE_PRE | LEAF))
    dsb_ishst(M, op)
    return _result(M, op, ret)


@njit(cache=True, _nrt=False)
def stage2_unmap(T, M, addr, size):
    """``kvm_pgtable_stage2_unmap()``."""
    op = C.OP_UNMAP
    count(M, op, C.K_CALLS, NOLV, 1)
    ret = kvm_pgtable_walk(T, M, op, addr, size, _flags(M, op, LEAF | TABLE_POST))
    if R.unmap_defers_tlbi(M[S.TLBIRANGE] != 0, M[S.FWB] != 0):
        flush_vmid_range(M, op, addr, size)
    return _result(M, op, ret)


@njit(cache=True, _nrt=False)
def _update_leaf_attrs(T, M, op, addr, size, attr_set, attr_clr, flags):
    """``stage2_update_leaf_attrs()``."""
    M[W.ATTR_SET] = attr_set & ATTR_MASK
    M[W.ATTR_CLR] = attr_clr & ATTR_MASK
    M[W.ATTR_LEVEL] = -2
    return kvm_pgtable_walk(T, M, op, addr, size, _flags(M, op, flags | LEAF))


@njit(cache=True, _nrt=False)
def stage2_wrprotect(T, M, addr, size):
    """``kvm_pgtable_stage2_wrprotect()``: clear S2AP.W on valid leaves in place."""
    op = C.OP_WRPROTECT
    count(M, op, C.K_CALLS, NOLV, 1)
    return _result(M, op, _update_leaf_attrs(T, M, op, addr, size, 0, S2AP_W, 0))


@njit(cache=True, _nrt=False)
def stage2_relax_perms(T, M, addr, prot):
    """``kvm_pgtable_stage2_relax_perms()`` (6.12): one-page walk, then a local TLBI."""
    op = C.OP_RELAX
    count(M, op, C.K_CALLS, NOLV, 1)
    if prot & SW_MASK:
        return _result(M, op, -EINVAL)
    attr_set = 0
    attr_clr = 0
    if prot & PROT_R:
        attr_set |= S2AP_R
    if prot & PROT_W:
        attr_set |= S2AP_W
    if prot & PROT_X:
        attr_clr |= XN
    ret = _update_leaf_attrs(T, M, op, addr, 1, attr_set, attr_clr, HANDLE_FAULT | SHARED)
    if ret == 0:
        flush_vmid_ipa_nsh(M, op, M[W.ATTR_LEVEL])
    elif ret == -EAGAIN:
        flush_vmid_ipa_nsh(M, op, NOLV)
    return _result(M, op, ret)


@njit(cache=True, _nrt=False)
def stage2_split(T, M, addr, size):
    """``kvm_pgtable_stage2_split()``: split every block in the range to pages,
    taking table pages from the split cache."""
    op = C.OP_SPLIT
    count(M, op, C.K_CALLS, NOLV, 1)
    ret = kvm_pgtable_walk(T, M, op, addr, size, _flags(M, op, LEAF))
    dsb_ishst(M, op)
    return _result(M, op, ret)


@njit(cache=True, _nrt=False)
def stage2_destroy_range(T, M, addr, size):
    """``kvm_pgtable_stage2_destroy_range()``: the free walk over ``[addr, addr+size)``."""
    op = C.OP_DESTROY
    count(M, op, C.K_CALLS, NOLV, 1)
    kvm_pgtable_walk(T, M, op, addr, size, _flags(M, op, LEAF | TABLE_POST))


@njit(cache=True, _nrt=False)
def stage2_destroy_pgd(T, M):
    """``kvm_pgtable_stage2_destroy_pgd()``: free the root pages, whatever references remain."""
    for i in range(M[S.PGD_PAGES]):
        mem_free(M, M[ROOT + i])
        count(M, C.OP_DESTROY, C.K_PAGE_FREED, M[S.START_LEVEL], 1)
