"""A compile cache that follows every source the fast engine compiles in.

numba caches each compiled function keyed on its own source file only. The
fast engine's functions call functions of other modules and compile in
constants of many more (counter indices, descriptor bits, walk flags, barrier
counts, the rules), so a cache built before one of those files changed would
go on giving the old numbers. :data:`SOURCES_HASH` hashes the source of every
``s2split`` module the engine imports, directly or not; it is compiled into
:func:`compiled_sources_hash`, and on import a cache built from other
sources is dropped whole (every function then compiles afresh on first use).
It is also part of every function's index stamp (:func:`stamp_with_sources`),
which guards single entries between processes of different sources.

It also decides how the engine compiles: calls between compiled functions
are typed without constant specialisations (:func:`compile_without_literals`),
and :func:`ensure_compiled` compiles the functions Python calls before their
first call -- in two processes where there are two CPUs, with one line on a
terminal when that takes a while (``bench/compile_table.py`` shows where the
time goes).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import FunctionType, MethodType, ModuleType

from numba import njit, types
from numba.core.dispatcher import Dispatcher

from . import (dirty_log, entries, guest, lines, memory, mmu, mmu_hooks, pte, rules, stage2,
               state, tlb, visitor_api, visitors, walker)

#: The modules holding compiled functions.
KERNEL_MODULES = (state, rules, pte, lines, memory, tlb, entries, visitor_api, visitors, walker,
                  stage2, mmu, mmu_hooks, dirty_log, guest)


def _imports(path: Path, package: str) -> set[str]:
    """The ``s2split`` modules a source file imports at its top level (where
    the constants compiled in come from; imports for type checking or inside
    functions bring in nothing that is compiled)."""
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else (node.module or "")
            if base.split(".")[0] == "s2split":
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "s2split")
    return found


_ROOT = Path(__file__).resolve().parent.parent


def _source(name: str) -> Path | None:
    """The source file of module ``s2split.X.Y``, or None if there is none."""
    base = _ROOT.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def compiled_in_sources() -> list[Path]:
    """Every source file of ``s2split`` reachable by imports from the kernel modules."""
    todo = [m.__name__ for m in KERNEL_MODULES]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source(name)
        if path is None:
            continue  # a name imported from a module, not a module
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(_imports(path, package))
    return sorted(set(seen.values()))


def _sources_hash() -> int:
    h = hashlib.sha256()
    for path in compiled_in_sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return int.from_bytes(h.digest()[:7], "little")


SOURCES_HASH = _sources_hash()


@njit(cache=True)
def compiled_sources_hash():
    """The :data:`SOURCES_HASH` this function's cached copy was compiled with."""
    return SOURCES_HASH


def dispatchers() -> list[Dispatcher]:
    """Every compiled function of the fast engine."""
    found = {id(obj): obj for mod in KERNEL_MODULES for obj in vars(mod).values()
             if isinstance(obj, Dispatcher)}
    return list(found.values())


#: The file beside the cache naming the :data:`SOURCES_HASH` it was built from.
_MARKER = "s2split-sources-hash"


def _marker_path() -> Path | None:
    try:
        return Path(compiled_sources_hash._cache.cache_path) / _MARKER
    except Exception:  # noqa: BLE001 - no cache locator: nothing is cached either
        return None


def _anything_cached() -> bool:
    for d in (compiled_sources_hash, *dispatchers()):
        try:
            if Path(d._cache._cache_file._index_path).exists():
                return True
        except Exception:  # noqa: BLE001 - another numba: assume there is
            return True
    return False


