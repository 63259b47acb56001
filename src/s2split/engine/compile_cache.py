"""A compile cache that follows every source the fast engine compiles in.

numba caches each compiled function keyed on its own source file only. The
fast engine's functions call functions of other modules and compile in
constants of many more (counter indices, descriptor bits, walk flags, barrier
counts, the rules), so a cache built before one of those files changed would
go on giving the old numbers. :data:`SOURCES_HASH` hashes the source of every
``s2split`` module the engine imports, directly or not; it is compiled into
:func:`compiled_sources_hash`, and on import a cache built from other
sources is dropped whole (every function then compiles afresh on first use).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path
from types import MethodType

from numba import njit, types
from numba.core.dispatcher import Dispatcher

from . import dirty_log, guest, memory, mmu, pte, rules, stage2, state, tlb, visitors, walker

#: The modules holding compiled functions.
KERNEL_MODULES = (state, rules, pte, memory, tlb, visitors, walker, stage2, mmu, dirty_log,
                  guest)


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


def drop_stale_cache() -> bool:
    """Empty the compile cache of every function if it was built from other
    sources (they then compile afresh on first use); True if it did."""
    if compiled_sources_hash() == SOURCES_HASH:
        return False
    for d in dispatchers():
        if d._cache is not None:
            d._cache.flush()
    compiled_sources_hash.recompile()
    return True


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
