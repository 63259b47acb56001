"""The parameters of one ``dirty_log_perf_test`` run (its options, upstream
letters in comments) and where memstress puts its memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..arm64.arch import GRANULES, Geometry, size_name
from ..arm64.features import Features
from ..arm64.versions import DEFAULT_KERNEL, kernel_rules
from ..model.kvm.backing import Backing, parse_backing
from ..plumbing.errors import S2Error
from ..selftest.memstress import Layout, check_upstream_options
from ..selftest.memstress import memstress_layout as _layout
from ..selftest.memstress import upstream_argv
from ..selftest.modes import DEFAULT_MODE, GuestMode

DEFAULT_PER_VCPU_MEM_SIZE = 1 << 30
#: ``kvm_vgic_global_state.max_gic_vcpus`` with a GICv3: what dirty_log_perf_test
#: checks ``-v`` against on arm64.
KVM_MAX_VCPUS = 512


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
    kernel: str = DEFAULT_KERNEL  # the kernel's rules (arm64/versions.py)
    #: The kernel whose source tree the selftest was built from (its teardown
    #: and mode numbering); None: the kernel's own.
    selftest: str | None = None
    #: The host kernel's page size, which is the stage-2 granule (and the unit
    #: of backing pages and dirty bitmaps); None: the guest mode's page size.
    host_page_size: int | None = None

    def __post_init__(self) -> None:
        check_upstream_options(self)
        kernel_rules(self.kernel)
        if self.selftest == self.kernel:
            object.__setattr__(self, "selftest", None)  # one spelling per config
        if self.selftest is not None:
            kernel_rules(self.selftest)
        if not 32 <= self.host_va_bits <= 52:
            raise S2Error(f"host VA bits {self.host_va_bits}: must be 32..52")
        if self.host_page_size == self.mode.page_size:
            object.__setattr__(self, "host_page_size", None)  # one spelling per config
        if self.host_page_size is not None and self.host_page_size not in GRANULES:
            raise S2Error(f"host page size {self.host_page_size}: use 4K, 16K or 64K")
        if self.vcpus > KVM_MAX_VCPUS:
            raise S2Error(f"-v {self.vcpus}: invalid number of vCPUs, must be between 1 and "
                          f"{KVM_MAX_VCPUS} (KVM_CAP_MAX_VCPUS of arm64 KVM with a GICv3)")

    @property
    def granule(self) -> int:
        """The stage-2 granule: the host kernel's page size."""
        return self.host_page_size or self.mode.page_size

    @property
    def guest_page_size(self) -> int:
        """The pages the guest writes one word into: the guest mode's."""
        return self.mode.page_size

    def geometry(self) -> Geometry:
        lpa = self.lpa2 and self.granule == 65536
        return Geometry(self.granule, self.mode.pa_bits, lpa2=self.lpa2 and not lpa, lpa=lpa)

    def backing_type(self) -> Backing:
        return parse_backing(self.backing, self.granule)

    def argv(self) -> list[str]:
        """Options of the ``s2split perf-test`` command reproducing this run."""
        out = upstream_argv(self)
        out += ["--chunk-size", size_name(self.chunk_size) if self.chunk_size else "0"]
        if self.seed_synced:
            out.append("--seed-synced")
        if self.features != Features():
            # One word: "--cpu -vhe,..." would read as two options.
            out.append("--cpu=" + self.features.spec())
        if self.host_va_bits != 48:
            out += ["--host-va-bits", str(self.host_va_bits)]
        if self.lpa2:
            out.append("--lpa2")
        if self.kernel != DEFAULT_KERNEL:
            out += ["--kernel", self.kernel]
        if self.selftest is not None:
            out += ["--selftest", self.selftest]
        if self.host_page_size is not None:
            out += ["--host-page-size", size_name(self.host_page_size)]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mode"] = self.mode.name
        d["mode_id"] = self.mode.id
        d["pa_bits"] = self.mode.pa_bits
        d["granule"] = self.granule
        d["guest_page_size"] = self.guest_page_size
        d["features"] = self.features.as_dict()
        if d["selftest"] is None:
            del d["selftest"]  # runs of a kernel's own selftest keep their keys
        return d

    @property
    def selftest_rules(self):
        """The rules of the kernel whose selftest runs (teardown, mode ids)."""
        return kernel_rules(self.selftest or self.kernel)


def memstress_layout(p: PerfTestParams) -> Layout:
    """The test region and its slots and vCPU regions, with memstress's checks."""
    return _layout(p.guest_page_size, p.mode.pa_bits, p.vcpus, p.vcpu_memory_bytes, p.slots,
                   p.partition, p.backing_type().page_size, p.granule)
