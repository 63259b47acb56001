"""MMU-layer hooks in the fast engine: :mod:`s2split.model.kvm.mmu_api` compiled,
the built-in hooks of :mod:`s2split.model.kvm.mmu_variants` compiled into the
cache, and the four MMU functions a variant may replace, each calling the
variant's hook or vanilla's body (the twins of the dispatch in
:mod:`s2split.model.kvm.mmu`, :mod:`s2split.model.kvm.dirty_log` and
:class:`s2split.model.kvm.vm.VM`).

The context of a hook is :class:`FastMmu` ``(T, M, B, s, a0, a1, words)``:
the three state arrays, the memslot's row, the hook's two integer
arguments and, for the clear hook, the words of the call (an empty array
otherwise). Each API function gets a numba implementation here, calling the
engine function of the same kernel name, so a compiled hook counts exactly
what the reference engine counts.
"""

from __future__ import annotations

from collections import namedtuple

from numba import njit, types
from numba.extending import overload

from ..arm64.uapi import KVM_DIRTY_LOG_INITIALLY_SET
from ..counting import counters as C
from ..model.kvm import mmu_api as api
from ..model.kvm import mmu_variants as MV
from ..model.pgtable.variants import MMU_HOOKS
from ..model.pgtable.walker import SKIP_LEVELS_ALL
from .mmu import (_slot_range, enable_log_dirty_pt_masked_body, kvm_flush_remote_tlbs_memslot,
                  kvm_mmu_split_huge_pages, kvm_mmu_wp_memory_region, kvm_stage2_wp_range)
from .stage2 import stage2_split, stage2_wrprotect
from .state import VARIANT_MMU, S, SlotCol, kvm_count, slot_index
from .visitor_api import FAST_IMPLS, register_helpers

#: The fast engine's context of one MMU hook call.
FastMmu = namedtuple("FastMmu", ["T", "M", "B", "s", "a0", "a1", "words"])

#: Indices of the hooks at ``VARIANT_MMU + i``.
MASKED, CLEAR, SPLIT, ENABLE = (MMU_HOOKS.index(n) for n in (
    "enable_log_dirty_pt_masked", "clear_dirty_log", "split_huge_pages", "enable_log_dirty"))
#: The built-in hooks: the function each replaces, and its id there (0:
#: none, vanilla's function). One hook per function so far, each id 1.
BUILTIN_MMU = {MV.clear_coalesce: (CLEAR, 1), MV.wp_split_fused: (MASKED, 1),
               MV.split_once: (SPLIT, 1), MV.enable_split_then_wp: (ENABLE, 1)}


def mmu_hook_id(name: str, fn) -> int:
    """What ``VARIANT_MMU + i`` holds for hook ``fn`` replacing ``name`` (None: 0)."""
    if fn is None:
        return 0
    where, hid = BUILTIN_MMU[fn]
    if MMU_HOOKS[where] != name:
        raise ValueError(f"{fn.__name__} is a hook for {MMU_HOOKS[where]}, not {name}")
    return hid


def _fast(m) -> bool:
    return isinstance(m, types.BaseNamedTuple) and m.instance_class is FastMmu


def _mmu_overload(fn):
    """Register ``impl`` as the fast implementation of API function ``fn``."""
    def register(impl):
        FAST_IMPLS[fn] = impl

        @overload(fn, jit_options={"_nrt": False}, strict=False)
        def typer(m, *args):
            return impl if _fast(m) else None
        return impl
    return register


@_mmu_overload(api.slot_base_gfn)
def _slot_base_gfn(m):
    return m.M[slot_index(m.M, m.s, SlotCol.BASE_GFN)]


@_mmu_overload(api.slot_npages)
def _slot_npages(m):
    return m.M[slot_index(m.M, m.s, SlotCol.NPAGES)]


@_mmu_overload(api.page_shift)
def _page_shift(m):
    return m.M[S.PAGE_SHIFT]


