"""Issue 25: each failure the third hostile probe found, reproduced, and the
general mechanism behind its fix (inputs are never outputs, one validation
both ways, strict JSON, special files, ranges, a compile cache that heals,
one error boundary, bounded readers). Only the reference engine runs here:
no test compiles the fast engine."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import s2split
from s2split.storage import store as store_mod
from s2split.cli.parser import main
from s2split.plumbing.errors import S2Error
from s2split.model.pgtable import variants as V
from s2split.storage.store import Store

from _cli import one_line, run_cli as cli

ROOT = Path(__file__).parent.parent
SRC = Path(s2split.__file__).parent.parent
HW_DATA = ROOT / "tests" / "hw" / "data"
FIXTURE = sorted((ROOT / "fixtures" / "real-kernel").glob("*.json"))[0]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
SMALL = ["--size", "4M", "--granule", "4K", "--backing", "thp", "--scenario", "enable",
         "--variant", "vanilla", "--engine", "reference", "--workers", "1"]


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s2split", *argv], capture_output=True,
                          text=True, env=kw.pop("env", ENV), timeout=kw.pop("timeout", 120),
                          **kw)


def refused(code_out_err, *needles: str) -> str:
    code, _, err = code_out_err
    assert code == 2, err
    return one_line(err, *needles)


@pytest.fixture(scope="module")
def results_db(tmp_path_factory) -> Path:
    """One reproduce cell (reference engine, 4M) and measurements of labels A and B."""
    db = tmp_path_factory.mktemp("db") / "r.sqlite"
    assert main(["reproduce", *SMALL, "--no-progress", "--db", str(db)]) == 0
    return db


def _copy(db: Path, tmp_path: Path, name: str = "s2split-results.sqlite") -> Path:
    out = tmp_path / name
    shutil.copyfile(db, out)
    return out


# -- inputs are never outputs -------------------------------------------------------------

@pytest.mark.parametrize("how", ["default-db", "symlink", "hard-link", "relative-path"])
def test_export_never_writes_over_its_database(results_db, tmp_path, monkeypatch, capsys, how):
    db = _copy(results_db, tmp_path)
    before = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    if how == "default-db":  # the case: -o naming the default database
        argv = ["export", "-o", "s2split-results.sqlite"]
    elif how == "symlink":
        (tmp_path / "link.json").symlink_to(db)
        argv = ["export", "-o", "link.json"]
    elif how == "hard-link":
        os.link(db, tmp_path / "same.json")
        argv = ["export", "--db", str(db), "-o", "same.json"]
    else:
        (tmp_path / "sub").mkdir()
        argv = ["export", "--db", str(db), "-o", "sub/../s2split-results.sqlite"]
    refused(cli(argv, capsys), "is an input of this command")
    assert db.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_refuses_its_database_as_output_before_running(results_db, tmp_path, capsys):
    db = _copy(results_db, tmp_path, "x.sqlite")
    before = db.read_bytes()
    refused(cli(["report", *SMALL, "--db", str(db), "-o", str(db)], capsys), "-o",
            "is an input")
    assert db.read_bytes() == before


def test_calibrate_output_over_its_measurements_is_refused(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("options,phase,seconds\n-m 6 -b 4M,populate,0.002\n"
                 "-m 6 -b 4M,enable_dirty_logging,0.0004\n")
    before = m.read_bytes()
    refused(cli(["calibrate", str(m), "--engine", "reference", "--fit", "walks", "-o", str(m)],
                capsys), "is an input")
    assert m.read_bytes() == before


def test_a_new_output_beside_the_inputs_is_written(results_db, tmp_path, capsys):
    db = _copy(results_db, tmp_path)
    code, _, err = cli(["export", "--db", str(db), "-o", str(tmp_path / "out.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out.json").read_text())["format"] == "s2split-results/1"


# -- one validation, both ways -----------------------------------------------------------

def test_x86_output_imports_with_pa_bits_null_and_exports(tmp_path, capsys):
    """'PA-bits:ANY' was stored as pa_bits 0, which every later reader refused."""
    db = tmp_path / "x.sqlite"
    code, out, err = cli(["hw", "import", str(HW_DATA / "v6.12-x86-2vcpus.txt"), "--label",
                          "x86", "--args", "-v 2", "--db", str(db)], capsys)
    assert code == 0, err
    code, out, err = cli(["export", "--db", str(db)], capsys)
    assert code == 0, err
    rows = json.loads(out)["measurements"]
    assert rows and all(r["config"]["pa_bits"] is None for r in rows)


HW_ROW = {"label": "k", "config_key": "-m 6 -b 8M",
          "config": {"vcpu_memory_bytes": 8 << 20, "vcpus": 1, "backing": "anonymous",
                     "manual_protect": True, "iterations": 2, "granule": 4096, "pa_bits": 40},
          "phase": "populate", "repetition": 0, "seconds": 0.01, "host": {}, "source": "t"}


@pytest.mark.parametrize("key,value,needle", [
    ("phase", "warp_drive", "phase"), ("phase", "iter0_dirty", "phase"),
    ("seconds", 0, "seconds"), ("seconds", 1e308, "seconds"),
    ("repetition", 1 << 63, "repetition"), ("repetition", -1, "repetition")])
def test_hw_import_json_refuses_rows_later_commands_would_refuse(tmp_path, capsys, key, value,
                                                                  needle):
    doc = {"format": "s2split-hw-run/1", "rows": [HW_ROW, dict(HW_ROW, **{key: value})]}
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(doc))
    db = tmp_path / "d.sqlite"
    refused(cli(["hw", "import-json", str(path), "--db", str(db)], capsys), "hw.json",
            f"rows[1].{needle}")
    assert not db.exists()


def test_store_checks_rows_on_the_way_in_all_or_nothing(tmp_path):
    s = Store.open(tmp_path / "d.sqlite")
    try:
        for key, value in (("phase", "nope"), ("seconds", 0.0), ("repetition", 1 << 63),
                           ("config", {"granule": 3}), ("seconds", float("nan"))):
            with pytest.raises(S2Error, match="new measurement 1"):
                s.add_measurements([HW_ROW, dict(HW_ROW, **{key: value})])
            assert s.measurements() == []  # not even the good first row
        assert s.add_measurements([HW_ROW]) == 1
        assert len(s.measurements()) == 1
        with pytest.raises(S2Error, match="new cell 'k'.*config"):
            s.add_cell("k", {"granule": 4096}, "vanilla", "reference", "p", 0.1, [])
        assert s.cell_count() == 0
    finally:
        s.close()


# -- strict JSON ------------------------------------------------------------------------------

def _dup(text: str, key: str) -> str:
    """TEXT (JSON) with the first ``"KEY": value`` given a second time, first."""
    at = text.index(f'"{key}"')
    return text[:at] + f'"{key}": 12345, ' + text[at:]


def test_a_duplicate_call_count_in_a_fixture_is_refused(tmp_path, capsys):
    """The issue's case: the fixture's last value was kept, and a check that
    should differ reported 0 differing."""
    doc = json.loads(FIXTURE.read_text())
    ph = next(p for p in doc["runs"][0]["phases"] if p.get("calls"))
    fn = sorted(ph["calls"])[0]
    text = json.dumps(doc)
    path = tmp_path / "fx.json"
    path.write_text(_dup(text, fn))
    refused(cli(["fidelity", str(path)], capsys), "fx.json", f"duplicate key {fn!r}")


@pytest.mark.parametrize("kind", ["profile", "hw-json", "measurements", "savings"])
def test_duplicate_keys_are_refused_by_every_reader(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.json"
    db = tmp_path / "d.sqlite"
    if kind == "profile":
        path.write_text('{"format": "s2split-profile/1", "name": "a", "name": "b"}')
        argv, key = ["perf-test", "-b", "4M", "--profile", str(path)], "name"
    elif kind == "hw-json":
        path.write_text(_dup(json.dumps({"format": "s2split-hw-run/1", "rows": [HW_ROW]}),
                             "seconds"))
        argv, key = ["hw", "import-json", str(path), "--db", str(db)], "seconds"
    elif kind == "measurements":
        path.write_text('[{"options": "-m 6", "phase": "populate", "seconds": 1, '
                        '"seconds": 2}]')
        argv, key = ["calibrate", str(path)], "seconds"
    else:
        path.write_text('[{"scenario": "clear", "scenario": "enable", "backing": "thp", '
                        '"granule": "4K", "variant": "skip-levels", "saved_pct": 5}]')
        argv, key = ["calibrate", "--savings", str(path), "--db", str(db)], "scenario"
    refused(cli(argv, capsys), path.name, f"duplicate key {key!r}")
    assert not db.exists()


def test_database_rows_with_duplicate_keys_are_refused(results_db, tmp_path, capsys):
    db = _copy(results_db, tmp_path)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE cells SET config = '{\"granule\": 4096, ' || substr(config, 2)")
    conn.close()
    refused(cli(["show", "--db", str(db)], capsys), "cells row", "duplicate key 'granule'")


# -- special files and bounded readers ---------------------------------------------------------

def _special(tmp_path: Path, kind: str) -> str:
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        return str(path)
    if kind == "directory":
        return str(tmp_path)
    return "/dev/zero"


READERS = {
    "profile": lambda f, db: ["perf-test", "-b", "4M", "--profile", f],
    "fixture": lambda f, db: ["fidelity", f],
    "measurements": lambda f, db: ["calibrate", f],
    "savings": lambda f, db: ["calibrate", "--savings", f, "--db", db],
    "hw-output": lambda f, db: ["hw", "import", f, "--label", "x", "--db", db],
    "hw-json": lambda f, db: ["hw", "import-json", f, "--db", db],
    "variants": lambda f, db: ["--variants", f, "variants"],
    "database": lambda f, db: ["show", "--db", f],
    "database-export": lambda f, db: ["export", "--db", f],
    "database-reproduce": lambda f, db: ["reproduce", *SMALL, "--db", f],
}


@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_special_files_are_refused_before_reading(tmp_path, reader, kind):
    """In a subprocess with a timeout: a FIFO blocked open() forever, and
    /dev/zero never ends."""
    f = _special(tmp_path, kind)
    db = str(tmp_path / "new.sqlite")
    t0 = time.monotonic()
    r = run(READERS[reader](f, db), timeout=90)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr)
    assert not Path(db).exists()
    assert time.monotonic() - t0 < 60  # only a guard: a hang would be forever


def test_input_size_limit_is_documented_and_overridable(tmp_path, capsys, monkeypatch):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "s2split-profile/1", "name": "p",
                             "description": "x" * 300}))
    monkeypatch.setenv("S2SPLIT_MAX_INPUT_BYTES", "200")
    refused(cli(["perf-test", "-b", "4M", "--profile", str(p)], capsys), "p.json",
            "200-byte limit", "S2SPLIT_MAX_INPUT_BYTES")
    monkeypatch.setenv("S2SPLIT_MAX_INPUT_BYTES", "lots")
    refused(cli(["perf-test", "-b", "4M", "--profile", str(p)], capsys),
            "S2SPLIT_MAX_INPUT_BYTES")
    readme = (ROOT / "README.md").read_text()
    assert "S2SPLIT_MAX_INPUT_BYTES" in readme


def test_profile_inheritance_depth_is_bounded(tmp_path, capsys):
    from s2split.estimate.cost import MAX_INHERITANCE_DEPTH
    n = 3 * MAX_INHERITANCE_DEPTH  # without the limit: a RecursionError long before 1000
    (tmp_path / "c0.json").write_text(json.dumps({"format": "s2split-profile/1",
                                                  "name": "c0", "inherits": "server-vhe"}))
    for i in range(1, n + 1):
        (tmp_path / f"c{i}.json").write_text(json.dumps(
            {"format": "s2split-profile/1", "name": f"c{i}", "inherits": f"c{i - 1}.json"}))
    refused(cli(["perf-test", "-b", "4M", "--profile", str(tmp_path / f"c{n}.json")], capsys),
            f"more than {MAX_INHERITANCE_DEPTH} profiles")
    # a chain within the limit still loads
    from s2split.estimate.cost import load_profile
    assert load_profile(str(tmp_path / f"c{MAX_INHERITANCE_DEPTH - 2}.json")).name == \
        f"c{MAX_INHERITANCE_DEPTH - 2}"


def test_utf8_bom_csv_is_read(tmp_path, capsys):
    """The header was not found behind a byte-order mark. The row's phase is
    unknown on purpose, so that the command fails after the header is read
    (no model run)."""
    m = tmp_path / "m.csv"
    m.write_bytes(b"\xef\xbb\xbfoptions,phase,seconds\n-m 6 -b 4M,no_such_phase,0.002\n")
    line = refused(cli(["calibrate", str(m)], capsys), "m.csv:2")
    assert "needs the columns" not in line


# -- ranges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["reproduce", "--iterations", str(1 << 31)], "--iterations must be <= 2147483647"),
    (["reproduce", "--workers", "100000"], "--workers must be <="),
    (["variants", "--examples", str(1 << 40)], "--examples must be <="),
    (["hw", "compare", "A", "B", "--bootstrap-seed", "-1"], "--bootstrap-seed must be >= 0"),
    (["hw", "run", "--repeat", str(1 << 31)], "--repeat must be <="),
])
def test_numeric_options_have_ranges(capsys, argv, needle):
    refused(cli(argv, capsys), needle)


def test_perf_test_iterations_bound_matches_reproduce():
    from s2split.selftest.memstress import INT_MAX
    from s2split.selftest.options import int_arg
    assert INT_MAX == (1 << 31) - 1  # the selftest's -i is an int
    int_arg("-i", None, INT_MAX)(str(INT_MAX))


@pytest.mark.parametrize("row,needle", [
    ({"stderr_pct": "1e-200"}, "stderr_pct must be between"),
    ({"stderr_pct": "1e300"}, "stderr_pct must be between")])
def test_savings_standard_errors_are_bounded(tmp_path, capsys, row, needle):
    base = {"scenario": "clear", "backing": "thp", "granule": "4K", "variant": "skip-levels",
            "saved_pct": "5"}
    p = tmp_path / "s.csv"
    full = {**base, **row}
    p.write_text(",".join(full) + "\n" + ",".join(full.values()) + "\n")
    refused(cli(["calibrate", "--savings", str(p), "--db", str(tmp_path / "d.sqlite")],
                capsys), "s.csv", needle)
    assert not (tmp_path / "d.sqlite").exists()


def test_savings_stderr_option_is_bounded(tmp_path, capsys):
    p = tmp_path / "s.csv"
    p.write_text("scenario,backing,granule,variant,saved_pct\nclear,thp,4K,skip-levels,5\n")
    refused(cli(["calibrate", "--savings", str(p), "--stderr", "1e-200", "--db",
                 str(tmp_path / "d.sqlite")], capsys), "--stderr must be between")


def test_huge_measured_times_are_refused(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("options,phase,seconds\n-m 6 -b 4M,populate,1e308\n")
    refused(cli(["calibrate", str(m)], capsys), "m.csv:2", "seconds must be <=")


# -- the error boundary ------------------------------------------------------------------------

@pytest.mark.parametrize("exc,code,needle", [
    (MemoryError(), 2, "out of memory"),
    (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
    (OSError(errno.EMFILE, "Too many open files"), 2, "ulimit -n"),
    (OSError(errno.EACCES, "Permission denied", "/some/where\nelse"), 2,
     "/some/where\\nelse: Permission denied"),
    (OSError(errno.EPIPE, "Broken pipe"), 1, "cannot write standard output"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ImportError("libfoo.so: failed to map segment from shared object"), 2,
     "a resource limit"),
])
def test_the_boundary_turns_faults_into_one_line(monkeypatch, capsys, exc, code, needle):
    import s2split.cli.parser as cli_mod

    def boom(args):
        raise exc
    monkeypatch.setattr(cli_mod, "cmd_geometry", boom)
    got, _, err = cli(["geometry"], capsys)
    assert got == code, err
    one_line(err, needle)


def test_the_boundary_is_installed_before_argument_parsing(monkeypatch, capsys):
    import s2split.cli.parser as cli_mod

    def boom():
        raise MemoryError
    monkeypatch.setattr(cli_mod, "build_parser", boom)
    got, _, err = cli(["geometry"], capsys)
    assert got == 2
    one_line(err, "out of memory")


def test_a_real_bug_still_shows_its_traceback(monkeypatch):
    """The boundary is for faults of the environment and input, not for bugs."""
    import s2split.cli.parser as cli_mod

    def bug(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli_mod, "cmd_geometry", bug)
    with pytest.raises(ZeroDivisionError):
        main(["geometry"])


def test_too_few_file_descriptors_is_one_line(tmp_path):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (6, 6))
    r = subprocess.run([sys.executable, "-m", "s2split", "reproduce", *SMALL[:-1], "2",
                        "--granule", "4K,16K", "--no-progress", "--db",
                        str(tmp_path / "r.sqlite")], capture_output=True, text=True, env=ENV,
                       timeout=120, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr)
    assert "open files" in r.stderr or "resource limit" in r.stderr


def test_ctrl_c_while_importing_is_one_line(monkeypatch, capsys):
    """The console script's entry imports the command line itself: a Ctrl-C
    during those imports (simulated: the import raises it) is status 130."""
    from s2split import __main__ as entry_mod

    class Interrupting(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt
    monkeypatch.setitem(sys.modules, "s2split.cli.parser", Interrupting("s2split.cli.parser"))
    with pytest.raises(SystemExit) as e:
        entry_mod.entry()
    assert e.value.code == 130
    one_line(capsys.readouterr().err, "s2split: interrupted")


@pytest.mark.parametrize("delay", [0.1, 0.25, 0.5])
def test_early_ctrl_c_never_prints_a_traceback(delay, hears_ctrl_c):
    """Ctrl-C while the interpreter imports (or, later, while the command
    runs: it takes far longer than these delays). Before Python installs its
    SIGINT handler the process just dies by the signal, also without a
    traceback."""
    p = subprocess.Popen([sys.executable, "-m", "s2split", "variants", "--check", "skip-levels",
                          "--examples", "100000"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()  # a child that did not stop must not run on (100,000 examples)
        p.wait()
    assert "Traceback" not in err, err
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, err)


_SLOW_WRITE = """
import os, sys, time
import s2split.plumbing.output as out
real_fsync = os.fsync
def slow(fd):
    print("writing", flush=True)
    time.sleep(60)
