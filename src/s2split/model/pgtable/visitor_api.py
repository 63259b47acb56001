"""The visitor API: write a stage-2 visitor once, run it on both engines.

A visitor is a function of one argument, the *context* of one visit, that
uses only the functions of this module (and integer arithmetic, ``if``,
``while``, calls to other such functions)::

    from s2split.model.pgtable import visitor_api as api

    def my_split_walker(ctx):
        if api.level(ctx) == api.LAST_LEVEL or not api.is_valid(api.old(ctx)):
            return 0
        ...

The reference engine calls it with a Python context (the bodies below); the
fast engine compiles the *same function* with numba, where each function of
this module resolves to an engine implementation of the same meaning and the
same counts (:mod:`s2split.engine.visitor_api`). So a variant written this
way runs the 64 GiB matrix on the fast engine, and is pinned to the
reference by the differential tests and ``s2split variants --check``.

A visitor returns 0 (go on), a negative errno (stop the walk, except
``-EAGAIN`` on walks that do not handle faults), or a hint: ``SKIP_SIBLINGS``
(the rest of this table) or ``SKIP_CHILDREN`` (do not descend into the table
this visit installed).

What a visitor can see: :func:`old` (the entry as the walker read it),
:func:`level`, :func:`addr` (the walk's address, inside the entry's range),
:func:`visit` (``LEAF``, ``TABLE_PRE``, ``TABLE_POST``; ``AFTER_WALK`` for a
hook), :func:`flags` (the walk's flags, the variant's included),
:func:`walk_start`/:func:`walk_end` (the walk's range), :func:`cache_pages`
(pages in the walk's memory cache: the split cache for split).

What it can do, counted as the kernel's functions of the same name are
counted (under the walk's operation):

* entries: :func:`read`, :func:`write` (``stage2_try_set_pte``),
  :func:`try_break` (``stage2_try_break_pte``: lock, invalidate, drop the
  reference), :func:`make` (``stage2_make_pte``: only after a break; the
  reference engine refuses a make over a live entry), :func:`replace` (one
  store of a table over a block of the same translation, no break: only on
  a CPU with FEAT_BBM level 2 and NOABORT, checked on the reference engine);
* tables: :func:`create_unlinked`, :func:`free_unlinked`,
  :func:`split_force_pte` (the split cache rule), :func:`make_table`;
* descriptors: :func:`is_valid`, :func:`is_table`, :func:`pte_to_phys`,
  :func:`pte_prot`, :func:`granule_size`;
* TLB maintenance and barriers: :func:`tlbi_ipa`, :func:`tlbi_range`
  (``kvm_tlb_flush_vmid_range``), :func:`tlbi_vmid`, :func:`dsb_ishst`,
  :func:`dsb_ish`, :func:`isb`;
* two-phase changes: :func:`defer_make`
  (after a :func:`try_break`, make the entry later) and
  :func:`make_deferred` (make every deferred entry of the walk, in order):
  break several entries of one walk, invalidate them all with one
  :func:`tlbi_range`, then make them (the ``split-batched-tlbi`` variant;
  the fast engine holds as many deferred entries as one
  ``kvm_pgtable_stage2_split()`` call can break, and refuses a walk that
  defers more);
* hints to the walker: the return values above, and
  :func:`built_complete` (``SKIP_NEW_CHILDREN``);
* per-walk state: :func:`scratch`/:func:`set_scratch`, ``NSCRATCH`` integers
  zeroed when the operation's walk starts (``kvm_pgtable_walk``) and still
  there for its after-walk hook.

**After-walk hooks** (``Variant(after_walk={"split": fn})``): ``fn(ctx)`` runs
once per call of the operation, right after its walk (whatever the walk
returned), with ``visit(ctx) == AFTER_WALK``; the entry functions are
meaningless there, the walk's range, flags, scratch and the TLB functions
are not. It is where maintenance deferred to the end of a call goes (the
``bbml2`` variant's range TLBI).

Walks that ``create_unlinked`` and ``free_unlinked`` make inside a visitor
always use the built-in map and free visitors.

Numpy-free: the reference engine stays light.
"""

from __future__ import annotations

from typing import Any

from ...arm64 import pte as P
from ...arm64 import rules as R
from ...arm64.arch import LAST_LEVEL
from ...counting.counters import K_DSB_ISH, K_ISB, K_PTE_WRITE, NOLEVEL, SLOTS
from ...plumbing.errors import S2Error
from . import tlb
from .walker import (HINT_SKIP_CHILDREN, HINT_SKIP_SIBLINGS, LEAF, RETURN_HINTS, SHARED,
                     SKIP_BBM_TLBI, SKIP_CMO, SKIP_NEW_CHILDREN, TABLE_POST, TABLE_PRE)

