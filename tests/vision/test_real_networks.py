"""Real torchvision and timm networks (random init) through a whole kdkit run each: built by name for the data's
channels and classes, trained as a teacher, BatchNorm folded where the network has it, tapped by its own module
paths for a feature loss, distilled into a student of the same family, exported to ONNX with the parity check, and
served a PNG of a test image. (The vision tier: see conftest.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.image_helpers import png, stored_pixels

from kdkit.config import load_config
from kdkit.data import build_data
from kdkit.data.preprocess import load_preprocess
from kdkit.export import export_run, open_run
from kdkit.models.build import build_model
from kdkit.pipeline import distill

# (source, name, kwargs, data set, tap, BatchNorm layers a fold must absorb (0: none to fold))
NETWORKS = [
    ("torchvision", "resnet18", {}, "mnist5k", "layer3", 20),
    ("torchvision", "resnet50", {}, "mnist5k", "layer3", 53),
    ("torchvision", "vgg11_bn", {}, "mnist5k_rgb32", "features.20", 8),
    ("torchvision", "mobilenet_v3_small", {}, "mnist5k", "features.6", 34),
    ("timm", "resnet18", {}, "mnist5k", "layer3", 20),
    ("timm", "efficientnet_b0", {}, "mnist5k", "blocks.4", 0),  # timm's BatchNormAct2d: not a plain BatchNorm
    ("timm", "vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}, "mnist5k", "blocks.1", 0),
]


def tiny_run(source, name, kwargs, data, tap) -> dict:
    model = {"source": source, "name": name, "kwargs": kwargs}
    return {
        "run": {"name": f"vision-{name}", "seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "builtin", "name": data, "limit": 100},
        "teacher": {"members": [{"model": model}], "train": {"epochs": 1, "batch_size": 16}},
        "student": {"model": model, "baseline": False},
        "distill": {
            "cache_teacher": False,
            "teacher_fuse_bn": True,
            "losses": [
                {"name": "ce", "weight": 0.5},
                {"name": "soft_kl", "weight": 0.5, "params": {"temperature": 4.0}},
                {"name": "hint", "weight": 1.0, "params": {"student_layer": tap, "teacher_layer": tap}},
            ],
        },
        "train": {"epochs": 1, "batch_size": 16},
        "eval": {"latency_repeats": 1, "latency_warmup": 0, "robustness": False},
    }


@pytest.mark.parametrize(("source", "name", "kwargs", "data", "tap", "folds"), NETWORKS, ids=lambda v: str(v))
def test_a_real_network_goes_through_a_whole_run(tmp_path, source, name, kwargs, data, tap, folds):
    out = tmp_path / name
    lines: list[str] = []
    distill(load_config(tiny_run(source, name, kwargs, data, tap)), out=out, log=lines.append)
    bundle = build_data(source="builtin", name=data, limit=100)
    channels = bundle.input_shape[0]

    # Built by name for the data: its channels (grey MNIST: 1; torchvision's RGB stem replaced) and 10 classes.
    net = build_model(source, name, kwargs, bundle.input_shape, 10)
    assert net(bundle.test.x[:2]).shape == (2, 10)
    first_conv = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d,)))
    assert first_conv.in_channels == channels

    # BatchNorm folded into the teacher where it has plain BatchNorm layers; said either way.
    text = "\n".join(lines)
    if folds:
        assert f"teacher: folded {folds} BatchNorm layers into the layers before them (outputs checked)" in text
    else:  # nothing a fold may absorb: said, and the teacher used as it is
        assert "distill.teacher_fuse_bn: " in text and "teacher: folded" not in text

    # The feature loss read the tapped module of both networks: its term is in the training history, non-zero.
    history = json.loads((out / "history.json").read_text())["student-s0"]
    hint = [row["train/hint"] for row in history if "train/hint" in row]
    assert hint and all(np.isfinite(hint)) and min(hint) > 0

    # Exported to ONNX with the parity check on held-out inputs.
    result = export_run(out, "onnx", tmp_path / "onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    assert result.label_agreement == 1.0

    # Served: a PNG of a test image is answered as the run's own student answers that image.
    from fastapi.testclient import TestClient

    from kdkit.serve import create_app

    description = load_preprocess(out / "student")
    x = bundle.test.x[:3]
    pixels = stored_pixels(x, description)
    blobs = [png(p[0] if channels == 1 else p.transpose(1, 2, 0)) for p in pixels]
    with torch.inference_mode():
        want = open_run(out).student(x).argmax(1).tolist()
    with TestClient(create_app(out, backend="onnx")) as client:
        files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
        answer = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    assert answer.json()["ids"] == want
