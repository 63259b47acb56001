"""The shape of the package: its layers (import-linter's contracts in
pyproject.toml), no import cycles, and no module too long to read.

The cycle check is our own walk of the source, independent of import-linter:
it counts every import statement wherever it is written -- at module level,
inside a function, where a lazy import hides a dependency as well as a
top-level one does, and under ``if TYPE_CHECKING:``, whose imports never run
but still tie two modules together for a reader (the KVM layer once closed
its vm/mmu/dirty_log circle that way; a Protocol in ``kvm_host`` replaced it).
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "s2split"

#: Import edges allowed to close a cycle, each with who removes it and when.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

MAX_LINES = 800
#: Modules allowed over MAX_LINES for now.
LONG_MODULES: set[str] = set()


def module_name(path: Path, package_dir: Path) -> str:
    """The dotted name of a source file under PACKAGE_DIR (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, type_checking: bool = True):
    """Every Import/ImportFrom node, at any depth; those under ``if
    TYPE_CHECKING:`` only if ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if not type_checking and _type_checking_block(node):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path, type_checking: bool = True) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports, from the source
    (imports for type checking too, unless ``type_checking`` is false)."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    root = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree, type_checking):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = mod.split(".")
                    # from .x inside a package's __init__ is relative to the package
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule pkg.sub
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix
                           for a in node.names]
            for t in targets:
                while t and t not in modules:  # import a.b.c of a name: the module a.b
                    t = t.rpartition(".")[0]
                if t and t.split(".")[0] == root and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    """On a made-up package: a cycle closed only by a function's import is
    found, and one closed only under TYPE_CHECKING too (unless asked not to
    count those); relative imports resolve from modules and from a package's
    __init__."""
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n")
    (pkg / "high.py").write_text("from . import low\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import other\n"
        "x = 1\n")
    (pkg / "sub" / "other.py").write_text("from .leaf import x\nimport pkgx.sub\n")
    g = import_graph(pkg)
    assert g["pkgx.low"] == {"pkgx.high"} and g["pkgx.high"] == {"pkgx.low"}
    assert g["pkgx.sub"] == {"pkgx.sub.leaf"}
    assert g["pkgx.sub.leaf"] == {"pkgx.sub.other"}
    assert g["pkgx.sub.other"] == {"pkgx.sub.leaf", "pkgx.sub"}
    assert cycles(g) == [["pkgx.high", "pkgx.low"], ["pkgx.sub", "pkgx.sub.leaf", "pkgx.sub.other"]]
    runtime = import_graph(pkg, type_checking=False)
    assert runtime["pkgx.sub.leaf"] == set()
    assert cycles(runtime) == [["pkgx.high", "pkgx.low"]]


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    for a, b in sorted(KNOWN_CYCLE_EDGES):
        assert b in graph[a], f"{a} no longer imports {b}: drop it from KNOWN_CYCLE_EDGES " \
            "(and from ignore_imports in pyproject.toml)"
        graph[a].discard(b)
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions and under TYPE_CHECKING " \
        "included): " + "; ".join(" <-> ".join(c) for c in found)


def test_import_linter_contracts():
    """The layers contract and the numpy-free core, as ``lint-imports`` (the CI
    check) reads them from pyproject.toml."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    r = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 broken" in r.stdout, r.stdout


def test_no_module_is_too_long():
    too_long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path, PACKAGE)
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in LONG_MODULES:
            too_long[name] = lines
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_long_module_exemptions_are_still_needed():
    for name in sorted(LONG_MODULES):
        path = PACKAGE.joinpath(*name.split(".")[1:]).with_suffix(".py")
        assert path.exists() and len(path.read_text().splitlines()) > MAX_LINES, \
            f"{name} is gone or short now: drop it from LONG_MODULES"


def _layer_folders() -> list[str]:
    return sorted(p.name for p in PACKAGE.iterdir()
                  if p.is_dir() and p.name != "__pycache__")


def test_the_top_holds_only_the_face_and_main():
    """Every module lives in a layer folder; only the package's face and
    ``__main__`` sit at the top, and every folder is a package."""
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top
    for name in _layer_folders():
        assert (PACKAGE / name / "__init__.py").is_file(), f"{name}/ is not a package"


def _layers_contract() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "layers"]
    assert contract["containers"] == ["s2split"] and contract["exhaustive"]
    return [[m.strip() for m in layer.replace(":", "|").split("|")]
            for layer in contract["layers"]]


