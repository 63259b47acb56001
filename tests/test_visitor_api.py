"""Visitor variants written once with the visitor API: both engines, the
check, wrong visitors the check must catch, the bbml2 variants' counts, the
CPU feature they need, and a user's variant file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from s2split.arm64.arch import Geometry
from s2split.plumbing.errors import S2Error
from s2split.arm64.features import Features
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable import api_visitors as AV
from s2split.model.pgtable import visitor_api as api
from s2split.model.pgtable.memory import MemoryCache
from s2split.model.pgtable.stage2 import Stage2PageTable
from s2split.model.pgtable.variants import VANILLA, Variant, get
from s2split.arm64.pte import Prot
from s2split.tasks.variant_check import check_variant
from s2split.workload import PerfTestParams, run_perf_test

ROOT = Path(__file__).resolve().parent.parent
GIB, MIB = 1 << 30, 1 << 20
BBML2_CPU = Features(bbml2=True)


# -- wrong visitors: each breaks one rule --------------------------------------------------
def split_forgets_level1(ctx):
    """The split visitor, but level-1 blocks are left alone."""
    if api.level(ctx) == 1:
        return 0
    return AV.stage2_split_walker(ctx)


def split_without_break(ctx):
    """Makes the table over the live block: no break, no TLBI."""
    lv = api.level(ctx)
    old = api.old(ctx)
    if lv == api.LAST_LEVEL or not api.is_valid(old):
        return 0
    force_pte = api.split_force_pte(ctx, lv)
    if force_pte < 0:
        return force_pte
    child = api.create_unlinked(ctx, api.pte_to_phys(ctx, old), lv, api.pte_prot(old),
                                force_pte != 0)
    if child < 0:
        return child
    api.make(ctx, api.make_table(ctx, child))
    return 0


def split_replace_no_flush(ctx):
    """bbml2's split without its deferred range TLBI."""
    return AV.bbml2_split_walker(ctx)


def wrong_prot_split(ctx):
    """Replaces a block by a read-only table: not the same translation."""
    lv = api.level(ctx)
    old = api.old(ctx)
    if lv == api.LAST_LEVEL or not api.is_valid(old):
        return 0
    force_pte = api.split_force_pte(ctx, lv)
    if force_pte < 0:
        return force_pte
    child = api.create_unlinked(ctx, api.pte_to_phys(ctx, old), lv, 1, force_pte != 0)
    if child < 0:
        return child
    api.replace(ctx, api.make_table(ctx, child))
    return 0


def test_a_split_visitor_that_forgets_level1_fails_the_check_naming_address_and_level():
    v = Variant("forgets-l1", "wrong on purpose", visitors={"split": split_forgets_level1})
    problems = check_variant(v, examples=25)
    # The first fixed example: the level-1 block at 1G, split in part to pages.
    assert problems
    assert "final tables differ at IPA 0x40000000, level 1: vanilla has a level-3 page " \
        "(read-only), the variant a level-1 block (read-only): left unsplit" in problems[0]


def test_a_make_without_break_fails_the_check_naming_address_and_level():
    v = Variant("no-break", "wrong on purpose", visitors={"split": split_without_break})
    problems = check_variant(v, examples=5)
    assert len(problems) == 1
    assert "make at IPA 0x" in problems[0] and ", level " in problems[0]
    assert "no break before it" in problems[0]


def test_replace_needs_bbml2_and_the_same_translation():
    no_cpu = Variant("replace-no-cpu", "wrong on purpose", visitors={"split": AV.bbml2_split_walker},
                     after_walk={"split": AV.bbml2_flush_split}, same_maintenance=False)
    problems = check_variant(no_cpu, examples=5)
    assert len(problems) == 1 and "without FEAT_BBM level 2" in problems[0]
    wrong = Variant("replace-ro", "wrong on purpose", visitors={"split": wrong_prot_split},
                    requires=("bbml2",), same_maintenance=False)
    problems = check_variant(wrong, examples=5)
    assert len(problems) == 1 and "translates differently" in problems[0]
    assert "at IPA 0x" in problems[0] and "level " in problems[0]


def test_a_split_without_break_or_flush_leaves_stale_translations():
    v = Variant("no-flush", "wrong on purpose", visitors={"split": split_replace_no_flush},
                requires=("bbml2",), same_maintenance=False)
    problems = check_variant(v, examples=10)
    assert problems and "invalidates nothing" in problems[0] and "split(" in problems[0]


