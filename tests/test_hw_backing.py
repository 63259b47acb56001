"""``hw run``'s backing check: what backs the guest memory, from smaps.

The pure tests read fake smaps files written here; the KVM tests run real
VMs (skipped without /dev/kvm) and hand the harness a copy of the real smaps
whose huge-page count over the test memory is halved, so the refusal path is
the one a host that could not get huge pages takes.
"""

from __future__ import annotations

import os
import re
import sqlite3

import pytest

from _cli import one_line, run_cli
from s2split.plumbing.errors import S2Error
from s2split.hw.backing_check import (coverage, damon_stat_on, host_settings, parse_smaps,
                                      refusal)
from s2split.storage.store import SCHEMA_VERSION, Store

MIB = 1 << 20
BASE = 0x7f0000000000

SMAPS = f"""\
{BASE - 0x1000:x}-{BASE:x} rw-p 00000000 00:00 0
Size:                  4 kB
AnonHugePages:         0 kB
{BASE:x}-{BASE + 64 * MIB:x} rw-p 00000000 00:00 0
Size:              65536 kB
KernelPageSize:        4 kB
Rss:               65536 kB
AnonHugePages:     {{thp}} kB
VmFlags: rd wr mr mw me ac hg
{BASE + 64 * MIB:x}-{BASE + 96 * MIB:x} rw-p 00000000 00:0f 123  /anon_hugepage (deleted)
Size:              32768 kB
KernelPageSize:     {{kps}} kB
Private_Hugetlb:   {{hugetlb}} kB
Shared_Hugetlb:        0 kB
"""


def fake(tmp_path, thp=65536, kps=2048, hugetlb=32768) -> list:
    path = tmp_path / "smaps"
    path.write_text(SMAPS.format(thp=thp, kps=kps, hugetlb=hugetlb))
    return parse_smaps(path.read_text())


def test_thp_fully_backed(tmp_path):
    c = coverage(fake(tmp_path), BASE, 64 * MIB, "anonymous_thp", 2 * MIB)
    assert c.full and c.fraction == 1.0


def test_thp_partial_is_refused_in_one_line(tmp_path):
    # 40 of the 64 MiB in 2M pages: 40/64 = 62.5%
    c = coverage(fake(tmp_path, thp=40 * 1024), BASE, 64 * MIB, "anonymous_thp", 2 * MIB)
    assert not c.full and c.fraction == 40 / 64
    text = refusal(c)
    assert "\n" not in text and "62.5%" in text and "--allow-partial" in text


def test_region_inside_a_larger_vma(tmp_path):
    # THP padding: the VMA is larger than the region; huge pages count only
    # up to the region's size, so a 32M region of a 64M VMA is full at 32M.
    c = coverage(fake(tmp_path, thp=32 * 1024), BASE + 16 * MIB, 32 * MIB, "anonymous_thp",
                 2 * MIB)
    assert c.full


def test_regular_pages_with_thp_are_not_regular(tmp_path):
    c = coverage(fake(tmp_path, thp=2048), BASE, 64 * MIB, "anonymous", 4096)
    assert c.fraction == 62 / 64 and "MADV_NOHUGEPAGE" in refusal(c)
    assert coverage(fake(tmp_path, thp=0), BASE, 64 * MIB, "anonymous", 4096).full


def test_hugetlb_page_size_and_count(tmp_path):
    region = (BASE + 64 * MIB, 32 * MIB)
    assert coverage(fake(tmp_path), *region, "anonymous_hugetlb", 2 * MIB).full
    wrong = coverage(fake(tmp_path, kps=1 << 20), *region, "anonymous_hugetlb", 2 * MIB)
    assert not wrong.full and "1G pages, not 2M" in refusal(wrong)
    half = coverage(fake(tmp_path, hugetlb=16384), *region, "anonymous_hugetlb", 2 * MIB)
    assert half.fraction == 0.5


def test_no_mapping_is_an_error(tmp_path):
    with pytest.raises(S2Error, match="no mapping"):
        coverage(fake(tmp_path), 0x1000, MIB, "anonymous_thp", 2 * MIB)


def test_host_settings_from_a_fake_root(tmp_path):
    (tmp_path / "sys/module/damon_stat/parameters").mkdir(parents=True)
    (tmp_path / "sys/module/damon_stat/parameters/enabled").write_text("Y\n")
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/numa_balancing").write_text("1\n")
    thp = tmp_path / "sys/kernel/mm/transparent_hugepage"
    (thp / "khugepaged").mkdir(parents=True)
    (thp / "enabled").write_text("always [madvise] never\n")
    (thp / "khugepaged/scan_sleep_millisecs").write_text("10000\n")
    s = host_settings(str(tmp_path))
    assert s["damon_stat_enabled"] == "Y" and damon_stat_on(s)
    assert s["numa_balancing"] == "1" and s["thp_enabled"] == "madvise"
    assert s["khugepaged"]["scan_sleep_millisecs"] == "10000"
    assert s["thp_defrag"] is None  # not present: None, not a guess
    (tmp_path / "sys/module/damon_stat/parameters/enabled").write_text("N\n")
    assert not damon_stat_on(host_settings(str(tmp_path)))


# -- the store and compare ---------------------------------------------------------------

def _row(label, seconds, rep, coverage=None, damon="N", phase="enable_dirty_logging"):
    row = {"label": label, "config_key": "-m 6 -b 4M -s anonymous_thp", "config":
           {"backing": "anonymous_thp"}, "phase": phase, "repetition": rep,
           "seconds": seconds, "host": {"settings": {"damon_stat_enabled": damon}},
           "source": "hw run"}
    if coverage is not None:
        row["backing"] = {"coverage": coverage, "allow_partial": coverage < 1, "slots": []}
    return row