__all__ = ["LAST_LEVEL", "LEAF", "TABLE_PRE", "TABLE_POST", "AFTER_WALK", "SHARED",
           "SKIP_BBM_TLBI", "SKIP_CMO", "SKIP_NEW_CHILDREN", "RETURN_HINTS", "SKIP_SIBLINGS",
           "SKIP_CHILDREN", "TTL_UNKNOWN", "NSCRATCH", "S2AP_W", "PROT_W", "VisitorRuleError", "VisitCtx", "old",
           "level", "addr", "visit", "flags", "walk_start", "walk_end", "cache_pages", "read",
           "write", "try_break", "make", "replace", "create_unlinked", "free_unlinked",
           "split_force_pte", "make_table", "is_valid", "is_table", "pte_to_phys", "pte_prot",
           "granule_size", "tlbi_ipa", "tlbi_range", "tlbi_vmid", "dsb_ishst", "dsb_ish", "isb",
           "built_complete", "scratch", "set_scratch", "defer_make", "make_deferred"]

#: ``visit(ctx)`` of an after-walk hook.
AFTER_WALK = 1 << 3
#: Hints a visitor may return.
SKIP_SIBLINGS = HINT_SKIP_SIBLINGS
SKIP_CHILDREN = HINT_SKIP_CHILDREN
#: ``tlbi_ipa(ctx, TTL_UNKNOWN)``: no level hint (``TLBI_TTL_UNKNOWN``).
TTL_UNKNOWN = -2
#: Integers of per-walk scratch.
NSCRATCH = 4
#: The write permission of a stage-2 descriptor (S2AP[1]) and of a ``Prot``.
S2AP_W = P.S2AP_W
PROT_W = int(P.Prot.W)


class VisitorRuleError(S2Error):
    """A visitor broke a rule of the page-table code (reference engine)."""


class VisitCtx:
    """The reference engine's context of one visit (or of an after-walk hook)."""

    __slots__ = ("w", "pfn", "table", "idx", "old", "level", "visit")

    def __init__(self, w: Any, pfn: int, table: Any, idx: int, old: int, level: int,
                 visit: int):
        self.w, self.pfn, self.table, self.idx = w, pfn, table, idx
        self.old, self.level, self.visit = old, level, visit


def _where(ctx: VisitCtx) -> str:
    return f"at IPA {ctx.w.addr:#x}, level {ctx.level}"


# -- the visit ------------------------------------------------------------------------
def old(ctx):
    """The entry as the walker read it before this visit."""
    return ctx.old


def level(ctx):
    """The level of the entry."""
    return ctx.level


def addr(ctx):
    """The walk's address: inside the entry's range, not always its start."""
    return ctx.w.addr


def visit(ctx):
    """``LEAF``, ``TABLE_PRE``, ``TABLE_POST`` or ``AFTER_WALK``."""
    return ctx.visit


def flags(ctx):
    """The walk's flags (``KVM_PGTABLE_WALK_*`` and the variant's)."""
    return ctx.w.flags


def walk_start(ctx):
    """Start of the walk's range (page aligned)."""
    return ctx.w.start


def walk_end(ctx):
    """End of the walk's range (page aligned)."""
    return ctx.w.end


def cache_pages(ctx):
    """Pages in the walk's memory cache (split: the split cache), 0 without one."""
    arg = ctx.w.arg
    mc = getattr(arg, "memcache", arg)
    return mc.nobjs if mc is not None and hasattr(mc, "nobjs") else 0


def granule_size(ctx, lvl):
    """Bytes one entry at ``lvl`` maps (``kvm_granule_size()``)."""
    return ctx.w.pgt.geom.granule_size(lvl)


# -- entries --------------------------------------------------------------------------
def read(ctx):
    """The entry now (uncounted, like the walker's re-read)."""
    return ctx.table[ctx.idx]


def write(ctx, new):
    """``stage2_try_set_pte()``: store ``new`` in place (counted as a PTE
    write, or a CAS on shared walks); for changes that need no break, such as
    permissions. Returns True."""
    return ctx.w.pgt._set(ctx.w, ctx.table, ctx.idx, ctx.old, new, ctx.level)