out.os.fsync = slow
from s2split.cli.parser import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_remove_the_temporary_output(results_db, tmp_path, sig):
    out = tmp_path / "out.json"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, "export", "--db", str(results_db),
                          "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    assert p.stdout.readline().strip() == "writing"
    assert list(tmp_path.glob(".out.json.*.tmp"))  # the write is in flight
    p.send_signal(sig)
    p.communicate(timeout=60)
    assert p.returncode == -sig  # it still dies by the signal
    assert not list(tmp_path.glob(".*.tmp")) and not out.exists()


@pytest.mark.parametrize("length", [242, 250, 255])
def test_output_names_up_to_255_bytes_work(results_db, tmp_path, capsys, length):
    out = tmp_path / ("o" * (length - 5) + ".json")
    assert len(out.name.encode()) == length
    code, _, err = cli(["export", "--db", str(results_db), "-o", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["format"] == "s2split-results/1"


def test_a_path_with_a_newline_stays_one_line(capsys):
    line = refused(cli(["show", "--db", "/nonexistent/a\nb.sqlite"], capsys), "a\\nb.sqlite")
    assert "\n" not in line


def test_a_locked_database_is_reported_as_locked(results_db, tmp_path, capsys, monkeypatch):
    db = _copy(results_db, tmp_path)
    monkeypatch.setattr(store_mod, "LOCK_TIMEOUT_S", 0.2)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        line = refused(cli(["show", "--db", str(db)], capsys), "locked by another process")
        assert "not an s2split results database" not in line
    finally:
        other.execute("ROLLBACK")
        other.close()


# -- variant files -------------------------------------------------------------------------------

@pytest.fixture
def clean_variants():
    saved = {k: os.environ.get(k) for k in (V.ENV, V.FILES_ENV)}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_a_variants_path_with_a_colon_is_one_file(tmp_path, capsys, clean_variants):
    d = tmp_path / "a:b"
    d.mkdir()
    f = d / "my:variants.py"
    f.write_text("from s2split.model.pgtable.variants import Variant, register\n"
                 "register(Variant('colon-test', 'a variant from a path with colons'))\n")
    code, out, err = cli(["--variants", str(f), "variants"], capsys)
    assert code == 0, err
    assert "colon-test" in out
    assert str(f) in json.loads(os.environ[V.FILES_ENV])  # what worker processes load


@pytest.mark.parametrize("raise_", [
    "raise SystemExit(3)", "raise KeyboardInterrupt_('mine')",
    "raise Custom('not an Exception')", "raise GeneratorExit", "f()"])
def test_a_variants_file_raising_any_base_exception_is_one_line(tmp_path, capsys, raise_,
                                                                clean_variants):
    f = tmp_path / "v.py"
    f.write_text("class Custom(BaseException):\n    pass\n"
                 "class KeyboardInterrupt_(KeyboardInterrupt):\n    pass\n"
                 "def f():\n    return f()\n" + raise_ + "\n")
    refused(cli(["--variants", str(f), "variants"], capsys), "v.py")


_VISITOR = """
from s2split.model.pgtable import visitor_api as api
from s2split.model.pgtable.variants import Variant, register
def split_bad(ctx):
    {body}
register(Variant("bad-visitor-{n}", "d", visitors={{"split": split_bad}}))
"""


@pytest.mark.parametrize("n,body,needle", [
    (1, "return None", "returned NoneType None"), (2, "return 'x'", "returned str"),
    (3, "return split_bad(ctx)", "recursed too deeply"), (4, "return 0.5", "returned float")])
def test_reference_engine_visitors_are_held_to_the_fast_engines_rules(tmp_path, capsys, n, body,
                                                                      needle, clean_variants):
    f = tmp_path / f"v{n}.py"
    f.write_text(_VISITOR.format(body=body, n=n))
    refused(cli(["--variants", str(f), "perf-test", "-b", "4M", "-s", "anonymous_thp", "-g",
                 "--chunk-size", "2M", "--variant", f"bad-visitor-{n}", "--engine",
                 "reference"], capsys), "split_bad", f"v{n}.py", needle)


# -- Dask ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["tls://127.0.0.1:1", "ucx://127.0.0.1:1"])
def test_dask_addresses_that_cannot_connect_are_one_line(tmp_path, capsys, address):
    pytest.importorskip("distributed")
    refused(cli(["reproduce", *SMALL[:-2], "--no-progress", "--db", str(tmp_path / "d"),
                 "--dask", address], capsys), address)


def test_a_lost_dask_scheduler_is_one_line(monkeypatch):
    distributed = pytest.importorskip("distributed")
    from distributed.comm.core import CommClosedError

    from s2split.tasks.reproduce import DaskExecutor

    class Future:
        def result(self):
            raise CommClosedError("in <TCP (closed)>: Stream is closed")

    class Client:
        status = "running"

        def submit(self, *a, **kw):
            return Future()

        def close(self):
            raise OSError("the scheduler is gone")
    ex = DaskExecutor.__new__(DaskExecutor)
    ex.client, ex.address = Client(), "tcp://10.0.0.5:8786"
    monkeypatch.setattr(distributed, "as_completed", lambda futures: iter(futures))
    group = types.SimpleNamespace(params=None, variants=(), label="4K thp enable")
    with pytest.raises(S2Error, match="Dask cluster at tcp://10.0.0.5:8786 failed while "
                       "running 4K thp enable .CommClosedError"):
        list(ex.run([(group, "reference")]))


# -- the compile cache heals -------------------------------------------------------------------

_HASH = ("from s2split.engine import compile_cache as c; "
         "print(c.compiled_sources_hash() == c.SOURCES_HASH)")


def _cache_files(cache: Path, suffix: str) -> list[Path]:
    return sorted(cache.rglob(f"compile_cache.compiled_sources_hash-*{suffix}"))


@pytest.mark.parametrize("damage", ["truncated-data", "garbage-index", "empty-index"])
def test_a_damaged_compile_cache_is_dropped_and_rebuilt(tmp_path, damage):
    """Only the small function that records the sources' hash is compiled
    (in a private cache): the damage and the healing are the same for every
    cached function (each loads through the same wrapper)."""
    env = dict(ENV, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True,
                           env=env, timeout=300)
    assert first.stdout.strip() == "True" and first.stderr == "", first.stderr
    if damage == "truncated-data":
        f = _cache_files(tmp_path, ".nbc")[0]
        f.write_bytes(f.read_bytes()[:20])
    else:
        f = _cache_files(tmp_path, ".nbi")[0]
        f.write_bytes(b"garbage\n" if damage == "garbage-index" else b"")
    second = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True,
                            env=env, timeout=300)
    assert second.stdout.strip() == "True", second.stderr
    one_line(second.stderr, "compile cache could not be loaded", "compiling afresh")
    third = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True,
                           env=env, timeout=300)
    assert third.stdout.strip() == "True" and third.stderr == "", third.stderr  # healed


