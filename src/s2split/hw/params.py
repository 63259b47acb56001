"""One harness configuration and where memstress puts its memory (numpy-free).

:class:`HwParams` carries the ``dirty_log_perf_test`` options of
:class:`s2split.workload.PerfTestParams` that mean something on real hardware,
plus the eager-split chunk size. :func:`memstress_layout` places memory with
the model's own code (:mod:`s2split.selftest.memstress`, numpy-free like everything
``hw run`` imports), so the harness puts memory exactly where the model does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..arm64.arch import size_name
from ..plumbing.errors import S2Error
from ..selftest.memstress import Layout
from ..selftest.memstress import memstress_layout as _layout
from ..selftest.memstress import check_upstream_options, upstream_argv, vcpu_seed
from ..selftest.modes import MODES, GuestMode, parse_mode


@dataclass(frozen=True)
class HwParams:
    """One configuration of ``s2split hw run`` (upstream letters in comments)."""

    vcpu_memory_bytes: int = 1 << 30  # -b
    vcpus: int = 1  # -v
    backing: str = "anonymous"  # -s
    manual_protect: bool = True  # not -g
    iterations: int = 2  # -i
    mode: GuestMode = MODES[6]  # -m
    slots: int = 1  # -x
    write_percent: int = 100  # -w
    random_access: bool = False  # -a
    partition: bool = True  # not -o
    seed: int = 1  # -r
    chunk_size: int | None = None  # None: KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE left alone
    seed_synced: bool = False
    x86_map: int = 1 << 21  # x86-64 only: guest page-table mapping size

    def __post_init__(self) -> None:
        check_upstream_options(self)
        if self.chunk_size is not None and (self.chunk_size < 0 or
                                            self.chunk_size & (self.chunk_size - 1)):
            raise S2Error(f"--chunk-size {self.chunk_size:#x}: not 0 or a power of two")

    @property
    def granule(self) -> int:
        return self.mode.page_size

    def vcpu_seed(self, index: int) -> int:
        return vcpu_seed(self, index)

    def argv(self) -> list[str]:
        """Options reproducing this configuration (also its key in the store)."""
        out = upstream_argv(self)
        if self.chunk_size is not None:
            out += ["--chunk-size", size_name(self.chunk_size) if self.chunk_size else "0"]
        if self.seed_synced:
            out.append("--seed-synced")
        return out

    def config_key(self) -> str:
        return " ".join(self.argv())

    def to_config(self) -> dict[str, Any]:
        """The configuration as stored with each measurement; the keys match
        :meth:`s2split.workload.PerfTestParams.to_dict` where they exist."""
        return {"vcpu_memory_bytes": self.vcpu_memory_bytes, "vcpus": self.vcpus,
                "backing": self.backing, "manual_protect": self.manual_protect,
                "iterations": self.iterations, "mode": self.mode.name,
                "mode_id": self.mode.id,
                # None for a mode of any PA size (x86's "PA-bits:ANY"), not 0
                "pa_bits": self.mode.pa_bits or None,
                "granule": self.granule, "slots": self.slots,
                "write_percent": self.write_percent, "random_access": self.random_access,
                "partition": self.partition, "seed": self.seed,
                "chunk_size": self.chunk_size, "seed_synced": self.seed_synced}

    def perf_test_params(self, features: Any = None, host_page_size: int | None = None) -> Any:
        """The model's configuration of the same run (imports the model) on a
        host kernel with ``host_page_size`` pages (None: the mode's)."""
        from dataclasses import fields

        from ..workload import PerfTestParams
        shared = {f.name for f in fields(PerfTestParams)} & {f.name for f in fields(self)}
        kw = {name: getattr(self, name) for name in shared}
        kw["chunk_size"] = self.chunk_size or 0  # not set: eager splitting off
        if features is not None:
            kw["features"] = features
        return PerfTestParams(**kw, host_page_size=host_page_size)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HwParams":
        mode = mode_from_config(config)
        return cls(vcpu_memory_bytes=int(config["vcpu_memory_bytes"]),
                   vcpus=int(config.get("vcpus", 1)),
                   backing=str(config.get("backing", "anonymous")),
                   manual_protect=bool(config.get("manual_protect", True)),
                   iterations=int(config.get("iterations", 2)), mode=mode,
                   slots=int(config.get("slots", 1)),
                   write_percent=int(config.get("write_percent", 100)),
                   random_access=bool(config.get("random_access", False)),
                   partition=bool(config.get("partition", True)),
                   seed=int(config.get("seed", 1)),
                   chunk_size=config.get("chunk_size"),
                   seed_synced=bool(config.get("seed_synced", False)))


def mode_from_config(config: dict[str, Any]) -> GuestMode:
    mode_id = config.get("mode_id", -1)
    if isinstance(mode_id, int) and 0 <= mode_id < len(MODES):
        return MODES[mode_id]
    if config.get("mode"):
        try:
            return parse_mode(str(config["mode"]))
        except S2Error:
            pass
    # the model's results store the stage-2 granule (host pages) as "granule"
    # and the mode's page size as "guest_page_size"; the harness's, only "granule"
    page = config.get("guest_page_size", config["granule"])
    return GuestMode(-1, str(config.get("mode", "custom")), int(config["pa_bits"]), 48, int(page))


def memstress_layout(p: HwParams, backing_page_size: int) -> Layout:
    """``memstress_create_vm``'s placement for ``p`` with backing pages of
    ``backing_page_size`` bytes (``get_backing_src_pagesz``), with its checks."""
    return _layout(p.granule, p.mode.pa_bits, p.vcpus, p.vcpu_memory_bytes, p.slots,
                   p.partition, backing_page_size)
