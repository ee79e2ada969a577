"""Token masking, deletion and swap: special tokens and padding are never touched, a view is a pure function of
(seed, example index, view) whatever the batch, the probabilities hold on a large batch, the config refuses
transforms that do not fit the inputs, and the teacher (live or cached views) sees exactly the student's input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdkit.data.text_augment import TextAugment, augment_tokens
from kdkit.types import Batch

PAD, CLS, SEP, MASK = 0, 2, 3, 4


def _batch(lengths: list[int], width: int | None = None, start: int = 10) -> Batch:
    """Rows [CLS] t_1 … t_n [SEP] [PAD] …; real tokens distinct within a row (start, start + 1, …)."""
    width = width or max(lengths) + 2
    x = torch.full((len(lengths), width), PAD, dtype=torch.long)
    for r, n in enumerate(lengths):
        x[r, 0], x[r, n + 1] = CLS, SEP
        x[r, 1 : n + 1] = torch.arange(start, start + n)
    return Batch(x, torch.zeros(len(lengths), dtype=torch.long), torch.arange(len(lengths)), (x != PAD).long())


def _aug(**kw) -> TextAugment:
    return TextAugment(pad_id=PAD, mask_id=MASK, special_ids=(CLS, SEP, MASK), **kw)


def test_hand_cases_of_each_operation():
    ids = np.array([CLS, 10, 11, 12, 13, 14, SEP, PAD, PAD])
    prot = np.isin(ids, [CLS, SEP, PAD])
    zero, one = np.zeros(9), np.ones(9) * 0.99
    # swap with p = 1: greedy pairs (10 11) (12 13), 14 has no free neighbour before [SEP]
    assert augment_tokens(ids, prot, one, zero, one, 0.0, 1.0, 0.0, MASK, PAD).tolist() == [
        CLS,
        11,
        10,
        13,
        12,
        14,
        SEP,
        PAD,
        PAD,
    ]
    # delete positions 2 and 4 (tokens 11 and 13): the rest moves left, padding fills the end
    u_del = one.copy()
    u_del[[2, 4]] = 0.0
    assert augment_tokens(ids, prot, u_del, one, one, 0.5, 0.0, 0.0, MASK, PAD).tolist() == [
        CLS,
        10,
        12,
        14,
        SEP,
        PAD,
        PAD,
        PAD,
        PAD,
    ]
    # mask with p = 1: every real token, never [CLS], [SEP] or padding
    assert augment_tokens(ids, prot, one, one, zero, 0.0, 0.0, 1.0, MASK, PAD).tolist() == [
        CLS,
        MASK,
        MASK,
        MASK,
        MASK,
        MASK,
        SEP,
        PAD,
        PAD,
    ]


def test_specials_and_padding_are_never_touched():
    batch = _batch([1, 5, 17, 30, 2], width=40)
    out = _aug(token_mask=0.5, token_delete=0.5, token_swap=0.9, seed=3).apply(batch, seed=0, epoch=1)
    assert out.inputs.shape == batch.inputs.shape
    for row_in, row_out, mask in zip(batch.inputs, out.inputs, out.attention_mask):
        real_in = row_in[row_in != PAD]
        real_out = row_out[row_out != PAD]
        assert (row_out[len(real_out) :] == PAD).all()  # padding only at the end
        assert real_out[0] == CLS and real_out[-1] == SEP and (real_out[1:-1] != CLS).all()
        assert (real_out[1:-1] != SEP).all() and len(real_out) <= len(real_in)
        body = real_out[1:-1]
        assert set(body[body != MASK].tolist()) <= set(real_in[1:-1].tolist())  # no new tokens but [MASK]
        assert torch.equal(mask, (row_out != PAD).long())  # the attention mask follows the padding


def test_views_are_deterministic_per_seed_epoch_and_index_whatever_the_batch():
    aug = _aug(token_mask=0.3, token_delete=0.2, token_swap=0.3, seed=5)
    batch = _batch([12, 7, 20, 9])
    first = aug.apply(batch, seed=0, epoch=2).inputs
    assert torch.equal(first, aug.apply(batch, seed=0, epoch=2).inputs)
    assert not torch.equal(first, aug.apply(batch, seed=0, epoch=3).inputs)  # a fresh view each epoch
    assert not torch.equal(
        first, _aug(token_mask=0.3, token_delete=0.2, token_swap=0.3, seed=6).apply(batch, seed=0, epoch=2).inputs
    )
    # example 2 alone, with another padded width and another position in the batch: the same tokens
    alone = Batch(batch.inputs[2:3, :30], batch.labels[2:3], batch.index[2:3], batch.attention_mask[2:3, :30])
    got = aug.apply(alone, seed=0, epoch=2).inputs[0]
    assert torch.equal(got[got != PAD], first[2][first[2] != PAD])


@pytest.mark.parametrize(
    "op, p, expected",
    [("token_mask", 0.15, 0.15), ("token_delete", 0.1, 0.1), ("token_swap", 0.2, 0.2 / 1.2)],
)
def test_probabilities_hold_on_a_large_batch(op, p, expected):
    n, length = 400, 200
    batch = _batch([length] * n)
    out = _aug(**{op: p}, seed=1).apply(batch, seed=0, epoch=0).inputs
    real = n * length
    if op == "token_mask":
        rate = (out == MASK).sum().item() / real
    elif op == "token_delete":
        rate = 1 - ((out != PAD) & (out != CLS) & (out != SEP)).sum().item() / real
    else:  # distinct tokens: each swap changes two positions; a token starts a swap with probability p / (1 + p)
        rate = (out != batch.inputs).sum().item() / 2 / real
    assert rate == pytest.approx(expected, abs=0.01)


def test_config_refuses_transforms_that_do_not_fit_the_inputs(text_corpus):
    from kdkit.config import AugmentConfig
    from kdkit.data import build_data
    from kdkit.errors import ConfigError
    from kdkit.tasks.classification import make_augment

    texts, bert_a, _ = text_corpus
    text = build_data("text_folder", path=str(texts), tokenizer=str(bert_a), max_length=16)
    aug = make_augment(AugmentConfig(token_mask=0.1, token_swap=0.1), text, "train.augment")
    assert isinstance(aug, TextAugment) and aug.mask_id == text.train.mask_id and PAD in (aug.pad_id,)
    assert set(aug.special_ids) >= {2, 3} and text.tokenizer.unk_token_id not in aug.special_ids
    assert make_augment(AugmentConfig(), text, "train.augment") is None
    with pytest.raises(ConfigError, match=r"^train.augment.hflip: True does not apply to token ids"):
        make_augment(AugmentConfig(hflip=True), text, "train.augment")
    with pytest.raises(ConfigError, match=r"^train.augment.noise_std: 0.1 does not apply to token ids"):
        make_augment(AugmentConfig(noise_std=0.1), text, "train.augment")
    tables = build_data("builtin", name="digits", limit=100)
    with pytest.raises(ConfigError, match=r"^train.augment.token_delete: needs text data"):
        make_augment(AugmentConfig(token_delete=0.1), tables, "train.augment")


def test_the_teacher_sees_exactly_the_students_augmented_input():
    from kdkit.engine import TrainOptions, train
    from kdkit.losses import build_loss
    from kdkit.types import ModelOutputs

    seen_student, seen_teacher = [], []

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(64, 3)

        def forward(self, x):
            seen_student.append(x.clone())
            return self.emb(x)

    def teacher(batch):
        seen_teacher.append(batch.inputs.clone())
        return ModelOutputs(logits=torch.zeros(len(batch), 3))

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.b = _batch([5, 9, 3, 12, 7, 8])

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.b.inputs[i], 0, i

    opts = TrainOptions(epochs=2, batch_size=3, lr=1e-2)
    aug = _aug(token_mask=0.3, token_delete=0.3, token_swap=0.3)
    train(
        Student(),
        build_loss([("soft_kl", 1.0, {})]),
        Data(),
        opts,
        teacher=teacher,
        augment=aug,
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    assert len(seen_teacher) == 4 and all(torch.equal(s, t) for s, t in zip(seen_student, seen_teacher))
    assert any((t == MASK).any() for t in seen_teacher)


def test_cached_views_are_the_augmented_views(tmp_path):
    from kdkit.data.teacher_cache import TeacherCache

    data_batch = _batch([6, 11, 4, 9, 14])

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            row = data_batch.inputs[i]
            return row[row != PAD], 0, i

        def collate(self, items):
            seqs, ys, idx = zip(*items)
            x = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=PAD)
            return Batch(x, torch.as_tensor(ys), torch.as_tensor(idx), (x != PAD).long())

        def fingerprint(self):
            return "five-rows"

    def forward(x):  # logits that see every token and its position
        w = torch.arange(1, x.shape[1] + 1, dtype=torch.float32)
        return torch.stack([(x.float() * w).sum(1), (x == MASK).float().sum(1)], dim=1)

    aug = _aug(token_mask=0.3, token_delete=0.2, token_swap=0.3, seed=2)
    cache = TeacherCache.build_or_load(Data(), forward, "t", tmp_path, 2, "cpu", lambda m: None, aug, views=3)
    assert cache.views == 3
    ds = Data()
    batch = ds.collate([ds[i] for i in (4, 0, 2)])
    for epoch in range(4):
        out = aug.apply(batch, seed=1, epoch=epoch, views=3)
        torch.testing.assert_close(cache(out).logits, forward(out.inputs))
