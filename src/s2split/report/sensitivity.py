"""What moves each saving: the costs that decide it over their ranges.

A variant's saving in a cell is ``100 (1 - (v . c) / (b . c))`` in the unit
costs ``c`` (:mod:`s2split.estimate.intervals`). Over the box of the profile's cost
ranges it lies in an exact interval; this module says *which* costs move it
there, two ways:

* **Sobol total indices** (``SALib``, Saltelli sampling with a fixed seed, so
  a report is reproducible): each ranged cost's share of the saving's variance
  when every cost is drawn uniformly from its range, interactions included.
  They are estimates of a global measure (the JSON gives their bootstrap
  confidence); the interval itself is exact.
* **Active bounds**: at the interval's two ends (vertices of the box), where
  the most influential costs sit -- the direction in which each moves the
  saving.

Only costs some count of the cell multiplies, and whose range has a width,
are drawn; a saving no ranged cost moves is exact under the profile and said
so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..counting.counts import Counts
from ..estimate.intervals import Interval, saving_interval

#: Base samples of Saltelli's scheme (a power of two, as Sobol' sequences
#: want); evaluations are N (D + 2) dot products, cheap.
SAMPLES = 512
SEED = 20240522

#: How a cost key reads in a sentence (others read as the key itself).
KEY_WORDS = {
    "split:visit_leaf": "the split visitor's cost",
    "wrprotect:visit_leaf": "the write-protect visitor's cost",
    "create_unlinked:visit_leaf": "the cost of the visitor that builds new tables",
    "read_leaf@3": "the level-3 entry read's instructions",
    "read_invalid@3": "the level-3 invalid-entry read",
    "read_leaf": "an entry read (levels 0-2)",
    "read_table": "a table-entry read",
    "reload": "an entry re-read",
    "loops": "a table loop",
    "descent": "a descent",
    "dsb_ish": "DSB ISH",
    "tlbi_ipa": "a by-IPA TLBI",
    "tlbi_range_ops": "a range TLBI",
    "page_taken": "taking a table page",
    "get_page": "a page reference",
    "pte_write": "an entry store",
    "bitmap_words": "a dirty-bitmap word",
    "log_dirty_masked": "a masked write-protect call",
    "ioctls": "the ioctl's fixed cost",
    "walks": "a walk's set-up",
    "cache_pages_alloc": "a page allocated into a memory cache",
    "hit_l1": "an entry read's line in L1",
    "hit_l2": "an entry read's line in L2",
    "hit_llc": "an entry read's line in the last-level cache",
    "hit_dram": "an entry read's line from DRAM",
}


def key_words(key: str) -> str:
    return f"{KEY_WORDS[key]} ({key})" if key in KEY_WORDS else key


@dataclass
class Sensitivity:
    """One cell's saving, its exact interval and what moves it."""

    interval: Interval | None
    keys: list[str] = field(default_factory=list)  # ranged costs the cell uses
    total_index: dict[str, float] = field(default_factory=dict)  # Sobol S_T
    total_conf: dict[str, float] = field(default_factory=dict)  # its 95% half-width
    at_low: dict[str, str] = field(default_factory=dict)  # key -> "low"/"high" bound
    at_high: dict[str, str] = field(default_factory=dict)

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(self.total_index.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def analyse(base: Counts, other: Counts, profile) -> Sensitivity:
    """The sensitivity of ``other``'s saving against ``base`` (one cell)."""
    iv = saving_interval(profile, base, other)
    if iv is None:
        return Sensitivity(None)
    b, v = profile.coefficients(base), profile.coefficients(other)
    low, _, high = profile.bounds()
    idx = [i for i in range(len(b)) if (b[i] or v[i]) and high[i] > low[i]]
    keys = profile.keys
    out = Sensitivity(iv, [keys[i] for i in idx])
    if not idx or iv.width <= 0:
        return out
    for i in idx:
        out.at_low[keys[i]] = "low" if iv.low_costs[i] == low[i] else "high"
        out.at_high[keys[i]] = "low" if iv.high_costs[i] == low[i] else "high"
    from SALib.analyze import sobol as sobol_analyze
    from SALib.sample import sobol as sobol_sample
    problem = {"num_vars": len(idx), "names": out.keys,
               "bounds": [[float(low[i]), float(high[i])] for i in idx]}
    x = sobol_sample.sample(problem, SAMPLES, calc_second_order=False, seed=SEED)
    # The costs not drawn stay at their point (a constant part of each form).
    c0 = np.array([profile.unit_costs_ns[k] for k in keys], dtype=float)
    fixed = np.ones(len(b), dtype=bool)
    fixed[idx] = False
    bb = x @ b[idx] + float(b[fixed] @ c0[fixed])
    vv = x @ v[idx] + float(v[fixed] @ c0[fixed])
    y = 100.0 * (1.0 - vv / bb)
    res = sobol_analyze.analyze(problem, y, calc_second_order=False, num_resamples=100,
                                conf_level=0.95, seed=SEED, print_to_console=False)
    for k, st, conf in zip(out.keys, res["ST"], res["ST_conf"]):
        # A variance-based index is >= 0; tiny negative values are sampling noise.
        out.total_index[k] = max(0.0, float(st))
        out.total_conf[k] = float(conf)
    return out


def statement(s: Sensitivity, profile_name: str) -> str:
    """One sentence: the interval, and the costs that move the saving most."""
    iv = s.interval
    if iv is None:
        return "no saving to speak of: vanilla's estimate can be zero."
    head = f"the saving ({iv.point:.1f}%) lies in {iv.low:.1f}-{iv.high:.1f}%"
    if iv.width <= 0 or not s.total_index:
        return (f"the saving ({iv.point:.1f}%) is exact under profile {profile_name}: no cost "
                "with a range moves it.")
    top = s.top(3)
    lead, rest = top[0], top[1:]

    def direction(k: str) -> str:
        return "grows" if s.at_high[k] == "high" else "falls"
    text = (f"{head}; {100 * lead[1]:.0f}% of its variance over the cost ranges involves "
            f"{key_words(lead[0])} (Sobol total index {lead[1]:.2f}; the saving "
            f"{direction(lead[0])} with it)")
    if rest:
        text += ", then " + ", ".join(f"{key_words(k)} ({st:.2f}, it {direction(k)})"
                                      for k, st in rest)
    return text + f" (profile {profile_name}; {len(s.keys)} ranged costs drawn)."


def to_json(s: Sensitivity) -> dict:
    iv = s.interval
    return {"saved_pct": iv.point if iv else None, "low_pct": iv.low if iv else None,
            "high_pct": iv.high if iv else None, "ranged_keys": s.keys,
            "sobol_total": s.total_index, "sobol_total_conf95": s.total_conf,
            "bounds_at_low": s.at_low, "bounds_at_high": s.at_high,
            "sobol": {"samples": SAMPLES, "seed": SEED, "method": "Saltelli sampling, "
                      "Sobol total indices (SALib), costs uniform over their ranges"}}


__all__ = ["Sensitivity", "analyse", "statement", "to_json", "key_words"]
