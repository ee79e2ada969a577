"""The loss modules, the LOSSES registry, build_loss and WeightedLoss."""

from __future__ import annotations

import pytest
import torch

from kdkit.errors import ConfigError
from kdkit.losses import LOSSES, CrossEntropy, DecoupledKD, HardTeacher, Loss, SoftKL, WeightedLoss, build_loss
from kdkit.losses import functional as Fk
from kdkit.types import Batch, ModelOutputs, StepOutput

B, C = 6, 5


def _inputs(seed: int = 0, teacher_requires_grad: bool = True) -> tuple[ModelOutputs, ModelOutputs, Batch]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, C, generator=g).requires_grad_()
    teacher = torch.randn(B, C, generator=g).requires_grad_(teacher_requires_grad)
    labels = torch.randint(0, C, (B,), generator=g)
    batch = Batch(inputs=torch.randn(B, 3, generator=g), labels=labels, index=torch.arange(B))
    return ModelOutputs(student), ModelOutputs(teacher), batch


def test_registry_names_match_the_loss_names():
    # The name in LOSSES is the name a part is logged under; they must not drift apart.
    for key, cls in LOSSES.items():
        assert cls.name == key


# Losses over logits; the feature losses (hint, attention_transfer, hidden_state, attention_map) need tapped
# activations and are tested in test_feature_losses.py.
# mutual reads every peer's logits from the features (tests/unit/engine/test_mutual.py); token_kl and token_ce take
# (B, T, V) language-model logits (tests/unit/losses/test_token_losses.py, test_token_ce.py); the cross-tokenizer
# losses (uld, hybrid_kl, span_likelihood) need an alignment (their own test files, test_cross_tokenizer.py).
LOGIT_LOSSES = sorted(
    n
    for n, cls in LOSSES.items()
    if cls.feature_paths is Loss.feature_paths and n not in ("mutual", "token_kl", "token_ce")
    and not getattr(cls, "cross_tokenizer", False)
)


def test_logit_losses_are_the_four_expected():
    assert LOGIT_LOSSES == ["ce", "dkd", "hard_teacher", "soft_kl"]


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_gradient_goes_only_into_the_student(name):
    student, teacher, batch = _inputs()
    out = build_loss([(name, 1.0, {})])(student, teacher, batch)
    out.loss.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None or not teacher.logits.grad.any()


@pytest.mark.parametrize("name", LOGIT_LOSSES)
def test_losses_accept_teacher_outputs_made_under_inference_mode(name):
    # The real Teacher runs under torch.inference_mode(); its tensors must be usable as targets in a graph.
    student, _, batch = _inputs()
    with torch.inference_mode():
        teacher = ModelOutputs(torch.randn(B, C))
    out = build_loss([(name, 1.0, {})])(student, teacher, batch)
    out.loss.backward()
    assert torch.isfinite(student.logits.grad).all()


@pytest.mark.parametrize(
    ("module", "reference"),
    [
        (CrossEntropy(label_smoothing=0.2), lambda s, t, y: Fk.cross_entropy(s, y, 0.2)),
        (SoftKL(temperature=2.0), lambda s, t, y: Fk.soft_kl(s, t, 2.0)),
        (HardTeacher(), lambda s, t, y: Fk.hard_teacher(s, t)),
        (DecoupledKD(alpha=0.5, beta=3.0, temperature=2.0), lambda s, t, y: Fk.dkd(s, t, y, 0.5, 3.0, 2.0)),
    ],
    ids=["ce", "soft_kl", "hard_teacher", "dkd"],
)
def test_module_passes_its_parameters_to_the_function(module, reference):
    student, teacher, batch = _inputs(1)
    expected = reference(student.logits, teacher.logits, batch.labels)
    torch.testing.assert_close(module(student, teacher, batch), expected)


@pytest.mark.parametrize("name", ["soft_kl", "dkd"])
def test_distillation_loss_is_zero_when_student_equals_teacher(name):
    student, _, batch = _inputs(2)
    teacher = ModelOutputs(student.logits.detach().clone())
    assert build_loss([(name, 1.0, {})])(student, teacher, batch).loss.item() == pytest.approx(0.0, abs=1e-5)


# --- WeightedLoss -------------------------------------------------------------------------------------------------


def test_total_is_the_weighted_sum_of_the_parts():
    student, teacher, batch = _inputs(3)
    loss = build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {"temperature": 4})])
    out = loss(student, teacher, batch)
    ce = Fk.cross_entropy(student.logits, batch.labels)
    kl = Fk.soft_kl(student.logits, teacher.logits, 4.0)
    assert isinstance(out, StepOutput)
    torch.testing.assert_close(out.loss, 0.1 * ce + 0.9 * kl)
    assert set(out.parts) == {"ce", "soft_kl"}
    torch.testing.assert_close(out.parts["ce"], ce.detach())
    torch.testing.assert_close(out.parts["soft_kl"], kl.detach())
    assert out.loss.requires_grad
    assert not any(v.requires_grad for v in out.parts.values())


def test_formula_names_every_part_and_weight():
    loss = build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {"temperature": 4})])
    assert loss.formula() == "total = 0.1*ce + 0.9*soft_kl(T=4)"
    loss = build_loss([("ce", 1.0, {"label_smoothing": 0.1}), ("dkd", 1.0, {"beta": 2})])
    assert loss.formula() == "total = 1*ce(smoothing=0.1) + 1*dkd(α=1, β=2, T=4)"


