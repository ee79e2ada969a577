"""Export: the student of a finished run, alone, as safetensors, ONNX, TorchScript or a Hugging Face folder,
checked for parity against eager PyTorch on held-out inputs, with a model card.

    from kdkit.export import export_run
    result = export_run("runs/demo", "onnx")   # -> ExportResult(path, format, max_abs_diff, files, ...)

An export folder (default RUN_DIR/export/<format>/) holds the model files, README.md (the model card) and
export.json (how it was made and the parity figures). It is written into a temporary folder and moved into place
only after the parity check passed: a failed export leaves nothing behind and an old export untouched.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from kdkit.atomic import replace_dir, write_json, write_text
from kdkit.data.preprocess import copy_preprocess
from kdkit.errors import ConfigError
from kdkit.export.card import model_card
from kdkit.export.formats import FORMATS, ONNX_OPSET
from kdkit.export.parity import FP32_TOLERANCE, ParityError
from kdkit.export.run import Run, held_out, load_teacher, open_run
from kdkit.registry import suggest

__all__ = [
    "FORMATS",
    "ExportResult",
    "ParityError",
    "Run",
    "export_run",
    "held_out",
    "load_teacher",
    "open_run",
]

PARITY_INPUTS = 256


@dataclass
class ExportResult:
    """path: the export folder; max_abs_diff: parity against eager PyTorch on `parity_inputs` held-out inputs
    (None for none checked); files: what the folder holds, README.md and export.json included."""

    path: Path
    format: str
    max_abs_diff: float | None
    label_agreement: float | None = None
    parity_inputs: int = 0
    parity_source: str = ""
    files: list[str] = field(default_factory=list)


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    n_parity: int = PARITY_INPUTS,
    log: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export the student of `run_dir` as `fmt` into `out` (default RUN_DIR/export/<fmt>/), parity-checked."""
    if fmt not in FORMATS:
        raise ConfigError(
            f"--format: unknown format {fmt!r}{suggest(fmt, FORMATS)}; expected one of: {', '.join(FORMATS)}"
        )
    run = open_run(run_dir)
    final = Path(out) if out is not None else run.run_dir / "export" / fmt
    check_out(final, run)
    held = held_out(run, n_parity)
    if held.note:
        log(f"export: parity on random inputs, {held.note}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        files, parity = FORMATS[fmt](run.student, dict(run.spec), held.inputs, tmp)
        files += copy_preprocess(run.run_dir / "student", tmp)  # how raw inputs become model inputs, if recorded
        provenance = {
            "kdkit": _kdkit_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "exported": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "student weights sha256": run.student_sha256(),
        }
        if fmt == "onnx":
            provenance["onnx opset"] = ONNX_OPSET
        write_text(
            tmp / "README.md",
            model_card(
                fmt=fmt,
                path=final,
                run_dir=run.run_dir,
                run_name=run.cfg.run.name,
                spec=run.spec,
                metrics=run.metrics(),
                class_names=held.class_names,
                parity=parity,
                parity_source=held.source,
                files=files,
                provenance=provenance,
            ),
        )
        record = {
            "format": fmt,
            "run_dir": str(run.run_dir),
            "student_sha256": provenance["student weights sha256"],
            "in_shape": list(run.in_shape),
            "num_classes": run.num_classes,
            "class_names": held.class_names,
            "parity": {
                "max_abs_diff": parity.max_abs_diff,
                "label_agreement": parity.label_agreement,
                "inputs": parity.n,
                "source": held.source,
                "tolerance": FP32_TOLERANCE,
            },
            "provenance": provenance,
        }
        write_json(tmp / "export.json", record)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    listed = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    return ExportResult(final, fmt, parity.max_abs_diff, parity.label_agreement, parity.n, held.source, listed)


def check_out(final: Path, run: Run) -> None:
    """Refuse to replace a folder that is not an earlier export (the run directory, a student folder, $HOME...)."""
    if final.exists() and not final.is_dir():
        raise ConfigError(f"--out: {str(final)!r} is a file; expected a folder for the export")
    if final.is_dir() and any(final.iterdir()) and not (final / "export.json").is_file():
        raise ConfigError(
            f"--out: {str(final)!r} is a folder that is not a kdkit export (no export.json); choose a new or empty "
            "folder, it is replaced as a whole"
        )
    resolved = final.resolve()
    for kept in (run.run_dir, run.run_dir / "student", run.run_dir / "teachers", run.run_dir / "checkpoints"):
        if resolved == kept.resolve():
            raise ConfigError(f"--out: {str(final)!r} is part of the run itself; choose another folder")


def _kdkit_version() -> str:
    from kdkit import __version__

    return __version__
