"""What scores a request: the eager PyTorch student, or its ONNX export run by ONNX Runtime; and the teacher
for shadow monitoring. Each is a function from inputs (B, *in_shape) float32 to logits (B, C), safe to call
from several threads at once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.errors import ConfigError
from kdkit.export import Run, export_run, load_teacher

Logits = Callable[[np.ndarray], np.ndarray]
BACKENDS = ("torch", "onnx")


def torch_logits(model: nn.Module) -> Logits:
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
        return getattr(out, "logits", out).float().numpy()

    return run


def onnx_logits(path: str | Path, threads: int | None = None) -> Logits:
    from kdkit.export.onnx_runtime import onnx_session, run_session

    session = onnx_session(path, threads)
    return lambda x: run_session(session, x)


def student_backend(run: Run, backend: str, threads: int | None = None, log=print) -> Logits:
    """The student as `backend`. For onnx, RUN_DIR/export/onnx/model.onnx is used when it was exported from the
    current student weights; otherwise it is exported first (with the parity check)."""
    if backend == "torch":
        return torch_logits(run.student)
    if backend != "onnx":
        raise ConfigError(f"--backend: unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    folder = run.run_dir / "export" / "onnx"
    if not _fresh(folder, run):
        log(f"serve: exporting the student to {folder} (ONNX, parity-checked)")
        export_run(run.run_dir, "onnx", folder)
    return onnx_logits(folder / "model.onnx", threads)


def teacher_backend(run: Run) -> Logits:
    return torch_logits(load_teacher(run))


def _fresh(folder: Path, run: Run) -> bool:
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model.onnx").is_file() and record.get("student_sha256") == run.student_sha256()


def class_names_of(run: Run) -> list[str]:
    """Class names from an export of the current student (export.json), else from the run's data."""
    sha = None
    for record_path in sorted((run.run_dir / "export").glob("*/export.json")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        sha = sha or run.student_sha256()
        names = record.get("class_names")
        if record.get("student_sha256") == sha and isinstance(names, list) and len(names) == run.num_classes:
            return [str(n) for n in names]
    from kdkit.export import held_out

    return held_out(run, 1).class_names
