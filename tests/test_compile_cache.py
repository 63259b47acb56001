"""The fast engine's compile cache follows every source it compiles in
(engine/compile_cache.py): numba keys a cached function on its own file only,
so a change to a callee's module or to a constant's module must drop it."""

import os
import subprocess
import sys
from pathlib import Path

from s2split.engine import compile_cache as CC

STEP = """
import os, pathlib, sys
if sys.argv[1] == "forget-hash-function":
    # What an edit of compile_cache.py does: numba recompiles the functions
    # of that file afresh, compiled_sources_hash with the current hash.
    for p in pathlib.Path(os.environ["NUMBA_CACHE_DIR"]).rglob("*compiled_sources_hash*"):
        p.unlink()
from s2split.engine import compile_cache as K
if sys.argv[1] == "pretend-other-sources":
    K.SOURCES_HASH += 1  # what a cache built before a module changed holds
    assert K.drop_stale_cache()
print(K.STALE_CACHE_DROPPED, K.compiled_sources_hash() == K.SOURCES_HASH)
"""


def step(cache_dir, arg=""):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", STEP, arg], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_a_cache_built_from_other_sources_is_dropped(tmp_path):
    assert step(tmp_path) == ["False", "True"]  # a fresh cache: current
    # A cache now holding another hash, as if a reference module had changed
    # since it was built: the next import drops it, the one after finds it
    # current again.
    step(tmp_path, "pretend-other-sources")
    assert step(tmp_path) == ["True", "True"]
    assert step(tmp_path) == ["False", "True"]


def test_a_fresh_copy_of_the_hash_function_does_not_vouch_for_a_stale_cache(tmp_path):
    """The cache of compile_cache.py's own function goes whenever that file
    is edited, and its fresh copy returns the current hash: the marker file
    beside the cache still says the other functions were built from other
    sources, so they are dropped (before the marker, they were kept and a
    merged checkout ran old walker code: "a guest access keeps faulting")."""
    assert step(tmp_path) == ["False", "True"]
    step(tmp_path, "pretend-other-sources")
    assert step(tmp_path, "forget-hash-function") == ["True", "True"]
    assert step(tmp_path) == ["False", "True"]


def test_a_cache_from_before_the_marker_is_dropped(tmp_path):
    assert step(tmp_path) == ["False", "True"]
    next(tmp_path.rglob(CC._MARKER)).unlink()
    assert step(tmp_path) == ["True", "True"]
    assert step(tmp_path) == ["False", "True"]


def test_the_hash_covers_every_module_the_kernels_read():
    """Every module a compiled function's globals come from -- the engine's own
    modules and the reference modules whose constants and rules they compile
    in -- is hashed."""
    hashed = {p.resolve() for p in CC.compiled_in_sources()}
    needed = set()
    for d in CC.dispatchers():
        fn = d.py_func
        needed.add(Path(fn.__code__.co_filename).resolve())
        for value in fn.__globals__.values():
            mod = getattr(value, "__module__", None) if not isinstance(value, type(sys)) \
                else value.__name__
            if isinstance(mod, str) and mod.startswith("s2split."):
                needed.add(Path(sys.modules[mod].__file__).resolve())
    assert needed <= hashed, sorted(str(p) for p in needed - hashed)
    # The shared rules and the counter layout are among them, explicitly.
    names = {p.relative_to(CC._ROOT).as_posix() for p in hashed}
    assert {"arm64/rules.py", "counting/counters.py", "arm64/bits.py", "model/pgtable/tlb.py",
            "model/pgtable/walker.py", "engine/state.py", "engine/rules.py"} <= names


