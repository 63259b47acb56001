"""A scenario's syscalls split into the first split and the steady state.

The ``clear`` scenario times every iteration's ``KVM_CLEAR_DIRTY_LOG``: the
first one write-protects *and splits* every huge page (eager splitting), the
later ones find the tables built and only walk them again. A variant that
skips levels the split walk no longer needs therefore saves a different share
of each, and the share of the total depends on how many iterations ``-i``
runs. ``enable`` has one syscall (enabling dirty logging splits everything),
so its total does not depend on ``-i``.

Each part's saving is given twice: as a share of the part's own estimated
time, and in points of the scenario's total; the points of the parts add up
to the total saving exactly (both are linear in the counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..counting.counts import Counts, sum_counts
from ..estimate.cost import format_ms as _ms
from ..estimate.intervals import Interval, saving_interval
from .reproduce import syscall_phases


@dataclass(frozen=True)
class Part:
    name: str  # "first CLEAR", "steady-state CLEARs", "enable"
    phases: tuple[str, ...]
    vanilla_ns: float
    variant_ns: float
    own: Interval | None  # the saving as a share of this part's own time
    points: float  # the saving in points of the scenario's total
    tables_built: int = 0  # table pages vanilla takes in this part (0: nothing split)

    @property
    def calls(self) -> int:
        return len(self.phases)


def parts_of(scenario: str, iterations: int) -> list[tuple[str, tuple[str, ...]]]:
    phases = syscall_phases(scenario, iterations)
    if scenario == "enable":
        return [("enable", tuple(phases))]
    return [("first CLEAR", (phases[0],)), ("steady-state CLEARs", tuple(phases[1:]))]


def split_parts(profile, scenario: str, iterations: int, vanilla: dict[str, Counts],
                variant: dict[str, Counts]) -> list[Part]:
    """The parts of one cell (phase name -> counts, for vanilla and a variant)."""
    parts = parts_of(scenario, iterations)
    total = sum(profile.estimate_ns(vanilla[ph]) for _, phs in parts for ph in phs)
    out = []
    for name, phs in parts:
        base = sum_counts(vanilla[ph] for ph in phs)
        other = sum_counts(variant[ph] for ph in phs)
        b, v = profile.estimate_ns(base), profile.estimate_ns(other)
        out.append(Part(name, phs, b, v, saving_interval(profile, base, other),
                        100.0 * (b - v) / total if total else 0.0, base.total("page_taken")))
    return out


def steady_repeats(vanilla: dict[str, Counts], variant: dict[str, Counts],
                   phases: tuple[str, ...]) -> bool | None:
    """Whether every steady-state CLEAR does the same work as the second, in
    both; None when there is only one (nothing to compare)."""
    if len(phases) < 2:
        return None
    return all(c[ph].array.tolist() == c[phases[0]].array.tolist()
               for c in (vanilla, variant) for ph in phases[1:])


def at_iterations(parts: list[Part], n: int) -> float | None:
    """The clear scenario's total saving at ``-i n``, extrapolated from the
    first CLEAR and the mean steady-state CLEAR of these parts (exact when
    every later CLEAR repeats the steady one)."""
    if len(parts) != 2 or not parts[1].calls or n < 2:
        return None
    first, steady = parts
    k = (n - 1) / steady.calls
    base = first.vanilla_ns + k * steady.vanilla_ns
    return 100.0 * (base - first.variant_ns - k * steady.variant_ns) / base if base else None


def sentence(scenario: str, iterations: int, parts: list[Part], profile_name: str,
             repeats: bool | None = None) -> str:
    """The parts in words, and how the total depends on ``-i``."""
    from ..estimate.intervals import fmt_interval

    def own(p: Part) -> str:
        return fmt_interval(p.own.point, p.own.low, p.own.high) if p.own else "n/a"
    if scenario == "enable":
        return (f"Enabling dirty logging splits every huge page in one ioctl: its saving "
                f"({own(parts[0])}) does not depend on -i (profile {profile_name}, estimate).")
    first, steady = parts
    total = first.points + steady.points
    what = f"which splits, building {first.tables_built:,} table pages" if \
        first.tables_built else "nothing to split on this backing"
    text = (f"Of the {total:.1f}% saved over {iterations} KVM_CLEAR_DIRTY_LOG calls (-i "
            f"{iterations}), the first CLEAR ({what}) gives {first.points:.1f} points "
            f"(it saves {own(first)} of its own {_ms(first.vanilla_ns)}) and the "
            f"{steady.calls} steady-state CLEAR(s) {steady.points:.1f} points (saving "
            f"{own(steady)} of their {_ms(steady.vanilla_ns)}). The total depends on -i")
    far = at_iterations(parts, 10)
    if far is not None and iterations != 10:
        how = "as every later CLEAR repeats the steady one here" if repeats else \
            "if every later CLEAR repeats the steady one"
        text += f": extrapolated to -i 10 it would be {far:.1f}% ({how})"
    return text + f" (profile {profile_name}, estimates)."


__all__ = ["Part", "parts_of", "split_parts", "steady_repeats", "at_iterations", "sentence"]
