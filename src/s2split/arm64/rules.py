"""The kernel's pure arithmetic rules, written once for both engines.

Every function here takes and returns plain integers (or booleans), touches
no state and uses only arithmetic, so that the reference engine calls it as
ordinary Python and the fast engine compiles the very same source with numba
(:mod:`s2split.engine.rules`). A rule that lives here cannot drift between the
engines; what stays written twice is the walker and its visitors, because the
reference engine is the independent oracle for them.

A rule calls no other function (numba would find it uncompiled in this
module's namespace). Values must fit in a signed 64-bit integer: the compiled copies compute in
int64, the Python ones with unbounded integers, and the differential tests
compare the two.
"""

from __future__ import annotations

from ..plumbing.errors import EINVAL, ENOMEM
from . import bits as P

# -- descriptors (kvm_pgtable.h) ------------------------------------------------------------

#: Output-address formats of a descriptor: OA[47:PAGE_SHIFT] in place; with
#: 64K pages also OA[51:48] in [15:12]; with LPA2 OA[49:PAGE_SHIFT] in place
#: and OA[51:50] in [9:8].
OA_48, OA_64K, OA_LPA2 = 0, 1, 2

_OA_MASK_48 = (1 << 48) - 1
_OA_MASK_50 = (1 << 50) - 1


def oa_format(page_shift: int, lpa2: bool) -> int:
    """The output-address format of a geometry (one of ``OA_*``)."""
    if lpa2:
        return OA_LPA2
    return OA_64K if page_shift == 16 else OA_48


def phys_to_pte(pa: int, page_shift: int, fmt: int) -> int:
    """``kvm_phys_to_pte()``."""
    low = ~((1 << page_shift) - 1)
    if fmt == OA_LPA2:
        return (pa & _OA_MASK_50 & low) | (((pa >> 50) & 0x3) << 8)
    pte = pa & _OA_MASK_48 & low
    if fmt == OA_64K:
        pte |= ((pa >> 48) & 0xF) << 12
    return pte


def pte_to_phys(pte: int, page_shift: int, fmt: int) -> int:
    """``kvm_pte_to_phys()``."""
    low = ~((1 << page_shift) - 1)
    if fmt == OA_LPA2:
        return (pte & _OA_MASK_50 & low) | (((pte >> 8) & 0x3) << 50)
    pa = pte & _OA_MASK_48 & low
    if fmt == OA_64K:
        pa |= ((pte >> 12) & 0xF) << 48
    return pa


_NORMAL = (P.MT_S2_NORMAL << P.MEMATTR_SHIFT, P.MT_S2_FWB_NORMAL << P.MEMATTR_SHIFT)
_NORMAL_NC = (P.MT_S2_NORMAL_NC << P.MEMATTR_SHIFT, P.MT_S2_FWB_NORMAL_NC << P.MEMATTR_SHIFT)
_DEVICE = (P.MT_S2_DEVICE_nGnRE << P.MEMATTR_SHIFT, P.MT_S2_FWB_DEVICE_nGnRE << P.MEMATTR_SHIFT)
_PROT_X, _PROT_W, _PROT_R = int(P.Prot.X), int(P.Prot.W), int(P.Prot.R)
_PROT_DEVICE, _PROT_NC = int(P.Prot.DEVICE), int(P.Prot.NORMAL_NC)
_SH_INNER_BITS = P.SH_INNER << P.SH_SHIFT


def normal_memattr(fwb: bool) -> int:
    """``PAGE_S2_MEMATTR(NORMAL, fwb)``, shifted into MemAttr[5:2]."""
    return _NORMAL[1] if fwb else _NORMAL[0]


def prot_to_attr(prot: int, fwb: bool, lpa2: bool) -> int:
    """``stage2_set_prot_attr()``: the leaf attribute bits of ``prot``, or
    ``-EINVAL`` (Device and Normal-NC together, or either executable)."""
    kind = prot & (_PROT_DEVICE | _PROT_NC)
    if kind == _PROT_DEVICE | _PROT_NC:
        return -EINVAL
    if kind != 0 and prot & _PROT_X:
        return -EINVAL
    if kind == _PROT_DEVICE:
        attr = _DEVICE[1] if fwb else _DEVICE[0]
    elif kind == _PROT_NC:
        attr = _NORMAL_NC[1] if fwb else _NORMAL_NC[0]
    else:
        attr = _NORMAL[1] if fwb else _NORMAL[0]
    if not prot & _PROT_X:
        attr |= P.XN
    if prot & _PROT_R:
        attr |= P.S2AP_R
    if prot & _PROT_W:
        attr |= P.S2AP_W
    if not lpa2:
        attr |= _SH_INNER_BITS
    return attr | P.AF | (prot & P.SW_MASK)


