"""Savings as exact intervals over a profile's cost ranges, and the first
split against the steady state.

Expected values come from independent paths: every vertex of the cost box
enumerated by brute force, the Charnes-Cooper linear program solved by
scipy's linprog, the stored counts of the cells, and a run with more
iterations.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy.optimize import linprog

from _cli import one_line, run_cli
from s2split.estimate.cost import load_profile
from s2split.estimate.intervals import fmt_interval, interval_of, mean_interval, ratio_extremes
from s2split.storage.store import Store

SMALL = ["--size", "64M", "--granule", "4K,16K", "--backing", "thp", "--workers", "1",
         "--no-progress"]
#: A few keys that price the walks skip-levels changes, and one it does not.
RANGED = {"split:visit_leaf": [1, 8], "read_leaf@3": [1, 6],
          "create_unlinked:visit_leaf": [15, 60], "dsb_ish": [100, 1000]}


def _profile_file(tmp_path, ranges: dict | None, name: str = "few-ranges") -> str:
    """server-vhe's costs and features, with only ``ranges`` ranged."""
    base = load_profile("server-vhe")
    data = {"format": "s2split-profile/1", "name": name, "features": vars(base.features),
            "unit_costs_ns": base.unit_costs_ns}
    if ranges is not None:
        data["ranges_ns"] = ranges
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


# -- the method against brute force and the linear program ------------------------------

def _charnes_cooper(v, b, low, high, sign):
    """min (sign=1) or max (-1) of (v.c)/(b.c) over the box, as the LP in
    (y, t) with y = t c, b.y = 1, t low <= y <= t high, t >= 0."""
    n = len(v)
    cost = np.append(sign * v, 0.0)
    a_eq = np.append(b, 0.0)[None, :]
    rows = [np.append(-np.eye(n)[i], low[i]) for i in range(n)] + \
        [np.append(np.eye(n)[i], -high[i]) for i in range(n)]
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.zeros(2 * n), A_eq=a_eq, b_eq=[1.0],
                  bounds=[(None, None)] * n + [(0, None)], method="highs")
    assert res.status == 0
    return sign * res.fun


def test_extremes_are_those_of_the_vertices_and_of_the_lp():
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 7))
        b = rng.integers(0, 1000, n).astype(float)
        v = np.minimum(b, rng.integers(0, 1000, n)).astype(float)
        low = rng.uniform(0.1, 5, n)
        high = low + rng.uniform(0, 5, n) * (rng.random(n) < 0.7)
        point = low + (high - low) * rng.random(n)
        if b @ low <= 0:
            continue
        (lo, c_lo), (hi, c_hi) = ratio_extremes(v, b, low, high, point)
        vertices = [np.array(c) for c in itertools.product(*zip(low, high))]
        ratios = [(v @ c) / (b @ c) for c in vertices]
        assert lo == pytest.approx(min(ratios), rel=1e-12, abs=1e-15)
        assert hi == pytest.approx(max(ratios), rel=1e-12, abs=1e-15)
        # the vertices returned attain them
        assert (v @ c_lo) / (b @ c_lo) == lo and (v @ c_hi) / (b @ c_hi) == hi
        assert lo == pytest.approx(_charnes_cooper(v, b, low, high, 1), rel=1e-7, abs=1e-9)
        assert hi == pytest.approx(_charnes_cooper(v, b, low, high, -1), rel=1e-7, abs=1e-9)


def test_no_range_is_a_point_and_the_mean_is_exact_or_an_outer_bound():
    b, v = np.array([3.0, 5.0]), np.array([1.0, 5.0])
    point = np.array([2.0, 1.0])
    iv = interval_of(v, b, point, point, point)
    assert iv.low == iv.point == iv.high
    assert fmt_interval(iv.point, iv.low, iv.high) == f"{iv.point:.1f}%"
    # Two cells whose savings rise with opposite costs: no one vertex gives
    # both their maximum, so the mean of the maxima is only an outer bound.
    low, high = np.array([1.0, 1.0]), np.array([2.0, 2.0])
    b1, v1 = np.array([1.0, 1.0]), np.array([0.0, 1.0])  # saves cost 0's share
    b2, v2 = np.array([1.0, 1.0]), np.array([1.0, 0.0])  # saves cost 1's share
    p1 = interval_of(v1, b1, low, (low + high) / 2, high)
    p2 = interval_of(v2, b2, low, (low + high) / 2, high)
    m = mean_interval([p1, p2], [(b1, v1), (b2, v2)])
    # By hand: each saving spans 1/3..2/3 (c0/(c0+c1) over [1,2]^2); the mean
    # is 50% at every point of the box, so 33.3..66.7 is an outer bound.
    assert (p1.low, p1.high) == pytest.approx((100 / 3, 200 / 3))
    assert (m.low, m.high) == pytest.approx((100 / 3, 200 / 3)) and not m.exact
    # The same cell twice: one vertex gives both their extreme, so it is exact.
    m2 = mean_interval([p1, p1], [(b1, v1), (b1, v1)])
    assert m2.exact and (m2.low, m2.high) == (p1.low, p1.high)


