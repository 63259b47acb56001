"""Built-in visitors written once with :mod:`s2split.model.pgtable.visitor_api`.

Both engines run these very functions: the reference engine as Python, the
fast engine compiled (and cached) into its walker. ``stage2_split_walker`` is
the kernel's split visitor (Linux 6.12); the ``bbml2_*`` pair is the
``bbml2`` variant: a split without break-before-make and one range TLBI per
``kvm_pgtable_stage2_split()`` call (``docs/design-notes.md``); the
``batched_*`` pair is ``split-batched-tlbi``: a two-phase split that breaks
every block of one call, invalidates them with one range TLBI, then makes
them (``defer_make``/``make_deferred``).
"""

from __future__ import annotations

from ...plumbing.errors import EAGAIN
from . import visitor_api as api

#: Scratch slots of the bbml2 split: anything split in this walk, and the
#: span [lo, hi) of the blocks split.
_SPLIT_ANY, _SPLIT_LO, _SPLIT_HI = 0, 1, 2


def new_subtree(ctx, lv, old):
    """The subtree that replaces the valid block ``old`` at ``lv``, built
    unlinked: ``(table, force_pte)``, or ``(-errno, 0)``. Enough pages in the
    split cache for the whole tree down to pages (force_pte), else one page
    of next-level blocks that the walker splits as it descends."""
    force_pte = api.split_force_pte(ctx, lv)
    if force_pte < 0:
        return force_pte, 0
    child = api.create_unlinked(ctx, api.pte_to_phys(ctx, old), lv, api.pte_prot(old),
                                force_pte != 0)
    return child, force_pte


def split_hint(ctx, fl, force_pte):
    """What a split visitor returns once its table is in: a complete subtree
    (``force_pte``) need not be walked, when the walk's flags allow skipping."""
    if force_pte:
        if fl & api.SKIP_NEW_CHILDREN:
            api.built_complete(ctx)
        if fl & api.RETURN_HINTS:
            return api.SKIP_CHILDREN
    return 0


def stage2_split_walker(ctx):
    """``stage2_split_walker()``: replace a block by a subtree of pages."""
    lv = api.level(ctx)
    fl = api.flags(ctx)
    if lv == api.LAST_LEVEL:
        # No huge pages at the last level.
        return api.SKIP_SIBLINGS if fl & api.RETURN_HINTS else 0
    old = api.old(ctx)
    if not api.is_valid(old):
        return 0
    child, force_pte = new_subtree(ctx, lv, old)
    if child < 0:
        return child
    if not api.try_break(ctx):
        api.free_unlinked(ctx, child, lv)
        return -EAGAIN
    api.make(ctx, api.make_table(ctx, child))
    return split_hint(ctx, fl, force_pte)


def bbml2_split_walker(ctx):
    """The split visitor on a CPU with FEAT_BBM level 2 and NOABORT: the new
    subtree replaces the block in one store, with no break (no invalid
    window, no locked entry, no per-block TLBI); the span split is recorded
    for one range TLBI after the walk (:func:`bbml2_flush_split`)."""
    lv = api.level(ctx)
    fl = api.flags(ctx)
    if lv == api.LAST_LEVEL:
        return api.SKIP_SIBLINGS if fl & api.RETURN_HINTS else 0
    old = api.old(ctx)
    if not api.is_valid(old):
        return 0
    child, force_pte = new_subtree(ctx, lv, old)
    if child < 0:
        return child
    api.replace(ctx, api.make_table(ctx, child))
    # The whole block may sit in TLBs, also outside the walk's range.
    g = api.granule_size(ctx, lv)
    start = api.addr(ctx) & ~(g - 1)
    if api.scratch(ctx, _SPLIT_ANY) == 0:
        api.set_scratch(ctx, _SPLIT_ANY, 1)
        api.set_scratch(ctx, _SPLIT_LO, start)
        api.set_scratch(ctx, _SPLIT_HI, start + g)
    elif start + g > api.scratch(ctx, _SPLIT_HI):
        api.set_scratch(ctx, _SPLIT_HI, start + g)
    return split_hint(ctx, fl, force_pte)


