"""Bad input across tokenizers (#14), each refused in one line that names the member or field and the reason: no
common text between the two tokenisations, a slow tokenizer, a member whose tokenizer cannot be loaded, and (for
hybrid_kl) two vocabularies that share no token."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from kdkit.config import load_config
from kdkit.data.align import align_offsets
from kdkit.data.lm import LMData, tokenize_corpus_with_text
from kdkit.errors import CompatibilityError, ConfigError, DataError
from kdkit.losses.hybrid_kl import shared_vocab
from kdkit.pipeline import distill
from kdkit.run.cross_teacher import CrossTeacher
from kdkit.tasks.causal_lm import shared_vocab_map


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def config(corpus, teacher, student_tokenizer, loss: str = "hybrid_kl", members=None) -> dict:
    members = members or [str(teacher)]
    return {
        "run": {"name": "bad", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "tokenizer": str(student_tokenizer),
                 "max_length": 24, "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"members": [{"model": {"source": "hf", "path": m}} for m in members]},
        "student": {"model": {"source": "hf", "path": str(teacher), "pretrained": False,
                              "kwargs": {"num_hidden_layers": 1}}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, {"name": loss, "weight": 0.5}],
                    "cache_teacher": False},
        "llm": {"prompt_tokens": 6, "report_samples": 1, "generation": {"max_new_tokens": 4}},
        "train": {"epochs": 1, "batch_size": 8, "keep_best": "loss"},
    }


def fast(tok):
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


# ----------------------------------------------------------------------------------------------------------------
# (a) No common text
# ----------------------------------------------------------------------------------------------------------------


def test_offsets_of_another_text_name_the_side():
    text = "to be or not to be"
    student = [(0, 2), (2, 5), (5, 8), (8, 12), (12, 15), (15, 18)]
    teacher_of_a_longer_text = [(0, 10), (10, 25)]
    with pytest.raises(DataError, match=r"^teacher token 1: offsets \(10, 25\) outside the text of 18 characters") as e:
        align_offsets(text, teacher_of_a_longer_text, student)
    assert "no common text" in one_line(e)


def test_tokenisations_with_no_common_boundary_are_refused_before_training(lm_world):
    """A teacher tokenizer whose tokens share no boundary with the student's (here: each document piece is one
    unknown token, so the only span holds the block's last token): CrossTeacher refuses on its first blocks."""
    from tests.conftest import SENTENCES
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer

    corpus, teacher, _ = lm_world
    student_tok = AutoTokenizer.from_pretrained(str(teacher))
    whole = fast(Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]")))
    text = ". ".join(SENTENCES * 8)  # one document, so no block holds an <eos> both sides would share
    blocks, _, tb = tokenize_corpus_with_text([text], student_tok, 24)
    data = LMData(blocks, None, student_tok.pad_token_id, student_tok.eos_token_id, tb.texts, tb.offsets)
    with pytest.raises(DataError, match=r"^teacher.members.0 \(its tokenizer\): no aligned text with the student's "
                       r"tokens on blocks 0, 1, 2, 3, \.\.\. \(not one token boundary in common\)") as e:
        CrossTeacher(None, whole, student_tok, data, where="teacher.members.0 (its tokenizer)")
    one_line(e)
    # The same blocks with a teacher tokenizer that reads the text: aligned, no error.
    other = AutoTokenizer.from_pretrained(str(lm_world[2]))
    assert CrossTeacher(None, other, student_tok, data).align(data.collate([data[0]])).spans[0]


# ----------------------------------------------------------------------------------------------------------------
# (b) A slow tokenizer, (c) a member whose tokenizer cannot be loaded
# ----------------------------------------------------------------------------------------------------------------


def member_folder(teacher, root, name: str, tokenizer_files: bool = False):
    """A copy of the teacher's model folder without its tokenizer (tokenizer_files: with a slow ByT5 tokenizer)."""
    folder = root / name
    folder.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        if (teacher / f).is_file():
            shutil.copy(teacher / f, folder / f)
    if tokenizer_files:
        import transformers

        transformers.ByT5Tokenizer().save_pretrained(str(folder))  # a Python tokenizer: no offsets
    return folder


def test_a_slow_member_tokenizer_is_refused_naming_the_member(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    slow = member_folder(teacher, tmp_path, "slow", tokenizer_files=True)
    with pytest.raises(CompatibilityError, match=r"^teacher.members.0 tokenizer: ByT5Tokenizer is a slow tokenizer "
                       "without offsets; expected a fast tokenizer") as e:
        distill(config(corpus, slow, other), out=tmp_path / "run", log=lambda m: None)
    one_line(e)


@pytest.mark.parametrize("what", ["no tokenizer", "no folder"])
def test_a_member_whose_tokenizer_cannot_be_loaded_is_named(lm_world, tmp_path, what):
    corpus, teacher, other = lm_world
    bad = member_folder(teacher, tmp_path, "bare") if what == "no tokenizer" else tmp_path / "absent"
    cfg = config(corpus, teacher, other, members=[str(teacher), str(bad)])
    expected = ("could not be loaded with its tokenizer .Couldn't instantiate the backend tokenizer"
                if what == "no tokenizer" else "could not load")
    with pytest.raises(ConfigError, match=rf"^teacher.members.1.model.path: .*{expected}") as e:
        distill(cfg, out=tmp_path / "run", log=lambda m: None)
    one_line(e)


def test_the_first_members_tokenizer_read_for_the_data_is_named_too(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = config(corpus, member_folder(teacher, tmp_path, "bare"), other, loss="token_kl")
    del cfg["data"]["tokenizer"]  # the data is tokenised by teacher.members.0's tokenizer
    with pytest.raises(ConfigError, match=r"^teacher.members.0.model.path: .* could not be loaded with its tokenizer"):
        distill(cfg, out=tmp_path / "run", log=lambda m: None)


# ----------------------------------------------------------------------------------------------------------------
# (d) hybrid_kl with no shared token
# ----------------------------------------------------------------------------------------------------------------


def test_hybrid_kl_with_no_shared_token_is_refused_uld_is_not(lm_world, tmp_path):
    from tests.conftest import bpe_tokenizer
    from transformers import AutoTokenizer

    corpus, teacher, other = lm_world
    english = AutoTokenizer.from_pretrained(str(teacher))
    greek = bpe_tokenizer(["αβγδεζηθικλμνξοπρστυφχψω" * 20, "ωψχφυτσρποξνμλκιθηζεδγβα" * 20], 100)
    assert shared_vocab(greek, english)[0].numel() == 0  # no Greek token decodes to an English one
    cross = SimpleNamespace(tokenizer=greek)
    run = SimpleNamespace(log=lambda m: None)
    cfg = load_config(config(corpus, teacher, other))
    with pytest.raises(CompatibilityError, match=r"^distill.losses.1 \(hybrid_kl\): teacher.members.0's \d+ tokens "
                       r"and the student's \d+ share none .* it is uld exactly: use uld") as e:
        shared_vocab_map(cfg, cross, english, run)
    one_line(e)
    with pytest.raises(CompatibilityError, match=r"^distill.losses.1 \(hybrid_kl\): teacher.members.2's \d+ tokens"):
        shared_vocab_map(cfg, cross, english, run, "teacher.members.2")  # a later member's group names its member
    assert shared_vocab_map(load_config(config(corpus, teacher, other, loss="uld")), cross, english, run) is None
    # Two vocabularies that do share tokens: the map, logged.
    t_ids, s_ids = shared_vocab_map(cfg, SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(other))),
                                    english, run)
    assert t_ids.numel() == s_ids.numel() > 0 and t_ids.dtype == torch.long
