"""Hostile files and damaged database rows: every reader answers with one line
naming the file (or the database and row) and exit status 2.

Each damage below is invalid by the format's definition (the schema in
s2split.storage.schemas and the docs of each format): a value of another JSON type,
a number out of its range, NaN/Infinity (not JSON), a byte that is never
UTF-8 (0xff), a proper prefix of a JSON object (never JSON), an unknown name.
Hypothesis picks the key and the damage; most examples call the CLI's main in
process, and a few run it in a subprocess to see the real exit status and
stderr.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from s2split.cli.parser import main
from s2split.model.pgtable import variants as V
from s2split.storage.store import Store

from _cli import one_line as single_line

FIXTURES = sorted((Path(__file__).parent.parent / "fixtures" / "real-kernel").glob("*.json"))
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *needles: str) -> str:
    """The one-line error of a refused input: exit status 2."""
    assert code == 2, err
    return single_line(err, *needles)


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "s2split", *argv], capture_output=True,
                       text=True, env=ENV, timeout=120)
    return r.returncode, r.stderr


# -- damage of JSON documents ------------------------------------------------------------

def _set(doc, path, value):
    *head, last = path
    for p in head:
        doc = doc[p]
    doc[last] = value


# Values of each JSON type, for "another type than the key's".
VALUES = {
    "string": st.text(max_size=8).filter(lambda s: not _numeric(s)),
    "integer": st.integers(-5, 5),
    "number": st.floats(-5, 5, allow_nan=False).filter(lambda x: x != int(x)),
    "boolean": st.booleans(),
    "null": st.none(),
    "array": st.lists(st.integers(0, 3), max_size=2),
    "object": st.dictionaries(st.sampled_from(["q", "z"]), st.integers(0, 3), max_size=1),
}


def _numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def other_type(expected: set[str]):
    """A value whose JSON type is none of EXPECTED ("number" includes integers)."""
    if "number" in expected:
        expected = expected | {"integer"}
    return st.one_of([s for t, s in VALUES.items() if t not in expected])


@st.composite
def damaged_text(draw, doc: dict, keys: list[tuple[tuple, set[str], str]]) -> bytes:
    """DOC as bytes, damaged once. KEYS: (path, JSON types allowed, range rule)
    where the rule is "", ">=0" (non-negative), ">0" (positive) or "int>=0"."""
    how = draw(st.sampled_from(["type", "range", "nan", "encoding", "truncate"]))
    doc = json.loads(json.dumps(doc))
    if how in ("encoding", "truncate"):
        text = json.dumps(doc).encode()
        at = draw(st.integers(0, len(text) - 1))
        if how == "truncate":
            return text[:at]
        return text[:at] + b"\xff" + text[at:]
    if how == "type":
        path, types, _ = draw(st.sampled_from(keys))
        _set(doc, path, draw(other_type(types)))
        return json.dumps(doc).encode()
    ranged = [k for k in keys if k[2]]
    path, _, rule = draw(st.sampled_from(ranged))
    if how == "nan":
        _set(doc, path, "@@")
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
        return json.dumps(doc).replace('"@@"', token).encode()
    low = {">=0": draw(st.floats(-1e6, -1e-3)), ">0": draw(st.floats(-1e6, 0)),
           "int>=0": draw(st.integers(-1000, -1))}[rule]
    _set(doc, path, low)
    return json.dumps(doc).encode()


# -- profiles -------------------------------------------------------------------------------

PROFILE = {"format": "s2split-profile/1", "name": "p", "description": "d", "provenance": "t",
           "inherits": "server-vhe",
           "features": {"vhe": True, "fwb": False, "tlbirange": True, "dic": True},
           "unit_costs_ns": {"walks": 40, "read_leaf@3": 2.5, "split:visit_leaf": 3},
           "notes": ["n"]}
PROFILE_KEYS = [(("name",), {"string"}, ""), (("description",), {"string"}, ""),
                (("inherits",), {"string"}, ""),
                (("features",), {"object"}, ""), (("features", "vhe"), {"boolean"}, ""),
                (("features", "dic"), {"boolean"}, ""),
                (("unit_costs_ns",), {"object"}, ""),
                (("unit_costs_ns", "walks"), {"number"}, ">=0"),
                (("unit_costs_ns", "read_leaf@3"), {"number"}, ">=0"),
                (("notes",), {"array"}, ""), (("notes", 0), {"string"}, "")]


@FUZZ
@given(data=damaged_text(PROFILE, PROFILE_KEYS))
def test_fuzzed_profile(tmp_path, capsys, data):
    path = tmp_path / "p.json"
    path.write_bytes(data)
    one_line(*run_main(["perf-test", "-b", "4M", "--profile", str(path)], capsys), "p.json")


@pytest.mark.parametrize("features,needle", [({"vhe": "no"}, "features.vhe"),
                                              ({"vhe": 0}, "features.vhe"),
                                              ({"warp": True}, "unknown key 'warp'")])
def test_profile_features_are_booleans(tmp_path, capsys, features, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "s2split-profile/1", "name": "p",
                                "features": features}))
    one_line(*run_main(["perf-test", "--profile", str(path)], capsys), "p.json", needle)


def test_inheritance_cycles_are_named(tmp_path, capsys):
    (tmp_path / "self.json").write_text(json.dumps(
        {"format": "s2split-profile/1", "name": "s", "inherits": "self.json"}))
    line = one_line(*run_main(["perf-test", "--profile", str(tmp_path / "self.json")],
                              capsys), "inheritance cycle")
    assert line.count("self.json") >= 3  # the file, and the cycle self -> self
    for a, b in (("a", "b"), ("b", "c"), ("c", "a")):
        (tmp_path / f"{a}.json").write_text(json.dumps(
            {"format": "s2split-profile/1", "name": a, "inherits": f"{b}.json"}))
    line = one_line(*run_main(["perf-test", "--profile", str(tmp_path / "a.json")], capsys),
                    "inheritance cycle")
    assert "a.json -> " in line and "b.json -> " in line and "c.json -> " in line


# -- fixtures ------------------------------------------------------------------------------

def _fixture() -> dict:
    data = json.loads(FIXTURES[0].read_text())
    data["runs"] = data["runs"][:1]
    return data


FIXTURE_DOC = _fixture()
_PH = next(i for i, p in enumerate(FIXTURE_DOC["runs"][0]["phases"]) if p.get("calls"))
_FN = sorted(FIXTURE_DOC["runs"][0]["phases"][_PH]["calls"])[0]
FIXTURE_KEYS = [(("runs",), {"array"}, ""), (("runs", 0), {"object"}, ""),
                (("runs", 0, "command"), {"string"}, ""),
                (("runs", 0, "phases"), {"array"}, ""),
                (("runs", 0, "phases", _PH), {"object"}, ""),
                (("runs", 0, "phases", _PH, "phase"), {"string"}, ""),
                (("runs", 0, "phases", _PH, "calls"), {"object"}, ""),
                (("runs", 0, "phases", _PH, "calls", _FN), {"integer"}, "int>=0"),
                (("runs", 0, "phases", _PH, "detail"), {"object"}, "")]


@FUZZ
@given(data=damaged_text(FIXTURE_DOC, FIXTURE_KEYS))
def test_fuzzed_fixture(tmp_path, capsys, data):
    path = tmp_path / "fx.json"
    path.write_bytes(data)
    one_line(*run_main(["fidelity", str(path)], capsys), "fx.json")


@FUZZ
@given(name=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_kernel_function_is_reported(tmp_path, capsys, name):
    from s2split.counting.kernel_counters import KERNEL_FUNCTIONS
    if name in KERNEL_FUNCTIONS:
        return
    doc = _fixture()
    doc["runs"][0]["phases"][_PH]["calls"][name] = 0  # even a zero: never "all match"
    path = tmp_path / "fx.json"
    path.write_text(json.dumps(doc))
    one_line(*run_main(["fidelity", str(path)], capsys), "fx.json", f"unknown kernel "
             f"function {name!r}")


# -- calibration measurements ------------------------------------------------------------

MEASUREMENTS = {"measurements": [{"options": "-m 6 -b 4M", "phase": "populate",
                                  "seconds": 0.002}]}
MEASUREMENT_KEYS = [(("measurements",), {"array"}, ""),
                    (("measurements", 0), {"object"}, ""),
                    (("measurements", 0, "options"), {"string"}, ""),
                    (("measurements", 0, "phase"), {"string"}, ""),
                    (("measurements", 0, "seconds"), {"number"}, ">0")]


@FUZZ
@given(data=damaged_text(MEASUREMENTS, MEASUREMENT_KEYS))
def test_fuzzed_measurements(tmp_path, capsys, data):
    path = tmp_path / "m.json"
    path.write_bytes(data)
    one_line(*run_main(["calibrate", str(path)], capsys), "m.json")


# -- hw run JSON ----------------------------------------------------------------------------

HW_CONFIG = {"vcpu_memory_bytes": 8 << 20, "vcpus": 1, "backing": "anonymous",
             "manual_protect": True, "iterations": 2, "mode": "P40V48_4K", "mode_id": 6,
             "pa_bits": 40, "granule": 4096, "slots": 1, "write_percent": 100,
             "random_access": False, "partition": True, "seed": 1, "chunk_size": None,
             "seed_synced": False, "arch": "arm64"}
HW_DOC = {"format": "s2split-hw-run/1", "label": "k", "host": {"page_size": 4096},
          "rows": [{"label": "k", "config_key": "-m 6 -b 8M", "config": HW_CONFIG,
                    "phase": "populate", "repetition": 0, "seconds": 0.01,
                    "host": {"page_size": 4096}, "source": "hw run"}],
          "runs": [{"problems": []}]}
HW_KEYS = [(("rows",), {"array"}, ""), (("rows", 0), {"object"}, ""),
           (("rows", 0, "label"), {"string"}, ""), (("rows", 0, "config_key"), {"string"}, ""),
           (("rows", 0, "config"), {"object"}, ""), (("rows", 0, "phase"), {"string"}, ""),
           (("rows", 0, "repetition"), {"integer"}, "int>=0"),
           (("rows", 0, "seconds"), {"number"}, ">=0"),
           (("rows", 0, "host"), {"object"}, ""),
           (("rows", 0, "config", "vcpu_memory_bytes"), {"integer"}, ""),
           (("rows", 0, "config", "manual_protect"), {"boolean"}, "")]


@FUZZ
@given(data=damaged_text(HW_DOC, HW_KEYS))
def test_fuzzed_hw_json(tmp_path, capsys, data):
    path = tmp_path / "hw.json"
    path.write_bytes(data)
    db = tmp_path / "new.sqlite"
    one_line(*run_main(["hw", "import-json", str(path), "--db", str(db)], capsys), "hw.json")
    assert not db.exists()  # checked before the store is opened


def test_negative_seconds_are_not_imported(tmp_path, capsys):
    doc = json.loads(json.dumps(HW_DOC))
    doc["rows"][0]["seconds"] = -0.5
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(doc))
    one_line(*run_main(["hw", "import-json", str(path), "--db", str(tmp_path / "d.sqlite")],
                       capsys), "hw.json", "rows[0].seconds")


# -- variant files ---------------------------------------------------------------------------

BAD_FLAGS = st.one_of(st.text(max_size=5).map(repr), st.floats(0.5, 9).map(repr),
                      st.booleans().map(repr), st.integers(-99, -1).map(str),
                      st.integers(15, 40).map(lambda b: str(1 << b)),
                      st.just("[1 << 12]"), st.just("None"))
BAD_VARIANTS = st.one_of(
    BAD_FLAGS.map(lambda f: f'Variant("bad", "d", walk_flags={{"split": {f}}})'),
    st.sampled_from(['Variant("bad", "d", walk_flags="split")',
                     'Variant("bad", "d", walk_flags=[("split", 1)])',
                     'Variant("bad", "d", visitors={"split": 5})',
                     'Variant(5, "d")', 'Variant("bad", None)',
                     '"not a variant"']))


@FUZZ
@given(expr=BAD_VARIANTS)
def test_fuzzed_variant_file(capsys, expr):
    fd, path = tempfile.mkstemp(suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write("from s2split.model.pgtable.variants import Variant, register\n"
                f"register({expr})\n")
    old = os.environ.pop(V.ENV, None)
    try:
        one_line(*run_main(["--variants", path, "variants"], capsys), path)
        assert "bad" not in V.names()
    finally:
        os.unlink(path)
        os.environ.pop(V.ENV, None)
        os.environ.pop(V.FILES_ENV, None)
        if old is not None:
            os.environ[V.ENV] = old


# -- a few in a subprocess: the real exit status and stderr ------------------------------------

@pytest.mark.parametrize("kind", ["profile", "fixture", "hw", "measurements", "variants"])
def test_hostile_files_in_a_subprocess(tmp_path, kind):
    if kind == "profile":
        (tmp_path / "p.json").write_bytes(b'{"format": "s2split-profile/1", "name": "p", '
                                          b'"unit_costs_ns": {"walks": NaN}}')
        argv = ["perf-test", "--profile", str(tmp_path / "p.json")]
    elif kind == "fixture":
        (tmp_path / "p.json").write_bytes(json.dumps(FIXTURE_DOC).encode()[:-1])
        argv = ["fidelity", str(tmp_path / "p.json")]
    elif kind == "hw":
        (tmp_path / "p.json").write_bytes(b"\xff" + json.dumps(HW_DOC).encode())
        argv = ["hw", "import-json", str(tmp_path / "p.json"), "--db", str(tmp_path / "d")]
    elif kind == "measurements":
        (tmp_path / "p.json").write_text('[{"options": "-m 6", "phase": "populate", '
                                         '"seconds": Infinity}]')
        argv = ["calibrate", str(tmp_path / "p.json")]
    else:
        (tmp_path / "p.json").write_text("from s2split.model.pgtable.variants import Variant, "
                                         "register\nregister(Variant('x', 'd', "
                                         "walk_flags={'split': 'skip'}))\n")
        argv = ["--variants", str(tmp_path / "p.json"), "variants"]
    one_line(*run_subprocess(argv), "p.json")


# -- damaged database rows --------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_db(tmp_path_factory):
    """One reproduce group (two variants, two cells) and measurements of two labels."""
    d = tmp_path_factory.mktemp("db")
    db = d / "r.sqlite"
    argv = ["reproduce", "--size", "4M", "--granule", "4K", "--backing", "thp", "--scenario",
            "enable", "--variant", "vanilla,skip-levels", "--engine", "reference",
            "--workers", "1", "--no-progress", "--db", str(db)]
    assert main(argv) == 0
    s = Store.open(db)
    rows = []
    for label in ("A", "B"):
        for rep in range(3):
            rows.append({"label": label, "config_key": "-m 6 -b 8M", "config": HW_CONFIG,
                         "phase": "populate", "repetition": rep, "seconds": 0.01 + rep * 1e-3,
                         "host": {"page_size": 4096}, "source": "test"})
    s.add_measurements(rows)
    s.close()
    return db, argv


CELL_DAMAGE = {
    ("phases", "counts"): ["'{'", "'[1]'", "'{\"split/warp/3\": 1}'", "'{\"nosuch/walks/-\": 1}'",
                           "'{\"split/walks/9\": 1}'", "'{\"split/walks/-\": -4}'",
                           "'{\"split/walks/-\": 1.5}'", "'{\"split/walks/-\": NaN}'",
                           "'{\"split/walks/-\": \"x\"}'", "x'ff'"],
    ("phases", "estimate_ns"): ["'fast'", "-1.0", "9e999"],
    ("cells", "config"): ["'{'", "'[]'", "'{}'", "json_remove(config, '$.granule')",
                          "json_set(config, '$.manual_protect', 'yes')",
                          "json_set(config, '$.iterations', 'two')"],
    ("cells", "seconds"): ["'slow'", "-1.0"],
}
MEASUREMENT_DAMAGE = {
    ("measurements", "config"): ["'{'", "'[]'", "json_set(config, '$.granule', 'big')"],
    ("measurements", "host"): ["'nope'", "'5'"],
    ("measurements", "seconds"): ["-1.0", "'slow'", "9e999"],
    ("measurements", "repetition"): ["-1", "'first'"],
}
CELL_READERS = [["show"], ["compare", "vanilla", "skip-levels"], ["export"],
                ["export", "--format", "csv"], None]  # None: the reproduce run again
MEASUREMENT_READERS = [["hw", "compare", "A", "B", "--no-model"], ["export"],
                       ["calibrate", "A"]]


def _damage(db: Path, table: str, column: str, expr: str, tmp: Path) -> Path:
    bad = tmp / "bad.sqlite"
    bad.write_bytes(db.read_bytes())
    conn = sqlite3.connect(bad)
    with conn:
        if table == "measurements":
            conn.execute(f"UPDATE measurements SET {column} = {expr} WHERE id = "
                         "(SELECT MIN(id) FROM measurements WHERE label = 'A')")
        elif table == "phases":
            conn.execute(f"UPDATE phases SET {column} = {expr} WHERE rowid = "
                         "(SELECT MIN(rowid) FROM phases)")
        else:
            conn.execute(f"UPDATE cells SET {column} = {expr} WHERE id = "
                         "(SELECT MIN(id) FROM cells)")
        assert conn.total_changes == 1
    conn.close()
    return bad


@st.composite
def damage(draw):
    if draw(st.booleans()):
        (table, column), exprs = draw(st.sampled_from(sorted(CELL_DAMAGE.items())))
        reader = draw(st.sampled_from(CELL_READERS))
    else:
        (table, column), exprs = draw(st.sampled_from(sorted(MEASUREMENT_DAMAGE.items())))
        reader = draw(st.sampled_from(MEASUREMENT_READERS))
    return table, column, draw(st.sampled_from(exprs)), reader


@settings(FUZZ, max_examples=25)
@given(d=damage())
def test_fuzzed_database_rows(good_db, tmp_path, capsys, d):
    db, reproduce_argv = good_db
    table, column, expr, reader = d
    bad = _damage(db, table, column, expr, tmp_path)
    if reader is None:
        argv = [*reproduce_argv[:-1], str(bad)]
    elif reader[0] == "calibrate":
        argv = [*reader, "--db", str(bad)]
    else:
        argv = [*reader, "--db", str(bad)]
    line = one_line(*run_main(argv, capsys), str(bad), "row")
    assert table in line


@pytest.mark.parametrize("reader", [["show"], ["hw", "compare", "A", "B"]])
def test_damaged_row_in_a_subprocess(good_db, tmp_path, reader):
    db, _ = good_db
    table = "phases" if reader == ["show"] else "measurements"
    column = "counts" if table == "phases" else "config"
    bad = _damage(db, table, column, "'{not json'", tmp_path)
    one_line(*run_subprocess([*reader, "--db", str(bad)]), str(bad), "row", table)
