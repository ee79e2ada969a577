"""Feature losses: hint (FitNets), attention transfer, hidden states, attention maps; their math and their modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.errors import CompatibilityError
from kdkit.losses import functional as Fk
from kdkit.losses.attention_map import AttentionMap
from kdkit.losses.attention_transfer import AttentionTransfer
from kdkit.losses.hidden_state import HiddenState
from kdkit.losses.hint import Hint
from kdkit.models.taps import FeatureTaps
from kdkit.types import Batch, ModelOutputs


def _batch(b: int, mask: torch.Tensor | None = None) -> Batch:
    return Batch(
        inputs=torch.zeros(b, 1), labels=torch.zeros(b, dtype=torch.long), index=torch.arange(b), attention_mask=mask
    )


def _outs(features: dict[str, torch.Tensor]) -> ModelOutputs:
    return ModelOutputs(logits=torch.zeros(1, 2), features=features)


def _setup(loss, student: dict, teacher: dict):
    loss.setup({k: v.shape[1:] for k, v in student.items()}, {k: v.shape[1:] for k, v in teacher.items()})
    return loss


# --- feature_mse / hint -------------------------------------------------------------------------------------------


def test_feature_mse_hand_computed():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert Fk.feature_mse(s, torch.zeros(2, 2)).item() == pytest.approx((1 + 4 + 9 + 16) / 4)


def test_feature_mse_divides_by_the_global_count_of_real_tokens():
    s = torch.tensor([[[2.0, 0.0], [7.0, 7.0]], [[1.0, 1.0], [1.0, 1.0]]])  # (B=2, T=2, D=2)
    mask = torch.tensor([[1, 0], [1, 1]])
    # real tokens: (2,0), (1,1), (1,1): squares sum to 4 + 2 + 2 = 8 over 3 tokens × 2 dims (not a mean of means).
    assert Fk.feature_mse(s, torch.zeros_like(s), mask).item() == pytest.approx(8 / 6)


def test_hint_zero_when_equal_and_hand_computed_with_padding():
    feats = torch.randn(2, 3, 4)
    loss = _setup(Hint("s", "t"), {"s": feats}, {"t": feats})
    assert isinstance(loss.adapter, nn.Identity)
    assert loss(_outs({"s": feats}), _outs({"t": feats.clone()}), _batch(2)).item() == 0.0

    s = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])  # (1, 3, 2); the last token is padding
    t = torch.zeros(1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    got = loss(_outs({"s": s}), _outs({"t": t}), _batch(1, mask))
    assert got.item() == pytest.approx((1 + 1 + 4 + 0) / (2 * 2))
    alone = loss(_outs({"s": s[:, :2]}), _outs({"t": t[:, :2]}), _batch(1, torch.ones(1, 2)))
    s2 = s.clone()
    s2[0, 2] = -100.0
    again = loss(_outs({"s": s2}), _outs({"t": t}), _batch(1, mask))
    assert got.item() == pytest.approx(alone.item()) == pytest.approx(again.item())


def test_hint_gradient_reaches_student_and_adapter_not_teacher():
    s = torch.randn(2, 8, 4, 4, requires_grad=True)
    t = torch.randn(2, 16, 2, 2, requires_grad=True)
    loss = _setup(Hint("layer1", "layer2"), {"layer1": s}, {"layer2": t})
    assert sum(p.numel() for p in loss.parameters()) > 0  # the regressor is the loss module's, not the student's
    loss(_outs({"layer1": s}), _outs({"layer2": t}), _batch(2)).backward()
    assert s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.adapter.parameters())
    assert t.grad is None


def test_hint_validates_parameters_and_shapes():
    with pytest.raises(ValueError):
        Hint("", "t")
    with pytest.raises(CompatibilityError, match=r"hint s→t: .*\(8, 4, 4\).*\(16,\)"):
        Hint("s", "t").setup({"s": torch.Size([8, 4, 4])}, {"t": torch.Size([16])})


def test_teacher_features_made_under_inference_mode_are_usable_targets():
    s = torch.randn(2, 3, 4, requires_grad=True)
    with torch.inference_mode():
        t = torch.randn(2, 3, 4)
        attn = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    parts = [
        Fk.feature_mse(s, t, mask),
        Fk.hidden_state_loss(s, t, mask, "cosine"),
        Fk.attention_map_kl(torch.softmax(s[:, :, :3].unsqueeze(1).expand(2, 2, 3, 3), -1), attn, mask),
    ]
    sum(parts).backward()
    assert torch.isfinite(s.grad).all()


# --- attention transfer -------------------------------------------------------------------------------------------


def test_attention_map_hand_computed():
    x = torch.tensor([[[[-2.0, 0.0]], [[0.0, 0.0]]]])  # (B=1, C=2, H=1, W=2)
    # mean_c |x|² = [(4 + 0)/2, 0] = [2, 0] → L2-normalised [1, 0]
    torch.testing.assert_close(Fk.attention_map(x), torch.tensor([[1.0, 0.0]]))


def test_attention_transfer_hand_computed_and_beta_convention():
    s = torch.tensor([[[[1.0, 0.0]]]])  # a_s = [1, 0]
    t = torch.tensor([[[[1.0, 1.0]]]])  # a_t = [1, 1]/√2
    r = 1 / math.sqrt(2)
    mean_sq = ((1 - r) ** 2 + r**2) / 2  # mean over the H·W = 2 positions (and the batch of 1)
    assert Fk.attention_transfer([s], [t], beta=2.0).item() == pytest.approx(mean_sq)
    loss = AttentionTransfer([["a", "b"], ["a", "b"]])  # β = 1000 → 500 × the sum over pairs
    assert loss(_outs({"a": s}), _outs({"b": t}), _batch(1)).item() == pytest.approx(500 * 2 * mean_sq, rel=1e-5)


def test_attention_transfer_zero_when_equal_and_channels_may_differ():
    f = torch.randn(2, 3, 4, 4)
    loss = AttentionTransfer([["s", "t"]])
    assert loss(_outs({"s": f}), _outs({"t": f.clone()}), _batch(2)).item() == 0.0
    # Same spatial energy, more channels: mean_c |x|² is unchanged by duplicating channels.
    assert loss(_outs({"s": f}), _outs({"t": torch.cat([f, f], 1)}), _batch(2)).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_transfer_resizes_the_student_map_to_the_teacher():
    s = torch.randn(2, 4, 2, 2, requires_grad=True)
    t = torch.randn(2, 8, 4, 4, requires_grad=True)
    a_s = F.interpolate(s.detach().pow(2).mean(1, keepdim=True), size=(4, 4), mode="bilinear").flatten(1)
    a_t = t.detach().pow(2).mean(1).flatten(1)
    expected = (F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)).pow(2).mean() * 500
    loss = AttentionTransfer([["s", "t"]])
    got = loss(_outs({"s": s}), _outs({"t": t}), _batch(2))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    # a constant map stays constant whatever its size
    assert loss(_outs({"s": torch.ones(1, 2, 2, 2)}), _outs({"t": torch.ones(1, 5, 4, 4)}), _batch(1)).item() < 1e-10


def test_attention_transfer_validates():
    for bad in ([], [["a"]], [["a", ""]], "a"):
        with pytest.raises(ValueError):
            AttentionTransfer(bad)
    with pytest.raises(ValueError):
        AttentionTransfer([["a", "b"]], p=0)
    with pytest.raises(CompatibilityError, match=r"'b' has shape \(5, 8\)"):
        AttentionTransfer([["a", "b"]]).setup({"a": torch.Size([3, 4, 4])}, {"b": torch.Size([5, 8])})


# --- hidden states ------------------------------------------------------------------------------------------------


def test_hidden_state_cosine_hand_computed_with_padding():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, -3.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: cos = 0 → 1; token 1: cos = 1 → 0; token 2 is padding.
    assert Fk.hidden_state_loss(s, t, mask, "cosine").item() == pytest.approx(0.5)
    assert Fk.hidden_state_loss(s[:, :2], t[:, :2], None, "cosine").item() == pytest.approx(0.5)


def test_hidden_state_module_masking_zero_and_gradients():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    t = torch.randn(2, 4, 8, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = _setup(HiddenState({"s.1": "t.3"}), {"s.1": s}, {"t.3": t})
    assert isinstance(loss.adapters[0], nn.Linear)
    value = loss(_outs({"s.1": s}), _outs({"t.3": t}), _batch(2, mask))
    s2, t2 = s.detach().clone(), t.detach().clone()
    s2[0, 3], t2[1, 2:] = 50.0, -50.0
    assert loss(_outs({"s.1": s2}), _outs({"t.3": t2}), _batch(2, mask)).item() == pytest.approx(value.item())
    value.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert loss.adapters[0].weight.grad.abs().sum() > 0
    assert (s.grad[0, 3] == 0).all() and (s.grad[1, 2:] == 0).all()  # padding gets no gradient

    same = _setup(HiddenState({"s": "t"}, kind="cosine"), {"s": t}, {"t": t})
    assert same(_outs({"s": t}), _outs({"t": t}), _batch(2, mask)).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_state_validates():
    for kwargs in ({"kind": "l1"}, {"layer_map": "all"}, {"layer_map": {"a": "b"}, "student_container": "x"}):
        with pytest.raises(ValueError):
            HiddenState(**kwargs)
    with pytest.raises(CompatibilityError, match=r"expected \(T, D\)"):
        HiddenState({"a": "b"}).setup({"a": torch.Size([3, 4, 4])}, {"b": torch.Size([3, 4, 4])})


# --- attention maps -----------------------------------------------------------------------------------------------


def test_attention_map_kl_hand_computed():
    t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # (B=1, H=1, T=2, T=2)
    s = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    row1 = 1.0 * math.log(1.0 / 0.5)  # 0 · log 0 counts as 0
    assert Fk.attention_map_kl(s, t).item() == pytest.approx((row0 + row1) / 2)
    assert Fk.attention_map_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_map_kl_groups_teacher_heads():
    def rows(*r):  # one (T=2, T=2) map whose two query rows are both r
        return torch.tensor([list(r), list(r)])

    teacher = torch.stack([rows(1, 0), rows(0, 1), rows(0.5, 0.5), rows(0.5, 0.5)])[None]  # (1, 4, 2, 2)
    student = torch.stack([rows(0.5, 0.5), rows(0.25, 0.75)])[None]  # (1, 2, 2, 2)
    # teacher heads (0, 1) → [0.5, 0.5] and (2, 3) → [0.5, 0.5]; student head 0 matches, head 1 does not.
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert Fk.attention_map_kl(student, teacher).item() == pytest.approx((0 + kl) / 2)
    # 3 teacher heads do not divide into 2: both sides are averaged to one map.
    t3 = torch.stack([rows(1, 0), rows(0, 1), rows(0.5, 0.5)])[None]  # mean [0.5, 0.5]
    s_mean = [(0.5 + 0.25) / 2, (0.5 + 0.75) / 2]
    one = 0.5 * math.log(0.5 / s_mean[0]) + 0.5 * math.log(0.5 / s_mean[1])
    assert Fk.attention_map_kl(student, t3).item() == pytest.approx(one)
    assert Fk.attention_map_kl(student, teacher, head_reduce="all").item() == pytest.approx(one)


def test_attention_map_kl_masking_ignores_padding():
    g = torch.Generator().manual_seed(1)
    s_real = torch.softmax(torch.randn(2, 3, 2, 2, generator=g), -1)
    t_real = torch.softmax(torch.randn(2, 3, 2, 2, generator=g), -1)

    def pad(real, junk):  # T = 2 real tokens + 1 padding: zero key column, an arbitrary padded query row
        full = torch.zeros(2, 3, 3, 3)
        full[:, :, :2, :2] = real
        full[:, :, 2] = torch.softmax(torch.randn(2, 3, 3, generator=g) * junk, -1)
        return full

    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    alone = Fk.attention_map_kl(s_real, t_real)
    padded = Fk.attention_map_kl(pad(s_real, 1.0), pad(t_real, 1.0), mask)
    assert padded.item() == pytest.approx(alone.item(), rel=1e-6)
    # leftover mass in padded key columns is removed and the rows renormalised
    s_leak = pad(s_real, 5.0)
    s_leak[:, :, :2] = torch.cat([s_real * 0.9, torch.full((2, 3, 2, 1), 0.1)], -1)
    assert Fk.attention_map_kl(s_leak, pad(t_real, 3.0), mask).item() == pytest.approx(alone.item(), rel=1e-6)


def test_attention_map_module_gradients_and_shape_check():
    s = torch.softmax(torch.randn(2, 2, 3, 3), -1).requires_grad_()
    t = torch.softmax(torch.randn(2, 4, 3, 3), -1).requires_grad_()
    loss = AttentionMap({"s#1": "t#1"})
    loss.setup({"s#1": s.shape[1:]}, {"t#1": t.shape[1:]})
    assert loss(_outs({"s#1": s}), _outs({"t#1": s.detach()}), _batch(2)).item() == pytest.approx(0, abs=1e-6)
    loss(_outs({"s#1": s}), _outs({"t#1": t}), _batch(2, torch.tensor([[1, 1, 0], [1, 1, 1]]))).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(CompatibilityError, match=r"expected attention probabilities \(B, H, T, T\)"):
        loss(_outs({"s#1": torch.randn(2, 3, 8)}), _outs({"t#1": t}), _batch(2))
    with pytest.raises(CompatibilityError, match="no tapped feature 's#1'"):
        loss(_outs({}), _outs({"t#1": t}), _batch(2))


# --- tiny transformers BERTs: layer maps and the whole path from hooks to backward ----------------------------------


def _bert(layers: int, hidden: int, heads: int, attn: str = "eager"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        vocab_size=100,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    torch.manual_seed(layers)
    return transformers.BertModel(config)


def test_uniform_map_on_bert_gives_teacher_layers_1_and_3():
    student, teacher = _bert(2, 16, 2), _bert(4, 32, 4)
    hidden = HiddenState()
    hidden.resolve(student, [teacher])
    assert hidden.feature_paths() == (["encoder.layer.0", "encoder.layer.1"], ["encoder.layer.1", "encoder.layer.3"])
    attn = AttentionMap({0: -1})
    attn.resolve(student, [teacher])
    assert attn.feature_paths() == (["encoder.layer.0.attention.self#1"], ["encoder.layer.3.attention.self#1"])
    with pytest.raises(CompatibilityError, match="student layer 2 is out of range: encoder.layer has 2 layers"):
        HiddenState({2: 3}).resolve(student, [teacher])


def test_attention_map_needs_eager_attention():
    with pytest.raises(CompatibilityError, match="'sdpa' attention.*attn_implementation='eager'"):
        AttentionMap().resolve(_bert(2, 16, 2, attn="sdpa"), [_bert(4, 32, 4)])


def test_bert_end_to_end_with_padding():
    student, teacher = _bert(2, 16, 2), _bert(4, 32, 4)
    teacher.eval()
    losses = [HiddenState(kind="mse"), AttentionMap()]
    for loss in losses:
        loss.resolve(student, [teacher])
    s_paths = [p for loss in losses for p in loss.feature_paths()[0]]
    t_paths = [p for loss in losses for p in loss.feature_paths()[1]]
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with FeatureTaps(student, s_paths, "student.model") as s_taps, FeatureTaps(teacher, t_paths, "teacher") as t_taps:
        with torch.inference_mode():
            teacher(input_ids=ids, attention_mask=mask)
        t_feats = t_taps.collect()
        student(input_ids=ids, attention_mask=mask)
        s_feats = s_taps.collect()
    assert t_feats["encoder.layer.3.attention.self#1"].shape == (2, 4, 5, 5)
    assert s_feats["encoder.layer.1"].shape == (2, 5, 16)
    for loss in losses:
        loss.setup({k: v.shape[1:] for k, v in s_feats.items()}, {k: v.shape[1:] for k, v in t_feats.items()})
    batch = _batch(2, mask)
    total = sum(loss(_outs(s_feats), _outs(t_feats), batch) for loss in losses)
    assert torch.isfinite(total) and total.item() > 0
    total.backward()
    assert student.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert losses[0].adapters[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
