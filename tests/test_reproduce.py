"""``s2split reproduce`` and the results store: the savings tables against the
stored counts, the printed reproduce commands, resuming after SIGKILL, export,
bad databases, show/compare/explain, plots and the Dask executor.

Expected values are recomputed here from the stored counts through the public
API (Store, Counts, load_profile), never pasted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest


from _cli import run_cli as cli
from s2split.estimate.cost import load_profile
from s2split.counting.counts import Counts
from s2split.storage.store import SCHEMA_VERSION, Store

SMALL = ["--size", "4M"]
# The whole default matrix, with one more variant than the default three.
VARIANTS = ["vanilla", "skip-levels", "skip-levels+skip-children", "return-hints"]
GRANULES = {"4K": 4096, "16K": 16384, "64K": 65536}
# The spec of the matrix (reproduce's --backing names -> perf-test -s names).
BACKING_NAMES = {"regular": "anonymous", "thp": "anonymous_thp", "hugetlb": "anonymous_hugetlb"}
SCENARIOS = ("clear", "enable")
ENV = dict(os.environ, COLUMNS="220", PYTHONWARNINGS="ignore")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich tables at full width (they are parsed below), in and out of process."""
    monkeypatch.setenv("COLUMNS", "220")


def s2split(*args: str, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s2split", *args], capture_output=True,
                          text=True, cwd=cwd, env=ENV, timeout=timeout)



def one_line_error(err: str, needle: str | None = None) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


def scenario_of(config: dict) -> str:
    return "clear" if config["manual_protect"] else "enable"


def syscall_phase_names(cell) -> list[str]:
    """The phases of the scenario's syscall, from the stored phase names."""
    names = [n for n, _, _ in cell.phases]
    if cell.config["manual_protect"]:
        out = [n for n in names if re.fullmatch(r"iter\d+_clear_dirty_log", n)]
    else:
        out = [n for n in names if n == "enable_dirty_logging"]
    assert out
    return out


def cells_by_coordinates(db: Path) -> dict[tuple[int, str, str, str], object]:
    """Stored cells by (granule, matrix backing name, scenario, variant)."""
    backing_of = {v: k for k, v in BACKING_NAMES.items()}
    store = Store.open(db, create=False)
    try:
        out = {}
        for c in store.cells():
            k = (c.config["granule"], backing_of[c.config["backing"]], scenario_of(c.config),
                 c.variant)
            assert k not in out, f"two cells for {k}"
            out[k] = c
        return out
    finally:
        store.close()


def db_snapshot(db: Path) -> dict[str, tuple]:
    """Everything a cell holds that must not depend on when or how it was run."""
    store = Store.open(db, create=False)
    try:
        return {c.key: (json.dumps(c.config, sort_keys=True), c.variant, c.profile,
                        c.tool_version,
                        tuple((n, json.dumps(cnt.to_dict(), sort_keys=True), est)
                              for n, cnt, est in c.phases))
                for c in store.cells()}
    finally:
        store.close()


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    """The full default matrix (small VM) with four variants, run once via the CLI."""
    d = tmp_path_factory.mktemp("matrix")
    db = d / "results.sqlite"
    r = s2split("reproduce", *SMALL, "--variant", ",".join(VARIANTS), "--db", str(db), "--json")
    assert r.returncode == 0, r.stderr
    return db, json.loads(r.stdout)


# -- 1. the tables -----------------------------------------------------------------

