"""arm64 stage-2 translation geometry: granules, levels, shifts, start level.

Everything here follows ``arch/arm64/include/asm/kvm_pgtable.h`` and
``kvm_get_vtcr()`` / ``kvm_pgd_pages()`` in ``arch/arm64/kvm/hyp/pgtable.c``:

* a level's shift is ``(PAGE_SHIFT - 3) * (4 - level) + 3``; level 3 is last;
* KVM builds blocks from ``KVM_PGTABLE_MIN_BLOCK_LEVEL`` (1 on 4K, 2 otherwise)
  down to level 3 (pages);
* the stage-2 has ``max(2, (ipa - 8) // (PAGE_SHIFT - 3))`` levels and starts at
  ``4 - levels``; the root is ``((2**ipa - 1) >> shift(start - 1)) + 1``
  concatenated pages which the walker indexes as one long array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from ..plumbing.errors import S2Error

#: Granule size -> PAGE_SHIFT.
GRANULES: dict[int, int] = {4096: 12, 16384: 14, 65536: 16}

FIRST_LEVEL = -1
LAST_LEVEL = 3
MIN_IPA_BITS = 32  # ARM64_MIN_PARANGE_BITS
MAX_IPA_BITS = 48
MAX_IPA_BITS_52 = 52
MAX_ROOT_PAGES = 16  # architectural limit on concatenated stage-2 root tables

_NAMES = {4096: "4K", 16384: "16K", 65536: "64K"}
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_granule(text: str | int) -> int:
    """Accept ``4K``/``16k``/``64K``/``4096``... and return the granule in bytes."""
    if isinstance(text, int):
        value = text
    else:
        t = text.strip().upper().removesuffix("B")
        try:
            value = int(t[:-1]) * _SUFFIX[t[-1]] if t and t[-1] in _SUFFIX else int(t)
        except (ValueError, KeyError):
            raise S2Error(f"unknown granule {text!r}: use 4K, 16K or 64K") from None
    if value not in GRANULES:
        raise S2Error(f"unknown granule {text!r}: use 4K, 16K or 64K")
    return value


def granule_name(granule: int) -> str:
    return _NAMES[granule]


def pmd_size(granule: int) -> int:
    """The level-2 block size of a granule (``PMD_SIZE``): 2M, 32M or 512M."""
    ps = GRANULES[granule]
    return 1 << (ps + ps - 3)


def size_name(size: int) -> str:
    """Shortest exact binary-suffixed name: 2097152 -> ``2M``."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


