"""Stage-2 descriptor bit positions and ``enum kvm_pgtable_prot`` (Linux 6.12).

Bit positions are those of ``kvm_pgtable.h`` and the Arm ARM: bit 0 valid,
bit 1 type (table/page = 1, block = 0), the leaf attributes MemAttr ``[5:2]``,
S2AP read bit 6 and write bit 7, SH ``[9:8]`` (not with LPA2), AF bit 10, XN
bit 54 (``[54:53]`` on kernels with FEAT_XNX, 6.16+; KVM's 6.12 only sets bit
54), software bits ``[58:55]``. An invalid entry with bit 10 set is *locked*:
a break-before-make is in progress. Only constants live here, so that both
:mod:`s2split.arm64.rules` and :mod:`s2split.arm64.pte` can build on them.
"""

from __future__ import annotations

import enum

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