@_mmu_overload(api.chunk_size)
def _chunk_size(m):
    return m.M[S.CHUNK]


@_mmu_overload(api.manual_init_set)
def _manual_init_set(m):
    return 1 if m.M[S.MANUAL] & KVM_DIRTY_LOG_INITIALLY_SET else 0


@_mmu_overload(api.split_cache_pages)
def _split_cache_pages(m):
    return m.M[S.SPLIT_NOBJS]


@_mmu_overload(api.gfn_offset)
def _gfn_offset(m):
    return m.a0


@_mmu_overload(api.mask)
def _mask(m):
    return m.a1


@_mmu_overload(api.range_start)
def _range_start(m):
    return m.a0


@_mmu_overload(api.range_end)
def _range_end(m):
    return m.a1


@_mmu_overload(api.first_word)
def _first_word(m):
    return m.a0


@_mmu_overload(api.nwords)
def _nwords(m):
    return m.a1


@_mmu_overload(api.word)
def _word(m, j):
    return m.words[j]


@_mmu_overload(api.wp_range)
def _wp_range(m, start, end):
    kvm_stage2_wp_range(m.T, m.M, start, end)


@_mmu_overload(api.split_huge_pages)
def _split_huge_pages(m, start, end):
    return kvm_mmu_split_huge_pages(m.T, m.M, start, end)


@_mmu_overload(api.split_huge_pages_all_levels)
def _split_huge_pages_all_levels(m, start, end):
    m.M[S.FLAGS_CLEAR] = SKIP_LEVELS_ALL
    ret = kvm_mmu_split_huge_pages(m.T, m.M, start, end)
    m.M[S.FLAGS_CLEAR] = 0
    return ret


@_mmu_overload(api.enable_log_dirty_pt_masked)
def _enable_log_dirty_pt_masked(m, offset, bits):
    masked_body(m.T, m.M, m.B, m.s, offset, bits)


@_mmu_overload(api.wp_memory_region)
def _wp_memory_region(m):
    kvm_mmu_wp_memory_region(m.T, m.M, m.s)


@_mmu_overload(api.split_memory_region)
def _split_memory_region(m):
    split_memory_region(m.T, m.M, m.B, m.s)


@_mmu_overload(api.flush_memslot)
def _flush_memslot(m):
    kvm_flush_remote_tlbs_memslot(m.M, m.s)


@_mmu_overload(api.stage2_wrprotect)
def _stage2_wrprotect(m, addr, size):
    return stage2_wrprotect(m.T, m.M, addr, size)


@_mmu_overload(api.stage2_split)
def _stage2_split(m, addr, size):
    return stage2_split(m.T, m.M, addr, size)


@_mmu_overload(api.marked)
def _marked(m, i):
    return (m.B[m.M[slot_index(m.M, m.s, SlotCol.VBITMAP)] + (i >> 6)] >> (i & 63)) & 1


@_mmu_overload(api.mark)
def _mark(m, i):
    m.B[m.M[slot_index(m.M, m.s, SlotCol.VBITMAP)] + (i >> 6)] |= 1 << (i & 63)


# -- the built-in hooks, compiled and cached ------------------------------------------------
for _fn in BUILTIN_MMU:
    register_helpers(_fn)
_clear_coalesce = njit(cache=True, _nrt=False)(MV.clear_coalesce)
_wp_split_fused = njit(cache=True, _nrt=False)(MV.wp_split_fused)
_split_once = njit(cache=True, _nrt=False)(MV.split_once)
_enable_split_then_wp = njit(cache=True, _nrt=False)(MV.enable_split_then_wp)

# One caller per function a variant may replace, each calling only the
# hooks for that function: the hooks call the API, whose functions call
# these callers (split_memory_region -> split_huge_pages), and numba needs
# the call graph without cycles.
@njit(cache=True, _nrt=False)
def _call_split(T, M, B, s, hid, addr, end):
    """``kvm_mmu_split_huge_pages()`` by its built-in hook (split-once);
    ``hid`` names the hook, the only one there is for this function."""
    return _split_once(FastMmu(T, M, B, s, addr, end, B[:0]))


