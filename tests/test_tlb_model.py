"""The TLB model (s2split.model.pgtable.tlb_model) and the TLB rules of `variants --check`.

Each wrong variant below breaks exactly one of the four rules and must be
reported by it, naming the IPA and level; vanilla, every built-in variant and
the two-phase batched split must pass.
"""
import subprocess
import sys
from dataclasses import replace

import pytest

from s2split.arm64 import rules as R
from s2split.arm64.arch import Geometry
from s2split.plumbing.errors import S2Error
from s2split.arm64.features import Features
from s2split.model.kvm import dirty_log
from s2split.model.kvm.backing import parse_backing
from s2split.model.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from s2split.model.kvm.vm import VM
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable import api_visitors as AV
from s2split.model.pgtable import stage2 as S2
from s2split.model.pgtable import tlb, tlb_model
from s2split.model.pgtable import visitor_api as api
from s2split.model.pgtable.memory import MemoryCache
from s2split.model.pgtable.stage2 import Stage2PageTable
from s2split.model.pgtable.variants import VANILLA, Variant, get
from s2split.model.pgtable.walker import SKIP_BBM_TLBI, TABLE_POST
from s2split.arm64.pte import Prot
from s2split.tasks.variant_check import Op, apply_ops, check_variant
from s2split.workload import PerfTestParams, run_perf_test

MIB, GIB = 1 << 20, 1 << 30
G4 = Geometry(4096, 40)


# -- wrong variants, one per rule --------------------------------------------------------
def flush_walk_range(ctx):
    """After the split walk: one range TLBI over the walk's range."""
    api.tlbi_range(ctx, api.walk_start(ctx), api.walk_end(ctx) - api.walk_start(ctx))
    return 0


#: Rule 1: the split's break without its TLBI, the range flushed once after the walk.
NO_BBM_TLBI = Variant("nobbm-flush-after", "wrong on purpose",
                      walk_flags={"split": SKIP_BBM_TLBI},
                      after_walk={"split": flush_walk_range}, same_maintenance=False)


def split_wrong_hint(ctx):
    """Breaks the block without the walk's TLBI, then invalidates it by IPA
    with the level hint of the block's children."""
    lv = api.level(ctx)
    old = api.old(ctx)
    if lv == api.LAST_LEVEL or not api.is_valid(old):
        return 0
    child, _ = AV.new_subtree(ctx, lv, old)
    if child < 0:
        return child
    api.try_break(ctx)
    api.tlbi_ipa(ctx, lv + 1)
    api.make(ctx, api.make_table(ctx, child))
    return 0


#: Rule 4: a TLBI whose level hint misses the broken block.
WRONG_HINT = Variant("wrong-hint", "wrong on purpose", walk_flags={"split": SKIP_BBM_TLBI},
                     visitors={"split": split_wrong_hint}, same_maintenance=False)


def unmap_free_first(w, pfn, table, idx, old, level, visit):
    """The unmap visitor, but an empty table's entry is cleared and its page
    freed before the TLBI (the reference engine's seven-argument form: the
    visitor API has no way to drop a reference)."""
    pgt = w.pgt
    if visit != TABLE_POST or not S2.P.is_table(old, level):
        return S2._unmap_visitor(w, pfn, table, idx, old, level, visit)
    child = pgt.mem.pfn(pgt.pte_to_phys(old))
    if pgt.mem.refcount[child] != 1:
        return 0
    ipa = pgt.tracer.entry_ipa(table, idx) if pgt.tracer is not None else 0
    pgt._set(w, table, idx, old, 0, level)
    pgt._put_page(w.c, pfn, level)
    pgt._put_page(w.c, child, level + 1)  # freed here ...
    tlb.flush_vmid_ipa(w.c, pgt.features, None, pgt.tracer, ipa)  # ... invalidated here
    return 0


#: Rule 3: a table page freed before its entry is invalidated.
FREE_FIRST = Variant("free-first", "wrong on purpose", visitors={"unmap": unmap_free_first})


def batched_swapped(ctx):
    """The batched split's phase two in the wrong order: make, then flush."""
    api.make_deferred(ctx)
    return AV.batched_flush_make(ctx)


SWAPPED = Variant("batched-swapped", "wrong on purpose", walk_flags={"split": SKIP_BBM_TLBI},
                  visitors={"split": AV.batched_split_walker},
                  after_walk={"split": batched_swapped}, same_maintenance=False)


