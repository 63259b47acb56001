"""A TLB model: what translations of one VMID the TLBs and walk caches may
still hold, followed from the reference engine's events, and four rules
checked at every event.

Nothing here runs unless a model is attached (:func:`attach`): the
reference engine tests one ``tracer`` attribute (``None`` by default) at each
descriptor write, TLB maintenance call, barrier and table-page free, and the
fast engine knows nothing of it.

What the model assumes (the Arm ARM, DDI0487; ``docs/design-notes.md``
cites the sections):

* Every valid entry reachable from the root may be cached at any time, as a
  leaf (TLB) entry or, for a table entry, a walk-cache entry; a leaf may
  also sit in a combined stage-1+2 entry. So the model never tracks what
  *is* cached, only what may be *stale*: an entry, once overwritten or made
  unreachable (its table unlinked), may still be cached until a TLBI that
  covers it has been completed by a DSB ISH (a DSB NSH completes only the
  local TLBIs of ``relax_perms``, which leave other CPUs' TLBs as they were,
  so the model removes nothing for them).
* A TLBI by IPA without a level hint removes leaf and walk-cache entries
  covering the IPA; with a level hint (TTL) only leaf entries of that level
  (the model does not rely on a hinted TLBI for walk-cache entries). A range
  TLBI (``kvm_tlb_flush_vmid_range``, no hint) removes every entry that
  overlaps the pages its scale/num encoding covers, op by op
  (:func:`s2split.arm64.rules.range_tlbi_pieces`). Stage-2 TLBIs leave combined
  stage-1+2 entries; ``TLBI VMALLE1IS`` (every hyp TLB call issues it after
  the stage-2 TLBI and a DSB ISH) removes those, ``TLBI VMALLS12E1IS`` both.
* A TLBI removes only what was stale when it was issued.

The rules (each :class:`Finding` names its rule, IPA, level and events):

1. **break-before-make**: a valid entry is made (written, or made reachable
   with a subtree) while a stale entry of the same IPA and level that it
   differs from in output address, memory attributes or size (block vs
   table), or a stale smaller entry under a new block, may still be cached.
   On a CPU with FEAT_BBM level 2 and NOABORT (``Features.bbml2``), a block
   replaced by a table that translates the same is allowed, until the MMU
   lock is released (:meth:`TlbModel.lock_release`).
2. **dirty tracking**: when an ioctl that write-protected pages returns
   (:meth:`TlbModel.ioctl_end`), no stale writable entry of those pages may
   still be cached.
3. **freed tables**: a table page freed or reused while a stale walk-cache
   entry may still point to it (or while it is still linked).
4. **TLBI level hints**: a TLBI by IPA with level hint ``L`` while the IPA's
   only stale entries are at other levels: it removes nothing.

Entry point for other layers (``variants --check``, MMU-layer variants)::

    model = tlb_model.attach(vm_or_pgt)    # a reference VM or a Stage2PageTable
    model.ioctl_begin("KVM_CLEAR_DIRTY_LOG"); ...; model.ioctl_end()
    model.lock_release()                   # where the MMU lock is dropped
    model.findings                         # list of Finding, in event order
    tlb_model.detach(vm_or_pgt)

The reference VM marks its ioctls and the split's lock drops itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...arm64 import pte as P
from ...arm64.arch import LAST_LEVEL
from ...arm64.rules import MAX_TLBI_RANGE_PAGES, lpa2_range_align, range_tlbi_pieces

RULES = {1: "break-before-make", 2: "dirty tracking", 3: "freed table", 4: "TLBI level hint"}
#: Findings kept (the check stops at the first).
MAX_FINDINGS = 50

#: TLBI kinds of the pending list.
_IPA, _RANGE, _VMID, _S1 = 0, 1, 2, 3


@dataclass(frozen=True)
class Finding:
    rule: int
    ipa: int
    level: int
    event: int
    message: str

    def __str__(self) -> str:
        return f"TLB rule {self.rule} ({RULES[self.rule]}): {self.message}"


class _Stale:
    """A translation that may still be cached though its entry changed."""

    __slots__ = ("level", "ipa", "value", "since", "how", "grace", "s2", "comb")

    def __init__(self, level: int, ipa: int, value: int, since: int, how: str):
        self.level, self.ipa, self.value, self.since, self.how = level, ipa, value, since, how
        self.grace = 0  # event of a bbml2 replace that allowed it, until the lock is dropped
        self.s2 = True  # may be in a stage-2 (leaf or walk-cache) entry
        self.comb = True  # may be in a combined stage-1+2 entry (leaves only)

    @property
    def alive(self) -> bool:
        return self.s2 or self.comb


def _kind(value: int, level: int) -> str:
    if P.is_table(value, level):
        return "table"
    return "page" if level == LAST_LEVEL else "block"


class TlbModel:
    """What one VMID's TLBs may hold, and the findings so far."""

    def __init__(self, pgt: Any):
        self.pgt = pgt
        self.geom = pgt.geom
        self.bbml2 = bool(pgt.features.bbml2)
        self.n = 0  # events so far
        self.findings: list[Finding] = []
        self.retired = False
        # id(table list) -> (pfn, base IPA, level of its entries): the live tables
        self._live: dict[int, tuple[int, int, int]] = {}
        self._live_pfns: set[int] = set()
        # (level, ipa) -> stale translations
        self._stale: dict[tuple[int, int], list[_Stale]] = {}
        self._pending: list[tuple[int, int, int, int, int]] = []  # kind, event, a, b, level
        self._grace: list[_Stale] = []
        self._comb: list[_Stale] = []  # stale leaves that may be in combined entries
        self._walk_to: dict[int, list[_Stale]] = {}  # table page -> stale entries to it
        self._ioctl: str | None = None
        self._protected: list[tuple[int, int, int]] = []
        self._attr_mask = P.MEMATTR_MASK | (0 if self.geom.lpa2 else P.SH_MASK)
        self._scan_root()

    # -- the live tables -----------------------------------------------------------
    def _scan_root(self) -> None:
        pgt, geom = self.pgt, self.geom
        span = geom.granule_size(geom.start_level - 1)
        for i, pfn in enumerate(pgt.root or ()):
            self._link(pfn, i * span, geom.start_level, check=False)

    def _link(self, pfn: int, base: int, level: int, check: bool) -> None:
        """Table page ``pfn`` (entries at ``level``) became reachable at ``base``:
        its valid entries may now be cached; check each against stale ones."""
        mem = self.pgt.mem
        stack = [(pfn, base, level)]
        while stack:
            pfn, base, level = stack.pop()
            page = mem.pages[pfn]
            if page is None:
                continue
            self._live[id(page)] = (pfn, base, level)
            self._live_pfns.add(pfn)
            g = self.geom.granule_size(level)
            for i, e in enumerate(page):
                if not e & P.VALID:
                    continue
                if check:
                    self._check_make(level, base + i * g, e)
                if P.is_table(e, level):
                    stack.append((mem.pfn(self.pgt.pte_to_phys(e)), base + i * g, level + 1))

    def _unlink(self, pfn: int, base: int, level: int) -> None:
        """Table page ``pfn`` is no longer reachable: every valid entry in its
        subtree may stay cached until invalidated."""
        mem = self.pgt.mem
        stack = [(pfn, base, level)]
        while stack:
            pfn, base, level = stack.pop()
            page = mem.pages[pfn]
            if page is None:
                continue
            self._live.pop(id(page), None)
            self._live_pfns.discard(pfn)
            g = self.geom.granule_size(level)
            for i, e in enumerate(page):
                if e & P.VALID:
                    self._add_stale(level, base + i * g, e, "unlinked")
                    if P.is_table(e, level):
                        stack.append((mem.pfn(self.pgt.pte_to_phys(e)), base + i * g,
                                      level + 1))

    def _add_stale(self, level: int, ipa: int, value: int, how: str) -> None:
        s = _Stale(level, ipa, value, self.n, how)
        self._stale.setdefault((level, ipa), []).append(s)
        if P.is_table(value, level):
            s.comb = False
            self._walk_to.setdefault(self.pgt.mem.pfn(self.pgt.pte_to_phys(value)),
                                     []).append(s)
        else:
            self._comb.append(s)

    def entry_ipa(self, table: list, idx: int) -> int:
        """The IPA of entry ``idx`` of a live table (0 if not live)."""
        info = self._live.get(id(table))
        if info is None:
            return 0
        return info[1] + idx * self.geom.granule_size(info[2])

    # -- events: descriptors ---------------------------------------------------------
    def write(self, table: list, idx: int, level: int, old: int, new: int) -> None:
        """A store of ``new`` over ``old`` in entry ``idx`` of ``table``."""
        info = self._live.get(id(table))
        if info is None or self.retired:
            return  # an unlinked table: no walker sees it
        pfn, base, _ = info
        if self.pgt.mem.pages[pfn] is not table:
            return
        self.n += 1
        ipa = base + idx * self.geom.granule_size(level)
        if old & P.VALID and old != new:
            self._add_stale(level, ipa, old, "broken" if not new & P.VALID else "replaced")
            if P.is_table(old, level) and not (P.is_table(new, level) and
                                                self.pgt.pte_to_phys(new) ==
                                                self.pgt.pte_to_phys(old)):
                self._unlink(self.pgt.mem.pfn(self.pgt.pte_to_phys(old)),
                             ipa, level + 1)
        if new & P.VALID and old != new:
            self._check_make(level, ipa, new)
            if P.is_table(new, level) and not (P.is_table(old, level) and
                                                self.pgt.pte_to_phys(new) ==
                                                self.pgt.pte_to_phys(old)):
                self._link(self.pgt.mem.pfn(self.pgt.pte_to_phys(new)), ipa, level + 1,
                           check=True)

    def _compatible(self, a: int, b: int, level: int) -> bool:
        """Two entries of one slot a TLB may hold together: the same table, or
        leaves with the same output address and memory attributes
        (permissions may differ: changing them needs no break)."""
        ta, tb = P.is_table(a, level), P.is_table(b, level)
        if ta != tb:
            return False
        pa, pb = self.pgt.pte_to_phys(a), self.pgt.pte_to_phys(b)
        if ta:
            return pa == pb
        return pa == pb and (a & self._attr_mask) == (b & self._attr_mask)

    def _same_translation(self, block: int, level: int, table: int) -> str:
        """'' when the subtree of ``table`` maps what ``block`` mapped, with the
        same memory attributes; else where it differs."""
        pgt, mem, geom = self.pgt, self.pgt.mem, self.geom
        base = pgt.pte_to_phys(block)
        stack = [(mem.pfn(pgt.pte_to_phys(table)), level + 1, 0)]
        while stack:
            pfn, lv, off = stack.pop()
            g = geom.granule_size(lv)
            for i, e in enumerate(mem.pages[pfn]):
                o = off + i * g
                if P.is_table(e, lv):
                    stack.append((mem.pfn(pgt.pte_to_phys(e)), lv + 1, o))
                elif not e & P.VALID:
                    return f"offset {o:#x} is unmapped in the table"
                elif pgt.pte_to_phys(e) != base + o or \
                        (e & self._attr_mask) != (block & self._attr_mask):
                    return f"offset {o:#x} maps {pgt.pte_to_phys(e):#x}, the block {base + o:#x}"
        return ""

    def _check_make(self, level: int, ipa: int, new: int) -> None:
        """Rule 1 for a valid ``new`` entry now reachable at (level, ipa)."""
        # The latest stale entry first: the break that went uninvalidated.
        for s in sorted(self._stale.get((level, ipa), ()), key=lambda s: -s.since):
            if not s.alive or s.grace or self._compatible(s.value, new, level):
                continue
            why = "FEAT_BBM level 2 not present"
            if self.bbml2 and not P.is_table(s.value, level) and P.is_table(new, level):
                differs = self._same_translation(s.value, level, new)
                if not differs:
                    s.grace = self.n
                    self._grace.append(s)
                    continue
                why = f"FEAT_BBM level 2 present, but the table translates differently ({differs})"
            self._bbm_finding(s, level, ipa, new, why)
            break
        if P.is_table(new, level) or level == LAST_LEVEL:
            return
        g = self.geom.granule_size(level)
        for s in self._stale_in(ipa, ipa + g, deeper_than=level):
            if s.s2 or s.comb:
                self._bbm_finding(s, s.level, s.ipa, new,
                                  f"a level-{level} block at IPA {ipa:#x} made over it; "
                                  "FEAT_BBM level 2 does not cover it")
                break

    def _bbm_finding(self, s: _Stale, level: int, ipa: int, new: int, why: str) -> None:
        what = _kind(s.value, s.level)
        self._find(1, ipa, level,
                   f"{what} at IPA {ipa:#x} level {level} {s.how} at event {s.since}, "
                   f"{_kind(new, level)} made at event {self.n}, no TLBI by IPA or range "
                   f"covering it completed (TLBI, then DSB ISH) in between; {why}")

    def _stale_in(self, lo: int, hi: int, deeper_than: int = -2):
        """Stale translations overlapping [lo, hi) (of levels > deeper_than)."""
        geom = self.geom
        for level in range(max(deeper_than + 1, geom.start_level), LAST_LEVEL + 1):
            g = geom.granule_size(level)
            first = lo & ~(g - 1)
            if (hi - first) // g <= len(self._stale):
                for ipa in range(first, hi, g):
                    yield from self._stale.get((level, ipa), ())
            else:
                for (lv, ipa), items in list(self._stale.items()):
                    if lv == level and ipa < hi and ipa + g > lo:
                        yield from items

    # -- events: table pages ---------------------------------------------------------
    def page_freed(self, pfn: int, reused: bool = False) -> None:
        """Table page ``pfn`` freed (or taken again from the free list)."""
        if self.retired:
            return
        self.n += 1
        what = "reused" if reused else "freed"
        if pfn in self._live_pfns:
            self._find(3, 0, -1, f"table page {pfn} {what} at event {self.n} while still "
                       "linked into the stage-2 tables")
            return
        walks = [s for s in self._walk_to.get(pfn, ()) if s.s2]
        self._walk_to[pfn] = walks
        if walks:
            s = walks[0]
            self._find(3, s.ipa, s.level,
                       f"table page {pfn} {what} at event {self.n}, but the table entry at "
                       f"IPA {s.ipa:#x} level {s.level} pointing to it, {s.how} at event "
                       f"{s.since}, may still be in a walk cache: no TLBI by IPA (without "
                       "level hint) or range covering it completed in between")

    # -- events: TLB maintenance and barriers -----------------------------------------
    def tlbi_ipa(self, ipa: int, level: int | None, broadcast: bool = True) -> None:
        """TLBI IPAS2E1(IS) at ``ipa`` with level hint ``level`` (None: no hint)."""
        if self.retired:
            return
        self.n += 1
        if level is not None:
            self._check_hint(ipa, level)
        if broadcast:
            self._pending.append((_IPA, self.n, ipa, 0, -9 if level is None else level))

    def _check_hint(self, ipa: int, level: int) -> None:
        geom = self.geom
        others = []
        for lv in range(geom.start_level, LAST_LEVEL + 1):
            g = geom.granule_size(lv)
            items = [s for s in self._stale.get((lv, ipa & ~(g - 1)), ()) if s.s2]
            if lv == level and items:
                return
            others += items
        if others:
            s = max(others, key=lambda s: s.since)
            self._find(4, ipa, s.level,
                       f"TLBI at IPA {ipa:#x} with level hint {level} at event {self.n} "
                       f"removes nothing: the {_kind(s.value, s.level)} at IPA {s.ipa:#x} "
                       f"{s.how} at event {s.since} is at level {s.level}")

    def tlbi_range(self, lo: int, hi: int) -> None:
        """One range TLBI (RIPAS2E1IS, no level hint) covering [lo, hi)."""
        if self.retired:
            return
        self.n += 1
        self._pending.append((_RANGE, self.n, lo, hi, -9))

    def tlbi_vmid(self) -> None:
        """TLBI VMALLS12E1IS: both stages, the whole VMID."""
        if self.retired:
            return
        self.n += 1
        self._pending.append((_VMID, self.n, 0, 0, -9))

    def tlbi_s1(self, broadcast: bool = True) -> None:
        """TLBI VMALLE1(IS): stage-1 and combined entries of the VMID."""
        if self.retired:
            return
        self.n += 1
        if broadcast:
            self._pending.append((_S1, self.n, 0, 0, -9))

    def dsb(self, kind: str) -> None:
        """A DSB: ``"ish"`` completes the broadcast TLBIs issued before it;
        ``"ishst"``, ``"nsh"``, ``"nshst"`` complete none of them."""
        if self.retired:
            return
        self.n += 1
        if kind != "ish" or not self._pending:
            return
        pending, self._pending = self._pending, []
        for kind_, ev, a, b, level in pending:
            self._complete(kind_, ev, a, b, level)

    def _complete(self, kind: int, ev: int, a: int, b: int, level: int) -> None:
        geom = self.geom
        if kind == _IPA:
            for lv in range(geom.start_level, LAST_LEVEL + 1):
                if level != -9 and lv != level:
                    continue
                g = geom.granule_size(lv)
                key = (lv, a & ~(g - 1))
                for s in self._stale.get(key, ()):
                    if s.since < ev and (level == -9 or not P.is_table(s.value, lv)):
                        s.s2 = False
                self._prune(key)
            return
        if kind in (_S1, _VMID):
            keep = []
            for s in self._comb:
                if s.since < ev:
                    s.comb = False
                    if not s.alive:
                        self._prune((s.level, s.ipa))
                else:
                    keep.append(s)
            self._comb = keep
        if kind == _S1:
            return
        for key, items in list(self._stale.items()):
            lv, ipa = key
            if kind == _RANGE and not (ipa < b and ipa + geom.granule_size(lv) > a):
                continue
            for s in items:
                if s.since < ev:
                    s.s2 = False
            self._prune(key)

    def _prune(self, key: tuple[int, int]) -> None:
        items = self._stale.get(key)
        if items is not None:
            items[:] = [s for s in items if s.alive or s.grace]
            if not items:
                del self._stale[key]

    # -- hyp TLB calls (tlb.py): each as its instructions --------------------------------
    def hyp_flush_ipa(self, ipa: int, level: int | None, local: bool = False) -> None:
        """``__kvm_tlb_flush_vmid_ipa[_nsh]()``: TLBI IPAS2E1(IS); DSB; TLBI
        VMALLE1(IS); DSB (ISH, or NSH for the local one)."""
        self.tlbi_ipa(ipa, level, broadcast=not local)
        self.dsb("nsh" if local else "ish")
        self.tlbi_s1(broadcast=not local)
        self.dsb("nsh" if local else "ish")

    def hyp_flush_range(self, addr: int, pages: int) -> None:
        """One ``__kvm_tlb_flush_vmid_range()`` call (at most
        ``MAX_TLBI_RANGE_PAGES``): its range TLBIs; DSB ISH; TLBI VMALLE1IS; DSB ISH."""
        assert pages <= MAX_TLBI_RANGE_PAGES
        shift = self.geom.page_shift
        for first, n in range_tlbi_pieces(pages, addr >> shift,
                                          lpa2_range_align(shift, self.geom.lpa2)):
            self.tlbi_range(first << shift, (first + n) << shift)
        self.dsb("ish")
        self.tlbi_s1()
        self.dsb("ish")

    def hyp_flush_vmid(self) -> None:
        """``__kvm_tlb_flush_vmid()``: TLBI VMALLS12E1IS; DSB ISH."""
        self.tlbi_vmid()
        self.dsb("ish")

    # -- the KVM layer: ioctls, the MMU lock, teardown ----------------------------------
    def protected(self, addr: int, size: int) -> None:
        """A write-protect walk over [addr, addr + size) (``kvm_pgtable_stage2_wrprotect``)."""
        if self._ioctl is not None:
            self._protected.append((addr, addr + size, self.n))

    def ioctl_begin(self, name: str) -> None:
        self.n += 1
        self._ioctl = name
        self._protected = []

    def ioctl_end(self) -> None:
        """The ioctl returns (and with it the MMU lock): rule 2 over the pages
        it write-protected, then the end of a lock hold."""
        self.n += 1
        name, self._ioctl = self._ioctl, None
        if self._protected and not self.retired:
            self._check_dirty(name or "the ioctl")
        self._protected = []
        self.lock_release()

    def _check_dirty(self, name: str) -> None:
        for lo, hi, ev in self._protected:
            for s in self._stale_in(lo, hi):
                if s.alive and not P.is_table(s.value, s.level) and s.value & P.S2AP_W:
                    where = "a combined stage-1+2 entry" if not s.s2 else "a TLB"
                    self._find(2, s.ipa, s.level,
                               f"{name} returned at event {self.n} with a writable "
                               f"{_kind(s.value, s.level)} at IPA {s.ipa:#x} level {s.level} "
                               f"({s.how} at event {s.since}) still possibly in {where}: it "
                               f"was write-protected (from event {ev}) but no TLBI covering "
                               "it completed before the return; a guest write through it "
                               "would set no dirty bit")
                    return

    def lock_release(self) -> None:
        """The MMU lock is dropped: a block a bbml2 replace left cached must be
        gone by now."""
        if self.retired:
            self._grace = []
            return
        for s in self._grace:
            if s.alive:
                self._find(1, s.ipa, s.level,
                           f"block at IPA {s.ipa:#x} level {s.level} replaced by a table "
                           f"without a break at event {s.grace} (FEAT_BBM level 2), still "
                           f"possibly cached when the MMU lock was released at event {self.n}: "
                           "no TLBI covering it completed before")
                break
        for s in self._grace:
            s.grace = 0
            self._prune((s.level, s.ipa))
        self._grace = []

    def retire(self) -> None:
        """The stage-2 is being destroyed with the VM: its VMID runs no more
        (the VMID allocator invalidates it before reuse), so nothing is checked."""
        self.retired = True

    def _find(self, rule: int, ipa: int, level: int, message: str) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(Finding(rule, ipa, level, self.n, message))


def attach(target: Any) -> TlbModel:
    """Attach a new model to a reference-engine VM or a ``Stage2PageTable``
    (replacing any attached one); it starts from the tables as they are."""
    pgt = getattr(target, "pgt", target)
    model = TlbModel(pgt)
    pgt.tracer = model
    pgt.mem.tracer = model
    return model


def detach(target: Any) -> None:
    pgt = getattr(target, "pgt", target)
    pgt.tracer = None
    pgt.mem.tracer = None


def attached(target: Any) -> TlbModel | None:
    return getattr(getattr(target, "pgt", target), "tracer", None)