def try_break(ctx):
    """``stage2_try_break_pte()``: lock the entry, invalidate the old
    translation (unless the walk has ``SKIP_BBM_TLBI``), drop the table
    page's reference. False if another walker holds it (never here)."""
    return ctx.w.pgt._try_break(ctx.w, ctx.pfn, ctx.table, ctx.idx, ctx.old, ctx.level)


def make(ctx, new):
    """``stage2_make_pte()``: publish ``new`` over a broken (locked) entry."""
    if not P.is_locked(ctx.table[ctx.idx]):
        raise VisitorRuleError(f"make {_where(ctx)} over a live entry "
                               f"({ctx.table[ctx.idx]:#x}): no break before it")
    ctx.w.pgt._make(ctx.w, ctx.pfn, ctx.table, ctx.idx, new, ctx.level)


def replace(ctx, new):
    """Store table entry ``new`` over the valid block being visited in one
    write, with no break and no TLBI: FEAT_BBM level 2 with NOABORT. The
    table must translate as the block did (same output addresses and
    permissions); the table page's reference count is unchanged (one non-zero
    entry for another). The stale block may stay in TLBs until the caller
    invalidates it (see the ``bbml2`` variant)."""
    pgt, o, lv = ctx.w.pgt, ctx.old, ctx.level
    if not pgt.features.bbml2:
        raise VisitorRuleError(f"replace {_where(ctx)} without FEAT_BBM level 2 (NOABORT): "
                               "a block may only be replaced after a break")
    if not o & P.VALID or P.is_table(o, lv) or lv >= LAST_LEVEL:
        raise VisitorRuleError(f"replace {_where(ctx)} of an entry that is no block ({o:#x})")
    if not P.is_table(new, lv):
        raise VisitorRuleError(f"replace {_where(ctx)} with an entry that is no table ({new:#x})")
    bad = _translation_differs(pgt, o, lv, new)
    if bad:
        raise VisitorRuleError(f"replace {_where(ctx)}: the new table translates differently "
                               f"from the block ({bad})")
    if pgt.tracer is not None:
        pgt.tracer.write(ctx.table, ctx.idx, lv, o, new)
    ctx.table[ctx.idx] = new
    ctx.w.c[K_PTE_WRITE * SLOTS + lv + 1] += 1


#: What a replace must keep: the permissions (S2AP, XN). The memory type is
#: not compared: the split derives the subtree's attributes from
#: ``kvm_pgtable_stage2_pte_prot()``, which has no device bit, so a device
#: block (which KVM never maps) comes back as normal memory, in vanilla too.
_KEPT = P.S2AP_R | P.S2AP_W | P.XN


def _translation_differs(pgt, block: int, lv: int, table: int) -> str:
    """What differs between a block and the subtree of a table entry
    (output address, permissions), or ''."""
    geom = pgt.geom
    base = pgt.pte_to_phys(block)
    attrs = block & _KEPT
    stack = [(pgt.mem.pfn(pgt.pte_to_phys(table)), lv + 1, 0)]
    while stack:
        pfn, l2, off = stack.pop()
        g = geom.granule_size(l2)
        for i, e in enumerate(pgt.mem.pages[pfn]):
            o = off + i * g
            if P.is_table(e, l2):
                stack.append((pgt.mem.pfn(pgt.pte_to_phys(e)), l2 + 1, o))
            elif not e & P.VALID:
                return f"offset {o:#x} unmapped"
            elif pgt.pte_to_phys(e) != base + o or e & _KEPT != attrs:
                return f"offset {o:#x} maps {pgt.pte_to_phys(e):#x} with permissions " \
                       f"{e & _KEPT:#x}, the block {base + o:#x} with {attrs:#x}"
    return ""


# -- tables ---------------------------------------------------------------------------
def create_unlinked(ctx, phys, lvl, prot, force_pte):
    """``kvm_pgtable_stage2_create_unlinked()`` from the walk's memory cache:
    a detached subtree mapping ``granule_size(lvl)`` bytes at ``phys``. The
    table page, or a negative errno."""
    arg = ctx.w.arg
    mc = getattr(arg, "memcache", arg)
    return ctx.w.pgt.create_unlinked(phys, lvl, prot, mc, bool(force_pte))


def free_unlinked(ctx, table, lvl):
    """``kvm_pgtable_stage2_free_unlinked()``: drop a detached subtree that
    would have replaced an entry at ``lvl``."""
    ctx.w.pgt.free_unlinked(table, lvl)


def split_force_pte(ctx, lvl):
    """The split cache rule (:func:`s2split.arm64.rules.split_force_pte`): 1 to
    build the subtree down to pages, 0 for one table of next-level blocks,
    or a negative errno."""
    return R.split_force_pte(lvl, ctx.w.pgt.ptrs, cache_pages(ctx))


