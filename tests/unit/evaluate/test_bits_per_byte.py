"""Bits per byte and per character of held-out text: the text sizes counted by hand on a fake tokenizer, on a
byte-fallback BPE and on a byte-level BPE (multi-byte characters split over tokens), exact values from a known loss,
and the invariant bits/byte = nll / ln 2 × tokens / bytes."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.data.lm import LMData
from kdkit.evaluate.lm import bits_per_unit, lm_metrics, predicted_text_size, text_decoder

# A fake tokenizer: one token per character, of 1, 2, 3 and 4 UTF-8 bytes; id 5 is an end-of-document token.
CHARS = ["a", "é", "€", "😀", " "]
EOS = 5


def fake_decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids if i != EOS)


def test_text_size_counted_by_hand():
    ids = [0, 1, 2, 3, 4, 0]  # "aé€😀 a": the first "a" is context, "é€😀 a" is predicted
    assert predicted_text_size(ids, ids, fake_decode) == (5, 2 + 3 + 4 + 1 + 1, 5)
    # Padding (-100 at the end) and a prompt (-100 at the start) count nowhere; the prompt stays context.
    assert predicted_text_size(ids, [0, 1, 2, 3, -100, -100], fake_decode) == (3, 2 + 3 + 4, 3)
    assert predicted_text_size(ids, [-100, -100, -100, 3, 4, 0], fake_decode) == (3, 4 + 1 + 1, 3)
    # A hole in the labels: two runs, each counted on its own ("é" and "😀 a").
    assert predicted_text_size(ids, [0, 1, -100, 3, 4, 0], fake_decode) == (4, 2 + 4 + 1 + 1, 4)
    # The end-of-document token is predicted (it has a loss) but stands for no text.
    assert predicted_text_size([0, 1, EOS, 2], [0, 1, EOS, 2], fake_decode) == (3, 2 + 3, 2)
    assert predicted_text_size([0], [0], fake_decode) == (0, 0, 0)  # one token: nothing is predicted


def test_nats_to_bits():
    assert bits_per_unit(8 * math.log(2), 4) == pytest.approx(2.0, rel=1e-15)
    assert bits_per_unit(0.0, 3) == 0.0


def byte_fallback_tokenizer():
    """A SentencePiece-style BPE (Metaspace "▁", byte fallback <0xNN>, the decoder strips one leading space) with a
    hand-made vocabulary: "€" has no piece, so it is spelled in its three UTF-8 bytes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<eos>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "é", "▁a", "▁b", "ab"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b"), ("a", "b")], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<eos>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_byte_fallback_pieces_are_decoded_together():
    pytest.importorskip("tokenizers")
    tokenizer = byte_fallback_tokenizer()
    decode = text_decoder(tokenizer)
    text = "ab € é ba"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces == ["▁a", "b", "▁", "<0xE2>", "<0x82>", "<0xAC>", "▁", "é", "▁b", "a"]
    # Predicted: everything after "▁a", i.e. "b € é ba": 1 + 1 + 3 + 1 + 2 + 1 + 2 = 11 bytes, 8 characters.
    assert predicted_text_size(ids, ids, decode) == (9, 11, 8)
    # Summing the tokens decoded one by one is wrong here: each byte piece alone is U+FFFD (3 bytes), "▁" alone "".
    one_by_one = sum(len(decode([i]).encode()) for i in ids[1:])
    assert one_by_one == 1 + 0 + 3 * 3 + 0 + 2 + 1 + 1 != 11
    # A prompt of two tokens: the predicted text " € é ba" starts with a space that decoding the run alone drops
    # (the decoder strips the first piece's "▁"); the prefix difference keeps it.
    prompt = [-100, -100, *ids[2:]]
    assert len(decode(ids[2:]).encode()) == 9
    assert predicted_text_size(ids, prompt, decode) == (8, 10, 7)
    # The end-of-document token: one more predicted token, no more text.
    assert predicted_text_size([*ids, 0], [*ids, 0], decode) == (10, 11, 8)


