"""Table-page memory and the KVM memory cache.

A table page is a list of ``PTRS_PER_TABLE`` integer entries, named by a page
frame number (``pfn``); its physical address is ``TABLE_PA_BASE + pfn * granule``.
Pages are reference counted like the kernel's ``struct page``: the page
itself holds one reference and every non-zero entry in it holds one more
(``stage2_pte_is_counted``). Freed frames are reused last-in first-out, and a
memory cache hands out its pages last-in first-out like
``kvm_mmu_memory_cache_alloc()`` -- both engines follow the same order so
that their tables are bit-identical.
"""

from __future__ import annotations

from ...arm64.arch import Geometry
from ...arm64.hierarchy import COUNTED, LINE_ENTRY_SHIFT
from ...arm64.rules import hit_class

#: Physical address where table pages live (guest memory lives elsewhere).
TABLE_PA_BASE = 0x80_0000_0000


class TableMemory:
    """All table pages of one VM's stage-2, with their reference counts."""

    __slots__ = ("geom", "pages", "refcount", "free_pfns", "base", "tracer", "stamps", "clock",
                 "last_line", "cache_lines", "lines_per_page", "trace")

    def __init__(self, geom: Geometry, base: int = TABLE_PA_BASE):
        self.geom = geom
        self.base = base
        self.pages: list[list[int] | None] = []
        self.refcount: list[int] = []
        self.free_pfns: list[int] = []
        #: An attached TLB model, told of pages freed and reused (or None).
        self.tracer = None
        # The line clock of s2split.arm64.hierarchy: a stamp per line touched (a
        # line's stamps outlive its page: frames are reused, lines stay where
        # they are), the clock, and the line touched last.
        self.stamps: dict[int, int] = {}
        self.clock = 0
        self.last_line = -1
        self.cache_lines = COUNTED.lines()
        self.lines_per_page = geom.ptrs_per_table >> LINE_ENTRY_SHIFT
        #: (line, class, clock distance or -1 for a first touch) per entry
        #: read and None where the caches were
        #: emptied, when a test asks (tests/test_read_hits.py)
        self.trace: list[tuple[int, int] | None] | None = None

    def forget_lines(self) -> None:
        """Empty the caches: every line as never touched."""
        if self.trace is not None:
            self.trace.append(None)
        self.stamps.clear()
        self.clock = 0
        self.last_line = -1

    def touch(self, pfn: int, idx: int) -> int:
        """An entry read of ``idx`` in page ``pfn``: where it hits (hierarchy.L1..DRAM)."""
        line = pfn * self.lines_per_page + (idx >> LINE_ENTRY_SHIFT)
        cls = 0
        dist = 0  # the line just read: no other line since
        if line != self.last_line:
            self.clock += 1
            stamp = self.stamps.get(line, 0)
            cls = hit_class(stamp, self.clock, *self.cache_lines)
            dist = self.clock - stamp - 1 if stamp else -1
            self.stamps[line] = self.clock
            self.last_line = line
        if self.trace is not None:
            self.trace.append((line, cls, dist))
        return cls

    def alloc(self) -> int:
        """A zeroed page with one reference (its own)."""
        n = self.geom.ptrs_per_table
        if self.free_pfns:
            pfn = self.free_pfns.pop()
            if self.tracer is not None:
                self.tracer.page_freed(pfn, reused=True)
            self.pages[pfn] = [0] * n
            self.refcount[pfn] = 1
        else:
            pfn = len(self.pages)
            self.pages.append([0] * n)
            self.refcount.append(1)
        return pfn

    def get(self, pfn: int) -> None:
        self.refcount[pfn] += 1

    def put(self, pfn: int) -> bool:
        """Drop a reference; returns True when that freed the page."""
        rc = self.refcount[pfn] - 1
        self.refcount[pfn] = rc
        if rc == 0:
            if self.tracer is not None:
                self.tracer.page_freed(pfn)
            self.pages[pfn] = None
            self.free_pfns.append(pfn)
            return True
        if rc < 0:
            raise AssertionError(f"table page {pfn} reference count went negative")
        return False

    def free(self, pfn: int) -> None:
        """Free regardless of references (``free_pages_exact`` of the root)."""
        if self.tracer is not None:
            self.tracer.page_freed(pfn)
        self.pages[pfn] = None
        self.refcount[pfn] = 0
        self.free_pfns.append(pfn)

    def pa(self, pfn: int) -> int:
        return self.base + pfn * self.geom.granule

    def pfn(self, pa: int) -> int:
        return (pa - self.base) // self.geom.granule

    def table(self, pfn: int) -> list[int]:
        page = self.pages[pfn]
        if page is None:
            raise AssertionError(f"table page {pfn} used after free")
        return page

    def live_pages(self) -> int:
        return len(self.pages) - len(self.free_pfns)


class MemoryCache:
    """``struct kvm_mmu_memory_cache`` holding zeroed table pages."""

    __slots__ = ("mem", "objects", "capacity")

    def __init__(self, mem: TableMemory):
        self.mem = mem
        self.objects: list[int] = []
        self.capacity = 0

    @property
    def nobjs(self) -> int:
        return len(self.objects)

    def topup(self, capacity: int, minimum: int) -> int:
        """``__kvm_mmu_topup_memory_cache()``: fill to ``capacity`` when below
        ``minimum``; returns the number of pages allocated."""
        if len(self.objects) >= minimum:
            return 0
        if self.capacity == 0:
            self.capacity = capacity
        elif self.capacity != capacity:
            raise AssertionError("a memory cache's capacity cannot change across top-ups")
        n = 0
        while len(self.objects) < self.capacity:
            self.objects.append(self.mem.alloc())
            n += 1
        return n

    def alloc(self) -> int | None:
        """Take one page (last in, first out); ``None`` when empty."""
        return self.objects.pop() if self.objects else None

    def free_all(self) -> int:
        """``kvm_mmu_free_memory_cache()``; returns the pages freed."""
        n = len(self.objects)
        while self.objects:
            self.mem.put(self.objects.pop())
        self.capacity = 0
        return n
