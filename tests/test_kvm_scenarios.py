"""KVM-layer scenarios with counts derived in the comments.

They drive the VM the way dirty_log_perf_test does (populate, enable dirty
logging, get/clear dirty log) but stop after the phases under test, so that
the reference engine stays quick.
"""

import pytest

from s2split.arm64.arch import Geometry
from s2split.plumbing.errors import KernelError, S2Error
from s2split.model.kvm.backing import parse_backing
from s2split.model.kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from s2split.model.kvm.vm import KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES, VM
from s2split.model.pgtable.variants import get

MIB, GIB = 1 << 20, 1 << 30
G4 = Geometry(4096, 40)


def vm_with_slot(backing, size, chunk, gpa, manual=False, variant="vanilla", geom=G4):
    vm = VM(geom, variant=get(variant))
    vm.set_eager_split_chunk_size(chunk)
    vm.add_memslot(1, gpa, size, parse_backing(backing, geom.granule))
    if manual:
        vm.enable_cap(168, 3)
    vm.add_vcpu(gpa, size // geom.granule, 0)
    vm.take_counts()
    return vm


def populate(vm):
    vm.guest_pass(100, False)
    return vm.take_counts()


def enable_logging(vm):
    vm.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
    return vm.take_counts()


# 1 GiB of 1G hugetlb on 4K, no manual-protect, chunk 1G. Populate maps one
# level-1 block. Enabling logging write-protects it (one wrprotect walk per 1G
# piece: one attr-visitor call, on the level-1 block) and flushes the slot; the
# split tops the cache up once to 1 + 512 = 513 pages (ceil(1G/1G) +
# ceil(1G/2M)) -- one lock drop -- and one split walk builds the whole subtree.
def test_1g_hugetlb_enable_chunk_1g():
    vm = vm_with_slot("anonymous_hugetlb_1gb", GIB, GIB, 0xFF80000000)
    pc = populate(vm)
    assert pc.get("map", "calls") == 1 and pc.by_level("map", "visit_leaf") == {1: 1}
    c = enable_logging(vm)
    assert c.get("wrprotect", "walks") == 1
    assert c.by_level("wrprotect", "visit_leaf") == {1: 1}
    assert c.get("kvm", "split_topups") == 1 and c.get("kvm", "lock_drops") == 1
    assert c.get("kvm", "cache_pages_alloc") == 513
    assert c.total("page_taken") == 513
    assert c.get("split", "walks") == 1
    assert c.by_level("create_unlinked", "calls_force_pte") == {1: 1}
    assert c.by_level(None, "tlbi_ipa") == {1: 1}
    # one kvm_flush_remote_tlbs_memslot: 262,144 pages in one range call
    assert c.get("kvm", "flush_memslot") == 1 and c.total("tlbi_range_pages") == GIB // 4096


# The same with chunk 2M: 512 chunk walks. The cache's capacity is now
# ceil(2M/1G) + ceil(2M/2M) = 2, fewer than the 513 a full 1G split needs, so
# the first chunk builds one page of 2M blocks (force_pte off) and then splits
# its first 2M block (force_pte on, one page); each later chunk splits one 2M
# block. Every chunk starts below capacity, so each tops up: the first two
# from empty (chunk 1 used both its pages), the other 510 from one page left:
# 512 top-ups and lock drops, 2 + 2 + 510 = 514 pages allocated, 513 taken.
def test_1g_hugetlb_enable_chunk_2m():
    vm = vm_with_slot("anonymous_hugetlb_1gb", GIB, 2 * MIB, 0xFF80000000)
    populate(vm)
    c = enable_logging(vm)
    assert c.get("split", "walks") == 512
    assert c.by_level("create_unlinked", "calls") == {1: 1, 2: 512}
    assert c.by_level("create_unlinked", "calls_force_pte") == {2: 512}
    assert c.get("kvm", "split_topups") == 512 and c.get("kvm", "lock_drops") == 512
    assert c.get("kvm", "cache_pages_alloc") == 2 + 2 + 510
    assert vm.split_cache.nobjs == 1
    assert c.total("page_taken") == 513
    assert c.by_level(None, "tlbi_ipa") == {1: 1, 2: 512}
    assert {lv for _, lv, _ in vm.pgt.leaves()} == {3}


# THP (2M) with manual-protect + initially-set, 64 MiB = 32 blocks = 16384 pages
# = 256 bitmap words. Enabling logging does nothing; the first guest pass does
# not fault (all pages writable). The first KVM_CLEAR_DIRTY_LOG handles each of
# the 256 words: one wrprotect walk and one split walk each (chunk 2M, and a
# 64-page word never crosses a 2M boundary here because the THP region is 2M
# aligned). Each block is split exactly once (by the first word that covers
# it): 32 create_unlinked, 32 TLBIs at level 2. The second clear (after a pass
# that faults every page) splits nothing, but the vanilla split walks still read
# every level-3 entry once: 256 words x 64 entries.
@pytest.mark.parametrize("variant,second_l3_reads", [("vanilla", 16384), ("skip-levels", 0)])
def test_thp_manual_protect_clears(variant, second_l3_reads):
    size = 64 * MIB
    vm = vm_with_slot("anonymous_thp", size, 2 * MIB, 0xFFFBE00000, manual=True,
                      variant=variant)
    populate(vm)
    assert enable_logging(vm).total("walks") == 0
    vm.guest_pass(100, False)
    assert vm.take_counts().get("kvm", "perm_faults") == 0
    bitmap = vm.get_dirty_log(1)
    assert bitmap == [(1 << 64) - 1] * 256  # initially set
    vm.take_counts()
    vm.clear_dirty_log(1, 0, size // 4096, bitmap)
    c1 = vm.take_counts()
    assert c1.get("kvm", "log_dirty_masked") == 256
    assert c1.get("wrprotect", "walks") == 256 and c1.get("split", "walks") == 256
    assert c1.by_level("create_unlinked", "calls_force_pte") == {2: 32}
    assert c1.by_level(None, "tlbi_ipa") == {2: 32}
    vm.guest_pass(100, False)
    dirty = vm.take_counts()
    assert dirty.get("kvm", "perm_faults") == 16384 and dirty.get("kvm", "dirty_marked") == 16384
    bitmap = vm.get_dirty_log(1)
    vm.take_counts()
    vm.clear_dirty_log(1, 0, size // 4096, bitmap)
    c2 = vm.take_counts()
    assert c2.get("split", "walks") == 256
    assert c2.total("page_taken") == 0 and c2.total("tlbi_ipa") == 0
    assert c2.by_level("split", "read_leaf").get(3, 0) == second_l3_reads


# A region that starts one page below a 2M boundary (the selftest's placement of
# anonymous memory): words 0, 8, 16, ... straddle a 2M chunk boundary and are
# split in two chunk walks: 256 words -> 256 + 32 split walks.
def test_unaligned_region_words_straddle_chunks():
    size = 64 * MIB
    gpa = 0xFFFBFFF000
    vm = vm_with_slot("anonymous", size, 2 * MIB, gpa, manual=True)
    populate(vm)
    enable_logging(vm)
    bitmap = vm.get_dirty_log(1)
    vm.take_counts()
    vm.clear_dirty_log(1, 0, size // 4096, bitmap)
    c = vm.take_counts()
    assert c.get("kvm", "log_dirty_masked") == 256
    assert c.get("split", "walks") == 256 + 32
    assert c.total("page_taken") == 0  # anonymous memory has no blocks


# Without eager splitting, a write to a write-protected 2M block while logging
# maps just that page: the block is replaced by a table holding one page (one
# TLBI at level 2, one table page), and the next page faults in on its own.
def test_write_to_wp_block_without_eager_split():
    vm = vm_with_slot("anonymous_thp", 2 * MIB, 0, 0x40000000)
    populate(vm)
    enable_logging(vm)
    vcpu = vm.vcpus[0]
    vm.guest_access(vcpu, 0x40000000 + 5 * 4096, True)
    c = vm.take_counts()
    assert c.get("kvm", "perm_faults") == 1
    assert c.get("map", "calls") == 1 and c.by_level(None, "tlbi_ipa") == {2: 1}
    assert c.total("page_taken") == 1
    entries = [(ipa, lv) for ipa, lv, _ in vm.pgt.leaves()]
    assert entries == [(0x40000000 + 5 * 4096, 3)]
    vm.guest_access(vcpu, 0x40000000 + 6 * 4096, False)
    c = vm.take_counts()
    assert c.get("kvm", "trans_faults") == 1 and c.get("kvm", "dirty_marked") == 0
    assert len(list(vm.pgt.leaves())) == 2


def test_chunk_size_rules():
    vm = VM(G4)
    assert vm.check_extension(KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES) == (1 << 30) | (1 << 21) | (1 << 12)
    for bad in (4 * MIB, 3 * 4096, 1 << 29):
        with pytest.raises(KernelError, match="not 0 or a supported block size"):
            vm.set_eager_split_chunk_size(bad)
    vm.set_eager_split_chunk_size(GIB)
    vm.add_memslot(1, 0, 2 * MIB, parse_backing("anonymous", 4096))
    with pytest.raises(KernelError, match="before any memslot"):
        vm.set_eager_split_chunk_size(2 * MIB)
    vm16 = VM(Geometry(16384, 40))
    with pytest.raises(KernelError):
        vm16.set_eager_split_chunk_size(2 * MIB)
    vm16.set_eager_split_chunk_size(32 * MIB)


def test_memslot_rules():
    vm = VM(G4)
    anon = parse_backing("anonymous", 4096)
    vm.add_memslot(1, 0x100000, 2 * MIB, anon)
    with pytest.raises(KernelError, match="overlaps"):
        vm.add_memslot(2, 0x200000, 2 * MIB, anon)
    with pytest.raises(KernelError, match="not a positive multiple"):
        vm.add_memslot(3, 0x800000, 5000, anon)
    with pytest.raises(KernelError, match="beyond"):
        vm.add_memslot(4, (1 << 40) - 4096, 8192, anon)
    with pytest.raises(KernelError, match="first_page"):
        vm.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
        vm.clear_dirty_log(1, 3, 64, [1])


# Deleting a memslot unmaps it through stage2_apply_range: one unmap walk per
# granule(KVM_PGTABLE_MIN_BLOCK_LEVEL) piece -- 1G on 4K -- each with its own
# deferred range flush (FWB + TLBIRANGE). 2 MiB of 4K pages placed 1 MiB
# below a 1G boundary is two pieces; the same 2 MiB inside one 1G is one.
@pytest.mark.parametrize("gpa,walks", [(0xFFC0000000 - MIB, 2), (0xFFC0000000, 1)])
def test_memslot_delete_unmaps_per_1g_piece(gpa, walks):
    vm = vm_with_slot("anonymous", 2 * MIB, 0, gpa)
    populate(vm)
    vm.delete_memslot(1)
    c = vm.take_counts()
    assert c.get("unmap", "calls") == walks and c.get("unmap", "walks") == walks
    assert c.get("unmap", "flush_range") == walks
    assert c.get("unmap", "flush_range_bytes") == 2 * MIB
    assert c.by_level("unmap", "visit_leaf") == {3: 512}


# kvm_{get,clear}_dirty_log_protect: an id outside KVM_USER_MEM_SLOTS (32767 on
# arm64) or another address space is EINVAL before any lookup; a valid id
# with no dirty log is ENOENT; a bitmap shorter than the range faults in
# copy_from_user (EFAULT).
def test_dirty_log_ioctl_errnos():
    vm = vm_with_slot("anonymous", 2 * MIB, 0, 0xFFC0000000, manual=True)
    with pytest.raises(KernelError, match=r"\(ENOENT\)"):
        vm.get_dirty_log(1)  # logging not enabled yet
    enable_logging(vm)
    for bad in (32767, 1 | 1 << 16):
        with pytest.raises(KernelError, match=r"out of range \(EINVAL\)"):
            vm.get_dirty_log(bad)
    with pytest.raises(KernelError, match=r"\(ENOENT\)"):
        vm.get_dirty_log(2)
    with pytest.raises(KernelError, match=r"\(EFAULT\)"):
        vm.clear_dirty_log(1, 0, 512, [0] * 7)  # 512 pages need 8 words
    vm.clear_dirty_log(1, 0, 512, [0] * 8)


# A slot created with KVM_MEM_LOG_DIRTY_PAGES is one KVM_MR_CREATE: one ioctl,
# a dirty bitmap from the start (all set with manual-protect + initially-set,
# so the first KVM_GET_DIRTY_LOG returns every page), and the same stage-2
# work as creating the slot and then enabling logging (the latter is two
# ioctls). Read-only slots are refused whole, not left half made.
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_memslot_created_with_dirty_logging(engine):
    from s2split.engine.vm import FastVM
    make = VM if engine == "reference" else FastVM
    anon = parse_backing("anonymous", 4096)
    one, two = make(G4), make(G4)
    for vm in (one, two):
        vm.enable_cap(168, 3)
        vm.take_counts()
    one.add_memslot(1, 0xFFC0000000, 2 * MIB, anon, KVM_MEM_LOG_DIRTY_PAGES)
    two.add_memslot(1, 0xFFC0000000, 2 * MIB, anon)
    two.set_memslot_flags(1, KVM_MEM_LOG_DIRTY_PAGES)
    a, b = one.take_counts(), two.take_counts()
    assert a.get("kvm", "ioctls") == 1 and b.get("kvm", "ioctls") == 2
    # only the ioctl count differs: one fewer
    assert (a.array != b.array).sum() == 1 and (a.array - b.array).sum() == -1
    assert [int(w) for w in one.get_dirty_log(1)] == [(1 << 64) - 1] * 8
    with pytest.raises(S2Error, match="KVM_MEM_READONLY"):
        one.add_memslot(2, 0xFF80000000, 2 * MIB, anon, KVM_MEM_READONLY)
    assert 2 not in one.memslots
