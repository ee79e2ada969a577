"""One function per export format. Each writes the student alone into an empty folder and checks parity.

The student is the run's student/ folder rebuilt from its model.json: distillation-only modules (adapters,
projectors, the loss's own parameters) live in checkpoints/ and never enter an export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.atomic import write_json, write_with
from kdkit.errors import ConfigError
from kdkit.export.parity import Parity, check_parity

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"

Exporter = Callable[[nn.Module, dict, torch.Tensor, Path], tuple[list[str], Parity]]


def export_safetensors(student: nn.Module, spec: dict, x: torch.Tensor, folder: Path) -> tuple[list[str], Parity]:
    """model.safetensors (the student's state dict, nothing else) + model.json; reloaded with load_model_folder."""
    from kdkit.models import load_model_folder, save_model_folder

    save_model_folder(student, folder, spec)
    reloaded = load_model_folder(folder, where="export").eval()
    parity = check_parity(student, lambda t: _torch_logits(reloaded, t), x, "safetensors")
    return ["model.safetensors", "model.json"], parity


def export_torchscript(student: nn.Module, spec: dict, x: torch.Tensor, folder: Path) -> tuple[list[str], Parity]:
    """model.pt, traced with a batch of 2 (the batch size stays free); reloaded with torch.jit.load."""
    student.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # TorchScript is deprecated in favour of torch.export, but it is still what C++/LibTorch deployments load.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(student, x[:2].clone())
        write_with(folder / "model.pt", lambda p: torch.jit.save(traced, str(p)))
        loaded = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    loaded.eval()
    write_json(folder / "model.json", spec)
    parity = check_parity(student, lambda t: _torch_logits(loaded, t), x, "torchscript")
    return ["model.pt", "model.json"], parity


def export_onnx(student: nn.Module, spec: dict, x: torch.Tensor, folder: Path) -> tuple[list[str], Parity]:
    """model.onnx with a dynamic batch axis (input "input" (batch, *in_shape) float32 → "logits" (batch, C)),
    written by torch's TorchScript-based exporter (dynamo=False: no onnxscript needed), checked with onnx's
    checker and run with ONNX Runtime for parity."""
    from kdkit.export.onnx_rewrites import onnx_exportable
    from kdkit.export.onnx_runtime import onnx_session, run_session

    student.eval()
    path = folder / "model.onnx"

    exportable = onnx_exportable(student, x)  # exact rewrites of layers the exporter refuses (VGG's pooling)

    def write(p: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation on every call
            torch.onnx.export(
                exportable,
                (x[:2].clone(),),
                str(p),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )

    write_with(path, write)
    try:
        import onnx

        onnx.checker.check_model(str(path))
    except ImportError:  # the checker is a bonus; ONNX Runtime below is the real test
        pass
    write_json(
        folder / "model.json", {**spec, "onnx": {"input": INPUT_NAME, "output": OUTPUT_NAME, "opset": ONNX_OPSET}}
    )
    session = onnx_session(path)
    parity = check_parity(student, lambda t: run_session(session, t.numpy()), x, "onnx")
    return ["model.onnx", "model.json"], parity


def export_hf(student: nn.Module, spec: dict, x: torch.Tensor, folder: Path) -> tuple[list[str], Parity]:
    """A transformers student: save_pretrained (config.json + model.safetensors), its tokenizer when it carries
    one (`student.tokenizer`), reloaded with from_pretrained for parity."""
    if not callable(getattr(student, "save_pretrained", None)) or not hasattr(type(student), "from_pretrained"):
        raise ConfigError(
            f"export --format hf: the student is kdkit's {spec.get('source')}/{spec.get('name')} network, not a "
            "Hugging Face transformers model; hf export needs a transformers student (text and LLM students). "
            "Use --format safetensors, onnx or torchscript for this student"
        )
    student.save_pretrained(str(folder), safe_serialization=True)
    tokenizer = getattr(student, "tokenizer", None)
    if tokenizer is not None and callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(str(folder))
    reloaded = type(student).from_pretrained(str(folder)).eval()
    parity = check_parity(student, lambda t: _torch_logits(reloaded, t), x, "hf")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return files, parity


@torch.inference_mode()
def _torch_logits(model, x: torch.Tensor) -> np.ndarray:
    out = model(x)
    return getattr(out, "logits", out).float().cpu().numpy()


FORMATS: dict[str, Exporter] = {
    "safetensors": export_safetensors,
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "hf": export_hf,
}
