"""Variants: named changes to how the walker and visitors work.

A variant adds walk flags to the walks of chosen operations (and, for
experiments that need code, may replace a visitor). It must never change the
final tables, the TLB invalidations or the cache maintenance compared to
``vanilla`` -- only the work spent walking; :func:`check_variant` tests a
variant against ``vanilla`` on randomized workloads.

Built-in variants (the 2026 "Optimize S2 page splitting" series and its RFC):

``vanilla``
    Linux 6.12.
``skip-levels``
    The split walk carries ``SKIP_LEVEL3``: the walker never descends into a
    table of level-3 entries -- they can never need splitting.
``skip-children``
    After the split visitor has replaced a block with a complete subtree
    (built with ``force_pte``), the walker does not descend into it. A subtree
    built without ``force_pte`` (the cache was too small) still holds blocks,
    so the walker descends as in vanilla -- skipping it would leave blocks
    unsplit, the problem raised in review of the RFC.
``skip-levels+skip-children``
    Both.
``return-hints``
    The RFC: the split visitor returns positive hints, "skip my siblings" at
    level 3 and "skip my children" after a complete split.

Defining a variant takes a few lines::

    from s2split.pgtable.variants import Variant, register
    from s2split.pgtable.walker import skip_level

    register(Variant("skip-l3-wp", "also skip level 3 when write-protecting",
                     walk_flags={"split": skip_level(3), "wrprotect": skip_level(3)}))

(that one is wrong on purpose: ``check_variant`` reports that it leaves pages
writable). Flag-only variants run on both engines; a variant that replaces a
visitor (``visitors={"split": my_split_walker}``) runs on the reference engine.

To use such variants from the command line, put the ``register`` calls in a
Python file and name it in ``S2SPLIT_VARIANTS`` (several files separated by
``:``), or pass ``--variants FILE`` to ``s2split``, which sets it; worker
processes inherit the variable, so ``reproduce`` sees the same variants.
"""

from __future__ import annotations

import os
import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .. import counters
from ..errors import S2Error
from .walker import RETURN_HINTS, SKIP_NEW_CHILDREN, WalkFlags, skip_level

_ALL_FLAGS = 0
for _flag in WalkFlags:
    _ALL_FLAGS |= int(_flag)