def test_store_keeps_the_coverage_and_migrates_schema_1(tmp_path):
    path = tmp_path / "old.sqlite"
    # A schema-1 file: today's tables with the measurements table as schema 1
    # had it (no backing column), holding one measurement.
    Store.open(str(path)).close()
    con = sqlite3.connect(path)
    con.executescript("""
        ALTER TABLE measurements DROP COLUMN backing;
        UPDATE meta SET value = '1' WHERE key = 'schema_version';
        INSERT INTO measurements (label, config_key, config, phase, repetition, seconds,
                                  host, source, tool_version, created)
            VALUES ('old', 'k', '{}', 'populate', 0, 1.0, '{}', 'hw run', '0', 'then');
    """)
    con.commit()
    con.close()
    store = Store.open(str(path))
    store.add_measurements([_row("new", 0.5, 0, coverage=0.75)])
    old, = store.measurements("old")
    new, = store.measurements("new")
    store.close()
    assert "backing" not in old and new["backing"]["coverage"] == 0.75
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] \
        == str(SCHEMA_VERSION) == "2"


def test_compare_shows_coverage_and_warns_of_damon_stat():
    from s2split.hw.compare import compare_measurements, print_comparison
    a = [_row("A", 1.0 + i / 100, i, coverage=1.0) for i in range(9)]
    b = [_row("B", 0.8 + i / 100, i, coverage=0.5 if i == 3 else 1.0, damon="Y" if i < 2 else
              "N") for i in range(9)]
    report = compare_measurements(a, b, "A", "B")
    assert report.coverage["-m 6 -b 4M -s anonymous_thp"] == (1.0, 0.5)
    notes = "\n".join(report.notes)
    assert "DAMON_STAT was on during 2 of the 9 measurements of 'B'" in notes
    assert "'A'" not in notes.split("DAMON_STAT")[0][-20:]
    assert "only 50.0% of the guest memory" in notes
    lines = []
    print_comparison(report, lines.append)
    assert "  backing: A 100.0%, B 50.0% of the guest memory in its backing's page size" in lines
    # all off: no warning
    quiet = compare_measurements(a, [dict(r, host={"settings": {"damon_stat_enabled": "N"}})
                                     for r in b], "A", "B")
    assert not any("DAMON_STAT" in n for n in quiet.notes)


# -- real KVM ------------------------------------------------------------------------------

kvm = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")


def _halved(address_size: list) -> str:
    """The real smaps with AnonHugePages halved in the VMA that holds the test
    memory (the harness tells us where through the recorded call)."""
    text = open("/proc/self/smaps").read()
    out = []
    inside = False
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            inside = any(lo < a + s and hi > a for a, s in address_size)
        elif inside and line.startswith("AnonHugePages:"):
            kb = int(line.split()[1])
            line = f"AnonHugePages:  {kb // 2} kB"
        out.append(line)
    return "\n".join(out) + "\n"


@kvm
def test_run_refuses_partial_thp_and_records_with_allow_partial(monkeypatch):
    from s2split.hw import harness
    from s2split.hw.harness import run_config
    from s2split.hw.params import HwParams

    regions: list = []
    real = harness._check_backing

    def spy(m, result, memslots, mode, smaps):
        regions[:] = [(ms.memory.address, ms.memory.size) for ms in memslots]
        return real(m, result, memslots, mode, smaps)
    monkeypatch.setattr(harness, "_check_backing", spy)
    p = HwParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", vcpus=2)
    full = run_config(p, lambda s: None, backing_check="refuse")
    if full.backing()["coverage"] < 1:
        pytest.skip("this host did not give THP to the test memory")
    with pytest.raises(S2Error) as e:
        run_config(p, lambda s: None, backing_check="refuse",
                   smaps=lambda: _halved(regions))
    assert "refusing to time 16M of anonymous_thp memory: only 50.0%" in str(e.value)
    assert "\n" not in str(e.value)
    rec = run_config(p, lambda s: None, backing_check="record", smaps=lambda: _halved(regions))
    assert rec.backing()["coverage"] == 0.5 and rec.backing()["allow_partial"]
    assert [ph for ph, _ in rec.phases][-1] == "disable_dirty_logging"  # it ran to the end
    rows = harness.measurement_rows(rec, "x", 0, {})
    assert all(r["backing"]["coverage"] == 0.5 for r in rows)


@kvm
def test_hw_run_cli_exit_2_on_partial_and_stores_coverage(tmp_path, monkeypatch, capsys):
    from s2split.hw import backing_check

    def halved(path="/proc/self/smaps"):
        vmas = backing_check.parse_smaps(open(path).read())
        return [backing_check.Vma(v.start, v.end, dict(
            v.fields, AnonHugePages=v.fields.get("AnonHugePages", 0) // 2)) for v in vmas]
    db = str(tmp_path / "r.sqlite")
    args = ["hw", "run", "-b", "4M", "-s", "anonymous_thp", "--label", "k", "--db", db]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    store = Store.open(db)
    rows = store.measurements("k")
    store.close()
    if rows[0]["backing"]["coverage"] < 1:
        pytest.skip("this host did not give THP to the test memory")
    assert all(r["backing"]["coverage"] == 1.0 for r in rows)
    monkeypatch.setattr(backing_check, "read_smaps", halved)
    code, out, err = run_cli(args, capsys)
    assert code == 2
    one_line(err, "refusing to time 4M of anonymous_thp memory", "--allow-partial")
    partial = ["hw", "run", "-b", "4M", "-s", "anonymous_thp", "--label", "p", "--db", db,
               "--allow-partial"]
    code, out, err = run_cli(partial, capsys)
    assert code == 0, err
    store = Store.open(db)
    assert {r["backing"]["coverage"] for r in store.measurements("p")} == {0.5}
    store.close()
