"""The fused head (kdkit.losses.fused_head): token losses from the student's last hidden state and output head,
chunk by chunk, equal the same losses on the materialised logits — values, parts and every parameter's gradient —
for every direction, temperature, masking, chunk size, a cached top-k teacher, a teacher given as hidden state and
head, and the step's global token count; no (B, T, V) tensor is kept for backward; and what cannot be fused falls
back to the logits."""

from __future__ import annotations

import copy

import pytest
import torch

from kdkit.engine.step import distill_step
from kdkit.losses import build_loss
from kdkit.losses.fused_head import TokenTerm, default_chunk, fused_token_loss
from kdkit.losses.token_functional import real_positions
from kdkit.models.lm_head import fusable_head
from kdkit.run.teacher import LiveTeacher
from kdkit.teachers import Teacher
from kdkit.types import Batch, SparseLogprobs

pytest.importorskip("transformers")

V = 96


def llama(layers: int, tie: bool, seed: int, vocab: int = V):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def padded_batch() -> Batch:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 12), generator=g)
    labels = ids.clone()
    labels[1, 7:] = -100
    labels[2, 3:] = -100
    ids[1, 7:] = 0
    ids[2, 3:] = 0
    return Batch(ids, labels, torch.arange(3))


def run_step(student, terms, batch, teacher, fuse: bool, source=None):
    """(loss, parts, grads by parameter name) of one distill_step with the fused head on or off."""
    student = copy.deepcopy(student)
    loss = build_loss(terms)
    loss.fuse_head = fuse
    t_out = (source or LiveTeacher(teacher, hidden=fuse))(batch) if teacher is not None or source else None
    out = distill_step(student, loss, batch, t_out)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), {k: float(v) for k, v in out.parts.items()}, grads


def assert_same(plain, fused, rtol=1e-5):
    (a, pa, ga), (b, pb, gb) = plain, fused
    assert b == pytest.approx(a, rel=rtol, abs=1e-7)
    assert pb.keys() == pa.keys()
    for k in pa:
        assert pb[k] == pytest.approx(pa[k], rel=rtol, abs=1e-7), k
    assert gb.keys() == ga.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(
    "terms",
    [
        [("token_ce", 0.3, {}), ("token_kl", 0.7, {"direction": "forward", "temperature": 2.0})],
        [("token_kl", 1.0, {"direction": "reverse", "temperature": 0.5})],
        [("token_kl", 1.0, {"direction": "jsd", "beta": 0.3, "chunk_size": 5})],
        [("token_kl", 1.0, {"direction": "jsd", "beta": 0.0, "chunk_size": 1})],
        [("token_kl", 1.0, {"direction": "tvd", "chunk_size": 7})],
        [("token_ce", 1.0, {})],
    ],
    ids=["ce+forward-T2", "reverse-T0.5", "jsd-chunk5", "jsd0-chunk1", "tvd-chunk7", "ce-alone"],
)
def test_fused_equals_the_loss_on_materialised_logits(tie, terms):
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, tie, seed=2)
    batch = padded_batch()
    plain = run_step(student, terms, batch, teacher, fuse=False)
    fused = run_step(student, terms, batch, teacher, fuse=True)
    assert plain[0] > 0
    assert_same(plain, fused)


def test_fused_divides_by_the_steps_global_count_as_the_plain_loss_does():
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, True, seed=2)
    batch = padded_batch()
    batch.num_real_tokens = torch.tensor(40.0)  # this micro-batch is a part of a bigger optimizer step
    terms = [("token_ce", 0.5, {}), ("token_kl", 0.5, {"direction": "forward"})]
    plain = run_step(student, terms, batch, teacher, fuse=False)
    fused = run_step(student, terms, batch, teacher, fuse=True)
    assert_same(plain, fused)
    batch.num_real_tokens = None  # the local count (18 predicted positions) gives a larger value
    local = run_step(student, terms, batch, teacher, fuse=True)
    real = int((batch.labels[:, 1:] != -100).sum())
    assert local[0] == pytest.approx(fused[0] * 40 / real, rel=1e-5)


