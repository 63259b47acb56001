"""``s2split hw compare``: the statistics on synthetic samples, and the command."""

import json

import numpy as np
import pytest
from scipy import stats

from s2split.cli.parser import main
from s2split.plumbing.errors import S2Error
from s2split.hw.compare import compare_measurements, holm, sample_stats

KEY = "-m 6 -b 8M -s anonymous"
CONFIG = {"vcpu_memory_bytes": 8 << 20, "vcpus": 1, "backing": "anonymous",
          "manual_protect": True, "iterations": 2, "mode": "P40V48_4K", "mode_id": 6,
          "pa_bits": 40, "granule": 4096, "slots": 1, "write_percent": 100,
          "random_access": False, "partition": True, "seed": 1, "chunk_size": None,
          "seed_synced": False, "arch": "arm64"}


def rows(label, samples, key=KEY, config=CONFIG, host=None):
    """Measurement rows: {phase: [seconds per repetition]}."""
    out = []
    for phase, values in samples.items():
        for rep, v in enumerate(values):
            out.append({"label": label, "config_key": key, "config": config, "phase": phase,
                        "repetition": rep, "seconds": float(v), "source": "test",
                        "host": host or {"kernel_release": label}})
    return out


def lognormal(rng, n, median, sigma=0.04):
    return median * rng.lognormal(0.0, sigma, n)


def test_recovers_a_known_shift():
    rng = np.random.default_rng(7)
    a = lognormal(rng, 25, 0.100)
    b = lognormal(rng, 25, 0.120)  # 20% slower
    st = sample_stats(a, b, seed=1)
    assert st.ci_low < 0.20 < st.ci_high  # the true shift is inside the 95% CI
    assert 0.12 < st.change < 0.28
    assert st.ci_low > 0.05  # and the CI excludes no change, by a margin
    rep = compare_measurements(rows("A", {"populate": a}), rows("B", {"populate": b}))
    row, = rep.rows
    assert row.regression and row.verdict.startswith("REGRESSION: slower by +")
    assert row.p_adjusted < 1e-6


def test_faster_is_not_a_regression():
    rng = np.random.default_rng(8)
    a, b = lognormal(rng, 15, 0.100), lognormal(rng, 15, 0.080)
    row, = compare_measurements(rows("A", {"populate": a}), rows("B", {"populate": b})).rows
    assert not row.regression and row.verdict.startswith("faster by -")


def test_no_difference_between_samples_of_one_distribution():
    # Over many pairs from one distribution, "no significant difference" is the
    # answer about 1 - alpha of the time (a single pair is "significant" with
    # probability alpha: that is what alpha means), the CI holds 0 about 95% of
    # the time, and the noise, well below the threshold, is never a regression.
    rng = np.random.default_rng(11)
    same = ci_holds_zero = regressions = 0
    trials = 200
    for _ in range(trials):
        a, b = lognormal(rng, 10, 0.1, sigma=0.02), lognormal(rng, 10, 0.1, sigma=0.02)
        row, = compare_measurements(rows("A", {"p": a}), rows("B", {"p": b})).rows
        same += row.verdict == "no significant difference"
        ci_holds_zero += row.stats.ci_low <= 0 <= row.stats.ci_high
        regressions += row.regression
    assert same / trials > 0.90
    assert ci_holds_zero / trials > 0.85
    assert regressions == 0


def test_unequal_sample_counts():
    rng = np.random.default_rng(3)
    a, b = lognormal(rng, 9, 0.100), lognormal(rng, 31, 0.150)
    st = sample_stats(a, b, seed=0)
    assert (st.n_a, st.n_b) == (9, 31)
    assert st.median_a == pytest.approx(np.median(a)) and st.median_b == pytest.approx(np.median(b))
    assert st.p_value == pytest.approx(stats.mannwhitneyu(a, b).pvalue)
    assert st.ci_low < st.change < st.ci_high
    assert st.ci_low < 0.5 < st.ci_high
    # swapping the sides mirrors the test
    back = sample_stats(b, a, seed=0)
    assert back.p_value == pytest.approx(st.p_value)
    assert back.change == pytest.approx(1 / (1 + st.change) - 1)


def test_warnings_few_repetitions_and_unstable_samples():
    rng = np.random.default_rng(5)
    a, b = lognormal(rng, 4, 0.1, sigma=0.4), lognormal(rng, 4, 0.1, sigma=0.01)
    row, = compare_measurements(rows("A", {"p": a}), rows("B", {"p": b})).rows
    assert any("only 4 repetitions (9 or more recommended)" in w for w in row.warnings)
    assert any(w.startswith("unstable A: coefficient of variation") for w in row.warnings)
    assert not any(w.startswith("unstable B") for w in row.warnings)
    # one measurement each: nothing can be tested, and we say so
    row, = compare_measurements(rows("A", {"p": [1.0]}), rows("B", {"p": [2.0]})).rows
    assert row.verdict.startswith("too few samples") and not row.regression


def test_holm_correction():
    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    # 40 phases of pure noise: the correction keeps false alarms away
    rng = np.random.default_rng(99)
    samples_a = {f"iter{i}_dirty": lognormal(rng, 10, 0.1) for i in range(40)}
    samples_b = {f"iter{i}_dirty": lognormal(rng, 10, 0.1) for i in range(40)}
    rep = compare_measurements(rows("A", samples_a), rows("B", samples_b))
    assert not rep.regressions


