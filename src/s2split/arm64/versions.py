"""Kernel versions whose stage-2 code (or selftest) differs in what s2split counts.

A kernel's rules are data: one :class:`KernelRules` entry in :data:`KERNELS`
says which teardown it runs, which free walker, by which function names the
teardown is traced, which CPU errata workarounds it has, how its walker treats
``-EAGAIN``, and how the ``dirty_log_perf_test`` of its source tree tears the
VM down and numbers its guest modes. Adding a kernel is one entry here plus
its tests (docs/design-notes.md lists every difference checked):

* 6.12: one ``kvm_pgtable_stage2_destroy()`` walk; the free walker drops every
  table at TABLE_POST; ``-EAGAIN`` stops only walks with
  ``KVM_PGTABLE_WALK_HANDLE_FAULT``; no AC04_CPU_23 workaround.
* 6.16 added the AmpereOne AC04_CPU_23 workaround (``write_sysreg_hcr()``)
  and the selftests' ``VM_MODE_P47V47_16K`` (mode ids from 15 on moved).
* 6.17 split the teardown into ``kvm_pgtable_stage2_destroy_range()``, once
  per ``KVM_PGTABLE_MIN_BLOCK_LEVEL`` granule of the IPA space, and
  ``kvm_pgtable_stage2_destroy_pgd()`` once.
* 6.19 changed the free walker: a table entry is dropped at TABLE_POST only
  when its child table is empty, and is then cleared (one more PTE write).
  6.17 and 6.18 (chunked destroy with the old free walker) are not offered;
  ``6.19`` stands for 6.19 up to 7.2.
* 7.3 (the default): the same stage-2 rules as 6.19; its walker's flag is
  ``KVM_PGTABLE_WALK_IGNORE_EAGAIN`` (``-EAGAIN`` stops every walk but the
  write-protect walk, which changes no count the model makes: see
  :data:`EAGAIN_RULES`); its selftest no longer deletes the memslots before
  the VM goes: ``kvm_vm_free()`` unmaps the regions and the MMU notifier
  (``kvm_unmap_gfn_range()``) unmaps the stage-2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..plumbing.errors import S2Error

DEFAULT_KERNEL = "7.3"

#: Teardown function names, as ftrace sees them (and ``fidelity record``
#: probes them): before 6.17 one call frees everything; since, one call per
#: chunk and one for the root.
DESTROY_612 = ("kvm_pgtable_stage2_destroy",)
DESTROY_617 = ("kvm_pgtable_stage2_destroy_range", "kvm_pgtable_stage2_destroy_pgd")

#: How a walk treats a visitor's ``-EAGAIN``: ``handle-fault`` (6.12, flag
#: KVM_PGTABLE_WALK_HANDLE_FAULT: only fault walks stop) or ``ignore-eagain``
#: (7.x, flag KVM_PGTABLE_WALK_IGNORE_EAGAIN: every walk stops unless it sets
#: the flag, which only ``kvm_pgtable_stage2_wrprotect()`` does). In the model
#: the two agree call for call: the only non-fault walk whose visitor returns
#: ``-EAGAIN`` without a lost race is the write-protect walk (the attr walker
#: on an invalid entry), which keeps going under both; the split, unmap, free
#: and unlinked-map visitors return ``-EAGAIN`` only when a cmpxchg loses to
#: another CPU, which one modelled thread never does (tests/test_versions.py
#: runs the ``ignore-eagain`` rule literally and compares).
EAGAIN_RULES = ("handle-fault", "ignore-eagain")

#: The selftest's teardown: ``delete-memslots`` (``kvm_vm_free()`` deletes each
#: memslot, ``kvm_arch_flush_shadow_memslot()`` unmaps it) or ``munmap``
#: (the regions are unmapped with their memslots in place; the MMU notifier's
#: ``kvm_unmap_gfn_range()`` unmaps the same stage-2 range).
TEARDOWNS = ("delete-memslots", "munmap")


@dataclass(frozen=True)
class KernelRules:
    version: str
    #: stage-2 teardown walks one chunk (MIN_BLOCK_LEVEL granule) at a time
    chunked_destroy: bool
    #: the free walker drops a table only when empty, and clears its entry
    free_clears_tables: bool
    #: the teardown's function names (DESTROY_612 or DESTROY_617)
    destroy_functions: tuple[str, ...]
    #: CPU errata workarounds the kernel has, by feature name (arm64/features.py)
    errata: frozenset[str]
    #: one of EAGAIN_RULES
    eagain: str
    #: the selftest of this kernel's source: one of TEARDOWNS
    selftest_teardown: str
    #: the selftest's guest-mode numbering (modes.NUMBERINGS)
    mode_numbering: str

    @property
    def destroy_range_function(self) -> str:
        """The function called once per teardown walk."""
        return self.destroy_functions[0]

    @property
    def destroy_pgd_function(self) -> str | None:
        """The function that frees the root once (None: the walk's own call)."""
        return self.destroy_functions[1] if len(self.destroy_functions) > 1 else None

    def cpu_features(self, features):
        """``features`` as this kernel acts on them: an erratum workaround
        the kernel does not have is off."""
        from dataclasses import replace
        from .features import ERRATA
        off = {name.replace("-", "_"): False for name in ERRATA if name not in self.errata}
        return replace(features, **{k: v for k, v in off.items() if getattr(features, k)})


_AC04 = frozenset({"ampere-ac04-cpu-23"})

KERNELS = {
    "6.12": KernelRules("6.12", chunked_destroy=False, free_clears_tables=False,
                        destroy_functions=DESTROY_612, errata=frozenset(),
                        eagain="handle-fault", selftest_teardown="delete-memslots",
                        mode_numbering="6.12"),
    "6.19": KernelRules("6.19", chunked_destroy=True, free_clears_tables=True,
                        destroy_functions=DESTROY_617, errata=_AC04,
                        eagain="ignore-eagain", selftest_teardown="delete-memslots",
                        mode_numbering="6.16"),
    "7.3": KernelRules("7.3", chunked_destroy=True, free_clears_tables=True,
                       destroy_functions=DESTROY_617, errata=_AC04,
                       eagain="ignore-eagain", selftest_teardown="munmap",
                       mode_numbering="6.16"),
}


def kernel_rules(version: str) -> KernelRules:
    try:
        return KERNELS[version]
    except (KeyError, TypeError):
        raise S2Error(f"kernel {version!r} is not modelled: choose {', '.join(KERNELS)} "
                      "(6.19 stands for 6.19 up to 7.2)") from None


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def parse_release(release: str) -> tuple[int, int] | None:
    """``"7.3.4+deb13-arm64"`` -> (7, 3); None if it names no version."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(release))
    return (int(m.group(1)), int(m.group(2))) if m else None


def nearest_kernel(release: str) -> str | None:
    """The modelled kernel whose rules a release runs: the newest modelled
    version not newer than it (the oldest for an older release); None if the
    release names no version."""
    ver = parse_release(release)
    if ver is None:
        return None
    older = [k for k in KERNELS if _key(k) <= ver]
    return max(older, key=_key) if older else min(KERNELS, key=_key)


def kernel_for_release(release: str) -> tuple[str, str | None]:
    """The modelled kernel for a fixture's ``kernel_release``, and a one-line
    note when the release is not itself modelled (None when it is)."""
    ver = parse_release(release)
    near = nearest_kernel(release)
    if near is None:
        return DEFAULT_KERNEL, (f"kernel_release {release!r} names no version: compared with "
                                f"the default kernel's rules ({DEFAULT_KERNEL})")
    if ver == _key(near):
        return near, None
    return near, (f"kernel_release {release!r} is not modelled: compared with the rules of "
                  f"{near}, the nearest modelled kernel")
