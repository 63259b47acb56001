"""The dirty_log_perf_test layout and the guest's access pattern."""

import pytest

from s2split.plumbing.errors import S2Error
from s2split.selftest.modes import parse_mode
from s2split.model.pgtable.variants import VANILLA
from s2split.workload import PerfTestParams, guest_random_u32, memstress_layout, run_perf_test

MIB = 1 << 20


# memstress: gpa = (max_gfn + 1 - pages - 1) * page, aligned down to the
# backing page size. 4K/40-bit, 256M: (2^28 - 65536 - 1) * 4096 = 0xffeffff000;
# with THP aligned down to 2M: 0xffefe00000. 16K/40-bit, 256M of 32M hugetlb:
# 2^40 - 256M - 16K aligned down to 32M = 0xffee000000. These are the ranges
# recorded in the real-kernel fixtures.
@pytest.mark.parametrize("mode,backing,gpa", [
    (6, "anonymous", 0xFFEFFFF000),
    (6, "anonymous_thp", 0xFFEFE00000),
    (7, "anonymous_hugetlb", 0xFFEE000000),
])
def test_layout_matches_selftest(mode, backing, gpa):
    lay = memstress_layout(PerfTestParams(vcpu_memory_bytes=256 * MIB, backing=backing,
                                          mode=parse_mode(mode)))
    assert lay.gpa == gpa
    assert lay.size == 256 * MIB
    assert lay.slots == ((1, gpa, 256 * MIB // parse_mode(mode).page_size),)


def test_layout_partitions_vcpus_and_slots():
    p = PerfTestParams(vcpu_memory_bytes=8 * MIB, vcpus=4, slots=2)
    lay = memstress_layout(p)
    pages = 8 * MIB // 4096
    assert lay.vcpus == tuple((lay.gpa + i * 8 * MIB, pages) for i in range(4))
    assert lay.slots == ((1, lay.gpa, 2 * pages), (2, lay.gpa + 16 * MIB, 2 * pages))
    shared = memstress_layout(PerfTestParams(vcpu_memory_bytes=8 * MIB, vcpus=4,
                                             partition=False))
    assert shared.vcpus == ((shared.gpa, 4 * pages),) * 4


def test_layout_errors():
    with pytest.raises(S2Error, match="evenly divided"):
        memstress_layout(PerfTestParams(vcpu_memory_bytes=3 * 4096, slots=2))
    with pytest.raises(S2Error, match="not aligned"):
        # 3 slots of 2M hugetlb over 6M: the first slot is 2M aligned, but the
        # region is not a multiple of 3 hugepages -> slots start mid-hugepage
        memstress_layout(PerfTestParams(vcpu_memory_bytes=3 * MIB, slots=3,
                                        backing="anonymous_hugetlb"))
    with pytest.raises(S2Error, match="at least two"):
        PerfTestParams(iterations=1)
    with pytest.raises(S2Error, match="between 0 and 100"):
        PerfTestParams(write_percent=101)


# Park-Miller "minimal standard" with multiplier 48271, modulus 2^31 - 1:
# from 1: 48271, 48271^2 mod M = 2330089441 - 2147483647 = 182605794, then
# 1291394886, 1914720637, 2078669041, 407355683, 1105902161, 854716505,
# 564586691, 1596680831, 192302371, 1203428207.
SEQ_FROM_1 = [48271, 182605794, 1291394886, 1914720637, 2078669041, 407355683, 1105902161,
              854716505, 564586691, 1596680831, 192302371, 1203428207]


def test_generator_definition():
    x, out = 1, []
    for _ in range(len(SEQ_FROM_1)):
        x = guest_random_u32(x)
        out.append(x)
    assert out == SEQ_FROM_1
    assert guest_random_u32(0) == 0  # a zero seed is stuck at zero


# With the seed copied into the guest (--seed-synced) and -r 1, vCPU 0 starts
# at 1. The populate pass draws once per page (x1..x4). Iteration 1 draws x5..x8
# for the write decisions: 41, 83, 61, 5 (mod 100): with -w 50 pages 0 and 3 are
# written, 1 and 2 only read. With -a each access first draws the page:
# x5 % 4 = 1 (write x6 % 100 = 83), x7 % 4 = 1 (x8: 5), x9 % 4 = 3 (x10: 31),
# x11 % 4 = 3 (x12: 7); with -w 6 only the second access (page 1) writes.
@pytest.mark.parametrize("kw,expected", [
    (dict(write_percent=50, seed_synced=True), {0, 3}),
    (dict(write_percent=100, random_access=True, seed_synced=True), {1, 3}),
    (dict(write_percent=6, random_access=True, seed_synced=True), {1}),
    # Upstream (seed not synced): vCPU 0's generator is stuck at 0, so every
    # access writes when -w > 0 and -a always picks page 0.
    (dict(write_percent=50), {0, 1, 2, 3}),
    (dict(write_percent=50, random_access=True), {0}),
])
def test_guest_touches_pages_like_upstream(kw, expected):
    p = PerfTestParams(vcpu_memory_bytes=4 * 4096, manual_protect=False, **kw)
    res = run_perf_test(p, VANILLA, "reference")
    # -g: the first KVM_GET_DIRTY_LOG returns iteration 1's writes; the run keeps
    # the last bitmap, so rebuild iteration 1's from its dirty marks instead.
    marked = res.phase("iter1_dirty").get("kvm", "dirty_marked")
    assert marked == len(expected)
    p2 = PerfTestParams(vcpu_memory_bytes=4 * 4096, manual_protect=False, iterations=2, **kw)
    bitmap = _first_bitmap(p2)
    assert {i for i in range(4) if bitmap >> i & 1} == expected


def _first_bitmap(p):
    """Run populate, enable logging and one pass, and return KVM_GET_DIRTY_LOG's word."""
    from s2split.engine import ReferenceEngine
    from s2split.model.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
    lay = memstress_layout(p)
    vm = ReferenceEngine().create_vm(p.geometry(), p.features, VANILLA, p.host_va_bits)
    for slot_id, gpa, pages in lay.slots:
        vm.add_memslot(slot_id, gpa, pages * 4096, p.backing_type())
    for i, (gpa, pages) in enumerate(lay.vcpus):
        vm.add_vcpu(gpa, pages, ((p.seed if p.seed_synced else 0) + i) & 0xFFFFFFFF)
    vm.guest_pass(100, False)
    vm.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
    vm.guest_pass(p.write_percent, p.random_access)
    return vm.get_dirty_log(1)[0]


def test_two_vcpus_second_is_seeded_with_one():
    # Upstream seeds vCPU k with k: vCPU 1 follows SEQ_FROM_1, so with -w 50 its
    # region (pages 4..7) gets pages 0 and 3 written; vCPU 0 writes all 4.
    p = PerfTestParams(vcpu_memory_bytes=4 * 4096, vcpus=2, manual_protect=False,
                       write_percent=50)
    bitmap = _first_bitmap(p)
    assert {i for i in range(8) if bitmap >> i & 1} == {0, 1, 2, 3, 4, 7}


# Upstream's guest writes one word per page of the guest mode; the stage-2,
# the backing and the dirty bitmap use the host kernel's pages
# (--host-page-size). 1 MiB of anonymous memory, -g, two iterations:
# * -m 7 (16K guest pages) on a 4K host: 64 guest pages, each touched on its
#   first 4K. Populate faults 64 of the 256 host pages in; every dirtying pass
#   write-faults the same 64 (write-protected by enabling logging, then by
#   each KVM_GET_DIRTY_LOG), and the bitmap's 256 bits have every 4th set:
#   four words of 0x1111...1.
# * -m 6 (4K guest pages) on a 16K host: 256 guest pages, 64 host pages. Each
#   host page faults once per pass (its first guest page); the other three
#   accesses find it mapped. The bitmap is one word with all 64 bits set.
@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("mode,host,accesses,faults,bitmap", [
    (7, 4096, 64, 64, [0x1111111111111111] * 4),
    (6, 16384, 256, 64, [(1 << 64) - 1]),
])
def test_guest_pages_and_host_pages_differ(engine, mode, host, accesses, faults, bitmap):
    p = PerfTestParams(vcpu_memory_bytes=MIB, mode=parse_mode(mode), host_page_size=host,
                       manual_protect=False)
    r = run_perf_test(p, VANILLA, engine)
    pop = r.phase("populate")
    assert pop.get("kvm", "guest_accesses") == accesses
    assert pop.get("kvm", "trans_faults") == faults
    for it in (1, 2):
        d = r.phase(f"iter{it}_dirty")
        assert d.get("kvm", "guest_accesses") == accesses
        assert d.get("kvm", "perm_faults") == faults == d.get("kvm", "dirty_marked")
    assert [int(w) for w in r.bitmaps[1]] == bitmap


# Manual-protect + initially-set on the 16K guest / 4K host pair: the first
# KVM_CLEAR_DIRTY_LOG gets the initially-set bitmap of 256 host pages back and
# clears it whole (4 words, each write-protected and split over its 64
# pages); the clear is counted in host pages, not in the 64 guest pages.
def test_clear_dirty_log_is_counted_in_host_pages():
    p = PerfTestParams(vcpu_memory_bytes=MIB, mode=parse_mode(7), host_page_size=4096)
    r = run_perf_test(p, VANILLA, "reference")
    assert r.phase("iter1_get_dirty_log").get("kvm", "bitmap_words") == 4
    assert r.phase("iter1_clear_dirty_log").get("kvm", "bitmap_words") == 4
    assert r.phase("iter1_clear_dirty_log").get("kvm", "log_dirty_masked") == 4


def test_host_page_size_rules():
    # upstream: "Guest memory size is not host page size aligned"
    with pytest.raises(S2Error, match="not host page size"):
        memstress_layout(PerfTestParams(vcpu_memory_bytes=4096, host_page_size=16384))
    with pytest.raises(S2Error, match="not guest page size"):  # 4K of 16K guest pages
        memstress_layout(PerfTestParams(vcpu_memory_bytes=4096, mode=parse_mode(7),
                                        host_page_size=4096))
    with pytest.raises(S2Error, match="host page size 8192"):
        PerfTestParams(host_page_size=8192)
    # the mode's own page size is the default, spelled one way
    assert PerfTestParams(host_page_size=4096) == PerfTestParams()
    assert "--host-page-size" not in PerfTestParams(host_page_size=4096).argv()
    assert PerfTestParams(mode=parse_mode(7), host_page_size=4096).argv()[-2:] == \
        ["--host-page-size", "4K"]
    # a mode without an ID is written with its own page size, not the host's
    from s2split.hw.params import mode_from_config
    from s2split.selftest.modes import mode_for
    odd = PerfTestParams(mode=mode_for(16384, 44), host_page_size=4096)
    argv = odd.argv()
    assert argv[argv.index("--granule") + 1] == "16K"
    assert mode_from_config(odd.to_dict()).page_size == 16384
