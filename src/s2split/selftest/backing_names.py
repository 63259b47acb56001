"""The selftests' names of backing memory, the vocabulary of ``-s``
(``vm_mem_backing_src_alias``), numpy-free: the options module lists them in
``-s``'s help and the harness runs them; what each one means to KVM is
:mod:`s2split.model.kvm.backing`'s business."""

from __future__ import annotations

#: ``anonymous_hugetlb_<suffix>``: the hugepage size each suffix names.
HUGETLB_SUFFIX_SIZES = {
    "16kb": 1 << 14, "64kb": 1 << 16, "512kb": 1 << 19, "1mb": 1 << 20, "2mb": 1 << 21,
    "8mb": 1 << 23, "16mb": 1 << 24, "32mb": 1 << 25, "256mb": 1 << 28, "512mb": 1 << 29,
    "1gb": 1 << 30, "2gb": 1 << 31, "16gb": 1 << 34,
}
ANONYMOUS_HUGETLB_SIZES = tuple(HUGETLB_SUFFIX_SIZES)
UPSTREAM_NAMES = ("anonymous", "anonymous_thp", "anonymous_hugetlb",
                  *(f"anonymous_hugetlb_{s}" for s in HUGETLB_SUFFIX_SIZES), "shmem",
                  "shared_hugetlb")