def make_table(ctx, table):
    """``kvm_init_table_pte()`` for table page ``table``."""
    pgt = ctx.w.pgt
    return P.make_table(pgt.mem.pa(table), pgt.geom)


# -- descriptors ----------------------------------------------------------------------
def is_valid(pte):
    """Bit 0."""
    return (pte & 1) != 0


def is_table(pte, lvl):
    """``kvm_pte_table()``."""
    return lvl < LAST_LEVEL and (pte & 3) == 3


def pte_to_phys(ctx, pte):
    """``kvm_pte_to_phys()``."""
    return ctx.w.pgt.pte_to_phys(pte)


def pte_prot(pte):
    """``kvm_pgtable_stage2_pte_prot()`` as an integer ``Prot``."""
    return R.pte_prot(pte)


# -- TLB maintenance and barriers -----------------------------------------------------
def tlbi_ipa(ctx, lvl):
    """``__kvm_tlb_flush_vmid_ipa()`` with level hint ``lvl`` (or ``TTL_UNKNOWN``)."""
    pgt = ctx.w.pgt
    tlb.flush_vmid_ipa(ctx.w.c, pgt.features, None if lvl == TTL_UNKNOWN else lvl, pgt.tracer,
                       ctx.w.addr)


def tlbi_range(ctx, start, size):
    """``kvm_tlb_flush_vmid_range()``: range TLBIs per ``MAX_TLBI_RANGE_PAGES``
    (whole-VMID without FEAT_TLBIRANGE)."""
    pgt = ctx.w.pgt
    tlb.flush_vmid_range(ctx.w.c, pgt.features, start, size, pgt.geom.page_shift,
                         pgt.geom.lpa2, pgt.tracer)


def tlbi_vmid(ctx):
    """``__kvm_tlb_flush_vmid()``."""
    tlb.flush_vmid(ctx.w.c, ctx.w.pgt.features, ctx.w.pgt.tracer)


def dsb_ishst(ctx):
    """``dsb(ishst)``."""
    tlb.dsb_ishst(ctx.w.c, ctx.w.pgt.tracer)


def dsb_ish(ctx):
    """``dsb(ish)``."""
    ctx.w.c[K_DSB_ISH * SLOTS + NOLEVEL] += 1
    if ctx.w.pgt.tracer is not None:
        ctx.w.pgt.tracer.dsb("ish")


def isb(ctx):
    """``isb()``."""
    ctx.w.c[K_ISB * SLOTS + NOLEVEL] += 1


# -- hints and scratch ----------------------------------------------------------------
def built_complete(ctx):
    """Under ``SKIP_NEW_CHILDREN``: the table just installed is complete, do
    not descend into it."""
    ctx.w.built_complete = True


def scratch(ctx, i):
    """Per-walk integer ``i`` (``0 <= i < NSCRATCH``)."""
    return ctx.w.scratch[i]


def set_scratch(ctx, i, value):
    """Set per-walk integer ``i``."""
    ctx.w.scratch[i] = value


# -- two-phase changes ------------------------------------------------------------------
def defer_make(ctx, new):
    """Phase one of a two-phase change: the entry being visited, broken by
    :func:`try_break` (on a walk with ``SKIP_BBM_TLBI``, its TLBI not yet
    issued), gets ``new`` at :func:`make_deferred`. Until then it stays
    locked and invalid, so the walker does not descend under it."""
    if not P.is_locked(ctx.table[ctx.idx]):
        raise VisitorRuleError(f"defer_make {_where(ctx)} over a live entry "
                               f"({ctx.table[ctx.idx]:#x}): no break before it")
    w = ctx.w
    if w.deferred is None:
        w.deferred = []
    w.deferred.append((ctx.pfn, ctx.table, ctx.idx, ctx.level, new))


def make_deferred(ctx):
    """Phase two: ``stage2_make_pte()`` for every entry deferred in this walk,
    in the order deferred (each counted as a make); returns how many. Call it
    once the broken entries are invalidated (a :func:`tlbi_range` over them:
    the hyp call completes its TLBIs with a DSB ISH)."""
    w = ctx.w
    pending, w.deferred = w.deferred or [], None
    for pfn, table, idx, lv, new in pending:
        if not P.is_locked(table[idx]):  # pragma: no cover - nothing else writes it
            raise VisitorRuleError(f"make_deferred at level {lv} over a live entry")
        w.pgt._make(w, pfn, table, idx, new, lv)
    return len(pending)
