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


def test_mutual_loss_by_hand_for_two_peers():
    a, b = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    y = torch.tensor([0])
    pa, pb = F.softmax(a, -1)[0].tolist(), F.softmax(b, -1)[0].tolist()
    kl_ab = sum(p * math.log(p / q) for p, q in zip(pb, pa))  # KL(peer b ‖ peer a): a learns from b
    kl_ba = sum(p * math.log(p / q) for p, q in zip(pa, pb))
    expected = -math.log(pa[0]) - math.log(pb[0]) + 0.5 * (kl_ab + kl_ba)
    assert mutual_learning([a, b], y, temperature=1.0, kd_weight=0.5).item() == pytest.approx(expected, rel=1e-6)


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
    assert sum(p.numel() for p in member.parameters()) == r.metrics["teacher"]["params"]
    assert (tmp_path / "run" / "phases" / "student-s0" / "peer_1" / "model.safetensors").is_file()
    again = distill(load_config(TINY), out=tmp_path / "run", resume=True, log=lambda m: None)
    assert again.metrics["student"]["accuracy"] == r.metrics["student"]["accuracy"]


def test_mutual_refuses_pretrained_members_and_the_cache():
    with pytest.raises(ConfigError, match=r"teacher\.members\.0\.model: mutual learning trains the members"):
        load_config({**TINY, "teacher": {"members": [{"model": {"name": "mlp", "checkpoint": "x.safetensors"}}]}})
    with pytest.raises(ConfigError, match="no fixed teacher to cache"):
        load_config(TINY, ["distill.cache_teacher=true"])