#: Operations whose walks a variant may change: the stage-2 walks that start
#: with kvm_pgtable_walk() (get_leaf walks the host's page tables, not ours).
VARIANT_OPS = tuple(op for op in counters.WALK_OPS if op != "get_leaf")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    walk_flags: Mapping[str, int] = field(default_factory=dict)
    visitors: Mapping[str, Callable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A variant may come from a user's file: check every type here, so
        # that a bad one is a one-line error when registered, not a traceback
        # (or a silently wrong walk) later.
        if not isinstance(self.name, str) or not self.name:
            raise S2Error(f"variant name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise S2Error(f"variant {self.name!r}: description must be a string, got "
                          f"{type(self.description).__name__}")
        for what, value in (("walk_flags", self.walk_flags), ("visitors", self.visitors)):
            if not isinstance(value, Mapping):
                raise S2Error(f"variant {self.name!r}: {what} must map operation names to "
                              f"{'walk flags' if what == 'walk_flags' else 'functions'}, got "
                              f"{type(value).__name__}")
        for op, flags in self.walk_flags.items():
            if isinstance(flags, bool) or not isinstance(flags, int):
                raise S2Error(f"variant {self.name!r}: walk_flags[{op!r}] must be an integer "
                              f"of WalkFlags bits, got {type(flags).__name__} {flags!r}")
            if flags < 0 or flags & ~_ALL_FLAGS:
                raise S2Error(f"variant {self.name!r}: walk_flags[{op!r}] = {flags:#x} has "
                              f"bits that are no WalkFlags (known: {_ALL_FLAGS:#x})")
        for op, fn in self.visitors.items():
            if not callable(fn):
                raise S2Error(f"variant {self.name!r}: visitors[{op!r}] must be a function, "
                              f"got {type(fn).__name__}")
        for op in (*self.walk_flags, *self.visitors):
            if op not in VARIANT_OPS:
                raise S2Error(f"variant {self.name!r}: unknown operation {op!r}; "
                              f"choose from {', '.join(VARIANT_OPS)}")
        object.__setattr__(self, "walk_flags", MappingProxyType(dict(self.walk_flags)))
        object.__setattr__(self, "visitors", MappingProxyType(dict(self.visitors)))

    def flags_for(self, op: str) -> int:
        return self.walk_flags.get(op, 0)

    @property
    def flag_only(self) -> bool:
        """True when the fast engine can run it (no replaced visitors)."""
        return not self.visitors

    def __add__(self, other: "Variant") -> "Variant":
        flags = dict(self.walk_flags)
        for op, f in other.walk_flags.items():
            flags[op] = flags.get(op, 0) | f
        return Variant(f"{self.name}+{other.name}", f"{self.description}; {other.description}",
                       flags, {**self.visitors, **other.visitors})


VANILLA = Variant("vanilla", "Linux 6.12: the split walk visits every entry of its range")
SKIP_LEVELS = Variant("skip-levels", "the split walk skips level 3 (SKIP_LEVEL3)",
                      {"split": skip_level(3)})
SKIP_CHILDREN = Variant("skip-children",
                        "the split walk does not descend into a subtree it just built complete",
                        {"split": SKIP_NEW_CHILDREN})
SKIP_BOTH = SKIP_LEVELS + SKIP_CHILDREN
RETURN_HINTS_VARIANT = Variant("return-hints",
                               "RFC: the split visitor returns skip-siblings at level 3 and "
                               "skip-children after a complete split",
                               {"split": RETURN_HINTS})

_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, *, replace: bool = False) -> Variant:
    if not isinstance(variant, Variant):
        raise S2Error(f"register() takes a Variant, got {type(variant).__name__}")
    if variant.name in _REGISTRY and not replace:
        raise S2Error(f"a variant named {variant.name!r} already exists")
    _REGISTRY[variant.name] = variant
    return variant


for _v in (VANILLA, SKIP_LEVELS, SKIP_CHILDREN, SKIP_BOTH, RETURN_HINTS_VARIANT):
    register(_v)

DEFAULT_VARIANTS = ("vanilla", "skip-levels", "skip-levels+skip-children")


ENV = "S2SPLIT_VARIANTS"
_loaded: set[str] = set()


def load_user_variants() -> None:
    """Run the files named in ``S2SPLIT_VARIANTS`` (once each)."""
    for path in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        if path in _loaded:
            continue
        _loaded.add(path)
        if not os.path.isfile(path):
            raise S2Error(f"{ENV}: no such file {path!r}")
        try:
            runpy.run_path(path, run_name="s2split_user_variants")
        except S2Error as e:
            raise S2Error(f"{path}: {e}") from None
        except (Exception, SystemExit) as e:  # a user's file: report it in one line
            text = str(e).splitlines()[0] if str(e) else ""
            raise S2Error(f"{path}: {type(e).__name__}: {text}") from None


def get(name: str) -> Variant:
    load_user_variants()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise S2Error(f"unknown variant {name!r}: choose from {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    load_user_variants()
    return list(_REGISTRY)


def all_variants() -> list[Variant]:
    load_user_variants()
    return list(_REGISTRY.values())


def definition(variant: Variant) -> dict:
    """What a variant does, for result keys: same name, different flags or
    visitors, must not reuse stored results."""
    return {"flags": {op: int(f) for op, f in sorted(variant.walk_flags.items())},
            "visitors": {op: f"{v.__module__}.{v.__qualname__}"
                         for op, v in sorted(variant.visitors.items())}}
