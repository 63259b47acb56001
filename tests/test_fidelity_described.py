"""fidelity honours what a fixture says ran (selftest_variant, kernel_variant),
reports what it does not understand, compares interleaving-dependent counts as
bounds, and ends with a summary. The fixtures here are small and made from the
model's own counts, then changed the way a real kernel could differ."""

import copy
import json

from s2split.cli.parser import main
from s2split.tasks.fidelity import FIXTURE_FORMAT, check_fixture, params_from_command
from s2split.counting.kernel_counters import kernel_counts
from s2split.model.pgtable.variants import get
from s2split.workload import run_perf_test

SMALL = "dirty_log_perf_test -v 2 -b 1M -s anonymous -i 2 -m 6 -k 2M -g"


def model_fixture(command, variant="vanilla", seed_synced=False, **top):
    """A fixture holding exactly the model's counts of ``command``."""
    params = params_from_command(command, "t", 52, seed_synced)
    res = run_perf_test(params, get(variant), "reference")
    phases = []
    for name, counts in res.phases:
        kc = kernel_counts(counts)
        phases.append({"phase": name, "calls": {f: v["calls"] for f, v in kc.items()},
                       "detail": {f: v["detail"] for f, v in kc.items()}})
    label = "manual_protect" if params.manual_protect else "no_manual_protect"
    return {"format": FIXTURE_FORMAT, "kernel_release": "model", **top,
            "runs": [{"label": label, "command": command, "phases": phases}]}


