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
``bbml2``
    On a CPU with FEAT_BBM level 2 and NOABORT (``--cpu +bbml2``): the split
    replaces each block by its new table in one store, with no break and no
    per-block TLBI, and invalidates once per ``kvm_pgtable_stage2_split()``
    call (one range TLBI over what it split). Changes the TLB maintenance, so
    ``same_maintenance=False`` (``docs/design-notes.md``).
``skip-levels+bbml2``
    Both.
``split-batched-tlbi``
    A two-phase split: every block of one ``kvm_pgtable_stage2_split()``
    call whose subtree is complete is broken without its TLBI (its make
    deferred), one range TLBI over them all follows the walk, then the
    tables are made. Break-before-make holds on any CPU; the per-block
    by-IPA TLBIs become one range flush per call. Both engines run it (the
    fast engine keeps the deferred entries in its state arrays).

Defining a variant takes a few lines::

    from s2split.model.pgtable.variants import Variant, register
    from s2split.model.pgtable.walker import skip_level

    register(Variant("skip-l3-wp", "also skip level 3 when write-protecting",
                     walk_flags={"split": skip_level(3), "wrprotect": skip_level(3)}))

(that one is wrong on purpose: ``check_variant`` reports that it leaves pages
writable). A variant may also bring a visitor (``visitors={"split": fn}``)
and an after-walk hook, written once with :mod:`s2split.model.pgtable.visitor_api`:
both engines run them (see ``model/pgtable/api_visitors.py`` and the README).
Visitors in the older seven-argument form run on the reference engine only.

To use such variants from the command line, put the ``register`` calls in a
Python file and name it in ``S2SPLIT_VARIANTS`` (several files separated by
``:``, ``os.pathsep``, so a path in it cannot hold one), or pass ``--variants
FILE`` to ``s2split`` (any path): it hands its files to worker processes in
``S2SPLIT_VARIANT_FILES`` (a JSON list), so ``reproduce`` sees the same
variants.
"""

from __future__ import annotations

import inspect
import os
import runpy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from ...arm64.features import Features
from ...counting import counters
from ...plumbing.errors import S2Error
from . import api_visitors as AV
from .walker import RETURN_HINTS, SKIP_BBM_TLBI, SKIP_NEW_CHILDREN, WalkFlags, skip_level

_ALL_FLAGS = 0
for _flag in WalkFlags:
    _ALL_FLAGS |= int(_flag)

#: Operations whose walks a variant may change: the stage-2 walks that start
#: with kvm_pgtable_walk() (get_leaf walks the host's page tables, not ours).
VARIANT_OPS = tuple(op for op in counters.WALK_OPS if op != "get_leaf")


#: The functions of the KVM MMU layer a variant may replace (``Variant.mmu``),
#: each by a hook written with :mod:`s2split.model.kvm.mmu_api`:
#: ``kvm_arch_mmu_enable_log_dirty_pt_masked()``, the word loop of
#: ``kvm_clear_dirty_log_protect()`` (given the words of one call),
#: ``kvm_mmu_split_huge_pages()`` and the enable path's
#: ``kvm_mmu_wp_memory_region()`` + ``kvm_mmu_split_memory_region()``.
MMU_HOOKS = ("enable_log_dirty_pt_masked", "clear_dirty_log", "split_huge_pages",
             "enable_log_dirty")

#: MMU hooks the fast engine has compiled in (filled by the module that
#: defines them, :mod:`s2split.model.kvm.mmu_variants`); others run on the
#: reference engine only.
FAST_MMU_HOOKS: set = set()


def is_api_visitor(fn: Callable) -> bool:
    """A visitor of one argument, the context: written with
    :mod:`s2split.model.pgtable.visitor_api`, it runs on both engines. (The older
    form, ``(walk, pfn, table, idx, old, level, visit)``, runs on the
    reference engine only.)"""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return len([p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) == 1


_FEATURES = tuple(f.name for f in fields(Features))

def calls_defer_make(fn: Callable, _seen: set | None = None) -> bool:
    """True when ``fn``, or a plain function it calls by name, calls
    ``visitor_api.defer_make``: the fast engine then keeps room for the
    entries one walk defers (``engine/state.py``)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    if "defer_make" in code.co_names:
        return True
    seen = _seen if _seen is not None else set()
    seen.add(fn)
    found = []
    for n in code.co_names:
        obj = getattr(fn, "__globals__", {}).get(n)
        if inspect.ismodule(obj):  # module.function
            found += [getattr(obj, a, None) for a in code.co_names]
        else:
            found.append(obj)
    return any(inspect.isfunction(f) and f not in seen and calls_defer_make(f, seen)
               for f in found)


