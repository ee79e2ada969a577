"""A finished run directory, opened for shipping: its config, its student, its teacher and held-out inputs.

Export and serve read a run through these functions only. They read the run directory and write nothing.
What they need from it (see kdkit.tasks.classification): config.yaml, student/ (model.safetensors + model.json),
teachers/member_<i>/ for members trained by the run, and metrics.json / report.md for the model card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdkit.config import KDConfig
from kdkit.errors import ConfigError, KdkitError
from kdkit.models import load_model_folder
from kdkit.models.build import read_model_json
from kdkit.tasks import load_task
from kdkit.teachers import TeacherEnsemble

if TYPE_CHECKING:
    from kdkit.data import DataBundle


@dataclass
class Run:
    """An opened run directory. `spec` is the student's model.json; `student` is on CPU in eval mode."""

    run_dir: Path
    cfg: KDConfig
    spec: dict
    student: nn.Module

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.spec["in_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    def metrics(self) -> dict:
        """metrics.json, or {} when the run has none (a student folder copied by hand)."""
        path = self.run_dir / "metrics.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}

    def student_sha256(self) -> str:
        """Hash of the student's weights file: an export records it, so a stale export can be told apart."""
        h = hashlib.sha256()
        with open(self.run_dir / "student" / "model.safetensors", "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def open_run(run_dir: str | Path) -> Run:
    """Check that `run_dir` is a finished kdkit run and load its student (eval mode, CPU)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a folder; expected a run directory written by kdkit")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a kdkit run directory (no config.yaml)")
    task, cfg = load_task(run_dir / "config.yaml")
    if task.shipping:
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is a {task.name} run, and kdkit export and serve take "
                          f"classifiers: {task.shipping}")
    if not (run_dir / "student" / "model.json").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} has no trained student (student/model.json); did the run finish?")
    spec = read_model_json(run_dir / "student", "RUN_DIR/student")
    missing = [k for k in ("source", "in_shape", "num_classes") if k not in spec]
    if missing:
        raise ConfigError(f"RUN_DIR/student/model.json: missing {', '.join(missing)}; expected a kdkit model folder")
    student = load_model_folder(run_dir / "student", where="RUN_DIR/student").eval()
    return Run(run_dir, cfg, spec, student)


def load_teacher(run: Run) -> TeacherEnsemble:
    """The run's teacher exactly as the run built it (kdkit.tasks.classification.build_teacher on the finished
    run: members trained by the run from teachers/member_<i>/, the others from the config; the run's precision,
    memory format and BN folding), frozen, on CPU. Needs the run's data (tokenizers, shapes)."""
    from kdkit.data import build_data
    from kdkit.run import RunDir
    from kdkit.tasks.classification import build_teacher

    data = build_data(**run.cfg.data.model_dump())
    return build_teacher(run.cfg, data, RunDir.finished(run.run_dir, "cpu", lambda message: None))


@dataclass
class HeldOut:
    """Test-split inputs (B, *in_shape) for parity checks and benchmarks, and the class names.

    `source` says where the inputs came from: "test split", or "random normal" when the run's data cannot be
    rebuilt here (then `class_names` are the class ids as strings, and `note` says why)."""

    inputs: torch.Tensor
    class_names: list[str]
    source: str
    note: str = ""


def held_out(run: Run, n: int = 256, seed: int = 0) -> HeldOut:
    """Up to n inputs of the run's test split (the split the report was measured on; never trained on)."""
    from kdkit.data import build_data

    try:
        data = build_data(**run.cfg.data.model_dump())
    except (KdkitError, ImportError, OSError) as exc:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((n, *run.in_shape), generator=gen)
        names = [str(i) for i in range(run.num_classes)]
        return HeldOut(x, names, "random normal", f"the run's data could not be rebuilt: {exc}".splitlines()[0])
    _check_input_shape(data, run)
    test = data.test
    # Tensors as stored, or (texts of different lengths) padded per batch as training pads them.
    x = test.x[:n] if hasattr(test, "x") else data.collate([test[i] for i in range(min(n, len(test)))]).inputs
    names = list(data.class_names)
    if len(names) != run.num_classes:
        names = [str(i) for i in range(run.num_classes)]
    return HeldOut(x.float().contiguous(), names, "test split")


def run_data(run: Run) -> DataBundle:
    """The run's data rebuilt from its config (the same splits and the normalisation fitted on its training split),
    checked against the student's input shape. Unlike held_out there is no random stand-in: what needs it
    (calibration, accuracy) means nothing on random inputs, so a run whose data is gone is refused in one line."""
    from kdkit.data import build_data

    try:
        data = build_data(**run.cfg.data.model_dump())
    except (KdkitError, ImportError, OSError) as exc:
        message = f"RUN_DIR: the run's data (data.source {run.cfg.data.source!r}) could not be rebuilt here: {exc}"
        raise ConfigError(message.splitlines()[0]) from None
    _check_input_shape(data, run)
    return data


def _check_input_shape(data: DataBundle, run: Run) -> None:
    if tuple(data.input_shape) != run.in_shape:
        raise ConfigError(
            f"RUN_DIR: the data now gives inputs of shape {tuple(data.input_shape)}, the student expects "
            f"{run.in_shape}; was config.yaml edited after the run?"
        )
