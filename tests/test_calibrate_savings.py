"""``s2split calibrate --savings``: unit costs from relative savings.

The savings are generated here from a "truth" profile this file chooses, by
``reproduce``'s own report (what ``s2split reproduce --json`` prints as
``time_saved_pct``). Which costs the table determines is derived independently
of the fitting code: from finite differences of those savings when one cost
changes, and their rank.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from _cli import run_cli
from s2split.tasks.calibrate_savings import compute_cells, cost_keys, fit_savings
from s2split.estimate.cost import Profile, load_profile
from s2split.report.reproduce import outcome_json, savings
from s2split.tasks.reproduce import LocalExecutor, Matrix, reproduce
from s2split.tasks.savings_table import read_savings
from s2split.storage.store import Store

SIZE = "1G"  # the fast engine (from 64M) computes each cell in well under a second
BASE = "server-vhe"
FIT = ["split:visit_leaf", "wrprotect:visit_leaf", "create_unlinked:visit_leaf"]
# The truth moves every fitted cost away from the starting profile's (3, 6, 30 ns).
TRUTH = {"split:visit_leaf": 4.5, "wrprotect:visit_leaf": 9.0,
         "create_unlinked:visit_leaf": 22.0}
PIN = "read_leaf@3"  # held at its starting value in the truth as in the fit
#: That value: the read's instructions (1.2 ns in server-vhe since reads are
#: also priced by where they hit).
PIN_NS = load_profile(BASE).unit_costs_ns[PIN]
GRANULES = ("4K", "16K", "avg")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


def truth_file(where: Path) -> Path:
    p = where / "truth.json"
    p.write_text(json.dumps({"format": "s2split-profile/1", "name": "truth", "inherits": BASE,
                             "unit_costs_ns": TRUTH}))
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A results database with the cells, and the truth's savings of every
    (scenario, backing, granule) for skip-levels, as reproduce reports them."""
    d = tmp_path_factory.mktemp("savings")
    db = d / "cells.sqlite"
    truth = truth_file(d)
    store = Store.open(db)
    matrix = Matrix(size=1 << 30, backings=("regular", "thp"),
                    variants=("vanilla", "skip-levels"), profile=str(truth))
    outcome = reproduce(matrix, store, "auto", LocalExecutor(1))
    store.close()
    given = {}
    for r in outcome_json(outcome)["rows"]:
        if r["variant"] == "skip-levels":
            for g in GRANULES:
                given[(r["scenario"], r["backing"], g)] = r["time_saved_pct"][g]
    return d, db, truth, outcome, given


