"""Kernel-version rules (arm64/versions.py): 6.12 vs 6.19+ stage-2 teardown.

The workload deletes its memslots (unmapping everything) before the VM goes,
so these tests tear a populated VM down directly, with its tables in place:
that is where the two free walkers differ.
"""

import numpy as np
import pytest

from s2split.engine import ReferenceEngine, get_engine
from s2split.plumbing.errors import S2Error
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable.variants import VANILLA
from s2split.arm64.versions import kernel_rules
from s2split.workload import PerfTestParams, phase_steps, memstress_layout

MIB = 1 << 20


def destroy_counts(engine: str, kernel: str):
    # 4K pages, 40-bit IPA: two concatenated root pages (1024 level-1 entries
    # of 1G each). 64 MiB of THP at the top of the IPA space populates as 32
    # level-2 (2M) blocks in one level-2 table under one level-1 entry.
    p = PerfTestParams(vcpu_memory_bytes=64 * MIB, backing="anonymous_thp",
                       mode=parse_mode(6), kernel=kernel)
    eng = ReferenceEngine() if engine == "reference" else get_engine("fast", p, VANILLA)
    vm = eng.create_vm(p.geometry(), p.features, VANILLA, p.host_va_bits, kernel=kernel)
    ctx: dict = {}
    for name, step in phase_steps(p, memstress_layout(p)):
        step(vm, ctx)
        if name == "populate":
            break
    vm.take_counts()
    vm.destroy()
    return vm.take_counts()


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_destroy_6_12_is_one_walk(engine):
    c = destroy_counts(engine, "6.12")
    assert c.get("destroy", "walks") == 1
    assert c.get("destroy", "calls") == 1
    assert c.get("destroy", "loops", 1) == 2              # one table loop per root page
    assert c.get("destroy", "read_table", 1) == 1
    assert c.get("destroy", "read_invalid", 1) == 1023
    assert c.get("destroy", "read_leaf", 2) == 32         # the 2M blocks
    assert c.get("destroy", "read_invalid", 2) == 480
    assert c.get("destroy", "visit_post", 1) == 1
    assert c.op_total("destroy", "pte_write") == 0             # 6.12 leaves entries as they are
    assert c.get("destroy", "page_freed", 2) == 1         # the level-2 table
    assert c.get("destroy", "page_freed", 1) == 2         # the root pages


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_destroy_6_19_walks_per_chunk_and_clears_freed_tables(engine):
    c = destroy_counts(engine, "6.19")
    # One destroy_range walk per 1G chunk (the level-1 granule on 4K): 1024
    # walks, each one table loop over one root entry.
    assert c.get("destroy", "walks") == 1024
    assert c.get("destroy", "calls") == 1024
    assert c.get("destroy", "loops", 1) == 1024
    assert c.get("destroy", "read_table", 1) == 1
    assert c.get("destroy", "read_invalid", 1) == 1023
    assert c.get("destroy", "read_leaf", 2) == 32
    assert c.get("destroy", "read_invalid", 2) == 480
    # The level-2 table is empty once its 32 blocks are put: freed, and its
    # level-1 entry cleared -- the one extra PTE write of 6.19.
    assert c.get("destroy", "pte_write", 1) == 1
    assert c.op_total("destroy", "pte_write") == 1
    assert c.get("destroy", "page_freed", 2) == 1
    assert c.get("destroy", "page_freed", 1) == 2


@pytest.mark.parametrize("kernel", ["6.19", "7.3"])
def test_versions_agree_elsewhere(kernel):
    # Everything but destroy_vm is identical between the rule sets (on the
    # default CPU: the AC04_CPU_23 erratum is off) -- why making 7.3 the
    # default changes no figure of `s2split reproduce`, which prices the
    # syscall phases only.
    from s2split.workload import run_perf_test
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", chunk_size=2 * MIB,
                       mode=parse_mode(6), kernel="6.12")
    a = run_perf_test(p, VANILLA, "reference")
    b = run_perf_test(PerfTestParams(**{**p.__dict__, "kernel": kernel}), VANILLA, "reference")
    assert [n for n, _ in a.phases] == [n for n, _ in b.phases]
    for (name, ca), (_, cb) in zip(a.phases, b.phases):
        if name != "destroy_vm":
            assert np.array_equal(ca.array, cb.array), name
        else:
            assert not np.array_equal(ca.array, cb.array)  # the teardown does differ


def test_unknown_kernel_is_an_error():
    with pytest.raises(S2Error, match="not modelled"):
        kernel_rules("6.17")
    with pytest.raises(S2Error, match="not modelled"):
        kernel_rules("7.4")
    with pytest.raises(S2Error, match="not modelled"):
        PerfTestParams(kernel="5.15")


def test_auto_engine_takes_the_fast_engine_for_long_teardowns():
    # 16K pages, 52-bit IPA (LPA2): 2^52 / 32M = 2^27 teardown walks under the
    # 6.19 rules -- the fast engine's job even for a tiny VM; 6.12 is one walk.
    from s2split.engine import ReferenceEngine
    from s2split.engine.vm import FastEngine
    from s2split.selftest.modes import parse_mode
    small = dict(vcpu_memory_bytes=1 * MIB, mode=parse_mode(1), lpa2=True)
    assert isinstance(get_engine("auto", PerfTestParams(**small, kernel="6.19"), VANILLA),
                      FastEngine)
    assert isinstance(get_engine("auto", PerfTestParams(**small, kernel="6.12"), VANILLA),
                      ReferenceEngine)
