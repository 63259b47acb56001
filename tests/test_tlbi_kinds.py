"""TLBI instructions by kind, derived from the counted hyp TLB calls by one
rule (kernel_counters.tlbi_instructions), on both engines.

By hand, for 8 MiB of THP on 4K (mode 6), KVM_CLEAR_DIRTY_LOG with eager
splitting in 2M chunks, two iterations: the first CLEAR splits the 4 level-2
blocks, each with one break-before-make TLBI (one __kvm_tlb_flush_vmid_ipa:
IPAS2E1IS, then VMALLE1IS); each CLEAR then flushes the memslot once by range
(8 MiB = 2048 pages, which a single range TLBI of scale 2 and num 0 covers:
one RIPAS2E1IS, then VMALLE1IS). Two CLEARs: 4 IPAS2E1IS, 2 RIPAS2E1IS,
6 VMALLE1IS. Without FEAT_TLBIRANGE each range flush is one
__kvm_tlb_flush_vmid instead: VMALLS12E1IS, and no RIPAS2E1IS nor its VMALLE1IS.
"""

from __future__ import annotations

import pytest

from s2split.counting.counts import sum_counts
from s2split.arm64.features import Features
from s2split.counting.kernel_counters import TLBI_KINDS, tlbi_instructions
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable.variants import get
from s2split.workload import PerfTestParams, run_perf_test

MIB = 1 << 20


def _clears(engine: str, tlbirange: bool):
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, backing="anonymous_thp", mode=parse_mode(6),
                       chunk_size=2 * MIB,
                       features=Features(vhe=True, fwb=True, tlbirange=tlbirange, dic=True))
    r = run_perf_test(p, get("vanilla"), engine)
    return sum_counts(r.phase(f"iter{i}_clear_dirty_log") for i in (1, 2))


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_tlbi_instructions_by_hand(engine):
    got = tlbi_instructions(_clears(engine, True))
    assert set(got) == {k for k, _ in TLBI_KINDS}
    assert got == {"TLBI IPAS2E1IS": 4, "TLBI IPAS2E1": 0, "TLBI RIPAS2E1IS": 2,
                   "TLBI VMALLE1IS": 6, "TLBI VMALLE1": 0, "TLBI VMALLS12E1IS": 0}
    norange = tlbi_instructions(_clears(engine, False))
    assert norange == {"TLBI IPAS2E1IS": 4, "TLBI IPAS2E1": 0, "TLBI RIPAS2E1IS": 0,
                       "TLBI VMALLE1IS": 4, "TLBI VMALLE1": 0, "TLBI VMALLS12E1IS": 2}


def test_every_stage2_call_is_followed_by_one_stage1_invalidation():
    """Stage 1 goes after every by-IPA and range call (VHE and nVHE alike)."""
    c = _clears("reference", True)
    k = tlbi_instructions(c)
    assert k["TLBI VMALLE1IS"] + k["TLBI VMALLE1"] == \
        c.total("tlbi_ipa") + c.total("tlbi_ipa_nsh") + c.total("tlbi_range")
