"""Variants above the walker: MMU-layer hooks written once (model/kvm/mmu_api.py),
the four built-in variants on both engines, and the check that holds them to
what matters (tasks/mmu_check.py) -- with wrong hooks it must catch."""

from __future__ import annotations

import pytest

from s2split.arm64.arch import Geometry
from s2split.plumbing.errors import S2Error
from s2split.model.kvm import mmu_api as api
from s2split.model.kvm.backing import parse_backing
from s2split.tasks.mmu_check import check_mmu, check_mmu_variant
from s2split.model.pgtable.variants import VANILLA, Variant, get
from s2split.arm64.uapi import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS,
                                KVM_MEM_LOG_DIRTY_PAGES)

MIB = 1 << 20
BUILTINS = ("clear-coalesce", "wp-split-fused", "split-once", "enable-split-then-wp")


# -- wrong hooks: each breaks one rule ---------------------------------------------------------
def coalesce_any_run(m):
    """One range per run of non-zero words, from the first set bit of the
    first to the last set bit of the last: protects the pages between
    ranges too, whose bits the call did not clear."""
    n = api.nwords(m)
    base = api.first_word(m)
    j = 0
    while j < n:
        w = api.word(m, j)
        if w == 0:
            j += 1
            continue
        lo = (base + j) * 64 + api.ffs(w)
        hi = (base + j) * 64 + api.fls(w) + 1
        j += 1
        while j < n and api.word(m, j) != 0:
            hi = (base + j) * 64 + api.fls(api.word(m, j)) + 1
            j += 1
        shift = api.page_shift(m)
        start = (api.slot_base_gfn(m) + lo) << shift
        end = (api.slot_base_gfn(m) + hi) << shift
        api.wp_range(m, start, end)
        if api.manual_init_set(m):
            api.split_huge_pages(m, start, end)
    return 0


def protect_one_short(m):
    """enable_log_dirty_pt_masked that stops one page before the last set bit."""
    w = api.mask(m)
    shift = api.page_shift(m)
    base = api.slot_base_gfn(m) + api.gfn_offset(m)
    start = (base + api.ffs(w)) << shift
    end = (base + api.fls(w)) << shift
    if end > start:
        api.wp_range(m, start, end)
        if api.manual_init_set(m):
            api.split_huge_pages(m, start, end)
    return 0


def test_coalescing_across_gaps_without_declaring_it_fails_naming_the_page():
    v = Variant("coalesce-any", "wrong on purpose", mmu={"clear_dirty_log": coalesce_any_run},
                cache_differs=True)
    r = check_mmu_variant(v, examples=20)
    assert r.problems, "the check must catch protection vanilla does not do"
    assert "is write-protected where vanilla leaves it writable" in r.problems[0]
    assert "page 0x" in r.problems[0] and "step ('clear'" in r.problems[0]


def test_coalescing_across_gaps_declared_passes_and_counts_the_extra_faults():
    v = Variant("coalesce-any-declared", "protects more, and says so",
                mmu={"clear_dirty_log": coalesce_any_run}, cache_differs=True,
                extra_protection=True)
    r = check_mmu_variant(v, examples=6)
    assert r.problems == []
    # The pages protected in the gaps were still dirty (their bits set), so
    # their next write faults under the variant and not under vanilla.
    assert r.extra_faults > 0


def test_a_variant_that_leaves_a_page_writable_fails_naming_the_page():
    v = Variant("one-short", "wrong on purpose",
                mmu={"enable_log_dirty_pt_masked": protect_one_short})
    r = check_mmu_variant(v, examples=10)
    assert r.problems
    assert "is left writable, its dirty bit is clear and vanilla write-protected it" \
        in r.problems[0]
    assert "page 0x" in r.problems[0]


def enable_without_flush(m):
    """The enable path's write-protect without kvm_mmu_wp_memory_region's
    memslot flush: writable translations may stay in the TLBs."""
    shift = api.page_shift(m)
    start = api.slot_base_gfn(m) << shift
    api.wp_range(m, start, (api.slot_base_gfn(m) + api.slot_npages(m)) << shift)
    api.split_memory_region(m)
    return 0


def test_a_variant_that_leaves_stale_writable_translations_fails_under_the_tlb_model():
    v = Variant("no-flush", "wrong on purpose", mmu={"enable_log_dirty": enable_without_flush})
    r = check_mmu_variant(v, examples=20)
    assert r.problems and "kvm: tlbi_range differs: vanilla {None: 1}, no-flush {}" \
        in r.problems[0]
    # Claiming other maintenance lifts the exact-TLBI rule; the tables are
    # right, and the TLB model still sees the stale writable translations.
    v = Variant("no-flush", "wrong on purpose", mmu={"enable_log_dirty": enable_without_flush},
                same_maintenance=False)
    r = check_mmu_variant(v, examples=20)
    assert r.problems
    assert "TLB rule 2" in r.problems[0] and "no-flush" in r.problems[0]


def test_vanilla_passes_its_own_check():
    r = check_mmu_variant(VANILLA, examples=3)
    assert r.problems == [] and r.extra_faults == 0 and r.steps > 0


