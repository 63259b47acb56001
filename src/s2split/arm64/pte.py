"""Stage-2 descriptor bits: encode and decode 64-bit entries.

Bit positions are those of ``kvm_pgtable.h`` (Linux 6.12) and the Arm ARM:
bit 0 valid, bit 1 type (table/page = 1, block = 0), output address in
``[47:PAGE_SHIFT]`` (plus ``[15:12]`` -> OA[51:48] with 64K pages, or
``[49:PAGE_SHIFT]`` and ``[9:8]`` -> OA[51:50] with LPA2), and the leaf
attributes: MemAttr ``[5:2]``, S2AP read bit 6 and write bit 7, SH ``[9:8]``
(not with LPA2), AF bit 10, XN bit 54 (``[54:53]`` on kernels with FEAT_XNX,
6.16+; KVM's 6.12 only sets bit 54), software bits ``[58:55]``. An invalid
entry with bit 10 set is *locked*: a break-before-make is in progress.
"""

from __future__ import annotations

from typing import NamedTuple

from . import rules as R
from .arch import LAST_LEVEL, Geometry
from .bits import (AF, ATTR_HI_MASK, ATTR_LO_MASK, LOCKED, MEMATTR_MASK, MEMATTR_SHIFT,
                   MT_S2_DEVICE_nGnRE, MT_S2_FWB_DEVICE_nGnRE, MT_S2_FWB_NORMAL,
                   MT_S2_FWB_NORMAL_NC, MT_S2_NORMAL, MT_S2_NORMAL_NC, OWNER_MASK, OWNER_SHIFT,
                   S2_PERMS, S2AP_R, S2AP_W, SH_INNER, SH_MASK, SH_SHIFT, SW_MASK, SW_SHIFT, TYPE,
                   VALID, XN, XN_FIELD_MASK, Prot)

__all__ = ["AF", "ATTR_HI_MASK", "ATTR_LO_MASK", "LOCKED", "MEMATTR_MASK", "MEMATTR_SHIFT",
           "MT_S2_DEVICE_nGnRE", "MT_S2_FWB_DEVICE_nGnRE", "MT_S2_FWB_NORMAL",
           "MT_S2_FWB_NORMAL_NC", "MT_S2_NORMAL", "MT_S2_NORMAL_NC", "OWNER_MASK",
           "OWNER_SHIFT", "S2_PERMS", "S2AP_R", "S2AP_W", "SH_INNER", "SH_MASK", "SH_SHIFT",
           "SW_MASK", "SW_SHIFT", "TYPE", "VALID", "XN", "XN_FIELD_MASK", "Prot", "Descriptor",
           "addr_mask", "phys_to_pte", "pte_to_phys", "is_valid", "is_table", "is_locked",
           "make_table", "make_leaf", "memattr", "prot_to_attr", "pte_prot", "is_executable",
           "is_cacheable", "needs_update", "decode"]


def addr_mask(geom: Geometry) -> int:
    """Bits of an entry that hold OA[47 or 49 : PAGE_SHIFT]."""
    top = 50 if geom.lpa2 else 48
    return ((1 << top) - 1) & ~((1 << geom.page_shift) - 1)


def phys_to_pte(pa: int, geom: Geometry) -> int:
    """``kvm_phys_to_pte()`` (:func:`s2split.arm64.rules.phys_to_pte`)."""
    return R.phys_to_pte(pa, geom.page_shift, R.oa_format(geom.page_shift, geom.lpa2))


def pte_to_phys(pte: int, geom: Geometry) -> int:
    """``kvm_pte_to_phys()`` (:func:`s2split.arm64.rules.pte_to_phys`)."""
    return R.pte_to_phys(pte, geom.page_shift, R.oa_format(geom.page_shift, geom.lpa2))


def is_valid(pte: int) -> bool:
    return bool(pte & VALID)


def is_table(pte: int, level: int) -> bool:
    """``kvm_pte_table()``: valid, type bit set, and not at the last level."""
    return level < LAST_LEVEL and (pte & 3) == 3


def is_locked(pte: int) -> bool:
    """``stage2_pte_is_locked()``."""
    return not (pte & VALID) and bool(pte & LOCKED)


