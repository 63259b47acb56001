"""The fast engine's compile cache follows every source it compiles in
(engine/compile_cache.py): numba keys a cached function on its own file only,
so a change to a callee's module or to a constant's module must drop it."""

import os
import subprocess
import sys
from pathlib import Path

from s2split.engine import compile_cache as CC

STEP = """
import sys
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
    assert {"rules.py", "counters.py", "bits.py", "pgtable/tlb.py", "pgtable/walker.py",
            "engine/state.py", "engine/rules.py"} <= names


def test_the_hash_changes_with_any_hashed_source(tmp_path, monkeypatch):
    """Edit a callee's module in a copy of the sources: the hash changes."""
    before = CC._sources_hash()
    sources = CC.compiled_in_sources()
    target = next(p for p in sources if p.name == "rules.py" and p.parent.name == "s2split")
    copy = tmp_path / "rules.py"
    copy.write_bytes(target.read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(CC, "compiled_in_sources",
                        lambda: [copy if p == target else p for p in sources])
    assert CC._sources_hash() != before
