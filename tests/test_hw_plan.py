"""``s2split hw plan``: the measurement plan of the default matrix, boot by boot.

Expected values are derived here, not pasted: the hugetlb pools from the
matrix (64 GiB over each granule's PMD block size), the repetitions from the
closed form and, independently, from simulated medians; the total time from
the per-run figures the plan lists.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from s2split.arm64.arch import pmd_size, size_name
from s2split.cli.parser import main
from s2split.report.plan import PlanOptions, repetitions


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_plan(tmp_path_factory):
    """The plan of the default matrix (64G, 4K/16K/64K, three backings, two
    scenarios), as JSON, text and scripts."""
    d = tmp_path_factory.mktemp("plan")
    db = str(d / "r.sqlite")
    code, doc, err = run(["hw", "plan", "--db", db, "--format", "json", "--no-progress"])
    assert code == 0, err
    code, text, err = run(["hw", "plan", "--db", db, "--no-progress"])
    assert code == 0, err
    code, listing, err = run(["hw", "plan", "--db", db, "--format", "sh", "-o",
                              str(d / "sh"), "--no-progress"])
    assert code == 0, err
    return {"json": json.loads(doc), "text": text, "scripts": listing.split(), "db": db,
            "dir": d}


def test_three_host_kernels_per_kernel_under_test(default_plan):
    boots = default_plan["json"]["boots"]
    for kernel in ("baseline", "patched"):
        assert sorted(b["granule"] for b in boots if b["kernel"] == kernel) == \
            [4096, 16384, 65536]
    labels = [b["label"] for b in boots]
    assert len(set(labels)) == len(labels) == 6
    for b in boots:  # every run of a boot carries the boot's own label
        assert all(f"--label {b['label']} " in r["command"] for r in b["runs"])
    # hw compare pairs each granule's two labels; never two granules
    for g in ("4K", "16K", "64K"):
        assert f"s2split hw compare baseline-{g} patched-{g} --db " in \
            "\n".join(default_plan["json"]["compare"])
    assert "--measured 'baseline-{granule}' 'patched-{granule}'" in \
        default_plan["json"]["report"]


def test_hugetlb_pools_from_the_matrix(default_plan):
    # The whole 64 GiB test memory in pages of the default hugepage size, the
    # PMD block size: 64G/2M = 32768, 64G/32M = 2048, 64G/512M = 128.
    for b in default_plan["json"]["boots"]:
        size = pmd_size(b["granule"])
        pages = (64 << 30) // size
        assert b["hugetlb_pools"] == [{"page_size": size, "pages": pages}]
        assert f"hugepagesz={size_name(size)}" in b["cmdline"]
        assert f"hugepages={pages}" in b["cmdline"]
    assert "hugepagesz=2M hugepages=32768" in default_plan["text"]
    assert "hugepagesz=32M hugepages=2048" in default_plan["text"]
    assert "hugepagesz=512M hugepages=128" in default_plan["text"]


def test_background_walkers_off(default_plan):
    for b in default_plan["json"]["boots"]:
        for arg in ("damon_stat.enabled=N", "numa_balancing=disable"):
            assert arg in b["cmdline"]
        keys = dict(b["settings"])
        assert keys["kernel.numa_balancing"] == "0"
        assert keys["/sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs"] \
            == str(2**32 - 1)


def test_memory_adds_up_and_covers_the_pool(default_plan):
    for b in default_plan["json"]["boots"]:
        m = b["memory"]
        assert m["total"] == m["hugetlb_pool"] + m["guest_anonymous"] + \
            m["stage2_tables"] + m["margin"]
        assert m["hugetlb_pool"] == 64 << 30 and m["guest_anonymous"] == 64 << 30
        # at least the last-level tables of a 64G guest mapped by base pages
        # (8 bytes per page) on the regular-page cells
        assert m["stage2_tables"] >= (64 << 30) // b["granule"] * 8


def test_total_time_is_the_sum_of_runs_and_boots(default_plan):
    doc = default_plan["json"]
    per_boot = [sum(r["repeat"] * r["seconds_per_run"] for r in b["runs"])
                for b in doc["boots"]]
    assert [b["seconds"] for b in doc["boots"]] == pytest.approx(per_boot)
    assert doc["seconds"] == pytest.approx(sum(per_boot) + 6 * doc["options"]["boot_s"])
    assert doc["runs"] == sum(r["repeat"] for b in doc["boots"] for r in b["runs"])
    flat = " ".join(default_plan["text"].split())
    assert f"{doc['runs']} runs in all, about {doc['seconds'] / 3600:.1f} h (estimate" in flat


def test_text_is_80_columns(default_plan):
    lines = default_plan["text"].splitlines()
    assert max(len(line) for line in lines) <= 80


def test_repetitions_closed_form():
    # cv 3%, no fixed noise, half-width 2 points:
    # n = pi * (1.959964 * 3 / 2)^2 = pi * 8.6433 = 27.15 -> 28
    n, cv = repetitions(1e9, PlanOptions(cv=3.0, noise_ns=0.0, ci_width=2.0))
    assert (n, cv) == (28, 3.0)
    # a 1 ms syscall with 30 us of fixed noise: c = hypot(3, 3) = 4.243%,
    # n = pi * (1.959964 * 4.243 / 2)^2 = 54.3 -> 55
    n, cv = repetitions(1e6, PlanOptions(cv=3.0, noise_ns=30_000.0, ci_width=2.0))
    assert cv == pytest.approx(math.hypot(3, 3)) and n == 55
    # never fewer than hw compare's --min-reps
    assert repetitions(1e9, PlanOptions(cv=0.1, noise_ns=0.0, ci_width=5.0))[0] == 9


def test_repetitions_give_the_asked_width_on_simulated_runs():
    """Medians of n normal runs with CV c: the 95% spread of the saving
    1 - median(B)/median(A) is within the asked half-width (and not far
    below it, or the formula would waste runs)."""
    opts = PlanOptions(cv=3.0, noise_ns=0.0, ci_width=2.0)
    n, _ = repetitions(1e9, opts)
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 0.03, size=(20000, n))
    b = rng.normal(0.8, 0.03 * 0.8, size=(20000, n))
    saving = 100 * (1 - np.median(b, axis=1) / np.median(a, axis=1))
    half = (np.quantile(saving, 0.975) - np.quantile(saving, 0.025)) / 2
    assert 0.75 * opts.ci_width < half <= opts.ci_width


def test_scripts_pass_bash_n_and_shellcheck(default_plan):
    scripts = default_plan["scripts"]
    assert len(scripts) == 6 and all(os.access(s, os.X_OK) for s in scripts)
    for s in scripts:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_script_stops_at_the_first_failed_check(default_plan, tmp_path):
    """On a host whose page size is wrong the script fails before it changes
    a setting or runs anything (fake getconf and s2split on PATH)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    marker = tmp_path / "ran"
    (bin_ / "getconf").write_text("#!/bin/sh\necho 12345\n")
    (bin_ / "s2split").write_text(f"#!/bin/sh\ntouch {marker}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = next(s for s in default_plan["scripts"] if "4K-baseline" in s)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert "host page size is 12345, this boot needs 4096" in r.stderr
    assert not marker.exists()


def test_script_runs_its_commands_when_the_checks_pass(default_plan, tmp_path):
    """The same script with every check's input faked to pass runs each of its
    boot's hw run commands, in order (the sysfs writes go to a scratch copy)."""
    script = Path(next(s for s in default_plan["scripts"] if "16K-patched" in s)).read_text()
    root = tmp_path / "root"
    script = script.replace("/sys/", f"{root}/sys/").replace("/proc/", f"{root}/proc/")
    boot = next(b for b in default_plan["json"]["boots"] if b["name"] == "16K-patched")
    thp = root / "sys/kernel/mm/transparent_hugepage"
    (thp / "khugepaged").mkdir(parents=True)
    for f in ("enabled", "khugepaged/scan_sleep_millisecs", "khugepaged/alloc_sleep_millisecs"):
        (thp / f).write_text("")
    pool = root / "sys/kernel/mm/hugepages/hugepages-32768kB"
    pool.mkdir(parents=True)
    (pool / "free_hugepages").write_text("2048\n")
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("root=/dev/vda " + " ".join(boot["cmdline"]) + "\n")
    (root / "proc/meminfo").write_text(f"MemTotal: {boot['memory']['total'] // 1024} kB\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    (bin_ / "getconf").write_text("#!/bin/sh\necho 16384\n")
    (bin_ / "sysctl").write_text("#!/bin/sh\n[ \"$1\" = -n ] && echo 0\nexit 0\n")
    (bin_ / "s2split").write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    path = tmp_path / "boot.sh"
    path.write_text(script)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    ran = log.read_text().splitlines()
    assert ran == [r["command"].removeprefix("s2split ") for r in boot["runs"]]
    # a setting that does not hold (the write goes nowhere) stops the script
    (thp / "enabled").unlink()
    (thp / "enabled").symlink_to("/dev/null")
    log.unlink(missing_ok=True)
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "transparent_hugepage/enabled is not madvise" in r.stderr
    assert not log.exists()
    (thp / "enabled").unlink()
    (thp / "enabled").write_text("always [madvise] never\n")
    # a pool one page short fails the check, and nothing runs
    (pool / "free_hugepages").write_text("2047\n")
    log.unlink(missing_ok=True)
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "fewer than 2048 free 32M hugepages" in r.stderr
    assert not log.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--labels", "a", "a"], "different labels"),
    (["--cv", "0"], "--cv must be a finite number > 0"),
    (["--patched-variant", "nosuch"], "nosuch"),
])
def test_bad_input_one_line(default_plan, argv, needle):
    code, out, err = run(["hw", "plan", "--db", default_plan["db"], "--no-progress", *argv])
    assert code == 2 and "Traceback" not in err
    assert needle in err.strip().splitlines()[-1]
