"""``s2split fidelity`` on the Linux 7.3 fixtures: the rules come from each
fixture's kernel_release, the 6.17+ teardown names are known, DAMON_STAT's
age walks are background (shown with their cause, never compared), the walk
counts around them are compared as bounds derived from them, and create_vm,
which these fixtures did not count, is skipped with a note."""

import json
from pathlib import Path

import pytest

from s2split.cli.parser import main
from s2split.tasks.fidelity import check_fixture, describe_fixture, load_fixture

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-kernel-7.3"
FIXTURES = sorted(SHARED.glob("*.json"))

pytestmark = pytest.mark.skipif(not FIXTURES, reason="Linux 7.3 fixtures not found")


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_compared_count_matches(path):
    checks = check_fixture(str(path), engine="reference")
    for chk in checks:
        assert chk.layout_ok, chk.layout_note
        assert chk.params.kernel == "7.3" and chk.params.selftest == "6.12"
        assert chk.compared > 50
        assert chk.mismatches == [], [(r.phase, r.function, r.key, r.kernel, r.lo, r.hi)
                                      for r in chk.mismatches]
        assert any("create_vm" in n and "not counted" in n for n in chk.notes)


def test_age_walks_are_background_and_bound_the_walk_counts():
    path = next(p for p in FIXTURES if "nodamon" not in p.name and "thp" in p.name)
    chk = check_fixture(str(path), engine="reference")[0]  # -g
    age = [r for r in chk.rows if r.key == "cb=stage2_age_walker"]
    assert age and not any(r.compared for r in age)
    assert all("DAMON_STAT" in r.note for r in age)
    # iter1_dirty: 151 age walks in the phase, 7 in enable_dirty_logging
    # before it and 13 in iter1_get_dirty_log after it -> 171 nearby.
    walk = next(r for r in chk.rows if (r.phase, r.function, r.key) ==
                ("iter1_dirty", "kvm_pgtable_walk", ""))
    assert (walk.lo, walk.hi, walk.kernel) == (65536 + 151, 65536 + 151, 65687)
    loops = next(r for r in chk.rows if (r.phase, r.function, r.key) ==
                 ("iter1_dirty", "__kvm_pgtable_walk", ""))
    # 65,536 relax faults walk 3 levels (start level 1 on 4K/40-bit)
    assert (loops.model, loops.lo, loops.hi) == (3 * 65536, 3 * 65536, 3 * 65536 + 3 * 171)
    assert "iter1_dirty" in chk.bound_notes and "background" in chk.bound_notes["iter1_dirty"]


def test_nodamon_fixture_has_no_background_bounds():
    path = next(p for p in FIXTURES if "nodamon" in p.name)
    for chk in check_fixture(str(path), engine="reference"):
        assert not any("background" in r.note for r in chk.rows)
        assert all(r.function == "__kvm_mmu_topup_memory_cache" for r in chk.rows
                   if r.compared and r.bound)


def _mutated(tmp_path, edit):
    src = next(p for p in FIXTURES if "nodamon" not in p.name and "thp" in p.name)
    data = json.loads(src.read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    return bad


def test_a_count_beyond_the_background_bound_differs(tmp_path, capsys):
    def edit(data):
        ph = next(p for p in data["runs"][0]["phases"] if p["phase"] == "iter1_dirty")
        ph["calls"]["kvm_pgtable_walk"] += 1  # one walk neither the model's nor aging's
    assert main(["fidelity", "--engine", "reference", str(_mutated(tmp_path, edit))]) == 1
    assert "1 compared count(s) differ" in capsys.readouterr().out


def test_the_6_12_rules_would_not_fit_a_7_3_fixture(tmp_path):
    # The check can fail on the kernel it assumes: named 6.12, the teardown
    # functions of the fixture are 6.17+ names the 6.12 model never calls.
    def edit(data):
        data["kernel_release"] = "6.12.117+deb13-arm64"
    chk = check_fixture(str(_mutated(tmp_path, edit)), engine="reference")[0]
    rows = [r for r in chk.rows if r.function == "kvm_pgtable_stage2_destroy_range"]
    assert rows and rows[0].model == 0 and rows[0].kernel == 1024


def test_unmodelled_release_is_one_note(tmp_path):
    def edit(data):
        data["kernel_release"] = "7.1.0-arm64"
    path = _mutated(tmp_path, edit)
    desc = describe_fixture(str(path), load_fixture(path))
    assert desc.kernel == "6.19"
    lines = [n for n in desc.notes if "not modelled" in n]
    assert len(lines) == 1 and "nearest modelled kernel" in lines[0]


def test_cli_names_the_modelled_kernel(capsys):
    assert main(["fidelity", "--engine", "reference", *map(str, FIXTURES)]) == 0
    out = capsys.readouterr().out
    assert out.count("modelled kernel: Linux 7.3") == len(FIXTURES)
    assert out.count("all compared counts match") == 2 * len(FIXTURES)
