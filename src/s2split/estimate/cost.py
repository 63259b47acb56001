"""The cost model: counts -> estimated nanoseconds under a named hardware profile.

A profile is a data file (``s2split/estimate/profiles/*.json``, or any JSON file given
by path) holding the CPU features that decide which maintenance happens and a
unit cost per counter. The estimate of a phase is the sum over its counts of
count x unit cost; the unit cost of ``(op, kind, level)`` is the most specific
of ``op:kind@level``, ``op:kind``, ``kind@level``, ``kind`` present in the
profile (0 otherwise). Every time computed here is an **estimate under a
profile**, never a measurement; reports say so next to each number.

A profile may also give each cost key a plausible range (``ranges_ns``:
``key: [low, high]``, low <= point <= high) and where its value comes from
(``provenance_by_key``). A key without a range is taken as exact (its point
value), so older profiles load unchanged; a profile that inherits a key's cost
inherits its range and provenance too, unless it sets the cost again (its own
point, then its own range or none). :mod:`s2split.estimate.intervals` turns the ranges
into exact intervals of every saving.

A profile's ``memory_hierarchy`` section (:mod:`s2split.arm64.hierarchy`) gives
the unit costs ``hit_l1`` .. ``hit_dram`` from its ``latency_ns`` (a
profile's own ``hit_*`` keys override them): each entry read is then priced
once by its ``read_*`` key (the instructions) and once by the class its line
hits -- the two are separate counts of the same read, never the same cost
twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..arm64.features import Features
from ..arm64.hierarchy import Hierarchy, parse_memory_hierarchy
from ..counting.counters import (HIT_KINDS, KIND, KINDS, NKINDS, NOPS, OP, OPS, SLOTS, slot,
                                 slot_level)
from ..counting.counts import Counts
from ..plumbing.errors import S2Error
from ..selftest import phases

PROFILE_FORMAT = "s2split-profile/1"
DEFAULT_PROFILE = "server-vhe"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    provenance: str
    features: Features
    unit_costs_ns: dict[str, float]
    notes: tuple[str, ...] = ()
    source: str = ""
    ranges_ns: dict[str, tuple[float, float]] = field(default_factory=dict)
    provenance_by_key: dict[str, str] = field(default_factory=dict)
    memory_hierarchy: Hierarchy | None = None
    _array: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore
    _gov: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore

    def __post_init__(self) -> None:
        keys = list(self.unit_costs_ns)
        values = np.array([self.unit_costs_ns[k] for k in keys] + [0.0])
        gov = governing_keys(keys, self.name)
        # A cell no key prices indexes -1: the 0.0 appended.
        object.__setattr__(self, "_array", values[gov])
        object.__setattr__(self, "_gov", gov)

    @property
    def array(self) -> np.ndarray:
        return self._array

    @property
    def keys(self) -> list[str]:
        """The cost keys, in the order of :meth:`coefficients` and :meth:`bounds`."""
        return list(self.unit_costs_ns)

    def coefficients(self, counts: Counts) -> np.ndarray:
        """Per cost key, the count it multiplies in :meth:`estimate_ns`: the
        estimate is ``coefficients(counts) @ point`` (a linear form in the costs)."""
        gov = self._gov.reshape(-1)
        priced = gov >= 0
        return np.bincount(gov[priced], weights=counts.array.reshape(-1)[priced].astype(float),
                           minlength=len(self.unit_costs_ns))

    def bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(low, point, high)`` per cost key; a key without a range has
        low = point = high. A range that misses its point (only a profile made
        in code can have one: files are checked, :func:`check_ranges`, e.g. a
        ``dataclasses.replace`` of the costs) is widened to hold it."""
        point = np.array([self.unit_costs_ns[k] for k in self.unit_costs_ns], dtype=float)
        low, high = point.copy(), point.copy()
        for i, k in enumerate(self.unit_costs_ns):
            if k in self.ranges_ns:
                lo, hi = self.ranges_ns[k]
                low[i], high[i] = min(lo, point[i]), max(hi, point[i])
        return low, point, high

    def unit_cost(self, op: str, kind: str, level: int | None) -> float:
        return float(self._array[OP[op], KIND[kind], slot(level)])

    def estimate_ns(self, counts: Counts) -> float:
        return float((counts.array * self._array).sum())

    def breakdown_ns(self, counts: Counts) -> dict[tuple[str, str, int | None], float]:
        """Estimated ns per ``(op, kind, level)`` with a non-zero share."""
        prod = counts.array * self._array
        return {(OPS[o], KINDS[k], slot_level(int(s))): float(prod[o, k, s])
                for o, k, s in zip(*np.nonzero(prod))}

    def to_json(self) -> dict:
        out = {"format": PROFILE_FORMAT, "name": self.name, "description": self.description,
               "provenance": self.provenance, "features": vars(self.features) | {},
               "unit_costs_ns": dict(self.unit_costs_ns), "notes": list(self.notes)}
        if self.ranges_ns:
            out["ranges_ns"] = {k: list(v) for k, v in self.ranges_ns.items()}
        if self.provenance_by_key:
            out["provenance_by_key"] = dict(self.provenance_by_key)
        if self.memory_hierarchy:
            out["memory_hierarchy"] = self.memory_hierarchy.to_json()
        return out


