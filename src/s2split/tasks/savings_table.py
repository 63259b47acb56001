"""Tables of relative savings, as patch series publish them, read for
``s2split calibrate --savings`` and ``--predict``.

One row per saving: ``scenario`` (clear / enable), ``backing`` (regular /
thp / hugetlb), ``granule`` (4K / 16K / 64K, or ``avg``: the mean over the
three granules of the per-granule savings, as ``reproduce`` prints it),
``variant``, ``saved_pct`` (optional in a prediction table), and optionally
``stderr_pct`` or ``runs``, ``size`` and ``chunk_size`` (defaults:
``reproduce``'s). A CSV file with a header, or JSON: a list of objects (or
``{"rows": [...]}``). Every error names the file and the row, in one line.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arm64.arch import GRANULES, granule_name, parse_granule
from ..plumbing.errors import S2Error
from ..selftest.sizes import parse_size
from .reproduce import BACKINGS, SCENARIOS

AVG = "avg"
#: The granules an ``avg`` row averages, in the order ``reproduce`` sums them.
ALL_GRANULES = tuple(sorted(GRANULES))
DEFAULT_SIZE = 64 << 30  # reproduce's --size
REQUIRED = ("scenario", "backing", "granule", "variant")
OPTIONAL = ("saved_pct", "stderr_pct", "runs", "size", "chunk_size")


@dataclass(frozen=True)
class SavingsRow:
    """One published (or wanted) saving of a variant against vanilla."""

    scenario: str
    backing: str
    granule: int | str  # bytes, or AVG
    variant: str
    saved_pct: float | None
    stderr_pct: float | None
    runs: int | None
    size: int
    chunk: int | None  # None: the PMD block size of each granule, as reproduce
    where: str  # "file:line" or "file: row i", for messages
    printed_unit: float | None = None  # the last printed digit of saved_pct, e.g. 0.1

    @property
    def granules(self) -> tuple[int, ...]:
        return ALL_GRANULES if self.granule == AVG else (int(self.granule),)

    @property
    def granule_label(self) -> str:
        return AVG if self.granule == AVG else granule_name(int(self.granule))

    def identity(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "backing": self.backing,
                "granule": self.granule_label, "variant": self.variant}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        raise ValueError(value)
    return value.strip() if isinstance(value, str) else repr(value)


def _number(value: Any, what: str, where: str) -> tuple[float, float | None]:
    """A finite number and the unit of its last printed digit."""
    text = _text(value)
    try:
        x = float(text)
    except ValueError:
        raise S2Error(f"{where}: {what} {value!r} is not a number") from None
    if not math.isfinite(x):
        raise S2Error(f"{where}: {what} {value!r} is not a finite number")
    m = re.fullmatch(r"[+-]?\d*(?:\.(\d*))?", text)
    unit = 10.0 ** -len(m.group(1) or "") if m else None
    return x, unit


#: The range of a standard error, in percentage points: finer than any
#: published figure's rounding at the bottom (smaller ones overflow the fit's
#: squared residuals), and larger than any saving's whole range at the top.
MIN_STDERR_PCT = 1e-6
MAX_STDERR_PCT = 1e3


def _row(raw: dict[str, Any], where: str, need_saved: bool) -> SavingsRow:
    from ..model.pgtable.variants import get as get_variant
    missing = [c for c in REQUIRED + (("saved_pct",) if need_saved else ())
               if _text(raw.get(c)) == ""]
    if missing:
        raise S2Error(f"{where}: no {', '.join(missing)}")
    scenario = _text(raw["scenario"]).lower()
    if scenario not in SCENARIOS:
        raise S2Error(f"{where}: unknown scenario {raw['scenario']!r}: choose from "
                      f"{', '.join(SCENARIOS)}")
    backing = _text(raw["backing"]).lower()
    if backing not in BACKINGS:
        raise S2Error(f"{where}: unknown backing {raw['backing']!r}: choose from "
                      f"{', '.join(BACKINGS)}")
    gtext = _text(raw["granule"])
    granule: int | str
    if gtext.lower() == AVG:
        granule = AVG
    else:
        try:
            granule = parse_granule(gtext)
        except S2Error:
            raise S2Error(f"{where}: unknown granule {raw['granule']!r}: choose from 4K, 16K, "
                          "64K, avg") from None
    variant = _text(raw["variant"])
    try:
        get_variant(variant)
    except S2Error as e:
        raise S2Error(f"{where}: {e}") from None
    if variant == "vanilla":
        raise S2Error(f"{where}: variant vanilla: savings are against vanilla")
    saved = unit = None
    if _text(raw.get("saved_pct")) != "":
        saved, unit = _number(raw["saved_pct"], "saved_pct", where)
        if not -100 < saved < 100:
            raise S2Error(f"{where}: saved_pct {saved:g} is outside (-100, 100)")
    stderr = None
    if _text(raw.get("stderr_pct")) != "":
        stderr, _ = _number(raw["stderr_pct"], "stderr_pct", where)
        if not MIN_STDERR_PCT <= stderr <= MAX_STDERR_PCT:
            raise S2Error(f"{where}: stderr_pct must be between {MIN_STDERR_PCT:g} and "
                          f"{MAX_STDERR_PCT:g} percentage points, got {stderr:g}")
    runs = None
    if _text(raw.get("runs")) != "":
        r, _ = _number(raw["runs"], "runs", where)
        if r != int(r) or r < 1:
            raise S2Error(f"{where}: runs must be a positive integer, got {raw['runs']!r}")
        runs = int(r)
    size = DEFAULT_SIZE
    if _text(raw.get("size")) != "":
        size = parse_size(_text(raw["size"]), f"{where}: size")
        if size <= 0:
            raise S2Error(f"{where}: size must be positive")
    chunk = None
    if _text(raw.get("chunk_size")) != "":
        chunk = parse_size(_text(raw["chunk_size"]), f"{where}: chunk_size")
    return SavingsRow(scenario, backing, granule, variant, saved, stderr, runs, size, chunk,
                      where, unit)


def read_savings(path: str, need_saved: bool = True) -> list[SavingsRow]:
    """The rows of a savings table (``need_saved``: every row gives ``saved_pct``)."""
    from ..plumbing.validate import loads, read_text
    p = Path(path)
    text = read_text(path, "savings table")  # UTF-8, or one line naming the file
    known = set(REQUIRED + OPTIONAL)
    rows: list[SavingsRow] = []
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        data = loads(text, path)  # strict: NaN and Infinity are refused
        items = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise S2Error(f"{path}: expected a list of rows (or {{\"rows\": [...]}})")
        for i, item in enumerate(items):
            where = f"{path}: row {i}"
            if not isinstance(item, dict):
                raise S2Error(f"{where}: not an object")
            unknown = sorted(set(item) - known)
            if unknown:
                raise S2Error(f"{where}: unknown field {unknown[0]!r} (fields: "
                              f"{', '.join(REQUIRED + OPTIONAL)})")
            try:
                rows.append(_row(item, where, need_saved))
            except ValueError as e:
                if isinstance(e, S2Error):
                    raise
                raise S2Error(f"{where}: a value is not text or a number") from None
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in reader.fieldnames or []]
        need = REQUIRED + (("saved_pct",) if need_saved else ())
        if not header or not set(need) <= set(header):
            raise S2Error(f"{path}: a CSV savings table needs a header with the columns "
                          f"{', '.join(need)}")
        unknown = [h for h in header if h not in known]
        if unknown:
            raise S2Error(f"{path}:1: unknown column {unknown[0]!r} (columns: "
                          f"{', '.join(REQUIRED + OPTIONAL)})")
        reader.fieldnames = header
        for i, r in enumerate(reader, start=2):
            if None in r:
                raise S2Error(f"{path}:{reader.line_num}: more values than columns")
            if not any(_text(v) for v in r.values()):
                continue  # a blank line
            rows.append(_row(r, f"{path}:{reader.line_num}", need_saved))
    if not rows:
        raise S2Error(f"{path}: no rows")
    return rows
