"""Linux 7.3 and the kernel-rules table (arm64/versions.py): one test per rule that
differs between the modelled kernels, the AC04_CPU_23 erratum, the selftest's
teardown and mode numbering, and fidelity's reading of kernel_release."""

import dataclasses

import numpy as np
import pytest

from s2split.counting.counters import KIND, NKINDS, NOLEVEL, SLOTS
from s2split.plumbing.errors import EAGAIN, S2Error
from s2split.arm64.features import Features
from s2split.counting.kernel_counters import kernel_counts
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable import tlb
from s2split.model.pgtable.variants import VANILLA
from s2split.arm64.versions import (DEFAULT_KERNEL, KERNELS, kernel_for_release, kernel_rules,
                                    nearest_kernel)
from s2split.workload import PerfTestParams, run_perf_test

MIB = 1 << 20
ERRATUM = Features(ampere_ac04_cpu_23=True)


def test_default_kernel_is_7_3_and_every_entry_is_complete():
    assert DEFAULT_KERNEL == "7.3"
    for name, r in KERNELS.items():
        assert r.version == name
        assert r.destroy_functions[0].startswith("kvm_pgtable_stage2_destroy")
        # chunked teardown and the 6.17+ names come together
        assert r.chunked_destroy == (r.destroy_pgd_function is not None)


# -- teardown names and counts ---------------------------------------------------------------

def _destroy(kernel, engine="reference"):
    from test_versions import destroy_counts
    return destroy_counts(engine, kernel)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_teardown_names_and_counts_per_kernel(engine):
    # 4K pages, 40-bit IPA: one walk in 6.12; 2^40 / 1G (the level-1 granule,
    # KVM_PGTABLE_MIN_BLOCK_LEVEL on 4K) = 1024 destroy_range walks and one
    # destroy_pgd since 6.17.
    k612 = kernel_counts(_destroy("6.12", engine), kernel_rules("6.12"))
    assert k612["kvm_pgtable_stage2_destroy"]["calls"] == 1
    assert "kvm_pgtable_stage2_destroy_range" not in k612
    for kernel in ("6.19", "7.3"):
        k = kernel_counts(_destroy(kernel, engine), kernel_rules(kernel))
        assert "kvm_pgtable_stage2_destroy" not in k
        assert k["kvm_pgtable_stage2_destroy_range"]["calls"] == 1 << (40 - 30)
        assert k["kvm_pgtable_stage2_destroy_range"]["detail"]["all"]["size"] == 1 << 40
        assert k["kvm_pgtable_stage2_destroy_pgd"]["calls"] == 1
        assert k["kvm_pgtable_walk"]["detail"]["cb=stage2_free_walker"]["hitcount"] == 1024


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_free_walker_of_7_3_clears_the_emptied_table_entry(engine):
    # The 6.19+ free walker: the one level-2 table, emptied by putting its 32
    # blocks, is freed and its level-1 entry cleared: one PTE write that 6.12
    # does not make (see test_versions for the full derivation).
    assert _destroy("7.3", engine).op_total("destroy", "pte_write") == 1
    assert _destroy("6.12", engine).op_total("destroy", "pte_write") == 0


# -- the AC04_CPU_23 erratum -----------------------------------------------------------------

def _events(fn, features, *args):
    c = [0] * (NKINDS * SLOTS)
    fn(c, features, *args)
    return {k: c[KIND[k] * SLOTS + NOLEVEL] for k in ("dsb_nsh", "isb", "dsb_ish", "hyp_call")}


# enter_vmid_context() clears HCR_EL2.TGE and exit_vmid_context() restores it
# (hyp/vhe/tlb.c): two write_sysreg_hcr() per call, each DSB NSH; MSR; ISB
# with the workaround. hyp/nvhe/tlb.c never writes HCR_EL2.
@pytest.mark.parametrize("fn,args", [
    (tlb.flush_vmid_ipa, (2,)), (tlb.flush_vmid_ipa_nsh, (3,)), (tlb.flush_vmid, ()),
    (tlb.flush_vmid_range, (0, 1 << 30, 12))], ids=["ipa", "ipa_nsh", "vmid", "range"])
