"""The ``dirty_log_perf_test`` workload, as upstream runs it (Linux 6.12 selftests).

memstress places the test memory at the top of the guest physical address
space -- one page below the end, aligned down to the backing page size -- and
splits it into ``-x`` memslots and ``-v`` vCPU regions. Every vCPU then makes
passes over its region, touching one word per page: the populate pass writes
every page in order; each iteration's pass writes ``-w`` percent of the pages
(``-a``: at random pages) using the selftests' Park-Miller generator, whose
state persists across passes. Each pass ends with a ``GUEST_SYNC``, an MMIO
exit.

The phases, in order: ``create_vm``, ``populate``, ``enable_dirty_logging``,
then per iteration ``iterN_dirty``, ``iterN_get_dirty_log`` and (manual-protect)
``iterN_clear_dirty_log``, then ``disable_dirty_logging`` and ``destroy_vm``.

A note on seeds: since Linux 6.10 memstress seeds vCPU ``k`` with
``guest_random_seed + k``, but ``guest_random_seed`` is never copied into the
guest, whose copy stays 0. Upstream therefore seeds vCPU ``k`` with ``k``
whatever ``-r`` says (vCPU 0's generator is stuck at 0). ``seed_synced=False``
(the default) reproduces that; ``seed_synced=True`` gives the intended
``seed + k`` (what 6.3-6.9 did).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from .arch import Geometry, size_name
from .counters import Counts
from .errors import S2Error
from .hw import Features
from .kvm.backing import Backing, parse_backing
from .kvm.memslot import KVM_MEM_LOG_DIRTY_PAGES
from .modes import DEFAULT_MODE, GuestMode, parse_mode
from .pgtable.variants import Variant

MEMSTRESS_MEM_SLOT_INDEX = 1
DEFAULT_PER_VCPU_MEM_SIZE = 1 << 30
PRNG_MULTIPLIER = 48271
PRNG_MODULUS = (1 << 31) - 1


def guest_random_u32(state: int) -> int:
    """``guest_random_u32()``: the next state, which is also the value returned."""
    return state * PRNG_MULTIPLIER % PRNG_MODULUS


@dataclass(frozen=True)
class PerfTestParams:
    """One ``dirty_log_perf_test`` configuration (upstream letters in comments)."""

    vcpu_memory_bytes: int = DEFAULT_PER_VCPU_MEM_SIZE  # -b
    vcpus: int = 1  # -v
    backing: str = "anonymous"  # -s
    manual_protect: bool = True  # not -g
    iterations: int = 2  # -i
    mode: GuestMode = DEFAULT_MODE  # -m
    slots: int = 1  # -x
    write_percent: int = 100  # -w
    random_access: bool = False  # -a
    partition: bool = True  # not -o
    seed: int = 1  # -r
    chunk_size: int = 0  # the eager-split chunk size (0: off, as upstream)
    seed_synced: bool = False
    features: Features = field(default_factory=Features)
    host_va_bits: int = 48
    lpa2: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 2:
            raise S2Error(f"-i {self.iterations}: the test should have at least two iterations")
        if self.vcpus < 1:
            raise S2Error(f"-v {self.vcpus}: the number of vCPUs must be greater than 0")
        if self.slots < 1:
            raise S2Error(f"-x {self.slots}: the number of memslots must be greater than 0")
        if not 0 <= self.write_percent <= 100:
            raise S2Error(f"-w {self.write_percent}: write percentage must be between 0 and 100")
        if self.vcpu_memory_bytes <= 0:
            raise S2Error("-b: the memory size per vCPU must be greater than 0")
        if self.seed < 0 or self.seed >= 1 << 32:
            raise S2Error(f"-r {self.seed}: the seed must fit 32 bits")
        if not 32 <= self.host_va_bits <= 52:
            raise S2Error(f"host VA bits {self.host_va_bits}: must be 32..52")

    @property
    def granule(self) -> int:
        return self.mode.page_size

    def geometry(self) -> Geometry:
        lpa = self.lpa2 and self.granule == 65536
        return Geometry(self.granule, self.mode.pa_bits, lpa2=self.lpa2 and not lpa, lpa=lpa)

    def backing_type(self) -> Backing:
        return parse_backing(self.backing, self.granule)

    def label(self) -> str:
        return ("manual_protect" if self.manual_protect else "no_manual_protect")

    def argv(self) -> list[str]:
        """Options of the ``s2split perf-test`` command reproducing this run."""
        out = ["-m", str(self.mode.id) if self.mode.id >= 0 else self.mode.name]
        if self.mode.id < 0:
            out = ["--granule", size_name(self.granule), "--ipa-bits", str(self.mode.pa_bits)]
        out += ["-b", size_name(self.vcpu_memory_bytes), "-s", self.backing]
        if self.vcpus != 1:
            out += ["-v", str(self.vcpus)]
        if not self.manual_protect:
            out.append("-g")
        if self.iterations != 2:
            out += ["-i", str(self.iterations)]
        if self.slots != 1:
            out += ["-x", str(self.slots)]
        if self.write_percent != 100:
            out += ["-w", str(self.write_percent)]
        if self.random_access:
            out.append("-a")
        if not self.partition:
            out.append("-o")
        if self.seed != 1:
            out += ["-r", str(self.seed)]
        out += ["--chunk-size", size_name(self.chunk_size) if self.chunk_size else "0"]
        if self.seed_synced:
            out.append("--seed-synced")
        if self.features != Features():
            out += ["--cpu", ",".join(("" if v else "-") + k
                                     for k, v in asdict(self.features).items())]
        if self.host_va_bits != 48:
            out += ["--host-va-bits", str(self.host_va_bits)]
        if self.lpa2:
            out.append("--lpa2")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"] = self.mode.name
        d["mode_id"] = self.mode.id
        d["pa_bits"] = self.mode.pa_bits
        d["granule"] = self.granule
        d["features"] = asdict(self.features)
        return d


@dataclass(frozen=True)
class Layout:
    """Where memstress puts things (``memstress_create_vm``/``memstress_setup_vcpus``)."""

    gpa: int
    size: int
    guest_num_pages: int
    pages_per_slot: int
    slots: tuple[tuple[int, int, int], ...]  # (slot id, gpa, pages)
    vcpus: tuple[tuple[int, int], ...]  # (gpa, pages)


def memstress_layout(p: PerfTestParams) -> Layout:
    """The test region and its slots and vCPU regions, with memstress's checks."""
    page = p.granule
    backing = p.backing_type()
    if p.vcpu_memory_bytes % page:
        raise S2Error(f"-b {p.vcpu_memory_bytes:#x}: guest memory size is not guest page size "
                      f"({size_name(page)}) aligned")
    guest_num_pages = p.vcpus * p.vcpu_memory_bytes // page
    if guest_num_pages % p.slots:
        raise S2Error(f"guest memory ({guest_num_pages} pages) cannot be evenly divided into "
                      f"{p.slots} slots")
    region_end_gfn = (1 << p.mode.pa_bits) // page  # vm->max_gfn + 1
    if guest_num_pages >= region_end_gfn:
        raise S2Error(f"requested more guest memory ({size_name(guest_num_pages * page)}) than "
                      f"the {p.mode.pa_bits}-bit address space allows")
    gpa = (region_end_gfn - guest_num_pages - 1) * page
    gpa &= ~(backing.page_size - 1)
    size = guest_num_pages * page
    region_pages = guest_num_pages // p.slots
    slots = []
    for i in range(p.slots):
        start = gpa + region_pages * page * i
        if start % backing.page_size:
            raise S2Error(f"memslot {MEMSTRESS_MEM_SLOT_INDEX + i} would start at {start:#x}, "
                          f"not aligned to the {size_name(backing.page_size)} backing page size "
                          "(guest_paddr != align_up(guest_paddr, backing_src_pagesz))")
        slots.append((MEMSTRESS_MEM_SLOT_INDEX + i, start, region_pages))
    per_vcpu = p.vcpu_memory_bytes // page
    vcpus = tuple((gpa + i * p.vcpu_memory_bytes, per_vcpu) if p.partition else (gpa, guest_num_pages)
                  for i in range(p.vcpus))
    return Layout(gpa, size, guest_num_pages, guest_num_pages // p.slots, tuple(slots), vcpus)


def memstress_pass(vm: Any, write_percent: int, random_access: bool) -> None:
    """One pass of ``memstress_guest_code`` for every vCPU, on a reference VM.

    vCPUs run in lockstep, one access each in index order: a deterministic
    stand-in for parallel vCPUs. Each draws one number for the page (random
    access only), then one for the write decision.
    """
    page = vm.geom.granule
    vcpus = vm.vcpus
    access = vm.guest_access
    longest = max((v.pages for v in vcpus), default=0)
    for i in range(longest):
        for v in vcpus:
            if i >= v.pages:
                continue
            if random_access:
                v.rng = v.rng * PRNG_MULTIPLIER % PRNG_MODULUS
                pg = v.rng % v.pages
            else:
                pg = i
            v.rng = v.rng * PRNG_MULTIPLIER % PRNG_MODULUS
            access(v, v.gpa + pg * page, v.rng % 100 < write_percent)
    for v in vcpus:
        vm.guest_mmio_exit(v)


@dataclass
class RunResult:
    """The counts of one perf-test run under one variant."""

    params: PerfTestParams
    variant: str
    engine: str
    layout: Layout
    phases: list[tuple[str, Counts]]
    tables: bytes = b""
    bitmaps: dict[int, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def phase(self, name: str) -> Counts:
        for n, c in self.phases:
            if n == name:
                return c
        raise KeyError(name)

    @property
    def phase_names(self) -> list[str]:
        return [n for n, _ in self.phases]


def phase_names(p: PerfTestParams) -> list[str]:
    names = ["create_vm", "populate", "enable_dirty_logging"]
    for i in range(1, p.iterations + 1):
        names += [f"iter{i}_dirty", f"iter{i}_get_dirty_log"]
        if p.manual_protect:
            names.append(f"iter{i}_clear_dirty_log")
    return names + ["disable_dirty_logging", "destroy_vm"]


def run_perf_test(p: PerfTestParams, variant: Variant, engine: Any = None,
                  keep_tables: bool = False,
                  on_phase: Callable[[str], None] | None = None) -> RunResult:
    """Run the whole test on one engine under one variant."""
    from .engine import get_engine

    eng = get_engine(engine, p, variant)
    layout = memstress_layout(p)
    t0 = time.perf_counter()
    vm = eng.create_vm(p.geometry(), p.features, variant, p.host_va_bits)
    phases: list[tuple[str, Counts]] = []

    def end_phase(name: str) -> None:
        phases.append((name, vm.take_counts()))
        if on_phase:
            on_phase(name)

    # The selftest patch of the fixtures: the chunk size right after KVM_CREATE_VM.
    vm.set_eager_split_chunk_size(p.chunk_size)
    backing = p.backing_type()
    for slot_id, gpa, pages in layout.slots:
        vm.add_memslot(slot_id, gpa, pages * p.granule, backing)
    if p.manual_protect:
        vm.enable_cap(168, 3)  # MANUAL_DIRTY_LOG_PROTECT2: MANUAL_PROTECT_ENABLE|INITIALLY_SET
    seed0 = p.seed if p.seed_synced else 0
    for i, (gpa, pages) in enumerate(layout.vcpus):
        vm.add_vcpu(gpa, pages, (seed0 + i) & 0xFFFFFFFF)
    end_phase("create_vm")

    vm.guest_pass(100, False)
    end_phase("populate")

    for slot_id, _, _ in layout.slots:
        vm.set_memslot_flags(slot_id, KVM_MEM_LOG_DIRTY_PAGES)
    end_phase("enable_dirty_logging")

    bitmaps: dict[int, list[int]] = {}
    for it in range(1, p.iterations + 1):
        vm.guest_pass(p.write_percent, p.random_access)
        end_phase(f"iter{it}_dirty")
        for slot_id, _, _ in layout.slots:
            bitmaps[slot_id] = vm.get_dirty_log(slot_id)
        end_phase(f"iter{it}_get_dirty_log")
        if p.manual_protect:
            for slot_id, _, _ in layout.slots:
                vm.clear_dirty_log(slot_id, 0, layout.pages_per_slot, bitmaps[slot_id])
            end_phase(f"iter{it}_clear_dirty_log")

    for slot_id, _, _ in layout.slots:
        vm.set_memslot_flags(slot_id, 0)
    end_phase("disable_dirty_logging")
    tables = vm.dump_tables() if keep_tables else b""

    for slot_id, _, _ in layout.slots:
        vm.delete_memslot(slot_id)
    vm.destroy()
    end_phase("destroy_vm")
    return RunResult(p, variant.name, vm.engine, layout, phases, tables, bitmaps,
                     time.perf_counter() - t0)


def with_params(p: PerfTestParams, **changes: Any) -> PerfTestParams:
    return replace(p, **changes)


__all__ = ["PerfTestParams", "Layout", "memstress_layout", "memstress_pass", "run_perf_test",
           "RunResult", "phase_names", "guest_random_u32", "parse_mode"]
