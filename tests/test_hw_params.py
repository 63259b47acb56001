"""The harness's numpy-free pieces against the model: layout, access pattern,
configuration keys, options, and the guest machine code."""

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s2split.plumbing.errors import S2Error
from s2split.hw import guest as G
from s2split.hw.params import HwParams, memstress_layout
from s2split.model.kvm.backing import parse_backing
from s2split.selftest.modes import MODES
from s2split.workload import PerfTestParams, memstress_layout as model_layout

MIB = 1 << 20
ARM_MODES = [m for m in MODES if m.arm64]


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(ARM_MODES),
       backing=st.sampled_from(["anonymous", "anonymous_thp", "anonymous_hugetlb",
                                "anonymous_hugetlb_1gb", "anonymous_hugetlb_64kb",
                                "anonymous_hugetlb_32mb"]),
       mib=st.integers(1, 2048), vcpus=st.integers(1, 8), slots=st.integers(1, 4),
       partition=st.booleans())
def test_layout_is_the_models(mode, backing, mib, vcpus, slots, partition):
    kw = dict(vcpu_memory_bytes=mib * MIB, vcpus=vcpus, backing=backing, mode=mode,
              slots=slots, partition=partition)
    try:
        b = parse_backing(backing, mode.page_size)
    except S2Error:
        return  # a hugepage size this granule does not have (both refuse it)
    try:
        want = model_layout(PerfTestParams(**kw))
    except S2Error as e:
        with pytest.raises(S2Error) as got:
            memstress_layout(HwParams(**kw), b.page_size)
        assert str(got.value) == str(e)
        return
    got = memstress_layout(HwParams(**kw), b.page_size)
    assert (got.gpa, got.size, got.guest_num_pages, got.pages_per_slot, got.slots,
            got.vcpus) == (want.gpa, want.size, want.guest_num_pages, want.pages_per_slot,
                           want.slots, want.vcpus)


class FakeVcpu:
    def __init__(self, gpa, pages, rng):
        self.gpa, self.pages, self.rng = gpa, pages, rng


@given(seed=st.integers(0, 2**31 - 2), pages=st.integers(1, 300),
       wp=st.integers(0, 100), random_access=st.booleans())