def test_erratum_adds_two_dsb_nsh_and_two_isb_per_vhe_tlb_call(fn, args):
    base = _events(fn, Features(), *args)
    err = _events(fn, ERRATUM, *args)
    assert {k: err[k] - base[k] for k in base} == {"dsb_nsh": 2, "isb": 2, "dsb_ish": 0,
                                                   "hyp_call": 0}
    nvhe = dataclasses.replace(ERRATUM, vhe=False)
    assert _events(fn, nvhe, *args) == _events(fn, Features(vhe=False), *args)


def _run(features, kernel, engine, **kw):
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", chunk_size=2 * MIB,
                       mode=parse_mode(6), features=features, kernel=kernel, **kw)
    return run_perf_test(p, VANILLA, engine)


def _tlb_calls(c):
    return sum(c.total(k) for k in ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_vmid"))


@pytest.mark.parametrize("vhe", [True, False])
def test_erratum_on_both_engines_per_phase(vhe):
    feats = dataclasses.replace(ERRATUM, vhe=vhe)
    ref = _run(feats, "7.3", "reference")
    fast = _run(feats, "7.3", "fast")
    plain = _run(Features(vhe=vhe), "7.3", "reference")
    for (name, a), (_, b), (_, p) in zip(ref.phases, fast.phases, plain.phases):
        assert np.array_equal(a.array, b.array), name
        calls = _tlb_calls(p)  # one hyp TLB function call per TLBI kind counted
        want = 2 * calls if vhe else 0
        assert a.total("dsb_nsh") - p.total("dsb_nsh") == want, name
        assert a.total("isb") - p.total("isb") == want, name
    assert sum(_tlb_calls(p) for _, p in plain.phases) > 0  # the check saw calls


def test_erratum_needs_a_kernel_with_the_workaround():
    # 6.12 has no AC04_CPU_23 workaround: the feature changes nothing there.
    a, b = _run(ERRATUM, "6.12", "reference"), _run(Features(), "6.12", "reference")
    for (name, x), (_, y) in zip(a.phases, b.phases):
        assert np.array_equal(x.array, y.array), name
    assert "ampere-ac04-cpu-23" in kernel_rules("7.3").errata


def test_erratum_is_a_cpu_feature_spelled_with_dashes():
    f = Features.parse("+ampere-ac04-cpu-23")
    assert f.ampere_ac04_cpu_23 and "ampere-ac04-cpu-23" in f.spec()
    assert "ampere" not in Features().spec()  # off: no new keys or texts
    with pytest.raises(S2Error, match="unknown CPU feature"):
        Features.parse("+ampere-ac03")


def test_ampereone_profile():
    from s2split.estimate.cost import load_profile
    f = load_profile("ampereone").features
    assert f.ampere_ac04_cpu_23 and f.bbml2 and f.vhe and f.fwb and f.tlbirange


# -- the selftest: teardown and mode ids -----------------------------------------------------

def test_7_3_selftest_unmaps_instead_of_deleting_memslots():
    # Same stage-2 work (kvm_unmap_gfn_range and kvm_arch_flush_shadow_memslot
    # both run kvm_stage2_unmap_range over the slot); only the deleting ioctl
    # (one per slot) is gone.
    munmap = _run(Features(), "7.3", "reference", slots=2)
    delete = _run(Features(), "7.3", "reference", slots=2, selftest="6.19")
    for (name, a), (_, b) in zip(munmap.phases, delete.phases):
        d = a.array - b.array
        if name != "destroy_vm":
            assert not d.any(), name
            continue
        assert a.total("ioctls") - b.total("ioctls") == -2
        assert a.get("unmap", "walks") == b.get("unmap", "walks") > 0
        assert kernel_counts(a) == kernel_counts(b)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_7_3_selftest_teardown_on_both_engines(engine):
    a = _run(Features(), "7.3", engine)
    b = _run(Features(), "7.3", "reference")
    for (name, x), (_, y) in zip(a.phases, b.phases):
        assert np.array_equal(x.array, y.array), name


def test_mode_ids_from_15_moved_in_6_16():
    assert parse_mode(15, "6.12").name == "P36V47_16K"
    assert parse_mode(16, "7.3").name == "P36V47_16K"
    with pytest.raises(S2Error, match="does not exist on arm64"):
        parse_mode(15, "7.3")  # VM_MODE_P47V47_16K (LoongArch)
    with pytest.raises(S2Error, match="too big"):
        parse_mode(16, "6.12")
    for i in range(15):
        assert parse_mode(i, "6.12") == parse_mode(i, "7.3") if i not in (9, 10, 11) else True


# -- the walker's -EAGAIN rule ---------------------------------------------------------------

MARK = 1 << 30  # KVM_PGTABLE_WALK_IGNORE_EAGAIN, as a test-only walk flag


def _ignore_eagain(monkeypatch, mark_wrprotect=True):
    """The 7.x rule, literally: -EAGAIN stops every walk without the flag,
    and only kvm_pgtable_stage2_wrprotect() sets it."""
    from s2split.model.pgtable import stage2, walker

    def cont(flags, ret):
        if ret == -EAGAIN:
            return bool(flags & MARK)
        return ret == 0
    monkeypatch.setattr(walker, "walk_continue", cont)
    orig = stage2.Stage2PageTable._update_leaf_attrs

    def update(self, addr, size, attr_set, attr_clr, flags, op, name):
        if name == "wrprotect" and mark_wrprotect:
            flags |= MARK
        return orig(self, addr, size, attr_set, attr_clr, flags, op, name)
    monkeypatch.setattr(stage2.Stage2PageTable, "_update_leaf_attrs", update)


@pytest.mark.parametrize("backing,manual,wp", [("anonymous_thp", True, 100),
                                               ("anonymous", False, 50),
                                               ("anonymous_thp", False, 30)])
def test_ignore_eagain_rule_changes_no_count(monkeypatch, backing, manual, wp):
    p = PerfTestParams(vcpu_memory_bytes=4 * MIB, backing=backing, chunk_size=2 * MIB,
                       mode=parse_mode(6), manual_protect=manual, write_percent=wp,
                       random_access=wp < 100, vcpus=2, partition=False)
    before = run_perf_test(p, VANILLA, "reference")
    _ignore_eagain(monkeypatch)
    after = run_perf_test(p, VANILLA, "reference")
    for (name, a), (_, b) in zip(before.phases, after.phases):
        assert np.array_equal(a.array, b.array), name


def test_ignore_eagain_rule_would_matter_for_an_unflagged_wrprotect(monkeypatch):
    # The wrong rule (write-protect walk without the flag) stops at the first
    # invalid entry: a hole in front of a mapped page leaves it writable.
    from s2split.arm64.arch import Geometry
    from s2split.model.pgtable.memory import MemoryCache
    from s2split.model.pgtable.stage2 import Stage2PageTable
    from s2split.arm64.pte import Prot

    def visits(mark):
        pgt = Stage2PageTable(Geometry(4096, 40), Features(), kernel="7.3")
        mc = MemoryCache(pgt.mem)
        mc.topup(40, 4)
        assert pgt.map(0x40001000, 4096, 1 << 44, Prot.RW, mc) == 0
        pgt.tally.take()
        _ignore_eagain(monkeypatch, mark)
        pgt.wrprotect(0x40000000, 2 * 4096)
        monkeypatch.undo()
        return pgt.tally.take().get("wrprotect", "visit_leaf", 3)
    assert visits(True) == 2
    assert visits(False) == 1


# -- fidelity: the kernel of a fixture ------------------------------------------------------

@pytest.mark.parametrize("release,kernel,noted", [
    ("6.12.117+deb13-arm64", "6.12", False), ("7.3.4+deb13-arm64-16k", "7.3", False),
    ("6.19.2", "6.19", False), ("6.15.0", "6.12", True), ("7.1.0-rc3", "6.19", True),
    ("7.9.0", "7.3", True), ("5.15.0", "6.12", True)])
def test_kernel_of_a_release(release, kernel, noted):
    got, note = kernel_for_release(release)
    assert got == kernel == nearest_kernel(release)
    assert (note is not None) == noted
    if noted:
        assert "\n" not in note and f"rules of {kernel}" in note
