"""The visitor API in the fast engine: :mod:`s2split.model.pgtable.visitor_api`
compiled.

Every function of the API gets a numba implementation here
(:func:`numba.extending.overload`) for the fast engine's context,
:class:`FastCtx` ``(T, M, pfn, idx, old, level, visit)``; each calls the
engine function of the same meaning (``try_break`` is
:func:`~s2split.engine.entries._try_break`, ...), so a visitor compiled with
``njit`` counts exactly as on the reference engine. Built-in visitors written
with the API are compiled into the cached walker (:mod:`s2split.engine.visitors`);
a user's is compiled by :func:`compile_visitor` into a C-callable function
whose address the walker calls (:mod:`s2split.engine.fnptr`), never cached.
"""

from __future__ import annotations

import inspect
from collections import namedtuple
from pathlib import Path
from typing import Callable

from numba import carray, cfunc, njit, types
from numba.core.errors import NumbaError
from numba.extending import overload, register_jitable

from ..counting import counters as C
from ..model.pgtable import visitor_api as api
from ..plumbing.errors import S2Error
from . import rules as R
from .entries import _make, _set, _try_break, create_unlinked, free_unlinked
from .fnptr import C_SIGNATURE
from .memory import cache_nobjs
from .pte import make_table, pte_to_phys
from .state import (DEFER_COLS, DEFER_IDX, DEFER_LEVEL, DEFER_NEW, DEFER_OVERFLOW, DEFER_PFN,
                    MC_NONE, MC_SPLIT, NOLV, S, W, count, defer_capacity, granule_size)
from .tlb import dsb_ishst, flush_vmid, flush_vmid_ipa, flush_vmid_range

#: The fast engine's context of one visit.
FastCtx = namedtuple("FastCtx", ["T", "M", "pfn", "idx", "old", "level", "visit"])

_OPTS = {"_nrt": False}


def _fast(ctx) -> bool:
    return isinstance(ctx, types.BaseNamedTuple) and ctx.instance_class is FastCtx


#: API function -> the Python function whose code implements it here (for a
#: context: the implementation; for integers: the typer and its lambdas).
#: numba reaches these through the API, not through names in this module, so
#: :func:`s2split.engine.compile_cache.reachable` follows them from here.
FAST_IMPLS: dict[Callable, Callable] = {}


def _ctx_overload(fn):
    """Register ``impl`` as the fast implementation of API function ``fn``
    (same parameters) for a :class:`FastCtx`."""
    def register(impl):
        FAST_IMPLS[fn] = impl
        @overload(fn, jit_options=_OPTS, strict=False)
        def typer(ctx, *args):
            if _fast(ctx):
                return impl
            return None
        return impl
    return register


# -- the visit ----------------------------------------------------------------------------
@_ctx_overload(api.old)
def _old(ctx):
    return ctx.old


@_ctx_overload(api.level)
def _level(ctx):
    return ctx.level


@_ctx_overload(api.addr)
def _addr(ctx):
    return ctx.M[W.ADDR]


@_ctx_overload(api.visit)
def _visit(ctx):
    return ctx.visit


@_ctx_overload(api.flags)
def _flags(ctx):
    return ctx.M[W.FLAGS]


@_ctx_overload(api.walk_start)
def _walk_start(ctx):
    return ctx.M[W.START]


@_ctx_overload(api.walk_end)
def _walk_end(ctx):
    return ctx.M[W.END]


@njit(cache=True, _nrt=False)
def _walk_cache(M):
    """The walk's memory cache: the split cache for split, the map's for map."""
    op = M[W.OP]
    if op == C.OP_SPLIT:
        return MC_SPLIT
    if op == C.OP_MAP:
        return M[W.MAP_MEMCACHE]
    return MC_NONE


@_ctx_overload(api.cache_pages)
def _cache_pages(ctx):
    mc = _walk_cache(ctx.M)
    return 0 if mc == MC_NONE else cache_nobjs(ctx.M, mc)


@_ctx_overload(api.granule_size)
def _granule_size(ctx, lvl):
    return granule_size(ctx.M, lvl)


