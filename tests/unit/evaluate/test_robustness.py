"""Input corruptions and the robustness evaluation, on tiny tensors and stub models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdkit.evaluate.robustness import CORRUPTIONS, corrupt, default_corruptions, robustness


def images(batch: int = 4, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --- gaussian_noise -------------------------------------------------------------------------------------------------


def test_gaussian_noise_is_deterministic_has_the_asked_std_and_is_identity_at_zero():
    x = torch.randn(64, 3, 32, 32)
    a, b = corrupt(x, "gaussian_noise", 0.5, seed=7), corrupt(x, "gaussian_noise", 0.5, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(x, "gaussian_noise", 0.5, seed=8))
    assert (a - x).std().item() == pytest.approx(0.5, rel=0.01)
    assert (a - x).mean().item() == pytest.approx(0.0, abs=0.01)
    assert torch.equal(corrupt(x, "gaussian_noise", 0.0, seed=7), x)
    tables = torch.randn(10, 5)  # any float input, not only images
    assert corrupt(tables, "gaussian_noise", 1.0, seed=0).shape == (10, 5)


# --- occlusion ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.1, 0.25, 0.5, 1.0])
def test_occlusion_zeroes_one_box_of_the_asked_area_per_example(strength):
    x = torch.rand(8, 3, 20, 20) + 1.0  # no zeros of its own
    out = corrupt(x, "occlusion", strength, seed=3)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same box in every channel
    side = round(20 * math.sqrt(strength))
    for mask in zero[:, 0]:
        fraction = mask.float().mean().item()
        assert fraction == pytest.approx(side * side / 400)
        assert abs(fraction - strength) <= (2 * 20 * math.sqrt(strength) + 1) / 400  # rounding of the side only
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        bounding_box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert bounding_box.item() == mask.sum().item()  # one solid box, not scattered pixels
    assert torch.equal(out[~zero], x[~zero])  # the rest is untouched
    assert torch.equal(corrupt(x, "occlusion", 0.0, seed=3), x)


def test_occlusion_positions_vary_between_examples_and_follow_the_seed():
    x = torch.ones(16, 1, 20, 20)
    out = corrupt(x, "occlusion", 0.1, seed=0)
    assert len({tuple(mask.nonzero()[0].tolist()) for mask in (out[:, 0] == 0)}) > 1
    assert torch.equal(out, corrupt(x, "occlusion", 0.1, seed=0))


# --- blur -----------------------------------------------------------------------------------------------------------


def test_blur_sigma_zero_is_identity_and_a_constant_image_stays_constant():
    x = images()
    assert torch.equal(corrupt(x, "blur", 0.0, seed=0), x)
    constant = torch.full((2, 3, 8, 8), 0.7)
    out = corrupt(constant, "blur", 2.0, seed=0)  # radius 6 on an 8 × 8 image: padding larger than the image
    assert out.shape == constant.shape
    torch.testing.assert_close(out, constant)


def test_blur_spreads_an_impulse_and_keeps_its_mass():
    x = torch.zeros(1, 2, 33, 33)
    x[:, :, 16, 16] = 1.0
    out = corrupt(x, "blur", 1.0, seed=0)
    assert out.shape == x.shape
    torch.testing.assert_close(out.sum(dim=(2, 3)), torch.ones(1, 2))  # kernel well inside the image: no border loss
    assert out[0, 0, 16, 16] < 1.0 and out[0, 0, 16, 17] > 0 and out[0, 0, 15, 16] > 0
    torch.testing.assert_close(out[0, 0], out[0, 0].T)  # isotropic
    assert out[0, 0, 16, 20] == 0  # radius ceil(3σ) = 3: nothing beyond it
    wider = corrupt(x, "blur", 2.0, seed=0)
    assert wider[0, 0, 16, 16] < out[0, 0, 16, 16]


# --- token_dropout --------------------------------------------------------------------------------------------------


def test_token_dropout_replaces_the_asked_fraction_of_real_tokens_and_leaves_pads():
    pad, mask = 0, 1
    tokens = torch.randint(2, 100, (6, 50), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([50, 40, 30, 20, 10, 45])
    tokens[torch.arange(50) >= lengths[:, None]] = pad
    out = corrupt(tokens, "token_dropout", 0.2, seed=1, mask_id=mask, pad_id=pad)
    assert out.dtype == tokens.dtype and out.shape == tokens.shape
    is_pad = tokens == pad
    assert torch.equal(out[is_pad], tokens[is_pad])  # pads untouched
    replaced = (out != tokens).sum(dim=1)
    assert torch.equal(replaced, torch.round(0.2 * lengths).long())  # exactly round(strength · n) per row
    assert ((out == mask) == (out != tokens)).all()  # every change is to the mask id
    assert torch.equal(out, corrupt(tokens, "token_dropout", 0.2, seed=1, mask_id=mask, pad_id=pad))
    assert not torch.equal(out, corrupt(tokens, "token_dropout", 0.2, seed=2, mask_id=mask, pad_id=pad))


def test_token_dropout_without_padding_and_on_the_wrong_input():
    tokens = torch.arange(2, 1002).view(10, 100)
    out = corrupt(tokens, "token_dropout", 0.4, seed=0)  # mask_id 0, no pad id
    assert (out == 0).float().mean().item() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="integer token ids"):
        corrupt(tokens.float(), "token_dropout", 0.1, seed=0)


# --- errors and defaults --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["occlusion", "blur"])
def test_image_corruptions_refuse_other_shapes(kind):
    with pytest.raises(ValueError, match=rf"{kind}.*\(8, 5\)"):
        corrupt(torch.randn(8, 5), kind, 0.5, seed=0)


def test_unknown_kind_and_bad_strength():
    with pytest.raises(ValueError, match="did you mean: blur"):
        corrupt(images(), "blurr", 1.0, seed=0)
    with pytest.raises(ValueError, match="≥ 0"):
        corrupt(images(), "gaussian_noise", -0.1, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(images(), "occlusion", 1.5, seed=0)
    with pytest.raises(ValueError, match="float inputs"):
        corrupt(torch.ones(2, 3, dtype=torch.long), "gaussian_noise", 0.5, seed=0)


def test_default_corruptions_per_modality():
    assert [kind for kind, _ in default_corruptions((3, 32, 32))] == ["gaussian_noise", "occlusion", "blur"]
    assert default_corruptions((20,)) == [("gaussian_noise", [0.25, 0.5, 1.0])]
    assert default_corruptions((128,), is_token_ids=True) == [("token_dropout", [0.1, 0.2, 0.4])]
    assert {kind for kind, _ in default_corruptions((3, 8, 8))} <= set(CORRUPTIONS)


# --- robustness() ---------------------------------------------------------------------------------------------------


class Recorder:
    """A stub model: returns fixed or identity logits and records every batch it saw."""

    def __init__(self, identity: bool):
        self.identity = identity
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        if self.identity:
            return x.flatten(1)
        logits = torch.zeros(x.shape[0], 4)
        logits[:, 0] = 1.0  # always class 0
        return logits


def one_hot_data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 4
    return torch.nn.functional.one_hot(labels, 4).float().view(n, 1, 2, 2), labels


def test_robustness_structure_constant_model_and_monotone_decay():
    inputs, labels = one_hot_data()
    constant, identities = Recorder(identity=False), [Recorder(identity=True), Recorder(identity=True)]
    corruptions = [("gaussian_noise", [0.0, 0.25, 1.0, 4.0]), ("occlusion", [0.25])]
    result = robustness(
        {"teacher": [constant], "baseline_student": [], "student": identities}, inputs, labels, corruptions
    )
    assert list(result) == ["clean", "gaussian_noise", "occlusion"]
    assert list(result["gaussian_noise"]) == ["0.25", "1.0", "4.0"]  # strength 0 only as "clean"
    assert set(result["clean"]) == {"teacher", "student"}  # a model with no forwards is left out
    json.loads(json.dumps(result))

    teacher = [result["clean"]["teacher"]] + [e["teacher"] for e in result["gaussian_noise"].values()]
    assert [entry["mean"] for entry in teacher] == [0.25] * 4  # it ignores its input
    student = [result["clean"]["student"]] + [e["student"] for e in result["gaussian_noise"].values()]
    assert student[0]["mean"] == 1.0 and student[0]["std"] == 0.0 and student[0]["per_seed"] == [1.0, 1.0]
    means = [entry["mean"] for entry in student]
    assert means == sorted(means, reverse=True) and means[-1] < 0.7
    assert student[-1]["drop"] == pytest.approx(1.0 - means[-1]) and student[-1]["drop_std"] == 0.0
    assert "drop" not in result["clean"]["student"]

    # Every model and seed saw the same batches: clean, then one corrupted copy per (kind, strength).
    for other in identities:
        assert len(other.seen) == len(constant.seen) == 1 + 3 + 1
        for a, b in zip(other.seen, constant.seen, strict=True):
            assert torch.equal(a, b)


def test_robustness_does_not_depend_on_batch_size_and_restores_training_mode():
    inputs, labels = one_hot_data(40)
    model = torch.nn.Flatten()
    model.train()
    corruptions = [("gaussian_noise", [0.5, 1.0]), ("blur", [1.0])]
    small = robustness({"student": [model]}, inputs, labels, corruptions, seed=3, batch_size=7)
    large = robustness({"student": [model]}, inputs, labels, corruptions, seed=3, batch_size=256)
    assert small == large
    assert model.training  # given back in the mode it came in


def test_robustness_fails_before_evaluating_on_a_bad_corruption():
    inputs, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    stub = Recorder(identity=True)
    with pytest.raises(ValueError, match="occlusion"):
        robustness({"student": [stub]}, inputs, labels, [("gaussian_noise", [0.5]), ("occlusion", [0.1])])
    assert stub.seen == []
