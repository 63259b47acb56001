"""Where the gains are: which counters a variant lowers, per phase and level,
and what share of the syscall's estimated time each accounts for."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from ..arm64.hierarchy import LINE_BYTES
from ..counting.counters import HIT_KINDS
from ..counting.counts import Counts
from ..estimate.cost import Profile, format_ms

READ_KINDS = ("read_table", "read_leaf", "read_invalid")
OP_WALK = {"split": "split walk", "wrprotect": "write-protect walk", "map": "map walk",
           "relax_perms": "relax-permissions walk", "unmap": "unmap walk",
           "create_unlinked": "walk that builds new tables (create_unlinked)",
           "free_unlinked": "free walk", "destroy": "destroy walk", "get_leaf": "host lookup"}


@dataclass
class Change:
    phase: str
    op: str
    kind: str
    level: int | None
    before: int
    after: int
    ns_saved: float  # estimated
    share_of_time: float  # of the vanilla phase's estimated time, 0..1


SKIP_KINDS = ("skip_level", "skip_children", "skip_siblings")

#: Where a saving comes from, by counter kind (the rest: other work).
SAVING_GROUPS = (
    ("TLB maintenance and barriers",
     ("tlbi_ipa", "tlbi_ipa_nsh", "tlbi_range", "tlbi_range_pages", "tlbi_range_ops", "tlbi_vmid",
      "tlbi_s1", "flush_range", "flush_range_bytes", "hyp_call", "dsb_ishst", "dsb_ish",
      "dsb_nshst", "dsb_nsh", "isb")),
    ("entry writes and break-before-make", ("pte_write", "pte_cas", "bbm", "get_page",
                                            "put_page")),
    ("walks", (*READ_KINDS, *HIT_KINDS, "reload", "visit_leaf", "visit_pre", "visit_post",
               "descent", "loops", "walks", "walk_bytes", *SKIP_KINDS)),
)


def same_work(a: Counts, b: Counts) -> bool:
    """Equal counts, except for *why* the walker did not descend somewhere
    (skip-levels and skip-children skip the same subtree for different reasons)."""
    from ..counting.counters import KIND
    x, y = a.array.copy(), b.array.copy()
    first = KIND[SKIP_KINDS[0]]
    for k in SKIP_KINDS[1:]:
        x[:, first, :] += x[:, KIND[k], :]
        y[:, first, :] += y[:, KIND[k], :]
        x[:, KIND[k], :] = 0
        y[:, KIND[k], :] = 0
    return bool((x == y).all())


def changes(phase: str, base: Counts, other: Counts, profile: Profile) -> list[Change]:
    total = profile.estimate_ns(base)
    out = []
    for op, kind, level, before, after in base.diff(other):
        ns = (before - after) * profile.unit_cost(op, kind, level)
        out.append(Change(phase, op, kind, level, before, after, ns, ns / total if total else 0.0))
    return sorted(out, key=lambda c: (-c.ns_saved, -(c.before - c.after)))


def _lv(level: int | None) -> str:
    return "-" if level is None else str(level)


def changes_table(title: str, rows: list[Change], limit: int = 12) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("phase", "operation", "counter", "level"):
        t.add_column(col)
    for col in ("vanilla", "variant", "change", "est. time share"):
        t.add_column(col, justify="right")
    for c in rows[:limit]:
        t.add_row(c.phase, c.op, c.kind, _lv(c.level), f"{c.before:,}", f"{c.after:,}",
                  f"{c.after - c.before:+,}", f"{100 * c.share_of_time:.1f}%")
    if len(rows) > limit:
        t.add_row("...", f"{len(rows) - limit} smaller changes", "", "", "", "", "", "")
    return t


#: Work of an ioctl done with the MMU lock dropped (or not yet taken): the
#: syscall itself and the split cache's top-ups (kvm_mmu_split_huge_pages
#: drops the lock for them).
OUTSIDE_LOCK = (("kvm", "ioctls"), ("kvm", "split_topups"), ("kvm", "cache_pages_alloc"))

#: Per-call work of the MMU layer, for the sentences of variants above the walker.
MMU_CALLS = (("kvm", "log_dirty_masked", "kvm_arch_mmu_enable_log_dirty_pt_masked calls"),
             ("wrprotect", "walks", "write-protect walks"), ("split", "walks", "split walks"),
             ("kvm", "split_huge_pages", "kvm_mmu_split_huge_pages calls"),
             ("kvm", "split_topups", "split-cache top-ups (MMU lock drops)"))


def lock_held_ns(counts: Counts, profile: Profile) -> float:
    """Estimated time the MMU lock is held per ioctl in ``counts`` (the vCPUs'
    faults wait for it): the estimate less the work done outside the lock,
    over the ioctls."""
    ioctls = counts.get("kvm", "ioctls")
    if not ioctls:
        return 0.0
    outside = sum(counts.get(op, kind) * profile.unit_cost(op, kind, None)
                  for op, kind in OUTSIDE_LOCK)
    return (profile.estimate_ns(counts) - outside) / ioctls


def mmu_sentences(phase_label: str, base: Counts, other: Counts, profile: Profile,
                  variant: str) -> list[str]:
    """For a variant above the walker: the per-call work it removes and the
    MMU lock's hold per ioctl, before and after."""
    calls = [f"{what} {base.get(op, kind):,} -> {other.get(op, kind):,}"
             for op, kind, what in MMU_CALLS if base.get(op, kind) != other.get(op, kind)]
    out = []
    if calls:
        out.append(f"Per call, in {phase_label}: {'; '.join(calls)} (each walk descends again "
                   "from the root).")
    held0, held1 = lock_held_ns(base, profile), lock_held_ns(other, profile)
    if held0 and held0 != held1:
        out.append(f"The MMU lock is held {format_ms(held1)} per ioctl instead of "
                   f"{format_ms(held0)} (estimate, profile {profile.name}): the vCPUs' "
                   "faults wait that much less.")
    return out


