"""distill.teacher_compile: the frozen teacher's forward through torch.compile gives the uncompiled outputs and
features, keeps one copy of the weights in its state dict and the same fingerprint (caches stay valid), and the
setting reaches the teacher from the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdkit.teachers import Teacher


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    ).eval()


def test_compiled_teacher_gives_the_same_outputs_features_weights_and_fingerprint():
    pytest.importorskip("torch._inductor")
    x = torch.randn(6, 1, 8, 8)
    plain = Teacher(small_cnn())
    try:
        compiled = Teacher(small_cnn(), compile="default")
        plain.tap(["2"])
        compiled.tap(["2"])
        a, b = plain(x), compiled(x)
    except Exception as exc:  # pragma: no cover - a machine without a working C++ toolchain for inductor
        pytest.skip(f"torch.compile does not run here: {type(exc).__name__}")
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.features["2"], a.features["2"], rtol=1e-5, atol=1e-6)
    assert compiled._run is not compiled.model  # the forward runs the compiled module
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no second copy of the weights
    assert compiled.fingerprint() == plain.fingerprint()


def test_the_setting_reaches_the_teacher_and_a_bad_value_is_named():
    from kdkit.config import load_config
    from kdkit.errors import ConfigError
    from kdkit.run.teacher import frozen

    raw = {
        "data": {"source": "builtin", "name": "digits"},
        "teacher": {"members": [{"model": {"name": "mlp"}}]},
        "student": {"model": {"name": "mlp"}},
        "distill": {"teacher_compile": "max-autotune"},
    }
    cfg = load_config(raw)
    teacher = frozen(small_cnn(), cfg.distill, None, "cpu")
    assert teacher.compiled == "max-autotune" and teacher._run is not teacher.model
    with pytest.raises(ConfigError) as bad:
        load_config({**raw, "distill": {"teacher_compile": "fast"}})
    assert any("distill.teacher_compile: got 'fast'" in line for line in bad.value.lines())
