"""Stage-2 walks the host makes on its own, and the bounds they leave.

Since 6.17 DAMON_STAT (``mm/damon/stat.c``, enabled by default in Debian's
7.x config) samples physical memory in the background; for a page (4K) or
a THP (2M) that a KVM guest maps, its ``mmu_notifier_clear_young()`` reaches
``kvm_age_gfn()`` -> ``kvm_pgtable_stage2_test_clear_young()``: one
``kvm_pgtable_walk(cb=stage2_age_walker)`` over that range. These walks depend
on timing, are none of the selftest's work, and the model does not make them.

What they add to a phase, and so what the kernel's counts may exceed the
model's by:

* ``kvm_pgtable_walk``: one call per age walk, and its ``cb=`` key counts it,
  read from the same trace as the total: the kernel's count is the model's
  plus the phase's ``cb=stage2_age_walker`` hits -- exactly;
* ``__kvm_pgtable_walk``: each age walk's range (a naturally aligned 4K page
  or 2M block) lies in one table at every level, so it loops at most once
  per level it reaches. But the counters of a phase are read one trace after
  another while kdamond runs on: an age walk counted in one phase can have
  its table loops counted in the next or the previous one. So per level the
  kernel's count lies in ``[model, model + N]``, N the age walks of this
  phase and both neighbours, and the total in
  ``[model, model + N * levels]``. The lower bound is the model's own count,
  since the selftest's walks all end inside their ioctl, before the phase's
  counters are read.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Walker callbacks that only the host's background work runs, with the cause.
BACKGROUND_WALKERS = {
    "stage2_age_walker": "background page aging, not the selftest's work: DAMON_STAT's kdamond "
                         "(6.17+, on in Debian's config) -> mmu_notifier_clear_young() -> "
                         "kvm_age_gfn(); timing-dependent (damon_stat.enabled=N removes it)",
}
WALK = "kvm_pgtable_walk"
LOOPS = "__kvm_pgtable_walk"


def background_walks(phase: dict) -> dict[str, int]:
    """Background walker callback -> walks in one fixture phase."""
    detail = phase.get("detail", {}).get(WALK, {})
    out = {}
    for cb in BACKGROUND_WALKERS:
        n = detail.get(f"cb={cb}", {}).get("hitcount", 0)
        if n:
            out[cb] = int(n)
    return out


@dataclass(frozen=True)
class Background:
    """The background walks around one phase: ``own`` in it, ``near`` in it
    and its neighbours (the walks whose table loops may be counted in it)."""

    own: int
    near: int
    causes: tuple[str, ...]

    @property
    def any(self) -> bool:
        return self.near > 0


def run_background(phases: list[dict]) -> dict[str, Background]:
    """Per phase name of a fixture run: its background walks."""
    walks = [background_walks(p) for p in phases]
    out = {}
    for i, p in enumerate(phases):
        own = sum(walks[i].values())
        near = sum(sum(walks[j].values()) for j in (i - 1, i, i + 1) if 0 <= j < len(walks))
        causes = sorted({cb for j in (i - 1, i, i + 1) if 0 <= j < len(walks)
                         for cb in walks[j]})
        out[p["phase"]] = Background(own, near, tuple(causes))
    return out


def walk_bound(model: int, bg: Background) -> tuple[int, int]:
    """``kvm_pgtable_walk`` calls: the model's plus the phase's own age walks."""
    return model + bg.own, model + bg.own


def loop_bound(model: int, bg: Background, levels: int) -> tuple[int, int]:
    """``__kvm_pgtable_walk`` calls (``levels`` = 1 for one ``level=`` key)."""
    return model, model + bg.near * levels


def note(bg: Background) -> str:
    own = f"{bg.own} background walk(s) in this phase" if bg.own else \
        "no background walk counted in this phase"
    return (f"{own}, {bg.near} in it and its neighbours ({', '.join(bg.causes)}): "
            f"kvm_pgtable_walk = model + {bg.own}; __kvm_pgtable_walk in [model, model + "
            f"{bg.near} per level]")