@dataclass(frozen=True)
class Variant:
    """A named change to the walks.

    * ``walk_flags``: flags added to the walks of each named operation;
    * ``visitors``: a visitor replacing the operation's (see
      :mod:`s2split.model.pgtable.visitor_api`);
    * ``after_walk``: a hook run once per call of the operation, after its
      walk (the same API; where maintenance deferred to the end of a call
      goes);
    * ``requires``: CPU features (:class:`~s2split.arm64.features.Features` names)
      without which the variant is refused;
    * ``same_maintenance``: whether the variant claims vanilla's TLB
      maintenance, barriers and break-before-make exactly (the check holds
      it to that); a variant that changes them (``bbml2``) says False and is
      held to the same tables, with every split block invalidated;
    * ``mmu``: hooks replacing functions of the KVM MMU layer (names in
      :data:`MMU_HOOKS`, written with :mod:`s2split.model.kvm.mmu_api`);
    * ``extra_protection``: the variant may write-protect pages that vanilla
      leaves writable (they fault again later; the check counts the faults);
    * ``cache_differs``: the split cache may hold another number of pages
      than vanilla's at the end of an ioctl (it tops up at other times).
    """

    name: str
    description: str
    walk_flags: Mapping[str, int] = field(default_factory=dict)
    visitors: Mapping[str, Callable] = field(default_factory=dict)
    after_walk: Mapping[str, Callable] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    same_maintenance: bool = True
    mmu: Mapping[str, Callable] = field(default_factory=dict)
    extra_protection: bool = False
    cache_differs: bool = False

    def __post_init__(self) -> None:
        # A variant may come from a user's file: check every type here, so
        # that a bad one is a one-line error when registered, not a traceback
        # (or a silently wrong walk) later.
        if not isinstance(self.name, str) or not self.name:
            raise S2Error(f"variant name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise S2Error(f"variant {self.name!r}: description must be a string, got "
                          f"{type(self.description).__name__}")
        for what, value in (("walk_flags", self.walk_flags), ("visitors", self.visitors),
                            ("after_walk", self.after_walk), ("mmu", self.mmu)):
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
        for what, table in (("visitors", self.visitors), ("after_walk", self.after_walk)):
            for op, fn in table.items():
                if not callable(fn):
                    raise S2Error(f"variant {self.name!r}: {what}[{op!r}] must be a function, "
                                  f"got {type(fn).__name__}")
        for op, fn in self.after_walk.items():
            if not is_api_visitor(fn):
                raise S2Error(f"variant {self.name!r}: after_walk[{op!r}] must be a function "
                              "of one argument, the context (s2split.model.pgtable.visitor_api)")
        for name, fn in self.mmu.items():
            if name not in MMU_HOOKS:
                raise S2Error(f"variant {self.name!r}: unknown MMU hook {name!r}; choose from "
                              f"{', '.join(MMU_HOOKS)}")
            if not callable(fn) or not is_api_visitor(fn):
                raise S2Error(f"variant {self.name!r}: mmu[{name!r}] must be a function of one "
                              "argument, the context (s2split.model.kvm.mmu_api)")
        for op in (*self.walk_flags, *self.visitors, *self.after_walk):
            if op not in VARIANT_OPS:
                raise S2Error(f"variant {self.name!r}: unknown operation {op!r}; "
                              f"choose from {', '.join(VARIANT_OPS)}")
        if isinstance(self.requires, str) or not all(isinstance(r, str) for r in self.requires):
            raise S2Error(f"variant {self.name!r}: requires must be a tuple of CPU feature "
                          f"names, got {self.requires!r}")
        for r in self.requires:
            if r not in _FEATURES:
                raise S2Error(f"variant {self.name!r}: requires unknown CPU feature {r!r}; "
                              f"choose from {', '.join(_FEATURES)}")
        object.__setattr__(self, "requires", tuple(dict.fromkeys(self.requires)))
        object.__setattr__(self, "walk_flags", MappingProxyType(dict(self.walk_flags)))
        object.__setattr__(self, "visitors", MappingProxyType(dict(self.visitors)))
        object.__setattr__(self, "after_walk", MappingProxyType(dict(self.after_walk)))
        object.__setattr__(self, "mmu", MappingProxyType(dict(self.mmu)))

    def flags_for(self, op: str) -> int:
        return self.walk_flags.get(op, 0)

    @property
    def flag_only(self) -> bool:
        """True when it only adds walk flags (no visitors, no hooks)."""
        return not self.visitors and not self.after_walk and not self.mmu

    @property
    def fast_capable(self) -> bool:
        """True when the fast engine can run it: its visitors and hooks are
        written with :mod:`s2split.model.pgtable.visitor_api`."""
        return all(is_api_visitor(fn) for fn in self.visitors.values()) and \
            all(fn in FAST_MMU_HOOKS for fn in self.mmu.values())

    @property
    def defers(self) -> bool:
        """True when a visitor or hook makes two-phase changes
        (``visitor_api.defer_make``)."""
        return any(calls_defer_make(fn)
                   for fn in (*self.visitors.values(), *self.after_walk.values()))

    def check_cpu(self, features: Features) -> None:
        """Refuse a CPU without a feature the variant requires."""
        for r in self.requires:
            if not getattr(features, r):
                raise S2Error(f"variant {self.name!r} needs the CPU feature {r}, which this "
                              f"profile's CPU does not have (add --cpu +{r}, or use a profile "
                              "that has it)")

    def __add__(self, other: "Variant") -> "Variant":
        flags = dict(self.walk_flags)
        for op, f in other.walk_flags.items():
            flags[op] = flags.get(op, 0) | f
        return Variant(f"{self.name}+{other.name}", f"{self.description}; {other.description}",
                       flags, {**self.visitors, **other.visitors},
                       {**self.after_walk, **other.after_walk},
                       (*self.requires, *other.requires),
                       self.same_maintenance and other.same_maintenance,
                       {**self.mmu, **other.mmu}, self.extra_protection or other.extra_protection,
                       self.cache_differs or other.cache_differs)


