"""Language-model distillation across tokenizers, wired end to end: blocks that keep their text, the teacher source
that reads the teacher's own tokens of it (kdkit.run.cross_teacher), the cross-tokenizer losses in a real run, the
invariant with one tokenizer (hybrid_kl through the real source is token_kl), and the one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.config import load_config
from kdkit.data.lm import build_lm_data, tokenize_corpus, tokenize_corpus_with_text
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.evaluate.schema import check_metrics
from kdkit.losses import LOSSES, build_loss
from kdkit.losses.hybrid_kl import shared_vocab
from kdkit.losses.token_kl import TokenKL
from kdkit.pipeline import distill, evaluate_run
from kdkit.run.cross_teacher import CrossTeacher, teacher_encoding
from kdkit.tasks.causal_lm import CausalLM
from kdkit.teachers import Teacher, TeacherEnsemble
from kdkit.types import ModelOutputs

CROSS = ("uld", "hybrid_kl", "span_likelihood")


def cross_config(corpus, teacher, student_tokenizer, tmp_path, loss: str = "uld", **sections) -> dict:
    """teacher: a model folder with its tokenizer; the student: a random-init config of the teacher's family sized
    to student_tokenizer (data.tokenizer), one decoder layer."""
    cfg = {
        "run": {"name": "cross", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "tokenizer": str(student_tokenizer),
                 "max_length": 24, "val_fraction": 0.1, "test_fraction": 0.2},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "pretrained": False,
                              "kwargs": {"num_hidden_layers": 1}}},
        "distill": {"losses": [{"name": "token_ce", "weight": 0.5}, {"name": loss, "weight": 0.5}],
                    "cache_teacher": False},
        "llm": {"prompt_tokens": 6, "report_samples": 1, "generation": {"max_new_tokens": 4}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "keep_best": "loss"},
        "eval": {"batch_size": 8, "latency_repeats": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def texts_of(corpus) -> list[str]:
    return [p.read_text() for p in sorted(corpus.glob("*.txt"))]


# ----------------------------------------------------------------------------------------------------------------
# Blocks with their text
# ----------------------------------------------------------------------------------------------------------------


def test_blocks_keep_their_exact_text_and_offsets(lm_world):
    corpus, teacher, _ = lm_world
    tok, docs = tokenizer(teacher), texts_of(corpus)
    plain, tokens = tokenize_corpus(docs, tok, 24)
    blocks, same_tokens, text = tokenize_corpus_with_text(docs, tok, 24)
    assert torch.equal(blocks, plain) and tokens == same_tokens  # the same blocks, bit for bit
    eos = tok.eos_token_id
    spanning = 0
    for ids, block_text, offsets in zip(blocks.tolist(), text.texts, text.offsets.tolist()):
        assert block_text == tok.decode(ids)  # the text is what the block's tokens stand for
        for token_id, (s, e) in zip(ids, offsets):
            piece = block_text[s:e]
            assert piece == (tok.eos_token if token_id == eos else tok.decode([token_id]))
        spanning += eos in ids
    assert spanning > 0  # some blocks hold a document boundary, and it is covered by the eos token's own text
    # A block that starts a document: its text re-tokenised gives its ids (the offsets are the tokenizer's own).
    first = text.texts[0]
    assert tok(first, add_special_tokens=False)["input_ids"] == blocks[0].tolist()


def test_texts_follow_subsets_and_a_slow_tokenizer_is_refused(lm_world):
    from transformers import PreTrainedTokenizer

    corpus, teacher, _ = lm_world
    tok = tokenizer(teacher)
    data = build_lm_data("text_folder", None, str(corpus), None, None, tok, 24, 0.1, 0.2, 0, None, with_text=True)
    for part in (data.train, data.test):
        assert len(part.texts) == len(part) and part.offsets.shape == (*part.ids.shape, 2)
        assert all(t == tok.decode(ids) for t, ids in zip(part.texts, part.ids.tolist()))

    class Slow(PreTrainedTokenizer):  # a Python tokenizer: no offsets
        eos_token_id = 0

    with pytest.raises(CompatibilityError, match="data.tokenizer .the student's. tokenizer: Slow is a slow tokenizer"):
        tokenize_corpus_with_text(["some text"], Slow.__new__(Slow), 4)


# ----------------------------------------------------------------------------------------------------------------
# The teacher source
# ----------------------------------------------------------------------------------------------------------------


def frozen_teacher(folder):
    from kdkit.models.causal_lm import load_causal_lm

    model, tok = load_causal_lm(str(folder))
    return TeacherEnsemble([Teacher(model)]), model, tok


def test_cross_source_is_the_teacher_on_its_own_tokens_of_the_block_text(lm_world):
    corpus, teacher, other = lm_world
    student_tok = tokenizer(teacher)
    ensemble, model, teacher_tok = frozen_teacher(other)
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True)
    source = CrossTeacher(ensemble, teacher_tok, student_tok, data.train, max_length=128)
    assert not source.same
    # A batch that holds a document boundary (an eos token inside a block).
    rows = [i for i in range(len(data.train)) if student_tok.eos_token_id in data.train.ids[i].tolist()][:2]
    rows += [0, 1]
    batch = data.train.collate([data.train[i] for i in rows])
    out = source(batch)
    eos_t = teacher_tok.eos_token_id
    for r, i in enumerate(rows):
        # By hand: the block's document pieces, each tokenised by the teacher, its eos between them.
        pieces = data.train.texts[i].split(student_tok.eos_token)
        ids = []
        for k, piece in enumerate(pieces):
            if k:
                ids.append(eos_t)
            ids += teacher_tok(piece, add_special_tokens=False)["input_ids"]
        n = len(ids)
        assert out.alignment.teacher.input_ids[r, :n].tolist() == ids
        assert int(out.alignment.teacher.attention_mask[r].sum()) == n
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # a "probs" ensemble gives log p
        torch.testing.assert_close(out.logits[r, :n], expected, rtol=1e-5, atol=1e-5)
        # Every aligned span is the same text on both sides, and never the block's last student token.
        text = data.train.texts[i].encode()
        t_off, s_off = out.alignment.teacher.offsets[r], out.alignment.student.offsets[r]
        spans = out.alignment.spans[r]
        assert spans and all(sp.student[1] <= 23 for sp in spans)
        for sp in spans:
            t_end = max(e for _, e in t_off[sp.teacher[0]:sp.teacher[1]])
            s_end = max(e for _, e in s_off[sp.student[0]:sp.student[1]])
            assert len(data.train.texts[i][:t_end].encode()) == sp.byte_end == len(data.train.texts[i][:s_end].encode())
            assert sp.byte_end <= len(text)
    # The eos tokens are aligned with each other: after them both models predict the next document's start.
    r = 0
    s_eos = batch.inputs[r].tolist().index(student_tok.eos_token_id)
    t_eos = out.alignment.teacher.input_ids[r].tolist().index(eos_t)
    assert any(sp.student == (s_eos, s_eos + 1) and sp.teacher == (t_eos, t_eos + 1)
               for sp in out.alignment.spans[r])


def test_teacher_encoding_cuts_at_max_length(lm_world):
    corpus, teacher, other = lm_world
    student_tok, teacher_tok = tokenizer(teacher), tokenizer(other)
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True)
    source = CrossTeacher(None, teacher_tok, student_tok, data.train, max_length=10)
    aligned = source.align(data.train.collate([data.train[0], data.train[1]]))
    assert aligned.teacher.input_ids.shape[1] == 10
    assert all(sp.teacher[1] <= 10 for row in aligned.spans for sp in row)
    full = teacher_encoding(teacher_tok, [data.train.texts[0]], aligned.student, data.train.eos_id)
    assert full.input_ids[0, :10].tolist() == aligned.teacher.input_ids[0].tolist()


def test_one_tokenizer_hybrid_kl_through_the_source_is_token_kl(lm_world):
    """The invariant through the real source: the same vocabulary, so the teacher reads the student's ids and every
    token is a span; hybrid_kl (identity map) over the spans = token_kl over the predicted positions, bit for bit."""
    corpus, teacher, _ = lm_world
    tok = tokenizer(teacher)
    ensemble, _, teacher_tok = frozen_teacher(teacher)
    data = build_lm_data("text_folder", None, str(corpus), None, None, tok, 24, 0.1, 0.2, 0, None, with_text=True)
    source = CrossTeacher(ensemble, teacher_tok, tok, data.train, max_length=128)
    assert source.same
    batch = data.train.collate([data.train[i] for i in range(8)])
    teacher_out = source(batch)
    assert torch.equal(teacher_out.alignment.teacher.input_ids, batch.inputs)
    g = torch.Generator().manual_seed(0)
    student = ModelOutputs(logits=torch.randn(8, 24, len(tok), generator=g).requires_grad_())
    for direction, temperature in (("forward", 1.0), ("reverse", 2.0)):
        hybrid = build_loss([("hybrid_kl", 1.0, {"direction": direction, "temperature": temperature})]).parts[0]
        hybrid.set_vocab_map(*shared_vocab(teacher_tok, tok))
        got = hybrid(student, teacher_out, batch)
        expected = TokenKL(direction=direction, temperature=temperature)(student, ModelOutputs(teacher_out.logits),
                                                                         batch)
        assert torch.equal(got, expected), (got.item(), expected.item())


@pytest.mark.parametrize("loss", ["hybrid_kl", "uld"])
def test_heads_at_the_aligned_positions_equal_whole_logits(lm_world, loss, monkeypatch):
    """llm.fused_head (the default): the student gives its hidden state and head (token_ce fused), the cross source's
    teacher too (every teacher part reads the aligned positions only), and each head runs at the span ends only.
    The step's loss, parts and gradients equal the whole-logits step's; no whole logits are made on either side."""
    import copy

    from kdkit.engine.step import distill_step
    from kdkit.models.causal_lm import load_causal_lm

    corpus, teacher, other = lm_world
    student_tok = tokenizer(teacher)
    ensemble, _, teacher_tok = frozen_teacher(other)
    student, _ = load_causal_lm(str(teacher))
    data = build_lm_data("text_folder", None, str(corpus), None, None, student_tok, 24, 0.1, 0.2, 0, None,
                         with_text=True)
    batch = data.train.collate([data.train[i] for i in range(6)])
    params = {"temperature": 2.0} | ({"direction": "reverse"} if loss == "hybrid_kl" else {})
    results = []
    for fuse in (False, True):
        weighted = build_loss([("token_ce", 0.4, {}), (loss, 0.6, params)])
        weighted.fuse_head = fuse
        for part in weighted.parts:
            if hasattr(part, "set_vocab_map"):
                part.set_vocab_map(*shared_vocab(teacher_tok, student_tok))
        assert weighted.fuses_head == fuse and weighted.teacher_at_positions == fuse
        source = CrossTeacher(ensemble, teacher_tok, student_tok, data.train, max_length=128,
                              hidden=weighted.teacher_at_positions)
        if fuse:  # neither side's whole logits are ever made
            monkeypatch.setattr(ModelOutputs, "with_logits", lambda self: pytest.fail("whole logits were made"))
        t_out = source(batch)
        assert (t_out.logits is None and t_out.hidden is not None) == fuse
        model = copy.deepcopy(student)
        out = distill_step(model, weighted, batch, t_out)
        out.loss.backward()
        results.append((out.loss.item(), {k: v.item() for k, v in out.parts.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, pa, ga), (b, pb, gb) = results
    assert b == pytest.approx(a, rel=1e-5) and pb.keys() == pa.keys()
    assert all(pb[k] == pytest.approx(pa[k], rel=1e-5) for k in pa)
    assert gb.keys() == ga.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-7, msg=n)


def test_one_tokenizer_span_agreement_through_the_source_is_top1_agreement(lm_world):
    """The invariant through the real source and the evaluation's loop: one tokenizer, so every token but a block's
    last real one is a span; with a prefix-free decoding span agreement is argmax equality there, and with the
    tokenizer's own texts it adds exactly the differing ids whose texts start the same (" th" vs " the")."""
    from types import SimpleNamespace

    from kdkit.evaluate.span_agreement import continuations_agree, span_agreement_counts
    from kdkit.tasks.causal_lm_eval import span_agreements

    corpus, teacher, _ = lm_world
    tok = tokenizer(teacher)
    ensemble, _, teacher_tok = frozen_teacher(teacher)
    data = build_lm_data("text_folder", None, str(corpus), None, None, tok, 24, 0.1, 0.2, 0, None, with_text=True)
    source = CrossTeacher(ensemble, teacher_tok, tok, data.test, max_length=128)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(tok), len(tok), generator=g)  # a bigram student: its logits depend on the last token

    def student(ids):
        return table[ids]

    batch = data.test.collate([data.test[i] for i in range(len(data.test))])
    out = source(batch)
    t_top = out.logits.argmax(-1)
    def decode(i):
        return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    texts = [decode(i) for i in range(len(tok))]
    # Some token whose text starts like the teacher's choice but is another token (" the" for " th").
    ids = range(len(tok))
    other = {a: b for a in ids for b in ids if a != b and continuations_agree(texts[a], texts[b])}
    half = len(data.test) // 2
    table[batch.inputs[:half], t_top[:half]] += 5.0  # that learnt the teacher's next token on half of the blocks
    rest = [(r, k) for r in range(half, len(data.test)) for k in range(24) if int(t_top[r, k]) in other]
    for r, k in rest:  # and on the others, a token that starts the same text
        table[batch.inputs[r, k], other[int(t_top[r, k])]] += 5.0
    s_top = student(batch.inputs).argmax(-1)
    lengths = batch.attention_mask.sum(1).tolist()
    positions = [(r, k) for r, n in enumerate(lengths) for k in range(n - 1)]
    plain = sum(int(s_top[r, k] == t_top[r, k]) for r, k in positions)
    text = "<{}>".format
    counts = span_agreement_counts(student(batch.inputs), out.logits, out.alignment.index, text, text)
    assert counts == (plain, len(positions))
    # The evaluation's loop (batches of 3 rows), with the tokenizer's own texts.
    prefixed = sum(int(s_top[r, k] != t_top[r, k] and continuations_agree(texts[s_top[r, k]], texts[t_top[r, k]]))
                   for r, k in positions)
    got, spans = span_agreements({"s": student}, source, SimpleNamespace(test=data.test, tokenizer=tok), 3, "cpu")
    assert spans == len(positions) and got["s"] == pytest.approx((plain + prefixed) / spans)
    assert 0 < plain < len(positions) and prefixed > 0


