"""Failures around the model: errors in worker processes, killed parents, a
results store that fails mid-run, output targets that are not plain files,
standard output that cannot be written, and the small argument checks of
issue 14. Every hang guard here is a timeout that only a bug reaches."""

from __future__ import annotations

import errno
import importlib
import inspect
import json
import os
import pickle
import pkgutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import s2split
from s2split.plumbing.errors import EINVAL, KernelError, S2Error
from s2split.hw.kvm import KvmError
from s2split.hw.record import Terminated
from s2split.plumbing.output import write_atomic
from s2split.plumbing.workers import Pool, WorkerError

from _cli import one_line, run_cli as cli

ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
SRC = str(Path(s2split.__file__).parent.parent)


def s2split_run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s2split", *args], capture_output=True,
                          text=True, env=ENV, timeout=kw.pop("timeout", 180), **kw)




from s2split.model.pgtable.visitor_api import VisitorRuleError  # noqa: E402


# -- 1. every exception class survives pickling (the process boundary) ----------------------

EXAMPLES = {
    S2Error: S2Error("a sentence"),
    KernelError: KernelError(EINVAL, "eager-split chunk size 3M is not supported"),
    KvmError: KvmError("KVM_CREATE_VM failed (ENOMEM)", errno.ENOMEM),
    WorkerError: WorkerError("a worker process died (signal SIGKILL)"),
    Terminated: Terminated("SIGTERM"),
    VisitorRuleError: VisitorRuleError("make at IPA 0x40000000, level 1 over a live entry"),
}


def _exception_classes() -> set[type]:
    found = set()
    for m in pkgutil.walk_packages(s2split.__path__, "s2split."):
        if m.name.endswith("__main__"):
            continue
        for obj in vars(importlib.import_module(m.name)).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and \
                    obj.__module__.startswith("s2split"):
                found.add(obj)
    return found


def test_every_exception_class_has_a_pickle_example():
    assert _exception_classes() == set(EXAMPLES)


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.__name__)
def test_exceptions_survive_a_pickle_round_trip(cls):
    e = EXAMPLES[cls]
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls
    assert str(back) == str(e)
    assert getattr(back, "errno", None) == getattr(e, "errno", None)


# -- 2. the worker pool ---------------------------------------------------------------------

def _kernel_refusal(n):
    raise KernelError(EINVAL, f"group {n} refused")


class _Unpicklable(Exception):
    def __init__(self, a, b):  # two arguments: unpickling with one fails
        super().__init__(f"{a} and {b}")


def _raise_unpicklable(n):
    raise _Unpicklable("this", "that")


def _die(n):
    os.kill(os.getpid(), signal.SIGKILL)


def _square(n):
    return n * n


def test_pool_results_and_errors_cross_the_boundary():
    assert sorted(Pool(2).run(_square, [(i, (i,)) for i in range(7)])) == \
        [(i, i * i) for i in range(7)]
    with pytest.raises(KernelError) as e:
        list(Pool(2).run(_kernel_refusal, [(i, (i,)) for i in range(4)]))
    assert e.value.errno == EINVAL and "refused (EINVAL)" in str(e.value)
    with pytest.raises(WorkerError, match="_Unpicklable in a worker process: this and that"):
        list(Pool(2).run(_raise_unpicklable, [(i, (i,)) for i in range(3)]))


def test_a_dead_worker_is_an_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="died \\(signal SIGKILL\\) while running"):
        list(Pool(2).run(_die, [(i, (i,)) for i in range(3)]))
    assert time.monotonic() - t0 < 60  # a hang would be forever; this is only a guard


@pytest.mark.parametrize("workers", [None, "3"], ids=["default-workers", "3-workers"])
def test_kernel_rule_error_from_a_worker_is_one_line(tmp_path, workers):
    """The issue's ``reproduce --size 1G --chunk-size 3M``, smaller: the chunk
    size is refused by the modelled KVM inside a worker (reference engine, so
    no compilation), and the parent prints that one line."""
    extra = ["--workers", workers] if workers else []
    r = s2split_run("reproduce", "--size", "4M", "--chunk-size", "3M", "--engine",
                    "reference", "--no-progress", "--db", str(tmp_path / "r.sqlite"), *extra)
    assert r.returncode == 2, r.stderr
    one_line(r.stderr, "s2split reproduce: error: eager-split chunk size 3M",
             "(EINVAL)")


