"""Deep mutual learning: the loss by hand, every peer updated, no frozen model, the pipeline end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.config import load_config
from kdkit.data import TensorData
from kdkit.engine import TrainOptions, train
from kdkit.errors import ConfigError
from kdkit.losses import build_loss
from kdkit.losses.functional import mutual_learning
from kdkit.models.peers import Peers
from kdkit.types import Batch, ModelOutputs


def test_mutual_loss_by_hand_for_two_peers():
    a, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    y = torch.tensor([0])
    pa, pb = F.softmax(a, -1)[0].tolist(), F.softmax(b, -1)[0].tolist()
    kl_ab = sum(p * math.log(p / q) for p, q in zip(pb, pa))  # KL(peer b ‖ peer a): a learns from b
    kl_ba = sum(p * math.log(p / q) for p, q in zip(pa, pb))
    expected = -math.log(pa[0]) - math.log(pb[0]) + 0.5 * (kl_ab + kl_ba)
    assert mutual_learning([a, b], y, temperature=1.0, kd_weight=0.5).item() == pytest.approx(expected, rel=1e-6)


def _p(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


PEERS3 = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [-1.0, 0.5, 3.0]]


def test_three_peers_average_the_pairwise_kls_by_default():
    # Zhang et al. 2018, eq. 10: L_k = CE(p_k, y) + 1/(K − 1) Σ_{l ≠ k} KL(p_l ‖ p_k), summed over the peers.
    p = [_p(z) for z in PEERS3]
    y = 1
    expected = sum(-math.log(p[k][y]) + 0.5 * sum(_kl(p[j], p[k]) for j in range(3) if j != k) for k in range(3))
    logits = [torch.tensor([z]) for z in PEERS3]
    got = mutual_learning(logits, torch.tensor([y]), temperature=1.0, kd_weight=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Through the loss module, as the pipeline builds it: the peers' logits in ModelOutputs.features.
    out = ModelOutputs(logits[0], features={f"peer{i}": z for i, z in enumerate(logits)})
    batch = Batch(torch.zeros(1, 3), torch.tensor([y]), torch.arange(1))
    assert build_loss([("mutual", 1.0, {})])(out, None, batch).loss.item() == pytest.approx(expected, rel=1e-6)


def test_three_peers_mean_of_peers_is_the_kl_to_the_mean_of_the_others():
    p = [_p(z) for z in PEERS3]
    y = 2
    expected = 0.0
    for k in range(3):
        others = [p[j] for j in range(3) if j != k]
        mean = [(a + b) / 2 for a, b in zip(*others)]
        expected += -math.log(p[k][y]) + 0.5 * _kl(mean, p[k])
    logits = [torch.tensor([z]) for z in PEERS3]
    got = mutual_learning(logits, torch.tensor([y]), kd_weight=0.5, peer_target="mean_of_peers")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    pairwise = mutual_learning(logits, torch.tensor([y]), kd_weight=0.5, peer_target="pairwise")
    assert pairwise.item() > got.item() + 0.1  # KL is convex in its first argument: the two really differ


def test_mutual_with_mixed_labels_mixes_each_peer_cross_entropy():
    a, b = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0]
    pa, pb = _p(a), _p(b)
    lam = 0.25
    ce = sum(-lam * math.log(p[0]) - (1 - lam) * math.log(p[2]) for p in (pa, pb))
    expected = ce + _kl(pb, pa) + _kl(pa, pb)
    logits = [torch.tensor([a]), torch.tensor([b])]
    out = ModelOutputs(logits[0], features={"peer0": logits[0], "peer1": logits[1]})
    batch = Batch(torch.zeros(1, 3), torch.tensor([0]), torch.arange(1), mixed_labels=torch.tensor([2]), mix_lambda=lam)
    assert build_loss([("mutual", 1.0, {})])(out, None, batch).loss.item() == pytest.approx(expected, rel=1e-6)


def test_peer_target_is_a_config_field_and_a_checked_loss_parameter():
    cfg = load_config(TINY)
    assert cfg.distill.mutual.peer_target == "pairwise"
    assert load_config(TINY, ["distill.mutual.peer_target=mean_of_peers"]).distill.mutual.peer_target == "mean_of_peers"
    with pytest.raises(ConfigError, match=r"distill\.mutual\.peer_target"):
        load_config(TINY, ["distill.mutual.peer_target=mean"])
    with pytest.raises(ConfigError, match=r"distill\.losses\.0\.params\.peer_target: peer_target='mean'"):
        build_loss([("mutual", 1.0, {"peer_target": "mean"})])
    assert "mean_of_peers" in build_loss([("mutual", 1.0, {"peer_target": "mean_of_peers"})]).formula()


def test_each_peer_gets_gradient_only_from_its_own_terms():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    mutual_learning([a, b], y).backward()
    grad_a = a.grad.clone()
    a.grad = None
    own = F.cross_entropy(a, y) + F.kl_div(F.log_softmax(a, -1), F.softmax(b.detach(), -1), reduction="batchmean")
    own.backward()
    torch.testing.assert_close(grad_a, a.grad)


def test_training_updates_every_peer():
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g))
    torch.manual_seed(0)
    peers = Peers([nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))])
    before = copy.deepcopy(peers.state_dict())
    train(
        peers,
        build_loss([("mutual", 1.0, {})]),
        data,
        TrainOptions(epochs=2, batch_size=8, keep_best="none"),
        device="cpu",
        progress=False,
    )
    for name, value in peers.state_dict().items():
        assert not torch.equal(value, before[name]), f"{name} was not updated"
    assert all(p.requires_grad for p in peers.parameters())


TINY = {
    "run": {"seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 400},
    "teacher": {"members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}]},
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [8]}}},
    "distill": {"mutual": {"enabled": True}},
    "train": {"epochs": 2},
    "eval": {"robustness": False, "latency_repeats": 2, "latency_warmup": 0},
}


def test_mutual_pipeline_trains_student_and_members_together(tmp_path):
    from kdkit.models import load_model_folder
    from kdkit.pipeline import distill

    r = distill(load_config(TINY), out=tmp_path / "run", log=lambda m: None)
    assert {"teacher", "student", "baseline_student"} <= set(r.metrics)
    member = load_model_folder(tmp_path / "run" / "teachers" / "member_0")
    assert sum(p.numel() for p in member.parameters()) == r.metrics["cost"]["teacher"]["params"]
    assert (tmp_path / "run" / "phases" / "student-s0" / "peer_1" / "model.safetensors").is_file()
    again = distill(load_config(TINY), out=tmp_path / "run", resume=True, log=lambda m: None)
    assert again.metrics["student"]["accuracy"] == r.metrics["student"]["accuracy"]


def test_mutual_refuses_pretrained_members_and_the_cache():
    with pytest.raises(ConfigError, match=r"teacher\.members\.0\.model: mutual learning trains the members"):
        load_config({**TINY, "teacher": {"members": [{"model": {"name": "mlp", "checkpoint": "x.safetensors"}}]}})
    with pytest.raises(ConfigError, match="no fixed teacher to cache"):
        load_config(TINY, ["distill.cache_teacher=true"])