def test_bbml2_passes_the_check():
    assert check_variant(get("bbml2"), examples=10) == []


# -- the bbml2 counts, by hand -------------------------------------------------------------
def _split_one_block(variant, features, level_size, tlbirange=True):
    geom = Geometry(4096, 40)
    feats = Features(**{**features.as_dict(), "tlbirange": tlbirange, "bbml2": True})
    pgt = Stage2PageTable(geom, feats, variant=variant)
    mc = MemoryCache(pgt.mem)
    mc.topup(16, 4)
    assert pgt.map(GIB, level_size, GIB, Prot.RW, mc) == 0
    pgt.tally.reset()
    cache = MemoryCache(pgt.mem)
    cache.topup(2, 2)
    assert pgt.split(GIB, level_size, cache) == 0
    return pgt, pgt.tally.take()


@pytest.mark.parametrize("vhe", [True, False])
@pytest.mark.parametrize("tlbirange", [True, False])
def test_bbml2_split_of_one_2m_block_counts_by_hand(vhe, tlbirange):
    """One kvm_pgtable_stage2_split() over one 2M block (4K granule).

    vanilla: the break writes LOCKED (1 PTE write at level 2), one by-IPA TLBI
    at level 2 (its hyp call: VHE 1 DSB ISHST + 2 DSB ISH + 4 ISB; nVHE 1
    hyp call, 1 + 2 DSB ISH, 3 ISB), the make writes the table (1 more PTE
    write), then the DSB ISHST ending kvm_pgtable_stage2_split.
    bbml2: one PTE write (the table over the block), no BBM; after the walk
    one kvm_tlb_flush_vmid_range over [1G, 1G + 2M): 512 pages. With
    TLBIRANGE, 512 = (7 + 1) << (5 * 1 + 1), one range op at scale 1, in one
    hyp call (the same barriers as a by-IPA call); without, one whole-VMID
    flush (VHE: 1 DSB ISHST, 1 DSB ISH, 4 ISB; nVHE: 1 call, 1 + 1 DSB ISH,
    3 ISB). Plus the same ending DSB ISHST.
    """
    feats = Features(vhe=vhe)
    _, van = _split_one_block(VANILLA, feats, 2 * MIB, tlbirange)
    _, bb = _split_one_block(get("bbml2"), feats, 2 * MIB, tlbirange)
    assert van.by_level("split", "pte_write") == {2: 2}
    assert van.by_level("split", "bbm") == {2: 1}
    assert van.by_level("split", "tlbi_ipa") == {2: 1}
    assert bb.by_level("split", "pte_write") == {2: 1}
    assert bb.by_level("split", "bbm") == {}
    assert bb.by_level("split", "tlbi_ipa") == {}
    hyp = 0 if vhe else 1
    if tlbirange:
        assert bb.get("split", "flush_range") == 1
        assert bb.get("split", "flush_range_bytes") == 2 * MIB
        assert bb.get("split", "tlbi_range") == 1
        assert bb.get("split", "tlbi_range_pages") == 512
        assert bb.get("split", "tlbi_range_ops") == 1
        assert bb.get("split", "tlbi_vmid") == 0
        body_dsb = 2
    else:
        assert bb.get("split", "flush_range") == 1
        assert bb.get("split", "tlbi_range") == 0
        assert bb.get("split", "tlbi_vmid") == 1
        body_dsb = 1
    assert bb.get("split", "dsb_ishst") == (1 if vhe else 0) + 1
    assert bb.get("split", "dsb_ish") == body_dsb + (0 if vhe else 1)
    assert bb.get("split", "isb") == (4 if vhe else 3)
    assert bb.get("split", "hyp_call") == hyp
    # vanilla's by-IPA call has the same barriers as bbml2's range call.
    assert van.get("split", "dsb_ishst") == (1 if vhe else 0) + 1
    assert van.get("split", "dsb_ish") == 2 + (0 if vhe else 1)
    assert van.get("split", "isb") == (4 if vhe else 3)
    # Building the subtree is the same work in both.
    assert bb.by_level("create_unlinked", "pte_write") == van.by_level("create_unlinked",
                                                                       "pte_write")


