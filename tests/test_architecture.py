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
import inspect
import shutil
import subprocess
import sys
import textwrap
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


def _named(node: ast.Import | ast.ImportFrom, mod: str, is_package: bool) -> tuple[str, list[str]]:
    """An import statement's names, absolute: the module it must find
    (``from a.b import c``: a.b) and what it takes (a.b.c: a submodule or a
    name in a.b); ``import a.b`` gives ("", [a.b])."""
    if isinstance(node, ast.Import):
        return "", [a.name for a in node.names]
    if node.level:
        base = mod.split(".")
        # from .x inside a package's __init__ is relative to the package
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return prefix, [f"{prefix}.{a.name}" for a in node.names]


def _files(package_dir: Path) -> dict[str, Path]:
    return {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}


def _statements(files: dict[str, Path], type_checking: bool = True):
    """(module, prefix, taken) for each import statement of each file."""
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree, type_checking):
            yield (mod, *_named(node, mod, path.name == "__init__.py"))


def import_graph(package_dir: Path, type_checking: bool = True) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports, from the source
    (imports for type checking too, unless ``type_checking`` is false)."""
    files = _files(package_dir)
    modules = set(files)
    root = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, prefix, taken in _statements(files, type_checking):
        # `from pkg import sub` imports the submodule pkg.sub
        for t in (t if t in modules or not prefix else prefix for t in taken):
            while t and t not in modules:  # import a.b.c of a name: the module a.b
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] == root and t != mod:
                graph[mod].add(t)
    return graph


def unknown_imports(package_dir: Path) -> list[str]:
    """Imports of the package's own names that find no module of it (an old
    name served by an alias, a typo): the graph above would draw them as an
    import of the nearest real package and hide the real edge."""
    files = _files(package_dir)
    root = package_dir.name
    out = []
    for mod, prefix, taken in _statements(files):
        needed = [prefix] if prefix else taken
        out += [f"{mod}: {n}" for n in needed if n.split(".")[0] == root and n not in files]
    return out


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
    assert unknown_imports(pkg) == []
    (pkg / "stale.py").write_text("from .gone import x\nimport pkgx.sub.leaf\n")
    assert unknown_imports(pkg) == ["pkgx.stale: pkgx.gone"]
    (pkg / "stale.py").unlink()
    runtime = import_graph(pkg, type_checking=False)
    assert runtime["pkgx.sub.leaf"] == set()
    assert cycles(runtime) == [["pkgx.high", "pkgx.low"]]


def test_no_import_cycles():
    assert not unknown_imports(PACKAGE)  # each edge below is a real one
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


def _raises_not_implemented(member) -> bool:
    fn = member.fget if isinstance(member, property) else member
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return any(isinstance(n, ast.Raise) and n.exc is not None and
               "NotImplementedError" in ast.unparse(n.exc) for n in ast.walk(tree))


def test_both_engines_vms_have_what_the_kvm_layer_names():
    """A reference VM and its vCPU have all of the protocols; the fast
    engine's VM implements every method of KvmArch itself or inherits a real
    one (not VMBase's NotImplementedError stub), and gets ``geom`` from
    VMBase's __init__ as the reference VM does."""
    from s2split.arm64.arch import Geometry
    from s2split.engine.vm import FastVM
    from s2split.model.kvm.kvm_host import Kvm, KvmArch, KvmVcpu
    from s2split.model.kvm.vm import VM, VMBase

    vm = VM(Geometry(4096, 40))
    vcpu = vm.add_vcpu()
    assert isinstance(vm, Kvm) and isinstance(vcpu, KvmVcpu)
    assert _members(Kvm) > _members(KvmArch) > {"geom", "enable_log_dirty"}
    assert issubclass(FastVM, VMBase) and set(KvmArch.__annotations__) == {"geom"}
    for m in sorted(_members(KvmArch) - {"geom"}):
        owner = next((c for c in FastVM.__mro__ if m in vars(c)), None)
        assert owner is not None, f"FastVM has no {m}"
        assert not _raises_not_implemented(vars(owner)[m]), f"FastVM.{m} is {owner.__name__}'s stub"


def test_the_kvm_protocols_name_what_the_kvm_layer_uses():
    """Every attribute the KVM layer reads of a VM or vCPU it names by a
    protocol (a parameter annotated Kvm, KvmArch or KvmVcpu, or an MMU hook
    context's ``.vm``) is declared by that protocol."""
    from s2split.model.kvm import kvm_host

    protocols = {n: getattr(kvm_host, n) for n in ("Kvm", "KvmArch", "KvmVcpu")}
    used, missing = [], []
    for name in ("mmu", "dirty_log", "mmu_api"):
        tree = ast.parse((PACKAGE / "model" / "kvm" / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            typed = {a.arg: a.annotation.id for a in fn.args.args
                     if isinstance(a.annotation, ast.Name) and a.annotation.id in protocols}
            for node in ast.walk(fn):
                if not isinstance(node, ast.Attribute):
                    continue
                v = node.value
                if isinstance(v, ast.Name) and v.id in typed:
                    kind = typed[v.id]
                elif isinstance(v, ast.Attribute) and v.attr == "vm":
                    kind = "Kvm"
                else:
                    continue
                used.append(node.attr)
                if node.attr not in _members(protocols[kind]):
                    missing.append(f"{name}.{fn.name}: {kind}.{node.attr}")
    assert len(set(used)) >= 10  # the walk found the layer's uses
    assert not missing, missing


def _moved() -> dict[str, str]:
    path = PACKAGE / "plumbing" / "moved.py"
    spec = importlib.util.spec_from_file_location("_moved_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MOVED


#: The modules of s2split 0.2, the last release with a flat package (its tree
#: at commit c76f242, less __init__ and __main__): each still imports.
MODULES_0_2 = (
    "arch", "background", "backing_names", "bits", "calibrate", "calibrate_savings", "cli",
    "commands", "console", "cost", "counters", "counts", "demo", "errors", "explain",
    "features", "fidelity", "hierarchy", "interleaving", "intervals", "kernel_counters",
    "memstress", "mmu_check", "modes", "options", "output", "per_iteration", "perftest",
    "phases", "pte", "reproduce", "rules", "savings_table", "schemas", "sizes", "store", "uapi",
    "validate", "variant_check", "versions", "workers", "workload",
    "kvm.backing", "kvm.dirty_log", "kvm.memslot", "kvm.mmu", "kvm.mmu_api", "kvm.mmu_variants",
    "kvm.vm", "pgtable.api_visitors", "pgtable.memory", "pgtable.stage2", "pgtable.tlb",
    "pgtable.tlb_model", "pgtable.variants", "pgtable.visitor_api", "pgtable.walker",
)


def test_no_code_of_ours_uses_an_old_module_name():
    """Old names are for users' code: the package (relative imports
    included), its tests (but the one below) and benchmarks import modules
    by their place in the tree."""
    assert not unknown_imports(PACKAGE)
    old = _moved()
    offenders = []
    for base in ("tests", "bench", "examples"):
        for path in sorted((ROOT / base).rglob("*.py")):
            if path.name == "test_architecture.py":
                continue
            for node in _imports(ast.parse(path.read_text())):
                prefix, taken = _named(node, "", False)
                for n in [prefix, *taken] if prefix else taken:
                    if any(n == o or n.startswith(o + ".") for o in old):
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {n}")
    assert not offenders, offenders


def test_old_module_names_still_import(tmp_path):
    """Every module of 0.2 imports by its old name, as the same module object
    (one registry of variants), with a DeprecationWarning that names the new
    place and the user's import line (shown under Python's default filters
    to a script); a name that never existed is still missing, and
    ``python -m s2split.cli`` still runs the command line."""
    script = tmp_path / "user_script.py"
    script.write_text(f"""\
import importlib, importlib.util, sys, warnings
import s2split.arch
from s2split.pgtable.walker import skip_level
names = {MODULES_0_2!r}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for short in names:
        o = "s2split." + short
        a = importlib.import_module(o)
        assert a is sys.modules[a.__name__], o
        assert a.__name__ != o or short in ("cli", "workload"), o
assert importlib.util.find_spec("s2split.pgtable.no_such_module") is None
import s2split.pgtable.variants as V
from s2split.model.pgtable import variants as W
assert V is W and V.get("skip-levels") is W.get("skip-levels")
from s2split.workload import PerfTestParams, run_perf_test
from s2split.cli import main
print("ok")
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    assert f"{script}:2: DeprecationWarning: s2split.arch moved to s2split.arm64.arch" in r.stderr
    assert f"{script}:3: DeprecationWarning: s2split.pgtable.walker moved to " \
        "s2split.model.pgtable.walker" in r.stderr
    # every moved name is in the table, and the table names nothing else
    old = _moved()
    moved = {f"s2split.{m}" for m in MODULES_0_2 if m not in ("cli", "workload")}
    assert {m for m in moved if m.count(".") == 1} | {"s2split.kvm", "s2split.pgtable",
                                                       "s2split.profiles"} == set(old)
    r = subprocess.run([sys.executable, "-m", "s2split.demo"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().endswith(
        "s2split.demo moved to s2split.tasks.demo"), r.stderr
