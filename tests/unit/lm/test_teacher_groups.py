"""Several teachers across tokenizers (kdkit.run.teacher_groups): members grouped by tokenizer, each group read on
its own tokens through its own source and shared-vocabulary map, each teacher term the weighted sum over the groups
(the weights: the groups' shares of the members' weight); members that share the student's vocabulary are averaged
as a same-tokenizer ensemble; with one group nothing changes."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.data.lm import build_lm_data
from kdkit.errors import CompatibilityError
from kdkit.evaluate.schema import check_metrics
from kdkit.losses import build_loss
from kdkit.losses.hybrid_kl import shared_vocab
from kdkit.losses.token_kl import TokenKL
from kdkit.models.causal_lm import load_causal_lm
from kdkit.pipeline import distill
from kdkit.run.cross_teacher import CrossTeacher
from kdkit.run.teacher_groups import GroupedTeacher, one_source, teacher_groups
from kdkit.teachers import Teacher, TeacherEnsemble
from kdkit.types import ModelOutputs


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def member(folder) -> Teacher:
    model, _ = load_causal_lm(str(folder))
    return Teacher(model.eval())


def test_members_are_grouped_by_tokenizer_in_first_member_order(lm_world):
    _, teacher, other = lm_world
    a, b = tokenizer(teacher), tokenizer(other)
    members = [member(other), member(teacher), member(other)]
    groups = teacher_groups(members, [1.0, 2.0, 1.0], [b, a, tokenizer(other)])
    assert [g.members for g in groups] == [[0, 2], [1]]  # one tokenizer (loaded twice) is one group
    assert [g.weight for g in groups] == [0.5, 0.5]  # the shares of the members' weight
    assert [g.where for g in groups] == ["teacher.members.0", "teacher.members.1"]
    assert list(groups[0].ensemble.members) == [members[0], members[2]] and groups[0].ensemble.weights == [0.5, 0.5]
    whole = TeacherEnsemble(members[:1])
    only = teacher_groups(members[:1], [3.0], [b], whole=whole)
    assert len(only) == 1 and only[0].ensemble is whole and only[0].weight == 1.0  # one tokenizer: unchanged
    source = object()
    assert one_source([source], [1.0]) is source


def test_each_teacher_term_is_the_weighted_sum_over_the_groups(lm_world):
    """Two real groups through the real sources: members.0 reads another tokenizer, members.1 the student's. The
    grouped hybrid_kl is 1/4 of the first's + 3/4 of the second's, and the second (the student's vocabulary) is
    token_kl exactly; token_ce, which reads no teacher, is counted once."""
    corpus, teacher, other = lm_world
    student_tok, other_tok = tokenizer(other), tokenizer(teacher)
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True)
    t_other, t_same = TeacherEnsemble([member(teacher)]), TeacherEnsemble([member(other)])
    foreign = CrossTeacher(t_other, other_tok, student_tok, data.train, max_length=128)
    own = CrossTeacher(t_same, student_tok, student_tok, data.train, max_length=128)
    assert own.same and not foreign.same
    foreign.vocab_map, own.vocab_map = shared_vocab(other_tok, student_tok), shared_vocab(student_tok, student_tok)
    source = GroupedTeacher([foreign, own], [0.25, 0.75])
    batch = data.train.collate([data.train[i] for i in range(6)])
    torch.manual_seed(0)
    student = ModelOutputs(torch.randn(*batch.inputs.shape, len(student_tok)))
    loss = build_loss([("token_ce", 0.5, {}), ("hybrid_kl", 0.5, {})])
    loss.parts[1].set_vocab_map(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))  # unused: sent
    out = loss(student, source(batch), batch)
    hybrid = loss.parts[1]
    by_hand = [hybrid(student, s(batch), batch) for s in (foreign, own)]
    torch.testing.assert_close(out.parts["hybrid_kl"], 0.25 * by_hand[0] + 0.75 * by_hand[1])
    torch.testing.assert_close(out.loss, 0.5 * out.parts["token_ce"] + 0.5 * out.parts["hybrid_kl"])
    # The student's own vocabulary: the hybrid is token_kl (shift: the same next-token positions).
    torch.testing.assert_close(by_hand[1], TokenKL()(student, t_same(batch.inputs), batch))
    assert not torch.allclose(by_hand[0], by_hand[1])  # the two groups do differ


def groups_config(corpus, first, second, student_tokenizer, cached: bool) -> dict:
    return {
        "run": {"name": "groups", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "tokenizer": str(student_tokenizer),
                 "max_length": 24, "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(first)}, "weight": 1.0},
                                {"model": {"source": "hf", "path": str(second)}, "weight": 3.0}]},
        "student": {"model": {"source": "hf", "path": str(first), "pretrained": False,
                              "kwargs": {"num_hidden_layers": 1}}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, {"name": "hybrid_kl", "weight": 0.5}],
                    "cache_teacher": cached},
        "llm": {"prompt_tokens": 6, "report_samples": 1, "generation": {"max_new_tokens": 4}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "keep_best": "loss"},
        "eval": {"batch_size": 8, "latency_repeats": 2},
    }


@pytest.mark.parametrize("cached", [False, True])
def test_a_run_with_teachers_of_two_tokenizers(lm_world, tmp_path, cached):
    """members.0 (the teacher's tokenizer) and members.1 (the student's own) teach one student, live and from one
    cache per tokenizer; metrics.json measures members.0's group as the teacher, the other beside it."""
    corpus, teacher, other = lm_world
    said = []
    m = distill(groups_config(corpus, teacher, other, other, cached), out=tmp_path / "run", log=said.append).metrics
    check_metrics(m)
    assert any("cross-tokenizer teacher members [0] (weight 0.25): its own tokenizer" in s for s in said)
    assert any("cross-tokenizer teacher members [1] (weight 0.75): the same vocabulary" in s for s in said)
    assert any("shared vocabulary:" in s and "teacher.members.1's" in s for s in said)
    others = m["other_teachers"]["teacher.members.1"]
    assert others["members"] == [1] and others["weight"] == 0.75 and others["vocabulary"] == len(tokenizer(other))
    assert math.isfinite(others["bits_per_byte"]) and math.isfinite(m["teacher"]["bits_per_byte"])
    assert m["cross_tokenizer"]["teacher_vocabulary"] == len(tokenizer(teacher))  # members.0's group is "teacher"
    if cached:
        built = [s for s in said if s.startswith("teacher cache across tokenizers (")]
        assert len(built) == 2 and "teacher.members.0" in built[0] and "teacher.members.1" in built[1]
        assert len(m["teacher_cache"]["groups"]) == 2
    assert "train/hybrid_kl" in (tmp_path / "run" / "history.json").read_text()


def test_members_of_one_tokenizer_need_one_output_size(lm_world, tmp_path):
    from tests.conftest import save_tiny_llama

    corpus, teacher, other = lm_world
    tok = tokenizer(teacher)
    padded = save_tiny_llama(tmp_path / "padded", tok, seed=3, layers=1)
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(padded))
    config.vocab_size = len(tok) + 8  # a padded output layer: fine against the data, not inside one group
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(str(padded))
    cfg = groups_config(corpus, teacher, padded, other, cached=False)
    with pytest.raises(CompatibilityError, match=r"^teacher.members \[0, 1\]: output vocabularies of different "
                       r"sizes \(\[\d+, \d+\]\) for one tokenizer") as e:
        distill(cfg, out=tmp_path / "run", log=lambda m: None)
    assert "\n" not in str(e.value)