def _group(pgid: int) -> list[int]:
    """The processes of a process group but its leader: the workers (and a
    forkserver, where Python starts workers through one)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != pgid:
            try:
                stat_ = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat_[stat_.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is dead)."""
    try:
        stat_ = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_[stat_.rindex(")") + 2] != "Z"


def _start_parallel_run(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A long parallel reproduce (many minutes of work), once its workers run."""
    proc = subprocess.Popen([sys.executable, "-m", "s2split", "reproduce", "--size", "1G",
                             "--engine", "reference", "--workers", "2", "--no-progress",
                             "--db", str(tmp_path / "r.sqlite")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        workers = _group(proc.pid)
    assert proc.poll() is None and len(workers) >= 2
    time.sleep(0.3)  # into their groups
    return proc, workers


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_workers_die_with_their_parent(tmp_path, sig):
    proc, workers = _start_parallel_run(tmp_path)
    try:
        os.kill(proc.pid, sig)  # the main process alone, not the group
        proc.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_ctrl_c_to_the_main_process_alone_stops_the_workers(tmp_path, hears_ctrl_c):
    """As Ctrl-C to the group does (test_reproduce.py): exit 130, one line, no
    worker left."""
    proc, workers = _start_parallel_run(tmp_path)
    try:
        os.kill(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 130, err
    assert err == "s2split: interrupted\n"
    assert not [w for w in workers if _alive(w)]


STORE_FAILS = textwrap.dedent("""
    import sys
    from s2split.plumbing.errors import S2Error
    from s2split.storage.store import Store
    calls = []
    real = Store.add_cell
    def add_cell(self, *a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise S2Error(f"{self.path}: database error: disk I/O error")
        return real(self, *a, **kw)
    Store.add_cell = add_cell
    from s2split.cli.parser import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_store_failure_does_not_hang(tmp_path):
    """The store fails on the second cell while both workers are busy (large
    results on their way): one line, exit 2, within the timeout."""
    for attempt in range(2):
        db = tmp_path / f"r{attempt}.sqlite"
        r = subprocess.run([sys.executable, "-c", STORE_FAILS, "reproduce", "--size", "16M",
                            "--engine", "reference", "--workers", "2", "--no-progress",
                            "--db", str(db)], capture_output=True, text=True, env=ENV,
                           timeout=240)
        assert r.returncode == 2, r.stderr
        one_line(r.stderr, "database error: disk I/O error")


# -- 3. output targets -------------------------------------------------------------------------

def test_new_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "new.json", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640  # 0666 & ~0027


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664])
def test_overwriting_keeps_the_files_mode(tmp_path, mode):
    f = tmp_path / "out.json"
    f.write_text("old")
    f.chmod(mode)
    write_atomic(f, "new")
    assert f.read_text() == "new"
    assert stat.S_IMODE(f.stat().st_mode) == mode


def test_a_symlink_is_followed(tmp_path, capsys):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "later.json")
    write_atomic(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "later.json").read_text() == "made"


def _read_fifo(path: Path, into: list) -> threading.Thread:
    def reader():
        with open(path, "rb") as f:
            into.append(f.read())
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t


