"""Reading the upstream dirty_log_perf_test output (tests/hw/data: samples
composed from the documented format of each era, with a failure and skips)."""

from pathlib import Path

import pytest

from s2split.cli.parser import main
from s2split.plumbing.errors import S2Error
from s2split.hw.selftest import import_rows, mode_from_string, parse_output

DATA = Path(__file__).resolve().parent / "hw" / "data"


def parse(name):
    return parse_output((DATA / name).read_text(), name)


def test_several_guest_modes_v6_12():
    p = parse("v6.12-arm64-thp-3modes.txt")
    # 0x6b8b4567 is the library constructor's seed (6.11+); the -r seed
    # follows the first mode line.
    assert p.iterations == 2 and p.seed == "0x1"
    assert [r.mode for r in p.runs] == ["PA-bits:48,  VA-bits:48,  4K pages",
                                        "PA-bits:40,  VA-bits:48,  4K pages",
                                        "PA-bits:36,  VA-bits:48,  4K pages"]
    assert all(r.status == "ok" for r in p.runs) and p.notes == []
    first = p.runs[0]
    assert first.memory == (0xFFFFBFE00000, 0xFFFFFFE00000)
    assert first.phases[:3] == [("populate", 438811945), ("enable_dirty_logging", 1228530),
                                ("iter1_dirty", 2214978450)]
    assert [ph for ph, _ in first.phases] == [
        "populate", "enable_dirty_logging", "iter1_dirty", "iter1_get_dirty_log",
        "iter1_clear_dirty_log", "iter2_dirty", "iter2_get_dirty_log", "iter2_clear_dirty_log",
        "disable_dirty_logging"]
    assert first.totals["get"] == (2, 108097, 54048)
    rows, notes = import_rows(p, "6.12", "-s anonymous_thp")
    assert len(rows) == 27
    assert {r["config_key"] for r in rows} == {"-m 3 -b 1G -s anonymous_thp",
                                               "-m 6 -b 1G -s anonymous_thp",
                                               "-m 12 -b 1G -s anonymous_thp"}
    assert rows[0]["seconds"] == pytest.approx(0.438811945, abs=1e-12)
    assert notes == ["3 of 3 guest mode run(s) imported (27 measurements)"]


def test_older_format_without_manual_protect():
    """~6.3-6.9 prints the seed itself, in decimal; -g has no clear lines."""
    p = parse("v6.6-arm64-no-manual-protect.txt")
    run, = p.runs
    assert p.seed == "1" and p.iterations == 3
    assert run.status == "ok" and not run.manual_protect and run.iterations == 3
    rows, _ = import_rows(p, "6.6")
    assert rows[0]["config_key"] == "-m 8 -b 512M -s anonymous -g -i 3"
    assert rows[0]["config"]["granule"] == 65536


def test_assertion_failure_is_reported_not_imported():
    p = parse("v6.12-kselftest-assertion-failure.txt")
    ok, failed = p.runs
    assert ok.status == "ok" and len(ok.phases) == 9  # the "# " prefix is understood
    assert failed.status == "failed" and failed.mode == "PA-bits:40,  VA-bits:48, 64K pages"
    assert failed.message.startswith("lib/kvm_util.c:1061: region->mmap_start != MAP_FAILED")
    assert "test_malloc failed" in failed.message
    assert "vm_mem_add at" not in failed.message  # the stack dump is left out
    rows, notes = import_rows(p, "k", "-s anonymous_hugetlb_1gb")
    assert len(rows) == 9 and {r["config"]["mode"] for r in rows} == {"P40V48_4K"}
    assert any("failed: lib/kvm_util.c:1061" in n and "not imported" in n for n in notes)


def test_skips():
    p = parse("v6.12-kselftest-hugetlb-skip.txt")
    assert p.runs[0].status == "skipped"
    assert p.runs[0].message == "HUGETLB is not enabled in /proc/sys/vm/nr_hugepages"
    rows, notes = import_rows(p, "k")
    assert rows == [] and "skipped: HUGETLB is not enabled" in notes[0]
    p = parse("v6.12-no-kvm-skip.txt")
    assert p.runs == [] and "/dev/kvm not available" in p.skipped
    rows, notes = import_rows(p, "k")
    assert rows == [] and notes[0].startswith("skipped:")


def test_truncated_output_is_incomplete():
    p = parse("v6.12-arm64-truncated.txt")
    assert p.runs[0].status == "incomplete"
    rows, notes = import_rows(p, "k")
    assert rows == [] and "stopped before its totals" in notes[0]


def test_x86_output_and_vcpus_from_args():
    p = parse("v6.12-x86-2vcpus.txt")
    rows, _ = import_rows(p, "k", "-v 2 -b 256M")
    assert rows[0]["config_key"] == "-m 9 -b 256M -s anonymous -v 2"
    assert rows[0]["config"]["arch"] == "x86_64"
    with pytest.raises(S2Error, match="not -b 0x20000000 x -v 2"):
        import_rows(p, "k", "-v 2 -b 512M")
    with pytest.raises(S2Error, match="says -i 3"):
        import_rows(p, "k", "-i 3")
    with pytest.raises(S2Error, match="unknown option"):
        import_rows(p, "k", "-Z")
    for opt in ("-e", "-n"):
        with pytest.raises(S2Error, match=f"{opt} .*changes what the phases time"):
            import_rows(p, "k", opt)
    rows, _ = import_rows(p, "k", "-v 2 -b 256M -c 0,1")  # pinning changes nothing here
    assert rows[0]["config_key"] == "-m 9 -b 256M -s anonymous -v 2"


