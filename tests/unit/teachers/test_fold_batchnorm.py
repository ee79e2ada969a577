"""Folding BatchNorm into a teacher (distill.teacher_fuse_bn) is never silent and never changes the outputs: a fold
that cannot happen, finds nothing to fold, or gives other outputs says why and leaves the teacher unfolded."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdkit.teachers import Teacher
from kdkit.teachers import teacher as teacher_module


def _conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    net.train()
    net(torch.randn(16, 3, 6, 6))  # running statistics that are not the identity
    return net.eval()


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        out = self.bn(self.conv(x))
        return out.flatten(1) if out.sum() > 0 else -out.flatten(1)


class BnFirst(nn.Module):
    """A BatchNorm that no layer before it can absorb (it normalises the input)."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(x))


def test_a_fold_that_matches_is_used_and_logged():
    net, x = _conv_bn(), torch.randn(5, 3, 6, 6)
    lines = []
    t = Teacher(net, fuse_bn=True, example=x, log=lines.append)
    assert t.fused and not any(isinstance(m, nn.BatchNorm2d) for m in t.model.modules())
    assert lines == ["teacher: folded 1 BatchNorm layers into the layers before them (outputs checked)"]
    torch.testing.assert_close(t(x).logits, net(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the caller's model is not modified


def test_folded_outputs_that_differ_fall_back_to_the_unfolded_teacher(monkeypatch):
    real_fold = teacher_module._fold_pair

    def wrong_fold(layer, bn):  # a fold gone wrong: the folded weights are off by 1%
        folded = real_fold(layer, bn)
        with torch.no_grad():
            folded.weight.mul_(1.01)
        return folded

    monkeypatch.setattr(teacher_module, "_fold_pair", wrong_fold)
    net, x = _conv_bn(), torch.randn(5, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"teacher_fuse_bn: the folded teacher \(Sequential\) does not give the "):
        t = Teacher(net, fuse_bn=True, example=x)
    assert not t.fused and t.model is net
    torch.testing.assert_close(t(x).logits, net(x), atol=0, rtol=0)


def test_an_untraceable_teacher_says_why_and_stays_as_it_is():
    net = Branchy().eval()
    lines = []
    t = Teacher(net, fuse_bn=True, example=torch.randn(2, 3, 4, 4), log=lines.append)
    assert not t.fused and t.model is net
    assert len(lines) == 1 and lines[0].startswith(
        "distill.teacher_fuse_bn: torch.fx cannot trace the teacher (Branchy)"
    )
    assert lines[0].endswith("BatchNorm left unfolded")


def test_nothing_to_fold_is_said():
    with pytest.warns(UserWarning, match=r"no BatchNorm layer of the teacher \(BnFirst\) directly follows .*\(bn\)"):
        t = Teacher(BnFirst().eval(), fuse_bn=True, example=torch.randn(3, 4))
    assert not t.fused and isinstance(t.model, BnFirst)


def test_a_partial_fold_names_the_layers_left():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).eval()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"folded 1 of 2 BatchNorm layers .*; left as they are: 0 \("):
        t = Teacher(net, fuse_bn=True, example=x)
    assert t.fused
    torch.testing.assert_close(t(x).logits, net(x), atol=1e-5, rtol=1e-5)


def test_without_an_example_nothing_is_folded_and_it_is_said():
    with pytest.warns(UserWarning, match="no example inputs to check the folded teacher"):
        t = Teacher(_conv_bn(), fuse_bn=True)
    assert not t.fused


def test_no_message_when_folding_is_not_asked_for():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Teacher(BnFirst()).fused


def test_from_settings_builds_the_member_as_a_run_does():
    net, x = _conv_bn(), torch.randn(4, 3, 6, 6)
    t = Teacher.from_settings(net, precision="bf16", channels_last=True, fuse_bn=True, example=x, device="cpu")
    assert t.fused and t.precision == "bf16" and t.channels_last
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    torch.testing.assert_close(t(x).logits, net(x), atol=5e-2, rtol=5e-2)


def test_fold_tolerance_is_relative():
    assert teacher_module.FOLD_RTOL == 1e-4
    big = torch.full((2, 3), 1e4)
    assert teacher_module._outputs_differ(lambda x: big, lambda x: big + 0.5, None) == ""  # 5e-5 relative
    assert "max abs difference 2" in teacher_module._outputs_differ(lambda x: big, lambda x: big + 2, None)
    nan = torch.full((2, 3), float("nan"))
    assert teacher_module._outputs_differ(lambda x: big, lambda x: nan, None) != ""


class Blocks(nn.Module):
    """ResNet-like: conv-bn pairs inside containers, a shared stem read twice, a tap target that is a container."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.layer1(h) + h)  # a residual: the stem's output is read twice, after its BatchNorm
        return self.head(h.mean(dim=(2, 3)))


def test_the_folded_teacher_keeps_its_class_and_module_paths_so_container_taps_fire():
    torch.manual_seed(0)
    net = Blocks().train()
    net(torch.randn(16, 3, 5, 5))
    net.eval()
    x = torch.randn(4, 3, 5, 5)
    lines = []
    t = Teacher(net, fuse_bn=True, example=x, log=lines.append)
    assert t.fused and type(t.model) is Blocks
    assert lines == ["teacher: folded 2 BatchNorm layers into the layers before them (outputs checked)"]
    assert isinstance(t.model.stem[1], nn.Identity) and isinstance(t.model.layer1[1], nn.Identity)
    assert isinstance(net.stem[1], nn.BatchNorm2d)  # the caller's model is not modified
    # Folded weights are the closed form: w' = w · γ / sqrt(var + eps), b' = (b − mean) · γ / sqrt(var + eps) + β.
    bn, conv = net.layer1[1], net.layer1[0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(t.model.layer1[0].weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(t.model.layer1[0].bias, (conv.bias - bn.running_mean) * scale + bn.bias)
    t.tap(["layer1"], "teacher")
    out = t(x)
    seen = {}
    net.layer1.register_forward_hook(lambda m, i, o: seen.setdefault("layer1", o))
    with torch.no_grad():
        net(x)
    torch.testing.assert_close(out.features["layer1"], seen["layer1"], atol=1e-5, rtol=1e-5)
