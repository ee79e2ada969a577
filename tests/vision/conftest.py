"""The vision tier: real torchvision and timm networks through kdkit. It needs the `vision` extra, which needs the
torch 2.14.1 + torchvision 0.29.1 pair (.ci/run builds a second environment for it and runs `pytest -m vision`);
without it every test here is skipped with one reason."""

from __future__ import annotations

import importlib.util

import pytest

MISSING = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is None]
REASON = (
    f"vision tier: {' and '.join(MISSING)} not installed (pip install 'kdkit[vision]' beside torch 2.14.1 + "
    "torchvision 0.29.1; .ci/run runs this tier in its own environment)"
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/vision/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.vision)
            if MISSING:
                item.add_marker(pytest.mark.skip(reason=REASON))
