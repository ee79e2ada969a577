"""An unlabelled transfer set: cross-entropy skips unlabelled examples (hand value), the files are read in each
format, label_fraction hides labels of the training split, transfer examples reach the distilled student's KD
loss and never the baseline nor the teacher's own training, and the pipeline runs end to end in seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kdkit.data.text import UNLABELLED, read_transfer
from kdkit.errors import ConfigError, DataError
from kdkit.losses import functional as Fk


def test_cross_entropy_ignores_unlabelled_examples_and_normalises_by_the_labelled_count():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], requires_grad=True)
    labels = torch.tensor([0, UNLABELLED, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2  # rows 0 and 2 only, divided by 2
    loss = Fk.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(2))  # the unlabelled row gets no gradient
    none = torch.zeros(2, 2, requires_grad=True)
    empty = Fk.cross_entropy(none, torch.tensor([UNLABELLED, UNLABELLED]))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(none.grad, torch.zeros(2, 2))  # no NaN from an empty mean
    smooth = Fk.cross_entropy(logits.detach(), labels, label_smoothing=0.2)
    ref = torch.nn.functional.cross_entropy(logits.detach()[[0, 2]], labels[[0, 2]], label_smoothing=0.2)
    assert smooth.item() == pytest.approx(ref.item(), rel=1e-6)


def test_transfer_files_in_each_format(tmp_path):
    (tmp_path / "lines.txt").write_text("first text\n\nsecond text\n")
    assert read_transfer(tmp_path / "lines.txt") == ["first text", "second text"]
    folder = tmp_path / "docs" / "sub"
    folder.mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (tmp_path / "docs" / "a.txt").write_text("ay")
    assert read_transfer(tmp_path / "docs") == ["ay", "bee"]
    (tmp_path / "t.csv").write_text('id,body\n1,"one, with a comma"\n2,two\n')
    assert read_transfer(tmp_path / "t.csv", "body") == ["one, with a comma", "two"]
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    assert read_transfer(tmp_path / "t.jsonl") == ["x y", "z"]
    with pytest.raises(DataError, match=r"^data.transfer: no column 'text' in t.csv .*columns: id, body"):
        read_transfer(tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"^data.transfer: .*not found"):
        read_transfer(tmp_path / "missing.txt")


def test_label_fraction_and_transfer_file_build_the_training_split(text_corpus, tmp_path):
    from kdkit.data import build_data

    texts, bert_a, _ = text_corpus
    kw = dict(path=str(texts), tokenizer=str(bert_a), max_length=16)
    full = build_data("text_folder", **kw)
    (tmp_path / "more.txt").write_text("goal team win\nchip code cloud\nvote law\n")
    data = build_data("text_folder", **kw, label_fraction=0.25, transfer=str(tmp_path / "more.txt"))
    n = len(full.train)
    n_lab = round(0.25 * n)
    labels = data.train.labels
    assert len(data.train) == n + 3 and data.transfer == n - n_lab + 3
    assert (labels[:n_lab] >= 0).all() and (labels[n_lab:] == UNLABELLED).all()  # labelled first
    assert np.bincount(labels[:n_lab].numpy()).min() >= n_lab // 3 - 1  # stratified
    assert sorted(data.train.texts[:n]) == sorted(full.train.texts)  # the same split, labels hidden
    assert data.train.texts[-3:] == ["goal team win", "chip code cloud", "vote law"]
    assert torch.equal(data.test.labels, full.test.labels) and data.val.texts == full.val.texts
    lab = data.labelled()
    assert len(lab.train) == n_lab and lab.transfer == 0 and (lab.train.labels >= 0).all()
    assert torch.equal(lab.train.ids[0], data.train.ids[0])  # same positions: a teacher cache stays valid
    with pytest.raises(DataError, match=r"^data.label_fraction: a transfer set .* needs text data"):
        build_data("builtin", name="digits", label_fraction=0.5)


def _config(texts, encoder, **extra):
    from kdkit.config import load_config

    raw = {
        "run": {"seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "text_folder", "path": str(texts), "tokenizer": str(encoder), "max_length": 16},
        "teacher": {
            "members": [{"model": {"source": "hf", "path": str(encoder)}}],
            "train": {"epochs": 4, "batch_size": 8, "lr": 0.003},
        },
        "student": {
            "model": {"source": "hf", "path": str(encoder), "pretrained": False, "kwargs": {"num_hidden_layers": 1}}
        },
        "distill": {"losses": [{"name": "ce", "weight": 0.5}, {"name": "soft_kl", "weight": 0.5}]},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003},
        "eval": {"latency_repeats": 2, "latency_warmup": 0, "robustness": False},
    }
    return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in extra.items()])


def test_transfer_examples_reach_the_students_kd_loss_and_never_the_baseline(text_corpus, tmp_path, monkeypatch):
    import kdkit.engine.loop as loop
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts, bert_a, _ = text_corpus
    (tmp_path / "more.txt").write_text("\n".join(["goal match league", "robot phone data", "senate bill"] * 4))
    seen: list[tuple[str, torch.Tensor, bool, dict]] = []
    original = loop.distill_step

    def spy(student, loss, batch, teacher, taps=None):
        out = original(student, loss, batch, teacher, taps)
        seen.append((type(student).__name__, batch.labels.clone(), teacher is not None, dict(out.parts)))
        return out

    monkeypatch.setattr(loop, "distill_step", spy)
    cfg = _config(
        texts,
        bert_a,
        **{"data.label_fraction": 0.5, "data.transfer": str(tmp_path / "more.txt"), "train.augment.token_mask": 0.1},
    )
    logs: list[str] = []
    r = distill(cfg, out=tmp_path / "run", log=logs.append)
    phases = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"teacher-0", "baseline-s0", "student-s0"} <= set(phases)
    assert any(line.startswith("transfer set: ") for line in logs)
    # with a teacher: the distilled student (2 epochs); without: the teacher's training (4 epochs) and the baseline
    with_teacher = [s for s in seen if s[2]]
    without = [s for s in seen if not s[2]]
    unlabelled_student = sum(int((labels == UNLABELLED).sum()) for _, labels, _, _ in with_teacher)
    assert unlabelled_student > 0 and all("soft_kl" in parts for *_, parts in with_teacher)
    assert all((labels != UNLABELLED).all() for _, labels, _, _ in without)  # teacher training and baseline
    from kdkit.data import build_data

    data = build_data(**cfg.data.model_dump())
    n_lab = len(data.train) - data.transfer
    assert sum(len(labels) for _, labels, _, _ in with_teacher) == 2 * len(data.train)  # student: all, 2 epochs
    baseline_epochs = round(2 * len(data.train) / n_lab)  # the student's example passes, over the labels alone
    assert any(f"for {baseline_epochs} epochs" in line for line in logs)
    assert sum(len(labels) for _, labels, _, _ in without) == (4 + baseline_epochs) * n_lab  # teacher + baseline
    assert unlabelled_student == 2 * data.transfer
    assert r.metrics["student"]["accuracy"] >= 0 and "baseline_student" in r.metrics


def test_a_transfer_set_needs_a_teacher_loss_and_no_label_only_loss(text_corpus, tmp_path, monkeypatch):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts, bert_a, _ = text_corpus
    cfg = _config(
        texts,
        bert_a,
        **{
            "data.label_fraction": 0.5,
            "distill.losses": [{"name": "dkd", "weight": 1.0}],
            "teacher.train.epochs": 1,
        },
    )
    with pytest.raises(ConfigError, match=r"^distill.losses.0.name: dkd needs the true label of every example"):
        distill(cfg, out=tmp_path / "run", log=lambda m: None)
    cfg = _config(
        texts,
        bert_a,
        **{"data.label_fraction": 0.5, "distill.losses": [{"name": "ce", "weight": 1.0}], "teacher.train.epochs": 1},
    )
    with pytest.raises(ConfigError, match=r"^distill.losses: the transfer set .* needs a teacher loss"):
        distill(cfg, out=tmp_path / "run2", log=lambda m: None)
