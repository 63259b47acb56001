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

import enum
from typing import NamedTuple

from .arch import LAST_LEVEL, Geometry

VALID = 1 << 0
TYPE = 1 << 1  # table (levels < 3) or page (level 3) when set; block when clear

ATTR_LO_MASK = 0x3FF << 2  # GENMASK(11, 2)
ATTR_HI_MASK = ((1 << 14) - 1) << 50  # GENMASK(63, 50)
MEMATTR_SHIFT = 2
MEMATTR_MASK = 0xF << MEMATTR_SHIFT
S2AP_R = 1 << 6
S2AP_W = 1 << 7
SH_SHIFT = 8
SH_MASK = 0x3 << SH_SHIFT
SH_INNER = 3
AF = 1 << 10
XN = 1 << 54  # what 6.12 writes; decode reports the [54:53] field
XN_FIELD_MASK = 0x3 << 53
SW_SHIFT = 55
SW_MASK = 0xF << SW_SHIFT
S2_PERMS = S2AP_R | S2AP_W | XN

LOCKED = 1 << 10  # KVM_INVALID_PTE_LOCKED, only meaningful when not valid
OWNER_SHIFT = 2
OWNER_MASK = 0xFF << OWNER_SHIFT

# Stage-2 MemAttr encodings (arch/arm64/include/asm/memory.h).
MT_S2_NORMAL = 0xF
MT_S2_NORMAL_NC = 0x5
MT_S2_DEVICE_nGnRE = 0x1
MT_S2_FWB_NORMAL = 6
MT_S2_FWB_NORMAL_NC = 5
MT_S2_FWB_DEVICE_nGnRE = 1


class Prot(enum.IntFlag):
    """``enum kvm_pgtable_prot``."""

    NONE = 0
    X = 1 << 0
    W = 1 << 1
    R = 1 << 2
    DEVICE = 1 << 3
    NORMAL_NC = 1 << 4
    SW0 = 1 << 55
    SW1 = 1 << 56
    SW2 = 1 << 57
    SW3 = 1 << 58

    RW = R | W
    RWX = R | W | X




def addr_mask(geom: Geometry) -> int:
    """Bits of an entry that hold OA[47 or 49 : PAGE_SHIFT]."""
    top = 50 if geom.lpa2 else 48
    return ((1 << top) - 1) & ~((1 << geom.page_shift) - 1)


def phys_to_pte(pa: int, geom: Geometry) -> int:
    """``kvm_phys_to_pte()``."""
    pte = pa & addr_mask(geom)
    if geom.lpa2:
        pte |= ((pa >> 50) & 0x3) << 8
    elif geom.granule == 65536:
        pte |= ((pa >> 48) & 0xF) << 12
    return pte


def pte_to_phys(pte: int, geom: Geometry) -> int:
    """``kvm_pte_to_phys()``."""
    pa = pte & addr_mask(geom)
    if geom.lpa2:
        pa |= ((pte >> 8) & 0x3) << 50
    elif geom.granule == 65536:
        pa |= ((pte >> 12) & 0xF) << 48
    return pa


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
    """``stage2_set_prot_attr()``; returns the attribute bits or a negative errno."""
    from .errors import EINVAL

    prot = int(prot)  # plain ints: enum arithmetic is slow and leaks into entries
    kind = prot & (Prot.DEVICE | Prot.NORMAL_NC)
    if kind == Prot.DEVICE | Prot.NORMAL_NC:
        return -EINVAL
    if kind == Prot.DEVICE:
        if prot & Prot.X:
            return -EINVAL
        attr = memattr("DEVICE_nGnRE", fwb)
    elif kind == Prot.NORMAL_NC:
        if prot & Prot.X:
            return -EINVAL
        attr = memattr("NORMAL_NC", fwb)
    else:
        attr = memattr("NORMAL", fwb)
    if not prot & Prot.X:
        attr |= XN
    if prot & Prot.R:
        attr |= S2AP_R
    if prot & Prot.W:
        attr |= S2AP_W
    if not geom.lpa2:
        attr |= SH_INNER << SH_SHIFT
    attr |= AF
    attr |= prot & SW_MASK
    return attr


def pte_prot(pte: int) -> Prot:
    """``kvm_pgtable_stage2_pte_prot()``."""
    prot = Prot(pte & SW_MASK)
    if not pte & VALID:
        return prot
    if pte & S2AP_R:
        prot |= Prot.R
    if pte & S2AP_W:
        prot |= Prot.W
    if not pte & XN:
        prot |= Prot.X
    return prot


def is_executable(pte: int) -> bool:
    """``stage2_pte_executable()``."""
    return bool(pte & VALID) and not pte & XN


def is_cacheable(pte: int, fwb: bool) -> bool:
    """``stage2_pte_cacheable()``: valid and Normal write-back memory."""
    return bool(pte & VALID) and (pte & MEMATTR_MASK) == memattr("NORMAL", fwb)


def needs_update(old: int, new: int) -> bool:
    """``stage2_pte_needs_update()``: anything but the permissions differ."""
    if not (old & VALID) or not (new & VALID):
        return True
    return bool((old ^ new) & ~S2_PERMS)


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