def test_the_hash_changes_with_any_hashed_source(tmp_path, monkeypatch):
    """Edit a callee's module in a copy of the sources: the hash changes."""
    before = CC._sources_hash()
    sources = CC.compiled_in_sources()
    target = next(p for p in sources if p.name == "rules.py" and p.parent.name == "arm64")
    copy = tmp_path / "rules.py"
    copy.write_bytes(target.read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(CC, "compiled_in_sources",
                        lambda: [copy if p == target else p for p in sources])
    assert CC._sources_hash() != before



RACE = """
import sys
from s2split.engine import compile_cache as K
from s2split.engine import rules as R
if sys.argv[1] == "wait":
    print("imported", flush=True)
    sys.stdin.readline()
R.hit_class(5, 9, 2, 4, 8)  # compiled (and saved) or loaded from the cache
print(K.SOURCES_HASH, sum(R.hit_class.stats.cache_hits.values()), flush=True)
"""


def test_a_process_of_older_sources_cannot_vouch_for_its_code_in_a_newer_cache(tmp_path):
    """The race seen once while merging: process A imports the sources, they
    change, process B rebuilds the cache for the new ones (and marks it so),
    then A compiles a function whose own file did not change. A must not
    load B's code (built from sources it did not import), and the code A
    saves, built from the old sources, into the index B marked must not be
    loaded by a process of the new sources (it compiles afresh); the one
    after loads that good copy. numba alone keys both on the function's own
    file, and failed at the first step (A loaded B's code)."""
    import shutil
    src = Path(CC.__file__).resolve().parents[1]
    pkg = tmp_path / "pkg"
    shutil.copytree(src, pkg / "s2split",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(pkg))

    def run(*args, **kw):
        return subprocess.Popen([sys.executable, "-c", RACE, *args], env=env, text=True,
                                stdout=subprocess.PIPE, **kw)

    old = run("wait", stdin=subprocess.PIPE)
    try:
        assert old.stdout.readline().strip() == "imported"
        counters = pkg / "s2split" / "counting" / "counters.py"  # compiled in: hashed
        counters.write_text(counters.read_text() + "\n# a newer source\n")
        new_hash, hits = run("go").communicate(timeout=300)[0].split()
        assert hits == "0"
        old_hash, hits = old.communicate("go\n", timeout=300)[0].split()
        assert old_hash != new_hash and hits == "0"  # compiled, and saved over B's
    finally:
        old.kill()
        old.wait()
    h, hits = run("go").communicate(timeout=300)[0].split()
    assert (h, hits) == (new_hash, "0")  # not loaded from A's save: compiled afresh
    h, hits = run("go").communicate(timeout=300)[0].split()
    assert (h, hits) == (new_hash, "1")  # and cached for the next process


# -- compiling before the first call ------------------------------------------------

RUN = """
import json, sys
import numpy as np
from numba.core import event as ev
from s2split.engine import compile_cache as K, get_engine
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable.variants import get
from s2split.workload import PerfTestParams, run_variants

if sys.argv[1] == "pretend-other-sources":
    K.SOURCES_HASH += 1
    K.drop_stale_cache()
    print(json.dumps({"missing": len(K.missing()), "entries": len(K.ENTRY_POINTS)}))
    sys.exit()
get_engine("fast")  # compiles what is missing, as every command does
late = []

class Late(ev.Listener):
    def on_start(self, event):
        late.append(event.data["dispatcher"].py_func.__name__)

    def on_end(self, event):
        pass

ev.register("numba:compile", Late())
same = True
variants = [get("vanilla"), get("skip-levels")]
for backing in ("anonymous", "anonymous_thp"):
    for manual in (True, False):
        p = PerfTestParams(vcpu_memory_bytes=4 << 20, backing=backing, chunk_size=2 << 20,
                           mode=parse_mode(6), manual_protect=manual)
        fast = run_variants(p, variants, "fast")
        ref = run_variants(p, variants, "reference")
        for f, r in zip(fast, ref):
            for (nf, cf), (nr, cr) in zip(f.phases, r.phases):
                same &= nf == nr and np.array_equal(cf.array, cr.array)
literal = [d.py_func.__name__ for d in K.dispatchers() for s in d.signatures
           if any("Literal" in str(a) for a in s)]
print(json.dumps({"late": late, "literal": literal, "same": bool(same)}))
"""


def run_on_terminal(cache_dir, arg="run"):
    """RUN in a child whose stderr is a terminal (a pty): (stdout, stderr)."""
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    proc = subprocess.Popen([sys.executable, "-c", RUN, arg], env=env,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    out, _ = proc.communicate()
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child's end is closed and drained
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert proc.returncode == 0, err.decode(errors="replace")
    import json
    return json.loads(out.strip().splitlines()[-1]), err.decode(errors="replace")


COMPILING = "compiling the fast engine once"


def test_a_cold_compile_says_so_and_compiles_everything_first_with_the_right_counts(tmp_path):
    """A cold start on a terminal prints one line, then compiles (in two
    processes) every function the runs need -- nothing compiles later, no
    constant-specialised copies -- and the fast engine's counts equal the
    reference engine's; warm, the same runs print nothing."""
    cold, err = run_on_terminal(tmp_path)
    assert err.count(COMPILING) == 1, err
    assert cold == {"late": [], "literal": [], "same": True}
    warm, err = run_on_terminal(tmp_path)
    assert COMPILING not in err, err
    assert warm == {"late": [], "literal": [], "same": True}
    # The helper process saved only its own entry points: no function's
    # cache files were written by both processes.
    allowed = CC.reachable(CC.guest.memstress_pass) | {d for d, _ in CC.ENTRY_POINTS} | \
        {CC.compiled_sources_hash}
    names = {f"{d.py_func.__module__.rpartition('.')[2]}.{d.py_func.__qualname__}-"
             f"{d.py_func.__code__.co_firstlineno}" for d in allowed}
    written = {p.name.split(".py")[0] for p in tmp_path.rglob("*.nbi")}
    assert written and written <= names, sorted(written - names)
    # The measured time is recorded for the next estimate.
    assert float(next(tmp_path.rglob(CC._RECORD)).read_text()) > 0
    # A cache built from other sources is dropped whole: nothing of it loads.
    dropped, _ = run_on_terminal(tmp_path, "pretend-other-sources")
    assert dropped["missing"] == dropped["entries"]


def test_the_note_goes_to_a_terminal_only(capsys, monkeypatch):
    from s2split.plumbing import console

    class Tty:
        def __init__(self, tty):
            self.tty, self.text = tty, ""

        def isatty(self):
            return self.tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass
    for tty in (True, False):
        fake = Tty(tty)
        monkeypatch.setattr(sys, "stderr", fake)
        console.note("compiling")
        assert fake.text == ("compiling\n" if tty else "")


def test_the_two_shares_are_disjoint_and_cover_the_entry_points():
    here, there = CC.split_work(list(CC.ENTRY_POINTS))
    assert here and there
    assert {id(d) for d, _ in here} | {id(d) for d, _ in there} == \
        {id(d) for d, _ in CC.ENTRY_POINTS}
    near = CC.reachable(CC.guest.memstress_pass)
    assert not any(d in near for d, _ in there)


def test_the_estimate_is_the_recorded_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(CC, "_record_path", lambda: tmp_path / "rec")
    todo = list(CC.ENTRY_POINTS)
    assert CC.estimate_s(todo) == CC.DEFAULT_COMPILE_S
    (tmp_path / "rec").write_text("12.5\n")
    assert CC.estimate_s(todo) == 12.5
    # The guest pass is half the work, the other entry points the other half.
    assert CC.estimate_s(todo[:1]) == 6.25
    assert CC.estimate_s(todo[1:2]) == 6.25 / (len(todo) - 1)