@dataclass(frozen=True)
class Geometry:
    """The shape of one stage-2 page table (``struct kvm_pgtable`` minus memory).

    ``lpa2`` selects the 52-bit descriptor layout of FEAT_LPA2 (4K/16K);
    ``lpa`` allows 52-bit IPAs with 64K pages (FEAT_LPA). Without them the IPA
    size is limited to 48 bits.
    """

    granule: int = 4096
    ipa_bits: int = 40
    lpa2: bool = False
    lpa: bool = False
    page_shift: int = field(init=False)
    bits_per_level: int = field(init=False)
    ptrs_per_table: int = field(init=False)
    levels: int = field(init=False)
    start_level: int = field(init=False)
    pgd_pages: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.granule, bool) or not isinstance(self.granule, int) or \
                self.granule not in GRANULES:
            raise S2Error(f"granule {self.granule} is not supported: use 4K, 16K or 64K")
        if isinstance(self.ipa_bits, bool) or not isinstance(self.ipa_bits, int):
            raise S2Error(f"IPA size must be an integer number of bits, got {self.ipa_bits!r}")
        for name in ("lpa2", "lpa"):
            if not isinstance(getattr(self, name), bool):
                raise S2Error(f"{name} must be True or False, got {getattr(self, name)!r}")
        ps = GRANULES[self.granule]
        if self.lpa2 and self.granule == 65536:
            raise S2Error("LPA2 applies to 4K and 16K granules only; 64K uses LPA for 52-bit IPAs")
        if self.lpa and self.granule != 65536:
            raise S2Error("LPA (52-bit PA with 64K pages) applies to the 64K granule only; use LPA2")
        wide = self.lpa2 or self.lpa
        limit = MAX_IPA_BITS_52 if wide else MAX_IPA_BITS
        if not MIN_IPA_BITS <= self.ipa_bits <= limit:
            if self.ipa_bits > MAX_IPA_BITS and self.ipa_bits <= MAX_IPA_BITS_52 and not wide:
                need = "LPA (64K)" if self.granule == 65536 else "LPA2"
                raise S2Error(f"a {self.ipa_bits}-bit IPA space needs {need}: without it the "
                              f"IPA size is {MIN_IPA_BITS}..{MAX_IPA_BITS} bits")
            raise S2Error(f"IPA size {self.ipa_bits} bits is out of range: {MIN_IPA_BITS}..{limit} "
                          f"bits with a {_NAMES[self.granule]} granule"
                          + ("" if wide else " (52 only with LPA2 on 4K/16K or LPA on 64K)"))
        bpl = ps - 3
        levels = max(2, (self.ipa_bits - 4 - 4) // bpl)
        start = 4 - levels
        object.__setattr__(self, "page_shift", ps)
        object.__setattr__(self, "bits_per_level", bpl)
        object.__setattr__(self, "ptrs_per_table", 1 << bpl)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "start_level", start)
        pgd = (((1 << self.ipa_bits) - 1) >> self.shift(start - 1)) + 1
        if pgd > MAX_ROOT_PAGES:  # cannot happen with the formula above; keep the rule visible
            raise S2Error(f"{self.ipa_bits}-bit IPA needs {pgd} root tables; at most 16 concatenate")
        object.__setattr__(self, "pgd_pages", pgd)

    # -- per level ---------------------------------------------------------
    def shift(self, level: int) -> int:
        """``ARM64_HW_PGTABLE_LEVEL_SHIFT(level)``; defined below the start level too."""
        return self.bits_per_level * (4 - level) + 3

    def granule_size(self, level: int) -> int:
        """Bytes mapped by one entry at ``level``."""
        return 1 << self.shift(level)

    @property
    def min_block_level(self) -> int:
        """``KVM_PGTABLE_MIN_BLOCK_LEVEL``: 1 on 4K, 2 on 16K and 64K."""
        return 1 if self.granule == 4096 else 2

    def supports_block(self, level: int) -> bool:
        """``kvm_level_supports_block_mapping()``; level 3 'blocks' are pages."""
        return level >= self.min_block_level

    @cached_property
    def block_levels(self) -> tuple[int, ...]:
        """Levels at which KVM may create leaves, largest first."""
        return tuple(range(max(self.min_block_level, self.start_level), LAST_LEVEL + 1))

    @cached_property
    def supported_block_sizes(self) -> tuple[int, ...]:
        """Sizes in ``kvm_supported_block_sizes()`` (pages included), largest first."""
        return tuple(self.granule_size(lv) for lv in range(self.min_block_level, LAST_LEVEL + 1))

    @property
    def supported_block_sizes_bitmap(self) -> int:
        """Value of ``KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES``."""
        bits = 0
        for size in self.supported_block_sizes:
            bits |= size
        return bits

    @property
    def pmd_size(self) -> int:
        return self.granule_size(2)

    @property
    def pud_size(self) -> int:
        return self.granule_size(1)

    @property
    def ipa_size(self) -> int:
        return 1 << self.ipa_bits

    @cached_property
    def shifts(self) -> tuple[int, ...]:
        """Shift per level, indexed by ``level + 1`` (levels -1..3)."""
        return tuple(self.shift(lv) for lv in range(FIRST_LEVEL, LAST_LEVEL + 1))

    def index(self, addr: int, level: int) -> int:
        """``kvm_pgtable_idx()``: the entry index of ``addr`` in a level's table."""
        return (addr >> self.shift(level)) & (self.ptrs_per_table - 1)

    def pgd_page_index(self, addr: int) -> int:
        """``kvm_pgd_page_idx()``: which concatenated root page covers ``addr``."""
        return (addr & (self.ipa_size - 1)) >> self.shift(self.start_level - 1)

    @property
    def name(self) -> str:
        extra = "+lpa2" if self.lpa2 else "+lpa" if self.lpa else ""
        return f"{_NAMES[self.granule]}/{self.ipa_bits}-bit{extra}"

    def describe(self) -> str:
        return (f"{self.name}: {self.levels} levels from level {self.start_level}, "
                f"{self.pgd_pages} root page(s), {self.ptrs_per_table} entries per table, "
                f"blocks " + ", ".join(size_name(s) for s in self.supported_block_sizes))