def test_no_writable_cache_location_picks_a_private_one(tmp_path):
    """A copy of the package whose __pycache__ directories are files, and a
    user cache directory below a file: numba alone raised "no locator
    available"."""
    pkg = tmp_path / "pkg"
    shutil.copytree(SRC / "s2split", pkg / "s2split",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    # Every folder numba caches in: beside the engine, the page-table
    # visitors and MMU-layer variants it compiles, the rules and memstress.
    for d in ("engine", "model/pgtable", "model/kvm", "arm64", "selftest"):
        (pkg / "s2split" / d / "__pycache__").write_text("not a directory")
    (tmp_path / "file").write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in ENV.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(pkg), PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(tmp),
               XDG_CACHE_HOME=str(tmp_path / "file" / "cache"))
    for attempt in (1, 2):
        r = subprocess.run([sys.executable, "-c", _HASH], capture_output=True, text=True,
                           env=env, timeout=300, cwd=tmp_path)
        assert r.stdout.strip() == "True", r.stderr
        one_line(r.stderr, "caching in", str(tmp))  # said once per process
    assert _cache_files(tmp, ".nbi")


def test_cache_location_choice():
    from s2split.engine import cache_location as L
    old = os.environ.pop("NUMBA_CACHE_DIR", None)
    try:
        assert L.choose(lambda d: True) == ("as is", None)
        assert L.choose(lambda d: d == L.private_cache()) == ("private", L.private_cache())
        assert L.choose(lambda d: False) == ("uncached", None)
    finally:
        if old is not None:
            os.environ["NUMBA_CACHE_DIR"] = old


