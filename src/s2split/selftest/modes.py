"""The selftests' guest modes (``enum vm_guest_mode``).

Two numberings: Linux 6.12's, and 6.16's and later's, in which
``VM_MODE_P47V47_16K`` (LoongArch's) was inserted before
``VM_MODE_P36V47_16K``, so that arm64's ``P36V47_16K`` is mode 16 instead of 15
(tools/testing/selftests/kvm/include/kvm_util.h). Modes 0-14 are the same.
:data:`MODES` is 6.12's; :func:`parse_mode` takes the numbering of the
kernel whose selftest runs (``versions.KernelRules.mode_numbering``).

``dirty_log_perf_test -m N`` selects mode ``N``; s2split also accepts the
mode's name (``P40V48_4K``) or its string. On arm64 the stage-2 IPA size is the
mode's PA bits and -- in the kernel the fixtures come from -- the stage-2
granule is the host page size, which the fixtures chose equal to the guest's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plumbing.errors import S2Error
from .sizes import strtol


@dataclass(frozen=True)
class GuestMode:
    id: int
    name: str
    pa_bits: int
    va_bits: int
    page_size: int
    arm64: bool = True

    @property
    def string(self) -> str:
        """``vm_guest_mode_string()``, double spaces included."""
        pa = f"{self.pa_bits},  " if self.pa_bits else "ANY, "
        size = f"{self.page_size // 1024}K"
        return f"PA-bits:{pa}VA-bits:{self.va_bits}, {size:>3} pages"


_MODES = [
    (0, "P52V48_4K", 52, 48, 4096), (1, "P52V48_16K", 52, 48, 16384),
    (2, "P52V48_64K", 52, 48, 65536), (3, "P48V48_4K", 48, 48, 4096),
    (4, "P48V48_16K", 48, 48, 16384), (5, "P48V48_64K", 48, 48, 65536),
    (6, "P40V48_4K", 40, 48, 4096), (7, "P40V48_16K", 40, 48, 16384),
    (8, "P40V48_64K", 40, 48, 65536), (9, "PXXV48_4K", 0, 48, 4096),
    (10, "P47V64_4K", 47, 64, 4096), (11, "P44V64_4K", 44, 64, 4096),
    (12, "P36V48_4K", 36, 48, 4096), (13, "P36V48_16K", 36, 48, 16384),
    (14, "P36V48_64K", 36, 48, 65536), (15, "P36V47_16K", 36, 47, 16384),
]
MODES: tuple[GuestMode, ...] = tuple(
    GuestMode(i, n, pa, va, ps, arm64=i not in (9, 10, 11)) for i, n, pa, va, ps in _MODES)
#: 6.16+: P47V47_16K (not an arm64 mode) takes id 15.
MODES_616: tuple[GuestMode, ...] = (*MODES[:15], GuestMode(15, "P47V47_16K", 47, 47, 16384,
                                                           arm64=False),
                                    GuestMode(16, *_MODES[15][1:]))
NUMBERINGS = {"6.12": MODES, "6.16": MODES_616}
DEFAULT_MODE = MODES[6]  # VM_MODE_DEFAULT on an arm64 host with a >= 40-bit IPA


def numbering(kernel: str | None) -> tuple[GuestMode, ...]:
    """The guest modes of the selftest of ``kernel`` (None: the default kernel's)."""
    from ..arm64.versions import DEFAULT_KERNEL, kernel_rules
    return NUMBERINGS[kernel_rules(kernel or DEFAULT_KERNEL).mode_numbering]


def parse_mode(text: str | int, kernel: str | None = None) -> GuestMode:
    """``-m 6``, ``-m P40V48_4K`` or ``-m "PA-bits:40,  VA-bits:48,  4K pages"``,
    numbered as the selftest of ``kernel`` numbers them (None: the default
    kernel's)."""
    modes = numbering(kernel)
    number = None
    if isinstance(text, int):
        number = text
    else:
        try:
            number = strtol(str(text))  # upstream reads -m with atoi_non_negative
        except ValueError:
            pass
    if number is not None:
        i = number
        if not 0 <= i < len(modes):
            raise S2Error(f"guest mode ID {i} too big: modes are 0..{len(modes) - 1} (see -h)")
        mode = modes[i]
    else:
        key = str(text).strip().upper().removeprefix("VM_MODE_")
        norm = " ".join(str(text).split()).lower()
        found = [m for m in modes if m.name == key or " ".join(m.string.split()).lower() == norm]
        if not found:
            raise S2Error(f"unknown guest mode {text!r}: use an ID or a name such as P40V48_4K "
                          "(list them with -h)")
        mode = found[0]
    if not mode.arm64:
        raise S2Error(f"guest mode {mode.id} ({mode.string}) does not exist on arm64")
    return mode


def mode_for(granule: int, ipa_bits: int) -> GuestMode:
    """The mode with this page size and PA bits, for ``--granule``/``--ipa-bits``."""
    for m in MODES:
        if m.arm64 and m.page_size == granule and m.pa_bits == ipa_bits and m.va_bits == 48:
            return m
    # Not a selftest mode: describe it anyway (the model is not limited to them).
    return GuestMode(-1, f"P{ipa_bits}V48_{granule // 1024}K", ipa_bits, 48, granule)


def modes_help(kernel: str | None = None) -> str:
    from ..arm64.versions import DEFAULT_KERNEL
    lines = [" -m: specify the guest mode ID (or name) to test, numbered as Linux "
             f"{kernel or DEFAULT_KERNEL}'s selftest numbers them (--kernel/--selftest)",
             f"     (default: {DEFAULT_MODE.id}, {DEFAULT_MODE.name}; upstream tests every "
             "supported mode by default)",
             "     Guest mode IDs:"]
    for m in numbering(kernel):
        if m.arm64:
            lines.append(f"         {m.id}:    {m.string}  [{m.name}]")
    return "\n".join(lines)
