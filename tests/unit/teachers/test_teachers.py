"""Teacher: frozen, eval, inference mode, fp32 outputs. Ensemble: weighted mean of probabilities or logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.teachers import Teacher, TeacherEnsemble


def _net(seed, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, classes))


def test_teacher_is_frozen_and_stays_in_eval_mode():
    t = Teacher(_net(0))
    assert not t.model.training
    t.train()
    assert not t.model.training and not t.training
    assert all(not p.requires_grad for p in t.parameters())
    x = torch.randn(6, 4)
    out = t(x)
    assert out.logits.dtype == torch.float32
    assert not out.logits.requires_grad
    torch.testing.assert_close(t(x).logits, out.logits)  # dropout off, BN statistics frozen


def test_bf16_teacher_returns_fp32_close_to_fp32_teacher():
    net = _net(0)
    x = torch.randn(16, 4)
    fp32, bf16 = Teacher(net)(x).logits, Teacher(net, precision="bf16")(x).logits
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=5e-2, rtol=5e-2)


def test_ensemble_of_probabilities_is_the_weighted_mean():
    a, b = Teacher(_net(0)), Teacher(_net(1))
    x = torch.randn(5, 4)
    ens = TeacherEnsemble([a, b], weights=[3, 1], combine="probs")
    expected = 0.75 * a(x).logits.softmax(-1) + 0.25 * b(x).logits.softmax(-1)
    torch.testing.assert_close(ens(x).logits.softmax(-1), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ens(x).logits.exp().sum(-1), torch.ones(5), atol=1e-6, rtol=0)


def test_ensemble_of_logits_is_the_weighted_mean():
    a, b = Teacher(_net(0)), Teacher(_net(1))
    x = torch.randn(5, 4)
    ens = TeacherEnsemble([a, b], weights=[1, 1], combine="logits")
    torch.testing.assert_close(ens(x).logits, 0.5 * (a(x).logits + b(x).logits))


def test_one_member_ensemble_equals_the_member_in_probability():
    a = Teacher(_net(0))
    x = torch.randn(5, 4)
    torch.testing.assert_close(TeacherEnsemble([a])(x).logits.softmax(-1), a(x).logits.softmax(-1))


def test_class_count_mismatch_names_the_member():
    ens = TeacherEnsemble([Teacher(_net(0, 3)), Teacher(_net(1, 4))])
    with pytest.raises(CompatibilityError, match=r"teacher\.members\.0: outputs 3 classes; the data has 4"):
        ens.check(torch.randn(2, 4), 4)


def test_input_shape_mismatch_is_a_clear_error():
    with pytest.raises(CompatibilityError, match=r"cannot take inputs of shape \(7,\)"):
        Teacher(_net(0)).check(torch.randn(2, 7), 3)


def test_invalid_ensemble_arguments():
    with pytest.raises(ValueError):
        TeacherEnsemble([Teacher(_net(0))], weights=[0.0])
    with pytest.raises(ValueError):
        TeacherEnsemble([Teacher(_net(0))], combine="median")


def test_fused_batchnorm_teacher_gives_the_same_outputs():
    from kdkit.models import build_model

    torch.manual_seed(0)
    net = build_model("builtin", "resnet", {"depth": 8, "width": 8}, (3, 16, 16), 5)
    net.train()
    net(torch.randn(16, 3, 16, 16))  # give BatchNorm non-trivial running statistics
    x = torch.randn(4, 3, 16, 16)
    plain = Teacher(net.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full fold is not a problem to warn about
        fused = Teacher(net, fuse_bn=True, channels_last=True, example=x)
    assert fused.fused and not any(isinstance(m, nn.BatchNorm2d) for m in fused.model.modules())
    torch.testing.assert_close(fused(x).logits, plain(x).logits, atol=1e-5, rtol=1e-5)
    assert fused.fingerprint() != plain.fingerprint()
    with pytest.warns(UserWarning, match="no BatchNorm layer; nothing to fold"):
        mlp = Teacher(nn.Sequential(nn.Linear(4, 3)), fuse_bn=True, example=torch.randn(2, 4))  # left as is
    assert not mlp.fused