@pytest.mark.parametrize("name", BUILTINS + tuple(f"skip-levels+{n}" for n in BUILTINS))
def test_builtin_passes_the_check_on_both_engines(name):
    """Random KVM workloads and perf-test runs of every granule and backing,
    vanilla and the variant in lockstep, the reference and the fast engine
    compared after every step."""
    v = get(name)
    assert v.fast_capable
    r = check_mmu(v, examples=4)
    assert r.problems == []
    assert r.extra_faults == 0  # none of them protects more than vanilla
    assert r.workloads == 4 + 3 * 3 * 2


def test_each_builtin_says_its_kernel_change_in_a_docstring():
    from s2split.model.kvm import mmu_variants as MV
    for fn in (MV.clear_coalesce, MV.wp_split_fused, MV.split_once, MV.enable_split_then_wp):
        assert fn.__doc__ and fn.__doc__.split(".")[0].strip()
    for name in BUILTINS:
        assert get(name).description


# -- counts by hand ------------------------------------------------------------------------------
def _one_clear(variant, engine):
    """4K pages, one memslot of one 2M THP block at 1G, manual-protect with
    initially-set, chunk 2M: populate (one 2M block), enable logging (nothing
    done: initially-set), then one KVM_CLEAR_DIRTY_LOG of all 512 pages."""
    from s2split.engine import get_engine
    geom = Geometry(4096, 40)
    vm = get_engine(engine, None, variant).create_vm(geom, None, variant, 48)
    vm.set_eager_split_chunk_size(2 * MIB)
    vm.add_memslot(0, 1 << 30, 2 * MIB, parse_backing("anonymous_thp", 4096))
    vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS)
    vm.add_vcpu(1 << 30, 512, 1)
    vm.guest_pass(100, False)
    vm.set_memslot_flags(0, KVM_MEM_LOG_DIRTY_PAGES)
    vm.take_counts()
    vm.clear_dirty_log(0, 0, 512, [(1 << 64) - 1] * 8)
    return vm, vm.take_counts()


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_clear_coalesce_counts_by_hand(engine):
    """Vanilla: 8 words, 8 kvm_arch_mmu_enable_log_dirty_pt_masked calls,
    each one wrprotect walk of 64 pages (inside one 1G piece of
    stage2_apply_range) and one kvm_mmu_split_huge_pages call (one 2M chunk,
    one split walk): 8 wrprotect walks, 8 split calls. The cache's capacity
    is kvm_mmu_split_nr_page_tables(2M) = ceil(2M / 1G) + ceil(2M / 2M) = 2
    pages: the first call tops it up to 2 and its split takes one (the 2M
    block to 512 pages), the second finds 1 < 2 and tops up again (2 top-ups
    in all, 2 pages left), the other six find it full.
    clear-coalesce: bit 63 of each word and bit 0 of the next are set, so
    one run of 512 pages: one wrprotect walk, one split call, one top-up
    (1 page left), no per-word call. One memslot flush either way."""
    vv, van = _one_clear(VANILLA, engine)
    vm, cc = _one_clear(get("clear-coalesce"), engine)
    assert van.get("kvm", "log_dirty_masked") == 8
    assert van.get("wrprotect", "walks") == 8
    assert van.get("kvm", "split_huge_pages") == 8
    assert van.get("split", "walks") == 8
    assert van.get("kvm", "split_topups") == 2
    assert cc.get("kvm", "log_dirty_masked") == 0
    assert cc.get("wrprotect", "walks") == 1
    assert cc.get("kvm", "split_huge_pages") == 1
    assert cc.get("split", "walks") == 1
    assert cc.get("kvm", "split_topups") == 1
    assert van.get("kvm", "flush_memslot") == cc.get("kvm", "flush_memslot") == 1
    # The same split: one break of the 2M block (the level-3 ones are the
    # unlinked subtree's map walk, SKIP_BBM_TLBI), one TLBI for it.
    assert van.by_level(None, "bbm") == cc.by_level(None, "bbm")
    assert van.by_level("split", "bbm") == {2: 1}
    assert van.by_level(None, "tlbi_ipa") == cc.by_level(None, "tlbi_ipa")
    # The cache: vanilla topped up after the split, the variant did not.
    assert vv.split_cache_pages() == 2 and vm.split_cache_pages() == 1


def test_a_user_mmu_hook_runs_on_the_reference_engine_only():
    v = Variant("user-hook", "a user's hook", mmu={"clear_dirty_log": coalesce_any_run},
                extra_protection=True)
    assert not v.fast_capable
    from s2split.engine.vm import FastVM
    with pytest.raises(S2Error, match="MMU layer with a hook that is not built in"):
        FastVM(Geometry(4096, 40), None, v)


def test_bad_mmu_hooks_are_one_line_errors():
    with pytest.raises(S2Error, match="unknown MMU hook 'clear'"):
        Variant("x", "x", mmu={"clear": coalesce_any_run})
    with pytest.raises(S2Error, match="must be a function of one argument"):
        Variant("x", "x", mmu={"clear_dirty_log": lambda a, b: 0})
