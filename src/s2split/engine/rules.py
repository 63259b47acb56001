"""The kernel's arithmetic rules (:mod:`s2split.arm64.rules`), compiled.

The same source the reference engine runs as plain Python, compiled by numba
for the fast engine: a rule lives in one place and cannot drift.
"""

from __future__ import annotations

from numba import njit

from ..arm64 import rules as R

_jit = njit(cache=True, _nrt=False)

phys_to_pte = _jit(R.phys_to_pte)
pte_to_phys = _jit(R.pte_to_phys)
normal_memattr = _jit(R.normal_memattr)
prot_to_attr = _jit(R.prot_to_attr)
pte_prot = _jit(R.pte_prot)
needs_update = _jit(R.needs_update)
range_tlbi_ops = _jit(R.range_tlbi_ops)
lpa2_range_align = _jit(R.lpa2_range_align)
unmap_defers_tlbi = _jit(R.unmap_defers_tlbi)
block_nr_page_tables = _jit(R.block_nr_page_tables)
split_force_pte = _jit(R.split_force_pte)
split_nr_page_tables = _jit(R.split_nr_page_tables)
fault_supports_huge_mapping = _jit(R.fault_supports_huge_mapping)
vma_mapping_shift = _jit(R.vma_mapping_shift)
free_drops_table = _jit(R.free_drops_table)
free_clears_entry = _jit(R.free_clears_entry)
hcr_erratum_barriers = _jit(R.hcr_erratum_barriers)
hit_class = _jit(R.hit_class)

#: Every compiled rule (the compile cache drops them with the rest).
COMPILED = (phys_to_pte, pte_to_phys, normal_memattr, prot_to_attr, pte_prot, needs_update,
            range_tlbi_ops, lpa2_range_align, unmap_defers_tlbi, block_nr_page_tables,
            split_force_pte, split_nr_page_tables, fault_supports_huge_mapping,
            vma_mapping_shift, free_drops_table, free_clears_entry, hcr_erratum_barriers,
            hit_class)

HC_NONE, HC_PUD, HC_CONT_PMD, HC_PMD, HC_CONT_PTE = R.HC_NONE, R.HC_PUD, R.HC_CONT_PMD, \
    R.HC_PMD, R.HC_CONT_PTE