def test_uncached_mode_compiles_and_writes_no_cache(tmp_path):
    env = dict(ENV, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    code = ("from s2split.engine import cache_location as L; L.run_uncached(); " + _HASH)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.stdout.strip() == "True", r.stderr
    assert not _cache_files(tmp_path, ".nbi")


def test_a_cache_that_cannot_be_saved_runs_uncached(capsys):
    """A full disk while compiling: one line about the cache, and the run
    goes on (it used to end with "cannot write standard output")."""
    from numba.core.caching import NullCache

    from s2split.engine import compile_cache as cc

    class FullDisk:
        def load_overload(self, sig, ctx):
            return None

        def save_overload(self, sig, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    fake = types.SimpleNamespace(_cache=FullDisk())
    cc.heal_on_failure(fake)
    saved = {id(d): d._cache for d in (cc.compiled_sources_hash, *cc.dispatchers())}
    cc._said.discard("save")
    try:
        fake._cache.save_overload((), None)  # no exception
        err = capsys.readouterr().err
        one_line(err, "compile cache cannot be written", "No space left on device",
                 "running uncached")
        assert all(isinstance(d._cache, NullCache) for d in cc.dispatchers())
    finally:
        for d in (cc.compiled_sources_hash, *cc.dispatchers()):
            d._cache = saved[id(d)]
