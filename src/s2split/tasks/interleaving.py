"""Counts that depend on how the vCPUs interleave, and their bounds.

When several vCPUs touch the same pages (``dirty_log_perf_test -o`` with
``-v`` > 1), the real kernel's fault path does a different amount of work
from run to run. The model runs one defined interleaving: the vCPUs in
lockstep, one access each in index order, every access seeing the latest
stage-2 tables (no vCPU holds a stale TLB entry). So each page is faulted by
exactly one vCPU -- the first to write it -- and the model's count is the
least the kernel can do. What the kernel may add (Linux 6.12,
arch/arm64/kvm/mmu.c ``user_mem_abort``, hyp/pgtable.c):

* two vCPUs fault on one write-protected page at once: both walk, both try
  to set the write permission (``stage2_attr_walker``); one cmpxchg wins, the
  other returns ``-EAGAIN``, and ``kvm_pgtable_stage2_relax_perms`` still
  invalidates the local TLB -- with no level hint, since the failed walk never
  reported its level;
* a vCPU on a CPU whose TLB still holds the read-only entry (a relaxed
  permission is only invalidated on the CPU that relaxed it, ``TLBI ... NSH``)
  faults although the table already allows the write: ``relax_perms`` finds
  nothing to change, returns 0, and invalidates at the leaf's level;
* a translation fault that meets an entry another vCPU holds locked for
  break-before-make (mapping a page, replacing a block by a table) returns
  ``-EAGAIN`` and the vCPU faults again for as long as the entry stays locked:
  no upper bound.

The upper bound for a dirtying pass in which every fault is a permission
fault on a page-sized leaf (what the selftest's passes are once the memory
is split and write-protected) follows from three facts: (1) at the start of
the pass no CPU holds a stale entry for a test page (the previous
``KVM_GET_DIRTY_LOG``/``KVM_CLEAR_DIRTY_LOG`` or the enable flushed the VMID
on every CPU after the last relax), (2) relaxing never makes an entry
invalid, so no translation fault and no ``-EAGAIN`` retry loop can occur, and
(3) every fault ends with a TLB invalidation on the faulting CPU, so one write
access faults at most once. Hence a page written ``w`` times in the pass
(by any vCPUs) is faulted on at least once and at most ``w`` times, and the
pass can add at most ``sum(w - 1)`` faults to the model's, each with exactly
one relax fault's calls (one ``kvm_handle_guest_abort``, one
``relax_perms``, one walk of one leaf, one TLBI at the leaf level or with no
hint).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: What one fault on a write-protected page-sized leaf calls (besides
#: ``kvm_handle_guest_abort`` and the top-up, counted separately).
RELAX_FOOTPRINT = ("kvm_pgtable_stage2_relax_perms", "kvm_pgtable_walk", "__kvm_pgtable_walk",
                   "stage2_attr_walker", "__kvm_tlb_flush_vmid_ipa_nsh")
#: Functions the fault path reaches; in an interleaving-dependent pass they
#: are compared as bounds.
FAULT_PATH = (*RELAX_FOOTPRINT, "kvm_handle_guest_abort", "kvm_pgtable_stage2_map",
              "stage2_map_walker", "__kvm_tlb_flush_vmid_ipa",
              "kvm_pgtable_stage2_create_unlinked", "kvm_pgtable_stage2_free_unlinked",
              "stage2_free_walker", "leaf_walker")
#: A relax_perms that lost its race invalidates with no level hint (recorded as
#: level=2147483647, TLBI_TTL_UNKNOWN, on Debian's 6.12.117; older 6.12 passed
#: an unset level): any level key the model lacks is this.
NO_HINT_FUNCTION = "__kvm_tlb_flush_vmid_ipa_nsh"
NO_HINT_NOTE = "no level hint: a relax_perms that lost a race (-EAGAIN)"


def depends_on_interleaving(params: Any) -> bool:
    """Whether the run's fault-path counts depend on how vCPUs interleave."""
    return not params.partition and params.vcpus > 1


def write_accesses(params: Any, layout: Any) -> list[Counter]:
    """Per guest pass (0 = populate, N = iteration N's dirtying pass): stage-2
    page number -> write accesses to it by all vCPUs, from the guest program
    replayed with each vCPU's seed (the same generator the model runs)."""
    from ..hw.guest import guest_pass
    from ..selftest.memstress import vcpu_seed

    gps, granule = params.guest_page_size, params.granule
    states = [vcpu_seed(params, i) for i in range(params.vcpus)]
    passes = [(100, False)] + [(params.write_percent, params.random_access)] * params.iterations
    out = []
    for write_percent, random_access in passes:
        counts: Counter = Counter()
        for i, (base, pages) in enumerate(layout.vcpus):
            states[i], written, _ = guest_pass(states[i], pages, write_percent, random_access)
            counts.update((base + page * gps) // granule for page in written)
        out.append(counts)
    return out


@dataclass
class PassBound:
    """How much more than the model one pass's fault path may do.

    ``extra`` faults at most (None: no upper bound), each adding
    ``per_fault[(function, key, field)]`` (key "" is the call total)."""

    extra: int | None
    reason: str
    per_fault: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def upper(self, fn: str, key: str, fld: str, model: int) -> int | None:
        if self.extra is None:
            return None
        if fn == NO_HINT_FUNCTION and key and not self.per_fault.get((fn, key, fld)):
            return self.extra if fld == "hitcount" else 0
        return model + self.extra * self.per_fault.get((fn, key, fld), 0)


def pass_bound(model: dict[str, dict], writes: Counter | None) -> PassBound:
    """The bound of one phase in which vCPUs run, from the model's kernel-named
    counts of that phase and the pass's write accesses per stage-2 page."""
    if writes is None:
        return PassBound(None, "vCPUs fault concurrently on the pages they map; a fault that "
                         "meets an entry locked for break-before-make is taken again "
                         "(-EAGAIN): lower bound only")
    def calls(fn: str) -> int:
        return model.get(fn, {}).get("calls", 0)

    if calls("kvm_pgtable_stage2_map"):
        return PassBound(None, "faults in this pass map or split (break-before-make): a vCPU "
                         "faults again while another holds the entry locked: lower bound only")
    relax = calls("kvm_pgtable_stage2_relax_perms")
    if relax == 0:
        return PassBound(0, "no test page is write-protected in this pass: no vCPU faults on "
                         "one, whatever the interleaving")
    if relax != len(writes):
        return PassBound(None, f"the model faulted on {relax} of the {len(writes)} written "
                         "pages, not on every one: lower bound only")
    per: dict[tuple[str, str, str], int] = {("kvm_handle_guest_abort", "", "calls"): 1,
                                            ("kvm_handle_guest_abort", "all", "hitcount"): 1}
    for fn in RELAX_FOOTPRINT:
        entry = model.get(fn, {})
        items = [("", "calls", entry.get("calls", 0))]
        items += [(key, fld, v) for key, d in entry.get("detail", {}).items()
                  for fld, v in d.items()]
        for key, fld, v in items:
            if v % relax:
                return PassBound(None, f"the model's {fn} {key or 'calls'} ({v}) is not the "
                                 f"same for each of its {relax} faults: lower bound only")
            per[(fn, key, fld)] = v // relax
    extra = sum(w - 1 for w in writes.values())
    return PassBound(extra, f"{relax} write-protected pages written {sum(writes.values())} "
                     f"times: up to {extra} more permission faults (concurrent "
                     "or on a stale TLB entry)", per)
