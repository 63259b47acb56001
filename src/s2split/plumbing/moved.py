"""The module names from before the package was laid out in layer folders,
kept importable: ``import s2split.pgtable.visitor_api`` gives the
module now at ``s2split.model.pgtable.visitor_api`` -- the same module
object, so a variant registered through either name is one variant -- with a
:class:`DeprecationWarning` naming the new place. CHANGELOG.md lists the moves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

#: Old name -> new name, for every module that moved (a package's
#: submodules follow it).
MOVED: dict[str, str] = {
    **{f"s2split.{m}": f"s2split.arm64.{m}"
       for m in ("arch", "bits", "features", "hierarchy", "pte", "rules", "uapi", "versions")},
    **{f"s2split.{m}": f"s2split.selftest.{m}"
       for m in ("backing_names", "memstress", "modes", "options", "phases", "sizes")},
    **{f"s2split.{m}": f"s2split.counting.{m}"
       for m in ("counters", "counts", "kernel_counters")},
    **{f"s2split.{m}": f"s2split.plumbing.{m}"
       for m in ("console", "errors", "output", "validate", "workers")},
    **{f"s2split.{m}": f"s2split.storage.{m}" for m in ("schemas", "store")},
    **{f"s2split.{m}": f"s2split.estimate.{m}" for m in ("cost", "intervals", "profiles")},
    **{f"s2split.{m}": f"s2split.model.{m}" for m in ("kvm", "pgtable")},
    **{f"s2split.{m}": f"s2split.tasks.{m}"
       for m in ("background", "calibrate", "calibrate_savings", "demo", "explain", "fidelity",
                 "interleaving", "mmu_check", "per_iteration", "perftest", "reproduce",
                 "savings_table", "variant_check")},
    "s2split.commands": "s2split.cli.commands",
}


def new_name(name: str) -> str | None:
    """Where module ``name`` lives now, or None if it did not move."""
    head, sep, tail = name, "", ""
    while head:
        if head in MOVED:
            return MOVED[head] + sep + tail
        head, dot, last = head.rpartition(".")
        tail = last + (sep + tail if tail else "")
        sep = dot
    return None


def _importer_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised in :meth:`_Alias.exec_module`
    name the line that imported the old name. ``warnings`` itself passes
    over the import system's frozen frames; ``importlib.import_module``'s
    own frame is passed over here, so that its caller is named too."""
    level, frame = 2, sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name and "_bootstrap" in name:
            pass  # not counted by warnings either
        elif Path(name).parent.name == "importlib":
            level += 1
        else:
            break
        frame = frame.f_back
    return level


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module at its new name.

    The new module is imported under its own name and then stored under the
    old one too, so that both names give one module object (loading the file
    a second time would make a second registry of variants). A name with no
    module at its new place is not found here either: ``find_spec`` answers
    None and ``import`` fails as for any missing module."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        if found is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname, self, is_package=found.submodule_search_locations is not None)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        old = module.__name__
        new = new_name(old)
        warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=_importer_stacklevel())
        # The import system returns what sys.modules holds under the old
        # name once this returns: the real module, not this placeholder.
        sys.modules[old] = importlib.import_module(new)

    def get_code(self, fullname):
        """``python -m OLD.NAME``: none of the moved modules ran as a script,
        and run under its old name a module's relative imports would miss;
        one line says where it is."""
        raise ImportError(f"{fullname} moved to {new_name(fullname)}")


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once): the default
    finders would otherwise load an old submodule name from the new
    package's directory as a second copy."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
