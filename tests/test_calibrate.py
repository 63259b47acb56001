"""``s2split calibrate``: recovering known unit costs from synthetic measurements,
reporting what the data cannot determine, and refusing bad input in one line.

The measurements are generated here from a "truth" profile and the model's
exact counts; which keys the data determine is derived independently of the
fitting code: from each key's column (the change of the estimate when only that
key's cost changes, through :class:`~s2split.estimate.cost.Profile`) and ranks.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from s2split.tasks.calibrate import params_of

from _cli import run_cli as cli
from s2split.estimate.cost import Profile, load_profile
from s2split.model.pgtable.variants import get as get_variant
from s2split.workload import run_perf_test

BASE = "server-vhe"
# Small configurations (the reference engine runs each in well under a second).
CONFIGS = [
    "-m 6 -b 16M -k 2M",
    "-m 6 -b 16M -k 2M -g",
    "-m 6 -b 16M -k 2M -s anonymous_thp",
    "-m 6 -b 16M -k 2M -s anonymous_thp --variant skip-levels",
    "-m 6 -b 16M -k 2M -s anonymous_hugetlb_1gb -v 2",
]
TRUTH = {"read_leaf": 3.7, "visit_leaf": 11.0, "pte_write": 2.25, "dsb_ish": 180.0}
UNUSED = "page_freed"  # only the destroy walk frees table pages
SKIPPED_PHASES = ("create_vm", "destroy_vm")


def with_costs(profile: Profile, **costs: float) -> Profile:
    return replace(profile, unit_costs_ns={**profile.unit_costs_ns, **costs})


def upstream_label(phase: str) -> str:
    """The line dirty_log_perf_test prints for a phase."""
    fixed = {"populate": "Populate memory time", "enable_dirty_logging":
             "Enabling dirty logging time", "disable_dirty_logging":
             "Disabling dirty logging time"}
    if phase in fixed:
        return fixed[phase]
    m = re.fullmatch(r"iter(\d+)_(dirty|get_dirty_log|clear_dirty_log)", phase)
    assert m, phase
    what = {"dirty": "dirty memory", "get_dirty_log": "get dirty log",
            "clear_dirty_log": "clear dirty log"}[m.group(2)]
    return f"Iteration {m.group(1)} {what} time"



@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


@pytest.fixture(scope="module")
def model():
    """Counts of every measured phase: (options, phase, Counts)."""
    base = load_profile(BASE)
    rows = []
    for options in CONFIGS:
        params, variant = params_of(options, "test", base)
        res = run_perf_test(params, get_variant(variant), "reference")
        for name, counts in res.phases:
            if name not in SKIPPED_PHASES:
                rows.append((options, name, counts))
    return base, rows


def columns(base: Profile, rows, keys: list[str]) -> np.ndarray:
    """A[i, j]: what one nanosecond more on key j adds to measurement i."""
    A = np.zeros((len(rows), len(keys)))
    for j, k in enumerate(keys):
        hi, lo = with_costs(base, **{k: 1.0}), with_costs(base, **{k: 0.0})
        A[:, j] = [hi.estimate_ns(c) - lo.estimate_ns(c) for _, _, c in rows]
    return A


def expected_determined(A: np.ndarray) -> list[bool]:
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    B = A / scale
    rank = np.linalg.matrix_rank(B)
    return [bool(B[:, j].any()) and np.linalg.matrix_rank(np.delete(B, j, axis=1)) < rank
            for j in range(B.shape[1])]


def write_measurements(path: Path, rows, truth: Profile, fmt: str) -> None:
    secs = [(o, n, truth.estimate_ns(c) / 1e9) for o, n, c in rows]
    assert all(s > 0 for _, _, s in secs)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["options", "phase", "seconds"])
        for o, n, s in secs:
            w.writerow([o, upstream_label(n), repr(s)])
        path.write_text(out.getvalue())
    else:
        path.write_text(json.dumps([{"options": o, "phase": n, "seconds": s}
                                    for o, n, s in secs]))


def key_rows(out: str, keys: list[str]) -> dict[str, list[str]]:
    """The fitted-costs table: key -> its cells."""
    found = {}
    for line in out.splitlines():
        cells = [x.strip() for x in line.split("│")[1:-1]]
        if cells and cells[0] in keys and cells[0] not in found:
            found[cells[0]] = cells
    assert set(found) == set(keys), out
    return found


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_recovers_known_costs(model, tmp_path, capsys, fmt):
    base, rows = model
    truth = with_costs(base, **TRUTH)
    keys = [*TRUTH, UNUSED]
    A = columns(base, rows, keys)
    determined = dict(zip(keys, expected_determined(A)))
    # The data pin down every changed key, and nothing of the unused one.
    assert not A[:, keys.index(UNUSED)].any()
    assert determined == {**{k: True for k in TRUTH}, UNUSED: False}

    meas = tmp_path / f"m.{fmt}"
    write_measurements(meas, rows, truth, fmt)
    out_file = tmp_path / "fitted.json"
    code, out, err = cli(["calibrate", str(meas), "--fit", ",".join(keys), "--engine",
                          "reference", "--name", "fitted", "-o", str(out_file)], capsys)
    assert code == 0, err

    fitted = load_profile(str(out_file))
    assert fitted.name == "fitted"
    assert fitted.features == base.features
    for k, v in base.unit_costs_ns.items():
        if k in TRUTH:
            assert fitted.unit_costs_ns[k] == pytest.approx(TRUTH[k], rel=1e-6), k
        else:  # not fitted, or not determined: the starting value, exactly
            assert fitted.unit_costs_ns[k] == v, k
    assert set(fitted.unit_costs_ns) == set(base.unit_costs_ns)
    table = key_rows(out, keys)
    for k in keys:
        assert table[k][3] == ("yes" if determined[k] else "no: kept the starting value"), k
    assert "RMS relative residual: 0.00%" in out
    assert f"keys {', '.join(TRUTH)} determined" in fitted.provenance
    # Residuals, independently: the fitted profile prices every measurement.
    for _, _, c in rows:
        assert fitted.estimate_ns(c) == pytest.approx(truth.estimate_ns(c), rel=1e-9)

    # The fitted profile works for perf-test, and prices a new configuration
    # as the truth does.
    code, out, err = cli(["perf-test", "-m", "6", "-b", "4M", "-s", "anonymous_thp",
                          "--variant", "vanilla", "--variant", "skip-levels", "--engine",
                          "reference", "--profile", str(out_file), "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["profile"] == "fitted"
    from s2split.counting.counts import Counts
    for v in ("vanilla", "skip-levels"):
        for p in res["variants"][v]["phases"]:
            c = Counts.from_dict(p["counts"])
            assert p["estimate_ns"] == pytest.approx(truth.estimate_ns(c), rel=1e-6), p["phase"]


def test_collinear_keys_are_not_determined(model, tmp_path, capsys):
    """Two counters that always come together in a fixed ratio: the data cannot
    split their cost, whatever the truth; both keep their starting values."""
    base, rows = model
    a, b = "dsb_nshst", "dsb_nsh"
    keys = [a, b, "read_leaf"]
    A = columns(base, rows, keys)
    assert A[:, 0].any() and A[:, 1].any()
    ratio = A[:, 1][A[:, 0] > 0] / A[:, 0][A[:, 0] > 0]
    assert np.all(ratio == ratio[0]) and np.all((A[:, 0] > 0) == (A[:, 1] > 0))
    r = float(ratio[0])
    assert expected_determined(A) == [False, False, True]
    # A truth that moves cost between the two without changing their sum.
    delta = 5.0
    truth = with_costs(base, read_leaf=3.7, **{a: base.unit_costs_ns[a] + r * delta,
                                              b: base.unit_costs_ns[b] - delta})
    assert truth.unit_costs_ns[b] > 0
    meas = tmp_path / "m.csv"
    write_measurements(meas, rows, truth, "csv")
    out_file = tmp_path / "fitted.json"
    code, out, err = cli(["calibrate", str(meas), "--fit", ",".join(keys), "--engine",
                          "reference", "-o", str(out_file)], capsys)
    assert code == 0, err
    fitted = load_profile(str(out_file))
    assert fitted.name == f"{BASE}-fit"
    assert fitted.unit_costs_ns["read_leaf"] == pytest.approx(3.7, rel=1e-6)
    assert fitted.unit_costs_ns[a] == base.unit_costs_ns[a] != truth.unit_costs_ns[a]
    assert fitted.unit_costs_ns[b] == base.unit_costs_ns[b] != truth.unit_costs_ns[b]
    table = key_rows(out, keys)
    assert [table[k][3] for k in keys] == ["no: kept the starting value"] * 2 + ["yes"]
    assert "RMS relative residual: 0.00%" in out


# -- bad input ---------------------------------------------------------------------

GOOD_ROW = "-m 6 -b 4M,populate,0.001\n"
HEADER = "options,phase,seconds\n"

BAD_INPUTS = [
    ("missing", None, "cannot read measurements"),
    ("directory", None, "cannot read measurements"),
    ("binary.csv", b"\xff\xfe\x00\x01garbage", "not a text file"),
    ("nocolumn.csv", "options,phase\n-m 6 -b 4M,populate\n", "needs the columns"),
    ("header-only.csv", HEADER, "no measurements"),
    ("dict.json", json.dumps({"options": "-m 6", "phase": "populate", "seconds": 1}),
     "expected a list"),
    ("notlist.json", json.dumps({"measurements": 5}), "expected a list"),
    ("items.json", json.dumps([1, 2]), "needs options, phase and seconds"),
    ("broken.json", '[{"options": "-m 6",', "not valid JSON"),
    ("empty.json", "[]", "no measurements"),
    ("text.csv", HEADER + "-m 6 -b 4M,populate,fast\n", "is not a number"),
    ("negative.csv", HEADER + "-m 6 -b 4M,populate,-0.5\n", "positive"),
    ("zero.csv", HEADER + "-m 6 -b 4M,populate,0\n", "positive"),
    ("nan.csv", HEADER + "-m 6 -b 4M,populate,nan\n", "positive"),
    ("inf.csv", HEADER + "-m 6 -b 4M,populate,inf\n", "positive"),
    ("bool.json", json.dumps([{"options": "-m 6 -b 4M", "phase": "populate",
                               "seconds": True}]), "is not a number"),
    ("phase.csv", HEADER + GOOD_ROW + "-m 6 -b 4M,warp drive,1\n", "unknown phase"),
    ("nophase.csv", HEADER + "-m 6 -b 4M -g,iter1_clear_dirty_log,0.1\n", "has no phase"),
    ("option.csv", HEADER + "-m 6 -b 4M --bogus,populate,0.1\n", "bad options"),
    # memstress checks the host page size first (here the same 4K)
    ("size.csv", HEADER + "-m 6 -b 3K,populate,0.1\n", "not host page size"),
    ("variant.csv", HEADER + "-m 6 -b 4M --variant nope,populate,0.1\n", "unknown variant"),
    ("modes.csv", HEADER + "-m 6 -m 7 -b 4M,populate,0.1\n", "one guest mode"),
]


@pytest.mark.parametrize("existing", [True, False], ids=["output-exists", "no-output"])
@pytest.mark.parametrize("name,content,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_measurements_are_one_line_and_write_nothing(tmp_path, capsys, name, content,
                                                         needle, existing):
    path = tmp_path / name
    if name == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out_file = tmp_path / "out" / "profile.json"
    if existing:
        out_file.parent.mkdir()
        out_file.write_text("previous profile\n")
    code, out, err = cli(["calibrate", str(path), "--fit", "read_leaf", "--engine",
                          "reference", "-o", str(out_file)], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0]
    assert str(path) in lines[0]  # the message says which file (and row)
    if existing:
        assert out_file.read_text() == "previous profile\n"
        assert sorted(p.name for p in out_file.parent.iterdir()) == ["profile.json"]
    else:
        assert not out_file.parent.exists()


@pytest.mark.parametrize("args,needle", [
    (["--fit", "read_leaf,no_such_counter"], "unknown counter 'no_such_counter'"),
    (["--fit", "warp:read_leaf"], "unknown operation 'warp'"),
    (["--profile", "no-such-profile"], "unknown profile 'no-such-profile'"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, needle):
    path = tmp_path / "m.csv"
    path.write_text(HEADER + GOOD_ROW)
    out_file = tmp_path / "p.json"
    code, _, err = cli(["calibrate", str(path), *args, "--engine", "reference", "-o",
                        str(out_file)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert not out_file.exists()


def test_output_into_a_directory_is_one_line(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text(HEADER + GOOD_ROW)
    code, _, err = cli(["calibrate", str(path), "--fit", "read_leaf", "--engine", "reference",
                        "-o", str(tmp_path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "is a directory" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


def test_seconds_parse_like_upstream_prints_them(tmp_path, capsys):
    """A row's phase may be upstream's label and its seconds any positive float;
    a single measurement of a non-determined key is reported as such."""
    path = tmp_path / "m.csv"
    path.write_text(HEADER + '"-m 6 -b 4M",Populate memory time,1.5e-3\n')
    code, out, err = cli(["calibrate", str(path), "--fit", "read_leaf,page_freed", "--engine",
                          "reference"], capsys)
    assert code == 0, err
    table = key_rows(out, ["read_leaf", "page_freed"])
    assert table["page_freed"][3] == "no: kept the starting value"
    assert not math.isnan(float(table["read_leaf"][2]))


def test_calibrates_from_hw_measurements_in_the_store(model, tmp_path, capsys):
    # Measurements as `s2split hw run` stores them: the harness's configuration
    # (no perf-test options string), several repetitions per phase. Calibration
    # takes the median of each phase's repetitions, so one wild repetition per
    # phase (here 3x) must not move the fit.
    from s2split.tasks.calibrate import params_of
    from s2split.hw.params import HwParams
    from s2split.storage.store import Store

    base, _ = model
    truth = with_costs(base, **TRUTH)
    configs = [HwParams(vcpu_memory_bytes=16 << 20, chunk_size=2 << 20),
               HwParams(vcpu_memory_bytes=16 << 20, chunk_size=2 << 20, manual_protect=False),
               HwParams(vcpu_memory_bytes=16 << 20, chunk_size=2 << 20,
                        backing="anonymous_thp")]
    rows = []
    for hp in configs:
        params, _ = params_of(" ".join(hp.argv()), "test", base)
        for name, counts in run_perf_test(params, get_variant("vanilla"), "reference").phases:
            if name in SKIPPED_PHASES:
                continue
            s = truth.estimate_ns(counts) / 1e9
            for rep, factor in enumerate((1.0, 1.0, 3.0)):
                rows.append({"label": "host-a", "config_key": hp.config_key(),
                             "config": hp.to_config(), "phase": name, "repetition": rep,
                             "seconds": s * factor})
    db = tmp_path / "hw.sqlite"
    store = Store.open(db)
    store.add_measurements(rows)
    store.close()

    out_file = tmp_path / "fitted.json"
    code, out, err = cli(["calibrate", "host-a", "--db", str(db), "--fit", ",".join(TRUTH),
                          "--engine", "reference", "-o", str(out_file)], capsys)
    assert code == 0, err
    fitted = load_profile(str(out_file))
    for k, v in TRUTH.items():
        assert fitted.unit_costs_ns[k] == pytest.approx(v, rel=1e-6), k  # a mean would be off

    code, out, err = cli(["calibrate", "nobody", "--db", str(db)], capsys)
    assert code == 2 and "no measurements labelled 'nobody'" in err and err.count("\n") == 1


def test_store_measurements_run_on_the_hosts_page_size(tmp_path):
    # A 4K guest mode timed on a 16K host kernel: the model must use a 16K
    # stage-2, so the measurement's options say so; on a 4K host they do not.
    from s2split.tasks.calibrate import measurements_from_store
    from s2split.hw.params import HwParams
    from s2split.storage.store import Store
    hp = HwParams(vcpu_memory_bytes=16 << 20)
    db = tmp_path / "hw.sqlite"
    store = Store.open(db)
    for label, page in (("k16", 16384), ("k4", 4096)):
        store.add_measurements([{"label": label, "config_key": hp.config_key(),
                                 "config": hp.to_config(), "phase": "populate",
                                 "repetition": 0, "seconds": 0.5,
                                 "host": {"page_size": page}}])
    store.close()
    (m16,) = measurements_from_store(str(db), "k16")
    (m4,) = measurements_from_store(str(db), "k4")
    assert m16.options == " ".join(hp.argv()) + " --host-page-size 16K"
    assert m4.options == " ".join(hp.argv())