def pte_prot(pte: int) -> int:
    """``kvm_pgtable_stage2_pte_prot()``, as the integer value of a ``Prot``."""
    prot = pte & P.SW_MASK
    if not pte & P.VALID:
        return prot
    if pte & P.S2AP_R:
        prot |= _PROT_R
    if pte & P.S2AP_W:
        prot |= _PROT_W
    if not pte & P.XN:
        prot |= _PROT_X
    return prot


def needs_update(old: int, new: int) -> bool:
    """``stage2_pte_needs_update()``: anything but the permissions differ."""
    if not old & P.VALID or not new & P.VALID:
        return True
    return ((old ^ new) & ~P.S2_PERMS) != 0


# -- TLB maintenance (asm/tlbflush.h) -------------------------------------------------------

#: ``MAX_TLBI_RANGE_PAGES`` = ``__TLBI_RANGE_PAGES(31, 3)``.
MAX_TLBI_RANGE_PAGES = 32 << (5 * 3 + 1)


def range_tlbi_ops(pages: int, start_page: int, lpa2_align: int) -> int:
    """TLBI instructions ``__flush_s2_tlb_range_op`` issues for ``pages`` pages
    (with FEAT_TLBIRANGE).

    Range operations cover ``(num + 1) << (5 * scale + 1)`` pages, scale from 3
    down to 0; a single page left over, or a page at an LPA2 start that is not
    ``lpa2_align`` (64K) aligned, takes a by-IPA TLBI of its own.
    """
    ops = 0
    scale = 3
    addr = start_page
    while pages > 0:
        if pages == 1 or (lpa2_align != 0 and addr % lpa2_align != 0):
            ops += 1
            addr += 1
            pages -= 1
            continue
        unit = 1 << (5 * scale + 1)
        num = min(pages, 32 * unit) // unit - 1
        if num >= 0:
            ops += 1
            addr += (num + 1) * unit
            pages -= (num + 1) * unit
        scale -= 1
    return ops


def range_tlbi_pieces(pages: int, start_page: int, lpa2_align: int) -> list[tuple[int, int]]:
    """What each TLBI of :func:`range_tlbi_ops` covers, in issue order:
    ``(first page, pages)``; a range operation covers the pages its
    ``(num + 1) << (5 * scale + 1)`` encodes, a by-IPA one a single page.
    Together they cover ``[start_page, start_page + pages)`` exactly."""
    out = []
    scale = 3
    addr = start_page
    while pages > 0:
        if pages == 1 or (lpa2_align != 0 and addr % lpa2_align != 0):
            out.append((addr, 1))
            addr += 1
            pages -= 1
            continue
        unit = 1 << (5 * scale + 1)
        num = min(pages, 32 * unit) // unit - 1
        if num >= 0:
            out.append((addr, (num + 1) * unit))
            addr += (num + 1) * unit
            pages -= (num + 1) * unit
        scale -= 1
    return out


def lpa2_range_align(page_shift: int, lpa2: bool) -> int:
    """Pages per 64K: with LPA2 a range TLBI's base must be 64K aligned."""
    return (1 << 16) >> page_shift if lpa2 else 0


#: HCR_EL2 writes per hyp TLB call on VHE: ``enter_vmid_context()`` clears
#: TGE, ``exit_vmid_context()`` restores the host's value (hyp/vhe/tlb.c). The
#: nVHE TLB functions never write HCR_EL2 (hyp/nvhe/tlb.c).
VHE_TLB_HCR_WRITES = 2


def hcr_erratum_barriers(vhe: bool, ac04_cpu_23: bool) -> int:
    """Extra DSB NSH -- and as many extra ISBs -- per hyp TLB call from the
    AC04_CPU_23 workaround (``write_sysreg_hcr()``: DSB NSH before and ISB
    after each HCR_EL2 write): two on VHE, none on nVHE."""
    if not ac04_cpu_23 or not vhe:
        return 0
    return VHE_TLB_HCR_WRITES


def unmap_defers_tlbi(tlbirange: bool, fwb: bool) -> bool:
    """``stage2_unmap_defer_tlb_flush()``: with range TLBIs and FWB the
    per-page invalidations of an unmap become one range flush at the end."""
    return tlbirange and fwb


# -- splitting (pgtable.c, mmu.c) -----------------------------------------------------------

def block_nr_page_tables(level: int, ptrs: int) -> int:
    """``stage2_block_get_nr_page_tables()``: table pages to split one block
    at ``level`` down to pages, or ``-EINVAL``."""
    if level == 1:
        return ptrs + 1
    if level == 2:
        return 1
    if level == 3:
        return 0
    return -EINVAL


