"""Where entry reads hit: the memory hierarchy the counts classify against.

Both engines keep a *line clock* over the 64-byte lines of table memory: it
ticks once per touch of a line other than the line touched last, and each
line remembers the tick of its last touch (its *stamp*). A read is classified
by :func:`s2split.arm64.rules.hit_class` -- L1, L2, last-level cache or DRAM --
from the ticks since its line's stamp, against the capacities in lines of
:data:`COUNTED`. Only the entry reads of the walkers touch lines: the reads
counted as ``read_table``, ``read_leaf`` and ``read_invalid`` of every
operation but ``get_leaf`` (which reads the host's page tables, not laid out
here). Re-reads after a visitor (``reload``) read the line just read and are
not classified; neither are stores, page zeroing, guest data or anything
else the CPU does -- the model's caches see the walks alone. Every phase
starts with caches that hold no table line (``take_counts`` empties them at
the end of a phase): between phases the guest writes its memory and
userspace runs, and what matters -- a walk re-reading what another walk of
the same phase just read -- happens within a phase. It also keeps a phase's
counts a function of the tables alone, so that variants can share runs.

A profile's ``memory_hierarchy`` section states the same sizes and a cost
per read of each class (its ``latency_ns``), which :mod:`s2split.estimate.cost` turns
into the unit costs ``hit_l1`` .. ``hit_dram``; the entry-read keys
(``read_*``) then price the instructions only. Numpy-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plumbing.errors import S2Error

LINE_BYTES = 64
ENTRY_BYTES = 8
#: log2 of the descriptors per line: a line holds 8 entries.
LINE_ENTRY_SHIFT = 3
LEVELS = ("l1", "l2", "llc", "dram")
L1, L2, LLC, DRAM = range(4)


@dataclass(frozen=True)
class Hierarchy:
    """Cache capacities in bytes (L1, L2, LLC) and a cost per read in each
    class (ns, L1..DRAM)."""

    l1_bytes: int = 64 << 10
    l2_bytes: int = 1 << 20
    llc_bytes: int = 32 << 20
    latency_ns: tuple[float, float, float, float] = (1.3, 3.5, 12.0, 25.0)
    line_bytes: int = LINE_BYTES

    def lines(self) -> tuple[int, int, int]:
        """The capacities in lines, as the engines classify against them."""
        return (self.l1_bytes // self.line_bytes, self.l2_bytes // self.line_bytes,
                self.llc_bytes // self.line_bytes)

    def to_json(self) -> dict:
        sizes = (self.l1_bytes, self.l2_bytes, self.llc_bytes, None)
        return {"line_bytes": self.line_bytes,
                **{name: ({"size_bytes": size} if size else {}) | {"latency_ns": lat}
                   for name, size, lat in zip(LEVELS, sizes, self.latency_ns)}}


#: The hierarchy the engines count against (the shipped profiles'). Counts do
#: not depend on the profile: a profile stating other sizes is refused by
#: :func:`parse_memory_hierarchy` until counts take sizes per run.
COUNTED = Hierarchy()


def parse_memory_hierarchy(data: dict, where: str) -> Hierarchy:
    """A profile's ``memory_hierarchy`` section (schema-checked already), as
    a :class:`Hierarchy`; sizes other than the counted ones are a one-line
    error naming ``where``."""
    line = int(data.get("line_bytes", LINE_BYTES))
    if line != LINE_BYTES:
        raise S2Error(f"{where}: memory_hierarchy.line_bytes must be {LINE_BYTES} "
                      f"(the counts classify 64-byte lines), not {line}")
    base = COUNTED
    sizes = []
    for name, counted in zip(LEVELS[:3], (base.l1_bytes, base.l2_bytes, base.llc_bytes)):
        size = int(data.get(name, {}).get("size_bytes", counted))
        if size != counted:
            raise S2Error(f"{where}: memory_hierarchy.{name}.size_bytes {size} differs from "
                          f"the size the counts classify against ({counted}); other sizes "
                          f"are not supported yet")
        sizes.append(size)
    lat = tuple(float(data.get(name, {}).get("latency_ns", dflt))
                for name, dflt in zip(LEVELS, base.latency_ns))
    return Hierarchy(sizes[0], sizes[1], sizes[2], lat, line)  # type: ignore[arg-type]
