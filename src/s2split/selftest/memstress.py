"""Where the selftests' memstress library puts the test memory (numpy-free).

Shared by the model (:mod:`s2split.workload`) and the real-KVM harness
(:mod:`s2split.hw`, which must run on a bare Python), so that both place
memory exactly alike: ``memstress_create_vm`` puts the test region at the top
of the guest physical space, one page below the end, aligned down to the
backing page size, split evenly into memslots, with one region per vCPU
(or one shared region with ``-o``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..arm64.arch import size_name
from ..plumbing.errors import S2Error

MEMSTRESS_MEM_SLOT_INDEX = 1
#: The selftests read numeric options with ``atoi_positive()``: 1..INT_MAX.
INT_MAX = (1 << 31) - 1
#: The selftests' guest pRNG (Park-Miller "minimal standard").
PRNG_MULTIPLIER = 48271
PRNG_MODULUS = (1 << 31) - 1


def guest_random_u32(state: int) -> int:
    """``guest_random_u32()``: the next state, which is also the value returned."""
    return state * PRNG_MULTIPLIER % PRNG_MODULUS


@dataclass(frozen=True)
class Layout:
    """The test region, its memslots and the vCPU regions (guest pages)."""

    gpa: int
    size: int
    guest_num_pages: int
    pages_per_slot: int
    slots: tuple[tuple[int, int, int], ...]  # (slot id, gpa, pages)
    vcpus: tuple[tuple[int, int], ...]  # (gpa, pages)


def memstress_layout(page: int, pa_bits: int, vcpus: int, vcpu_memory_bytes: int, slots: int,
                     partition: bool, backing_page_size: int,
                     host_page: int | None = None) -> Layout:
    """The placement, with memstress's checks and messages. ``page`` is the
    guest's page size (the mode's), in which the layout is counted;
    ``host_page`` the host kernel's, when known."""
    if host_page is not None and vcpu_memory_bytes % host_page:
        raise S2Error(f"-b {vcpu_memory_bytes:#x}: guest memory size is not host page size "
                      f"({size_name(host_page)}) aligned")
    if vcpu_memory_bytes % page:
        raise S2Error(f"-b {vcpu_memory_bytes:#x}: guest memory size is not guest page size "
                      f"({size_name(page)}) aligned")
    guest_num_pages = vcpus * vcpu_memory_bytes // page
    if guest_num_pages % slots:
        raise S2Error(f"guest memory ({guest_num_pages} pages) cannot be evenly divided into "
                      f"{slots} slots")
    region_end_gfn = (1 << pa_bits) // page  # vm->max_gfn + 1
    if guest_num_pages >= region_end_gfn:
        raise S2Error(f"requested more guest memory ({size_name(guest_num_pages * page)}) than "
                      f"the {pa_bits}-bit address space allows")
    gpa = (region_end_gfn - guest_num_pages - 1) * page
    gpa &= ~(backing_page_size - 1)
    region_pages = guest_num_pages // slots
    placed = []
    for i in range(slots):
        start = gpa + region_pages * page * i
        if start % backing_page_size:
            raise S2Error(f"memslot {MEMSTRESS_MEM_SLOT_INDEX + i} would start at {start:#x}, "
                          f"not aligned to the {size_name(backing_page_size)} backing page size "
                          "(guest_paddr != align_up(guest_paddr, backing_src_pagesz))")
        placed.append((MEMSTRESS_MEM_SLOT_INDEX + i, start, region_pages))
    per_vcpu = vcpu_memory_bytes // page
    regions = tuple((gpa + i * vcpu_memory_bytes, per_vcpu) if partition
                    else (gpa, guest_num_pages) for i in range(vcpus))
    return Layout(gpa, guest_num_pages * page, guest_num_pages, region_pages, tuple(placed),
                  regions)