def sentences(phase_label: str, base: Counts, other: Counts, profile: Profile,
              variant: str) -> list[str]:
    """Plain sentences on the largest changes of one syscall's phases (summed)."""
    out = []
    reads_total = base.entries_read()
    est = profile.estimate_ns(base)
    saved = est - profile.estimate_ns(other)
    if same_work(base, other):
        return [f"{variant} does exactly the work of vanilla in {phase_label}."]
    if est:
        from ..estimate.intervals import saving_interval
        iv = saving_interval(profile, base, other)
        rng = f"; {iv.low:.1f}-{iv.high:.1f}% over the profile's cost ranges" \
            if iv is not None and iv.width > 0 else ""
        out.append(f"{variant} saves {100 * saved / est:.1f}% of the estimated time of "
                   f"{phase_label} (profile {profile.name}; an estimate, not a "
                   f"measurement{rng}).")
    by_op_level: dict[tuple[str, int | None], tuple[int, int]] = {}
    for op, kind, level, before, after in base.diff(other):
        if kind in READ_KINDS:
            b, a = by_op_level.get((op, level), (0, 0))
            by_op_level[(op, level)] = (b + before, a + after)
    for (op, level), (before, after) in sorted(by_op_level.items(),
                                               key=lambda kv: kv[1][1] - kv[1][0])[:3]:
        walk = OP_WALK.get(op, f"{op} walk")
        where = f"level-{level} " if level is not None else ""
        share = 100 * before / reads_total if reads_total else 0.0
        if after == 0:
            out.append(f"The {walk} no longer reads the {before:,} {where}entries; they were "
                       f"{share:.0f}% of all entries read in {phase_label}.")
        else:
            out.append(f"The {walk} reads {before - after:,} fewer {where}entries "
                       f"({before:,} -> {after:,}), {share:.0f}% of all entries read in "
                       f"{phase_label}.")
    vb, va = base.visitor_calls(), other.visitor_calls()
    if vb != va:
        out.append(f"Visitor calls fall from {vb:,} to {va:,}.")
    out += mmu_sentences(phase_label, base, other, profile, variant)
    out += _maintenance_sentences(phase_label, base, other, profile, est)
    same = [k for k in ("tlbi_ipa", "page_taken", "pte_write") if base.total(k) ==
            other.total(k)]
    if len(same) == 3:
        out.append("TLB invalidations, table pages and PTE writes are unchanged: the same "
                   "tables are built, only less walking is done.")
    return out


