"""kdkit: knowledge distillation for classifiers (and, as the toolkit grows, text, tabular and language models).

    import kdkit
    result = kdkit.distill("configs/mnist_cnn_to_mlp.yaml")   # -> RunResult(run_dir, metrics, student, teacher)

The building blocks are importable for your own scripts: kdkit.Teacher, kdkit.TeacherEnsemble, kdkit.LOSSES,
kdkit.build_loss, kdkit.train, kdkit.TrainOptions, kdkit.load_config. Names are resolved lazily so that
`import kdkit` (and `kdkit validate`) does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "distill": "kdkit.pipeline",
    "evaluate_run": "kdkit.pipeline",
    "RunResult": "kdkit.pipeline",
    "load_config": "kdkit.config",
    "KDConfig": "kdkit.config",
    "Teacher": "kdkit.teachers",
    "TeacherEnsemble": "kdkit.teachers",
    "LOSSES": "kdkit.losses",
    "build_loss": "kdkit.losses",
    "train": "kdkit.engine",
    "TrainOptions": "kdkit.engine",
    "build_model": "kdkit.models",
    "build_data": "kdkit.data",
    "TeacherCache": "kdkit.data",
    "KdkitError": "kdkit.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdkit' has no attribute {name!r}")
