"""The model card (README.md) of an export: what the student is, how good it is against its teacher and a
labels-only baseline (the report's own figures), how it was trained, what it takes and returns, how to load it,
the parity check, and the resolved config."""

from __future__ import annotations

import re
from pathlib import Path

from kdkit.evaluate.schema import n_seeds
from kdkit.export.parity import Parity
from kdkit.report.markdown import speedup_note
from kdkit.report.table import Column, gain_line, summary_headers, summary_rows

LOADERS = {
    "safetensors": """```python
from kdkit.models import load_model_folder

model = load_model_folder("{path}").eval()      # rebuilds {arch} from model.json, loads model.safetensors
logits = model(x)                               # x: float32 tensor {shape}
```
Without kdkit: `safetensors.torch.load_file("{path}/model.safetensors")` gives the state dict of the network
that model.json describes (kdkit's `{arch}` with these kwargs).""",
    "torchscript": """```python
import torch

model = torch.jit.load("{path}/model.pt").eval()   # no kdkit needed; also loads in C++ with LibTorch
logits = model(x)                                  # x: float32 tensor {shape}
```""",
    "onnx": """```python
import numpy as np
import onnxruntime as ort

session = ort.InferenceSession("{path}/model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(["logits"], {{"input": x.astype(np.float32)}})[0]   # x: {shape}, any batch size
```""",
    "hf": """```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{path}")   # or the task class the student was built with
```""",
}


def model_card(
    *,
    fmt: str,
    path: Path,
    run_dir: Path,
    run_name: str,
    spec: dict,
    metrics: dict,
    class_names: list[str],
    parity: Parity,
    parity_source: str,
    files: list[str],
    provenance: dict,
    columns: list[Column] | None = None,
    quantization: dict | None = None,
) -> str:
    """README.md of an export. metrics: the run's metrics.json (docs/metrics.md), or {}; columns: the summary's
    columns (None: the classification columns); quantization: export.json's "quantization" part of an int8 export
    (kdkit.export.quantize), which adds its section and makes `parity` the check of the fp32 model it came from."""
    arch = spec.get("name") or spec.get("source")
    shape = "(batch, " + ", ".join(str(d) for d in spec.get("in_shape", [])) + ")"
    kwargs = ", ".join(f"{k}={v}" for k, v in (spec.get("kwargs") or {}).items())
    config_text = _read(run_dir / "config.yaml")
    variant = f", int8 {quantization['method']}" if quantization else ""
    lines = []
    if fmt == "hf":
        lines += ["---", "library_name: transformers", "tags:", "- kdkit", "- knowledge-distillation", "---", ""]
    lines += [
        f"# {run_name}: distilled student ({fmt}{variant})",
        "",
        f"A `{spec.get('source')}/{arch}` classifier{f' ({kwargs})' if kwargs else ''} with "
        f"{spec.get('num_classes')} classes, distilled by kdkit from the run in `{run_dir}`. This folder holds the "
        "student alone: no teacher, adapters or projectors.",
        "",
        "## Metrics (test split)",
        "",
    ]
    if metrics:
        lines += [_table(summary_headers(columns), summary_rows(metrics, columns)), ""]
        gain = gain_line(metrics, columns)
        if gain:
            lines += [gain[0].upper() + gain[1:] + ".", ""]
        lines += [
            "Accuracy, macro F1 and agreement (top-1 agreement with the teacher) in %; ECE: expected calibration "
            f"error; {speedup_note(metrics)} Figures from the run's metrics.json.",
            "",
        ]
        seeds = n_seeds(metrics)
        if seeds > 1:
            best = metrics.get("best_seed") or {}
            chosen = "the best validation score"
            if best:
                value = best.get("value")
                chosen = f"seed {best['seed']}" + (f", {best['by']} {value:.4g}" if value is not None else "")
            lines += [
                f"Student rows are mean ± std over {seeds} seeds; this export is the run's chosen seed ({chosen}), "
                "the one in RUN_DIR/student.",
                "",
            ]
    else:
        lines += ["The run directory holds no metrics.json.", ""]
    formula = _loss_formula(run_dir / "report.md")
    if formula:
        lines += ["## Training loss", "", f"`{formula}`", ""]
    lines += [
        "## Inputs and outputs",
        "",
        f"- Input: float32 tensor {shape}, preprocessed as in training (kdkit standardises each feature or "
        "channel with the mean and std of the training split).",
        f"- Output: logits (batch, {spec.get('num_classes')}); softmax gives class probabilities.",
        "- Classes (id: name): " + ", ".join(f"{i}: {name}" for i, name in enumerate(class_names)),
        "",
        *(_quantization_section(quantization) if quantization else []),
        "## Export check",
        "",
        ("The fp32 ONNX model that was quantized: max abs" if quantization else "Max abs")
        + f" difference of the logits against eager PyTorch on {parity.n} held-out inputs ({parity_source}): "
        f"**{parity.max_abs_diff:.3g}** (tolerance {parity.tolerance:g}); same top-1 class on "
        f"{100 * parity.label_agreement:.2f}% of them.",
        "",
        "## How to load",
        "",
        LOADERS[fmt].format(path=path, arch=arch, shape=shape),
        "",
        "## Files",
        "",
        *[f"- `{f}`" for f in [*files, "README.md", "export.json"]],
        "",
        "## How it was made",
        "",
        *[f"- {k}: `{v}`" for k, v in provenance.items()],
        "",
        "## Config (resolved)",
        "",
        "```yaml",
        config_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _quantization_section(q: dict) -> list[str]:
    """fp32 ONNX vs int8 ONNX on the test split (export.json's "quantization": kdkit.export.quantize)."""
    speed, size = q["throughput"], q["size_bytes"]
    rows = [
        ["accuracy (%)", f"{q['accuracy_fp32']:.2f}", f"{q['accuracy_int8']:.2f}"],
        ["agreement with fp32 (%)", "100.00", f"{q['agreement']:.2f}"],
        ["size (MB)", f"{size['fp32'] / 1e6:.3g}", f"{size['int8'] / 1e6:.3g} ({size['ratio']:.2f}×)"],
        [
            f"CPU throughput (examples/s, batch {speed['batch_size']})",
            f"{speed['fp32']:,.0f}",
            f"{speed['int8']:,.0f} ({speed['speedup']:.2f}×)",
        ],
    ]
    bounds = q["bounds"]
    return [
        "## Int8 quantization",
        "",
        f"{q['method'].capitalize()} quantization with `{q['tool']}` ({q['format']}): weights {q['weights']}; "
        f"activations {q['activations']}; calibration: {q['calibration']}. Measured on the {q['test_examples']} "
        f"examples of the test split against the fp32 ONNX student, throughput with ONNX Runtime on "
        f"{q.get('machine', 'this CPU')}, the two models timed in turn over {speed['rounds']} rounds (median).",
        "",
        _table(["", "fp32 ONNX", "int8 ONNX"], rows),
        "",
        f"Bounds: accuracy drop ≤ {bounds['max_accuracy_drop']:g} pt (here {q['accuracy_drop_points']:.2f} pt), "
        f"agreement ≥ {bounds['min_agreement']:g}% (here {q['agreement']:.2f}%): passed.",
        "",
    ]


def _loss_formula(report: Path) -> str:
    """The formula from report.md's '**Loss:** `...`' line, or '' when the report has none."""
    match = re.search(r"^\*\*Loss:\*\*\s*`([^`]+)`", _read(report), flags=re.MULTILINE)
    return match.group(1) if match else ""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "| :-- | " + " | ".join("--:" for _ in headers[1:]) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)