def check_ranges(costs: dict[str, float], ranges: dict[str, tuple[float, float]],
                 provenance: dict[str, str], where: str) -> None:
    """Every range and provenance names a cost key of the profile, and every
    range holds its point value: ``low <= point <= high`` (one-line errors)."""
    for k, (low, high) in ranges.items():
        if k not in costs:
            raise S2Error(f"profile {where!r}: ranges_ns names {k!r}, which has no unit cost "
                          "(add it to unit_costs_ns)")
        if not low <= costs[k] <= high:
            raise S2Error(f"profile {where!r}: ranges_ns[{k!r}] = [{low:g}, {high:g}] does not "
                          f"hold its unit cost {costs[k]:g} (need low <= cost <= high)")
    for k in provenance:
        if k not in costs:
            raise S2Error(f"profile {where!r}: provenance_by_key names {k!r}, which has no "
                          "unit cost")


def governing_keys(keys: list[str], where: str) -> np.ndarray:
    """For every ``(op, kind, level)`` cell, the index in ``keys`` of the key
    that prices it -- the most specific of ``op:kind@level``, ``op:kind``,
    ``kind@level``, ``kind`` -- or -1. The one rule for estimates and
    calibration alike."""
    gov = np.full((NOPS, NKINDS, SLOTS), -1, dtype=np.int64)
    # Least specific first, so that more specific keys overwrite.
    for i in sorted(range(len(keys)), key=lambda i: (":" in keys[i], "@" in keys[i])):
        op, kind, level = parse_cost_key(keys[i], where)
        gov[OP[op] if op else slice(None), KIND[kind],
            slot(level) if level is not None else slice(None)] = i
    return gov


def parse_cost_key(key: str, profile: str) -> tuple[str | None, str, int | None]:
    """A unit-cost key ``[op:]kind[@level]`` as ``(op or None, kind, level or
    None)``; an unknown operation, counter or level is a one-line error naming
    PROFILE (or the option the key came from)."""
    op, _, rest = key.rpartition(":")
    kind, _, level = rest.partition("@")
    if op and op not in OP:
        raise S2Error(f"profile {profile!r}: unknown operation {op!r} in key {key!r}")
    if kind not in KIND:
        raise S2Error(f"profile {profile!r}: unknown counter {kind!r} in key {key!r}")
    lv = None
    if level:
        try:
            lv = int(level)
        except ValueError:
            raise S2Error(f"profile {profile!r}: bad level in key {key!r}") from None
        if not -1 <= lv <= 3:
            raise S2Error(f"profile {profile!r}: level {lv} out of range in key {key!r}")
    return op or None, kind, lv


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".json")
                  for p in resources.files("s2split.estimate.profiles").iterdir()
                  if p.name.endswith(".json"))


def _read(name_or_path: str) -> tuple[dict, str]:
    from ..storage.schemas import PROFILE
    from ..plumbing.validate import check, loads, read_json
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.exists():
        if not path.exists():
            raise S2Error(f"profile file {name_or_path} does not exist")
        data, source = read_json(path, "profile", invalid="not readable JSON"), str(path)
    else:
        res = resources.files("s2split.estimate.profiles").joinpath(f"{name_or_path}.json")
        if not res.is_file():
            raise S2Error(f"unknown profile {name_or_path!r}: choose from "
                          f"{', '.join(builtin_profiles())} or give a profile file")
        source = f"builtin:{name_or_path}"
        data = loads(res.read_text(encoding="utf-8"), source)
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise S2Error(f"{source}: not an s2split profile (format must be {PROFILE_FORMAT!r})")
    check(data, PROFILE, f"{source}: malformed profile")
    return data, source


