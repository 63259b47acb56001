"""The hostile-input suite (issue 25): hypothesis-generated files for every
reader -- profiles, fixtures, measurement and savings tables, hw outputs
(selftest text and ``hw run --json``), variant files, databases -- given to
the command line in process (``cli.main(argv)``).

For every file, whatever it holds:

* the command ends with exactly one line on stderr (never a traceback) and
  exit status 2, or -- for a hostile file that is still valid, which only
  the imports can meet -- succeeds, and then everything it stored reads back
  (``export`` and ``hw compare`` accept it: one validation both ways);
* no file changes that the command did not mean to write (a refused import
  leaves the database as it was; no reader writes its input).

Each hostile file is invalid by construction unless said otherwise: a key
given twice, a proper prefix of a document, nesting deeper than Python's
recursion limit, a number beyond a double, a document of the wrong JSON
type, bytes that are not UTF-8. The commands chosen fail before any model
runs, so the suite needs no fast-engine compile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from s2split.cli.parser import main
from s2split.model.pgtable import variants as V

from _cli import one_line

ROOT = Path(__file__).parent.parent
FIXTURE = sorted((ROOT / "fixtures" / "real-kernel").glob("*.json"))[0]
HW_TEXT = ROOT / "tests" / "hw" / "data" / "v6.12-arm64-thp-3modes.txt"
HOSTILE = settings(max_examples=15, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse only
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(argv: list[str], capsys, d: Path, *needles: str) -> str:
    """ARGV fails with one line and status 2, and no file in D changed."""
    before = snapshot(d)
    code, _, err = call(argv, capsys)
    assert code == 2, err
    line = one_line(err, *needles)
    assert snapshot(d) == before
    return line


def fresh_dir(tmp_path: Path) -> Path:
    """A new, empty directory per hypothesis example (tmp_path is shared)."""
    d = tmp_path / f"ex{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    return d


# -- hostile JSON --------------------------------------------------------------------------

def _objects(doc, path=()):
    """Paths of every object in DOC with at least one key."""
    if isinstance(doc, dict):
        if doc:
            yield path
        for k, v in doc.items():
            yield from _objects(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _objects(v, (*path, i))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _numbers(doc, path=()):
    if isinstance(doc, bool):
        return
    if isinstance(doc, (int, float)):
        yield path
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _numbers(v, (*path, i))


@st.composite
def hostile_json(draw, doc) -> bytes:
    """DOC made invalid in one hostile way (see the module docstring)."""
    how = draw(st.sampled_from(["duplicate", "prefix", "deep", "overflow", "root", "bytes",
                                "bom-garbage"]))
    text = json.dumps(doc)
    if how == "duplicate":  # the same key once more, in a random object
        path = draw(st.sampled_from(list(_objects(doc))))
        key = draw(st.sampled_from(sorted(_get(doc, path))))
        marker = "@@dup@@"
        tmp = json.loads(text)
        _get(tmp, path)[marker] = 0
        dup = json.dumps(key) + ": " + json.dumps(draw(st.one_of(
            st.integers(-3, 3), st.text(max_size=4), st.none(), st.booleans())))
        return json.dumps(tmp).replace(f'"{marker}": 0', dup).encode()
    if how == "prefix":
        return text.encode()[:draw(st.integers(0, len(text) - 1))]
    if how == "deep":  # past any recursion limit, in a random place
        depth = draw(st.integers(sys.getrecursionlimit(), 4 * sys.getrecursionlimit()))
        return ("[" * depth + "]" * depth).encode() if draw(st.booleans()) else \
            text.replace("{", "{\"deep\": " + "[" * depth + "]" * depth + ", ", 1).encode()
    if how == "overflow":
        paths = list(_numbers(doc))
        if not paths:
            return b"1e999"
        path = draw(st.sampled_from(paths))
        tmp = json.loads(text)
        _get(tmp, path[:-1])[path[-1]] = "@@num@@"
        return json.dumps(tmp).replace('"@@num@@"', draw(st.sampled_from(
            ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"]))).encode()
    if how == "root":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(
            max_size=4), st.none(), st.integers(), st.floats(allow_nan=False,
                                                           allow_infinity=False)))).encode()
    if how == "bytes":  # never UTF-8: 0xff cannot start or continue a character
        at = draw(st.integers(0, len(text)))
        return text.encode()[:at] + b"\xff" + text.encode()[at:]
    return b"\xef\xbb\xbf" + draw(st.binary(max_size=30)).replace(b"{", b"").replace(b"[", b"") \
        + b"\xff"


# -- profiles and fixtures ---------------------------------------------------------------------

PROFILE = {"format": "s2split-profile/1", "name": "p", "inherits": "server-vhe",
           "features": {"vhe": True}, "unit_costs_ns": {"walks": 40, "read_leaf@3": 2.5},
           "notes": ["n"]}


@HOSTILE
@given(data=hostile_json(PROFILE))
def test_hostile_profiles(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    (d / "p.json").write_bytes(data)
    refused(["perf-test", "-b", "4M", "--profile", str(d / "p.json")], capsys, d, "p.json")


def _fixture() -> dict:
    doc = json.loads(FIXTURE.read_text())
    doc["runs"] = doc["runs"][:1]
    return doc


@HOSTILE
@given(data=hostile_json(_fixture()))
def test_hostile_fixtures(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    (d / "fx.json").write_bytes(data)
    refused(["fidelity", str(d / "fx.json")], capsys, d, "fx.json")


# -- measurement and savings tables -----------------------------------------------------------

MEASUREMENTS = {"measurements": [{"options": "-m 6 -b 4M", "phase": "populate",
                                  "seconds": 0.002}]}
SAVINGS = {"rows": [{"scenario": "clear", "backing": "thp", "granule": "4K",
                     "variant": "skip-levels", "saved_pct": 5.5, "stderr_pct": 0.5}]}


@st.composite
def hostile_csv(draw, header: list[str], row: list[str], required: int,
                bad_last: list[str]) -> bytes:
    """A CSV table made invalid: a header missing one of its first REQUIRED
    columns, a last cell from BAD_LAST (not a finite number, or out of its
    range), bytes that are not UTF-8."""
    how = draw(st.sampled_from(["header", "number", "bytes"]))
    if how == "header":
        drop = draw(st.sampled_from(header[:required]))
        return (",".join(h for h in header if h != drop) + "\n" +
                ",".join(row) + "\n").encode()
    if how == "number":
        cells = list(row)
        cells[-1] = draw(st.sampled_from(bad_last))
        return ("\ufeff" * draw(st.booleans()) + ",".join(header) + "\n" +
                ",".join(cells) + "\n").encode()
    text = ",".join(header) + "\n" + ",".join(row) + "\n"
    at = draw(st.integers(0, len(text)))
    return text.encode()[:at] + b"\xff" + text.encode()[at:]


@HOSTILE
@given(data=st.one_of(hostile_json(MEASUREMENTS), hostile_csv(
    ["options", "phase", "seconds"], ["-m 6 -b 4M", "populate", "0.002"], 3,
    ["nan", "inf", "-1", "0", "1e308", "x", ""])))
def test_hostile_measurement_tables(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    name = "m.json" if data.lstrip(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"[") else "m.csv"
    (d / name).write_bytes(data)
    refused(["calibrate", str(d / name)], capsys, d, name)


@HOSTILE
@given(data=st.one_of(hostile_json(SAVINGS), hostile_csv(
    ["scenario", "backing", "granule", "variant", "saved_pct", "stderr_pct"],
    ["clear", "thp", "4K", "skip-levels", "5.5", "0.5"], 5,
    ["nan", "inf", "-1", "0", "1e308", "1e-200", "x"])))
def test_hostile_savings_tables(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    (d / "s.txt").write_bytes(data)
    refused(["calibrate", "--savings", str(d / "s.txt"), "--db", str(d / "r.sqlite")], capsys,
            d, "s.txt")
    assert not (d / "r.sqlite").exists()


# -- hw outputs: imports that succeed must read back ------------------------------------------

def reads_back(db: Path, capsys) -> None:
    """Everything an import stored is accepted by the commands that read it."""
    code, out, err = call(["export", "--db", str(db)], capsys)
    assert code == 0, err
    labels = {m["label"] for m in json.loads(out)["measurements"]}
    for label in labels:
        code, _, err = call(["hw", "compare", label, label, "--no-model", "--db", str(db)],
                            capsys)
        assert code in (0, 1), err  # 1: a regression, which is an answer too


def import_or_refuse(argv: list[str], db: Path, d: Path, capsys) -> None:
    before = snapshot(d)
    code, _, err = call(argv, capsys)
    if code == 0:
        reads_back(db, capsys)
    else:
        assert code == 2, err
        one_line(err)
        assert snapshot(d) == before  # nothing stored: all rows or none


_TIME = re.compile(r"\d+\.\d{9}s")


@st.composite
def hostile_selftest_output(draw) -> bytes:
    """The upstream selftest's output with times, iteration numbers and guest
    modes changed to edge values, lines dropped, or the bytes damaged. Some
    of these are still valid output: then the import must succeed and read
    back."""
    text = HW_TEXT.read_text()
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["time", "iteration", "mode", "drop", "bytes"]))
        i = draw(st.integers(0, len(lines) - 1))
        if how == "time":
            value = draw(st.sampled_from(["0.000000000s", "99999999999.000000000s",
                                          "9223372036854775807.999999999s", "1.000000000s"]))
            lines[i] = _TIME.sub(value, lines[i])
        elif how == "iteration":
            lines[i] = re.sub(r"Iteration \d+", "Iteration " + draw(st.sampled_from(
                ["0", "99999999999", str(1 << 63)])), lines[i])
        elif how == "mode":
            lines[i] = re.sub(r"PA-bits:\s*\d+", "PA-bits:" + draw(st.sampled_from(
                ["ANY", "0", "99"])), lines[i])
        elif how == "drop":
            del lines[i]
            if not lines:
                lines = ["\n"]
        else:
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))] + "\x00\udcff"
    return "".join(lines).encode("utf-8", errors="surrogateescape")


@HOSTILE
@given(data=hostile_selftest_output())
def test_hostile_selftest_outputs(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    (d / "out.txt").write_bytes(data)
    db = d / "r.sqlite"
    import_or_refuse(["hw", "import", str(d / "out.txt"), "--label", "k", "--args",
                      "-s anonymous_thp", "--db", str(db)], db, d, capsys)


HW_CONFIG = {"vcpu_memory_bytes": 8 << 20, "vcpus": 1, "backing": "anonymous",
             "manual_protect": True, "iterations": 2, "mode": "P40V48_4K", "mode_id": 6,
             "pa_bits": 40, "granule": 4096, "slots": 1, "write_percent": 100,
             "random_access": False, "partition": True, "seed": 1, "chunk_size": None,
             "seed_synced": False, "arch": "arm64"}
HW_DOC = {"format": "s2split-hw-run/1", "label": "k", "host": {"page_size": 4096},
          "rows": [{"label": "k", "config_key": "-m 6 -b 8M", "config": HW_CONFIG,
                    "phase": phase, "repetition": rep, "seconds": 0.01 + rep * 1e-3,
                    "host": {"page_size": 4096}, "source": "hw run"}
                   for rep in range(2) for phase in ("populate", "iter1_dirty")],
          "runs": [{"problems": []}]}
EDGE_VALUES = st.one_of(
    st.sampled_from([0, -1, 1 << 63, (1 << 63) - 1, 1 << 64, 1e308, 5e-324, 1e-300, 0.0, -0.0,
                     "", "iter0_dirty", "iter1_dirty", "warp", "ANY", None, True, [], {}]),
    st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6))
ROW_KEYS = ["label", "config_key", "phase", "repetition", "seconds", "host", "source",
            ("config", "pa_bits"), ("config", "granule"), ("config", "vcpus"),
            ("config", "iterations")]


@st.composite
def hostile_hw_json(draw) -> bytes:
    if draw(st.booleans()):
        return draw(hostile_json(HW_DOC))
    doc = json.loads(json.dumps(HW_DOC))  # an edge value at a key: valid or not
    for _ in range(draw(st.integers(1, 3))):
        row = doc["rows"][draw(st.integers(0, len(doc["rows"]) - 1))]
        key = draw(st.sampled_from(ROW_KEYS))
        value = draw(EDGE_VALUES)
        if isinstance(key, tuple):
            row["config"][key[1]] = value
        else:
            row[key] = value
    return json.dumps(doc).encode()


@HOSTILE
@given(data=hostile_hw_json())
def test_hostile_hw_run_json(tmp_path, capsys, data):
    d = fresh_dir(tmp_path)
    (d / "hw.json").write_bytes(data)
    db = d / "r.sqlite"
    import_or_refuse(["hw", "import-json", str(d / "hw.json"), "--db", str(db)], db, d,
                     capsys)


# -- variant files ------------------------------------------------------------------------------

RAISES = st.sampled_from([
    "raise SystemExit({n})", "raise SystemExit('bye')", "raise KeyboardInterrupt_('{n}')",
    "raise Custom({n})", "raise GeneratorExit", "raise ValueError('a\\nb')",
    "raise MemoryError", "raise OSError({n}, 'x')", "raise RecursionError",
    "f()", "import no_such_module_{n}", "def (:", "register({n})",
    "register(Variant('v{n}', 'd', walk_flags={{'split': {n}.5}}))"])


@HOSTILE
@given(stmt=RAISES, n=st.integers(0, 300))
def test_hostile_variant_files(tmp_path, capsys, stmt, n):
    d = fresh_dir(tmp_path)
    f = d / f"v:{n}.py"  # a ':' in the path too
    f.write_text("from s2split.model.pgtable.variants import Variant, register\n"
                 "class Custom(BaseException):\n    pass\n"
                 "class KeyboardInterrupt_(KeyboardInterrupt):\n    pass\n"
                 "def f():\n    return f()\n" + stmt.format(n=n) + "\n")
    saved = {k: os.environ.get(k) for k in (V.ENV, V.FILES_ENV)}
    try:
        refused(["--variants", str(f), "variants"], capsys, d, f.name)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- databases ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("db") / "r.sqlite"
    assert main(["reproduce", "--size", "4M", "--granule", "4K", "--backing", "thp",
                 "--scenario", "enable", "--variant", "vanilla,skip-levels", "--engine",
                 "reference", "--workers", "1", "--no-progress", "--db", str(db)]) == 0
    doc = tmp_path_factory.mktemp("hw") / "hw.json"
    doc.write_text(json.dumps(HW_DOC))
    assert main(["hw", "import-json", str(doc), "--db", str(db)]) == 0
    return db


DB_READERS = [["show"], ["export"], ["export", "--format", "csv"],
              ["compare", "vanilla", "skip-levels"], ["hw", "compare", "k", "k", "--no-model"]]
META_DAMAGE = ["UPDATE meta SET value = 'other' WHERE key = 'app'",
               "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
               "UPDATE meta SET value = 'x' WHERE key = 'schema_version'",
               "DROP TABLE meta", "DROP TABLE cells",
               "UPDATE cells SET config = '{\"granule\": 4096, ' || substr(config, 2)",
               "UPDATE measurements SET repetition = 9223372036854775807",
               "UPDATE measurements SET seconds = 0", "UPDATE measurements SET phase = 'x'",
               "UPDATE phases SET counts = '{\"split/walks/-\": 1, \"split/walks/-\": 2}'"]


@st.composite
def hostile_database(draw, good: bytes) -> tuple[str, bytes | str]:
    how = draw(st.sampled_from(["bytes", "header", "truncate", "meta", "empty"]))
    if how == "bytes":
        return how, draw(st.binary(min_size=1, max_size=200))
    if how == "header":  # a SQLite header and garbage
        return how, b"SQLite format 3\x00" + draw(st.binary(max_size=600))
    if how == "truncate":
        return how, good[:draw(st.integers(1, len(good) - 1))]
    if how == "empty":
        return how, b""
    return how, draw(st.sampled_from(META_DAMAGE))


@settings(HOSTILE, max_examples=30)
@given(data=st.data())
def test_hostile_databases(good_db, tmp_path, capsys, data):
    good = good_db.read_bytes()
    how, damage = data.draw(hostile_database(good))
    reader = data.draw(st.sampled_from(DB_READERS))
    d = fresh_dir(tmp_path)
    db = d / "r.sqlite"
    if how == "meta":
        shutil.copyfile(good_db, db)
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(damage)
        conn.close()
    else:
        db.write_bytes(damage)
    before = snapshot(d)
    code, _, err = call([*reader, "--db", str(db)], capsys)
    if how == "truncate" and code in (0, 1):
        pass  # cut at a page boundary SQLite does not need: still a database
    else:
        assert code == 2, (how, damage if how == "meta" else len(damage), err)
        one_line(err, "r.sqlite")
    assert snapshot(d) == before  # a reader never writes its database