def test_savings_tables_match_the_stored_counts(matrix_run):
    db, data = matrix_run
    profile = load_profile("server-vhe")
    cells = cells_by_coordinates(db)
    n_cells = len(GRANULES) * len(BACKING_NAMES) * len(SCENARIOS) * len(VARIANTS)
    assert len(cells) == n_cells
    assert data["cells"] == {"computed": n_cells, "found": 0}
    assert data["profile"] == "server-vhe"

    rows = {(r["scenario"], r["backing"], r["variant"]): r for r in data["rows"]}
    assert len(rows) == len(data["rows"]) == len(SCENARIOS) * len(BACKING_NAMES) * len(VARIANTS)

    def summed(g, b, s, v):
        c = cells[(g, b, s, v)]
        names = syscall_phase_names(c)
        counts = [c.phase(n) for n in names]
        est = sum(profile.estimate_ns(x) for x in counts)
        return (est, sum(x.entries_read() for x in counts),
                sum(x.visitor_calls() for x in counts))

    for s in SCENARIOS:
        for b in BACKING_NAMES:
            for v in VARIANTS:
                row = rows[(s, b, v)]
                for i, what in enumerate(("time", "reads", "visits")):
                    got = row[f"{what}_saved_pct"]
                    # Every cell of the table is filled.
                    assert set(got) == {*GRANULES, "avg"}  # keyed like "commands"
                    assert all(isinstance(x, float) for x in got.values()), (s, b, v, what, got)
                    expected = {}
                    for name, g in GRANULES.items():
                        base = summed(g, b, s, "vanilla")[i]
                        val = summed(g, b, s, v)[i]
                        assert base > 0
                        expected[name] = 100.0 * (base - val) / base
                    expected["avg"] = sum(expected.values()) / len(GRANULES)
                    assert got == pytest.approx(expected, rel=1e-12, abs=1e-9), (s, b, v, what)
                    if v == "vanilla":
                        assert all(x == 0 for x in got.values())
                assert set(row["commands"]) == set(GRANULES)
    # The model's point: skipping levels saves work on every cell with a split.
    for b in BACKING_NAMES:
        for s in SCENARIOS:
            assert rows[(s, b, "skip-levels")]["reads_saved_pct"]["avg"] > 0


def test_stored_estimates_are_the_profile_estimates(matrix_run):
    db, _ = matrix_run
    profile = load_profile("server-vhe")
    for c in cells_by_coordinates(db).values():
        assert c.profile == "server-vhe"
        assert c.engine == "reference"  # auto below 64M
        assert [n for n, _, _ in c.phases][0] == "create_vm"
        for name, counts, est in c.phases:
            assert est == pytest.approx(profile.estimate_ns(counts), rel=1e-12)


def test_text_tables_are_filled_and_a_rerun_finds_every_cell(matrix_run, capsys):
    db, data = matrix_run
    code, out, err = cli(["reproduce", *SMALL, "--variant", ",".join(VARIANTS), "--db",
                          str(db), "--no-progress"], capsys)
    assert code == 0, err
    n = len(GRANULES) * len(BACKING_NAMES) * len(SCENARIOS) * len(VARIANTS)
    assert re.search(rf"\b0 cell\(s\) computed, {n} found in ", out), out[-300:]
    assert "n/a" not in out
    for title in ("Estimated syscall time saved", "Entries read saved", "Visitor calls saved",
                  "Vanilla, per cell"):
        assert title in out
    # The printed commands are the JSON ones, each printed once.
    commands = [c for r in data["rows"] for c in r["commands"].values()]
    assert len(set(commands)) == n
    for c in commands:
        assert out.count(c + "\n") == 1, c


