"""Backing memory types of the selftests (``-s``) and what KVM sees of them.

Names are the selftests' (``vm_mem_backing_src_alias``). For each host granule
this module knows the backing's page size (``get_backing_src_pagesz``), how
the selftest aligns the host mapping, and the VMA page shift that
``user_mem_abort()`` starts from: a hugetlb VMA's ``huge_page_shift``, or
``PAGE_SHIFT`` for anonymous memory (THP is found later, by looking the host
address up in the host page tables).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...arm64.arch import GRANULES, pmd_size, size_name
from ...plumbing.errors import S2Error
from ...selftest.backing_names import HUGETLB_SUFFIX_SIZES, UPSTREAM_NAMES


def hugetlb_sizes(granule: int) -> dict[int, str]:
    """Hugepage sizes arm64 supports with this granule (``arch_hugetlb_valid_size``),
    mapped to how user_mem_abort treats them: ``pud``, ``cont_pmd``, ``pmd``, ``cont_pte``."""
    pmd = pmd_size(granule)
    sizes = {pmd: "pmd", pmd * (16 if granule == 4096 else 32): "cont_pmd",
             granule * (16 if granule == 4096 else 128 if granule == 16384 else 32): "cont_pte"}
    if granule == 4096:
        sizes[1 << 30] = "pud"
    return sizes


@dataclass(frozen=True)
class Backing:
    """One backing type, resolved for a host granule."""

    name: str
    kind: str  # "anonymous", "thp" or "hugetlb"
    granule: int
    page_size: int  # get_backing_src_pagesz()

    @property
    def host_alignment(self) -> int:
        """Alignment of the host mapping (THP: padded by the selftest; hugetlb: by
        mmap; anonymous: large anonymous mmaps are PMD aligned since Linux 6.7)."""
        return max(self.page_size, pmd_size(self.granule))

    @property
    def hugetlb_class(self) -> str | None:
        return hugetlb_sizes(self.granule)[self.page_size] if self.kind == "hugetlb" else None

    @property
    def vma_shift(self) -> int:
        """``get_vma_page_shift()``: the hugetlb page shift, else PAGE_SHIFT."""
        return self.page_size.bit_length() - 1 if self.kind == "hugetlb" else \
            GRANULES[self.granule]

    def describe(self) -> str:
        return f"{self.name} ({size_name(self.page_size)} pages)"


def parse_backing(name: str, granule: int) -> Backing:
    """Resolve an ``-s`` name for a host granule, or raise a one-line error."""
    key = name.strip().lower()
    pmd = pmd_size(granule)
    if key == "anonymous":
        return Backing(key, "anonymous", granule, granule)
    if key == "anonymous_thp":
        return Backing(key, "thp", granule, pmd)
    if key == "anonymous_hugetlb":
        # The default hugepage size (Hugepagesize in /proc/meminfo) is the PMD size.
        return Backing(key, "hugetlb", granule, pmd)
    if key.startswith("anonymous_hugetlb_") and key.removeprefix("anonymous_hugetlb_") in \
            HUGETLB_SUFFIX_SIZES:
        size = HUGETLB_SUFFIX_SIZES[key.removeprefix("anonymous_hugetlb_")]
        valid = hugetlb_sizes(granule)
        if size not in valid:
            ok = ", ".join(f"anonymous_hugetlb_{size_name(s).lower()}b" for s in sorted(valid))
            raise S2Error(f"backing {name!r}: {size_name(size)} hugepages do not exist with a "
                          f"{size_name(granule)} granule (use {ok})")
        return Backing(key, "hugetlb", granule, size)
    if key in ("shmem", "shared_hugetlb"):
        raise S2Error(f"backing {name!r} is not modelled: use anonymous, anonymous_thp or "
                      "anonymous_hugetlb[_SIZE]")
    raise S2Error(f"unknown backing src type {name!r}: choose from "
                  + ", ".join(n for n in UPSTREAM_NAMES if not n.startswith("sh")))