# -- reproduce: the printed interval is the brute-force one ------------------------------

@pytest.fixture(scope="module")
def few(tmp_path_factory):
    d = tmp_path_factory.mktemp("intervals")
    db = str(d / "r.sqlite")
    ranged = _profile_file(d, RANGED)
    code_out = {}
    from s2split.cli.parser import main
    import contextlib
    import io
    for key, prof, extra in (("ranged", ranged, []), ("plain", _profile_file(d, None, "plain"),
                                                      []),
                             ("ranged3", ranged, ["--iterations", "3"])):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["reproduce", *SMALL, *extra, "--db", db, "--profile", prof, "--json"])
        assert code == 0, err.getvalue()
        code_out[key] = json.loads(out.getvalue())
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["reproduce", *SMALL, "--db", db, "--profile", ranged])
    assert code == 0, err.getvalue()
    return {"db": db, "profile": ranged, "text": out.getvalue(), **code_out}


def _phase_sums(db: str, profile, iterations: int = 2) -> dict:
    """Per (granule, scenario, variant): the cost-key coefficients of the
    scenario's syscalls, from the stored counts."""
    store = Store.open(db, create=False)
    try:
        out = {}
        for c in store.cells():
            if c.config["iterations"] != iterations:
                continue
            manual = c.config["manual_protect"]
            names = [f"iter{i}_clear_dirty_log" for i in range(1, iterations + 1)] if manual \
                else ["enable_dirty_logging"]
            out[(c.config["granule"], "clear" if manual else "enable", c.variant)] = \
                sum(profile.coefficients(c.phase(n)) for n in names)
        return out
    finally:
        store.close()


def test_printed_interval_is_the_brute_force_one(few):
    """For every cell, JSON and text give min and max over the 2^4 vertices of
    the four ranged costs (the other costs at their point)."""
    profile = load_profile(few["profile"])
    coef = _phase_sums(few["db"], profile)
    low, point, high = profile.bounds()
    ranged = [profile.keys.index(k) for k in RANGED]
    assert sum(high > low) == len(RANGED)
    checked = 0
    flat = " ".join(few["text"].split())
    for row in few["ranged"]["rows"]:
        if row["variant"] == "vanilla":
            continue
        for gname, g in (("4K", 4096), ("16K", 16384)):
            b, v = coef[(g, row["scenario"], "vanilla")], coef[(g, row["scenario"],
                                                               row["variant"])]
            savings = []
            for corner in itertools.product(*((low[i], high[i]) for i in ranged)):
                c = point.copy()
                c[ranged] = corner
                savings.append(100 * (1 - (v @ c) / (b @ c)))
            assert row["time_saved_pct_low"][gname] == pytest.approx(min(savings), abs=1e-9)
            assert row["time_saved_pct_high"][gname] == pytest.approx(max(savings), abs=1e-9)
            assert min(savings) < row["time_saved_pct"][gname] < max(savings)
            text = f"{row['time_saved_pct'][gname]:.1f}% ({min(savings):.1f}-{max(savings):.1f})"
            assert text in flat
            checked += 1
        assert row["time_saved_pct_avg_interval"].startswith(("exact", "outer bound"))
        for end in ("low", "high"):
            vals = [row[f"time_saved_pct_{end}"][g] for g in ("4K", "16K")]
            assert row[f"time_saved_pct_{end}"]["avg"] == pytest.approx(sum(vals) / 2)
    assert checked == 2 * 2 * 2  # scenarios x variants x granules