def test_the_printed_seed_is_the_configurations():
    text = (DATA / "v6.12-x86-2vcpus.txt").read_text()
    assert "Random seed: 0x6b8b4567\n" in text and "Random seed: 0x1\n" in text
    p = parse_output(text.replace("Random seed: 0x1\n", "Random seed: 0x5\n"), "r5.txt")
    rows, _ = import_rows(p, "k", "-v 2")
    assert rows[0]["config_key"] == "-m 9 -b 256M -s anonymous -v 2 -r 5"
    assert import_rows(p, "k", "-v 2 -r 5")[0][0]["config_key"] == rows[0]["config_key"]
    with pytest.raises(S2Error, match="says -r 7 but the output's random seed is 0x5"):
        import_rows(p, "k", "-v 2 -r 7")


def test_totals_are_checked_against_the_iteration_lines():
    text = (DATA / "v6.6-arm64-no-manual-protect.txt").read_text()
    text = text.replace("Get dirty log over 3 iterations took 0.", "Get dirty log over 3 "
                        "iterations took 9.")
    p = parse_output(text)
    assert any("not the sum of its iteration lines" in n for n in p.notes)


def test_mode_strings():
    assert mode_from_string("PA-bits:40,  VA-bits:48,  4K pages").id == 6
    assert mode_from_string("PA-bits:ANY, VA-bits:48,  4K pages").id == 9
    later = mode_from_string("PA-bits:47,  VA-bits:47, 16K pages")  # added in 6.16
    assert (later.id, later.pa_bits, later.page_size) == (-1, 47, 16384)


def test_not_selftest_output():
    with pytest.raises(S2Error, match="does not look like dirty_log_perf_test output"):
        parse_output("hello\nworld\n", "x.txt")


def test_cli_import_into_the_store(tmp_path, capsys):
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    files = [str(DATA / "v6.12-arm64-thp-3modes.txt"),
             str(DATA / "v6.12-kselftest-assertion-failure.txt")]
    assert main(["hw", "import", *files, "--label", "6.12", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "failed: lib/kvm_util.c:1061" in out and "stored 36 measurements" in out
    # importing the same output again adds a repetition, it does not overwrite
    assert main(["hw", "import", files[0], "--label", "6.12", "--db", str(db)]) == 0
    store = Store.open(db)
    # mode 6 is in both files, and the first file was imported twice
    reps = sorted(r["repetition"] for r in store.measurements("6.12")
                  if r["config_key"] == "-m 6 -b 1G -s anonymous" and r["phase"] == "populate")
    assert reps == [0, 1, 2]
    reps = sorted(r["repetition"] for r in store.measurements("6.12")
                  if r["config_key"] == "-m 3 -b 1G -s anonymous" and r["phase"] == "populate")
    assert reps == [0, 1]
    store.close()


def test_cli_import_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("nothing to see\n")
    assert main(["hw", "import", str(bad), "--label", "x", "--db",
                 str(tmp_path / "r.sqlite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not look like dirty_log_perf_test output" in err[0]


def test_patched_selftest_chunk_size_gives_hw_runs_key():
    """The output of the selftest with contrib/'s -k patch: the line it prints
    sets the chunk size, so the import has the key 'hw run --chunk-size'
    stores; -k in --args must agree with it."""
    from s2split.hw.params import HwParams
    from s2split.selftest.modes import parse_mode
    text = (DATA / "v6.12-arm64-thp-3modes.txt").read_text().replace(
        "Testing guest mode: PA-bits:40,  VA-bits:48,  4K pages\n",
        "Testing guest mode: PA-bits:40,  VA-bits:48,  4K pages\n"
        "Eager split chunk size: 0x200000\n")
    parsed = parse_output(text, "k.txt")
    rows, _ = import_rows(parsed, "k", "-m 6 -s anonymous_thp -b 1G -k 2M")
    want = HwParams(vcpu_memory_bytes=1 << 30, backing="anonymous_thp", mode=parse_mode(6),
                    chunk_size=2 << 20).config_key()
    assert want.endswith("--chunk-size 2M")
    keys = {r["config_key"] for r in rows}
    assert want in keys
    # only the mode whose output printed the chunk size gets it without -k
    rows, _ = import_rows(parsed, "k", "-s anonymous_thp -b 1G")
    assert sum(1 for k in {r["config_key"] for r in rows} if "--chunk-size 2M" in k) == 1
    with pytest.raises(S2Error, match="-k 0x100000 but the VM reported"):
        import_rows(parsed, "k", "-s anonymous_thp -b 1G -k 1M")
