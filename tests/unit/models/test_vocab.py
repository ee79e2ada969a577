"""Vocabulary compatibility (kdkit.models.vocab) with tiny tokenizers trained offline."""

from __future__ import annotations

import pytest
import torch

from kdkit.errors import CompatibilityError
from kdkit.models.vocab import align_vocab, check_tokenizers, shared_vocab_size

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SENTENCES = ["the teacher speaks slowly", "the student listens to the teacher", "a small model learns fast"]
OTHER = ["zebras graze on wide plains", "quiet rivers run deep", "the moon rises"]


def _tokenizer(sentences: list[str], extra: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    if extra:
        fast.add_tokens(extra)
    return fast


def test_identical_tokenizers_share_the_whole_vocabulary():
    a, b = _tokenizer(SENTENCES), _tokenizer(SENTENCES)
    assert check_tokenizers(a, b) == len(a.get_vocab()) == len(a)


def test_a_tokenizer_extending_the_other_shares_its_leading_ids():
    a, b = _tokenizer(SENTENCES), _tokenizer(SENTENCES, extra=["<|im_start|>", "<|im_end|>"])
    assert len(b) == len(a) + 2
    assert check_tokenizers(a, b) == len(a)
    assert check_tokenizers(b, a) == len(a)


def test_different_tokenizers_fail_with_one_line_naming_sizes_and_the_first_mismatch():
    a, b = _tokenizer(SENTENCES), _tokenizer(OTHER)
    inv_a = {i: t for t, i in a.get_vocab().items()}
    inv_b = {i: t for t, i in b.get_vocab().items()}
    first = next(i for i in range(min(len(inv_a), len(inv_b))) if inv_a[i] != inv_b[i])
    assert first == 2  # [PAD], [UNK] agree; the learned words do not
    with pytest.raises(CompatibilityError) as err:
        check_tokenizers(a, b, where="teacher")
    message = str(err.value)
    assert "\n" not in message and message.startswith("teacher: ")
    assert f"student vocabulary {len(inv_a)}, teacher {len(inv_b)}" in message
    assert f"id {first}: student {inv_a[first]!r}, teacher {inv_b[first]!r}" in message


def test_an_object_without_get_vocab_is_named():
    with pytest.raises(CompatibilityError, match="teacher tokenizer .*get_vocab"):
        check_tokenizers(_tokenizer(SENTENCES), object())


def test_shared_vocab_size_for_equal_and_padded_widths():
    assert shared_vocab_size(32000, 32000) is None  # identity
    # Qwen2.5: 151936 (0.5B-3B) vs 152064 (7B+) logits over one 151665-token tokenizer.
    assert shared_vocab_size(151936, 152064, real_vocab=151665) == 151665
    assert shared_vocab_size(152064, 151936) == 151936
    with pytest.raises(CompatibilityError, match="152000 shared token ids"):
        shared_vocab_size(151936, 152064, real_vocab=152000)


def test_align_vocab_slices_padded_logits_to_the_shared_ids():
    student = torch.randn(2, 3, 13)
    teacher = torch.randn(2, 3, 16)  # 3 padding ids
    s, t = align_vocab(student, teacher, shared_vocab_size(13, 16, real_vocab=12))
    assert s.shape == t.shape == (2, 3, 12)
    assert s.data_ptr() == student.data_ptr() and t.data_ptr() == teacher.data_ptr()  # views, no copies
    assert torch.equal(t, teacher[..., :12])
    same_s, same_t = align_vocab(student, student.clone(), None)
    assert same_s is student
    with pytest.raises(CompatibilityError, match="13 ids, teacher logits 16"):
        align_vocab(student, teacher, None)
    with pytest.raises(CompatibilityError, match="14 shared ids"):
        align_vocab(student, teacher, 14)