def _perf_test_counts(command: str, capsys) -> dict:
    argv = shlex.split(command)
    assert argv[:2] == ["s2split", "perf-test"]
    code, out, err = cli([*argv[1:], "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_printed_commands_reproduce_the_stored_counts(matrix_run, capsys):
    """One cell of each scenario x backing, rotating granule and variant."""
    db, data = matrix_run
    cells = cells_by_coordinates(db)
    rows = {(r["scenario"], r["backing"], r["variant"]): r for r in data["rows"]}
    granules = list(GRANULES)
    i = 0
    for s in SCENARIOS:
        for b in BACKING_NAMES:
            gname, v = granules[i % len(granules)], VARIANTS[(i + 1) % len(VARIANTS)]
            i += 1
            res = _perf_test_counts(rows[(s, b, v)]["commands"][gname], capsys)
            stored = cells[(GRANULES[gname], b, s, v)]
            assert res["params"] == stored.config
            assert list(res["variants"]) == [v]
            phases = res["variants"][v]["phases"]
            assert [p["phase"] for p in phases] == [n for n, _, _ in stored.phases]
            for p, (name, counts, est) in zip(phases, stored.phases):
                assert Counts.from_dict(p["counts"]) == counts, (s, b, gname, v, name)
                assert p["estimate_ns"] == pytest.approx(est, rel=1e-12)


def test_commands_of_a_profile_file_load_that_profile(tmp_path, capsys):
    """With --profile FILE the printed commands name the file (the profile's own
    name would not load), and compare works without --profile."""
    data = load_profile("server-nvhe-norange").to_json()
    data["name"] = "my-custom-profile"
    data["unit_costs_ns"]["read_leaf"] = 7.25
    # a cost set again takes its own range, or none (exact): the parent's
    # range was about the parent's value
    data["ranges_ns"].pop("read_leaf", None)
    prof = tmp_path / "custom.json"
    prof.write_text(json.dumps(data))
    db = tmp_path / "r.sqlite"
    code, out, err = cli(["reproduce", *SMALL, "--granule", "4K", "--backing", "thp",
                          "--scenario", "enable", "--profile", str(prof), "--db", str(db),
                          "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["profile"] == "my-custom-profile"
    profile = load_profile(str(prof))
    cells = cells_by_coordinates(db)
    for row in res["rows"]:
        cmd = row["commands"]["4K"]
        assert f"--profile {prof}" in cmd
        pt = _perf_test_counts(cmd, capsys)
        assert pt["profile"] == "my-custom-profile"
        stored = cells[(4096, "thp", "enable", row["variant"])]
        assert stored.profile == "my-custom-profile"
        assert pt["params"] == stored.config
        assert stored.config["features"]["vhe"] is False  # the profile's features
        for p, (name, counts, est) in zip(pt["variants"][row["variant"]]["phases"],
                                          stored.phases):
            assert Counts.from_dict(p["counts"]) == counts
            assert p["estimate_ns"] == pytest.approx(profile.estimate_ns(counts), rel=1e-12)
            assert est == pytest.approx(p["estimate_ns"], rel=1e-12)
    code, out, err = cli(["compare", "vanilla", "skip-levels", "--db", str(db)], capsys)
    assert code == 0, err
    assert "skip-levels against vanilla" in out


# -- 2. resume after SIGKILL ---------------------------------------------------------

def _cell_count(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked by a write
        return 0
    finally:
        conn.close()


def test_resume_after_sigkill_equals_a_clean_run(tmp_path):
    # The reference engine in one process: seconds for the 54 cells, against a
    # poll every few milliseconds for the first committed cell.
    args = ["reproduce", *SMALL, "--engine", "reference", "--workers", "1", "--no-progress"]
    n_total = 3 * 3 * 2 * 3
    killed = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "s2split", *args, "--db", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _cell_count(killed) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished on its own
            pass
        err = proc.communicate(timeout=60)[1].decode()
    # Killed; or, if the machine stalled the poll that long, finished (see below).
    assert proc.returncode in (-signal.SIGKILL, 0), err

    store = Store.open(killed, create=False)
    try:
        found = store.cell_count()
        # Only whole cells: every stored cell has all the phases of its test.
        for c in store.cells():
            expected = 11 if c.config["manual_protect"] else 9
            assert len(c.phases) == expected, (c.key, [n for n, _, _ in c.phases])
    finally:
        store.close()
    assert found >= 1
    assert found == n_total or proc.returncode == -signal.SIGKILL
    if found == n_total:  # pragma: no cover - the run beat the poll: interrupt it by hand
        conn = sqlite3.connect(killed)
        conn.execute("PRAGMA foreign_keys = ON")
        with conn:
            conn.execute("DELETE FROM cells WHERE id > (SELECT MIN(id) FROM cells)")
        conn.close()
        found = 1
    before = db_snapshot(killed)

    r = s2split(*args, "--db", str(killed))
    assert r.returncode == 0, r.stderr
    m = re.search(r"(\d+) cell\(s\) computed, (\d+) found in ", r.stdout)
    assert m, r.stdout[-500:]
    assert (int(m.group(1)), int(m.group(2))) == (n_total - found, found)

    clean = tmp_path / "clean.sqlite"
    r = s2split(*args, "--db", str(clean))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"{n_total} cell\(s\) computed, 0 found in ", r.stdout)

    resumed, fresh = db_snapshot(killed), db_snapshot(clean)
    assert len(fresh) == n_total
    assert resumed == fresh
    # Cells stored before the kill were kept as they were.
    assert all(resumed[k] == v for k, v in before.items())
    conn = sqlite3.connect(killed)
    try:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM cells").fetchone() == \
            (n_total, n_total)
        assert conn.execute("SELECT COUNT(*) FROM (SELECT cell_id, phase FROM phases GROUP BY "
                            "cell_id, phase HAVING COUNT(*) > 1)").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM phases WHERE cell_id NOT IN "
                            "(SELECT id FROM cells)").fetchone()[0] == 0
    finally:
        conn.close()


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every process, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out.append((int(d.name), int(fields[1]), int(fields[2])))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_stops_the_workers(tmp_path, hears_ctrl_c):
    """SIGINT to the process group (Ctrl-C) during a parallel run: exit 130 with
    one line, no worker left behind, and no waiting for the queued groups (this
    matrix takes many minutes; the timeout only guards against a hang)."""
    db = tmp_path / "r.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "s2split", "reproduce", "--size", "1G",
                             "--engine", "reference", "--workers", "2", "--no-progress", "--db",
                             str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # As soon as the pool starts its workers: the run must survive Ctrl-C
        # at any moment (a SIGINT during a fork used to be lost).
        while (proc.poll() is None and time.monotonic() < deadline and
               not any(ppid == proc.pid for _, ppid, _ in _processes())):
            time.sleep(0.002)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 130, err
    assert err == "s2split: interrupted\n"
    deadline = time.monotonic() + 20  # a forkserver (Python 3.14) may take a moment
    while [pid for pid, _, pgid in _processes() if pgid == proc.pid] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid, _, pgid in _processes() if pgid == proc.pid] == []


# -- 3. the store ----------------------------------------------------------------------

def test_export_json_and_csv_match_the_database(matrix_run, tmp_path, capsys):
    db, _ = matrix_run
    store = Store.open(db, create=False)
    try:
        stored = {c.key: c for c in store.cells()}
    finally:
        store.close()

    code, out, err = cli(["export", "--db", str(db), "--format", "json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["schema_version"] == SCHEMA_VERSION
    assert [c["key"] for c in data["cells"]] == list(stored)
    for c in data["cells"]:
        s = stored[c["key"]]
        assert (c["config"], c["variant"], c["engine"], c["profile"]) == \
            (s.config, s.variant, s.engine, s.profile)
        assert [p["phase"] for p in c["phases"]] == [n for n, _, _ in s.phases]
        for p, (n, counts, est) in zip(c["phases"], s.phases):
            assert Counts.from_dict(p["counts"]) == counts
            assert p["estimate_ns"] == est
    # -o writes the same bytes (into an existing directory: -o creates none).
    (tmp_path / "sub").mkdir()
    code, _, err = cli(["export", "--db", str(db), "--format", "json", "-o",
                        str(tmp_path / "sub" / "e.json")], capsys)
    assert code == 0, err
    assert (tmp_path / "sub" / "e.json").read_text() == out

    code, out, err = cli(["export", "--db", str(db), "--format", "csv"], capsys)
    assert code == 0, err
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    estimates: dict[tuple[str, str], float] = {}
    for row in csv.DictReader(io.StringIO(out)):
        key = (row["cell_key"], row["phase"])
        if row["kind"] == "count":
            assert row["variant"] == stored[row["cell_key"]].variant
            lv = row["level"] if row["level"] != "" else "-"
            counts[key][f"{row['op']}/{row['counter']}/{lv}"] = int(row["value"])
        elif row["kind"] == "phase_estimate":
            estimates[key] = float(row["estimate_ns"])
        else:
            pytest.fail(f"unexpected row {row}")
    assert set(estimates) == {(k, n) for k, c in stored.items() for n, _, _ in c.phases}
    for k, c in stored.items():
        for n, cnt, est in c.phases:
            assert Counts.from_dict(counts.get((k, n), {})) == cnt
            assert estimates[(k, n)] == pytest.approx(est, abs=5e-4)


def _sqlite(path: Path, *statements: tuple) -> Path:
    conn = sqlite3.connect(path)
    with conn:
        for sql, *args in statements:
            conn.execute(sql, *args)
    conn.close()
    return path


def _foreign_files(d: Path) -> dict[str, Path]:
    files = {}
    p = d / "text.sqlite"
    p.write_text("this is not a database\n")
    files["not SQLite"] = p
    files["no meta table"] = _sqlite(
        d / "other-app.sqlite", ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",),
        ("INSERT INTO notes (body) VALUES ('hello')",))
    files["app 'someone-else'"] = _sqlite(
        d / "other-meta.sqlite", ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
        ("INSERT INTO meta VALUES ('app', 'someone-else'), ('schema_version', '1')",))
    p = d / "newer.sqlite"
    Store.open(p).close()
    _sqlite(p, ("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION + 1),)))
    files["newer s2split"] = p
    return files


@pytest.mark.parametrize("command", [
    ["reproduce", *SMALL, "--granule", "4K", "--backing", "thp", "--scenario", "enable",
     "--no-progress"],
    ["explain", *SMALL, "--granule", "4K", "--backing", "thp", "--scenario", "enable"],
    ["show"],
    ["compare", "vanilla", "skip-levels"],
    ["export", "--format", "csv"],
])
def test_foreign_databases_are_refused_untouched(tmp_path, capsys, command):
    for needle, path in _foreign_files(tmp_path).items():
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        code, out, err = cli([*command, "--db", str(path)], capsys)
        assert code == 2, (needle, out, err)
        one_line_error(err, needle)
        assert str(path) in err
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before, needle
        # No journal or WAL left next to it.
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name)) == \
            [path.name]


def test_damaged_database_is_a_one_line_error(matrix_run, tmp_path, capsys):
    db, _ = matrix_run
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[2 * page:] = b"\xa5" * (len(data) - 2 * page)  # keep the header, ruin the rest
    bad = tmp_path / "damaged.sqlite"
    bad.write_bytes(bytes(data))
    for command in (["show"], ["export"], ["compare", "vanilla", "skip-levels"]):
        code, _, err = cli([*command, "--db", str(bad)], capsys)
        assert code == 2, err
        one_line_error(err, str(bad))


@pytest.mark.parametrize("command", [
    ["reproduce", *SMALL, "--no-progress"],
    ["explain", *SMALL, "--granule", "4K", "--backing", "thp", "--scenario", "enable"],
    ["show"],
    ["compare", "vanilla", "skip-levels"],
    ["perf-test", "-b", "4M"],
])
def test_unknown_profile_is_one_line_and_creates_nothing(matrix_run, tmp_path, capsys,
                                                        command):
    db = matrix_run[0] if command[0] in ("show", "compare") else tmp_path / "new.sqlite"
    before = db.exists() and (db.read_bytes(), db.stat().st_mtime_ns)
    extra = [] if command[0] == "perf-test" else ["--db", str(db)]
    code, _, err = cli([*command, *extra, "--profile", "no-such-profile"], capsys)
    assert code == 2
    one_line_error(err, "unknown profile 'no-such-profile'")
    if before:
        assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    else:
        assert not db.exists()


def test_missing_database_for_show_compare_export(tmp_path, capsys):
    db = tmp_path / "nothing.sqlite"
    for command in (["show"], ["compare", "vanilla", "skip-levels"], ["export"]):
        code, _, err = cli([*command, "--db", str(db)], capsys)
        assert code == 2
        one_line_error(err, "no such results database")
        assert not db.exists()
    code, _, err = cli(["reproduce", *SMALL, "--no-progress", "--db",
                        str(tmp_path / "no-such-dir" / "r.sqlite")], capsys)
    assert code == 2
    one_line_error(err, "cannot create the results database")


def test_show_and_compare(matrix_run, capsys):
    db, _ = matrix_run
    cells = cells_by_coordinates(db)
    code, out, err = cli(["show", "--db", str(db)], capsys)
    assert code == 0, err
    assert f"{len(cells)} cell(s)" in out
    for v in VARIANTS:
        assert re.search(rf"│ {re.escape(v)} +│", out), v
    code, out, err = cli(["show", "--db", str(db), "--variant", "return-hints"], capsys)
    assert code == 0, err
    assert "return-hints" in out and "skip-levels" not in out

    code, out, err = cli(["compare", "vanilla", "skip-levels", "--db", str(db)], capsys)
    assert code == 0, err
    assert "skip-levels against vanilla" in out
    # One row per granule x backing x scenario; the entries-read column is exact
    # and, like reproduce's tables, says what skip-levels saves (positive).
    table = [[x.strip() for x in line.split("│")[1:-1]] for line in out.splitlines()
             if line.startswith("│")]
    assert len(table) == len(GRANULES) * len(BACKING_NAMES) * len(SCENARIOS)
    backing_of = {v: k for k, v in BACKING_NAMES.items()}
    for g, b, s, ea, eb, t, reads, visits in table:
        key = (GRANULES[g], backing_of[b], s)
        ca, cb = cells[(*key, "vanilla")], cells[(*key, "skip-levels")]
        ra = sum(ca.phase(n).entries_read() for n in syscall_phase_names(ca))
        rb = sum(cb.phase(n).entries_read() for n in syscall_phase_names(cb))
        assert reads == f"{100 * (ra - rb) / ra:.1f}%"

    code, _, err = cli(["compare", "vanilla", "skip-children", "--db", str(db)], capsys)
    assert code == 2
    one_line_error(err, "no stored configuration has both")


def test_explain_names_the_gains(matrix_run, capsys):
    db, _ = matrix_run
    cells = cells_by_coordinates(db)
    profile = load_profile("server-vhe")
    code, out, err = cli(["explain", *SMALL, "--granule", "16K", "--backing", "thp",
                          "--scenario", "clear", "--db", str(db)], capsys)
    assert code == 0, err
    for v in ("skip-levels", "skip-levels+skip-children"):
        base = cells[(16384, "thp", "clear", "vanilla")]
        other = cells[(16384, "thp", "clear", v)]
        eb = sum(profile.estimate_ns(base.phase(n)) for n in syscall_phase_names(base))
        eo = sum(profile.estimate_ns(other.phase(n)) for n in syscall_phase_names(other))
        assert f"{v} saves {100 * (eb - eo) / eb:.1f}% of the estimated time" in out
    code, _, err = cli(["explain", *SMALL, "--db", str(db)], capsys)
    assert code == 2
    one_line_error(err, "one cell at a time")


# -- 6. plots ---------------------------------------------------------------------------

def test_plots_png_and_svg_for_each_scenario_and_backing(matrix_run, tmp_path, capsys):
    db, _ = matrix_run
    out_dir = tmp_path / "plots"
    backings = ["regular", "hugetlb"]
    code, out, err = cli(["reproduce", *SMALL, "--granule", "4K,64K", "--backing",
                          ",".join(backings), "--variant", ",".join(VARIANTS), "--db", str(db),
                          "--plots", str(out_dir), "--no-progress"], capsys)
    assert code == 0, err
    expected = {f"{what}_{s}_{b}.{ext}" for what in ("time", "reads") for s in SCENARIOS
                for b in backings for ext in ("png", "svg")}
    assert {p.name for p in out_dir.iterdir()} == expected  # no temp files left
    assert f"Plots: {len(expected)} files in {out_dir}" in out
    for name in expected:
        data = (out_dir / name).read_bytes()
        assert len(data) > 1000, name
        if name.endswith(".png"):
            assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        else:
            assert data.lstrip().startswith(b"<?xml") and b"<svg" in data, name


def test_plots_into_a_file_fail_before_running(tmp_path, capsys):
    target = tmp_path / "plots.png"
    target.write_bytes(b"not a directory")
    db = tmp_path / "r.sqlite"
    code, _, err = cli(["reproduce", *SMALL, "--plots", str(target), "--db", str(db),
                        "--no-progress"], capsys)
    assert code == 2
    one_line_error(err, "not a directory")
    assert not db.exists()
    assert target.read_bytes() == b"not a directory"


def test_export_to_a_directory_is_one_line(matrix_run, tmp_path, capsys):
    code, _, err = cli(["export", "--db", str(matrix_run[0]), "-o", str(tmp_path)], capsys)
    assert code == 2
    one_line_error(err, "is a directory")
    assert list(tmp_path.iterdir()) == []


# -- 5. Dask ----------------------------------------------------------------------------

def test_dask_executor_gives_the_local_results(tmp_path, capsys):
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    matrix = [*SMALL, "--granule", "4K,64K", "--backing", "thp,hugetlb", "--no-progress",
              "--json"]
    local = tmp_path / "local.sqlite"
    code, out_local, err = cli(["reproduce", *matrix, "--db", str(local), "--workers", "1"],
                               capsys)
    assert code == 0, err
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp://",
                      host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        remote = tmp_path / "dask.sqlite"
        code, out_dask, err = cli(["reproduce", *matrix, "--db", str(remote), "--dask",
                                   cluster.scheduler_address], capsys)
        assert code == 0, err
        # A second run finds every cell and never submits anything.
        code, out_again, err = cli(["reproduce", *matrix, "--db", str(remote), "--dask",
                                    cluster.scheduler_address], capsys)
        assert code == 0, err
    a, b, c = (json.loads(x) for x in (out_local, out_dask, out_again))
    n = 2 * 2 * 2 * 3
    assert a["cells"] == b["cells"] == {"computed": n, "found": 0}
    assert c["cells"] == {"computed": 0, "found": n}
    assert a["rows"] == b["rows"] == c["rows"]
    assert db_snapshot(local) == db_snapshot(remote)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "nosuchscheme://127.0.0.1:8786"])
def test_bad_dask_address_is_one_line(tmp_path, capsys, address):
    pytest.importorskip("distributed")
    code, _, err = cli(["reproduce", *SMALL, "--db", str(tmp_path / "r.sqlite"), "--dask",
                        address, "--no-progress"], capsys)
    assert code == 2
    one_line_error(err, "Dask")


def test_default_run_says_where_the_gains_are(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    code, out, err = cli(["reproduce", *SMALL, "--granule", "4K,16K", "--backing", "thp",
                          "--scenario", "clear", "--db", str(db), "--no-progress"], capsys)
    assert code == 0, err
    gains = out[out.index("Where the gains are (4K cells"):]
    assert "4K THP, clear" in gains and "16K THP, clear" not in gains  # the first granule
    assert "skip-levels saves" in gains
    # With the default chunk no subtree is built complete, so skip-children
    # adds nothing: said once, not explained twice.
    assert "skip-levels and skip-levels+skip-children do identical work" in gains
    assert "skip-levels+skip-children saves" not in gains