def drop_stale_cache() -> bool:
    """Empty the compile cache of every function if it was built from other
    sources (they then compile afresh on first use); True if it did.

    Two records must agree with :data:`SOURCES_HASH`: the marker file beside
    the cache, and :func:`compiled_sources_hash`'s cached copy. The function
    alone is not enough: an edit of this very module makes numba recompile
    it, and the fresh copy then vouches for every other module's old cache.
    No marker means a cache from before markers, or none at all."""
    marker = _marker_path()
    try:
        recorded = marker.read_text().strip() if marker is not None else None
    except (OSError, UnicodeDecodeError):
        recorded = None
    current = str(SOURCES_HASH)
    if recorded == current and compiled_sources_hash() == SOURCES_HASH:
        return False
    stale = recorded is not None or _anything_cached()
    if stale:  # (flushing writes an empty index for every function: not on a fresh cache)
        try:
            for d in dispatchers():
                if d._cache is not None:
                    d._cache.flush()
        except OSError as e:  # a cache that cannot be written: use none
            _say_once("save", f"s2split: the compile cache cannot be written ({_why(e)}); "
                      "running uncached")
            run_uncached()
        compiled_sources_hash.recompile()
    if marker is not None:
        try:  # whole or not at all: another process may be reading it
            marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = marker.with_name(f"{_MARKER}.{os.getpid()}.tmp")
            tmp.write_text(current + "\n")
            os.replace(tmp, marker)
        except OSError:
            pass  # numba cannot write this cache either: nothing will be trusted
    return stale


# -- a cache that heals -----------------------------------------------------------------

_said: set[str] = set()


def _say_once(kind: str, line: str) -> None:
    """One line on stderr, once per process and kind: the run goes on."""
    if kind in _said:
        return
    _said.add(kind)
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _why(e: BaseException) -> str:
    text = (getattr(e, "strerror", None) or str(e)).splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and text[0] else type(e).__name__


def drop_cache() -> None:
    """Empty the cache of every function (an empty index for each; the old
    data files are overwritten as functions compile again)."""
    for d in (compiled_sources_hash, *dispatchers()):
        try:
            if d._cache is not None:
                d._cache.flush()
        except Exception:  # noqa: BLE001 - a cache that cannot even be emptied
            pass


def run_uncached() -> None:
    """No function loads from or saves to the cache any more in this process."""
    from numba.core.caching import NullCache
    for d in (compiled_sources_hash, *dispatchers()):
        d._cache = NullCache()


def _healing_load(cache, load: Callable) -> Callable:
    def load_overload(sig, target_context):
        try:
            return load(sig, target_context)
        except Exception as e:  # noqa: BLE001 - any damage: unpickling, truncation, I/O
            _say_once("load", f"s2split: the compile cache could not be loaded ({_why(e)}); "
                      "dropped it, compiling afresh")
            drop_cache()
            return None  # numba compiles, then saves a good copy
    return load_overload


def _healing_save(cache, save: Callable) -> Callable:
    def save_overload(sig, data):
        try:
            save(sig, data)
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only cache, ...
            _say_once("save", f"s2split: the compile cache cannot be written ({_why(e)}); "
                      "running uncached")
            run_uncached()
    return save_overload


def heal_on_failure(d: Dispatcher) -> None:
    """Make a failure to load D's cached code drop the cache and compile (one
    line on stderr), and a failure to save it run uncached: the cache can
    slow a run down, never stop it."""
    cache = d._cache
    if cache is None or getattr(cache, "_s2split_healing", False) or \
            not hasattr(cache, "load_overload"):
        return
    cache.load_overload = _healing_load(cache, cache.load_overload)
    cache.save_overload = _healing_save(cache, cache.save_overload)
    cache._s2split_healing = True


def stamp_with_sources(d: Dispatcher) -> None:
    """Make D's cache index valid only for this process's :data:`SOURCES_HASH`.

    numba keeps, in each function's index, the stamp of that function's own
    file (its time and size) and trusts the index while the stamp matches.
    The marker beside the cache guards whole caches, not single writes: a
    process that imported older sources and compiles after a newer process
    has rebuilt the cache writes its old code into an index the marker now
    vouches for. With the sources hash in the stamp, such an index is simply
    not fresh for any process of other sources (it compiles and saves anew)."""
    cache_file = getattr(d._cache, "_cache_file", None)
    stamp = getattr(cache_file, "_source_stamp", None)
    if stamp is not None:  # (once per dispatcher: only the loop below calls this)
        cache_file._source_stamp = (stamp, SOURCES_HASH)


for _d in (compiled_sources_hash, *dispatchers()):
    heal_on_failure(_d)
    stamp_with_sources(_d)


#: Whether importing found (and dropped) a stale compile cache.
STALE_CACHE_DROPPED = drop_stale_cache()