def test_fused_with_the_cached_top_k_teacher_equals_the_sparse_loss_on_logits():
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, True, seed=2)
    batch = padded_batch()
    from kdkit.data.lm_cache import topk_logprobs
    from kdkit.types import ModelOutputs

    sparse = topk_logprobs(teacher(batch.inputs).logits, k=8, temperature=1.5)

    def cached(b):
        return ModelOutputs(logits=None, sparse=SparseLogprobs(sparse.ids, sparse.logprobs, sparse.rest))

    for direction in ("forward", "reverse", "tvd"):
        terms = [("token_kl", 1.0, {"direction": direction, "temperature": 1.5, "chunk_size": 4})]
        plain = run_step(student, terms, batch, None, fuse=False, source=cached)
        fused = run_step(student, terms, batch, None, fuse=True, source=cached)
        assert plain[0] > 0
        assert_same(plain, fused)


def test_fused_head_function_against_a_reference_with_a_head_bias():
    """fused_token_loss on a Linear head with bias: value and gradients (hidden, weight, bias) equal autograd
    through the whole logits, for a closed-form term and an autograd term together."""
    torch.manual_seed(0)
    b, t, h = 2, 9, 16
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(h, V).double()
    labels = torch.randint(0, V, (b, t))
    labels[0, 5:] = -100
    rows, cols = real_positions(labels, b, t, True)
    target = torch.randn(b, t, V, dtype=torch.float64)

    def ce(z, tz, r, c):
        return torch.logsumexp(z, -1) - z.gather(-1, labels[r, c + 1].unsqueeze(-1)).squeeze(-1)

    def sq(z, tz, r, c):  # any differentiable per-position function of the logits
        return ((z.softmax(-1) - tz.softmax(-1)) ** 2).sum(-1)

    n = rows.numel()
    terms = [TokenTerm(ce, float(n), 0.25, False), TokenTerm(sq, 3.0, 2.0, True)]
    total, parts = fused_token_loss(hidden, head, rows, cols, terms, lambda r, c: target[r, c], chunk_size=4)
    total.backward()
    got = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None

    z = head(hidden)[rows, cols]
    ref_parts = [ce(z, None, rows, cols).sum() / n, sq(z, target[rows, cols], rows, cols).sum() / 3.0]
    ref = 0.25 * ref_parts[0] + 2.0 * ref_parts[1]
    ref.backward()
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-12)
    assert [float(p) for p in parts] == pytest.approx([float(p) for p in ref_parts], rel=1e-12)
    for mine, theirs in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    assert got[0][0, 5:].abs().sum() == 0  # masked positions get no gradient


def test_no_full_logits_are_kept_for_backward():
    """With the fused head no activation of (real positions × V) size is saved for backward; the plain path saves
    one."""
    vocab = 1024  # large beside the model's own activations (B × T × 64)
    teacher = Teacher(llama(2, False, seed=1, vocab=vocab))
    student = llama(1, True, seed=2, vocab=vocab)
    batch = padded_batch()
    n_real = int((batch.labels[:, 1:] != -100).sum())

    def biggest_saved(fuse: bool) -> int:
        sizes = []
        loss = build_loss([("token_ce", 0.5, {}), ("token_kl", 0.5, {"chunk_size": 4})])
        loss.fuse_head = fuse
        model = copy.deepcopy(student)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(x):  # parameters are saved by reference (no memory of their own): not counted
            sizes.append(0 if x.untyped_storage().data_ptr() in weights else x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            distill_step(model, loss, batch, LiveTeacher(teacher, hidden=fuse)(batch))
        return max(sizes)

    assert biggest_saved(False) >= n_real * vocab
    assert biggest_saved(True) < n_real * vocab // 4


def test_a_model_whose_logits_are_not_its_head_falls_back_to_the_logits():
    """A family whose logits are more than hidden @ Wᵀ (here scaled by 2, as soft-capping or a logit scale would
    change them) fails the first call's check and trains on its own logits: the same loss as with fusing off."""
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, input_ids=None, logits_to_keep=0, **kw):
            out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kw)
            out.logits = out.logits * 2
            return out

    base = llama(1, True, seed=2)
    student = Scaled(base.config)
    student.load_state_dict(base.state_dict())
    assert fusable_head(student) is not None  # it looks fusable until the check
    teacher = Teacher(llama(2, False, seed=1))
    terms = [("token_ce", 0.5, {}), ("token_kl", 0.5, {})]
    batch = padded_batch()
    fused = run_step(student, terms, batch, teacher, fuse=True)
    plain = run_step(student, terms, batch, teacher, fuse=False)
    assert_same(plain, fused)


