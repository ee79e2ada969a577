import math

import pytest

from kdkit.engine.optim import lr_factor


def test_warmup_then_cosine():
    f = [lr_factor(s, 100, "cosine", 10, 10, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[99] < 0.01


def test_step_schedule_decays_every_n_epochs():
    # 5 steps per epoch, decay ×0.1 every 2 epochs
    assert lr_factor(9, 100, "step", 0, 5, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, "step", 0, 5, 2, 0.1) == pytest.approx(0.1)
    assert lr_factor(25, 100, "step", 0, 5, 2, 0.1) == pytest.approx(0.01)


def test_constant():
    assert lr_factor(50, 100, "constant", 0, 5, 2, 0.1) == 1.0