def test_byte_level_bpe_with_characters_split_over_tokens():
    pytest.importorskip("tokenizers")
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "naïve café — 日本語のテキスト 😀 and plain words"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain words and more plain words"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    decode = text_decoder(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert decode(ids) == text
    first = decode(ids[:1])
    tokens, n_bytes, n_chars = predicted_text_size(ids, ids, decode)
    expected = (len(ids) - 1, len(text.encode()) - len(first.encode()), len(text) - len(first))
    assert (tokens, n_bytes, n_chars) == expected
    # The characters outside the trained text are spelled in single bytes, so token by token they do not decode.
    assert sum(len(decode([i]).encode()) for i in ids[1:]) != n_bytes


def test_known_loss_gives_exact_bits_per_byte():
    # A uniform model over the 6 ids: every predicted token costs log2 6 bits. Block "aé€😀 a" (5 predicted tokens,
    # 11 bytes, 5 characters) and "€a" + padding (1 predicted token, 1 byte).
    uniform = lambda ids: torch.zeros(*ids.shape, 6)  # noqa: E731
    data = LMData(torch.tensor([[0, 1, 2, 3, 4, 0], [2, 0, 0, 0, 0, 0]]), torch.tensor([6, 2]), pad_id=0)
    out = lm_metrics({"u": uniform}, data, 2, "cpu", decode=fake_decode)["u"]
    assert (out["tokens"], out["bytes"], out["chars"]) == (6, 12, 6)
    assert out["bits_per_byte"] == pytest.approx(6 * math.log2(6) / 12, rel=1e-6)
    assert out["bits_per_char"] == pytest.approx(math.log2(6), rel=1e-6)
    assert "bits_per_byte" not in lm_metrics({"u": uniform}, data, 2, "cpu")["u"]  # no decode: no text sizes
    with pytest.raises(ValueError, match="decode to no text"):
        lm_metrics({"u": uniform}, LMData(torch.tensor([[0, EOS]]), None, pad_id=0), 1, "cpu", decode=fake_decode)


def test_invariant_bits_per_byte_is_nll_in_bits_times_tokens_per_byte():
    # Random bigram models over random blocks with padding and prompts; every batch size gives the same sizes.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (5, 9), generator=gen)
    data = LMData(ids, torch.tensor([9, 7, 9, 3, 8]), pad_id=0)
    data.prompt_lengths = torch.tensor([0, 2, 4, 0, 1])
    tables = {name: torch.randn(6, 6, generator=gen) * 2 for name in ("t", "s")}
    models = {name: (lambda x, table=table: table[x]) for name, table in tables.items()}
    out = lm_metrics(models, data, 2, "cpu", teacher="t", decode=fake_decode)
    blocks = [data.collate([data[i]]) for i in range(len(data))]  # one block at a time: no padding
    sizes = [predicted_text_size(b.inputs[0].tolist(), b.labels[0].tolist(), fake_decode) for b in blocks]
    assert out["s"]["tokens"] == sum(s[0] for s in sizes)
    assert (out["s"]["bytes"], out["s"]["chars"]) == (sum(s[1] for s in sizes), sum(s[2] for s in sizes))
    for name in models:
        m = out[name]
        assert m["bits_per_byte"] == pytest.approx(m["nll"] / math.log(2) * m["tokens"] / m["bytes"], rel=1e-12)
        assert m["bits_per_char"] == pytest.approx(m["nll"] / math.log(2) * m["tokens"] / m["chars"], rel=1e-12)
    one = lm_metrics(models, data, 1, "cpu", teacher="t", decode=fake_decode)
    assert one["s"]["bits_per_byte"] == pytest.approx(out["s"]["bits_per_byte"], rel=1e-6)
    assert (one["s"]["bytes"], one["s"]["chars"]) == (out["s"]["bytes"], out["s"]["chars"])