def test_needs_teacher():
    assert build_loss([("ce", 1.0, {})]).needs_teacher is False
    assert build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {})]).needs_teacher is True
    assert build_loss([("hard_teacher", 1.0, {})]).needs_teacher is True
    assert build_loss([("ce", 1.0, {}), ("soft_kl", 0.0, {})]).needs_teacher is False


def test_zero_weight_teacher_part_runs_without_a_teacher():
    # needs_teacher is False here, so the engine passes no teacher; the zero-weight part must not ask for one.
    student, teacher, batch = _inputs(4)
    loss = build_loss([("ce", 1.0, {}), ("soft_kl", 0.0, {})])
    out = loss(student, None, batch)
    torch.testing.assert_close(out.loss, Fk.cross_entropy(student.logits, batch.labels))


def test_weighted_loss_needs_a_term():
    with pytest.raises(ValueError):
        WeightedLoss([])


# --- build_loss errors --------------------------------------------------------------------------------------------


def test_unknown_loss_name_names_the_field_the_value_and_a_suggestion():
    with pytest.raises(ConfigError) as info:
        build_loss([("ce", 0.1, {}), ("soft_k1", 0.9, {})])
    message = str(info.value)
    assert message.startswith("distill.losses.1.name")
    assert "'soft_k1'" in message
    assert "did you mean: soft_kl" in message


def test_unknown_parameter_names_the_field_and_suggests_the_right_one():
    with pytest.raises(ConfigError) as info:
        build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {"temprature": 4})])
    message = str(info.value)
    assert "distill.losses.1.params.temprature" in message
    assert "did you mean: temperature" in message


REQUIRED = {"hint": {"student_layer": "a", "teacher_layer": "b"}, "attention_transfer": {"pairs": [["a", "b"]]}}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_rejects_an_unknown_parameter_with_a_config_error(name):
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.params\.bogus"):
        build_loss([(name, 1.0, {**REQUIRED.get(name, {}), "bogus": 1})])


def test_several_unknown_parameters_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        build_loss([("dkd", 1.0, {"alhpa": 1, "temprature": 4})])
    assert len(info.value.details) == 2
    assert any("distill.losses.0.params.alhpa" in d and "alpha" in d for d in info.value.details)
    assert any("distill.losses.0.params.temprature" in d and "temperature" in d for d in info.value.details)


@pytest.mark.parametrize(
    ("name", "params", "bad"),
    [
        ("soft_kl", {"temperature": 0}, "temperature=0"),
        ("dkd", {"temperature": -1}, "temperature=-1"),
        ("dkd", {"alpha": -0.5}, "alpha=-0.5"),
        ("ce", {"label_smoothing": 1.0}, "label_smoothing=1"),
    ],
)
def test_invalid_value_raises_a_config_error_naming_the_field(name, params, bad):
    with pytest.raises(ConfigError) as info:
        build_loss([("ce", 1.0, {}), (name, 1.0, params)])
    message = str(info.value)
    assert message.startswith("distill.losses.1.params")
    assert bad in message


def test_build_loss_uses_the_given_field_prefix():
    with pytest.raises(ConfigError, match=r"^stage2\.losses\.0\.name"):
        build_loss([("kl", 1.0, {})], where="stage2.losses")


# --- repeated loss names, needs_labels ----------------------------------------------------------------------------


def test_two_terms_with_one_name_are_both_logged_under_their_position():
    student, teacher, batch = _inputs(3)
    loss = WeightedLoss([(1.0, CrossEntropy()), (0.5, SoftKL(2.0)), (0.25, SoftKL(8.0))])
    out = loss(student, teacher, batch)
    assert list(out.parts) == ["ce", "soft_kl.1", "soft_kl.2"]
    torch.testing.assert_close(out.parts["soft_kl.1"], Fk.soft_kl(student.logits, teacher.logits, 2.0).detach())
    torch.testing.assert_close(out.parts["soft_kl.2"], Fk.soft_kl(student.logits, teacher.logits, 8.0).detach())
    assert loss.formula() == "total = 1*ce + 0.5*soft_kl(T=2) [soft_kl.1] + 0.25*soft_kl(T=8) [soft_kl.2]"
    # A name used once keeps its plain label, in the logs and in the formula.
    assert build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {})]).formula() == "total = 0.1*ce + 0.9*soft_kl(T=4)"


def test_needs_labels_is_declared_by_each_loss():
    # Losses that read batch.labels as the true class of every example; ce skips unlabelled ones (-100), token
    # losses read token ids with their own -100 mask.
    assert sorted(n for n, cls in LOSSES.items() if cls.needs_labels) == ["dkd", "mutual"]


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("soft_kl", {"temperature": float("nan")}, "temperature=nan"),
        ("soft_kl", {"temperature": "4"}, "temperature='4'"),
        ("token_kl", {"beta": 1.5}, "beta=1.5"),
        ("token_kl", {"chunk_size": 0}, "chunk_size=0"),
        ("attention_transfer", {"pairs": [], "p": 2}, "pairs=[]"),
        ("mutual", {"kd_weight": -1}, "kd_weight=-1"),
    ],
)
def test_a_bad_value_is_named_with_its_full_field_path(name, params, field):
    with pytest.raises(ConfigError) as info:
        build_loss([("ce", 1.0, {}), (name, 1.0, params)])
    param = field.split("=")[0]
    assert str(info.value).startswith(f"distill.losses.1.params.{param}: {field}; expected ")