def test_skipping_the_bbm_tlbi_and_flushing_after_the_walk_fails_rule_1():
    problems = check_variant(NO_BBM_TLBI, examples=5)
    # The fixed example: the level-1 block at 1G is split in part (2-page cache);
    # its break (LOCKED) and the make of its table come with no TLBI between.
    assert len(problems) == 1
    assert "TLB rule 1 (break-before-make): block at IPA 0x40000000 level 1 broken at " \
        "event" in problems[0]
    assert "table made at event" in problems[0]
    assert "FEAT_BBM level 2 not present" in problems[0]
    # The check's other rules let it through: it invalidates in every call.
    assert "invalidates nothing" not in problems[0]


def test_a_wrong_level_hint_fails_rule_4():
    problems = check_variant(WRONG_HINT, examples=5)
    assert len(problems) == 1
    # The level-1 block at 1G, invalidated with hint 2.
    assert "TLB rule 4 (TLBI level hint): TLBI at IPA 0x40000000 with level hint 2" in problems[0]
    assert "is at level 1" in problems[0]


def test_freeing_a_table_before_invalidating_fails_rule_3():
    # One page mapped at 2M makes a level-3 table under the level-2 entry of
    # [2M, 4M); unmapping the page empties it, and the unmap frees it.
    ops = [Op("map", 2 * MIB, 4096, (1 << 44) + 2 * MIB), Op("unmap", 2 * MIB, 4096)]
    pgt, _, _ = apply_ops(G4, FREE_FIRST, ops, tlb=True)
    findings = tlb_model.attached(pgt).findings
    assert findings and findings[0].rule == 3
    assert "table entry at IPA 0x200000 level 2 pointing to it" in str(findings[0])
    # Vanilla does the same work in the right order.
    pgt, _, _ = apply_ops(G4, VANILLA, ops, tlb=True)
    assert tlb_model.attached(pgt).findings == []
    # And `variants --check` reports it on its random workloads.
    problems = check_variant(FREE_FIRST, examples=25)
    assert problems and "TLB rule 3 (freed table)" in problems[0]