#: The longest ``inherits`` chain a profile may have (the built-in profiles
#: use one or two links; the limit keeps a generated chain from exhausting
#: Python's recursion limit).
MAX_INHERITANCE_DEPTH = 32


def _identity(source: str) -> str:
    return source if source.startswith("builtin:") else str(Path(source).resolve())


def load_profile(name_or_path: str | None = None, _chain: tuple[str, ...] = ()) -> Profile:
    """A built-in profile by name, or a profile file by path. Files are checked
    against :data:`s2split.storage.schemas.PROFILE`; an ``inherits`` chain that comes
    back to a profile already in it is an error, not a recursion."""
    data, source = _read(name_or_path or DEFAULT_PROFILE)
    chain = (*_chain, _identity(source))
    if len(chain) > MAX_INHERITANCE_DEPTH:
        raise S2Error(f"{chain[0]}: inherits through more than {MAX_INHERITANCE_DEPTH} "
                      f"profiles (the limit of an inheritance chain; last: {source})")
    costs: dict[str, float] = {}
    ranges: dict[str, tuple[float, float]] = {}
    prov: dict[str, str] = {}
    feats = Features()
    hierarchy: Hierarchy | None = None
    if data.get("inherits"):
        parent = str(data["inherits"])
        if not source.startswith("builtin:") and (parent.endswith(".json") or "/" in parent):
            parent = str(Path(source).parent / parent)  # relative to this file
        try:
            parent_id = _identity(_read(parent)[1])
        except S2Error as e:
            raise S2Error(f"{source}: inherits {data['inherits']!r}: {e}") from None
        if parent_id in chain:
            loop = " -> ".join([*chain, parent_id])
            raise S2Error(f"{source}: inherits: inheritance cycle {loop}")
        base = load_profile(parent, chain)
        costs.update(base.unit_costs_ns)
        ranges.update(base.ranges_ns)
        prov.update(base.provenance_by_key)
        feats = base.features
        hierarchy = base.memory_hierarchy
    if "memory_hierarchy" in data:
        hierarchy = parse_memory_hierarchy(data["memory_hierarchy"], source)
        costs.update(hierarchy_costs(hierarchy))
    for k, v in data.get("unit_costs_ns", {}).items():
        costs[k] = float(v)  # the schema: non-negative numbers, finite as parsed
        # A cost set again: the parent's range and provenance were about its value.
        ranges.pop(k, None)
        prov.pop(k, None)
    for k, (low, high) in data.get("ranges_ns", {}).items():
        ranges[k] = (float(low), float(high))
    prov.update({k: str(v) for k, v in data.get("provenance_by_key", {}).items()})
    feats = Features(**{**vars(feats), **data.get("features", {})})
    try:
        check_ranges(costs, ranges, prov, str(data["name"]))
    except S2Error as e:
        raise S2Error(f"{source}: {e}") from None
    return Profile(str(data["name"]), str(data.get("description", "")),
                   str(data.get("provenance", "")), feats, costs,
                   tuple(data.get("notes", ())), source, ranges, prov, hierarchy)



def hierarchy_costs(h: Hierarchy) -> dict[str, float]:
    """The unit costs ``hit_l1`` .. ``hit_dram`` a ``memory_hierarchy``
    gives: its cost per read of each class. The pricing of an entry read is
    then ``read_*`` (its instructions) + ``hit_*`` (where it hits), each
    read counted once in each; a profile's own ``hit_*`` keys override."""
    return dict(zip(HIT_KINDS, h.latency_ns))


def format_ms(ns: float) -> str:
    """An estimate in milliseconds, to 0.1 ms from 10 ms up, to 1 us below."""
    return f"{ns / 1e6:,.1f} ms" if ns >= 1e7 else f"{ns / 1e6:,.3f} ms"


def format_seconds(ns: float) -> str:
    """``S.NNNNNNNNNs`` as the selftest prints times."""
    return phases.format_seconds(int(round(ns)))
