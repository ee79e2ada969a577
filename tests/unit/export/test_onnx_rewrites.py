"""Exact rewrites before ONNX export: an up-sampling AdaptiveAvgPool2d (VGG's head on small images) becomes nearest
up-sampling, which gives the same numbers and which the exporter takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.export.formats import export_onnx
from kdkit.export.onnx_rewrites import onnx_exportable


class TinyVGG(nn.Module):
    """VGG's shape in miniature: features down to 1×1, AdaptiveAvgPool2d((3, 3)), a classifier on 3·3·C features."""

    def __init__(self, pool=(3, 3)):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        out = pool if isinstance(pool, tuple) else (pool, pool)
        self.classifier = nn.Linear(4 * out[0] * out[1], 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_an_upsampling_adaptive_pool_becomes_nearest_upsampling_with_the_same_outputs():
    torch.manual_seed(0)
    net, x = TinyVGG().eval(), torch.randn(5, 1, 4, 4)  # features are 1×1 → pooled to 3×3
    out = onnx_exportable(net, x)
    assert out is not net and isinstance(out.avgpool, nn.Upsample) and isinstance(net.avgpool, nn.AdaptiveAvgPool2d)
    torch.testing.assert_close(out(x), net(x), atol=0, rtol=0)


@pytest.mark.parametrize("pool", [(1, 1), 2])
def test_pools_the_exporter_takes_are_left_alone(pool):
    net = TinyVGG(pool).eval()
    x = torch.randn(2, 1, 8, 8)  # features 2×2: pooled to 1×1 (a reduction) or 2×2 (the identity)
    assert onnx_exportable(net, x) is net


def test_the_onnx_export_of_such_a_student_matches_it(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net, x = TinyVGG().eval(), torch.randn(6, 1, 4, 4)
    files, parity = export_onnx(net, {"source": "test"}, x, tmp_path)
    assert "model.onnx" in files and parity.max_abs_diff < 1e-5
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-5)
