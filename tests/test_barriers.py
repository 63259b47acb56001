"""TLB maintenance, barriers and I-cache maintenance, counted as the 6.12
kernel executes them (expected values derived from the sequences in the
comments: arch/arm64/kvm/hyp/{vhe,nvhe}/tlb.c, kvm_call_hyp(),
__invalidate_icache_guest_page())."""

import pytest

from s2split.arm64.arch import Geometry
from s2split.counting.counters import KIND, NKINDS, NOLEVEL, SLOTS
from s2split.arm64.features import Features
from s2split.model.pgtable import tlb
from s2split.model.pgtable.memory import MemoryCache
from s2split.model.pgtable.stage2 import Stage2PageTable
from s2split.arm64.pte import Prot

BARRIERS = ("hyp_call", "dsb_ishst", "dsb_ish", "dsb_nshst", "dsb_nsh", "isb", "tlbi_s1")
VHE, NVHE = Features(vhe=True), Features(vhe=False)


def events(fn, features, *args):
    c = [0] * (NKINDS * SLOTS)
    fn(c, features, *args)
    return {k: c[KIND[k] * SLOTS + NOLEVEL] for k in BARRIERS if c[KIND[k] * SLOTS + NOLEVEL]}


# VHE, by-IPA: dsb(ishst); enter_vmid_context (... isb); tlbi ipas2e1is;
# dsb(ish); tlbi vmalle1is; dsb(ish); isb; exit_vmid_context (... isb); and
# kvm_call_hyp()'s isb after the call: ISHST 1, ISH 2, ISB 4, one stage-1 TLBI.
# nVHE: a hypercall; enter_vmid_context's dsb(ish) replaces the ISHST and it
# switches VMID (isb); the body as above; exit switches back (isb): ISH 3, ISB 3.
# The _nsh variant has the same shape with non-shareable barriers. A range
# flush has the by-IPA body with range TLBIs; a whole-VMID flush has one TLBI
# (VMALLS12E1IS, no separate stage-1 one) and one DSB in its body.
@pytest.mark.parametrize("fn,args,vhe,nvhe", [
    (tlb.flush_vmid_ipa, (2,),
     {"dsb_ishst": 1, "dsb_ish": 2, "isb": 4, "tlbi_s1": 1},
     {"hyp_call": 1, "dsb_ish": 3, "isb": 3, "tlbi_s1": 1}),
    (tlb.flush_vmid_ipa_nsh, (3,),
     {"dsb_nshst": 1, "dsb_nsh": 2, "isb": 4, "tlbi_s1": 1},
     {"hyp_call": 1, "dsb_nsh": 3, "isb": 3, "tlbi_s1": 1}),
    (tlb.flush_vmid, (),
     {"dsb_ishst": 1, "dsb_ish": 1, "isb": 4},
     {"hyp_call": 1, "dsb_ish": 2, "isb": 3}),
    (tlb.flush_vmid_range, (0, 1 << 30, 12),  # 262,144 pages: one call
     {"dsb_ishst": 1, "dsb_ish": 2, "isb": 4, "tlbi_s1": 1},
     {"hyp_call": 1, "dsb_ish": 3, "isb": 3, "tlbi_s1": 1}),
], ids=["ipa", "ipa_nsh", "vmid", "range"])
def test_hyp_tlb_call_barriers(fn, args, vhe, nvhe):
    assert events(fn, VHE, *args) == vhe
    assert events(fn, NVHE, *args) == nvhe


G4 = Geometry(4096, 40)
PA = 1 << 44


def map_counts(size, prot, dic):
    pgt = Stage2PageTable(G4, Features(dic=dic))
    mc = MemoryCache(pgt.mem)
    mc.topup(40, G4.levels)
    assert pgt.map(0x40000000, size, PA, prot, mc) == 0
    c = pgt.tally.take()
    return {(k, lv): n for k in ("isb", "dsb_ish", "icache_ops", "icache_bytes")
            for lv, n in c.by_level("map", k).items()}


def exec_cost(size, dic):
    """What mapping executable adds: the I-cache maintenance alone."""
    rwx, rw = map_counts(size, Prot.RWX, dic), map_counts(size, Prot.RW, dic)
    return {k: rwx.get(k, 0) - rw.get(k, 0) for k in rwx.keys() | rw.keys()
            if rwx.get(k, 0) != rw.get(k, 0)}


# A page is invalidated by line: IC IVAU over 4K, DSB ISH, ISB (with DIC just
# the ISB). A 2M block is larger than MAX_DVM_OPS (512) lines of any size, so
# the whole I-cache goes: IC IALLUIS (one operation, no bytes) and DSB ISH,
# and with DIC nothing at all.
@pytest.mark.parametrize("size,dic,expected", [
    (4096, True, {("isb", None): 1}),
    (2 << 20, True, {}),
    (4096, False, {("icache_ops", 3): 1, ("icache_bytes", 3): 4096, ("dsb_ish", None): 1,
                   ("isb", None): 1}),
    (2 << 20, False, {("icache_ops", 2): 1, ("dsb_ish", None): 1}),
], ids=["page-dic", "block-dic", "page", "block"])
def test_icache_maintenance_of_executable_mappings(size, dic, expected):
    assert exec_cost(size, dic) == expected