def _vm(manual: bool):
    vm = VM(G4)
    model = tlb_model.attach(vm)
    if manual:
        vm.enable_cap(168, 3)
    vm.add_memslot(1, GIB, 4 * MIB, parse_backing("anonymous_thp", 4096))
    vm.add_vcpu(GIB, 4 * MIB // 4096, 0)
    vm.guest_pass(100, False)
    return vm, model


def test_write_protecting_with_the_tlbi_deferred_past_the_ioctl_fails_rule_2(monkeypatch):
    vm, model = _vm(manual=False)
    vm.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
    vm.guest_pass(100, False)  # every page written: writable again, dirty
    assert model.findings == []
    # KVM_GET_DIRTY_LOG write-protects every dirty page; this "variant" flushes
    # the memslot only after the ioctl has returned.
    deferred = []
    monkeypatch.setattr(dirty_log, "kvm_flush_remote_tlbs_memslot",
                        lambda vm, slot: deferred.append(slot))
    vm.get_dirty_log(1)
    assert deferred
    f = model.findings[0]
    assert f.rule == 2 and f.level == 3 and f.ipa == GIB  # the first page of the slot
    assert str(f).startswith("TLB rule 2 (dirty tracking): KVM_GET_DIRTY_LOG returned at "
                             "event")
    assert "writable page at IPA 0x40000000 level 3" in str(f)


def test_vanilla_dirty_logging_ioctls_pass(monkeypatch):
    for manual in (False, True):
        vm, model = _vm(manual)
        vm.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
        vm.guest_pass(100, False)
        bitmap = vm.get_dirty_log(1)
        if manual:
            vm.clear_dirty_log(1, 0, 1024, bitmap)
        vm.delete_memslot(1)
        vm.destroy()
        assert model.findings == []


def test_the_batched_split_passes_and_with_its_phases_swapped_fails_rule_1():
    assert check_variant(get("split-batched-tlbi"), examples=10) == []
    problems = check_variant(SWAPPED, examples=5)
    assert problems and "TLB rule 1 (break-before-make)" in problems[0]


@pytest.mark.parametrize("name", ["vanilla", "skip-levels", "skip-children",
                                  "skip-levels+skip-children", "return-hints", "bbml2",
                                  "skip-levels+bbml2"])
def test_built_in_variants_pass_under_the_tlb_model(name):
    assert check_variant(get(name), examples=10) == []


# -- the model's own rules, by hand --------------------------------------------------------
def _block(features=Features()):
    pgt = Stage2PageTable(G4, features)
    mc = MemoryCache(pgt.mem)
    mc.topup(16, 4)
    assert pgt.map(GIB, 2 * MIB, GIB, Prot.RW, mc) == 0
    return pgt, tlb_model.attach(pgt)


def _break(pgt, model, ipa=GIB, level=2):
    """Break the block at ``ipa`` by hand, with no TLBI: the entry goes invalid."""
    g = G4.granule_size(level)
    for _, tl, base, entries in pgt.tables():
        if tl == level and base <= ipa < base + pgt.ptrs * g:
            idx = (ipa - base) // g
            model.write(entries, idx, level, entries[idx], 0)
            entries[idx] = 0
            return
    raise AssertionError(f"no level-{level} table holds {ipa:#x}")


def test_a_tlbi_removes_only_after_a_dsb_ish_and_only_its_level():
    pgt, model = _block()
    _break(pgt, model)
    assert model._stale_in(GIB, GIB + 1)
    model.tlbi_ipa(GIB, 2)
    model.dsb("ishst")  # completes no TLBI
    model.dsb("nsh")
    assert [s for s in model._stale_in(GIB, GIB + 1) if s.s2]
    model.dsb("ish")
    # the stage-2 entry is gone; the combined one waits for VMALLE1IS
    assert [s.s2 for s in model._stale_in(GIB, GIB + 1)] == [False]
    model.tlbi_s1()
    model.dsb("ish")
    assert list(model._stale_in(GIB, GIB + 1)) == []
    # A hint of the wrong level removes nothing (and is rule 4).
    pgt, model = _block()
    _break(pgt, model)
    model.hyp_flush_ipa(GIB + 4096, 3)
    assert [s.level for s in model._stale_in(GIB, GIB + 1) if s.s2] == [2]
    assert model.findings[0].rule == 4


def test_a_range_tlbi_removes_only_the_pages_its_encoding_covers():
    pgt, model = _block()
    _break(pgt, model)
    # A range flush of [1G + 2M, 1G + 4M) does not touch the block at [1G, 1G + 2M).
    model.hyp_flush_range(GIB + 2 * MIB, 512)
    assert [s for s in model._stale_in(GIB, GIB + 1) if s.s2]
    # One page of the block in range: the whole block entry goes.
    model.hyp_flush_range(GIB + 2 * MIB - 4096, 1)
    assert list(model._stale_in(GIB, GIB + 1)) == []


@pytest.mark.parametrize("pages,start,align", [(512, 0, 0), (1, 7, 0), (3, 5, 16),
                                               (513, 1 << 18, 0), (65537, 3, 0),
                                               (R.MAX_TLBI_RANGE_PAGES, 0, 16)])
def test_range_tlbi_pieces_cover_the_range_op_by_op(pages, start, align):
    pieces = R.range_tlbi_pieces(pages, start, align)
    assert len(pieces) == R.range_tlbi_ops(pages, start, align)
    addr = start
    for first, n in pieces:
        assert first == addr and n >= 1
        addr += n
    assert addr == start + pages


def test_no_model_no_events():
    pgt = Stage2PageTable(G4)
    assert pgt.tracer is None and pgt.mem.tracer is None
    model = tlb_model.attach(pgt)
    assert tlb_model.attached(pgt) is model
    tlb_model.detach(pgt)
    mc = MemoryCache(pgt.mem)
    mc.topup(16, 4)
    pgt.map(GIB, 2 * MIB, GIB, Prot.RW, mc)
    assert model.n == 0


# -- the two-phase API ----------------------------------------------------------------------
def split_defers_never_makes(ctx):
    """Breaks and defers like the batched split, with no hook to make them."""
    return AV.batched_split_walker(ctx)


def test_deferred_makes_must_be_made_and_only_after_a_break():
    never = Variant("never-made", "wrong on purpose", walk_flags={"split": SKIP_BBM_TLBI},
                    visitors={"split": split_defers_never_makes}, same_maintenance=False)
    with pytest.raises(S2Error, match="broken with defer_make were never made"):
        apply_ops(G4, never, [Op("map", GIB, GIB, (1 << 44) + GIB), Op("split", GIB, GIB, 513)])

    def defer_live(ctx):
        if api.level(ctx) < api.LAST_LEVEL and api.is_valid(api.old(ctx)):
            api.defer_make(ctx, api.old(ctx))
        return 0

    live = Variant("defer-live", "wrong on purpose", visitors={"split": defer_live})
    problems = check_variant(live, examples=1)
    assert len(problems) == 1 and "defer_make at IPA 0x40000000, level 1 over a live entry" \
        in problems[0]


def user_batched_walker(ctx):
    """The batched split's phase one as a user's visitor (compiled through its
    address on the fast engine, not the built-in id)."""
    return AV.batched_split_walker(ctx)


def user_batched_hook(ctx):
    """... and its phase two."""
    return AV.batched_flush_make(ctx)


USER_BATCHED = Variant("user-batched", "split-batched-tlbi as a user's visitor and hook",
                       walk_flags={"split": SKIP_BBM_TLBI},
                       visitors={"split": user_batched_walker},
                       after_walk={"split": user_batched_hook}, same_maintenance=False)


@pytest.mark.parametrize("variant", [get("split-batched-tlbi"), USER_BATCHED],
                         ids=["built-in", "user"])
@pytest.mark.parametrize("chunk", [2 * MIB, GIB])
def test_the_fast_engine_runs_the_batched_split_as_the_reference_does(variant, chunk):
    # Both chunk sizes: 2M defers one block per call, 1G up to 512 (the
    # deferred region's bound, engine/vm.py's deferred_rows); the tables
    # must also be vanilla's, and vanilla's counts must differ (the batched
    # split really ran: no by-IPA TLBIs at level 2 in the split).
    assert variant.fast_capable and variant.defers
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", mode=parse_mode(6),
                       chunk_size=chunk, manual_protect=False)
    ref = run_perf_test(p, variant, "reference", keep_tables=True)
    fast = run_perf_test(p, variant, "fast", keep_tables=True)
    van = run_perf_test(p, VANILLA, "fast", keep_tables=True)
    assert ref.tables == fast.tables == van.tables
    for (n, a), (_, b) in zip(ref.phases, fast.phases):
        assert a.to_dict() == b.to_dict(), n
    split = dict(fast.phases)["enable_dirty_logging"]
    vsplit = dict(van.phases)["enable_dirty_logging"]
    assert split.by_level("split", "tlbi_ipa").get(2, 0) == 0
    assert vsplit.by_level("split", "tlbi_ipa").get(2, 0) > 0