def _maintenance_sentences(phase_label: str, base: Counts, other: Counts, profile: Profile,
                           est: float) -> list[str]:
    """Where a variant that changes TLB maintenance (bbml2) saves: the share
    of the saving per group of counters, and the TLBIs before and after."""
    tlbi = ("tlbi_ipa", "tlbi_range", "tlbi_vmid")
    if all(base.total(k) == other.total(k) for k in (*tlbi, "bbm")) or not est:
        return []
    groups: dict[str, float] = {}
    for op, kind, level, before, after in base.diff(other):
        name = next((g for g, kinds in SAVING_GROUPS if kind in kinds), "other work")
        groups[name] = groups.get(name, 0.0) + (before - after) * profile.unit_cost(op, kind,
                                                                                    level)
    parts = [f"{name} {100 * ns / est:+.1f} points" for name, ns in
             sorted(groups.items(), key=lambda kv: -abs(kv[1])) if ns]
    walks_same = "walks" not in groups or groups["walks"] == 0
    out = [f"The saving is in {', '.join(parts)}"
           + ("; the walks are unchanged." if walks_same else ".")]
    counts = ", ".join(f"{k} {base.total(k):,} -> {other.total(k):,}" for k in (*tlbi, "bbm")
                       if base.total(k) != other.total(k))
    out.append(f"In {phase_label}: {counts} (split without break-before-make: one range "
               "TLBI per split call instead of one TLBI per block)."
               if other.total("bbm") < base.total("bbm") else f"In {phase_label}: {counts}.")
    return out


def identical_work(counts: dict[str, Counts], phase_label: str) -> list[str]:
    """Sentences naming variants that do identical work."""
    names = list(counts)
    out = []
    seen: set[str] = set()
    for i, a in enumerate(names):
        if a in seen:
            continue
        same = [b for b in names[i + 1:] if same_work(counts[b], counts[a])]
        if same:
            seen.update(same)
            group = " and ".join([a, *same])
            out.append(f"{group} do identical work in {phase_label}: any measured difference "
                       f"between them is noise.")
    return out


# -- where table reads hit ------------------------------------------------------------------

#: The walks whose entry reads "where table reads hit" shows: the two walks of
#: the dirty-log ioctls and the reads of the tables a split builds.
HIT_OPS = ("wrprotect", "split", "create_unlinked")
HIT_NAMES = ("L1", "L2", "LLC", "DRAM")


def read_hits(counts: Counts, ops: tuple[str, ...] = HIT_OPS
              ) -> list[tuple[str, int, tuple[int, ...]]]:
    """``(op, level, (L1, L2, LLC, DRAM))`` for each walk and level that read entries."""
    out = []
    for op in ops:
        for level in range(-1, 4):
            h = tuple(counts.get(op, k, level) for k in HIT_KINDS)
            if any(h):
                out.append((op, level, h))
    return out


def hits_text(h: tuple[int, ...]) -> str:
    """``L1 87.5%, DRAM 12.5%``: the classes that occur, as shares of the reads."""
    total = sum(h)
    return ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in zip(HIT_NAMES, h) if n)


def hits_table(title: str, counts: Counts, profile: Profile) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("walk")
    t.add_column("level")
    for col in ("entries read", *HIT_NAMES, "est. memory time"):
        t.add_column(col, justify="right")
    for op, level, h in read_hits(counts):
        ns = sum(n * profile.unit_cost(op, k, level) for n, k in zip(h, HIT_KINDS))
        t.add_row(OP_WALK.get(op, op), str(level), f"{sum(h):,}",
                  *(f"{n:,}" for n in h), f"{ns / 1e6:,.3f} ms")
    return t


def hit_sentences(phase_label: str, counts: Counts) -> list[str]:
    """Where the split walk's level-3 reads hit, and why, in words."""
    split = tuple(counts.get("split", k, 3) for k in HIT_KINDS)
    total = sum(split)
    if not total:
        return []
    wp = sum(counts.get("wrprotect", k, 3) for k in HIT_KINDS)
    missed = sum(split[1:])  # the first read of a line that was not in L1
    if not missed:
        why = " -- the write-protect walk read the same lines just before it" if wp else ""
        return [f"Where table reads hit: in {phase_label}, all {total:,} level-3 entry reads "
                f"of the split walk hit L1{why}."]
    far = split[2] + split[3]
    mib = far * LINE_BYTES / (1 << 20)
    return [f"Where table reads hit: in {phase_label}, the split walk's {total:,} level-3 "
            f"entry reads hit {hits_text(split)}: the first read of {far:,} of its 64-byte "
            f"lines ({mib:,.1f} MiB) comes from the LLC or DRAM"
            + (" -- it streams the level-3 tables the write-protect walk streamed before "
               "it, too long before for the caches to keep them." if wp else ".")]
