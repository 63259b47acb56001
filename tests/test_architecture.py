"""The shape of the package: its layers (import-linter's contracts in
pyproject.toml), no import cycles, and no module too long to read.

The cycle check is our own walk of the source, independent of import-linter:
it counts every import statement wherever it is written -- at module level or
inside a function, where a lazy import hides a dependency as well as a
top-level one does -- except those under ``if TYPE_CHECKING:``, which never
run and only name types.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
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


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, outside TYPE_CHECKING blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            stack.extend(node.orelse)  # the else branch does run
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's own modules it imports, from the source."""
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    modules = set(files)
    root = package_dir.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _imports(tree):
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
    found; one closed only under TYPE_CHECKING is not; relative imports
    resolve from modules and from a package's __init__."""
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
    assert g["pkgx.sub.leaf"] == set()
    assert g["pkgx.sub.other"] == {"pkgx.sub.leaf", "pkgx.sub"}
    assert cycles(g) == [["pkgx.high", "pkgx.low"]]


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    for a, b in sorted(KNOWN_CYCLE_EDGES):
        assert b in graph[a], f"{a} no longer imports {b}: drop it from KNOWN_CYCLE_EDGES " \
            "(and from ignore_imports in pyproject.toml)"
        graph[a].discard(b)
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions included): " + "; ".join(
        " <-> ".join(c) for c in found)


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