# -- entries ------------------------------------------------------------------------------
@_ctx_overload(api.read)
def _read(ctx):
    return ctx.T[ctx.pfn, ctx.idx]


@_ctx_overload(api.write)
def _write(ctx, new):
    _set(ctx.T, ctx.M, ctx.M[W.OP], ctx.M[W.FLAGS], ctx.pfn, ctx.idx, new, ctx.level)
    return True


@_ctx_overload(api.try_break)
def _try_break_impl(ctx):
    M = ctx.M
    return _try_break(ctx.T, M, M[W.OP], M[W.FLAGS], M[W.ADDR], ctx.pfn, ctx.idx, ctx.old,
                      ctx.level)


@_ctx_overload(api.make)
def _make_impl(ctx, new):
    _make(ctx.T, ctx.M, ctx.M[W.OP], ctx.pfn, ctx.idx, new, ctx.level)


@_ctx_overload(api.replace)
def _replace(ctx, new):
    # The rules (a valid block, a table of the same translation, FEAT_BBM
    # level 2) are checked on the reference engine.
    ctx.T[ctx.pfn, ctx.idx] = new
    count(ctx.M, ctx.M[W.OP], C.K_PTE_WRITE, ctx.level, 1)


# -- tables -------------------------------------------------------------------------------
@_ctx_overload(api.create_unlinked)
def _create_unlinked(ctx, phys, lvl, prot, force_pte):
    return create_unlinked(ctx.T, ctx.M, phys, lvl, prot, _walk_cache(ctx.M), force_pte != 0)


@_ctx_overload(api.free_unlinked)
def _free_unlinked(ctx, table, lvl):
    free_unlinked(ctx.T, ctx.M, table, lvl)


@_ctx_overload(api.split_force_pte)
def _split_force_pte(ctx, lvl):
    mc = _walk_cache(ctx.M)
    return R.split_force_pte(lvl, ctx.M[S.PTRS], 0 if mc == MC_NONE else cache_nobjs(ctx.M, mc))


@_ctx_overload(api.make_table)
def _make_table(ctx, table):
    return make_table(ctx.M, table)


@_ctx_overload(api.pte_to_phys)
def _pte_to_phys(ctx, pte):
    return pte_to_phys(ctx.M, pte)


# -- descriptors (no context: for integers) -------------------------------------------------
@overload(api.is_valid, jit_options=_OPTS)
def _is_valid(pte):
    if isinstance(pte, types.Integer):
        return lambda pte: (pte & 1) != 0
    return None


@overload(api.is_table, jit_options=_OPTS)
def _is_table(pte, lvl):
    if isinstance(pte, types.Integer):
        return lambda pte, lvl: lvl < 3 and (pte & 3) == 3
    return None


@overload(api.pte_prot, jit_options=_OPTS)
def _pte_prot(pte):
    if isinstance(pte, types.Integer):
        return lambda pte: R.pte_prot(pte)
    return None


FAST_IMPLS.update({api.is_valid: _is_valid, api.is_table: _is_table, api.pte_prot: _pte_prot})


# -- TLB maintenance and barriers ---------------------------------------------------------
@_ctx_overload(api.tlbi_ipa)
def _tlbi_ipa(ctx, lvl):
    flush_vmid_ipa(ctx.M, ctx.M[W.OP], NOLV if lvl == api.TTL_UNKNOWN else lvl)


@_ctx_overload(api.tlbi_range)
def _tlbi_range(ctx, start, size):
    flush_vmid_range(ctx.M, ctx.M[W.OP], start, size)


@_ctx_overload(api.tlbi_vmid)
def _tlbi_vmid(ctx):
    flush_vmid(ctx.M, ctx.M[W.OP])


@_ctx_overload(api.dsb_ishst)
def _dsb_ishst(ctx):
    dsb_ishst(ctx.M, ctx.M[W.OP])


@_ctx_overload(api.dsb_ish)
def _dsb_ish(ctx):
    count(ctx.M, ctx.M[W.OP], C.K_DSB_ISH, NOLV, 1)


@_ctx_overload(api.isb)
def _isb(ctx):
    count(ctx.M, ctx.M[W.OP], C.K_ISB, NOLV, 1)