def test_the_fast_engine_refuses_what_the_reference_refuses_or_cannot_bound():
    p = PerfTestParams(vcpu_memory_bytes=4 * MIB, backing="anonymous_thp", mode=parse_mode(6),
                       chunk_size=2 * MIB, manual_protect=False)
    never = Variant("never-made", "wrong on purpose", walk_flags={"split": SKIP_BBM_TLBI},
                    visitors={"split": split_defers_never_makes}, same_maintenance=False)
    for engine in ("reference", "fast"):
        with pytest.raises(S2Error, match="broken with defer_make were never made"):
            run_perf_test(p, never, engine)

    # Write-protect deferring every page it breaks: one walk over a memslot
    # defers more entries than one split call can break (1 with 2M chunks),
    # the fast engine's bound; it refuses in one line.
    def wp_defers(ctx):
        old = api.old(ctx)
        if api.level(ctx) == api.LAST_LEVEL and api.is_valid(old) and api.try_break(ctx):
            api.defer_make(ctx, old)
        return 0

    def make_them(ctx):
        api.make_deferred(ctx)
        return 0

    many = Variant("wp-defers", "defers beyond a split's bound",
                   visitors={"wrprotect": wp_defers}, after_walk={"wrprotect": make_them},
                   same_maintenance=False)
    with pytest.raises(S2Error, match=r"^a walk deferred more than 1 entries with defer_make"):
        run_perf_test(replace(p, backing="anonymous"), many, "fast")


def test_the_batched_split_counts_by_hand():
    # One 1G chunk holding two 2M blocks (4K, VHE, TLBIRANGE), split with a full
    # cache: vanilla breaks each with one by-IPA TLBI at level 2; the batched split
    # breaks both (LOCKED writes, no TLBI), then one range flush of [1G, 1G + 4M):
    # 1024 pages = one range op (scale 1, num 15: (15 + 1) << 6), then two makes.
    def run(name):
        pgt = Stage2PageTable(G4, variant=get(name))
        mc = MemoryCache(pgt.mem)
        mc.topup(16, 4)
        assert pgt.map(GIB, 4 * MIB, GIB, Prot.RW, mc) == 0
        pgt.tally.reset()
        cache = MemoryCache(pgt.mem)
        cache.topup(4, 4)
        assert pgt.split(GIB, 4 * MIB, cache) == 0
        return pgt, pgt.tally.take()

    p0, c0 = run("vanilla")
    p1, c1 = run("split-batched-tlbi")
    assert p0.dump() == p1.dump()
    assert c0.by_level(None, "tlbi_ipa") == {2: 2} and c0.total("tlbi_range") == 0
    assert c1.by_level(None, "tlbi_ipa") == {} and c1.total("tlbi_range") == 1
    assert c1.total("tlbi_range_pages") == 1024 and c1.total("tlbi_range_ops") == 1
    assert c1.by_level("split", "pte_write") == c0.by_level("split", "pte_write") == {2: 4}
    assert c1.by_level(None, "bbm") == c0.by_level(None, "bbm")
    assert c1.by_level("split", "bbm") == {2: 2}
    # vanilla walks both new level-3 tables (2 x 512 reads); the batched split does not
    assert c0.by_level("split", "read_leaf")[3] == 1024
    assert c1.by_level("split", "read_leaf").get(3, 0) == 0
