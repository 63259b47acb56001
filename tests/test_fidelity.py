"""The model against the real kernel's call counts (the shared fixtures)."""

import json
from pathlib import Path

import pytest

from s2split.cli.parser import main
from s2split.tasks.fidelity import check_fixture

REPO = Path(__file__).resolve().parents[1]
# The fixtures shipped with the project, plus any newer ones in the shared
# material next to a development checkout (same names are the same files).
_found = {p.name: p for p in (REPO / "fixtures" / "real-kernel").glob("*.json")}
for p in (REPO.parent / "shared" / "fixtures" / "real-kernel").glob("*.json"):
    _found.setdefault(p.name, p)
FIXTURES = [_found[k] for k in sorted(_found)]

pytestmark = pytest.mark.skipif(not FIXTURES, reason="real-kernel fixtures not found")


def test_fixtures_present():
    assert len(FIXTURES) >= 3


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_compared_count_matches(path):
    checks = check_fixture(str(path), engine="reference")
    assert checks, "a fixture has runs"
    for chk in checks:
        assert chk.layout_ok, chk.layout_note
        assert chk.compared > 50
        assert chk.mismatches == [], [(r.phase, r.function, r.key, r.kernel, r.model)
                                      for r in chk.mismatches]


def test_cli_reports_zero_differences(capsys):
    assert main(["fidelity", "--engine", "reference", *map(str, FIXTURES)]) == 0
    out = capsys.readouterr().out
    assert out.count("all compared counts match") == 2 * len(FIXTURES)


def test_wrong_fixture_is_reported(tmp_path, capsys):
    src = next(p for p in FIXTURES if "thp" in p.name)
    data = json.loads(src.read_text())
    run = next(r for r in data["runs"] if r["label"] == "manual_protect")
    phase = next(p for p in run["phases"] if p["phase"] == "iter1_clear_dirty_log")
    true = phase["calls"]["stage2_split_walker"]
    phase["calls"]["stage2_split_walker"] = true + 1
    bad = tmp_path / "wrong.json"
    bad.write_text(json.dumps(data))
    assert main(["fidelity", "--engine", "reference", str(bad)]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "stage2_split_walker" in l and "DIFF" in l)
    assert "iter1_clear_dirty_log" in line
    assert f"{true + 1:,}" in line and f"{true:,}" in line
    assert "1 compared count(s) differ" in out


def test_truncated_fixture_is_one_line_error(tmp_path, capsys):
    src = FIXTURES[0]
    bad = tmp_path / "truncated.json"
    bad.write_text(src.read_text()[:500])
    assert main(["fidelity", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated.json" in err[0] and "not valid JSON" in err[0]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d.update(runs=[]), "non-empty"),
    (lambda d: d["runs"][0].pop("command"), "command"),
    (lambda d: d["runs"][0]["phases"][0].update(calls={"x": -1}), "non-negative"),
    (lambda d: d["runs"][0].update(command="dirty_log_perf_test -q"), "not modelled"),
])
def test_malformed_fixture(tmp_path, capsys, mutate, message):
    data = json.loads(FIXTURES[0].read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert main(["fidelity", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and message in err[0]


def test_unseen_fixture_shape_is_accepted(tmp_path):
    # A fixture the tool has never seen: another granule/backing, same format.
    # Take the 16K one, relabel its command for 64K pages and a smaller size
    # and drop its counts: the tool must run it and report differences, not fail.
    data = json.loads(next(p for p in FIXTURES if "16k" in p.name).read_text())
    for run in data["runs"]:
        run["command"] = run["command"].replace("-m 7", "-m 8").replace("-b 256M", "-b 1G") \
            .replace("-k 32M", "-k 512M")
        run.pop("gpa_range", None)
    path = tmp_path / "k64k.json"
    path.write_text(json.dumps(data))
    checks = check_fixture(str(path), engine="reference")
    assert checks and all(c.mismatches for c in checks)
