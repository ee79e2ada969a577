"""An ensemble of text teachers with different tokenizers: each member sees the same texts in its own ids, the
average equals the members run by hand on their own tokenisations, one tokenizer costs no second tokenisation,
and what a member with its own tokenizer cannot do is refused with the field named."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.config import load_config
from kdkit.data import build_data
from kdkit.errors import ConfigError


def _config(texts, bert_a, bert_b, **extra):
    raw = {
        "run": {"seeds": [0], "progress": False, "tensorboard": False},
        "data": {"source": "text_folder", "path": str(texts), "tokenizer": str(bert_a), "max_length": 16},
        "teacher": {
            "members": [
                {"model": {"source": "hf", "path": str(bert_a), "trained": True}, "weight": 1.0},
                {
                    "model": {"source": "hf", "path": str(bert_b), "trained": True},
                    "weight": 3.0,
                    "tokenizer": str(bert_b),
                },
            ],
        },
        "student": {
            "model": {"source": "hf", "path": str(bert_a), "pretrained": False, "kwargs": {"num_hidden_layers": 1}},
            "baseline": False,
        },
        "distill": {"losses": [{"name": "ce", "weight": 0.5}, {"name": "soft_kl", "weight": 0.5}]},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003},
        "eval": {"latency_repeats": 2, "latency_warmup": 0, "robustness": False},
    }
    return load_config(raw, [f"{k}={json.dumps(v)}" for k, v in extra.items()])


def test_members_with_different_tokenizers_average_like_each_member_run_by_hand(text_corpus, tmp_path):
    from kdkit.data.text import load_tokenizer, tokenize
    from kdkit.run import RunDir
    from kdkit.tasks.classification import build_teacher

    texts, bert_a, bert_b = text_corpus
    cfg = _config(texts, bert_a, bert_b)
    data = build_data(**cfg.data.model_dump())
    teacher = build_teacher(cfg, data, RunDir(tmp_path, False, "cpu", lambda m: None))
    assert teacher.inputs_for[0] is None and teacher.inputs_for[1] is not None
    tok_a, tok_b = load_tokenizer(str(bert_a)), load_tokenizer(str(bert_b))
    sample = data.test.texts[:6] + data.train.texts[:2]
    assert tok_a(sample[0])["input_ids"] != tok_b(sample[0])["input_ids"]  # the tokenisations really differ
    batch = data.collate([data.test[i] for i in range(6)] + [data.train[i] for i in range(2)])
    got = teacher(batch.inputs).logits

    def by_hand(member, tok):
        ids, _ = tokenize(sample, tok, 16)
        x = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id)
        hf = member.model.hf
        with torch.no_grad():
            return hf(input_ids=x, attention_mask=(x != tok.pad_token_id).long()).logits

    p = 0.25 * by_hand(teacher.members[0], tok_a).softmax(-1) + 0.75 * by_hand(teacher.members[1], tok_b).softmax(-1)
    torch.testing.assert_close(got.softmax(-1), p, atol=1e-5, rtol=1e-5)
    assert teacher.inputs_for[1].misses == 0  # every example found by its ids, none decoded again
    # an input that is no example of the data (a corrupted text) is decoded and encoded again for member 1
    odd = torch.tensor([[2, 10, 11, 3]])
    text = tok_a.decode([10, 11])
    expected = torch.tensor([tok_b(text, truncation=True, max_length=16)["input_ids"]])
    assert torch.equal(teacher.inputs_for[1](odd), expected) and teacher.inputs_for[1].misses == 1


def test_one_tokenizer_means_one_tokenisation(text_corpus, tmp_path):
    from kdkit.run import RunDir
    from kdkit.tasks.classification import build_teacher

    texts, bert_a, bert_b = text_corpus
    cfg = _config(
        texts,
        bert_a,
        bert_b,
        **{
            "teacher.members": [
                {"model": {"source": "hf", "path": str(bert_a), "trained": True}, "tokenizer": str(bert_a)}
            ]
        },
    )
    data = build_data(**cfg.data.model_dump())
    teacher = build_teacher(cfg, data, RunDir(tmp_path, False, "cpu", lambda m: None))
    assert teacher.inputs_for == [None] and data.retokenizer(str(bert_a), "x") is None


def test_pipeline_with_two_tokenizers_trains_members_on_their_own_ids_and_distils(text_corpus, tmp_path, monkeypatch):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts, bert_a, bert_b = text_corpus
    members = [
        {"model": {"source": "hf", "path": str(bert_a)}},
        {"model": {"source": "hf", "path": str(bert_b)}, "tokenizer": str(bert_b)},
    ]
    cfg = _config(
        texts,
        bert_a,
        bert_b,
        **{
            "teacher.members": members,
            "teacher.train": {"epochs": 8, "batch_size": 8, "lr": 0.003},
            "distill.cache_teacher": True,
        },
    )
    logs: list[str] = []
    r = distill(cfg, out=tmp_path / "run", log=logs.append)
    assert any("own tokenizer" in line for line in logs)
    assert r.metrics["teacher"]["accuracy"] > 0.6  # member 1 learnt on its own ids: the words separate the classes
    assert r.metrics["teacher_cache"]["examples"] == len(build_data(**cfg.data.model_dump()).train)


def test_what_a_member_with_its_own_tokenizer_cannot_do_is_refused(text_corpus, tmp_path, monkeypatch):
    from kdkit.pipeline import distill

    monkeypatch.setenv("KDKIT_CACHE_DIR", str(tmp_path / "cache"))
    texts, bert_a, bert_b = text_corpus
    with pytest.raises(ConfigError, match=r"^train.augment: teacher.members.1.tokenizer differs from the student's"):
        distill(
            _config(texts, bert_a, bert_b, **{"train.augment.token_mask": 0.1}), out=tmp_path / "a", log=lambda m: None
        )
    swapped = _config(texts, bert_a, bert_b)
    members = [m.model_dump() for m in swapped.teacher.members][::-1]
    cfg = _config(
        texts,
        bert_a,
        bert_b,
        **{"teacher.members": members, "student.model": {"source": "hf", "path": str(bert_a), "teacher_layers": [0]}},
    )
    with pytest.raises(ConfigError, match=r"^student.model.teacher_layers: member 0 has its own tokenizer"):
        distill(cfg, out=tmp_path / "b", log=lambda m: None)
