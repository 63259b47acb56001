"""Kernel versions whose stage-2 code differs in what s2split counts.

``vanilla`` is Linux 6.12, the kernel of the real-kernel fixtures. Newer
kernels changed only the teardown of the stage-2 as far as the counts go
(docs/design-notes.md lists every difference checked):

* 6.17 split ``kvm_pgtable_stage2_destroy()`` into ``destroy_range`` and
  ``destroy_pgd``, and ``mmu.c`` destroys the range in chunks of the minimum
  block level's granule, one walk per chunk;
* 6.19 changed the free walker: a table entry is dropped at TABLE_POST only
  when its child table is empty, and is then cleared (one more PTE write), so
  that a later chunk does not walk the freed table again.

6.17 and 6.18 have the chunked destroy with the old free walker, whose
repeated puts on tables spanning several chunks 6.19 fixed; they are not
offered. ``6.19`` stands for 6.19 and later.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import S2Error

DEFAULT_KERNEL = "6.12"


@dataclass(frozen=True)
class KernelRules:
    version: str
    #: stage-2 teardown walks one chunk (MIN_BLOCK_LEVEL granule) at a time
    chunked_destroy: bool
    #: the free walker drops a table only when empty, and clears its entry
    free_clears_tables: bool


KERNELS = {
    "6.12": KernelRules("6.12", chunked_destroy=False, free_clears_tables=False),
    "6.19": KernelRules("6.19", chunked_destroy=True, free_clears_tables=True),
}


def kernel_rules(version: str) -> KernelRules:
    try:
        return KERNELS[version]
    except (KeyError, TypeError):
        raise S2Error(f"kernel {version!r} is not modelled: choose {' or '.join(KERNELS)} "
                      "(6.19 stands for 6.19 and later)") from None
