"""Quantization-aware training (kdkit.models.qat, student.qat): the fake int8 rounds exactly as ONNX Runtime's
static int8 export of the same network does; the rounding starts, observes and freezes when told; gradients pass it
straight through; stripping gives back the original module; a tiny QAT run trains its student and baseline with the
quantizers on, saves plain students, and its int8 export runs in ONNX Runtime; bad values and students that cannot
be handled are refused in one line."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kdkit.config import load_config
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.models import load_model_folder
from kdkit.models.qat import (
    ATTRIBUTE,
    ActivationFakeQuant,
    activation_qparams,
    fake_quant_weight,
    prepare_qat,
    strip_qat,
)
from kdkit.models.small import MLP, SmallCNN


def _tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((1, 6, 6), 5, hidden=[12])


def _calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Ranges from one fp32 training forward over x (start_batch=1, momentum 1: exactly x's min/max, as ONNX
    Runtime's MinMax calibration takes them), BatchNorm on its running statistics as in the exported graph."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        model(x)
    model.eval()


# --- the rounding itself --------------------------------------------------------------------------------------


def test_weight_rounding_is_int8_per_output_channel_symmetric_7_bits_by_hand():
    """The export's weights: int8 in [-64, 64] (reduce_range), one symmetric scale per output channel."""
    w = torch.tensor([[0.5, -1.28, 0.004], [0.11, 0.2, -0.05]])
    # Row 0: scale 1.28 / 64 = 0.02 → 25, -64, 0 (0.2 rounds to 0). Row 1: scale 0.2 / 64 = 0.003125.
    s1 = 0.2 / 64
    expected = torch.tensor([[0.5, -1.28, 0.0], [35 * s1, 0.2, -16 * s1]])  # 35.2 → 35, -16 exactly
    torch.testing.assert_close(fake_quant_weight(w), expected, rtol=0, atol=1e-7)
    # A convolution's weight (out, in, k, k): one scale per output channel, over the rest.
    conv = torch.randn(3, 2, 3, 3)
    got = fake_quant_weight(conv)
    scale = conv.abs().amax(dim=(1, 2, 3), keepdim=True) / 64
    torch.testing.assert_close(got, torch.round(conv / scale) * scale, rtol=0, atol=1e-6)
    assert torch.equal(fake_quant_weight(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_activation_range_scale_and_zero_point_by_hand():
    # [-0.51, 2.04] → scale 2.55 / 255 = 0.01, zero point round(0.51 / 0.01) = 51; a range without 0 is widened.
    scale, zero = activation_qparams(torch.tensor(-0.51), torch.tensor(2.04))
    assert scale.item() == pytest.approx(0.01) and zero.item() == 51
    scale, zero = activation_qparams(torch.tensor(0.5), torch.tensor(2.55))
    assert scale.item() == pytest.approx(0.01) and zero.item() == 0
    assert [t.item() for t in activation_qparams(torch.tensor(0.0), torch.tensor(0.0))] == [1.0, 0]
    quant = ActivationFakeQuant(momentum=0.25)
    quant.observe = quant.quantize = True
    quant(torch.tensor([-1.0, 3.0]))  # the first batch's range exactly ...
    quant(torch.tensor([-5.0, 7.0]))  # ... then lo += 0.25 (−5 − (−1)) = −2, hi += 0.25 (7 − 3) = 4
    assert (quant.lo.item(), quant.hi.item()) == (-2.0, 4.0)
    quant.observe = False
    x = torch.tensor([-3.0, -0.011, 0.0, 1.1, 9.0])
    step = 6 / 255  # zero point round(2 / step) = 85; -0.011 / step = -0.47 → 0; 1.1 / step = 46.75 → 47
    expected = torch.tensor([-85 * step, 0.0, 0.0, 47 * step, (255 - 85) * step])
    torch.testing.assert_close(quant(x), expected, rtol=0, atol=1e-6)  # clipped to the range at both ends


@pytest.mark.parametrize("student", ["mlp", "small_cnn"])
def test_fake_int8_gives_the_logits_of_onnxruntime_static_int8(student, tmp_path):
    """The reference implementation: kdkit's own int8 export path (fp32 ONNX → quant_pre_process →
    quantize_static QDQ) calibrated on the same inputs, run by ONNX Runtime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from kdkit.export.formats import export_onnx
    from kdkit.export.quantize import _preprocess, quantize_static_qdq

    torch.manual_seed(0)
    shape = (1, 10, 10)
    model = MLP(shape, 5, hidden=[16]) if student == "mlp" else SmallCNN(shape, 5, width=4, dropout=0.0)
    with torch.no_grad():  # logits spread over a wide range, so that rounding errors are well above float noise
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(20)
    x = torch.randn(64, *shape)
    prepare_qat(model, start_batch=1, momentum=1.0)
    _calibrate(model, x)
    with torch.no_grad():
        fake = model(x).numpy()
    strip_qat(model)
    with torch.no_grad():
        fp32 = model(x).numpy()

    export_onnx(model, {}, x, tmp_path)
    prepared = _preprocess(tmp_path / "model.onnx", tmp_path / "prep.onnx")
    quantize_static_qdq(prepared, tmp_path / "int8.onnx", x.numpy())
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    int8 = session.run(None, {"input": x.numpy()})[0]

    assert np.abs(fp32 - int8).mean() > 1e-3  # int8 really differs from fp32 here ...
    # ... and the fake int8 is that difference: equal to 1e-4, but for a rare logit one output step apart (a value
    # within float noise of a rounding tie at the uint8 output, which the unsimulated int32 bias can tip).
    step = np.diff(np.unique(int8)).min()  # the output's quantization step
    apart = np.abs(fake - int8) > 1e-4
    assert apart.mean() <= 0.01, f"{apart.sum()} of {apart.size} logits differ"
    np.testing.assert_allclose(fake[apart], int8[apart], rtol=0, atol=step * 1.001)


# --- when it rounds, observes, freezes ------------------------------------------------------------------------


def _fq(model) -> list[ActivationFakeQuant]:
    return [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]


def test_rounding_starts_at_start_batch_ranges_move_until_freeze_batch():
    model, plain = _tiny_mlp(), _tiny_mlp()
    qat = prepare_qat(model, start_batch=2, freeze_batch=3, momentum=0.5)
    x = [torch.randn(8, 1, 6, 6) * (i + 1) for i in range(5)]
    model.eval()
    with torch.no_grad():  # no training batch yet: no ranges, no rounding, nothing observed
        torch.testing.assert_close(model(x[0]), plain(x[0]), rtol=0, atol=0)
    assert int(qat.batches) == 0 and not qat.quantizing
    model.train()
    first_input = qat.inputs[0]
    for i in range(2):  # the fp32 warm-up: exact float outputs, ranges observed
        torch.testing.assert_close(model(x[i]), plain(x[i]), rtol=0, atol=0)
    assert first_input.hi.item() > 0 and not qat.quantizing
    assert not torch.allclose(model(x[2]), plain(x[2]))  # batch 2 rounds
    assert qat.quantizing and int(qat.batches) == 3
    frozen = (first_input.lo.clone(), first_input.hi.clone())
    model(x[3] * 10)  # from batch 3 on the ranges stay where they are
    assert torch.equal(first_input.lo, frozen[0]) and torch.equal(first_input.hi, frozen[1])
    model.eval()
    with torch.no_grad():  # evaluation rounds and does not move a range (nor count)
        out = model(x[4] * 100)
    assert not torch.allclose(out, plain(x[4] * 100)) and int(qat.batches) == 4
    assert torch.equal(first_input.hi, frozen[1])


def test_evaluation_after_a_warm_up_batch_measures_the_int8_student():
    """Validation during an fp32 warm-up already rounds (keep_best must compare int8 states), without observing."""
    model = _tiny_mlp()
    qat = prepare_qat(model, start_batch=10)
    model.train()
    model(torch.randn(8, 1, 6, 6))
    model.eval()
    before = [q.hi.clone() for q in _fq(model)]
    with torch.no_grad():
        model(torch.randn(8, 1, 6, 6) * 50)
    assert qat.quantizing
    assert all(torch.equal(b, q.hi) for b, q in zip(before, _fq(model)))


def test_gradients_pass_the_rounding_straight_through():
    """∂L/∂W of a quantized Linear is the float gradient at the rounded point: for L = Σ y, the column sums of the
    rounded inputs (Σ_b x̂_b), and ∂L/∂x̂ passes to x unchanged inside the range."""

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    model = OneLayer()
    qat = prepare_qat(model, momentum=1.0)
    x = torch.randn(6, 4, requires_grad=True)
    model.train()
    model(x).sum().backward()
    weight = model.layer.parametrizations.weight.original
    x_hat = qat.inputs[0](x.detach())  # the range is already x's: the same rounding
    torch.testing.assert_close(weight.grad, x_hat.sum(0).expand(3, 4), rtol=0, atol=1e-6)
    w_hat = fake_quant_weight(weight.detach())
    torch.testing.assert_close(x.grad, w_hat.sum(0).expand(6, 4), rtol=0, atol=1e-6)


# --- in and out of a model ------------------------------------------------------------------------------------


def test_strip_gives_back_the_original_module_with_its_trained_float_weights():
    model, fresh = _tiny_mlp(), _tiny_mlp()
    params = {n: p for n, p in model.named_parameters()}
    prepare_qat(model)
    assert type(model.net[1]).__name__ == "ParametrizedLinear" and _fq(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 6, 6)).square().mean().backward()
        optimizer.step()
    strip_qat(model)
    assert type(model.net[1]) is nn.Linear and not hasattr(model, ATTRIBUTE) and not _fq(model)
    assert sorted(model.state_dict()) == sorted(fresh.state_dict())  # (weight now registered after bias)
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer's parameters, trained
    assert not torch.equal(model.net[1].weight, fresh.net[1].weight)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(model(x), nn.functional.linear(
        torch.relu(nn.functional.linear(x.flatten(1), model.net[1].weight, model.net[1].bias)),
        model.net[3].weight, model.net[3].bias))  # fmt: skip
    assert strip_qat(fresh) is fresh  # never prepared: unchanged


def test_state_dict_carries_ranges_and_batch_count_into_a_resumed_copy():
    model = _tiny_mlp()
    prepare_qat(model, start_batch=1)
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 6, 6))
    state = copy.deepcopy(model.state_dict())
    resumed = _tiny_mlp(seed=1)
    prepare_qat(resumed, start_batch=1)
    resumed.load_state_dict(state)
    assert int(resumed.kdkit_qat.batches) == 3
    x = torch.randn(5, 1, 6, 6)
    model.eval(), resumed.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed(x), model(x), rtol=0, atol=0)
    twin = copy.deepcopy(model)  # hooks follow a deep copy (a sharded run trains one)
    twin.train()
    twin(torch.randn(8, 1, 6, 6))
    assert int(twin.kdkit_qat.batches) == 4 and int(model.kdkit_qat.batches) == 3


def test_students_it_cannot_handle_are_refused_in_one_line():
    class TextModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)

        def save_pretrained(self, path):  # what makes a transformers model (kdkit's HF students, causal LMs)
            pass

    class NoLayers(nn.Module):
        def forward(self, x):
            return x

    for model, fragment in [
        (TextModel(), "transformers model"),
        (nn.Sequential(nn.Linear(3, 2)), "bare Sequential"),
        (NoLayers(), "no Linear or Conv layer"),
    ]:
        with pytest.raises(CompatibilityError) as err:
            prepare_qat(model)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    model = _tiny_mlp()
    prepare_qat(model)
    with pytest.raises(CompatibilityError, match="already prepared"):
        prepare_qat(model)


def test_text_data_is_refused_before_training():
    from kdkit.tasks.classification import prepare_student_qat

    cfg = load_config({**TINY, "student": {**TINY["student"], "qat": {"enabled": True}}})
    data = SimpleNamespace(modality="text")
    with pytest.raises(ConfigError, match=r"^student\.qat\.enabled: the student reads text \(token ids\)"):
        prepare_student_qat(_tiny_mlp(), cfg.student.qat, cfg.train, cfg.train.epochs, data, None, None)


# --- config ---------------------------------------------------------------------------------------------------

TINY = {
    "run": {"name": "tiny-qat", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 300},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}], "train": {"epochs": 2}},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "baseline": True},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 3, "batch_size": 32},
    "eval": {"latency_repeats": 2, "latency_warmup": 0, "robustness": False},
}


def _with(qat: dict, **sections) -> dict:
    raw = copy.deepcopy(TINY)
    raw["student"]["qat"] = qat
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with({"enabled": True, "start_epoch": 3}), "student.qat.start_epoch: 3; expected below train.epochs (3)"),
        (_with({"enabled": True, "start_epoch": 1, "freeze_epoch": 1}), "student.qat.freeze_epoch: 1; expected above "
         "start_epoch (1) and at most train.epochs (3)"),
        (_with({"enabled": True, "freeze_epoch": 4}), "student.qat.freeze_epoch: 4; expected above"),
        (_with({"enabled": True}, train={"precision": "bf16"}), "student.qat.enabled: train.precision 'bf16'"),
        (_with({"enabled": True, "range_momentum": 0}), "student.qat.range_momentum: got 0; input should be greater"),
        (_with({"enabled": True, "start_epoch": -1}), "student.qat.start_epoch: got -1"),
        (_with({"enabled": True, "bits": 4}), "student.qat.bits: unknown key"),
        (_with({"enabled": True}, distill={"cache_teacher": False, "mutual": {"enabled": True}}),
         "student.qat.enabled: deep mutual learning"),
    ],
)
def test_bad_values_are_refused_in_one_line(raw, message):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_text_and_language_model_students_are_refused_at_load():
    hf = _with({"enabled": True})
    hf["student"]["model"] = {"source": "hf", "path": "builtin:all-minilm-l6-v2"}
    with pytest.raises(ConfigError, match=r"student\.qat\.enabled: student\.model\.source: hf \(text models\)"):
        load_config(hf)
    lm = _with({"enabled": True}, data={"task": "causal_lm", "source": "text_folder", "path": "corpus", "name": None})
    lm["teacher"] = {"members": [{"model": {"source": "hf", "path": "teacher"}}]}
    lm["student"]["model"] = {"source": "kdkit", "path": "student"}
    lm["train"]["keep_best"] = "loss"
    with pytest.raises(ConfigError, match=r"student\.qat\.enabled: causal_lm students are not covered"):
        load_config(lm)
    assert not load_config(TINY).student.qat.enabled  # off by default


# --- a tiny run, and the int8 export of its student -----------------------------------------------------------


def test_a_qat_run_trains_student_and_baseline_quantized_and_saves_plain_students(tmp_path, monkeypatch):
    from kdkit.pipeline import distill
    from kdkit.tasks import classification

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    seen = {}
    real_train = classification.train

    def spy(model, *args, desc="train", **kwargs):  # what the engine is handed, per phase
        seen[desc] = sum(isinstance(m, ActivationFakeQuant) for m in model.modules())
        return real_train(model, *args, desc=desc, **kwargs)

    monkeypatch.setattr(classification, "train", spy)
    logs: list[str] = []
    out = tmp_path / "run"
    distill(load_config(_with({"enabled": True, "start_epoch": 1})), out=out, log=logs.append)

    # Student and baseline trained with the quantizers (2 layer inputs + the logits); the teacher without.
    assert seen == {"teacher-0": 0, "baseline-s0": 3, "student-s0": 3}
    started = [m for m in logs if "quantization-aware" in m]
    # 210 training examples in batches of 32: 7 per epoch; start_epoch 1 of 3 → rounding from batch 7 of 21.
    assert len(started) == 2 and all("from training batch 7" in m and "(of 21)" in m for m in started)
    # The saved students are plain MLPs: the same keys as a fresh one, loadable as any student folder.
    for folder in (out / "student", out / "phases" / "baseline-s0", out / "phases" / "student-s0"):
        loaded = load_model_folder(folder)
        assert type(loaded) is MLP and not _fq(loaded)
        assert sorted(loaded.state_dict()) == sorted(MLP((1, 8, 8), 10, hidden=[16]).state_dict())

    # The int8 export quantizes it as any student and runs in ONNX Runtime.
    ort = pytest.importorskip("onnxruntime")
    from kdkit.export.quantize import export_quantized

    result = export_quantized(out, "int8", rounds=1, max_accuracy_drop=100, min_agreement=0)
    session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    assert session.run(["logits"], {"input": x})[0].shape == (3, 10)
    assert 0 <= result.figures.accuracy_int8 <= 100