@njit(cache=True, _nrt=False)
def _call_masked(T, M, B, s, hid, gfn_offset, mask):
    """``kvm_arch_mmu_enable_log_dirty_pt_masked()`` by its built-in hook
    (wp-split-fused); ``hid`` names the hook, the only one there is."""
    return _wp_split_fused(FastMmu(T, M, B, s, gfn_offset, mask, B[:0]))


@njit(cache=True, _nrt=False)
def _call_clear(T, M, B, s, hid, first_word, words):
    """The word loop of ``kvm_clear_dirty_log_protect()`` by its built-in
    hook (clear-coalesce); ``hid`` names the hook, the only one there is."""
    return _clear_coalesce(FastMmu(T, M, B, s, first_word, len(words), words))


@njit(cache=True, _nrt=False)
def _call_enable(T, M, B, s, hid):
    """``kvm_mmu_wp_memory_region()`` + split on enable by its built-in hook
    (enable-split-then-wp); ``hid`` names the hook, the only one there is."""
    return _enable_split_then_wp(FastMmu(T, M, B, s, 0, 0, B[:0]))


# -- the MMU functions a variant may replace ------------------------------------------------
@njit(cache=True, _nrt=False)
def split_huge_pages(T, M, B, s, addr, end):
    """``kvm_mmu_split_huge_pages()`` over ``[addr, end)`` of memslot ``s``:
    the variant's hook or vanilla's."""
    hid = M[VARIANT_MMU + SPLIT]
    if hid != 0:
        return _call_split(T, M, B, s, hid, addr, end)
    return kvm_mmu_split_huge_pages(T, M, addr, end)


@njit(cache=True, _nrt=False)
def split_memory_region(T, M, B, s):
    """``kvm_mmu_split_memory_region()``: eagerly split a whole memslot."""
    start, end = _slot_range(M, s)
    split_huge_pages(T, M, B, s, start, end)


@njit(cache=True, _nrt=False)
def masked_body(T, M, B, s, gfn_offset, mask):
    """Vanilla ``kvm_arch_mmu_enable_log_dirty_pt_masked()``: write-protect
    the word's range, then (manual-protect + initially-set) split it."""
    start, end = enable_log_dirty_pt_masked_body(T, M, s, gfn_offset, mask)
    if M[S.MANUAL] & KVM_DIRTY_LOG_INITIALLY_SET:
        split_huge_pages(T, M, B, s, start, end)


@njit(cache=True, _nrt=False)
def kvm_arch_mmu_enable_log_dirty_pt_masked(T, M, B, s, gfn_offset, mask):
    """One call per bitmap word: the variant's hook or vanilla's body."""
    kvm_count(M, C.K_LOG_DIRTY_MASKED, 1)
    hid = M[VARIANT_MMU + MASKED]
    if hid != 0:
        _call_masked(T, M, B, s, hid, gfn_offset, mask)
        return
    masked_body(T, M, B, s, gfn_offset, mask)


@njit(cache=True, _nrt=False)
def clear_words(T, M, B, s, first_word, words):
    """The clear hook over the words of one ``KVM_CLEAR_DIRTY_LOG`` (their
    bits already cleared in the log)."""
    _call_clear(T, M, B, s, M[VARIANT_MMU + CLEAR], first_word, words)


@njit(cache=True, _nrt=False)
def enable_log_dirty(T, M, B, s):
    """The enable path: write-protect and split the slot, or the variant's hook."""
    hid = M[VARIANT_MMU + ENABLE]
    if hid != 0:
        _call_enable(T, M, B, s, hid)
        return
    kvm_mmu_wp_memory_region(T, M, s)
    split_memory_region(T, M, B, s)
