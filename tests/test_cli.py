"""Command-line behaviour: outputs, help, and one-line errors with exit status 2."""

import json
import re
import subprocess
import sys

import pytest

from s2split.cli.parser import build_parser

from _cli import run_cli as run



@pytest.mark.parametrize("argv,needle", [
    (["perf-test", "--chunk-size", "4M"], "not 0 or a supported block size"),
    (["perf-test", "--chunk-size", "3K"], "not 0 or a supported block size"),
    (["perf-test", "-b", "1M", "-x", "3"], "cannot be evenly divided"),
    (["perf-test", "-b", "3M", "-x", "3", "-s", "anonymous_hugetlb"], "not aligned"),
    (["perf-test", "-s", "nosuchbacking"], "unknown backing src type"),
    (["perf-test", "-s", "anonymous_hugetlb_64kb", "-m", "7"], "do not exist"),
    (["perf-test", "-m", "99"], "guest mode ID 99 too big"),
    (["perf-test", "-m", "P11V48_4K"], "unknown guest mode"),
    (["perf-test", "-i", "1"], "at least two iterations"),
    (["perf-test", "-b", "12Q"], "unknown size letter"),
    (["perf-test", "-b", "lots"], "need at least one digit"),
    (["perf-test", "-w", "101"], "must be <= 100"),
    (["perf-test", "-r", "0"], "-r must be >= 1"),  # atoi_positive, as upstream
    (["perf-test", "-r", "2147483648"], "-r must be <= 2147483647"),
    (["perf-test", "-i", "08"], "-i '08' is not an integer"),  # strtol: octal, no digit 8
    (["perf-test", "-i", "3000000000"], "-i must be <= 2147483647"),
    (["perf-test", "-v", "0o7"], "-v '0o7' is not an integer"),  # not C
    (["perf-test", "-v", "513", "-b", "4K"], "must be between 1 and 512"),
    (["perf-test", "--variant", "nope"], "unknown variant"),
    (["perf-test", "--profile", "nope"], "unknown profile"),
    (["perf-test", "--granule", "4K"], "go together"),
    (["perf-test", "--granule", "8K", "--ipa-bits", "40"], "unknown granule"),
    (["perf-test", "--granule", "4K", "--ipa-bits", "50"], "needs LPA2"),
    (["geometry", "--ipa-bits", "31"], "out of range"),
    (["variants", "--check", "nope"], "unknown variant"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, needle):
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_chunk_size_after_memslot_is_rejected():
    from s2split.arm64.arch import Geometry
    from s2split.plumbing.errors import KernelError
    from s2split.model.kvm.backing import parse_backing
    from s2split.model.kvm.vm import VM
    vm = VM(Geometry())
    vm.add_memslot(1, 0, 1 << 21, parse_backing("anonymous", 4096))
    with pytest.raises(KernelError, match="before any memslot"):
        vm.set_eager_split_chunk_size(1 << 21)


def test_perf_test_help_documents_every_option(capsys):
    code, out, _ = run(["perf-test", "-h"], capsys)
    assert code == 0
    for opt in ("-b", "-v", "-s", "-g", "-i", "-m", "-x", "-w", "-a", "-o", "-r", "--chunk-size",
                "--variant", "--ipa-bits", "--granule", "--json", "--profile", "--engine"):
        assert re.search(rf"(^|\s){re.escape(opt)}[\s,]", out), opt
    help_ = out.replace("\n", " ")
    assert help_.count("(default:") >= 15
    assert "P40V48_4K" in out and "PA-bits:40,  VA-bits:48,  4K pages" in out


def test_perf_test_prints_upstream_lines_marked_as_estimates(capsys):
    code, out, _ = run(["perf-test", "-b", "8M", "-s", "anonymous_thp", "-k", "2M",
                        "--variant", "vanilla", "--variant", "skip-levels",
                        "--engine", "reference"], capsys)
    assert code == 0
    for pattern in (r"Populate memory time: \d+\.\d{9}s  \[estimate: server-vhe\]",
                    r"Enabling dirty logging time: \d+\.\d{9}s",
                    r"Iteration 2 dirty memory time: \d+\.\d{9}s",
                    r"Iteration 1 clear dirty log time: \d+\.\d{9}s",
                    r"Get dirty log over 2 iterations took \d+\.\d{9}s\. \(Avg \d+\.\d{9}s/iteration\)",
                    r"Clear dirty log over 2 iterations took"):
        assert re.search(pattern, out), pattern
    assert "not measurements" in out
    assert "Saved against vanilla" in out


def _ns(text):
    whole, frac = text.rstrip("s").split(".")
    return int(whole) * 10**9 + int(frac)


def test_perf_test_totals_add_up_the_printed_lines(capsys):
    # -i 010 is octal, as the selftest's strtol reads it: 8 iterations.
    code, out, _ = run(["perf-test", "-b", "4M", "-i", "010", "--variant", "vanilla",
                        "--engine", "reference"], capsys)
    assert code == 0
    for kind in ("get", "clear"):
        each = [_ns(m) for m in re.findall(rf"Iteration \d+ {kind} dirty log time: (\S+)", out)]
        assert len(each) == 8
        total, avg = re.search(rf"{kind.title()} dirty log over 8 iterations took (\S+)\. "
                               rf"\(Avg (\S+)/iteration\)", out).groups()
        # the selftest's timespec sums and truncating division
        assert _ns(total) == sum(each) and _ns(avg) == sum(each) // 8


def test_guest_modes_run_once_each_in_id_order(capsys):
    # 010 is octal 8, as atoi_non_negative reads it
    code, out, _ = run(["perf-test", "-b", "4M", "-m", "010", "-m", "P40V48_4K", "-m", "0x8",
                        "--variant", "vanilla", "--engine", "reference"], capsys)
    assert code == 0
    assert re.findall(r"Testing guest mode: (.*)", out) == [
        "PA-bits:40,  VA-bits:48,  4K pages", "PA-bits:40,  VA-bits:48, 64K pages"]


def test_perf_test_json_is_consistent(capsys):
    code, out, _ = run(["perf-test", "-b", "4M", "-g", "-k", "2M", "-s", "anonymous_thp",
                        "--variant", "vanilla", "--variant", "skip-levels", "--json",
                        "--engine", "reference"], capsys)
    assert code == 0
    data = json.loads(out)
    assert set(data["variants"]) == {"vanilla", "skip-levels"}
    van = {p["phase"]: p for p in data["variants"]["vanilla"]["phases"]}
    sl = {p["phase"]: p for p in data["variants"]["skip-levels"]["phases"]}
    # 4M of THP = 2 blocks; -g: enabling logging splits both (2 x 512 new pages)
    en = van["enable_dirty_logging"]
    assert en["kernel"]["kvm_pgtable_stage2_create_unlinked"]["calls"] == 2
    assert en["kernel"]["stage2_split_walker"]["detail"]["level=3,visit=1"]["hitcount"] == 1024
    assert "level=3,visit=1" not in sl["enable_dirty_logging"]["kernel"]["stage2_split_walker"]["detail"]
    assert sl["enable_dirty_logging"]["estimate_ns"] < en["estimate_ns"]


def test_console_script_entry_point():
    # python -m s2split.cli, as before the command line became a package
    r = subprocess.run([sys.executable, "-m", "s2split.cli", "geometry", "--granule", "16K"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert "16K/40-bit: 2 levels from level 2, 16 root page(s)" in r.stdout


def test_parser_builds():
    assert build_parser().prog == "s2split"


USER_VARIANT = '''
from s2split.model.pgtable.variants import Variant, register
from s2split.model.pgtable.walker import skip_level
register(Variant("skip-l3-wp", "also skip level 3 when write-protecting",
                 walk_flags={"split": skip_level(3), "wrprotect": skip_level(3)}))
'''


def test_user_variants_file(tmp_path):
    # In a subprocess: registering changes the process-wide registry.
    f = tmp_path / "mine.py"
    f.write_text(USER_VARIANT)
    cmd = [sys.executable, "-m", "s2split", "--variants", str(f)]
    listed = subprocess.run(cmd + ["variants"], capture_output=True, text=True)
    assert listed.returncode == 0 and "skip-l3-wp" in listed.stdout
    # Skipping level 3 when write-protecting leaves pages writable: the check
    # against vanilla must catch it (exit 1), not crash.
    checked = subprocess.run(cmd + ["variants", "--check", "skip-l3-wp", "--examples", "20"],
                             capture_output=True, text=True)
    assert checked.returncode == 1, checked.stderr
    # The registered variant runs like a built-in one.
    out = subprocess.run(cmd + ["perf-test", "-b", "4M", "-g", "--chunk-size", "2M",
                                "--variant", "vanilla", "--variant", "skip-l3-wp", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["variants"]
    assert set(runs) == {"vanilla", "skip-l3-wp"}
    enable = {v: next(p["counts"] for p in runs[v]["phases"]
                      if p["phase"] == "enable_dirty_logging") for v in runs}
    # populate mapped all 4M as 4K pages (1024 level-3 entries); vanilla's
    # write-protect walk reads each once, the variant never reaches level 3.
    assert enable["vanilla"]["wrprotect/read_leaf/3"] == (4 << 20) // 4096
    assert "wrprotect/read_leaf/3" not in enable["skip-l3-wp"]


def test_user_variants_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise ValueError('no good')\n")
    for path, needle in ((tmp_path / "missing.py", "no such file"), (bad, "ValueError: no good")):
        r = subprocess.run([sys.executable, "-m", "s2split", "--variants", str(path),
                            "variants"], capture_output=True, text=True)
        assert r.returncode == 2
        assert needle in r.stderr and r.stderr.count("\n") == 1