def test_bbml2_flushes_once_per_split_call_over_the_span_it_split():
    """Splitting a 1G block (4K) with 512 pages in the split cache (513 would
    build it complete): one page of level-2 blocks (1 replace at level 1),
    then the walker descends and splits level-2 blocks, one page each, until
    the cache is empty: 511 replaces at level 2, then -ENOMEM. The hook runs
    whatever the walk returned: one range flush over the 1G block, 262144
    pages = (7 + 1) << (5 * 3 + 1), one range op at scale 3."""
    geom = Geometry(4096, 40)
    pgt = Stage2PageTable(geom, BBML2_CPU, variant=get("bbml2"))
    mc = MemoryCache(pgt.mem)
    mc.topup(16, 4)
    pgt.map(GIB, GIB, GIB, Prot.RW, mc)
    pgt.tally.reset()
    cache = MemoryCache(pgt.mem)
    cache.topup(512, 512)
    assert pgt.split(GIB, GIB, cache) == -12
    c = pgt.tally.take()
    assert c.by_level("split", "pte_write") == {1: 1, 2: 511}
    assert c.get("split", "flush_range") == 1
    assert c.get("split", "flush_range_bytes") == GIB
    assert c.get("split", "tlbi_range_pages") == GIB >> 12
    assert c.get("split", "tlbi_range_ops") == 1
    assert c.total("bbm", ["split"]) == 0
    assert not pgt.check_invariants()


# -- the CPU feature ------------------------------------------------------------------------
def test_bbml2_variants_refuse_a_cpu_without_the_feature():
    with pytest.raises(S2Error, match=r"needs the CPU feature bbml2.*--cpu \+bbml2"):
        Stage2PageTable(Geometry(4096, 40), Features(), variant=get("skip-levels+bbml2"))
    assert get("skip-levels+bbml2").requires == ("bbml2",)
    assert Features.parse("+bbml2,-fwb") == Features(fwb=False, bbml2=True)
    assert Features().spec() == "vhe,fwb,tlbirange,dic"  # unchanged without bbml2
    assert Features(bbml2=True).spec() == "vhe,fwb,tlbirange,dic,bbml2"


def test_perf_test_without_the_feature_is_one_line_and_status_2():
    r = subprocess.run([sys.executable, "-m", "s2split", "perf-test", "-b", "4M", "-g",
                        "--variant", "bbml2", "--engine", "reference"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "needs the CPU feature bbml2" in r.stderr
    assert "Traceback" not in r.stderr


# -- both engines ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bbml2", "skip-levels+bbml2"])
@pytest.mark.parametrize("backing,manual", [("anonymous_thp", False), ("anonymous_hugetlb", True)])
def test_engines_agree_on_bbml2_and_tables_equal_vanilla(name, backing, manual):
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing=backing, mode=parse_mode(6),
                       chunk_size=2 * MIB, manual_protect=manual, features=BBML2_CPU)
    ref = run_perf_test(p, get(name), "reference", keep_tables=True)
    fast = run_perf_test(p, get(name), "fast", keep_tables=True)
    van = run_perf_test(p, VANILLA, "reference", keep_tables=True)
    assert ref.tables == fast.tables == van.tables
    for (n, a), (_, b) in zip(ref.phases, fast.phases):
        assert a.to_dict() == b.to_dict(), n


def test_a_visitor_numba_cannot_compile_is_one_line(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text(textwrap.dedent('''
        from s2split.model.pgtable import visitor_api as api
        from s2split.model.pgtable.variants import Variant, register

        def bad_split(ctx):
            return len({api.level(ctx): "a dict"})

        register(Variant("bad", "does not compile", visitors={"split": bad_split}))
    '''))
    r = subprocess.run([sys.executable, "-m", "s2split", "--variants", str(f), "perf-test",
                        "-b", "4M", "--variant", "bad", "--engine", "fast"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "bad.py" in line and "bad_split" in line and "numba cannot compile" in line


# -- the README's example, as printed ---------------------------------------------------------
def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Writing a visitor")
    block = text[text.index("```python", start) + len("```python"):]
    return block[:block.index("```")]


def test_readme_visitor_example_runs_on_both_engines(tmp_path):
    f = tmp_path / "my_visitors.py"
    f.write_text(_readme_example())
    env = {**os.environ, "S2SPLIT_VARIANTS": str(f)}
    out = {}
    for engine in ("reference", "fast"):
        r = subprocess.run([sys.executable, "-m", "s2split", "perf-test", "-b", "8M", "-s",
                            "anonymous_thp", "-g", "--chunk-size", "2M", "--cpu", "+bbml2",
                            "--variant", "bbml2-eager", "--engine", engine, "--json"],
                           capture_output=True, text=True, cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr
        out[engine] = json.loads(r.stdout)["variants"]["bbml2-eager"]
        assert out[engine]["engine"] == engine
    assert out["reference"]["phases"] == out["fast"]["phases"]
    r = subprocess.run([sys.executable, "-m", "s2split", "variants", "--check", "bbml2-eager",
                        "--examples", "5"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the matrix commands and explain -------------------------------------------------------
def test_reproduce_refuses_bbml2_without_the_feature_before_any_work(tmp_path):
    db = tmp_path / "r.sqlite"
    r = subprocess.run([sys.executable, "-m", "s2split", "reproduce", "--size", "64M",
                        "--granule", "4K", "--backing", "thp", "--variant", "bbml2",
                        "--db", str(db)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "needs the CPU feature bbml2" in r.stderr and not db.exists()


def test_explain_puts_bbml2_saving_in_tlb_maintenance_not_walks():
    from s2split.estimate.cost import load_profile
    from s2split.tasks.explain import sentences
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", mode=parse_mode(6),
                       chunk_size=2 * MIB, manual_protect=False, features=BBML2_CPU)
    phases = {v: dict(run_perf_test(p, get(v), "reference").phases)
              for v in ("vanilla", "bbml2")}
    base, other = phases["vanilla"]["enable_dirty_logging"], phases["bbml2"]["enable_dirty_logging"]
    text = " ".join(sentences("this ioctl", base, other, load_profile("server-vhe"), "bbml2"))
    # 8M of THP: 4 blocks, one 2M chunk each: 4 by-IPA TLBIs become 4 range TLBIs
    # (one more range flush is the write-protect's, in both), 4 fewer BBMs.
    assert "TLB maintenance and barriers" in text and "the walks are unchanged" in text
    assert "tlbi_ipa 4 -> 0" in text and "tlbi_range 1 -> 5" in text
    assert "entries" not in text.split("The saving")[0].split("saves")[-1]


# -- user visitors of the operations the fast engine batches ---------------------------------
S2AP_W_BIT = 1 << 7  # S2AP[1], the write permission of a stage-2 descriptor


def relax_with_isb_on_even_pages(ctx):
    """Write permission back, plus an ISB on even pages only: a visitor whose
    work depends on the address, so no fault can stand for another's."""
    if api.level(ctx) == api.LAST_LEVEL and api.is_valid(api.old(ctx)):
        if (api.addr(ctx) >> 12) & 1 == 0:
            api.isb(ctx)
        api.write(ctx, api.old(ctx) | S2AP_W_BIT)
    return 0


def unmap_that_only_counts(ctx):
    """Clears nothing, counts a DSB ISH per level-3 entry it is shown."""
    if api.level(ctx) == api.LAST_LEVEL:
        api.dsb_ish(ctx)
    return 0


@pytest.mark.parametrize("op,fn", [("relax_perms", relax_with_isb_on_even_pages),
                                   ("unmap", unmap_that_only_counts)])
def test_user_visitors_are_called_where_the_fast_engine_batches_built_in_ones(op, fn):
    # relax_perms: the guest's dirtying passes replay one recorded fault per
    # class over whole level-3 tables; unmap: teardown clears level-3 runs in
    # one loop under FWB + TLBIRANGE. Neither shortcut may stand in for a
    # user's visitor: the reference engine calls it for every entry, and the
    # fast engine must count the same (its ISBs on even pages only, its DSBs
    # per entry).
    p = PerfTestParams(vcpu_memory_bytes=4 * MIB, backing="anonymous", mode=parse_mode(6),
                       manual_protect=False, iterations=2)
    v = Variant(f"user-{op}", "test", visitors={op: fn})
    ref = run_perf_test(p, v, "reference", keep_tables=True)
    fast = run_perf_test(p, v, "fast", keep_tables=True)
    assert ref.tables == fast.tables
    for (n, a), (_, b) in zip(ref.phases, fast.phases):
        assert a.to_dict() == b.to_dict(), n