def _call_template_without_literals(self: Dispatcher, args: tuple, kws: dict) -> tuple:
    """Type a call from compiled code as if no argument were a constant.

    numba compiles a callee once more for every constant an argument is
    given as at a call site (``call_visitor(..., TABLE_PRE)`` is typed with
    ``Literal[int](2)``), and each such specialisation compiles and optimizes
    the callee's whole call tree again: the visitors three times over, the
    walker three times. Constants only spare a branch or two, which LLVM
    folds when it inlines anyway (the runtime benchmarks stay put), while
    the specialisations cost a quarter of the cold compile. Nothing computed
    changes: the same source runs with the same values.
    """
    return Dispatcher.get_call_template(self, tuple(types.unliteral(a) for a in args),
                                        {k: types.unliteral(v) for k, v in kws.items()})


def compile_without_literals() -> None:
    """Make every compiled function of the engine take the non-constant
    signature when compiled code calls it (see :func:`_call_template_without_literals`)."""
    for d in dispatchers():
        d.get_call_template = MethodType(_call_template_without_literals, d)


compile_without_literals()


# -- compiling before the first call, in parallel, not silently ---------------------

_A2 = types.Array(types.int64, 2, "C")
_A1 = types.Array(types.int64, 1, "C")
_I = types.int64

#: The functions Python calls, with the types FastVM calls them with (int64
#: arrays, Python ints, a bool): compiling these compiles everything else.
ENTRY_POINTS = (
    (guest.memstress_pass, (_A2, _A1, _A1, _A1, _I, types.boolean)),
    (stage2.stage2_init, (_A2, _A1)),
    (state.kvm_count, (_A1, _I, _I)),
    (memory.cache_free_all, (_A2, _A1, _I)),
    (dirty_log.kvm_get_dirty_log_protect, (_A2, _A1, _A1, _I, _A1)),
    (dirty_log.kvm_clear_dirty_log_protect, (_A2, _A1, _A1, _I, _I, _I, _A1)),
    (stage2.stage2_unmap, (_A2, _A1, _I, _I)),
    (mmu.kvm_stage2_destroy, (_A2, _A1)),
    (mmu.kvm_mmu_wp_memory_region, (_A2, _A1, _I)),
    (mmu_hooks.split_memory_region, (_A2, _A1, _A1, _I)),
    (mmu_hooks.enable_log_dirty, (_A2, _A1, _A1, _I)),
)

#: Seconds a full cold compile took on the 2-core machine of BENCHMARKS.md
#: (the estimate until this machine has measured its own).
DEFAULT_COMPILE_S = 20
#: A compile expected to take at least this long is announced.
ANNOUNCE_S = 2.0
_RECORD = "s2split-compile-seconds"


