"""Imports run one way: cli → sweep → pipeline → serve/search/export → tasks → run → evaluate/report → engine → llm →
validate → losses → teachers → models → data → types/registry → config → errors/atomic. A module may import only
modules of its own layer or below, and no module reaches itself through imports (inside functions too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kdkit"
LAYER = {
    "cli": 10,
    "__main__": 10,
    "sweep": 9.5,
    "pipeline": 9,
    "serve": 8,
    "search": 8,
    "export": 8,
    "tasks": 7.5,
    "interpret": 7.4,  # the tabular task's parts
    "run": 7.2,
    "evaluate": 7,
    "report": 7,
    "engine": 6,
    "generation": 5.5,
    "validate": 5.2,
    "losses": 5,
    "teachers": 4,
    "models": 3,
    "data": 2,
    "types": 1,
    "registry": 1,
    "config": 0.5,
    "errors": 0,
    "atomic": 0,
    "__init__": 0,
}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("kdkit.") else module


def test_no_module_imports_upward():
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        own = rel.parts[0].removesuffix(".py")
        assert own in LAYER, f"{rel}: new top-level module; give it a layer in this test"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("kdkit.") and _top(name) != own and LAYER[_top(name)] > LAYER[own]:
                    problems.append(f"{rel}:{node.lineno} imports {name} (layer {own} may not import upward)")
    assert not problems, "\n".join(problems)


def test_config_imports_no_torch_and_nothing_of_kdkit_but_errors():
    tree = ast.parse((SRC / "config.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported
    assert {m for m in imported if m.startswith("kdkit")} <= {"kdkit.errors"}


def _module_name(path: Path) -> str:
    parts = ("kdkit", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module → the kdkit modules it imports, at the top or inside functions (relative imports resolved)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != module and not module.startswith(t + ".") and not t.startswith(module + "."):
                    edges[module].add(t)
    return edges


def test_no_import_cycles_even_inside_functions():
    """A package may import its own submodules (kdkit.tasks → kdkit.tasks.classification); any other path that
    leads a module back to itself is a cycle."""
    edges = _import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        return False

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert not cycles, "import cycles: " + "; ".join(f"{a} <-> {b}" for a, b in cycles)


def test_cycle_finder_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    """The cycle test must see imports written inside functions (the kind the layering check used to miss)."""
    pkg = tmp_path / "kdkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kdkit.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from kdkit.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    edges = _import_graph()
    assert "kdkit.a" in edges["kdkit.b"] and "kdkit.b" in edges["kdkit.a"]