def bbml2_flush_split(ctx):
    """After the split walk of one ``kvm_pgtable_stage2_split()`` call: one
    ``kvm_tlb_flush_vmid_range()`` over the blocks it split, if any."""
    if api.scratch(ctx, _SPLIT_ANY) != 0:
        lo = api.scratch(ctx, _SPLIT_LO)
        api.tlbi_range(ctx, lo, api.scratch(ctx, _SPLIT_HI) - lo)
    return 0


def batched_split_walker(ctx):
    """Phase one of the two-phase split (the walk has ``SKIP_BBM_TLBI``):
    build the block's subtree as vanilla does, break the block without its
    TLBI and defer the make; :func:`batched_flush_make` invalidates every
    block broken with one range TLBI, then makes them. A subtree that is not
    complete (the cache too small: next-level blocks the walker must descend
    into and split now) is made at once, after the break's own TLBI, as in
    vanilla."""
    lv = api.level(ctx)
    fl = api.flags(ctx)
    if lv == api.LAST_LEVEL:
        return api.SKIP_SIBLINGS if fl & api.RETURN_HINTS else 0
    old = api.old(ctx)
    if not api.is_valid(old):
        return 0
    child, force_pte = new_subtree(ctx, lv, old)
    if child < 0:
        return child
    if not api.try_break(ctx):
        api.free_unlinked(ctx, child, lv)
        return -EAGAIN
    if not force_pte:
        api.tlbi_ipa(ctx, lv)
        api.make(ctx, api.make_table(ctx, child))
        return 0
    api.defer_make(ctx, api.make_table(ctx, child))
    # The whole block may sit in TLBs, also outside the walk's range.
    g = api.granule_size(ctx, lv)
    start = api.addr(ctx) & ~(g - 1)
    if api.scratch(ctx, _SPLIT_ANY) == 0:
        api.set_scratch(ctx, _SPLIT_ANY, 1)
        api.set_scratch(ctx, _SPLIT_LO, start)
        api.set_scratch(ctx, _SPLIT_HI, start + g)
    elif start + g > api.scratch(ctx, _SPLIT_HI):
        api.set_scratch(ctx, _SPLIT_HI, start + g)
    return 0


def batched_flush_make(ctx):
    """Phase two, after the split walk of one ``kvm_pgtable_stage2_split()``
    call: one ``kvm_tlb_flush_vmid_range()`` over the blocks broken (its
    range TLBIs completed by the hyp call's DSB ISH), then every deferred make."""
    if api.scratch(ctx, _SPLIT_ANY) != 0:
        lo = api.scratch(ctx, _SPLIT_LO)
        api.tlbi_range(ctx, lo, api.scratch(ctx, _SPLIT_HI) - lo)
    api.make_deferred(ctx)
    return 0


def wp_split_walker(ctx):
    """The split visitor of the ``wp-split-fused`` and ``enable-split-then-wp``
    variants: write-protect and split in one walk. A valid block is replaced
    (break-before-make, as ``stage2_split_walker``) by a subtree built
    read-only; a valid page is made read-only in place, as
    ``stage2_attr_walker`` would in a ``kvm_pgtable_stage2_wrprotect()`` walk.
    Vanilla write-protects the block first and splits it after, with the same
    break: the tables and TLB invalidations come out the same."""
    old = api.old(ctx)
    if not api.is_valid(old):
        return 0
    lv = api.level(ctx)
    if lv == api.LAST_LEVEL:
        if old & api.S2AP_W:
            api.write(ctx, old & ~api.S2AP_W)
        return 0
    force_pte = api.split_force_pte(ctx, lv)
    if force_pte < 0:
        return force_pte
    child = api.create_unlinked(ctx, api.pte_to_phys(ctx, old), lv,
                                api.pte_prot(old) & ~api.PROT_W, force_pte != 0)
    if child < 0:
        return child
    if not api.try_break(ctx):
        api.free_unlinked(ctx, child, lv)
        return -EAGAIN
    api.make(ctx, api.make_table(ctx, child))
    return split_hint(ctx, api.flags(ctx), force_pte)
