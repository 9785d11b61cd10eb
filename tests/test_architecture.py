"""The layer map holds: the import contracts in pyproject.toml are kept, and no module import cycle exists.

- `lint-imports` (import-linter, configured in pyproject.toml's `[tool.importlinter]`) reports every
  contract KEPT; a planted upward import makes it fail, so the contracts really bite.
- The module-level import graph of the packages in `ACYCLIC` has no strongly connected component of more
  than one module (nor a module importing itself). Only imports that run when a module is imported count:
  statements in the module body, including inside `if`/`try`/`with` blocks and class bodies, but not inside
  functions (deferred on purpose) nor under `if TYPE_CHECKING:` (never run).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Package -> subpackages left out of the cycle check (none: the tooling in services.cli, services.bench and
# services.eval is checked too; its deferred imports, which this check skips, are held by the contracts).
ACYCLIC: dict[str, tuple[str, ...]] = {"kvstore": (), "services": ()}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports is not installed (the `dev` extra pins import-linter)"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([exe, "--no-cache", "--no-logo", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    r = _lint_imports(ROOT)
    assert r.returncode == 0, f"lint-imports failed:\n{r.stdout}\n{r.stderr}"
    assert "0 broken" in r.stdout, r.stdout


def test_a_planted_upward_import_breaks_the_contracts(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("kvstore", "services"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    block = tmp_path / "kvstore" / "codec" / "block.py"
    block.write_text(block.read_text() + "\nimport kvstore.tiers.manifest  # planted: the codec imports upward\n")
    engine = tmp_path / "services" / "worker" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom kvstore.tiers.store import SessionStore  # planted: past the entry\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "kvstore.codec stores blocks without knowing how they are cut or where they live BROKEN" in r.stdout
    assert "kvstore's layers, top to bottom BROKEN" in r.stdout
    assert "the worker reaches the library through kvstore.device and kvstore.storage BROKEN" in r.stdout


def test_a_deferred_upward_import_in_the_tooling_breaks_its_contracts(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("kvstore", "services"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ppl, load = tmp_path / "services" / "eval" / "ppl.py", tmp_path / "services" / "bench" / "load.py"
    ppl.write_text(ppl.read_text() + "\n\ndef planted():\n    from services.bench.common import prefill  # upward\n")
    load.write_text(load.read_text() + "\n\ndef planted():\n    from services.bench.resume import median_times\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "never upward BROKEN" in r.stdout
    assert "benchmarks share services.bench.common only, never one another BROKEN" in r.stdout


def _modules() -> dict[str, Path]:
    """Every module of the checked packages (an `__init__.py` stands for its package), by dotted name."""
    out = {}
    for package, excluded in ACYCLIC.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not any(name == e or name.startswith(e + ".") for e in excluded):
                out[name] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_imports(body: list[ast.stmt]):
    """The Import/ImportFrom statements that run when a module with this body is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_imports(node.orelse)
        else:
            for block in _blocks(node):
                yield from _import_time_imports(block)


def _blocks(node: ast.stmt):
    """The statement lists nested directly in a compound statement (if, try, with, for, while, match, class)."""
    for field in ("body", "orelse", "finalbody"):
        yield getattr(node, field, [])
    for handler in getattr(node, "handlers", []):
        yield handler.body
    for case in getattr(node, "cases", []):
        yield case.body


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The checked modules an import statement loads (the most specific known module of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the checked modules it imports at import time."""
    known = _modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(name, is_package, n, known) for n in _import_time_imports(tree.body)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in graph[v]:
                        found.append(sorted(component))
    return sorted(found)


def test_cycles_finds_a_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]


def test_only_imports_run_at_import_time_count():
    tree = ast.parse("""
import a
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import b
else:
    import c
try:
    import d
except ImportError:
    import e
class K:
    import f
    def m(self):
        import g
def h():
    import i
""")
    assert [n.names[0].name for n in _import_time_imports(tree.body)] == ["a", "TYPE_CHECKING", "c", "d", "e", "f"]


def test_the_graph_holds_the_checked_packages_imports():
    graph = import_graph()
    assert "kvstore.layout" in graph["kvstore.codec.block"]
    assert "kvstore.quant.state" in graph["kvstore.layout"]
    assert "services.client" in graph and "services.cli.main" in graph and "services.bench.common" in graph
    assert graph["services.cli.bench"] >= {"services.cli.commands", "services.eval.corpus"}


@pytest.mark.parametrize("package", sorted(ACYCLIC))
def test_no_module_import_cycle(package):
    found = [c for c in cycles(import_graph()) if c[0].split(".")[0] == package]
    assert not found, "module import cycles (each a strongly connected component):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in found)
