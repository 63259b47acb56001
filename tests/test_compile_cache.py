"""The fast engine's compile cache follows the reference modules whose
constants it compiles in (engine/kernels.py, drop_stale_cache)."""

import os
import subprocess
import sys

STEP = """
import sys
from s2split.engine import kernels as K
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
