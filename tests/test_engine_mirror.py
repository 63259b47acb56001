"""The fast engine mirrors the reference file by file: every compiled walker,
visitor and stage-2 function has its reference counterpart by name, and every
compiled function says in its docstring what it models."""

import inspect

from numba.core.dispatcher import Dispatcher

from s2split.engine import compile_cache, entries, stage2, visitors, walker
from s2split.model.pgtable import stage2 as ref_stage2
from s2split.model.pgtable import walker as ref_walker

#: Fast-engine functions with no reference function of the same name, and why.
NO_COUNTERPART = {
    "_leaf_run": "the vectorized rest of a level-3 table loop; counted as _visit counts",
    "_unmap_leaf_run": "the same for unmap, where its leaves need no TLBI or cache "
                       "maintenance each; counted as _visit and the unmap visitor count",
    "call_visitor": "dispatch on the operation: the reference passes the visitor as a callable",
    "_fill": "create_unlinked's walk over its new table (numba cannot recurse into the walker)",
    "_fill_leaves": "the map visitor over a whole new table of leaves, inside _fill",
    "_free_table": "the TABLE_POST half of _free_visitor, shared with free_unlinked's walk",
    "call_after_walk": "a variant's after-walk hook; the reference calls it in kvm_pgtable_walk",
    "_walk_cache": "the walk's memory cache for the visitor API (the reference reads w.arg)",
}


def compiled(module):
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, Dispatcher) and obj.py_func.__module__ == module.__name__}


def reference_names(module, cls=None):
    names = {n for n, o in vars(module).items() if inspect.isfunction(o)}
    if cls is not None:
        names |= {n for n, o in vars(cls).items()
                  if inspect.isfunction(o) or isinstance(o, staticmethod)}
    return names


def test_walker_functions_have_reference_counterparts():
    ref = reference_names(ref_walker)
    for name in compiled(walker):
        assert name in ref or name in NO_COUNTERPART, f"engine/walker.py: {name}"
    # walk_continue is the reference's own function, compiled.
    assert walker.walk_continue.py_func is ref_walker.walk_continue


def test_visitor_functions_have_reference_counterparts():
    ref = reference_names(ref_stage2, ref_stage2.Stage2PageTable)
    for name in compiled(visitors):
        assert name in ref or name in NO_COUNTERPART, f"engine/visitors.py: {name}"
    # ...and every reference visitor has its twin.
    ref_visitors = {n for n, o in vars(ref_stage2).items()
                    if inspect.isfunction(o) and n.endswith("_visitor")}
    assert len(ref_visitors) >= 5
    for name in ref_visitors - {"_leaf_visitor"}:  # get_leaf: the host lookups, counted whole
        assert name in compiled(visitors), f"no fast twin of {name}"


def test_entry_functions_have_reference_counterparts():
    ref = reference_names(ref_stage2, ref_stage2.Stage2PageTable)
    for name in compiled(entries):
        assert name in ref or name in NO_COUNTERPART, f"engine/entries.py: {name}"


def test_stage2_operations_have_reference_counterparts():
    ref = reference_names(ref_stage2, ref_stage2.Stage2PageTable)
    for name in compiled(stage2):
        base = name.removeprefix("stage2_")
        assert base in ref or "_" + base in ref, f"engine/stage2.py: {name}"


def test_every_compiled_function_says_what_it_models():
    for d in compile_cache.dispatchers():
        doc = inspect.getdoc(d.py_func)
        assert doc and doc.strip(), f"{d.py_func.__module__}.{d.py_func.__name__}: no docstring"