VANILLA = Variant("vanilla", "the kernel as it is (6.12 to 7.3: the same eager split): the split walk visits every entry of its range")
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

BBML2 = Variant("bbml2",
                "with FEAT_BBM level 2 (NOABORT) the split replaces each block by its table "
                "without a break, and invalidates once per kvm_pgtable_stage2_split() call "
                "with one range TLBI over what it split",
                visitors={"split": AV.bbml2_split_walker},
                after_walk={"split": AV.bbml2_flush_split}, requires=("bbml2",),
                same_maintenance=False)
SKIP_LEVELS_BBML2 = SKIP_LEVELS + BBML2
SPLIT_BATCHED_TLBI = Variant(
    "split-batched-tlbi",
    "two-phase split: break every block of one kvm_pgtable_stage2_split() call without its "
    "TLBI, one range TLBI over them, then make them",
    walk_flags={"split": SKIP_BBM_TLBI}, visitors={"split": AV.batched_split_walker},
    after_walk={"split": AV.batched_flush_make}, same_maintenance=False)

_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, *, replace: bool = False) -> Variant:
    if not isinstance(variant, Variant):
        raise S2Error(f"register() takes a Variant, got {type(variant).__name__}")
    if variant.name in _REGISTRY and not replace:
        raise S2Error(f"a variant named {variant.name!r} already exists")
    _REGISTRY[variant.name] = variant
    return variant


