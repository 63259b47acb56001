"""The results store: one SQLite file holding every cell and measurement.

Schema (version :data:`SCHEMA_VERSION`):

* ``meta(key, value)`` -- ``app = s2split``, ``schema_version``, ``created``;
* ``cells`` -- one model run of one variant: its key, configuration (the
  perf-test parameters), variant, engine, profile, tool version and time;
* ``phases`` -- per cell and phase: the exact counts (sparse JSON) and the
  estimate under the cell's profile;
* ``measurements`` -- timings from real hosts (``s2split hw``): a label (e.g.
  a kernel), the configuration key, phase, repetition, seconds, the host and
  (schema 2) what backed the guest memory (``hw run``'s coverage check; NULL
  for imported or older rows). A schema-1 file gains the column on open.

Each cell is written in one transaction, so an interrupted run leaves only
whole cells behind and resumes by skipping the keys already present.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from s2split import __version__
from ..counting.counts import Counts
from ..plumbing.errors import S2Error

SCHEMA_VERSION = 2
APP = "s2split"
DEFAULT_DB = "s2split-results.sqlite"
#: Seconds to wait for another process's lock before saying the database is locked.
LOCK_TIMEOUT_S = 30.0


def _locked(e: sqlite3.Error) -> bool:
    """Whether E is SQLite's "busy": another connection holds the lock."""
    name = getattr(e, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e)

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cells (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    variant TEXT NOT NULL,
    engine TEXT NOT NULL,
    profile TEXT NOT NULL,
    tool_version TEXT NOT NULL,
    created TEXT NOT NULL,
    seconds REAL NOT NULL
);
CREATE TABLE phases (
    cell_id INTEGER NOT NULL REFERENCES cells(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    phase TEXT NOT NULL,
    counts TEXT NOT NULL,
    estimate_ns REAL NOT NULL,
    PRIMARY KEY (cell_id, phase)
);
CREATE TABLE measurements (
    id INTEGER PRIMARY KEY,
    label TEXT NOT NULL,
    config_key TEXT NOT NULL,
    config TEXT NOT NULL,
    phase TEXT NOT NULL,
    repetition INTEGER NOT NULL,
    seconds REAL NOT NULL,
    host TEXT NOT NULL,
    source TEXT NOT NULL,
    tool_version TEXT NOT NULL,
    created TEXT NOT NULL,
    backing TEXT
);
CREATE INDEX measurements_label ON measurements(label, config_key, phase);
"""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class StoredCell:
    id: int
    key: str
    config: dict[str, Any]
    variant: str
    engine: str
    profile: str
    tool_version: str
    created: str
    seconds: float
    phases: list[tuple[str, Counts, float]]

    def phase(self, name: str) -> Counts:
        for n, c, _ in self.phases:
            if n == name:
                return c
        raise KeyError(name)


class Store:
    """A results database; create with :meth:`open`."""

    def __init__(self, conn: sqlite3.Connection, path: str):
        self.conn = conn
        self.path = path

    @classmethod
    def open(cls, path: str | Path = DEFAULT_DB, create: bool = True) -> "Store":
        import os
        import stat

        from ..plumbing.output import note_input
        from ..plumbing.validate import file_kind
        p = Path(path)
        exists = p.exists()
        if not exists and not create:
            raise S2Error(f"{p}: no such results database")
        if exists:
            # A FIFO or a device is refused before it is opened: open() of a
            # FIFO blocks until a writer comes, and /dev/zero never ends.
            try:
                st = os.stat(p)
            except OSError as e:
                raise S2Error(f"{p}: cannot read ({e.strerror})") from None
            if not stat.S_ISREG(st.st_mode):
                raise S2Error(f"{p}: is {file_kind(st.st_mode)}, not a results database file")
            try:
                with open(p, "rb") as f:
                    head = f.read(16)
            except OSError as e:
                raise S2Error(f"{p}: cannot read ({e.strerror})") from None
            if head and not head.startswith(b"SQLite format 3"):
                raise S2Error(f"{p}: not an s2split results database (not SQLite)")
        try:
            conn = sqlite3.connect(str(p), timeout=LOCK_TIMEOUT_S)
            conn.execute("PRAGMA foreign_keys = ON")
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            if _locked(e):
                raise S2Error(f"{p}: the results database is locked by another process "
                              f"(waited {LOCK_TIMEOUT_S:g} s); try again when it is done") \
                    from None
            if not exists:
                raise S2Error(f"{p}: cannot create the results database ({e})") from None
            raise S2Error(f"{p}: not an s2split results database ({e})") from None
        note_input(p)
        store = cls(conn, str(p))
        try:
            store._check(tables, create)
        except BaseException:
            conn.close()
            raise
        return store

    def _check(self, tables: set[str], create: bool) -> None:
        p, conn = self.path, self.conn
        if not tables:
            if not create:
                raise S2Error(f"{p}: empty database, not an s2split results database")
            # One transaction, so that an interrupted or concurrent creation
            # never leaves a half-made schema behind.
            script = _SCHEMA.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ") \
                .replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ")
            rows = [("app", APP), ("schema_version", str(SCHEMA_VERSION)), ("created", now())]
            inserts = "".join(f"INSERT OR IGNORE INTO meta VALUES ('{k}', '{v}');\n"
                              for k, v in rows)
            with self._errors():
                conn.executescript(f"BEGIN IMMEDIATE;\n{script}{inserts}COMMIT;\n")
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            raise S2Error(f"{p}: not an s2split results database (no meta table)")
        with self._errors():
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        if meta.get("app") != APP:
            raise S2Error(f"{p}: not an s2split results database (app {meta.get('app')!r})")
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            raise S2Error(f"{p}: bad schema version {meta.get('schema_version')!r}") from None
        if version > SCHEMA_VERSION:
            raise S2Error(f"{p}: written by a newer s2split (schema {version}, this one reads "
                          f"{SCHEMA_VERSION}); upgrade s2split")
        if version == 1:
            # Schema 2 adds measurements.backing (NULL for the old rows).
            with self._errors():
                conn.executescript(
                    "BEGIN IMMEDIATE;\nALTER TABLE measurements ADD COLUMN backing TEXT;\n"
                    "UPDATE meta SET value = '2' WHERE key = 'schema_version';\nCOMMIT;\n")
            version = 2
        if version < SCHEMA_VERSION:
            raise S2Error(f"{p}: schema {version} is older than {SCHEMA_VERSION}; no migration "
                          "exists yet -- use a new file with --db")
        # Created in one transaction: a table missing is damage, not an old version.
        missing = sorted({"cells", "phases", "measurements"} - tables)
        if missing:
            raise S2Error(f"{p}: damaged results database (no {missing[0]} table)")

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite errors past :meth:`open` (a damaged file, a locked or read-only
        database) as one-line S2Error exceptions."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if _locked(e):
                raise S2Error(f"{self.path}: the results database is locked by another "
                              "process; try again when it is done") from None
            raise S2Error(f"{self.path}: database error: {e}") from None
        except OverflowError as e:  # an integer SQLite cannot hold (int64)
            raise S2Error(f"{self.path}: a value does not fit the database ({e})") from None

    # -- cells -------------------------------------------------------------------
    def has_cell(self, key: str) -> bool:
        with self._errors():
            return self.conn.execute("SELECT 1 FROM cells WHERE key = ?", (key,)).fetchone() \
                is not None

    def add_cell(self, key: str, config: dict[str, Any], variant: str, engine: str,
                 profile: str, seconds: float,
                 phases: Iterable[tuple[str, Counts, float]]) -> int:
        """Write one cell and its phases in one transaction; an existing key is
        left alone (and its id returned). The row is checked first by the
        same rules that read it back (:meth:`_cell`)."""
        phases = list(phases)
        row = (0, key, json.dumps(config, sort_keys=True), variant, engine, profile,
               __version__, now(), seconds)
        self._cell(row, [(name, json.dumps(c.to_dict(), sort_keys=True), est)
                         for name, c, est in phases], new=True)
        with self._errors(), self.conn:
            row = self.conn.execute("SELECT id FROM cells WHERE key = ?", (key,)).fetchone()
            if row:
                return int(row[0])
            cur = self.conn.execute(
                "INSERT INTO cells (key, config, variant, engine, profile, tool_version, created,"
                " seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, json.dumps(config, sort_keys=True), variant, engine, profile, __version__,
                 now(), seconds))
            cid = int(cur.lastrowid)
            self.conn.executemany(
                "INSERT INTO phases (cell_id, seq, phase, counts, estimate_ns) VALUES "
                "(?, ?, ?, ?, ?)",
                [(cid, i, name, json.dumps(c.to_dict(), sort_keys=True), est)
                 for i, (name, c, est) in enumerate(phases)])
        return cid

    def cells(self, where: str = "", args: tuple = ()) -> Iterator[StoredCell]:
        """Stored cells, each row checked (:meth:`_cell`): a damaged row is a
        one-line error naming the database and the row."""
        with self._errors():
            rows = self.conn.execute(
                "SELECT id, key, config, variant, engine, profile, tool_version, created, "
                f"seconds FROM cells {where} ORDER BY id", args).fetchall()
        for r in rows:
            with self._errors():
                ph = self.conn.execute("SELECT phase, counts, estimate_ns FROM phases WHERE "
                                       "cell_id = ? ORDER BY seq", (r[0],)).fetchall()
            yield self._cell(r, ph)

    def _cell(self, r: tuple, phase_rows: list[tuple], new: bool = False) -> StoredCell:
        from .schemas import CELL_CONFIG, counts_schema
        from ..plumbing.validate import check, finite, loads
        where = f"{self.path}: {'new cell ' + repr(r[1]) if new else f'cells row {r[0]}'}"
        for i, name in ((1, "key"), (3, "variant"), (4, "engine"), (5, "profile")):
            if not isinstance(r[i], str) or not r[i]:
                raise S2Error(f"{where}: {name}: must be a non-empty text, got {r[i]!r}")
        config = loads(r[2], f"{where}: config") if isinstance(r[2], str) else r[2]
        check(config, CELL_CONFIG, f"{where}: config")
        seconds = finite(r[8], f"{where}: seconds", 0)
        phases = []
        for name, counts, est in phase_rows:
            w = f"{where}: phase {name!r}" if new else \
                f"{self.path}: phases row (cell {r[0]}, phase {name!r})"
            data = loads(counts, f"{w}: counts") if isinstance(counts, str) else counts
            check(data, counts_schema(), f"{w}: counts")
            phases.append((str(name), Counts.from_dict(data),
                           finite(est, f"{w}: estimate_ns", 0)))
        return StoredCell(r[0], r[1], config, r[3], r[4], r[5], str(r[6]), str(r[7]), seconds,
                          phases)

    def cell_count(self) -> int:
        with self._errors():
            return int(self.conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0])

    # -- measurements ---------------------------------------------------------------
    def add_measurements(self, rows: Iterable[dict[str, Any]]) -> int:
        """Store ROWS, all or none: each is checked first by the same rules
        that read it back (:meth:`_measurement`), so that nothing is stored
        that a later command would refuse."""
        rows = list(rows)
        check_new_measurements(rows, self.path)
        with self._errors(), self.conn:
            self.conn.executemany(
                "INSERT INTO measurements (label, config_key, config, phase, repetition, seconds,"
                " host, source, tool_version, created, backing)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r["label"], r["config_key"], json.dumps(r["config"], sort_keys=True),
                  r["phase"], int(r["repetition"]), float(r["seconds"]),
                  json.dumps(r.get("host", {}), sort_keys=True), r.get("source", "hw run"),
                  __version__, now(),
                  json.dumps(r["backing"], sort_keys=True) if r.get("backing") else None)
                 for r in rows])
        return len(rows)

    def measurements(self, label: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT id, label, config_key, config, phase, repetition, seconds, host, source, " \
            "backing FROM measurements"
        args: tuple = ()
        if label is not None:
            q += " WHERE label = ?"
            args = (label,)
        with self._errors():
            rows = self.conn.execute(q + " ORDER BY id", args).fetchall()
        return [self._measurement(r) for r in rows]

    def _measurement(self, r: tuple, new: bool = False) -> dict[str, Any]:
        return _measurement_row(self.path, r, new)

    def labels(self) -> list[str]:
        with self._errors():
            return [r[0] for r in self.conn.execute(
                "SELECT DISTINCT label FROM measurements ORDER BY label")]

    # -- export ------------------------------------------------------------------------
    def export_json(self) -> dict[str, Any]:
        return {
            "format": "s2split-results/1",
            "schema_version": SCHEMA_VERSION,
            "cells": [{"key": c.key, "config": c.config, "variant": c.variant,
                       "engine": c.engine, "profile": c.profile,
                       "tool_version": c.tool_version, "created": c.created,
                       "seconds": c.seconds,
                       "phases": [{"phase": n, "counts": cnt.to_dict(), "estimate_ns": est}
                                  for n, cnt, est in c.phases]} for c in self.cells()],
            "measurements": self.measurements(),
        }

    def export_csv(self) -> str:
        """One row per cell, phase and counter (long format), then measurements."""
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["kind", "cell_key", "variant", "profile", "phase", "op", "counter", "level",
                    "value", "estimate_ns"])
        for c in self.cells():
            for name, cnt, est in c.phases:
                w.writerow(["phase_estimate", c.key, c.variant, c.profile, name, "", "", "", "",
                            f"{est:.3f}"])
                for op, kind, level, value in cnt.items():
                    w.writerow(["count", c.key, c.variant, c.profile, name, op, kind,
                                "" if level is None else level, value, ""])
        for m in self.measurements():
            w.writerow(["measurement", m["config_key"], m["label"], "", m["phase"], "", "seconds",
                        m["repetition"], m["seconds"], ""])
        return out.getvalue()


def check_new_measurements(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Refuse (one line) any row the store would not read back: the check of
    :meth:`Store.add_measurements`, also for importers that check before they
    create a database."""
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise S2Error(f"{path}: new measurement {i}: not an object")
        try:
            _measurement_row(str(path), (f"new measurement {i}", r.get("label"),
                                         r.get("config_key"),
                                         json.dumps(r.get("config"), sort_keys=True),
                                         r.get("phase"), r.get("repetition"), r.get("seconds"),
                                         json.dumps(r.get("host", {}), sort_keys=True),
                                         r.get("source", "hw run"),
                                         json.dumps(r["backing"], sort_keys=True)
                                         if r.get("backing") else None), True)
        except (TypeError, ValueError) as e:
            if isinstance(e, S2Error):
                raise
            raise S2Error(f"{path}: new measurement {i}: not storable ({e})") from None


def _measurement_row(path: str, r: tuple, new: bool = False) -> dict[str, Any]:
    """A measurements row (r: id, label, config_key, config, phase,
    repetition, seconds, host, source, backing) checked; NEW: about to be stored."""
    from .schemas import MEASUREMENT_ROW
    from ..plumbing.validate import check, finite, loads
    where = f"{path}: {r[0] if new else f'measurements row {r[0]}'}"
    row = {"label": r[1], "config_key": r[2],
           "config": loads(r[3], f"{where}: config") if isinstance(r[3], str) else r[3],
           "phase": r[4], "repetition": r[5], "seconds": r[6],
           "host": loads(r[7], f"{where}: host") if isinstance(r[7], str) else r[7],
           "source": r[8]}
    if len(r) > 9 and r[9] is not None:
        row["backing"] = loads(r[9], f"{where}: backing") if isinstance(r[9], str) else r[9]
    check(row, MEASUREMENT_ROW, where)
    finite(row["seconds"], f"{where}: seconds")
    return row