def write_table(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    return path


def table_rows(given, scenarios=("clear", "enable"), stderr=0.1, with_pct=True):
    out = []
    for (s, b, g), v in given.items():
        if s in scenarios:
            row = {"scenario": s, "backing": b, "granule": g, "variant": "skip-levels",
                   "size": SIZE}
            if with_pct:
                row |= {"saved_pct": repr(v), "stderr_pct": stderr}
            out.append(row)
    return out


def fd_columns(outcome, given, keys, profile: Profile) -> np.ndarray:
    """d(saving)/d(log cost) of every row, by central differences through
    reproduce's savings() -- independent of the fit's analytic gradient."""
    cols = []
    for k in keys:
        c = profile.unit_costs_ns.get(k) or 1.0
        vals = []
        for f in (1.001, 0.999):
            p = replace(profile, unit_costs_ns={**profile.unit_costs_ns, k: c * f})
            o = replace(outcome, profile=p)
            vals.append([savings(o, s, b, "skip-levels", "time")[
                g if g == "avg" else {"4K": 4096, "16K": 16384}[g]] for s, b, g in given])
        cols.append((np.array(vals[0]) - np.array(vals[1])) / 0.002)
    return np.array(cols).T


def test_recovers_the_determined_costs_and_matches_reproduce(world, capsys):
    d, db, truth, outcome, given = world
    truth_profile = load_profile(str(truth))
    # Independent identifiability: the three fitted costs move the savings in
    # independent ways (rank 3); bitmap_words and log_dirty_masked are counted
    # once per bitmap word in exactly these cells, so their columns are
    # proportional and the table can only fix their sum.
    cols = fd_columns(outcome, given, FIT + ["bitmap_words", "log_dirty_masked"],
                      truth_profile)
    assert np.linalg.matrix_rank(cols[:, :3], tol=1e-6 * np.abs(cols).max()) == 3
    bw, ldm = cols[:, 3], cols[:, 4]
    assert np.allclose(bw * np.abs(ldm).max() / np.abs(bw).max(), ldm, rtol=1e-4, atol=1e-9)

    table = write_table(d / "exact.csv", table_rows(given))
    out = d / "fitted.json"
    code, stdout, err = run_cli(
        ["calibrate", "--savings", str(table), "--db", str(db), "--pin", PIN, "--fit",
         ",".join(FIT + ["bitmap_words", "log_dirty_masked"]), "--json", "-o", str(out)],
        capsys)
    assert code == 0, err
    data = json.loads(stdout)
    costs = {c["key"]: c for c in data["costs"]}
    assert costs[PIN]["status"] == "pinned" and costs[PIN]["fitted_ns"] == PIN_NS
    for k, v in TRUTH.items():
        assert costs[k]["status"] in ("determined", "conditional"), costs[k]
        # the truth's ratio to the pinned cost (PIN_NS in both)
        assert costs[k]["ratio_to_pinned"] == pytest.approx(v / PIN_NS, rel=1e-5)
    statuses = sorted(costs[k]["status"] for k in ("bitmap_words", "log_dirty_masked"))
    assert statuses == ["conditional", "undetermined"]
    held = next(k for k in ("bitmap_words", "log_dirty_masked")
                if costs[k]["status"] == "undetermined")
    assert costs[held]["fitted_ns"] == costs[held]["start_ns"]
    assert data["verdict"]["explained"] is True
    assert all(abs(r["residual_pct"]) < 1e-6 for r in data["rows"])
    # The fitted profile says where it comes from, and reproduce gives exactly
    # the fitted savings under it.
    prof = json.loads(out.read_text())
    assert BASE in prof["provenance"] and str(table) in prof["provenance"]
    assert PIN in prof["provenance"] and len(prof["calibration"]["rows"]) == len(given)
    code, stdout, err = run_cli(
        ["reproduce", "--size", SIZE, "--db", str(db), "--backing", "regular,thp",
         "--variant", "skip-levels", "--profile", str(out), "--json", "--workers", "1"],
        capsys)
    assert code == 0, err
    rep = {(r["scenario"], r["backing"], g): r["time_saved_pct"][g]
           for r in json.loads(stdout)["rows"] if r["variant"] == "skip-levels"
           for g in GRANULES}
    for r in data["rows"]:
        assert r["fitted_pct"] == rep[(r["scenario"], r["backing"], r["granule"])]


def test_scale_free_the_pinned_cost_sets_the_units(world):
    """Multiplying every starting cost by 3 multiplies the fitted costs by 3 and
    leaves every fitted saving as it was."""
    d, db, truth, outcome, given = world
    table = write_table(d / "scale.csv", table_rows(given))
    rows = read_savings(str(table))
    base = load_profile(BASE)
    tripled = replace(base, unit_costs_ns={k: 3 * v for k, v in base.unit_costs_ns.items()})
    fits = []
    for prof in (base, tripled):
        store = Store.open(db, create=False)
        cells = compute_cells(rows, prof, cost_keys(prof, FIT), store, "auto", LocalExecutor(1))
        store.close()
        fits.append(fit_savings(rows, cells, prof, FIT, PIN))
    for a, b in zip(fits[0].costs, fits[1].costs):
        assert b.value == pytest.approx(3 * a.value, rel=1e-6)
    for a, b in zip(fits[0].rows, fits[1].rows):
        assert b.fitted == pytest.approx(a.fitted, abs=1e-7)


def test_intervals_cover_the_truth_at_the_stated_rate(world):
    """Gaussian noise of 0.3 percentage points (the stated stderr_pct) on every
    saving; over 500 seeded tables the 90% intervals of the three determined
    costs cover the truth about 90% of the time. With 1500 intervals (the three
    of one table are correlated) the rate's standard error is at most about
    sqrt(0.9 * 0.1 / 500) = 1.3%, so 0.86..0.94 is about three of them."""
    d, db, truth, outcome, given = world
    sigma = 0.3
    table = write_table(d / "noisy.csv", table_rows(given, stderr=sigma))
    rows = read_savings(str(table))
    base = load_profile(BASE)
    store = Store.open(db, create=False)
    cells = compute_cells(rows, base, cost_keys(base, FIT), store, "auto", LocalExecutor(1))
    store.close()
    exact = np.array([r.saved_pct for r in rows])
    rng = np.random.default_rng(20241204)
    covered = total = 0
    for _ in range(500):
        noisy = exact + rng.normal(0.0, sigma, len(rows))
        fit = fit_savings([replace(r, saved_pct=float(v)) for r, v in zip(rows, noisy)],
                          cells, base, FIT, PIN, confidence=0.90)
        for c in fit.costs[1:]:
            assert c.status == "determined"
            covered += c.low <= TRUTH[c.key] <= c.high
            total += 1
    rate = covered / total
    assert 0.86 <= rate <= 0.94, rate


def test_fit_on_clear_predicts_enable(world, capsys):
    d, db, truth, outcome, given = world
    fit_table = write_table(d / "clear.csv", table_rows(given, scenarios=("clear",)))
    wanted = write_table(d / "enable.csv", table_rows(given, scenarios=("enable",),
                                                      with_pct=False))
    code, stdout, err = run_cli(
        ["calibrate", "--savings", str(fit_table), "--predict", str(wanted), "--db", str(db),
         "--pin", PIN, "--fit", "split:visit_leaf,wrprotect:visit_leaf,"
         "create_unlinked:visit_leaf", "--json"], capsys)
    assert code == 0, err
    preds = json.loads(stdout)["predictions"]
    assert len(preds) == len(table_rows(given, scenarios=("enable",)))
    for p in preds:
        assert set(p) == {"scenario", "backing", "granule", "variant", "predicted_pct", "low",
                          "high"}
        # noise-free rows fix the truth's costs, so the prediction is the truth's saving
        assert p["predicted_pct"] == pytest.approx(
            given[(p["scenario"], p["backing"], p["granule"])], abs=1e-6)
        assert p["low"] <= p["predicted_pct"] <= p["high"]
    # the same rows with their values: given_pct is reported too
    code, stdout, err = run_cli(
        ["calibrate", "--savings", str(fit_table), "--predict",
         str(write_table(d / "enable2.csv", table_rows(given, scenarios=("enable",)))),
         "--db", str(db), "--pin", PIN, "--json"], capsys)
    assert code == 0, err
    assert all("given_pct" in p for p in json.loads(stdout)["predictions"])


def test_a_table_no_cost_model_fits_is_not_explained(world, capsys):
    """The same cell given twice, as 30% and 10% with stderr 0.5: any costs give
    both rows one value v, so chi2 >= min_v ((v-30)^2 + (v-10)^2) / 0.25 = 800."""
    d, db, truth, outcome, given = world
    rows = table_rows(given, scenarios=("clear",), stderr=0.5)
    rows += [{"scenario": "enable", "backing": "regular", "granule": "4K",
              "variant": "skip-levels", "saved_pct": v, "stderr_pct": 0.5, "size": SIZE}
             for v in (30, 10)]
    table = write_table(d / "contradiction.csv", rows)
    code, stdout, err = run_cli(["calibrate", "--savings", str(table), "--db", str(db),
                                 "--pin", PIN, "--json"], capsys)
    assert code == 0, err
    verdict = json.loads(stdout)["verdict"]
    assert verdict["explained"] is False and verdict["chi2"] >= 800 - 1e-6
    assert verdict["text"].startswith("not explained")
    code, stdout, err = run_cli(["calibrate", "--savings", str(table), "--db", str(db),
                                 "--pin", PIN], capsys)
    assert code == 0 and "Verdict: not explained" in stdout


ROW = "scenario,backing,granule,variant,saved_pct\n"


@pytest.mark.parametrize("text,args,message", [
    (ROW + "clearing,regular,avg,skip-levels,20\n", [], "unknown scenario"),
    (ROW + "clear,regular,avg,skip-everything,20\n", [], "unknown variant"),
    (ROW + "clear,regular,avg,skip-levels,100\n", [], "outside (-100, 100)"),
    (ROW + "clear,regular,avg,skip-levels,-100\n", [], "outside (-100, 100)"),
    (ROW + "clear,regular,avg,skip-levels,lots\n", [], "not a number"),
    (ROW + "clear,regular,8K,skip-levels,20\n", [], "unknown granule"),
    (ROW + "clear,regular,avg,skip-levels,20\nclear,thp,avg,skip-levels,10\n", [],
     "cannot determine 3 free costs"),
    ("scenario,backing,variant,saved_pct\nclear,regular,skip-levels,20\n", [], "header"),
    ("[{\"scenario\": \"clear\",", [], "not valid JSON"),
    ("[{\"scenario\": \"clear\", \"backing\": \"thp\", \"granule\": \"4K\", "
     "\"variant\": \"skip-levels\", \"saved\": 3}]", [], "unknown field 'saved'"),
    # read strictly, as every JSON file (s2split.plumbing.validate): NaN is no JSON number
    ("[{\"scenario\": \"clear\", \"backing\": \"thp\", \"granule\": \"4K\", "
     "\"variant\": \"skip-levels\", \"saved_pct\": NaN}]", [], "NaN is not a JSON number"),
    (ROW + "clear,regular,avg,skip-levels,20\n", ["--fit", "no_such_counter"],
     "unknown counter"),
    # 3M is no block size of the 4K granule (4K, 2M, 1G): the kernel refuses it
    ("scenario,backing,granule,variant,saved_pct,size,chunk_size\n"
     "clear,regular,4K,skip-levels,20,64M,3M\n", ["--fit", "split:visit_leaf"],
     "chunk_size 3M is not a supported block size"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, text, args, message):
    table = tmp_path / ("t.json" if text.startswith("[") else "t.csv")
    table.write_text(text)
    code, out, err = run_cli(["calibrate", "--savings", str(table), "--db",
                              str(tmp_path / "db.sqlite"), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    if not args or "chunk_size" in message:  # an error in the table names the file
        assert str(table) in lines[0]


def test_a_table_not_in_utf8_is_one_line_and_exit_2(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_bytes((ROW + "clear,regular,avg,skip-levels,20 \xb1 1\n").encode("latin-1"))
    code, _, err = run_cli(["calibrate", "--savings", str(table), "--db",
                            str(tmp_path / "db.sqlite")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(table) in lines[0], err
    assert "must be UTF-8" in lines[0]


def test_predict_needs_savings_and_savings_excludes_measurements(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text(ROW + "clear,regular,avg,skip-levels,20\n")
    code, _, err = run_cli(["calibrate", "m.csv", "--predict", str(table)], capsys)
    assert code == 2 and "need --savings" in err
    code, _, err = run_cli(["calibrate", "m.csv", "--savings", str(table)], capsys)
    assert code == 2 and "not both" in err
    code, _, err = run_cli(["calibrate"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