def guest_random_skip(state: int, n: int) -> int:
    """The state after ``n`` calls of :func:`guest_random_u32` (``n >= 0``):
    the generator multiplies by ``PRNG_MULTIPLIER`` modulo ``PRNG_MODULUS``
    each call, so ``n`` calls multiply by its ``n``-th power (found by
    squaring). ``state`` may exceed the modulus (a 32-bit seed); every
    product stays below 2**63."""
    if n <= 0:
        return state
    power = 1
    base = PRNG_MULTIPLIER
    while n:
        if n & 1:
            power = power * base % PRNG_MODULUS
        base = base * base % PRNG_MODULUS
        n >>= 1
    return state * power % PRNG_MODULUS


def vcpu_seed(p, index: int) -> int:
    """The guest pRNG's initial state on vCPU ``index``: ``guest_random_seed +
    index``, where upstream 6.10+ never copies the test's seed into the guest,
    so the guest's ``guest_random_seed`` stays 0 (``seed_synced``: the ``-r``
    value, as intended)."""
    return ((p.seed if p.seed_synced else 0) + index) & 0xFFFFFFFF


def check_upstream_options(p) -> None:
    """The selftest's checks of its options, on anything with the fields of
    :class:`s2split.workload.PerfTestParams`."""
    if p.iterations < 2:
        raise S2Error(f"-i {p.iterations}: the test should have at least two iterations")
    if p.vcpus < 1:
        raise S2Error(f"-v {p.vcpus}: the number of vCPUs must be greater than 0")
    if p.slots < 1:
        raise S2Error(f"-x {p.slots}: the number of memslots must be greater than 0")
    if not 0 <= p.write_percent <= 100:
        raise S2Error(f"-w {p.write_percent}: write percentage must be between 0 and 100")
    if p.vcpu_memory_bytes <= 0:
        raise S2Error("-b: the memory size per vCPU must be greater than 0")
    if not 1 <= p.seed <= INT_MAX:
        raise S2Error(f"-r {p.seed}: the random seed must be between 1 and {INT_MAX}")


def upstream_argv(p) -> list[str]:
    """The ``dirty_log_perf_test`` options (and ``--granule/--ipa-bits`` for a
    mode without an ID) of a configuration: anything with the fields of
    :class:`s2split.workload.PerfTestParams` -- the model's and the harness's."""
    if p.mode.id >= 0:
        out = ["-m", str(p.mode.id)]
    else:
        out = ["--granule", size_name(p.mode.page_size), "--ipa-bits", str(p.mode.pa_bits)]
    out += ["-b", size_name(p.vcpu_memory_bytes), "-s", p.backing]
    if p.vcpus != 1:
        out += ["-v", str(p.vcpus)]
    if not p.manual_protect:
        out.append("-g")
    if p.iterations != 2:
        out += ["-i", str(p.iterations)]
    if p.slots != 1:
        out += ["-x", str(p.slots)]
    if p.write_percent != 100:
        out += ["-w", str(p.write_percent)]
    if p.random_access:
        out.append("-a")
    if not p.partition:
        out.append("-o")
    if p.seed != 1:
        out += ["-r", str(p.seed)]
    return out


def memstress_pass(vm: Any, write_percent: int, random_access: bool) -> None:
    """One pass of ``memstress_guest_code`` for every vCPU, on a reference VM.

    vCPUs run in lockstep, one access each in index order: a deterministic
    stand-in for parallel vCPUs. Each draws one number for the page (random
    access only), then one for the write decision.
    """
    page = vm.guest_page_size
    vcpus = vm.vcpus
    access = vm.guest_access
    longest = max((v.pages for v in vcpus), default=0)
    for i in range(longest):
        for v in vcpus:
            if i >= v.pages:
                continue
            if random_access:
                v.rng = guest_random_u32(v.rng)
                pg = v.rng % v.pages
            else:
                pg = i
            v.rng = guest_random_u32(v.rng)
            access(v, v.gpa + pg * page, v.rng % 100 < write_percent)
    for v in vcpus:
        vm.guest_mmio_exit(v)