def test_totals_are_derived_per_repetition():
    a = {"iter1_get_dirty_log": [1.0, 2.0], "iter2_get_dirty_log": [3.0, 4.0]}
    b = {"iter1_get_dirty_log": [1.0, 2.0], "iter2_get_dirty_log": [3.0, 5.0]}
    rep = compare_measurements(rows("A", a), rows("B", b))
    total = next(r for r in rep.rows if r.phase == "get_dirty_log_total")
    assert (total.stats.median_a, total.stats.median_b) == (5.0, 5.5)  # (4+6)/2, (4+7)/2


def test_configurations_in_one_set_only_are_noted():
    rep = compare_measurements(rows("A", {"p": [1, 1.1]}) + rows("A", {"p": [1]}, key="other"),
                               rows("B", {"p": [1, 1.1]}))
    assert any("'other' is measured only under 'A'" in n for n in rep.notes)
    with pytest.raises(S2Error, match="no configuration and phase in common"):
        compare_measurements(rows("A", {"p": [1]}), rows("B", {"q": [1]}))


def test_model_estimates_side_by_side():
    rng = np.random.default_rng(1)
    phases = ["populate", "enable_dirty_logging", "iter1_dirty", "iter1_get_dirty_log"]
    a = {p: lognormal(rng, 5, 0.01) for p in phases}
    rep = compare_measurements(rows("A", a), rows("B", a), model=True)
    assert rep.profile == "server-vhe"
    assert all(r.model_ns is not None and r.model_ns > 0 for r in rep.rows
               if r.phase in ("populate", "enable_dirty_logging", "iter1_get_dirty_log"))
    x86 = dict(CONFIG, arch="x86_64")
    rep = compare_measurements(rows("A", a, config=x86), rows("B", a, config=x86), model=True)
    assert all(r.model_ns is None for r in rep.rows)
    assert "the model is of arm64 KVM" in rep.model_notes[KEY]
    # The model runs on the host's page size (the stage-2 granule): a 4K guest
    # mode on a 16K host is modelled with a 16K stage-2, which differs from
    # the 4K host's estimate; hosts of mixed page sizes get no estimate.
    def estimates(page_size):
        host = {"kernel_release": "A", "page_size": page_size}
        rep = compare_measurements(rows("A", a, host=host), rows("B", a), model=True)
        assert rep.model_notes == {}
        return {r.phase: r.model_ns for r in rep.rows}
    on4k, on16k = estimates(4096), estimates(16384)
    assert on4k == {r.phase: r.model_ns for r in
                    compare_measurements(rows("A", a), rows("B", a), model=True).rows}
    assert on16k["populate"] != on4k["populate"]
    mixed = rows("A", a, host={"page_size": 4096}) + rows("A", {"populate": [0.01]},
                                                          host={"page_size": 16384})
    rep = compare_measurements(mixed, rows("B", a), model=True)
    assert "hosts with different page sizes (4K, 16K)" in rep.model_notes[KEY]


def store_with(tmp_path, *row_sets):
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    s = Store.open(db)
    for r in row_sets:
        s.add_measurements(r)
    s.close()
    return str(db)


def test_cli_exit_status(tmp_path, capsys):
    rng = np.random.default_rng(2)
    base = {"populate": lognormal(rng, 12, 0.1), "iter1_dirty": lognormal(rng, 12, 0.2)}
    same = {"populate": lognormal(rng, 12, 0.1), "iter1_dirty": lognormal(rng, 12, 0.2)}
    slow = {"populate": lognormal(rng, 12, 0.13), "iter1_dirty": lognormal(rng, 12, 0.2)}
    db = store_with(tmp_path, rows("v6.12", base), rows("v6.13", same), rows("bad", slow))
    assert main(["hw", "compare", "v6.12", "v6.13", "--db", db, "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "no significant difference" in out and "no regression beyond 5%" in out
    assert main(["hw", "compare", "v6.12", "bad", "--db", db, "--no-model"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "1 regression beyond 5%" in out
    # a threshold above the shift: significant, but not a regression
    assert main(["hw", "compare", "v6.12", "bad", "--db", db, "--no-model",
                 "--threshold", "50"]) == 0
    assert "within the 50% threshold" in capsys.readouterr().out
    assert main(["hw", "compare", "v6.12", "bad", "--db", db, "--no-model", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["regressions"] == 1 and {r["phase"] for r in doc["rows"]} >= {"populate"}


def test_cli_unknown_label_is_one_line(tmp_path, capsys):
    db = store_with(tmp_path, rows("v6.12", {"populate": [1.0]}))
    assert main(["hw", "compare", "v6.12", "nope", "--db", db]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no measurements labelled 'nope'" in err[0] and "v6.12" in err[0]


@pytest.mark.parametrize("opt,value,needle", [
    ("--alpha", "1.5", "--alpha must be between 0 and 1"),
    ("--alpha", "0", "--alpha must be between 0 and 1"),
    ("--alpha", "nan", "must be a finite number"),
    ("--threshold", "inf%", "must be a finite number"),
    ("--max-cv", "lots", "--max-cv 'lots' is not a number"),
])
def test_cli_bad_statistics_options_are_one_line(tmp_path, capsys, opt, value, needle):
    db = store_with(tmp_path, rows("v6.12", {"populate": [1.0]}),
                    rows("v6.13", {"populate": [1.0]}))
    with pytest.raises(SystemExit) as e:
        main(["hw", "compare", "v6.12", "v6.13", "--db", db, f"{opt}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
