"""The engine stays readable: no function in src/kdkit/engine/ is longer than 80 lines (def line to last line),
and the loop that calls set-up, the optimizer step and evaluation fits on one screen."""

from __future__ import annotations

import ast
from pathlib import Path

import kdkit.engine

ENGINE = Path(kdkit.engine.__file__).parent


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(ENGINE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}::{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_engine_function_is_longer_than_80_lines():
    lengths = _function_lengths()
    assert "loop.py::train" in lengths and "loop.py::_fit" in lengths
    too_long = {name: n for name, n in lengths.items() if n > 80}
    assert not too_long, f"split these functions: {too_long}"


def test_train_has_no_test_only_parameters():
    import inspect

    from kdkit.engine import train

    assert "interrupt_after" not in inspect.signature(train).parameters