# ----------------------------------------------------------------------------------------------------------------
# Runs end to end
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", CROSS)
def test_cross_tokenizer_run_end_to_end(lm_world, tmp_path, loss):
    corpus, teacher, other = lm_world
    said = []
    result = distill(cross_config(corpus, teacher, other, tmp_path, loss), out=tmp_path / "run", log=said.append)
    m = result.metrics
    check_metrics(m)
    assert result.student.config.vocab_size == len(tokenizer(other))  # the student has its own vocabulary
    for key in ("teacher", "baseline_student", "student"):
        e = m[key]
        assert math.isfinite(e["bits_per_byte"]) and e["perplexity"] > 1.0
        assert "kl" not in e and "agreement" not in e  # no shared vocabulary to compare id by id
    # In their place: do the greedy continuations start the same text at the aligned span boundaries?
    assert "span_agreement" not in m["teacher"]
    for key in ("baseline_student", "student"):
        assert 0.0 <= m[key]["span_agreement"] <= 1.0
    assert m["cross_tokenizer"]["span_agreement_spans"] > 0
    # The teacher on its own tokens of the same test texts: another token count, nearly the same bytes (the first
    # token of each block is context only, and it differs between the tokenizers).
    assert m["teacher"]["tokens"] != m["student"]["tokens"]
    assert m["teacher"]["bytes"] == pytest.approx(m["student"]["bytes"], rel=0.1)
    assert m["cross_tokenizer"]["teacher_vocabulary"] == len(tokenizer(teacher))
    assert set(m["gain"]) == {"nll", "perplexity", "bits_per_byte", "bits_per_char", "accuracy", "span_agreement"}
    history = (tmp_path / "run" / "history.json").read_text()
    assert f"train/{loss}" in history
    assert any("cross-tokenizer teacher: its own tokenizer" in s for s in said)
    assert (tmp_path / "run" / "report.md").is_file()
    if loss == "uld":  # `kdkit eval` rebuilds the run (its student folder carries the student's tokenizer)
        again = evaluate_run(tmp_path / "run", log=lambda m: None)
        for key in ("teacher", "student"):
            assert again[key]["bits_per_byte"] == pytest.approx(m[key]["bits_per_byte"], rel=1e-5)