def _cached(d: Dispatcher, sig: tuple) -> bool:
    """Whether ``d`` has ``sig`` compiled in this process or in the cache
    (the index alone is read: loading waits for the first call)."""
    if tuple(sig) in d.overloads:
        return True
    try:
        cache = d._cache
        key = cache._index_key(sig, d.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - another numba: treat as not cached
        return False


def missing() -> list[tuple[Dispatcher, tuple]]:
    """The entry points that would compile on their first call."""
    return [(d, sig) for d, sig in ENTRY_POINTS if not _cached(d, sig)]


def _record_path() -> Path | None:
    try:
        return Path(compiled_sources_hash._cache.cache_path) / _RECORD
    except Exception:  # noqa: BLE001
        return None


def estimate_s(todo: list) -> float:
    """Seconds compiling ``todo`` should take: the last full compile measured
    here (recorded next to the cache), else :data:`DEFAULT_COMPILE_S`, times
    the share of the work left -- the guest pass is half of it (see
    :func:`split_work`), the other entry points share the other half."""
    full = float(DEFAULT_COMPILE_S)
    path = _record_path()
    try:
        if path is not None:
            full = float(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    heavy = any(d is guest.memstress_pass for d, _ in todo)
    rest = len(todo) - heavy
    return full * (0.5 * heavy + 0.5 * rest / (len(ENTRY_POINTS) - 1))


def _named(fn: Callable, seen: set[int]) -> set[Dispatcher]:
    """The compiled functions the source of ``fn`` names, directly or as a
    module's attribute, and through the visitor API the ones its fast
    implementations and the helpers it calls name
    (:data:`~s2split.engine.visitor_api.FAST_IMPLS`, ``HELPERS``)."""
    if id(fn) in seen:
        return set()
    seen.add(id(fn))

    def names(code):
        yield from code.co_names
        for c in code.co_consts:
            if hasattr(c, "co_names"):
                yield from names(c)
    g = fn.__globals__
    used = set(names(fn.__code__))
    found: set[Dispatcher] = set()
    for n in used:
        value = g.get(n)
        values = [value]
        if isinstance(value, ModuleType):  # ``R.rule(...)``: any attribute named here
            values = [getattr(value, m, None) for m in used]
        for v in values:
            if isinstance(v, Dispatcher):
                found.add(v)
            elif isinstance(v, FunctionType) and v in visitor_api.FAST_IMPLS:
                found |= _named(visitor_api.FAST_IMPLS[v], seen)
            elif isinstance(v, FunctionType) and v in visitor_api.HELPERS:
                found |= _named(v, seen)  # compiled into its caller
    return found


def _callees(d: Dispatcher) -> set[Dispatcher]:
    """The compiled functions ``d`` calls directly (and maybe a few more,
    which only makes :func:`split_work` more careful)."""
    return _named(d.py_func, set())


def reachable(d: Dispatcher) -> set[Dispatcher]:
    """``d`` and every compiled function it calls, directly or not."""
    seen: set[Dispatcher] = set()
    todo = [d]
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(_callees(x))
    return seen


def split_work(todo: list) -> tuple[list, list]:
    """Two disjoint shares of ``todo`` for two processes: the guest pass (the
    longest chain of calls, half the compile) and whatever it calls, here;
    the rest in the other process. The other process saves only its own
    entry points to the cache, and none of them is called by this share, so
    the two never write the same function's cache files (numba's index and
    data files of one function are not safe to write from two processes)."""
    heavy = [e for e in todo if e[0] is guest.memstress_pass]
    if not heavy:
        return todo, []
    near = reachable(guest.memstress_pass)
    here = [e for e in todo if e[0] in near]
    return here, [e for e in todo if e[0] not in near]


def _compile(entries: list) -> None:
    for d, sig in entries:
        d.compile(sig)


def _compile_share(indices: list[int]) -> None:
    """The other process's share: compile, save only these entry points."""
    from numba.core.caching import NullCache

    from ..plumbing.workers import die_with_parent
    die_with_parent(os.getppid())
    mine = [ENTRY_POINTS[i] for i in indices]
    keep = {id(d) for d, _ in mine}
    for d in dispatchers():
        if id(d) not in keep:
            d._cache = NullCache()
    _compile(mine)


def _parallel_ok() -> bool:
    import multiprocessing as mp
    return (os.cpu_count() or 1) >= 2 and not mp.current_process().daemon


def ensure_compiled(parallel: bool = True) -> float:
    """Compile the entry points that are in neither this process nor the
    cache, announcing a compile that takes a while on a terminal; returns the
    seconds spent (0.0 when everything was there).

    With ``parallel`` (and two CPUs, outside daemon processes) a second
    process compiles a disjoint share into the cache at the same time; if it
    fails, the first call of its functions compiles them here, as it would
    have anyway.
    """
    import time
    todo = missing()
    if not todo:
        return 0.0
    estimate = estimate_s(todo)
    if estimate >= ANNOUNCE_S:
        from ..plumbing.console import note
        note(f"s2split: compiling the fast engine once, about {estimate:.0f} s "
             "(cached afterwards)")
    t0 = time.perf_counter()
    here, there = split_work(todo) if parallel and _parallel_ok() else (todo, [])
    helper = None
    if there:
        import multiprocessing as mp
        index = {id(d): i for i, (d, _) in enumerate(ENTRY_POINTS)}
        try:
            helper = mp.get_context().Process(
                target=_compile_share, args=([index[id(d)] for d, _ in there],), daemon=True)
            helper.start()
        except OSError:
            helper = None
            here = todo
    try:
        _compile(here)
        if helper is not None:
            helper.join()
    finally:
        if helper is not None and helper.is_alive():
            helper.kill()
            helper.join()
    seconds = time.perf_counter() - t0
    if len(todo) == len(ENTRY_POINTS):
        path = _record_path()
        try:
            if path is not None:
                path.write_text(f"{seconds:.1f}\n")
        except OSError:
            pass
    return seconds