def test_the_layers_contract_reads_like_the_tree():
    """One layer per folder (two independent folders may share one): the
    contract names exactly the folders, and the README's tree lists them in
    the contract's order, top to bottom."""
    layers = _layers_contract()
    assert layers[0] == ["__main__"]
    named = [m for layer in layers[1:] for m in layer]
    assert sorted(named) == _layer_folders()
    assert all(len(layer) == 1 for layer in layers if layer != ["selftest", "counting"])
    readme = (ROOT / "README.md").read_text()
    tree = readme[readme.index("src/s2split/\n"):]
    tree = tree[:tree.index("```")]
    listed = []
    for line in tree.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("├──", "└──") and parts[1].endswith("/"):
            listed.append(parts[1].rstrip("/"))
    assert listed == named, listed


def test_the_kvm_layer_has_no_circle_even_in_annotations():
    """kvm_main.c and mmu.c call each other; here vm.py calls mmu.py and
    dirty_log.py and they name the VM by kvm_host's protocols, so not even an
    import for type annotations goes back up."""
    graph = import_graph(PACKAGE, type_checking=True)
    kvm = {m: {t for t in ts if t.startswith("s2split.model.kvm")}
           for m, ts in graph.items() if m.startswith("s2split.model.kvm")}
    assert not cycles(kvm), cycles(kvm)
    for low in ("mmu", "dirty_log", "kvm_host", "memslot", "backing"):
        assert "s2split.model.kvm.vm" not in graph[f"s2split.model.kvm.{low}"], low
    assert "s2split.model.kvm.kvm_host" in graph["s2split.model.kvm.mmu"]


def _members(protocol: type) -> set[str]:
    """A protocol's own fields and methods (its bases' too)."""
    out: set[str] = set()
    for cls in protocol.__mro__:
        if cls.__module__ != protocol.__module__:
            continue
        out |= set(cls.__dict__.get("__annotations__", {}))
        out |= {n for n, v in vars(cls).items()
                if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return out


def test_both_engines_vms_have_what_the_kvm_layer_names():
    """The protocols are what mmu.py and dirty_log.py use: a reference VM
    and its vCPU have all of it; the fast engine's VM has the methods the
    shared decisions call (KvmArch), and its field (geom) from VMBase's
    __init__, which it runs like the reference VM (whose geom is checked)."""
    from s2split.arm64.arch import Geometry
    from s2split.engine.vm import FastVM
    from s2split.model.kvm.kvm_host import Kvm, KvmArch, KvmVcpu
    from s2split.model.kvm.vm import VM, VMBase

    vm = VM(Geometry(4096, 40))
    vcpu = vm.add_vcpu()
    assert isinstance(vm, Kvm) and isinstance(vcpu, KvmVcpu)
    assert _members(Kvm) > _members(KvmArch) > {"geom", "enable_log_dirty"}
    assert issubclass(FastVM, VMBase) and set(KvmArch.__annotations__) == {"geom"}
    missing = {m for m in _members(KvmArch) - {"geom"} if not hasattr(FastVM, m)}
    assert not missing, missing


def _moved() -> dict[str, str]:
    path = PACKAGE / "plumbing" / "moved.py"
    spec = importlib.util.spec_from_file_location("_moved_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MOVED


def test_no_code_of_ours_uses_an_old_module_name():
    """Old names are for users' code: the package, its tests (but the one
    below) and benchmarks import modules by their place in the tree."""
    old = _moved()
    offenders = []
    for base in ("src", "tests", "bench", "examples"):
        for path in sorted((ROOT / base).rglob("*.py")):
            if path.name == "test_architecture.py":
                continue
            for node in _imports(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if not isinstance(node, ast.Import) and node.level:
                    continue  # relative imports are checked by lint-imports' resolution
                for n in names:
                    if any(n == o or n.startswith(o + ".") for o in old):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {n}")
    assert not offenders, offenders


def test_old_module_names_still_import():
    """Every module that moved imports by its old name too, as the same
    module object (one registry of variants), with a DeprecationWarning
    naming the new place; the README's Python API of earlier releases works."""
    old = _moved()
    script = f"""
import importlib, sys, warnings
moved = {old!r}
for o, n in sorted(moved.items()):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = importlib.import_module(o)
    b = importlib.import_module(n)
    assert a is b, (o, n)
    assert any(issubclass(x.category, DeprecationWarning) and n in str(x.message) for x in w), o
# a submodule of a moved package, by the old dotted path and by attribute
from s2split.pgtable.visitor_api import VisitCtx
from s2split.model.pgtable.visitor_api import VisitCtx as V2
assert VisitCtx is V2
import s2split.pgtable.variants as V
from s2split.pgtable.walker import skip_level
from s2split.arch import Geometry
from s2split.pte import Prot
from s2split.kvm import mmu_api
from s2split.workload import PerfTestParams, run_perf_test
assert V.get("skip-levels") is sys.modules["s2split.model.pgtable.variants"].get("skip-levels")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
