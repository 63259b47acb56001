"""Descriptors in the fast engine: the twin of :mod:`s2split.arm64.pte`.

The encodings themselves are the shared rules (:mod:`s2split.engine.rules`);
these functions only bind them to the geometry and features held in ``M``.
Table pages are numbered from ``S.TABLE_BASE``, as in
:class:`~s2split.model.pgtable.memory.TableMemory`.
"""

from __future__ import annotations

from numba import njit

from ..arm64.bits import MEMATTR_MASK, TYPE, VALID, XN
from ..arm64.bits import ATTR_HI_MASK, ATTR_LO_MASK
from . import rules as R
from .state import S

ATTR_MASK = ATTR_LO_MASK | ATTR_HI_MASK


@njit(cache=True, _nrt=False)
def pte_to_phys(M, pte):
    """``kvm_pte_to_phys()``."""
    return R.pte_to_phys(pte, M[S.PAGE_SHIFT], M[S.OA_FORMAT])


@njit(cache=True, _nrt=False)
def phys_to_pte(M, pa):
    """``kvm_phys_to_pte()``."""
    return R.phys_to_pte(pa, M[S.PAGE_SHIFT], M[S.OA_FORMAT])


@njit(cache=True, _nrt=False)
def table_pfn(M, pte):
    """``kvm_pte_follow()``: the table page a table entry points to."""
    return (pte_to_phys(M, pte) - M[S.TABLE_BASE]) >> M[S.PAGE_SHIFT]


@njit(cache=True, _nrt=False)
def make_table(M, pfn):
    """``kvm_init_table_pte()`` for table page ``pfn``."""
    return phys_to_pte(M, M[S.TABLE_BASE] + (pfn << M[S.PAGE_SHIFT])) | TYPE | VALID


@njit(cache=True, _nrt=False)
def make_leaf(M, pa, attr, level):
    """``kvm_init_valid_leaf_pte()``: a block below level 3, a page at level 3."""
    pte = phys_to_pte(M, pa) | (attr & ATTR_MASK) | VALID
    if level == 3:
        pte |= TYPE
    return pte


@njit(cache=True, inline="always", _nrt=False)
def is_table(pte, level):
    """``kvm_pte_table()``: valid, type bit set, and not at the last level."""
    return level < 3 and (pte & 3) == 3


@njit(cache=True, _nrt=False)
def prot_to_attr(M, prot):
    """``stage2_set_prot_attr()``: the attribute bits, or a negative errno."""
    return R.prot_to_attr(prot, M[S.FWB] != 0, M[S.LPA2] != 0)


@njit(cache=True, _nrt=False)
def is_cacheable(M, pte):
    """``stage2_pte_cacheable()``: valid and Normal write-back memory."""
    return (pte & VALID) != 0 and (pte & MEMATTR_MASK) == R.normal_memattr(M[S.FWB] != 0)


@njit(cache=True, inline="always", _nrt=False)
def is_executable(pte):
    """``stage2_pte_executable()``."""
    return (pte & VALID) != 0 and not pte & XN
