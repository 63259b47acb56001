"""The kprobes of ``s2split fidelity record``: which kernel functions, which
arguments they are keyed by, and how each is found in the running kernel.

* **Arguments from BTF where the kernel has it.** A kernel with
  ``CONFIG_PROBE_EVENTS_BTF_ARGS`` (tracefs's README then documents
  ``<argname>``) fetches arguments by their names in the function's
  prototype, and struct fields by name (``ctx->level``), whatever register or
  offset they are in. Without it, or when the kernel refuses a named
  argument (a prototype that changed), the fetch falls back to Linux 6.12's
  arm64 registers (x0-x7) and the field offset of that version.
* **GCC clones.** GCC may emit a function only as a clone
  (``name.isra.0``, ``name.constprop.0``, ``name.part.0``): the plain name is
  then absent from ``available_filter_functions`` and ``/proc/kallsyms``.
  :meth:`Symbols.resolve` finds the clones; each is probed, and their calls
  are counted as the function's. A clone's arguments need not be the
  original's (GCC drops or reorders them), so a clone is counted as a whole,
  never keyed by arguments.
* **Functions at EL2.** Under nVHE (and pKVM's protected mode) the hypervisor
  runs at EL2, where EL1's kprobes never fire: the TLB maintenance functions
  under nVHE, and under protected mode also the whole stage-2 page-table code
  (the walker, its callbacks, the table functions). :func:`el2_functions`
  names them, so that ``record`` says so in one line and counts the rest.
* **Teardown since Linux 6.17.** The host calls
  ``kvm_pgtable_stage2_destroy_range`` per chunk and
  ``kvm_pgtable_stage2_destroy_pgd`` once, never
  ``kvm_pgtable_stage2_destroy``; all three are probed, and whichever the
  kernel has is counted.

Standard library only, like the harness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: ``offsetof(struct kvm_pgtable_visit_ctx, level)`` in Linux 6.12 (arm64):
#: seven 8-byte fields before it; the register fallback only.
VISIT_CTX_LEVEL_OFFSET = 56
_WALKER_ARGS = f"level=+{VISIT_CTX_LEVEL_OFFSET}(%x0):s8 visit=%x1:u32"
_WALKER_BTF = "level=ctx->level:s8 visit=visit:u32"
_ALL = "k=\\0"


@dataclass(frozen=True)
class Probe:
    """One kprobe event and its hist trigger: ``fetch`` are the kprobe's
    arguments (registers), ``btf`` the same by argument name (None: no
    arguments, or none by name), ``keys`` the hist keys, ``vals`` fields
    summed besides the hit count. ``symbol``: the kernel symbol probed when
    it is not ``function`` (a GCC clone)."""

    function: str
    fetch: str
    keys: str
    vals: tuple[str, ...] = ()
    btf: str | None = None
    symbol: str = ""

    @property
    def target(self) -> str:
        return self.symbol or self.function

    @property
    def event(self) -> str:
        """The event's name: the symbol, with what event names cannot hold
        (the dots of a clone's suffix) as underscores."""
        return re.sub(r"\W", "_", self.target)

    def trigger(self) -> str:
        vals = ",".join(("hitcount", *self.vals))
        return f"hist:keys={self.keys}:vals={vals}:sort=hitcount:size=256"

    def counted_whole(self) -> "Probe":
        """This probe on a clone: counted as a whole, keyed by a constant."""
        return Probe(self.function, _ALL, "k", (), None, self.symbol)


PROBES = (
    Probe("kvm_pgtable_walk", "size=%x2:u64 cb=+0(%x3):u64", "cb.sym", ("size",),
          "size=size:u64 cb=walker->cb:u64"),
    Probe("__kvm_pgtable_walk", "level=%x3:s8", "level", (), "level=level:s8"),
    *(Probe(cb, _WALKER_ARGS, "level,visit", (), _WALKER_BTF) for cb in (
        "stage2_map_walker", "stage2_attr_walker", "stage2_split_walker",
        "stage2_unmap_walker", "stage2_free_walker", "leaf_walker")),
    Probe("kvm_pgtable_stage2_map", "size=%x2:u64", "size", (), "size=size:u64"),
    Probe("kvm_pgtable_stage2_unmap", f"{_ALL} size=%x2:u64", "k", ("size",),
          f"{_ALL} size=size:u64"),
    Probe("kvm_pgtable_stage2_wrprotect", f"{_ALL} size=%x2:u64", "k", ("size",),
          f"{_ALL} size=size:u64"),
    Probe("kvm_pgtable_stage2_relax_perms", _ALL, "k"),
    Probe("kvm_pgtable_stage2_split", f"{_ALL} size=%x2:u64", "k", ("size",),
          f"{_ALL} size=size:u64"),
    Probe("kvm_pgtable_stage2_create_unlinked", "level=%x2:s8 force_pte=%x5:u8",
          "level,force_pte", (), "level=level:s8 force_pte=force_pte:u8"),
    Probe("kvm_pgtable_stage2_free_unlinked", "level=%x2:s8", "level", (), "level=level:s8"),
    Probe("kvm_pgtable_stage2_destroy", _ALL, "k"),
    # Linux 6.17+: the host tears the tables down by range, then frees the PGD.
    Probe("kvm_pgtable_stage2_destroy_range", f"{_ALL} size=%x2:u64", "k", ("size",),
          f"{_ALL} size=size:u64"),
    Probe("kvm_pgtable_stage2_destroy_pgd", _ALL, "k"),
    Probe("kvm_mmu_split_huge_pages", _ALL, "k"),
    Probe("kvm_arch_mmu_enable_log_dirty_pt_masked", _ALL, "k"),
    Probe("__kvm_mmu_topup_memory_cache", "min=%x2:s32", "min", (), "min=min:s32"),
    Probe("kvm_handle_guest_abort", _ALL, "k"),
    Probe("__kvm_tlb_flush_vmid_ipa", "level=%x2:s32", "level", (), "level=level:s32"),
    Probe("__kvm_tlb_flush_vmid_ipa_nsh", "level=%x2:s32", "level", (), "level=level:s32"),
    Probe("kvm_tlb_flush_vmid_range", f"{_ALL} size=%x2:u64", "k", ("size",),
          f"{_ALL} size=size:u64"),
    Probe("__kvm_tlb_flush_vmid_range", f"{_ALL} pages=%x2:u64", "k", ("pages",),
          f"{_ALL} pages=pages:u64"),
    Probe("__kvm_tlb_flush_vmid", _ALL, "k"),
)

#: The functions kvm_call_hyp() runs at EL2 under nVHE: TLB maintenance.
NVHE_EL2 = ("__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid_ipa_nsh",
            "__kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid")
#: Under protected mode the hypervisor also owns the guest's stage-2 tables:
#: the walker, its callbacks and the table functions run at EL2 too.
PROTECTED_EL2 = NVHE_EL2 + tuple(
    p.function for p in PROBES
    if p.function.startswith(("kvm_pgtable_", "__kvm_pgtable_", "stage2_", "leaf_walker",
                              "kvm_tlb_flush_vmid_range")))


def el2_functions(mode: str | None) -> tuple[str, ...]:
    """The probed functions that run at EL2 in KVM's ``mode``."""
    return {"nvhe": NVHE_EL2, "protected": PROTECTED_EL2}.get(mode or "", ())


def kvm_mode(cmdline: str, kernel_log: str = "") -> str | None:
    """``vhe``, ``nvhe`` or ``protected``: from ``kvm-arm.mode=`` on the
    kernel command line, else from KVM's line at initialisation in the
    kernel log; None when neither says."""
    m = re.search(r"(?:^|\s)kvm-arm\.mode=(\S+)", cmdline)
    if m and m.group(1) in ("nvhe", "protected"):
        return m.group(1)
    # KVM's line at initialisation: "VHE", "VHE+NV2", "Hyp nVHE", "Hyp hVHE",
    # "Protected nVHE" ... "mode initialized successfully" (hVHE: the
    # hypervisor still runs apart, at EL2); before 5.x "Hyp mode initialized".
    if re.search(r"Protected [nh]VHE(\+NV2)? mode initialized", kernel_log):
        return "protected"
    if re.search(r"Hyp ([nh]VHE(\+NV2)? )?mode initialized", kernel_log):
        return "nvhe"
    if re.search(r"(?<![nh])VHE(\+NV2)? mode initialized", kernel_log):
        return "vhe"
    return None


_CLONE = re.compile(r"^([A-Za-z_]\w*?)((?:\.(?:isra|constprop|part|lto_priv)\.\d+)+)$")


@dataclass(frozen=True)
class Symbols:
    """The running kernel's probe-able function names: those in tracefs's
    ``available_filter_functions`` and the text symbols of
    ``/proc/kallsyms``."""

    names: frozenset[str]

    @classmethod
    def parse(cls, available_filter_functions: str = "", kallsyms: str = "") -> "Symbols":
        names = set()
        for line in available_filter_functions.splitlines():
            if line.strip():
                names.add(line.split()[0])
        for line in kallsyms.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tT":
                names.add(parts[2])
        return cls(frozenset(names))

    def resolve(self, function: str) -> list[str]:
        """The symbols to probe for ``function``: itself when the kernel has
        it, else its GCC clones (none: inlined, renamed or absent)."""
        if function in self.names:
            return [function]
        return sorted(n for n in self.names
                      if (m := _CLONE.match(n)) and m.group(1) == function)


def btf_args(readme: str) -> bool:
    """Whether this kernel fetches kprobe arguments by name (BTF)."""
    return "<argname>" in readme
