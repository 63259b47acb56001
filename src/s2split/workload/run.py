"""The test run: ``dirty_log_perf_test``'s phases on an engine, under one
variant or several on identical input, counted phase by phase."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..arm64.uapi import (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS,
                          KVM_MEM_LOG_DIRTY_PAGES)
from ..counting.counters import WALK_OPS
from ..counting.counts import Counts
from ..model.pgtable.variants import VARIANT_OPS, Variant
from ..plumbing.errors import S2Error
from ..selftest.memstress import Layout, vcpu_seed
from .params import PerfTestParams, memstress_layout


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


def phase_steps(p: PerfTestParams, layout: Layout) -> list[tuple[str, Callable[[Any, dict], None]]]:
    """The test as a list of phases, each a function of the VM and a context
    (the bitmaps userspace got back from KVM_GET_DIRTY_LOG)."""
    backing = p.backing_type()
    slot_ids = [slot_id for slot_id, _, _ in layout.slots]
    # dirty_log_perf_test clears whole slots counted in host pages
    host_pages_per_slot = layout.pages_per_slot * p.guest_page_size // p.granule

    def create_vm(vm: Any, ctx: dict) -> None:
        # The selftest patch of the fixtures: the chunk size right after KVM_CREATE_VM.
        vm.set_eager_split_chunk_size(p.chunk_size)
        for slot_id, gpa, pages in layout.slots:
            vm.add_memslot(slot_id, gpa, pages * p.guest_page_size, backing)
        if p.manual_protect:
            vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS)
        vm.set_guest_page_size(p.guest_page_size)
        for i, (gpa, pages) in enumerate(layout.vcpus):
            vm.add_vcpu(gpa, pages, vcpu_seed(p, i))

    def set_flags(flags: int) -> Callable[[Any, dict], None]:
        def run(vm: Any, ctx: dict) -> None:
            for slot_id in slot_ids:
                vm.set_memslot_flags(slot_id, flags)
        return run

    def dirty(vm: Any, ctx: dict) -> None:
        vm.guest_pass(p.write_percent, p.random_access)

    def get_log(vm: Any, ctx: dict) -> None:
        for slot_id in slot_ids:
            ctx[slot_id] = vm.get_dirty_log(slot_id)

    def clear_log(vm: Any, ctx: dict) -> None:
        for slot_id in slot_ids:
            vm.clear_dirty_log(slot_id, 0, host_pages_per_slot, ctx[slot_id])

    munmap = p.selftest_rules.selftest_teardown == "munmap"

    def destroy(vm: Any, ctx: dict) -> None:
        # kvm_vm_free(): up to 7.2 it deletes each memslot; 7.3 unmaps the
        # regions with the slots in place (versions.TEARDOWNS).
        ctx["tables"] = vm.dump_tables() if ctx.get("keep_tables") else b""
        for slot_id in slot_ids:
            if munmap:
                vm.unmap_memslot_memory(slot_id)
            else:
                vm.delete_memslot(slot_id)
        vm.destroy()

    steps: list[tuple[str, Callable[[Any, dict], None]]] = [
        ("create_vm", create_vm),
        ("populate", lambda vm, ctx: vm.guest_pass(100, False)),
        ("enable_dirty_logging", set_flags(KVM_MEM_LOG_DIRTY_PAGES)),
    ]
    for it in range(1, p.iterations + 1):
        steps += [(f"iter{it}_dirty", dirty), (f"iter{it}_get_dirty_log", get_log)]
        if p.manual_protect:
            steps.append((f"iter{it}_clear_dirty_log", clear_log))
    steps += [("disable_dirty_logging", set_flags(0)), ("destroy_vm", destroy)]
    return steps


def run_perf_test(p: PerfTestParams, variant: Variant, engine: Any = None,
                  keep_tables: bool = False,
                  on_phase: Callable[[str], None] | None = None,
                  on_vm: Callable[[Any], None] | None = None) -> RunResult:
    """Run the whole test on one engine under one variant. ``on_vm(vm)`` is
    called once the VM exists (``variants --check`` attaches its TLB model)."""
    return run_variants(p, [variant], engine, keep_tables, on_phase, on_vm)[0]


#: Operations each kind of phase may walk. ``run_variants`` snapshots a phase
#: only if a variant changes one of them, and checks afterwards that the phase
#: walked nothing else (so a wrong entry here fails loudly instead of sharing
#: counts a variant would have changed).
PHASE_OPS = {
    "create_vm": (),
    "populate": ("map", "relax_perms", "get_leaf"),
    "dirty": ("map", "relax_perms", "get_leaf"),
    "enable_dirty_logging": ("wrprotect", "split"),
    "get_dirty_log": ("wrprotect", "split"),
    "clear_dirty_log": ("wrprotect", "split"),
    "disable_dirty_logging": (),
    "destroy_vm": ("unmap", "destroy"),
}


def phase_ops(name: str) -> tuple[str, ...]:
    return PHASE_OPS[name.split("_", 1)[1] if name.startswith("iter") else name]


def run_variants(p: PerfTestParams, variants: list[Variant], engine: Any = None,
                 keep_tables: bool = False,
                 on_phase: Callable[[str], None] | None = None,
                 on_vm: Callable[[Any], None] | None = None) -> list[RunResult]:
    """Run the test under several variants on identical input.

    On an engine that can snapshot its state (the fast engine), the test runs
    once under the first variant; a phase whose walks another variant changes
    is re-run under that variant from a snapshot taken before it, and must end
    in exactly the same state (tables, caches, bitmaps) -- a variant may only
    change the work spent walking. Other phases do identical work under every
    variant by construction and are run once. Elsewhere, each variant runs the
    whole test on its own VM.
    """
    from ..engine import get_engine

    if not variants:
        raise S2Error("no variant to run")
    layout = memstress_layout(p)
    eng = get_engine(engine, p, variants)
    shared = len(variants) > 1 and getattr(eng, "snapshots", False) and \
        all(v.fast_capable for v in variants)
    groups = _mmu_groups(variants) if shared else [[v] for v in variants]
    results: list[RunResult] = []
    for group in groups:
        results += _run_group(p, layout, group, eng, keep_tables, on_phase, on_vm)
    order = {v.name: i for i, v in enumerate(variants)}
    return sorted(results, key=lambda r: order[r.variant])


def _mmu_groups(variants: list[Variant]) -> list[list[Variant]]:
    """Variants that share phases: those with the same MMU hooks. A hook may
    leave other state than vanilla's (the split cache, extra protection, its
    own bitmap), so variants with other hooks run on their own VM."""
    groups: dict[tuple, list[Variant]] = {}
    for v in variants:
        key = tuple(sorted((name, id(fn)) for name, fn in v.mmu.items()))
        groups.setdefault(key, []).append(v)
    return list(groups.values())


def _walks_differ(a: Variant, b: Variant, op: str) -> bool:
    """Whether two variants may walk ``op`` differently (flags, visitor, hook)."""
    return a.flags_for(op) != b.flags_for(op) or a.visitors.get(op) is not b.visitors.get(op) \
        or a.after_walk.get(op) is not b.after_walk.get(op)


def _run_group(p: PerfTestParams, layout: Layout, group: list[Variant], eng: Any,
               keep_tables: bool, on_phase: Callable[[str], None] | None,
               on_vm: Callable[[Any], None] | None = None) -> list[RunResult]:
    t0 = time.perf_counter()
    first, others = group[0], group[1:]
    vm = eng.create_vm(p.geometry(), p.features, first, p.host_va_bits, kernel=p.kernel)
    if on_vm is not None:
        on_vm(vm)
    phases: dict[str, list[tuple[str, Counts]]] = {v.name: [] for v in group}
    ctx: dict = {"keep_tables": keep_tables}
    # The operations whose walks differ between a variant and the first one (in
    # either direction: the first may be the one with flags).
    touched = {v.name: {op for op in VARIANT_OPS if _walks_differ(v, first, op)} for v in others}
    tables: dict[str, bytes] = {}
    # The snapshot the live state was last restored from, while nothing has
    # run since: the next phase's "before" then (a snapshot of a big VM's
    # tables costs as much as a phase).
    restored = None
    for name, step in phase_steps(p, layout):
        predicted = set(phase_ops(name))
        maybe = [v for v in others if touched[v.name] & predicted]
        before = None
        if maybe:
            before = (restored if restored is not None else vm.snapshot(), dict(ctx))
        restored = None
        step(vm, ctx)
        base = vm.take_counts()
        phases[first.name].append((name, base))
        walked = {op for op in WALK_OPS if base.get(op, "walks")}
        if walked - predicted:
            raise AssertionError(f"phase {name} walked {sorted(walked - predicted)}, not in "
                                 f"PHASE_OPS")
        rerun = [v for v in maybe if touched[v.name] & walked]
        if rerun:
            after, after_ctx = vm.snapshot(), dict(ctx)
            for v in rerun:
                vm.restore(before[0])
                vm.set_variant(v)
                vctx = dict(before[1])
                step(vm, vctx)
                phases[v.name].append((name, vm.take_counts()))
                if not vm.state_equals(after):
                    raise AssertionError(f"variant {v.name} changed the state in phase {name}")
                if name == "destroy_vm":
                    tables[v.name] = vctx.get("tables", b"")
            vm.restore(after)
            vm.set_variant(first)
            ctx = after_ctx
            restored = after
        for v in others:
            if v not in rerun:
                phases[v.name].append((name, base))
        if on_phase:
            on_phase(name)
    seconds = time.perf_counter() - t0
    bitmaps = {k: v for k, v in ctx.items() if isinstance(k, int)}
    return [RunResult(p, v.name, vm.engine, layout, phases[v.name],
                      tables.get(v.name, ctx.get("tables", b"")), bitmaps, seconds)
            for v in group]

