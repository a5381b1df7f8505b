"""The package's architecture, checked: the import graph (every import, inside functions too) has
no cycle and follows the layers of docs/architecture.md; modules and folders stay small; the facade
loads no torch; every registry string resolves."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "histoprism"
MAX_LINES, MAX_MODULES, MAX_COMMENT_LINES = 800, 15, 6


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines under ``if TYPE_CHECKING:``: seen by type checkers, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines |= set(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (functions included)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        deps = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                submodules = [f"{module}.{a.name}" for a in node.names]
                # ``from . import x`` of submodules only does not use the package's own names
                whole = not all(s in paths for s in submodules)
                targets = ([module] if whole else []) + submodules
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in paths and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layers() -> list[set[str]]:
    """The contract's layers, top first, each a set of top-level names under histoprism."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = config["tool"]["importlinter"]["contracts"]
    return [{part.strip() for part in layer.split("|")} for layer in contract["layers"]]


def _top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_in_the_graph():
    graph = import_graph()  # cli imports the training API inside its train command
    assert "histoprism.training.api" in graph["histoprism.cli"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_module_sits_in_a_layer_and_imports_only_lower_layers():
    rank = {name: i for i, layer in enumerate(layers()) for name in layer}
    bad = []
    for module, deps in import_graph().items():
        if module == "histoprism":  # the facade: imports everything, lazily
            continue
        top = _top(module)
        assert top in rank, f"{module} is in no layer of the import-linter contract"
        for dep in deps:
            other = _top(dep)
            if other != top and not rank.get(other, -1) > rank[top]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the layers: " + ", ".join(sorted(bad))


def test_import_linter_contract_holds():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]


def test_modules_and_folders_stay_small():
    long = [
        f"{p.relative_to(SRC)}: {n}"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    crowded = [
        f"{d.relative_to(SRC)}: {n}"
        for d in [PACKAGE, *PACKAGE.rglob("*/")]
        if (n := len([p for p in d.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES
    ]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    assert not crowded, f"folders over {MAX_MODULES} modules: {crowded}"


def test_no_long_comment_blocks():
    """A comment says why in a few lines; measurement histories belong in docs/."""
    bad = []
    for path in PACKAGE.rglob("*.py"):
        run = 0
        for i, line in enumerate([*path.read_text(encoding="utf-8").splitlines(), ""], 1):
            if line.strip().startswith("#"):
                run += 1
                continue
            if run > MAX_COMMENT_LINES:
                bad.append(f"{path.relative_to(SRC)}:{i - run} ({run} lines)")
            run = 0
    assert not bad, "comment blocks over 6 lines: " + ", ".join(bad)


def test_the_facade_loads_no_torch_and_resolves_every_name():
    code = (
        "import sys, histoprism as hp\n"
        "assert 'torch' not in sys.modules, 'import histoprism loaded torch'\n"
        "assert set(dir(hp)) >= {'train', 'predict', 'evaluate', 'benchmark', 'extract', 'explain'}\n"
        "for name in hp.__all__: getattr(hp, name)\n"
        "print(len(hp.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20
    import histoprism as hp

    with pytest.raises(AttributeError, match="no attribute 'tain'"):
        hp.tain  # noqa: B018


def test_every_registry_string_resolves():
    from histoprism.models.registry import MODEL_KINDS

    refs = [ref for kind in MODEL_KINDS.values() for ref in (kind.fit, kind.load)]
    assert refs
    for ref in refs:
        module, _, attr = ref.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), ref


def test_python_dash_m_histoprism():
    result = subprocess.run(
        [sys.executable, "-m", "histoprism", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout
