"""Counts of work: the reference engine's live :class:`Tally` and the
:class:`Counts` both engines produce per phase, over the ids of
:mod:`s2split.counting.counters`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .counters import (KIND, KINDS, NKINDS, NOPS, OP, OPS, SLOTS, slot,
                       slot_level)


class Tally:
    """The reference engine's live counters: one flat list per operation.

    Hot paths hold ``tally.ops[op]`` and add at ``kind * SLOTS + level + 1``.
    """

    __slots__ = ("ops", "on_take")

    def __init__(self) -> None:
        self.ops: list[list[int]] = [[0] * (NKINDS * SLOTS) for _ in OPS]
        #: Called when a phase's counts are taken (the table memory empties
        #: the model's caches then: s2split.arm64.hierarchy).
        self.on_take: Callable[[], None] | None = None

    def snapshot(self) -> "Counts":
        return Counts(np.array(self.ops, dtype=np.int64).reshape(NOPS, NKINDS, SLOTS))

    def reset(self) -> None:
        for row in self.ops:
            row[:] = [0] * len(row)

    def take(self) -> "Counts":
        """Snapshot and reset: the counts of the phase that just ended."""
        c = self.snapshot()
        self.reset()
        if self.on_take is not None:
            self.on_take()
        return c


@dataclass(frozen=True, eq=False)
class Counts:
    """An immutable block of counts (one phase of one run)."""

    array: np.ndarray  # shape (NOPS, NKINDS, SLOTS), int64

    @classmethod
    def zeros(cls) -> "Counts":
        return cls(np.zeros((NOPS, NKINDS, SLOTS), dtype=np.int64))

    @classmethod
    def from_flat(cls, flat: np.ndarray) -> "Counts":
        return cls(np.asarray(flat, dtype=np.int64).reshape(NOPS, NKINDS, SLOTS).copy())

    def get(self, op: str, kind: str, level: int | None = None) -> int:
        return int(self.array[OP[op], KIND[kind], slot(level)])

    def total(self, kind: str, ops: Iterable[str] | None = None) -> int:
        k = KIND[kind]
        if ops is None:
            return int(self.array[:, k, :].sum())
        return int(sum(self.array[OP[o], k, :].sum() for o in ops))

    def op_total(self, op: str, kind: str) -> int:
        return int(self.array[OP[op], KIND[kind], :].sum())

    def by_level(self, op: str | None, kind: str) -> dict[int | None, int]:
        k = KIND[kind]
        row = self.array[:, k, :].sum(axis=0) if op is None else self.array[OP[op], k, :]
        return {slot_level(s): int(v) for s, v in enumerate(row) if v}

    def entries_read(self, op: str | None = None) -> int:
        kinds = ("read_table", "read_leaf", "read_invalid")
        return sum(self.op_total(op, k) if op else self.total(k) for k in kinds)

    def visitor_calls(self, op: str | None = None) -> int:
        kinds = ("visit_leaf", "visit_pre", "visit_post")
        return sum(self.op_total(op, k) if op else self.total(k) for k in kinds)

    def tlbi_calls(self) -> int:
        """Stage-2 TLB invalidation calls of every kind (by IPA, local, range, VMID)."""
        return sum(self.total(k) for k in ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range",
                                           "tlbi_vmid"))

    def items(self) -> Iterator[tuple[str, str, int | None, int]]:
        for o, k, s in zip(*np.nonzero(self.array)):
            yield OPS[o], KINDS[k], slot_level(int(s)), int(self.array[o, k, s])

    def to_dict(self) -> dict[str, int]:
        """Sparse, JSON-friendly: ``"split/read_leaf/3": 512`` (``-`` for no level)."""
        return {f"{o}/{k}/{'-' if lv is None else lv}": v for o, k, lv, v in self.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> "Counts":
        arr = np.zeros((NOPS, NKINDS, SLOTS), dtype=np.int64)
        for key, value in data.items():
            o, k, lv = key.split("/")
            arr[OP[o], KIND[k], slot(None if lv == "-" else int(lv))] = int(value)
        return cls(arr)

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.array + other.array)

    def __sub__(self, other: "Counts") -> "Counts":
        return Counts(self.array - other.array)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Counts) and bool(np.array_equal(self.array, other.array))

    __hash__ = None  # type: ignore[assignment]  # equal by value, and mutable inside

    def diff(self, other: "Counts") -> list[tuple[str, str, int | None, int, int]]:
        """Entries that differ: ``(op, kind, level, self, other)``."""
        out = []
        for o, k, s in zip(*np.nonzero(self.array != other.array)):
            out.append((OPS[o], KINDS[k], slot_level(int(s)),
                        int(self.array[o, k, s]), int(other.array[o, k, s])))
        return out


def sum_counts(items: Iterable[Counts]) -> Counts:
    total = Counts.zeros()
    for c in items:
        total = total + c
    return total
