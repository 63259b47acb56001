"""The cost model: counts -> estimated nanoseconds under a named hardware profile.

A profile is a data file (``s2split/profiles/*.json``, or any JSON file given
by path) holding the CPU features that decide which maintenance happens and a
unit cost per counter. The estimate of a phase is the sum over its counts of
count x unit cost; the unit cost of ``(op, kind, level)`` is the most specific
of ``op:kind@level``, ``op:kind``, ``kind@level``, ``kind`` present in the
profile (0 otherwise). Every time computed here is an **estimate under a
profile**, never a measurement; reports say so next to each number.

A profile's ``memory_hierarchy`` section (:mod:`s2split.hierarchy`) gives
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

from .counters import HIT_KINDS, KIND, KINDS, NKINDS, NOPS, OP, OPS, SLOTS, slot, slot_level
from .counts import Counts
from . import phases
from .errors import S2Error
from .features import Features
from .hierarchy import Hierarchy, parse_memory_hierarchy

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
    memory_hierarchy: Hierarchy | None = None
    _array: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore

    def __post_init__(self) -> None:
        keys = list(self.unit_costs_ns)
        values = np.array([self.unit_costs_ns[k] for k in keys] + [0.0])
        # A cell no key prices indexes -1: the 0.0 appended.
        object.__setattr__(self, "_array", values[governing_keys(keys, self.name)])

    @property
    def array(self) -> np.ndarray:
        return self._array

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
        return {"format": PROFILE_FORMAT, "name": self.name, "description": self.description,
                "provenance": self.provenance, "features": vars(self.features) | {},
                "unit_costs_ns": dict(self.unit_costs_ns), "notes": list(self.notes)} | \
            ({"memory_hierarchy": self.memory_hierarchy.to_json()}
             if self.memory_hierarchy else {})


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
                  for p in resources.files("s2split.profiles").iterdir()
                  if p.name.endswith(".json"))


def _read(name_or_path: str) -> tuple[dict, str]:
    from .schemas import PROFILE
    from .validate import check, loads, read_json
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.exists():
        if not path.exists():
            raise S2Error(f"profile file {name_or_path} does not exist")
        data, source = read_json(path, "profile", invalid="not readable JSON"), str(path)
    else:
        res = resources.files("s2split.profiles").joinpath(f"{name_or_path}.json")
        if not res.is_file():
            raise S2Error(f"unknown profile {name_or_path!r}: choose from "
                          f"{', '.join(builtin_profiles())} or give a profile file")
        source = f"builtin:{name_or_path}"
        data = loads(res.read_text(encoding="utf-8"), source)
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise S2Error(f"{source}: not an s2split profile (format must be {PROFILE_FORMAT!r})")
    check(data, PROFILE, f"{source}: malformed profile")
    return data, source


def _identity(source: str) -> str:
    return source if source.startswith("builtin:") else str(Path(source).resolve())


def load_profile(name_or_path: str | None = None, _chain: tuple[str, ...] = ()) -> Profile:
    """A built-in profile by name, or a profile file by path. Files are checked
    against :data:`s2split.schemas.PROFILE`; an ``inherits`` chain that comes
    back to a profile already in it is an error, not a recursion."""
    data, source = _read(name_or_path or DEFAULT_PROFILE)
    chain = (*_chain, _identity(source))
    costs: dict[str, float] = {}
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
        feats = base.features
        hierarchy = base.memory_hierarchy
    if "memory_hierarchy" in data:
        hierarchy = parse_memory_hierarchy(data["memory_hierarchy"], source)
        costs.update(hierarchy_costs(hierarchy))
    for k, v in data.get("unit_costs_ns", {}).items():
        costs[k] = float(v)  # the schema: non-negative numbers, finite as parsed
    feats = Features(**{**vars(feats), **data.get("features", {})})
    return Profile(str(data["name"]), str(data.get("description", "")),
                   str(data.get("provenance", "")), feats, costs,
                   tuple(data.get("notes", ())), source, hierarchy)


def hierarchy_costs(h: Hierarchy) -> dict[str, float]:
    """The unit costs ``hit_l1`` .. ``hit_dram`` a ``memory_hierarchy``
    gives: its cost per read of each class. The pricing of an entry read is
    then ``read_*`` (its instructions) + ``hit_*`` (where it hits), each
    read counted once in each; a profile's own ``hit_*`` keys override."""
    return dict(zip(HIT_KINDS, h.latency_ns))


def format_seconds(ns: float) -> str:
    """``S.NNNNNNNNNs`` as the selftest prints times."""
    return phases.format_seconds(int(round(ns)))