def test_a_profile_without_ranges_gives_zero_width(few):
    for row in few["plain"]["rows"]:
        for k, p in row["time_saved_pct"].items():
            assert row["time_saved_pct_low"][k] == row["time_saved_pct_high"][k] == p
    assert few["plain"]["intervals_are"] and "estimates" in few["plain"]["times_are"]


# -- first split and steady state --------------------------------------------------------

def test_parts_add_up_to_the_total_and_extrapolate_to_more_iterations(few):
    """The parts' points sum to the total saving; their vanilla times to the
    total's. Extrapolated from -i 2, the total at -i 3 is the -i 3 run's (its
    third CLEAR repeats the second, which the run checks)."""
    from s2split.tasks.per_iteration import Part, at_iterations
    for row in few["ranged"]["rows"]:
        if row["variant"] == "vanilla":
            continue
        for g, parts in row["time_saved_by_part"].items():
            assert [p["part"] for p in parts] == (
                ["first CLEAR", "steady-state CLEARs"] if row["scenario"] == "clear"
                else ["enable"])
            assert sum(p["points_of_total"] for p in parts) == \
                pytest.approx(row["time_saved_pct"][g], abs=1e-9)
    rows3 = {(r["scenario"], r["variant"]): r for r in few["ranged3"]["rows"]}
    for row in few["ranged"]["rows"]:
        if row["variant"] == "vanilla" or row["scenario"] != "clear":
            continue
        for g, parts in row["time_saved_by_part"].items():
            ps = [Part(p["part"], tuple(p["phases"]), p["vanilla_est_ns"], p["variant_est_ns"],
                       None, p["points_of_total"]) for p in parts]
            three = rows3[("clear", row["variant"])]
            steady3 = three["time_saved_by_part"][g][1]
            assert len(steady3["phases"]) == 2
            assert at_iterations(ps, 3) == pytest.approx(three["time_saved_pct"][g], rel=1e-9)
            assert at_iterations(ps, 2) == pytest.approx(row["time_saved_pct"][g], rel=1e-12)


def test_text_says_the_total_depends_on_iterations(few):
    assert "depends on --iterations" in few["text"]
    assert "Measured: nothing" in few["text"]


# -- profiles: ranges and provenance ----------------------------------------------------

@pytest.mark.parametrize("ranges,prov,needle", [
    ({"split:visit_leaf": [4, 8]}, None, "does not hold its unit cost 3"),
    ({"nonsense_key": [1, 2]}, None, "ranges_ns names 'nonsense_key', which has no unit cost"),
    ({"split:visit_leaf": [1]}, None, "malformed profile"),
    ({"split:visit_leaf": [-1, 4]}, None, "malformed profile"),
    (None, {"map:visit_leaf@9": "x"}, "provenance_by_key names"),
])
def test_bad_ranges_are_one_line_errors(tmp_path, capsys, ranges, prov, needle):
    path = _profile_file(tmp_path, ranges)
    if prov is not None:
        data = json.loads(open(path).read())
        data["provenance_by_key"] = prov
        open(path, "w").write(json.dumps(data))
    code, _, err = run_cli(["reproduce", "--size", "64M", "--profile", path, "--db",
                            str(tmp_path / "x.sqlite")], capsys)
    assert code == 2
    one_line(err, needle)
    assert not (tmp_path / "x.sqlite").exists()


def test_shipped_profiles_range_and_explain_every_key(tmp_path):
    from s2split.estimate.cost import builtin_profiles
    for name in builtin_profiles():
        p = load_profile(name)
        assert set(p.provenance_by_key) == set(p.unit_costs_ns), name
        low, point, high = p.bounds()
        assert (low <= point).all() and (point <= high).all()
        # every key with a non-zero cost has a range of some width
        assert all(p.ranges_ns.get(k, (0, 0))[1] > p.ranges_ns.get(k, (0, 0))[0]
                   for k, v in p.unit_costs_ns.items() if v), name
    # A child that sets a cost again drops the parent's range unless it gives one.
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"format": "s2split-profile/1", "name": "child",
                                 "inherits": "server-vhe",
                                 "unit_costs_ns": {"split:visit_leaf": 9}}))
    c = load_profile(str(child))
    assert "split:visit_leaf" not in c.ranges_ns and "split:visit_leaf" not in \
        c.provenance_by_key
    assert c.ranges_ns["read_leaf@3"] == load_profile("server-vhe").ranges_ns["read_leaf@3"]