def test_access_pattern_is_the_models(seed, pages, wp, random_access):
    """guest_pass (what the harness checks the real guest against) makes the
    accesses of the model's memstress_pass, pass after pass."""
    from s2split.selftest.memstress import memstress_pass

    class Vm:
        guest_page_size = 4096
        vcpus = [FakeVcpu(0, pages, seed)]
        log: list = []

        def guest_access(self, v, addr, write):
            self.log.append((addr // 4096, write))

        def guest_mmio_exit(self, v):
            pass

    vm = Vm()
    state = seed
    for wpc, ra in ((100, False), (wp, random_access), (wp, random_access)):
        vm.log = []
        memstress_pass(vm, wpc, ra)
        state, written, read = G.guest_pass(state, pages, wpc, ra)
        assert [p for p, w in vm.log if w] == written
        assert [p for p, w in vm.log if not w] == read
        assert vm.vcpus[0].rng == state


def test_park_miller_sequence():
    x, seq = 1, []
    for _ in range(4):
        x = G.next_state(x)
        seq.append(x)
    assert seq == [48271, 182605794, 1291394886, 1914720637]
    assert G.next_state(0) == 0  # upstream's vCPU 0 (seed 0) is stuck at 0


def test_vcpu_seeds_follow_upstream():
    assert [HwParams(seed=9).vcpu_seed(i) for i in range(3)] == [0, 1, 2]
    assert [HwParams(seed=9, seed_synced=True).vcpu_seed(i) for i in range(3)] == [9, 10, 11]


def test_config_round_trip_and_key():
    from s2split.selftest.modes import parse_mode
    p = HwParams(vcpu_memory_bytes=64 * MIB, vcpus=2, backing="anonymous_thp",
                 manual_protect=False, iterations=3, mode=parse_mode(7), slots=2,
                 write_percent=40, random_access=True, partition=False, seed=5,
                 chunk_size=2 * MIB, seed_synced=True)
    assert HwParams.from_config(p.to_config()) == p
    assert p.config_key() == ("-m 7 -b 64M -s anonymous_thp -v 2 -g -i 3 -x 2 -w 40 -a -o "
                              "-r 5 --chunk-size 2M --seed-synced")
    # the key is the model's perf-test options (less the model-only ones)
    model = PerfTestParams(vcpu_memory_bytes=64 * MIB, vcpus=2, backing="anonymous_thp",
                           manual_protect=False, iterations=3, mode=parse_mode(7), slots=2,
                           write_percent=40, random_access=True, partition=False, seed=5,
                           chunk_size=2 * MIB, seed_synced=True)
    assert model.argv() == p.argv()
    # without --chunk-size the kernel's default is left alone, as upstream does
    assert "--chunk-size" not in HwParams().config_key()
    assert HwParams(chunk_size=0).argv()[-2:] == ["--chunk-size", "0"]


def test_hw_run_has_perf_tests_upstream_options():
    from s2split.selftest.options import add_perf_test_options
    from s2split.hw.cli import add_run_options

    def upstream(p):
        g = next(g for g in p._action_groups if g.title.startswith("dirty_log_perf_test"))
        return {a.option_strings[0]: a for a in g._group_actions}
    a, b = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_perf_test_options(a)
    add_run_options(b)
    pa, pb = upstream(a), upstream(b)
    assert set(pa) == set(pb)
    for opt, action in pa.items():
        assert pb[opt].dest == action.dest
        if opt == "-s":  # a list here: several backings in one run
            assert pb[opt].default == [action.default]
        else:
            assert pb[opt].default == action.default, opt
    chunk = [x for x in b._actions if "--chunk-size" in x.option_strings][0]
    assert chunk.dest == "chunk_size"


def test_default_db_is_the_stores():
    from s2split.hw.cli import DEFAULT_DB
    from s2split.storage.store import DEFAULT_DB as STORE_DEFAULT
    assert DEFAULT_DB == STORE_DEFAULT


def test_features_are_a_core_module():
    """The model's CPU features live in the numpy-free core, not in the harness:
    the stage-2 model must not import s2split.hw to learn what FWB is."""
    import pickle

    from s2split.arm64.features import Features
    f = Features.parse("-fwb")
    assert f.fwb is False and pickle.loads(pickle.dumps(f)) == f
    assert Features.__module__ == "s2split.arm64.features"


# -- the guest machine code -------------------------------------------------------------------
def test_arm64_encodings():
    """Words checked against the ARM ARM encodings (and a disassembler)."""
    a = G.A64()
    a.movz(6, 0xBC8F)
    a.movk(7, 0x7FFF, 1)
    a.ldr(10, 4, 8)
    a.str_(17, 16)
    a.mov(12, 11)
    a.mul(13, 3, 6)
    a.udiv(14, 13, 7)
    a.msub(3, 14, 7, 13)
    a.madd(16, 12, 2, 0)
    a.cmp(15, 9)
    a.add_imm(11, 11, 1)
    words = [int.from_bytes(a.assemble()[i:i + 4], "little") for i in range(0, a.size, 4)]
    assert words == [0xD29791E6, 0xF2AFFFE7, 0xF940048A, 0xF9000211, 0xAA0B03EC, 0x9B067C6D,
                     0x9AC709AE, 0x9B07B5C3, 0x9B020190, 0xEB0901FF, 0x9100056B]


def test_arm64_branches():
    a = G.A64()
    a.label("top")
    a.add_imm(0, 0, 1)
    a.cbz(1, "end")
    a.b_cond("lo", "top")
    a.b("top")
    a.label("end")
    words = [int.from_bytes(a.assemble()[i:i + 4], "little") for i in range(0, a.size, 4)]
    assert words[1:] == [0xB4000061, 0x54FFFFC3, 0x17FFFFFD]  # cbz +3, b.lo -2, b -3


def test_programs_are_a_few_dozen_instructions():
    assert len(G.arm64_program()) // 4 == 32
    x86 = G.x86_program()
    assert len([t for t, _ in G.X86_CODE if not t.endswith(":")]) == 39
    assert x86[-2:] == b"\xeb\x99"  # jmp pass: back to offset 0x11
    assert x86.index(b"\x4d\x8b\x10") == 0x11
