"""Counts under the kernel's function names, as ftrace would see them.

The model's counters are per operation, kind and level; each function below
maps one-to-one onto some of them. The result has the shape of the
real-kernel fixtures: ``{function: {"calls": n, "detail": {key: {...}}}}``
with the fixtures' keys (``level=3``, ``level=2,visit=1``,
``cb=stage2_split_walker``, ``level=2,force_pte=1``, ``all``).
"""

from __future__ import annotations

from ..arm64.versions import DEFAULT_KERNEL, DESTROY_612, DESTROY_617, KernelRules, kernel_rules
from .counters import WALK_OPS
from .counts import Counts

#: TLBI_TTL_UNKNOWN as the kernel passes it (INT_MAX).
TTL_UNKNOWN = 2147483647
VISIT_CODES = (("visit_leaf", 1), ("visit_pre", 2), ("visit_post", 4))

#: Which operations' visitor calls each walker function counts.
WALKERS = {
    "stage2_map_walker": ("map", "create_unlinked"),
    "stage2_attr_walker": ("wrprotect", "relax_perms"),
    "stage2_split_walker": ("split",),
    "stage2_unmap_walker": ("unmap",),
    "stage2_free_walker": ("destroy", "free_unlinked"),
    "leaf_walker": ("get_leaf",),
}

#: Functions whose counts depend on the kernel's scheduling: shown, and checked
#: only as a lower bound (the model never reschedules).
LOWER_BOUND = ("__kvm_mmu_topup_memory_cache",)

KERNEL_FUNCTIONS = (
    "kvm_pgtable_walk", "__kvm_pgtable_walk",
    *WALKERS,
    "kvm_pgtable_stage2_map", "kvm_pgtable_stage2_unmap", "kvm_pgtable_stage2_wrprotect",
    "kvm_pgtable_stage2_relax_perms", "kvm_pgtable_stage2_split",
    "kvm_pgtable_stage2_create_unlinked", "kvm_pgtable_stage2_free_unlinked",
    *DESTROY_612, *DESTROY_617,
    "kvm_mmu_split_huge_pages", "kvm_arch_mmu_enable_log_dirty_pt_masked",
    "__kvm_mmu_topup_memory_cache", "kvm_handle_guest_abort",
    "__kvm_tlb_flush_vmid_ipa", "__kvm_tlb_flush_vmid_ipa_nsh",
    "kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid_range", "__kvm_tlb_flush_vmid",
)

_API = {
    "kvm_pgtable_stage2_map": "map", "kvm_pgtable_stage2_unmap": "unmap",
    "kvm_pgtable_stage2_wrprotect": "wrprotect", "kvm_pgtable_stage2_relax_perms": "relax_perms",
    "kvm_pgtable_stage2_split": "split",
}


def _level_key(level: int | None) -> str:
    return f"level={TTL_UNKNOWN if level is None else level}"


def kernel_counts(c: Counts, rules: KernelRules | None = None) -> dict[str, dict]:
    """Kernel-named counts of one phase under a kernel's function names
    (default: the default kernel's); functions with no calls are left out."""
    rules = rules or kernel_rules(DEFAULT_KERNEL)
    out: dict[str, dict] = {}

    def put(fn: str, calls: int, detail: dict[str, dict]) -> None:
        if calls:
            out[fn] = {"calls": int(calls), "detail": detail}

    walks, detail = 0, {}
    for cb in WALKERS:
        n = sum(c.get(op, "walks") for op in WALKERS[cb] if op in WALK_OPS)
        size = sum(c.get(op, "walk_bytes") for op in WALKERS[cb] if op in WALK_OPS)
        if n:
            detail[f"cb={cb}"] = {"hitcount": n, "size": size}
            walks += n
    put("kvm_pgtable_walk", walks, detail)

    loops = c.by_level(None, "loops")
    put("__kvm_pgtable_walk", sum(loops.values()),
        {_level_key(lv): {"hitcount": n} for lv, n in loops.items()})

    for cb, ops in WALKERS.items():
        detail, total = {}, 0
        for kind, code in VISIT_CODES:
            per_level: dict[int | None, int] = {}
            for op in ops:
                for lv, n in c.by_level(op, kind).items():
                    per_level[lv] = per_level.get(lv, 0) + n
            for lv, n in per_level.items():
                detail[f"level={lv},visit={code}"] = {"hitcount": n}
                total += n
        put(cb, total, detail)

    for fn, op in _API.items():
        n = c.get(op, "calls")
        d = {"all": {"hitcount": n}}
        if op in WALK_OPS and op != "relax_perms":
            d["all"]["size"] = c.get(op, "walk_bytes")
        put(fn, n, d)

    # The teardown: one call per free walk; since 6.17 each walk is a
    # destroy_range call and the root goes in one destroy_pgd call after the
    # last (model/kvm/mmu.py kvm_stage2_destroy: a phase that destroys runs it once).
    n = c.get("destroy", "calls")
    put(rules.destroy_range_function, n,
        {"all": {"hitcount": n, "size": c.get("destroy", "walk_bytes")}})
    if rules.destroy_pgd_function is not None and n:
        put(rules.destroy_pgd_function, 1, {"all": {"hitcount": 1}})

    cu = c.by_level("create_unlinked", "calls")
    forced = c.by_level("create_unlinked", "calls_force_pte")
    detail = {}
    for lv, n in cu.items():
        f = forced.get(lv, 0)
        if f:
            detail[f"level={lv},force_pte=1"] = {"hitcount": f}
        if n - f:
            detail[f"level={lv},force_pte=0"] = {"hitcount": n - f}
    put("kvm_pgtable_stage2_create_unlinked", sum(cu.values()), detail)
    fu = c.by_level("free_unlinked", "calls")
    put("kvm_pgtable_stage2_free_unlinked", sum(fu.values()),
        {f"level={lv}": {"hitcount": n} for lv, n in fu.items()})

    for fn, kind in (("kvm_mmu_split_huge_pages", "split_huge_pages"),
                     ("kvm_arch_mmu_enable_log_dirty_pt_masked", "log_dirty_masked"),
                     ("kvm_handle_guest_abort", "aborts")):
        n = c.get("kvm", kind)
        put(fn, n, {"all": {"hitcount": n}})
    topups = c.get("kvm", "vcpu_topups") + c.get("kvm", "split_topups")
    put("__kvm_mmu_topup_memory_cache", topups, {"all": {"hitcount": topups}})

    for fn, kind in (("__kvm_tlb_flush_vmid_ipa", "tlbi_ipa"),
                     ("__kvm_tlb_flush_vmid_ipa_nsh", "tlbi_ipa_nsh")):
        lv = c.by_level(None, kind)
        put(fn, sum(lv.values()), {_level_key(k): {"hitcount": n} for k, n in lv.items()})
    n = c.total("flush_range")
    put("kvm_tlb_flush_vmid_range", n, {"all": {"hitcount": n, "size": c.total("flush_range_bytes")}})
    n = c.total("tlbi_range")
    put("__kvm_tlb_flush_vmid_range", n, {"all": {"hitcount": n, "pages": c.total("tlbi_range_pages")}})
    n = c.total("tlbi_vmid")
    put("__kvm_tlb_flush_vmid", n, {"all": {"hitcount": n}})
    return out