def split_force_pte(level: int, ptrs: int, nobjs: int) -> int:
    """The split walker's cache rule for a block at ``level`` when the split
    cache holds ``nobjs`` pages: ``1`` to build the whole subtree down to
    pages (``force_pte``), ``0`` to build one page of next-level blocks (the
    walker then splits those as it descends), or a negative errno:
    ``-ENOMEM`` when not even that page is there, ``-EINVAL`` for a level
    without blocks."""
    if level == 1:
        nr = ptrs + 1
    elif level == 2:
        nr = 1
    else:
        return -EINVAL  # no block to split (level 3 never reaches the rule)
    if nobjs >= nr:
        return 1
    return 0 if nobjs >= 1 else -ENOMEM


def split_nr_page_tables(size: int, min_block_level: int, pud_size: int,
                         pmd_size: int) -> int:
    """``kvm_mmu_split_nr_page_tables()``: table pages to split ``size``
    bytes of blocks to pages -- the split cache's capacity for a chunk."""
    n = 0
    if min_block_level < 2:
        n += (size + pud_size - 1) // pud_size
    return n + (size + pmd_size - 1) // pmd_size


# -- the fault path (mmu.c: user_mem_abort) -------------------------------------------------

#: hugetlb page classes, as the switch in ``user_mem_abort()`` sees them
#: (``HC_NONE``: no hugetlb page, or logging).
HC_NONE, HC_PUD, HC_CONT_PMD, HC_PMD, HC_CONT_PTE = 0, 1, 2, 3, 4
HUGETLB_CLASS = {None: HC_NONE, "pud": HC_PUD, "cont_pmd": HC_CONT_PMD, "pmd": HC_PMD,
                 "cont_pte": HC_CONT_PTE}


def fault_supports_huge_mapping(gpa_start: int, uaddr_start: int, uaddr_size: int,
                                hva: int, map_size: int, page_size: int) -> bool:
    """``fault_supports_stage2_huge_mapping()``: guest and host addresses agree
    modulo ``map_size`` and the aligned block lies inside the memslot."""
    if map_size == page_size:
        return True
    if (gpa_start & (map_size - 1)) != (uaddr_start & (map_size - 1)):
        return False
    aligned = hva & ~(map_size - 1)
    return aligned >= uaddr_start and aligned + map_size <= uaddr_start + uaddr_size


def vma_mapping_shift(hclass: int, vma_shift: int, page_shift: int, pmd_shift: int,
                      pud_ok: bool, pmd_ok: bool) -> tuple[int, bool]:
    """The switch in ``user_mem_abort()`` over a hugetlb page size: a PUD that
    does not fit falls to a PMD, a contiguous PMD is mapped as a PMD, a PMD
    that does not fit falls to (contiguous) pages. Returns the mapping shift
    and whether the class forces page mappings (``force_pte``).
    ``pud_ok``/``pmd_ok``: :func:`fault_supports_huge_mapping` at each size."""
    if hclass == HC_PUD and not pud_ok:
        hclass = HC_PMD
    if hclass == HC_CONT_PMD:
        hclass = HC_PMD
    if hclass == HC_PMD:
        vma_shift = pmd_shift
        if not pmd_ok:
            hclass = HC_CONT_PTE
    if hclass == HC_CONT_PTE:
        return page_shift, True
    return vma_shift, False


# -- freeing tables (pgtable.c: stage2_free_walker) -----------------------------------------

def free_drops_table(free_clears_tables: bool, child_refcount: int) -> bool:
    """Whether the free walker drops a table at TABLE_POST: always in 6.12;
    since 6.19 only once the child holds nothing but its own reference (and
    then the table entry is cleared too, see :func:`free_clears_entry`)."""
    return not free_clears_tables or child_refcount == 1


def free_clears_entry(free_clears_tables: bool) -> bool:
    """Whether dropping a table also clears its entry (6.19+), so that the
    walk of a later teardown chunk cannot reach the freed table."""
    return free_clears_tables


# -- where an entry read hits (s2split.arm64.hierarchy) ------------------------------------------

def hit_class(stamp: int, now: int, l1_lines: int, l2_lines: int, llc_lines: int) -> int:
    """The cache level a read of a 64-byte line hits (0 L1, 1 L2, 2 LLC, 3
    DRAM): ``stamp`` is the line clock when the line was last touched (0:
    never), ``now`` the clock of this touch. The clock ticks once per touch of
    a line other than the one touched last, so ``now - stamp - 1`` counts the
    touches of other lines in between: the reuse distance when none of them
    repeats, an upper bound on it otherwise (docs/design-notes.md). A cache of
    ``n`` lines under LRU holds the line when fewer than ``n`` others came."""
    if stamp == 0:
        return 3
    d = now - stamp - 1
    if d < l1_lines:
        return 0
    if d < l2_lines:
        return 1
    if d < llc_lines:
        return 2
    return 3
