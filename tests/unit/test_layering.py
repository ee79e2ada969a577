"""Imports run one way: cli → pipeline → evaluate/report → engine → losses → teachers → models → data →
types/registry → config → errors/atomic. A module may import only modules of its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "kdkit"
LAYER = {
    "cli": 10,
    "__main__": 10,
    "pipeline": 9,
    "pipeline_lm": 9,
    "validate": 9,
    "serve": 8,
    "search": 8,
    "interpret": 8,
    "export": 8,
    "evaluate": 7,
    "report": 7,
    "engine": 6,
    "llm": 5.5,
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
