"""What scores a request: the eager PyTorch student, its fp32 ONNX export, or its int8 ONNX export (static or
dynamic, kdkit.export.quantize), each run by ONNX Runtime; and the teacher for shadow monitoring. Each backend
gives a function from inputs (B, *in_shape) float32 to logits (B, C), safe to call from several threads at once,
and what /health says of it (backend, precision, and for int8 how it was quantized and what it lost)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.errors import ConfigError
from kdkit.export import ParityError, Run, export_run, load_teacher
from kdkit.registry import suggest

Logits = Callable[[np.ndarray], np.ndarray]
Log = Callable[[str], None]


@dataclass(frozen=True)
class Served:
    """The scoring function of a backend and what /health reports of it."""

    logits: Logits
    info: dict = field(default_factory=dict)


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


def serve_torch(run: Run, threads: int | None, log: Log) -> Served:
    """The eager student (float32 unless its weights say otherwise)."""
    dtype = next((p.dtype for p in run.student.parameters()), torch.float32)
    return Served(torch_logits(run.student), {"precision": str(dtype).removeprefix("torch.")})


def serve_onnx(run: Run, threads: int | None, log: Log) -> Served:
    """RUN_DIR/export/onnx/model.onnx when it was exported from the current student weights; otherwise it is
    exported first (with the parity check against eager PyTorch)."""
    folder = run.run_dir / "export" / "onnx"
    if not _fresh(folder, run):
        log(f"serve: exporting the student to {folder} (ONNX, parity-checked)")
        export_run(run.run_dir, "onnx", folder)
    return Served(
        onnx_logits(folder / "model.onnx", threads), {"precision": "float32", "file": "export/onnx/model.onnx"}
    )


def quantized(mode: str) -> Callable[[Run, int | None, Log], Served]:
    """The backend of an int8 student (`mode`: a key of kdkit.export.quantize.QUANTIZERS): RUN_DIR/export/onnx-<mode>
    when it was quantized from the current student weights; otherwise it is made first by the same call as
    `kdkit export RUN_DIR --quantize <mode>`, default settings and bounds. A missed bound refuses to serve (exit 2,
    one line naming the figure). To serve an int8 model under other bounds, export it with them first: a fresh
    export is served as it is."""

    def serve_quantized(run: Run, threads: int | None, log: Log) -> Served:
        folder = run.run_dir / "export" / f"onnx-{mode}"
        if not _fresh(folder, run, mode):
            from kdkit.export.quantize import export_quantized

            log(f"serve: quantizing the student to {folder} (kdkit export --quantize {mode}, default bounds)")
            try:
                export_quantized(run.run_dir, mode, log=log)
            except ParityError as exc:
                raise ParityError(
                    f"serve --backend onnx-{mode}: {exc}; to serve it anyway, export it with looser bounds first "
                    f"(kdkit export {run.run_dir} --quantize {mode} --max-accuracy-drop ... --min-agreement ...)"
                ) from None
        record = json.loads((folder / "export.json").read_text())
        q = record.get("quantization", {})
        info = {
            "precision": "int8",
            "file": f"export/onnx-{mode}/model.onnx",
            "quantization": {
                "method": q.get("method"),
                "weights": q.get("weights"),
                "activations": q.get("activations"),
                "test_examples": q.get("test_examples"),
                "accuracy_fp32": q.get("accuracy_fp32"),
                "accuracy_int8": q.get("accuracy_int8"),
                "agreement": q.get("agreement"),
            },
        }
        return Served(onnx_logits(folder / "model.onnx", threads), info)

    return serve_quantized


BACKENDS: dict[str, Callable[[Run, int | None, Log], Served]] = {
    "torch": serve_torch,
    "onnx": serve_onnx,
    "onnx-int8": quantized("int8"),
    "onnx-dynamic": quantized("dynamic"),
}


def check_backend(backend: str) -> None:
    """A ConfigError in one line naming the backend and the choices, before anything is loaded."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"--backend: unknown backend {backend!r}{suggest(backend, BACKENDS)}; expected one of: "
            f"{', '.join(BACKENDS)}"
        )


def student_backend(run: Run, backend: str, threads: int | None = None, log: Log = print) -> Served:
    """The student as `backend` (a key of BACKENDS), and what /health says of it."""
    check_backend(backend)
    served = BACKENDS[backend](run, threads, log)
    return Served(served.logits, {"backend": backend, **served.info})


def teacher_backend(run: Run) -> Logits:
    return torch_logits(load_teacher(run))


def _fresh(folder: Path, run: Run, quantize: str | None = None) -> bool:
    """Whether folder holds a model exported from the current student weights (and quantized as `quantize`)."""
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        (folder / "model.onnx").is_file()
        and record.get("student_sha256") == run.student_sha256()
        and record.get("quantize") == quantize
    )


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
