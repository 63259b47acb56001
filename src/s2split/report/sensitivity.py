"""What a saving hinges on: the unit costs that decide it.

A variant's saving is the vanilla estimate minus its own, over vanilla's:
a sum, over the kernel operations of :mod:`.breakdown`, of the time each
loses. Usually one operation at one level carries nearly all of it -- for
skip-levels, the split walk at level 3, which it no longer does at all -- so
the saving *equals the share of vanilla's estimated time spent there*, and a
reader with other hardware only needs to know what that share is on theirs
(the unit costs listed, against everything else the syscall does).

:func:`hinge` finds that operation and checks the statement numerically:
the saving, the share, and the rest (the other operations' changes, summed
separately) must add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..counters import KINDS, slot_level
from ..counts import Counts
from .breakdown import BY_LEVEL, CATEGORIES, CATEGORY_INDEX, Key, breakdown_ns, key_label, \
    key_phrase

#: How counters read in a sentence.
KIND_WORDS = {"read_table": "entries read", "read_leaf": "entries read",
              "read_invalid": "entries read", "visit_leaf": "visitor calls",
              "visit_pre": "visitor calls", "visit_post": "visitor calls",
              "loops": "table loops", "reload": "entries re-read", "descent": "descents",
              "walks": "walks", "calls": "calls", "pte_write": "PTE writes",
              "pte_cas": "PTE compare-and-swaps", "bbm": "break-before-makes",
              "get_page": "page references taken", "put_page": "page references dropped",
              "skip_level": "skipped tables", "skip_children": "skipped tables"}


@dataclass
class UnitCost:
    what: str  # e.g. "entries read"
    count: int  # in vanilla
    unit_ns: float
    share: float  # percent of vanilla's estimate


@dataclass
class Hinge:
    """What one variant's saving in one cell rests on (percentages of the
    vanilla estimate of the cell)."""

    saving: float
    key: Key | None  # the (category, level) whose time falls most; None: nothing falls
    share_before: float = 0.0
    share_after: float = 0.0
    rest: float = 0.0  # the other operations' changes, summed on their own
    unit_costs: list[UnitCost] = field(default_factory=list)

    @property
    def gone(self) -> bool:
        return self.key is not None and self.share_after == 0.0

    @property
    def residual(self) -> float:
        """saving - (share_before - share_after) - rest: zero up to rounding."""
        return self.saving - (self.share_before - self.share_after) - self.rest

    @property
    def label(self) -> str:
        return key_label(self.key) if self.key else "-"


def hinge(base: Counts, other: Counts, profile) -> Hinge:
    """The operation a variant's saving comes from, with the numbers that
    check it (see the module docstring)."""
    total = profile.estimate_ns(base)
    if total <= 0:
        return Hinge(0.0, None)
    saving = 100.0 * (total - profile.estimate_ns(other)) / total
    b, o = breakdown_ns(base, profile), breakdown_ns(other, profile)
    drops = {k: b.get(k, 0.0) - o.get(k, 0.0) for k in set(b) | set(o)}
    if not drops or max(drops.values()) <= 0:
        return Hinge(saving, None, rest=100.0 * sum(drops.values()) / total)
    key = max(drops, key=lambda k: (drops[k], str(k)))
    rest = 100.0 * sum(v for k, v in drops.items() if k != key) / total
    return Hinge(saving, key, 100.0 * b.get(key, 0.0) / total, 100.0 * o.get(key, 0.0) / total,
                 rest, unit_costs(base, profile, key, total))


def unit_costs(counts: Counts, profile, key: Key, total: float) -> list[UnitCost]:
    """The counters of ``key`` in ``counts`` grouped by what they count and
    their unit cost, largest share first."""
    cat, level = key
    ci = CATEGORIES.index(cat)
    prod = counts.array * profile.array
    groups: dict[tuple[str, float], list[float]] = {}
    for o, k, s in zip(*np.nonzero(prod)):
        if CATEGORY_INDEX[o, k] != ci:
            continue
        if cat in BY_LEVEL and slot_level(int(s)) != level:
            continue
        kind = KINDS[k]
        what = KIND_WORDS.get(kind, kind.replace("_", " "))
        g = groups.setdefault((what, float(profile.array[o, k, s])), [0, 0.0])
        g[0] += int(counts.array[o, k, s])
        g[1] += float(prod[o, k, s])
    out = [UnitCost(what, int(n), cost, 100.0 * ns / total)
           for (what, cost), (n, ns) in groups.items()]
    return sorted(out, key=lambda u: -u.share)


def _ns(x: float) -> str:
    return f"{x:g} ns"


def statement(variant: str, h: Hinge, profile_name: str, top: int = 3) -> str:
    """The hinge as one sentence, with its numerical check."""
    if h.key is None:
        return (f"{variant} saves {h.saving:.1f}%: no operation's estimated time falls "
                f"(profile {profile_name}).")
    costs = ", ".join(f"{u.count:,} {u.what} at {_ns(u.unit_ns)}" for u in h.unit_costs[:top])
    where = key_phrase(h.key)
    if h.gone:
        head = (f"the saving ({h.saving:.1f}%) equals the share of the syscall's estimated "
                f"time spent in {where} ({h.share_before:.1f}%: {costs}), which {variant} "
                "no longer does")
    else:
        head = (f"the saving ({h.saving:.1f}%) comes mostly from {where}, whose share of "
                f"vanilla's estimated time falls from {h.share_before:.1f}% to "
                f"{h.share_after:.1f}% ({costs})")
    return (f"{head}; every other change together adds {h.rest:+.2f} points "
            f"(check: {h.saving:.2f} = {h.share_before:.2f} - {h.share_after:.2f} "
            f"{'+' if h.rest >= 0 else '-'} {abs(h.rest):.2f}; profile {profile_name}).")