def make_table(child_pa: int, geom: Geometry) -> int:
    """``kvm_init_table_pte()``."""
    return phys_to_pte(child_pa, geom) | TYPE | VALID


def make_leaf(pa: int, attr: int, level: int, geom: Geometry) -> int:
    """``kvm_init_valid_leaf_pte()``: a block below level 3, a page at level 3."""
    pte = phys_to_pte(pa, geom) | (attr & (ATTR_LO_MASK | ATTR_HI_MASK)) | VALID
    if level == LAST_LEVEL:
        pte |= TYPE
    return pte


def memattr(kind: str, fwb: bool) -> int:
    """``PAGE_S2_MEMATTR(kind, fwb)`` already shifted into ``[5:2]``."""
    table = {
        "NORMAL": (MT_S2_FWB_NORMAL, MT_S2_NORMAL),
        "NORMAL_NC": (MT_S2_FWB_NORMAL_NC, MT_S2_NORMAL_NC),
        "DEVICE_nGnRE": (MT_S2_FWB_DEVICE_nGnRE, MT_S2_DEVICE_nGnRE),
    }
    fwb_value, value = table[kind]
    return (fwb_value if fwb else value) << MEMATTR_SHIFT


def prot_to_attr(prot: int, geom: Geometry, fwb: bool) -> int:
    """``stage2_set_prot_attr()``; returns the attribute bits or a negative errno
    (:func:`s2split.arm64.rules.prot_to_attr`)."""
    # plain ints: enum arithmetic is slow and leaks into entries
    return R.prot_to_attr(int(prot), fwb, geom.lpa2)


def pte_prot(pte: int) -> Prot:
    """``kvm_pgtable_stage2_pte_prot()`` (:func:`s2split.arm64.rules.pte_prot`)."""
    return Prot(R.pte_prot(pte))


def is_executable(pte: int) -> bool:
    """``stage2_pte_executable()``."""
    return bool(pte & VALID) and not pte & XN


def is_cacheable(pte: int, fwb: bool) -> bool:
    """``stage2_pte_cacheable()``: valid and Normal write-back memory."""
    return bool(pte & VALID) and (pte & MEMATTR_MASK) == R.normal_memattr(fwb)


def needs_update(old: int, new: int) -> bool:
    """``stage2_pte_needs_update()``: anything but the permissions differ
    (:func:`s2split.arm64.rules.needs_update`)."""
    return R.needs_update(old, new)


class Descriptor(NamedTuple):
    """A decoded entry, as drgn would show it."""

    kind: str  # "invalid", "locked", "table", "block", "page"
    oa: int
    memattr: int
    readable: bool
    writable: bool
    sh: int
    af: bool
    xn: int
    sw: int
    owner: int

    def __str__(self) -> str:
        if self.kind in ("invalid", "locked"):
            return self.kind if not self.owner else f"{self.kind} owner={self.owner}"
        if self.kind == "table":
            return f"table -> {self.oa:#x}"
        perms = ("r" if self.readable else "-") + ("w" if self.writable else "-") + \
                ("-" if self.xn else "x")
        return f"{self.kind} {self.oa:#x} {perms} memattr={self.memattr:#x} af={int(self.af)}"


def decode(pte: int, level: int, geom: Geometry) -> Descriptor:
    """Decode ``pte`` found at ``level`` of a table with geometry ``geom``."""
    if not pte & VALID:
        kind = "locked" if pte & LOCKED else "invalid"
        owner = (pte & OWNER_MASK) >> OWNER_SHIFT if kind == "invalid" else 0
        return Descriptor(kind, 0, 0, False, False, 0, False, 0, 0, owner)
    oa = pte_to_phys(pte, geom)
    if is_table(pte, level):
        return Descriptor("table", oa, 0, False, False, 0, False, 0, 0, 0)
    kind = "page" if level == LAST_LEVEL else "block"
    return Descriptor(kind, oa, (pte & MEMATTR_MASK) >> MEMATTR_SHIFT, bool(pte & S2AP_R),
                      bool(pte & S2AP_W), 0 if geom.lpa2 else (pte & SH_MASK) >> SH_SHIFT,
                      bool(pte & AF), (pte & XN_FIELD_MASK) >> 53, (pte & SW_MASK) >> SW_SHIFT, 0)