def write(tmp_path, data, name="f.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def phase(data, name):
    return next(p for p in data["runs"][0]["phases"] if p["phase"] == name)


# -- selftest_variant / kernel_variant -------------------------------------------------

def test_seedfix_selftest_compares_seed_synced(tmp_path):
    # -a -r 5 with the seed synced: vCPU k starts at 5 + k and writes random
    # pages; unsynced, vCPU 0 starts at 0, a fixed point of the generator, and
    # writes page 0 over and over -- so the dirtying passes' counts differ.
    cmd = "dirty_log_perf_test -v 2 -b 1M -s anonymous -i 2 -m 6 -k 2M -g -a -r 5"
    data = model_fixture(cmd, seed_synced=True, selftest_variant="upstream+k+seedfix")
    checks = check_fixture(write(tmp_path, data), engine="reference")
    assert checks[0].params.seed_synced and checks[0].mismatches == []
    assert any("seed is synced" in n for n in checks[0].fixture_notes)
    del data["selftest_variant"]
    checks = check_fixture(write(tmp_path, data), engine="reference")
    assert not checks[0].params.seed_synced
    assert {r.phase for r in checks[0].mismatches} >= {"iter1_dirty", "iter2_dirty"}


def test_unknown_selftest_variant_is_reported(tmp_path):
    data = model_fixture(SMALL, selftest_variant="my-build")
    checks = check_fixture(write(tmp_path, data), engine="reference")
    assert checks[0].mismatches == [] and not checks[0].params.seed_synced
    assert any("'my-build' not understood" in n for n in checks[0].fixture_notes)


def test_kernel_variant_compares_that_variant(tmp_path):
    data = model_fixture(SMALL, variant="skip-levels", kernel_variant="skip-levels")
    checks = check_fixture(write(tmp_path, data), engine="reference")
    assert checks[0].variant == "skip-levels" and checks[0].mismatches == []
    # the same counts read as a stock kernel's: the split walk of enable differs
    del data["kernel_variant"]
    checks = check_fixture(write(tmp_path, data), engine="reference")
    assert "enable_dirty_logging" in {r.phase for r in checks[0].mismatches}


def test_unknown_kernel_variant_is_one_line_error(tmp_path, capsys):
    data = model_fixture(SMALL, kernel_variant="no-such-variant")
    assert main(["fidelity", "--engine", "reference", write(tmp_path, data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernel_variant" in err[0] and "no-such-variant" in err[0]


def test_described_fields_of_the_wrong_type_are_one_line_errors(tmp_path, capsys):
    """The fields fidelity reads are checked by the fixture schema (the
    validation layer), before any run: each wrong type is one line naming it."""
    for field, value in (("kernel_variant", 3), ("selftest_variant", ["seedfix"]),
                         ("missing_functions", {"kvm_pgtable_stage2_split": 1})):
        data = {"format": FIXTURE_FORMAT, field: value,
                "runs": [{"command": SMALL, "phases": [{"phase": "populate"}]}]}
        assert main(["fidelity", "--engine", "reference", write(tmp_path, data)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and field in err[0], (field, err)


def test_fields_not_understood_are_reported(tmp_path, capsys):
    data = model_fixture(SMALL, frobnicate=1)
    data["runs"][0]["wobble"] = True
    phase(data, "populate")["extra"] = {}
    data["runs"][0]["label"] = "sideways"
    assert main(["fidelity", "--engine", "reference", write(tmp_path, data)]) == 0
    out = capsys.readouterr().out
    for text in ("field 'frobnicate' not understood", "field 'wobble' not understood",
                 "field 'extra' not understood", "label 'sideways' not understood"):
        assert text in out, text


# -- interleaving bounds -------------------------------------------------------------

OVERLAP = "dirty_log_perf_test -v 2 -b 1M -s anonymous -i 2 -m 6 -k 2M -g -o"


def add_faults(data, name, stale, raced):
    """The kernel took ``stale + raced`` more relax faults in pass ``name``
    than the model: ``stale`` found the entry already writable (TLBI at level
    3), ``raced`` lost the cmpxchg (TLBI with no hint, level -1)."""
    ph = phase(data, name)
    n = stale + raced
    c, d = ph["calls"], ph["detail"]
    for fn in ("kvm_handle_guest_abort", "kvm_pgtable_stage2_relax_perms", "kvm_pgtable_walk",
               "stage2_attr_walker", "__kvm_mmu_topup_memory_cache"):
        c[fn] += n
    c["__kvm_pgtable_walk"] += 3 * n
    c["__kvm_tlb_flush_vmid_ipa_nsh"] += n
    d["kvm_handle_guest_abort"]["all"]["hitcount"] += n
    d["kvm_pgtable_stage2_relax_perms"]["all"]["hitcount"] += n
    d["kvm_pgtable_walk"]["cb=stage2_attr_walker"]["hitcount"] += n
    d["kvm_pgtable_walk"]["cb=stage2_attr_walker"]["size"] += n
    d["stage2_attr_walker"]["level=3,visit=1"]["hitcount"] += n
    for lv in (1, 2, 3):
        d["__kvm_pgtable_walk"][f"level={lv}"]["hitcount"] += n
    d["__kvm_tlb_flush_vmid_ipa_nsh"]["level=3"]["hitcount"] += stale
    if raced:
        d["__kvm_tlb_flush_vmid_ipa_nsh"]["level=-1"] = {"hitcount": raced}


def bound(chk, phase_name, fn, key="", fld="calls"):
    return next(r for r in chk.rows if (r.phase, r.function, r.key, r.field) ==
                (phase_name, fn, key, fld))


def test_overlap_bounds_derived_by_hand(tmp_path):
    # -v 2 -b 1M -o: one region of 2 x 1M = 512 pages of 4K that both vCPUs
    # write in order (-w 100). -g: enabling dirty logging write-protects all
    # 512, and KVM_GET_DIRTY_LOG re-protects the 512 written, so each pass
    # starts with every page write-protected and every TLB flushed.
    # The model (lockstep, vCPU 0 first): vCPU 0 faults on each page, vCPU 1
    # finds it writable: 512 relax faults, + 2 MMIO exits = 514 aborts.
    # Each page is written twice per pass, so at most 512 x (2 - 1) = 512
    # more faults. Each is one relax_perms, one kvm_pgtable_walk of size 1,
    # three __kvm_pgtable_walk (levels 1, 2, 3: 4K pages, 40-bit IPA), one
    # stage2_attr_walker leaf visit at level 3, one TLBI at level 3 or
    # with no hint. Bounds: aborts [514, 1026], relax_perms [512, 1024],
    # __kvm_pgtable_walk [1536, 3072], TLBI level=3 [512, 1024], TLBI with
    # no hint [0, 512].
    data = model_fixture(OVERLAP)
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    assert chk.mismatches == []
    for name in ("iter1_dirty", "iter2_dirty"):
        r = bound(chk, name, "kvm_handle_guest_abort")
        assert (r.model, r.lo, r.hi) == (514, 514, 1026)
        r = bound(chk, name, "kvm_pgtable_stage2_relax_perms")
        assert (r.lo, r.hi) == (512, 1024)
        r = bound(chk, name, "__kvm_pgtable_walk")
        assert (r.lo, r.hi) == (1536, 3072)
        r = bound(chk, name, "kvm_pgtable_walk", "cb=stage2_attr_walker", "size")
        assert (r.lo, r.hi) == (512, 1024)
        r = bound(chk, name, "__kvm_tlb_flush_vmid_ipa_nsh", "level=3", "hitcount")
        assert (r.lo, r.hi) == (512, 1024)
        assert "up to 512 more permission faults" in chk.bound_notes[name]
    assert "lower bound only" in chk.bound_notes["populate"]
    # everything else is still exact: enable, get_dirty_log, disable
    exact = {r.phase for r in chk.rows if r.compared and not r.bound}
    assert {"enable_dirty_logging", "iter1_get_dirty_log", "iter2_get_dirty_log"} <= exact
    assert not any(r.bound for r in chk.rows if r.phase.endswith("get_dirty_log"))

    # A run with 300 more faults in pass 1 (100 lost races) is within bounds.
    add_faults(data, "iter1_dirty", stale=200, raced=100)
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    assert chk.mismatches == []
    r = bound(chk, "iter1_dirty", "__kvm_tlb_flush_vmid_ipa_nsh", "level=-1", "hitcount")
    assert (r.kernel, r.lo, r.hi, r.ok) == (100, 0, 512, True)
    assert "no level hint" in r.note

    # 513 more faults in pass 2 cannot happen: one past every bound.
    add_faults(data, "iter2_dirty", stale=513, raced=0)
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    bad = {(r.function, r.key) for r in chk.mismatches}
    assert ("kvm_pgtable_stage2_relax_perms", "") in bad and all(
        r.phase == "iter2_dirty" and r.bound for r in chk.mismatches)
    assert bound(chk, "iter2_dirty", "kvm_pgtable_stage2_relax_perms").excess == 1

    # and an exact phase still fails exactly
    phase(data, "iter1_get_dirty_log")["calls"]["kvm_pgtable_stage2_wrprotect"] += 1
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    assert any(r.phase == "iter1_get_dirty_log" and not r.bound for r in chk.mismatches)


def test_overlap_with_random_writes_bound(tmp_path):
    # -w 50 -a -r 3 --seed-synced on 2 vCPUs over 512 pages: the bound adds,
    # per page, its write accesses in the pass minus one; computed here from
    # the guest program directly.
    from s2split.hw.guest import guest_pass
    cmd = OVERLAP + " -w 50 -a -r 3"
    data = model_fixture(cmd, seed_synced=True, selftest_variant="seedfix")
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    states, passes = [3, 4], []
    for pass_no in range(3):
        writes = {}
        for v in range(2):
            wp = 100 if pass_no == 0 else 50
            states[v], written, _ = guest_pass(states[v], 512, wp, pass_no > 0)
            for page in written:
                writes[page] = writes.get(page, 0) + 1
        passes.append(writes)
    for it in (1, 2):
        extra = sum(w - 1 for w in passes[it].values())
        assert 0 < extra < sum(passes[it].values())
        r = bound(chk, f"iter{it}_dirty", "kvm_pgtable_stage2_relax_perms")
        assert (r.lo, r.hi) == (len(passes[it]), len(passes[it]) + extra)


def test_overlap_manual_protect_first_pass_is_exact(tmp_path):
    # manual-protect + initially-set: nothing is write-protected before the
    # first clear, so pass 1 cannot fault on a test page: compared exactly.
    data = model_fixture(OVERLAP.replace(" -g", ""))
    chk = check_fixture(write(tmp_path, data), engine="reference")[0]
    assert not any(r.bound for r in chk.rows if r.phase == "iter1_dirty")
    assert "no test page is write-protected" in chk.bound_notes["iter1_dirty"]
    assert any(r.bound for r in chk.rows if r.phase == "iter2_dirty")


def test_partitioned_runs_have_no_bounds(tmp_path):
    chk = check_fixture(write(tmp_path, model_fixture(SMALL)), engine="reference")[0]
    assert chk.bound_notes == {}
    assert all(not r.bound or r.function == "__kvm_mmu_topup_memory_cache" for r in chk.rows)


# -- summary -----------------------------------------------------------------------------

def test_summary(tmp_path, capsys):
    good = model_fixture(OVERLAP)
    bad = copy.deepcopy(good)
    phase(bad, "iter2_get_dirty_log")["calls"]["kvm_pgtable_stage2_wrprotect"] += 7
    phase(bad, "enable_dirty_logging")["calls"]["kvm_pgtable_stage2_wrprotect"] += 2
    paths = [write(tmp_path, good, "good.json"), write(tmp_path, bad, "bad.json")]
    assert main(["fidelity", "--engine", "reference", *paths]) == 1
    out = capsys.readouterr().out
    summary = out[out.index("fidelity summary"):].splitlines()
    good_line = next(l for l in summary if "good.json" in l)
    bad_line = next(l for l in summary if "bad.json" in l)
    assert good_line.rstrip().endswith("none")
    # the worst of the two differences: +7 calls in iter2_get_dirty_log
    assert "iter2_get_dirty_log kvm_pgtable_stage2_wrprotect.calls" in bad_line
    assert summary[-1].startswith("2 fixture(s), 2 run(s):") and "2 differing" in summary[-1]
    chk = check_fixture(paths[0], engine="reference")[0]
    assert f"{chk.compared_exact:,} counts compared exactly" not in summary[-1]  # two runs
    assert f"{2 * chk.compared_bounds:,} as bounds" in summary[-1]