def comparable_key(fn: str, key: str) -> bool:
    """Detail keys the model produces for ``fn`` (others, e.g. ``size=`` buckets
    of kvm_pgtable_stage2_map or ``min=`` of top-ups, are not modelled)."""
    if fn in ("kvm_pgtable_stage2_map", "__kvm_mmu_topup_memory_cache", "kvm_handle_guest_abort"):
        return False
    if key.startswith("cb="):
        return fn == "kvm_pgtable_walk"
    if key == "all" or key.startswith("level="):
        return True
    return False


# -- TLBI instructions by kind -----------------------------------------------------------

#: The TLBI instructions each counted hyp TLB call issues (Linux 6.12,
#: arch/arm64/kvm/hyp/{vhe,nvhe}/tlb.c: VHE and nVHE issue the same ones; the
#: features only decide which call is made, and that is already counted):
#: a by-IPA call invalidates stage 2 for the IPA, then all of stage 1 for the
#: VMID; the local (nsh) variant the same without broadcast; a range call its
#: range instructions, then stage 1; a whole-VMID call one TLBI of both stages.
#: A range call's instructions are RIPAS2E1IS but for a lone page (or, with
#: LPA2, a page before a 64K-aligned start), which takes an IPAS2E1IS: the
#: counters do not tell those apart, so they share one row.
TLBI_KINDS: tuple[tuple[str, str], ...] = (
    ("TLBI IPAS2E1IS", "stage 2 by IPA, broadcast (__kvm_tlb_flush_vmid_ipa)"),
    ("TLBI IPAS2E1", "stage 2 by IPA, this CPU (__kvm_tlb_flush_vmid_ipa_nsh)"),
    ("TLBI RIPAS2E1IS", "stage 2 by IPA range, broadcast (__kvm_tlb_flush_vmid_range; "
                        "IPAS2E1IS for a lone page)"),
    ("TLBI VMALLE1IS", "all of stage 1 for the VMID, broadcast (after every by-IPA and "
                       "range call)"),
    ("TLBI VMALLE1", "all of stage 1 for the VMID, this CPU (after the nsh call)"),
    ("TLBI VMALLS12E1IS", "both stages for the VMID, broadcast (__kvm_tlb_flush_vmid)"),
)


def tlbi_instructions(counts: Counts) -> dict[str, int]:
    """TLBI instructions by kind (:data:`TLBI_KINDS`), derived from the calls
    counted. The one rule for every table that names them."""
    ipa, nsh = counts.total("tlbi_ipa"), counts.total("tlbi_ipa_nsh")
    s1 = counts.total("tlbi_s1")
    return {"TLBI IPAS2E1IS": ipa, "TLBI IPAS2E1": nsh,
            "TLBI RIPAS2E1IS": counts.total("tlbi_range_ops"),
            # Every stage-1 invalidation but the local call's is broadcast.
            "TLBI VMALLE1IS": s1 - nsh, "TLBI VMALLE1": nsh,
            "TLBI VMALLS12E1IS": counts.total("tlbi_vmid")}