def test_a_fifo_is_written_in_place_not_replaced(tmp_path, capsys):
    """``-o FIFO`` and ``-o`` a symlink to a FIFO (a /dev/null-like target made
    here, never a real device): the data goes through, the FIFO stays."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    for target in (fifo, link):
        got: list[bytes] = []
        t = _read_fifo(fifo, got)
        write_atomic(target, "through the pipe\n")
        t.join(timeout=30)
        assert got == [b"through the pipe\n"]
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to-pipe"]


def test_export_to_a_fifo(tmp_path, capsys):
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    Store.open(db).close()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    t = _read_fifo(fifo, got)
    code, _, err = cli(["export", "--db", str(db), "-o", str(fifo)], capsys)
    t.join(timeout=30)
    assert code == 0, err
    assert json.loads(got[0])["cells"] == []
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_missing_directory_is_an_error_and_nothing_is_created(tmp_path, capsys):
    with pytest.raises(S2Error, match="does not exist"):
        write_atomic(tmp_path / "no" / "such" / "x.json", "x")
    assert list(tmp_path.iterdir()) == []
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    Store.open(db).close()
    code, _, err = cli(["export", "--db", str(db), "-o", str(tmp_path / "nodir" / "x.json")],
                       capsys)
    assert code == 2
    one_line(err, "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    f = tmp_path / "out.json"
    f.write_text("old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(S2Error, match="No space left on device"):
        write_atomic(f, "new")
    monkeypatch.undo()
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_temporary_names_are_unique(tmp_path, monkeypatch):
    """The old fixed name (``.NAME.tmp``, which hw run --json used) is taken
    here by a directory: a writer that needed it would fail."""
    from s2split.hw.cli import _write_json
    (tmp_path / ".run.json.tmp").mkdir()
    _write_json(str(tmp_path / "run.json"), {"a": 1})
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(a), real(a, b)))
    for _ in range(2):
        write_atomic(tmp_path / "run.json", "x")
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)


# -- 4. standard output that cannot be written ------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv", [["geometry"], ["perf-test", "-b", "4M", "--json"],
                                  ["variants"]])
def test_stdout_on_a_full_device(argv):
    with open("/dev/full", "w") as full:  # only as the child's stdout
        r = subprocess.run([sys.executable, "-m", "s2split", *argv], stdout=full,
                           stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    assert r.returncode == 1
    one_line(r.stderr, "cannot write standard output (No space left on device)")


def test_stdout_to_a_closed_pipe():
    p = subprocess.Popen([sys.executable, "-m", "s2split", "variants"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 1
    one_line(err, "cannot write standard output (Broken pipe)")


# -- 5. the smaller items -----------------------------------------------------------------------

def test_reproduce_size_0_creates_nothing_and_names_size(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    code, _, err = cli(["reproduce", "--size", "0", "--db", str(db)], capsys)
    assert code == 2
    line = one_line(err, "--size")
    assert "-b" not in line
    code, _, err = cli(["reproduce", "--size", "5K", "--db", str(db)], capsys)
    assert code == 2
    one_line(err, "--size 0x1400")
    assert not db.exists()


def test_hw_compare_does_not_create_a_database(tmp_path, capsys):
    db = tmp_path / "none.sqlite"
    code, _, err = cli(["hw", "compare", "A", "B", "--db", str(db)], capsys)
    assert code == 2
    one_line(err, "no such results database")
    assert not db.exists()


def test_show_unknown_variant_is_an_error(tmp_path, capsys):
    from s2split.storage.store import Store
    db = tmp_path / "r.sqlite"
    Store.open(db).close()
    code, out, err = cli(["show", "--db", str(db), "--variant", "nonexistent"], capsys)
    assert code == 2 and out == ""
    one_line(err, "--variant nonexistent", "stored: none")


@pytest.mark.parametrize("extra,needle", [
    (["--granule", "16K"], "only with 4K pages"),
    (["--granule", "64K,16K"], "only with 4K pages"),
    (["--backing", "thp"], "no hugetlb"),
])
def test_hugetlb_1g_needs_4k_and_hugetlb(tmp_path, capsys, extra, needle):
    db = tmp_path / "r.sqlite"
    code, _, err = cli(["reproduce", "--hugetlb-1g", *extra, "--db", str(db)], capsys)
    assert code == 2
    one_line(err, "--hugetlb-1g", needle)
    assert not db.exists()


def test_calibrate_empty_fit_is_refused(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("options,phase,seconds\n-m 6 -b 4M,populate,0.001\n")
    for fit in ("", " , "):
        code, _, err = cli(["calibrate", str(m), "--fit", fit], capsys)
        assert code == 2
        one_line(err, "--fit", "no cost key to fit")
