"""The README's Python example: split one 1 GiB block under two variants."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..arm64.arch import Geometry
from ..arm64.pte import Prot
from ..model.pgtable.memory import MemoryCache
from ..model.pgtable.stage2 import Stage2PageTable
from ..model.pgtable.variants import get

GIB = 1 << 30


def split_one_block(variant: str):
    """Map 1 GiB at IPA 1 GiB as one level-1 block on 4K/40-bit, then split it
    with a cache that holds the whole subtree; return the split's counts."""
    pgt = Stage2PageTable(Geometry(4096, 40), variant=get(variant))
    mc = MemoryCache(pgt.mem)
    mc.topup(16, 2)
    assert pgt.map(GIB, GIB, 64 * GIB, Prot.RW, mc) == 0
    pgt.tally.reset()
    cache = MemoryCache(pgt.mem)
    cache.topup(513, 513)
    assert pgt.split(GIB, GIB, cache) == 0
    return pgt.tally.take()


def run_demo(console: Console) -> None:
    rows = [
        ("entries read by the split walk", lambda c: c.entries_read("split")),
        ("  of which level 3", lambda c: c.by_level("split", "read_leaf").get(3, 0)),
        ("split visitor calls", lambda c: c.visitor_calls("split")),
        ("map visitor calls (create_unlinked)", lambda c: c.visitor_calls("create_unlinked")),
        ("table pages taken", lambda c: c.total("page_taken")),
        ("TLBIs by IPA (level 1)", lambda c: c.by_level(None, "tlbi_ipa").get(1, 0)),
        ("PTE writes", lambda c: c.total("pte_write")),
    ]
    counts = {v: split_one_block(v) for v in ("vanilla", "skip-levels")}
    t = Table(title="Splitting one 1G block (4K pages, 40-bit IPA, full cache)",
              title_justify="left")
    t.add_column("counter")
    for v in counts:
        t.add_column(v, justify="right")
    for label, f in rows:
        t.add_row(label, *(f"{f(c):,}" for c in counts.values()))
    console.print(t)