def test_one_tokenizer_cross_run_keeps_the_teacher_comparisons(lm_world, tmp_path):
    """hybrid_kl with the teacher's own tokenizer (no data.tokenizer): the teacher reads the student's ids, so the
    student may be cut from its layers and the evaluation compares them id by id as for token_kl."""
    corpus, teacher, _ = lm_world
    cfg = cross_config(corpus, teacher, teacher, tmp_path, "hybrid_kl",
                       student={"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3]}})
    del cfg["data"]["tokenizer"]
    said = []
    m = distill(cfg, out=tmp_path / "run", log=said.append).metrics
    check_metrics(m)
    assert m["teacher"]["kl"] == 0.0 and m["student"]["kl"] > 0.0 and "cross_tokenizer" not in m
    assert m["teacher"]["tokens"] == m["student"]["tokens"]
    assert any("the same vocabulary as the student's" in s for s in said)
    assert any(f"shared vocabulary: {len(tokenizer(teacher))} tokens" in s for s in said)


@pytest.mark.parametrize("cached", [False, True])
def test_sequence_level_kd_across_tokenizers_trains_on_the_teachers_text(lm_world, tmp_path, cached):
    """The teacher continues the text of 4 training prompts in its own tokens; the student trains on its own tokens
    of that text (kdkit.run.cross_sequence), through the live source and through the cache across
    tokenizers (which then holds the teacher's tokens of those texts too)."""
    corpus, teacher, other = lm_world
    cfg = cross_config(corpus, teacher, other, tmp_path, "hybrid_kl", llm={"sequence_level": 4},
                       distill={"cache_teacher": cached})
    said = []
    m = distill(cfg, out=tmp_path / "run", log=said.append).metrics
    check_metrics(m)
    assert any("sequence-level KD: the teacher continues 4 prompts" in s for s in said)
    from kdkit.generation.generate import read_generations

    records = read_generations(tmp_path / "run" / "generations.jsonl")
    teacher_tok, student_tok = tokenizer(teacher), tokenizer(other)
    assert len(records) == 4
    for r in records:  # the teacher's own tokens, decoded by its own tokenizer
        assert r["prompt"] == teacher_tok.decode(r["prompt_ids"]) and r["completion_ids"]
        assert max(r["prompt_ids"] + r["completion_ids"]) < len(teacher_tok)
    if cached:
        info = [s for s in said if "teacher cache across tokenizers:" in s]
        assert info  # built over the blocks and the teacher's texts
    assert math.isfinite(m["student"]["bits_per_byte"])
    assert len(student_tok) != len(teacher_tok)


# ----------------------------------------------------------------------------------------------------------------
# Refusals, one line each
# ----------------------------------------------------------------------------------------------------------------


def test_token_kl_with_another_tokenizer_names_the_cross_losses(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = cross_config(corpus, teacher, other, tmp_path, "token_kl")
    names = "use the cross-tokenizer losses .uld, hybrid_kl, span_likelihood."
    with pytest.raises(CompatibilityError, match=names) as e:
        distill(cfg, out=tmp_path / "run", log=lambda m: None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"llm": {"on_policy_fraction": 0.5}}, "llm.on_policy_fraction: 0.5; on-policy KD with a cross-tokenizer"),
    ],
)
def test_what_needs_the_teacher_on_the_students_tokens_is_refused(lm_world, tmp_path, sections, match):
    corpus, teacher, other = lm_world
    cfg = load_config(cross_config(corpus, teacher, other, tmp_path, **sections))
    with pytest.raises(ConfigError, match=match) as e:
        CausalLM().check(cfg)
    assert "\n" not in str(e.value)


def test_mixing_token_kl_with_a_cross_loss_is_refused(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = cross_config(corpus, teacher, other, tmp_path)
    cfg["distill"]["losses"].append({"name": "token_kl", "weight": 0.1})
    with pytest.raises(ConfigError, match="distill.losses.2.name: 'token_kl' reads the teacher on the student's"):
        CausalLM().check(load_config(cfg))


def test_teacher_layers_need_the_teachers_vocabulary(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = cross_config(corpus, teacher, other, tmp_path,
                       student={"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0]}})
    with pytest.raises(ConfigError, match="student.model.teacher_layers: the teacher's layers come with its"):
        distill(cfg, out=tmp_path / "run", log=lambda m: None)


def test_cross_losses_are_registered_and_say_so():
    assert [n for n, cls in LOSSES.items() if getattr(cls, "cross_tokenizer", False)] == list(CROSS)
    loss = build_loss([("uld", 1.0, {"temperature": 2.0}), ("span_likelihood", 0.5, {})])
    assert loss.formula() == "total = 1*uld(T=2) + 0.5*span_likelihood(tau=1)"
    assert loss.needs_teacher and not loss.fuses_head