for _v in (VANILLA, SKIP_LEVELS, SKIP_CHILDREN, SKIP_BOTH, RETURN_HINTS_VARIANT, BBML2,
           SKIP_LEVELS_BBML2, SPLIT_BATCHED_TLBI):
    register(_v)

DEFAULT_VARIANTS = ("vanilla", "skip-levels", "skip-levels+skip-children")


ENV = "S2SPLIT_VARIANTS"
#: The ``--variants`` files, as a JSON list (paths may hold ``:`` or newlines).
FILES_ENV = "S2SPLIT_VARIANT_FILES"
_loaded: set[str] = set()


def _env_files() -> list[str]:
    files = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    listed = os.environ.get(FILES_ENV, "")
    if listed:
        import json
        try:
            more = json.loads(listed)
        except ValueError:
            more = None
        if not isinstance(more, list) or not all(isinstance(p, str) for p in more):
            raise S2Error(f"{FILES_ENV}: not a JSON list of paths")
        files += more
    return files


def load_variant_files(paths: list[str]) -> None:
    """Run the Python files PATHS (once each), and hand them to worker
    processes (:data:`FILES_ENV`)."""
    import json
    files = [os.path.abspath(p) for p in paths]
    known = json.loads(os.environ.get(FILES_ENV) or "[]")
    os.environ[FILES_ENV] = json.dumps([*known, *(f for f in files if f not in known)])
    _run_files(files)


def load_user_variants() -> None:
    """Run the files named in ``S2SPLIT_VARIANTS`` and :data:`FILES_ENV` (once each)."""
    _run_files(_env_files())


def _run_files(paths: list[str]) -> None:
    import stat
    for path in paths:
        if path in _loaded:
            continue
        _loaded.add(path)
        try:
            st = os.stat(path)
        except OSError:
            raise S2Error(f"{ENV}: no such file {path!r}") from None
        if not stat.S_ISREG(st.st_mode):
            from ...plumbing.validate import file_kind
            raise S2Error(f"{path}: is {file_kind(st.st_mode)}, not a Python file")
        from ...plumbing.output import note_input
        note_input(path)
        try:
            runpy.run_path(path, run_name="s2split_user_variants")
        except S2Error as e:
            raise S2Error(f"{path}: {e}") from None
        except BaseException as e:  # a user's file: report it in one line
            if type(e) is KeyboardInterrupt:  # a real Ctrl-C, not the file's own
                raise
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


def _name(fn: Callable) -> str:
    """A visitor's name, and for one written with the API a hash of its
    source: a user's edited visitor must not reuse stored results."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    if is_api_visitor(fn):
        import hashlib
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            return name
        name += "@" + hashlib.sha256(src.encode()).hexdigest()[:12]
    return name


def definition(variant: Variant) -> dict:
    """What a variant does, for result keys: same name, different flags or
    visitors, must not reuse stored results."""
    d = {"flags": {op: int(f) for op, f in sorted(variant.walk_flags.items())},
         "visitors": {op: _name(v) for op, v in sorted(variant.visitors.items())}}
    # Only when present, so that the keys of flag-only variants stay as they were.
    if variant.after_walk:
        d["after_walk"] = {op: _name(v) for op, v in sorted(variant.after_walk.items())}
    if variant.requires:
        d["requires"] = list(variant.requires)
    if variant.mmu:
        d["mmu"] = {name: _name(v) for name, v in sorted(variant.mmu.items())}
    if variant.extra_protection:
        d["extra_protection"] = True
    return d