def test_what_cannot_be_fused_runs_on_logits():
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, True, seed=2)
    batch = padded_batch()
    mixed = [("token_ce", 0.5, {"shift": False}), ("token_kl", 0.5, {})]  # two shift settings: no shared positions
    assert_same(run_step(student, mixed, batch, teacher, False), run_step(student, mixed, batch, teacher, True))
    padded_vocab = [("token_kl", 1.0, {"vocab_size": V - 6})]
    assert_same(run_step(student, padded_vocab, batch, teacher, False),
                run_step(student, padded_vocab, batch, teacher, True))
    assert fusable_head(torch.nn.Linear(4, 4)) is None  # not a language model


def test_a_hidden_state_teacher_beside_a_student_that_gives_logits():
    """The teacher gives hidden state and head; a loss that cannot fuse reads its logits, made on demand."""
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, True, seed=2)
    batch = padded_batch()
    terms = [("token_kl", 1.0, {"vocab_size": V})]  # a loss with vocab_size does not fuse
    source = LiveTeacher(teacher, hidden=True)
    assert source(batch).hidden is not None
    assert_same(run_step(student, terms, batch, teacher, False), run_step(student, terms, batch, None, False, source))


def test_fused_under_no_grad_gives_the_value():
    teacher = Teacher(llama(2, False, seed=1))
    student = llama(1, True, seed=2)
    batch = padded_batch()
    loss = build_loss([("token_ce", 0.5, {}), ("token_kl", 0.5, {"direction": "jsd"})])
    with torch.no_grad():
        fused = distill_step(student, loss, batch, LiveTeacher(teacher, hidden=True)(batch)).loss
        loss.fuse_head = False
        plain = distill_step(student, loss, batch, LiveTeacher(teacher)(batch)).loss
    assert float(fused) == pytest.approx(float(plain), rel=1e-5)


def test_default_chunk_is_a_few_megabytes_of_logits_on_cpu():
    assert default_chunk(49_152, torch.device("cpu")) == (1 << 23) // 49_152
    assert default_chunk(10**9, torch.device("cpu")) == 16


def test_training_with_the_fused_head_ends_where_training_on_logits_ends():
    """Three optimizer steps with gradient accumulation (2 micro-batches) through kdkit's engine."""
    from kdkit.data.lm import LMData
    from kdkit.engine import TrainOptions, train

    teacher = Teacher(llama(2, False, seed=1))
    g = torch.Generator().manual_seed(3)
    data = LMData(torch.randint(1, V, (12, 10), generator=g), torch.randint(4, 11, (12,), generator=g), pad_id=0)
    finals = []
    for fuse in (False, True):
        student = llama(1, True, seed=2)
        loss = build_loss([("token_ce", 0.2, {}), ("token_kl", 0.8, {"direction": "forward", "temperature": 2.0})])
        loss.fuse_head = fuse
        opts = TrainOptions(epochs=1, batch_size=4, grad_accum=2, optimizer="adamw", lr=1e-2, schedule="constant",
                            grad_clip=1.0)
        train(student, loss, data, opts, teacher=LiveTeacher(teacher, hidden=fuse), seed=0, device="cpu",
              progress=False, log=lambda _: None)
        finals.append(student.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-4, atol=1e-5, msg=k)  # Adam: ~lr × 1e-4


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_closed_form_forward_kl_equals_autograd_with_ruled_out_ids(temperature):
    """forward_kl_with_grad (the closed form the fused and chunked paths use) against autograd through
    per_position_divergence, with ids ruled out (−inf) by the teacher only, by both, and an underflowing p."""
    from kdkit.losses.token_functional import forward_kl_with_grad, per_position_divergence

    torch.manual_seed(0)
    z = torch.randn(5, 12, dtype=torch.float64) * 3
    t = torch.randn(5, 12, dtype=torch.float64) * 3
    t[0, 3] = float("-inf")  # the teacher rules an id out
    t[1, 4] = z[1, 4] = float("-inf")  # both do
    t[2, 5] = -800.0  # p underflows to 0 while log p is finite
    values, grad = forward_kl_with_grad(z, t, temperature)
    leaf = z.clone().requires_grad_(True)
    ref = per_position_divergence(leaf, t, "forward", temperature=temperature)
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(values, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
