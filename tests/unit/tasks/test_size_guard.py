"""The house stays readable: pipeline.py fits in 200 lines, and no function of the shared flow (tasks/, run/,
engine/) runs over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src" / "kdkit"
LIMIT = 80


def test_pipeline_reads_in_under_200_lines():
    assert len((SRC / "pipeline.py").read_text().splitlines()) <= 200


def test_pipeline_names_no_task():
    text = (SRC / "pipeline.py").read_text()
    for name in ("classification", "causal_lm", "tabular", "interpret"):
        assert f'"{name}"' not in text and f"'{name}'" not in text, name


def test_no_long_function_in_the_shared_flow():
    long = []
    for folder in ("tasks", "run", "engine"):
        for path in (SRC / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LIMIT:
                        long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
