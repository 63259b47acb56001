"""What really backs the guest memory ``hw run`` measures, and the host
settings that walk it behind the measurement's back.

A THP cell measured on memory the kernel could not give huge pages (on a 64K
host a 512M THP is rarely obtained), or a hugetlb cell whose mapping has
another page size, measures the regular-page case under the wrong name. So
after populate (the guest has touched every page; outside the timed part)
and before the first measured ioctl, :func:`coverage` reads the mapping's
entry in ``/proc/self/smaps``:

* THP: ``AnonHugePages`` over the test memory (PMD-mapped huge pages);
* hugetlb: ``KernelPageSize`` must be the expected size, and
  ``Private_Hugetlb + Shared_Hugetlb`` over the test memory;
* regular pages: the memory not in ``AnonHugePages``.

``hw run`` refuses a run whose coverage is below 1 (``--allow-partial``
records it instead); the coverage is stored with every result and ``hw
compare`` shows it. :func:`host_settings` records DAMON_STAT, khugepaged,
NUMA balancing and the THP mode as they were. Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..arm64.arch import size_name
from ..plumbing.errors import S2Error

SMAPS = "/proc/self/smaps"
THP = "/sys/kernel/mm/transparent_hugepage"


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    fields: dict[str, int]  # smaps "Key: N kB" lines, in bytes


def parse_smaps(text: str) -> list[Vma]:
    """The VMAs of an smaps file, each with its size fields in bytes."""
    out: list[Vma] = []
    start = end = None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        head = line.split(None, 1)
        if head and "-" in head[0] and ":" not in head[0]:
            if start is not None:
                out.append(Vma(start, end, fields))
            lo, _, hi = head[0].partition("-")
            try:
                start, end = int(lo, 16), int(hi, 16)
            except ValueError:
                raise S2Error(f"smaps: cannot read the mapping line {line!r}") from None
            fields = {}
            continue
        key, _, value = line.partition(":")
        parts = value.split()
        if start is not None and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) << 10
    if start is not None:
        out.append(Vma(start, end, fields))
    return out


@dataclass(frozen=True)
class Coverage:
    """How much of a test region is backed by the page size its backing names."""

    backing: str
    kind: str  # "anonymous", "thp", "hugetlb"
    page_size: int  # the expected page size
    region_bytes: int
    backed_bytes: int
    kernel_page_size: int | None = None  # hugetlb: smaps's KernelPageSize

    @property
    def fraction(self) -> float:
        return self.backed_bytes / self.region_bytes if self.region_bytes else 0.0

    @property
    def full(self) -> bool:
        return self.backed_bytes >= self.region_bytes

    def describe(self) -> str:
        return (f"{self.fraction:.1%} of {size_name(self.region_bytes)} {self.backing} memory "
                f"in {size_name(self.page_size)} pages")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fraction": self.fraction}


def _kind(backing: str) -> str:
    b = backing.strip().lower()
    if b == "anonymous_thp":
        return "thp"
    if b.startswith("anonymous_hugetlb"):
        return "hugetlb"
    return "anonymous"


def coverage(vmas: list[Vma], address: int, size: int, backing: str,
             page_size: int) -> Coverage:
    """The coverage of ``[address, address + size)`` from its VMAs. A VMA's
    huge-page bytes count up to its overlap with the region (the THP mapping's
    padding is never touched)."""
    kind = _kind(backing)
    end = address + size
    overlapping = [v for v in vmas if v.start < end and v.end > address]
    if not overlapping:
        raise S2Error(f"smaps has no mapping of the {backing} test memory at {address:#x}")
    backed = 0
    kps = None
    for v in overlapping:
        overlap = min(v.end, end) - max(v.start, address)
        if kind == "thp":
            backed += min(overlap, v.fields.get("AnonHugePages", 0))
        elif kind == "hugetlb":
            kps = v.fields.get("KernelPageSize")
            if kps == page_size:
                hugetlb = v.fields.get("Private_Hugetlb", 0) + v.fields.get("Shared_Hugetlb", 0)
                backed += min(overlap, hugetlb)
        else:
            backed += max(0, overlap - v.fields.get("AnonHugePages", 0))
    return Coverage(backing, kind, page_size, size, backed, kps)


def refusal(c: Coverage) -> str:
    """The one-line reason a run on this memory is not timed."""
    if c.kind == "hugetlb" and c.kernel_page_size not in (None, c.page_size):
        why = (f"its hugetlb mapping has {size_name(c.kernel_page_size)} pages, not "
               f"{size_name(c.page_size)}")
    elif c.kind == "thp":
        why = (f"only {c.fraction:.1%} of it is in {size_name(c.page_size)} transparent huge "
               "pages (AnonHugePages in smaps): free and defragment memory, or use hugetlb")
    elif c.kind == "hugetlb":
        why = f"only {c.fraction:.1%} of it is in {size_name(c.page_size)} hugetlb pages"
    else:
        why = (f"{1 - c.fraction:.1%} of it is in transparent huge pages "
               "(MADV_NOHUGEPAGE did not hold)")
    return (f"refusing to time {size_name(c.region_bytes)} of {c.backing} memory: {why}; "
            "--allow-partial records the coverage instead")


def read_smaps(path: str = SMAPS) -> list[Vma]:
    try:
        return parse_smaps(Path(path).read_text())
    except OSError as e:
        raise S2Error(f"cannot read {path} ({e.strerror}) to check the backing") from None


def read_setting(path: str | Path) -> str | None:
    """A sysfs/procfs file's text, stripped, or None when it cannot be read."""
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def selected(text: str | None) -> str | None:
    """``always [madvise] never`` -> ``madvise``."""
    if text and "[" in text:
        return text.split("[", 1)[1].split("]", 1)[0]
    return text


def hugetlb_pool(page_size: int, root: str = "/sys/kernel/mm/hugepages") -> dict[str, int]:
    d = f"{root}/hugepages-{page_size >> 10}kB"
    out = {}
    for name in ("nr_hugepages", "free_hugepages", "resv_hugepages", "surplus_hugepages"):
        v = read_setting(f"{d}/{name}")
        if v is not None and v.isdigit():
            out[name] = int(v)
    return out


def host_settings(root: str = "") -> dict[str, Any]:
    """The settings of background work that walks the guest memory or the
    stage-2 tables, as they were (None: this kernel has no such knob)."""
    damon = read_setting(f"{root}/sys/module/damon_stat/parameters/enabled")
    return {
        "damon_stat_enabled": damon,
        "numa_balancing": read_setting(f"{root}/proc/sys/kernel/numa_balancing"),
        "thp_enabled": selected(read_setting(f"{root}{THP}/enabled")),
        "thp_defrag": selected(read_setting(f"{root}{THP}/defrag")),
        "khugepaged": {name: read_setting(f"{root}{THP}/khugepaged/{name}") for name in (
            "scan_sleep_millisecs", "alloc_sleep_millisecs", "pages_to_scan", "defrag")},
    }


def damon_stat_on(settings: dict[str, Any] | None) -> bool:
    return bool(settings) and str(settings.get("damon_stat_enabled")) in ("Y", "1")