# -- hints and scratch --------------------------------------------------------------------
@_ctx_overload(api.built_complete)
def _built_complete(ctx):
    ctx.M[W.BUILT_COMPLETE] = 1


@_ctx_overload(api.scratch)
def _scratch(ctx, i):
    return ctx.M[W.SCRATCH + i]


@_ctx_overload(api.set_scratch)
def _set_scratch(ctx, i, value):
    ctx.M[W.SCRATCH + i] = value


# -- two-phase changes ----------------------------------------------------------------------
@_ctx_overload(api.defer_make)
def _defer_make(ctx, new):
    # The entry stays as try_break left it (locked, invalid) until
    # make_deferred; a row past the region is refused, not written: the VM
    # reports DEFER_OVERFLOW after the call (the reference has no bound). The
    # rule "only over a broken entry" is checked on the reference engine.
    M = ctx.M
    n = M[W.NDEFERRED]
    if n >= defer_capacity(M):
        M[S.DEFER_FAULT] = DEFER_OVERFLOW
        return
    row = M[S.DEFERRED] + n * DEFER_COLS
    M[row + DEFER_PFN] = ctx.pfn
    M[row + DEFER_IDX] = ctx.idx
    M[row + DEFER_LEVEL] = ctx.level
    M[row + DEFER_NEW] = new
    M[W.NDEFERRED] = n + 1


@_ctx_overload(api.make_deferred)
def _make_deferred(ctx):
    M = ctx.M
    n = M[W.NDEFERRED]
    base = M[S.DEFERRED]
    op = M[W.OP]
    for i in range(n):
        row = base + i * DEFER_COLS
        _make(ctx.T, M, op, M[row + DEFER_PFN], M[row + DEFER_IDX], M[row + DEFER_NEW],
              M[row + DEFER_LEVEL])
    M[W.NDEFERRED] = 0
    return n


# -- compiling a user's visitor -------------------------------------------------------------
_compiled: dict[Callable, object] = {}


def _where(fn: Callable) -> str:
    code = getattr(fn, "__code__", None)
    path = Path(code.co_filename).name if code else "?"
    return f"{path}: {getattr(fn, '__qualname__', fn)!r}"


#: Plain functions made callable from compiled code by :func:`register_helpers`.
HELPERS: set[Callable] = set()


def register_helpers(fn: Callable) -> None:
    """Make the plain functions a visitor calls (its helpers, another visitor)
    callable from compiled code too, as they are from Python."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    names = set(code.co_names)
    found = []
    for n in names:
        obj = fn.__globals__.get(n)
        if inspect.ismodule(obj):
            found += [getattr(obj, a) for a in names if inspect.isfunction(getattr(obj, a, None))]
        elif inspect.isfunction(obj):
            found.append(obj)
    for helper in found:
        if helper in HELPERS or helper.__module__ == api.__name__:
            continue  # the API has its own implementations
        HELPERS.add(helper)
        register_jitable(helper)
        register_helpers(helper)


def compile_visitor(fn: Callable) -> int:
    """The address of ``fn`` (a visitor or hook written with the visitor API)
    compiled for the fast engine, with the C signature the walker calls
    (:data:`s2split.engine.fnptr.C_SIGNATURE`). Compiled once per process and
    never cached on disk; a visitor numba cannot compile is a one-line error."""
    done = _compiled.get(fn)
    if done is None:
        register_helpers(fn)
        jfn = njit(_nrt=False)(fn)

        def visitor(tp, rows, cols, mp, mlen, pfn, idx, old, level, visit):
            T = carray(tp, (rows, cols))
            M = carray(mp, (mlen,))
            return jfn(FastCtx(T, M, pfn, idx, old, level, visit))

        try:
            done = cfunc(C_SIGNATURE)(visitor)
        except NumbaError as e:
            # numba's first line only names its pipeline stage; the next says what failed.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()
                     and not ln.strip().startswith("Failed in ")]
            first = lines[0] if lines else type(e).__name__
            raise S2Error(f"{_where(fn)}: numba cannot compile this visitor: {first}") from None
        _compiled[fn] = done
    return done.address
