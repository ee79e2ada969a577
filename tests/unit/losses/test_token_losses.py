"""Token-level LM distillation losses (kdkit.losses.token_functional, TokenKL) against independent references."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from kdkit.errors import CompatibilityError
from kdkit.losses import WeightedLoss
from kdkit.losses import token_functional as Ft
from kdkit.losses.token_kl import TokenKL
from kdkit.types import Batch, ModelOutputs

B, T, V = 2, 5, 11
CASES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0), ("tvd", 0.5)]


def _logits(seed: int = 0, b: int = B, t: int = T, v: int = V, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).requires_grad_()
    teacher = scale * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a masked prompt
    labels[1, min(3, t - 1)] = -100  # a hole in the middle
    return student, teacher, labels


# ----------------------------------------------------------------------------------------------------------------
# An independent reference: plain Python loops in float64, straight from the definitions.
# ----------------------------------------------------------------------------------------------------------------


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    es = [math.exp(x - top) for x in xs]
    z = sum(es)
    return [e / z for e in es]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _divergence(p: list[float], q: list[float], direction: str, beta: float) -> float:
    if direction == "forward" or (direction == "jsd" and beta == 0.0):
        return _kl(p, q)
    if direction == "reverse" or (direction == "jsd" and beta == 1.0):
        return _kl(q, p)
    if direction == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def _reference(student, teacher, labels, direction, beta=0.5, temperature=1.0, shift=True, count=None) -> float:
    s, t, lab = student.detach().double().tolist(), teacher.double().tolist(), labels.tolist()
    total, n = 0.0, 0
    for b in range(len(s)):
        for i in range(len(s[b]) - 1 if shift else len(s[b])):
            if lab[b][i + 1 if shift else i] == -100:
                continue
            p = _softmax([x / temperature for x in t[b][i]])
            q = _softmax([x / temperature for x in s[b][i]])
            total += temperature**2 * _divergence(p, q, direction, beta)
            n += 1
    return total / (count if count is not None else max(n, 1))


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_the_float64_loop_reference(direction, beta, temperature):
    student, teacher, labels = _logits()
    got = Ft.token_divergence(student, teacher, labels, direction, beta, temperature)
    want = _reference(student, teacher, labels, direction, beta, temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=1e-6, rel=1e-6)
    chunked = Ft.token_divergence(student, teacher, labels, direction, beta, temperature, chunk_size=3)
    assert chunked.item() == pytest.approx(want, abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("direction,beta", CASES)
def test_unshifted_labels_match_the_reference(direction, beta):
    student, teacher, labels = _logits(1)
    got = Ft.token_divergence(student, teacher, labels, direction, beta, shift=False)
    assert got.item() == pytest.approx(_reference(student, teacher, labels, direction, beta, shift=False), abs=1e-6)


def test_named_wrappers_are_the_directions():
    student, teacher, labels = _logits(2)
    for fn, direction in [(Ft.forward_kl, "forward"), (Ft.reverse_kl, "reverse"), (Ft.tvd, "tvd")]:
        assert fn(student, teacher, labels, temperature=2.0).item() == pytest.approx(
            _reference(student, teacher, labels, direction, temperature=2.0), abs=1e-6
        )
    assert Ft.jsd(student, teacher, labels, beta=0.3).item() == pytest.approx(
        _reference(student, teacher, labels, "jsd", 0.3), abs=1e-6
    )


def test_hand_computed_case_on_three_tokens():
    # One position (shift=False), teacher p = (1/2, 1/4, 1/4), student q = (1/4, 1/2, 1/4), as log-probabilities.
    p, q = [0.5, 0.25, 0.25], [0.25, 0.5, 0.25]
    teacher = torch.tensor([[[math.log(x) for x in p]]])
    student = torch.tensor([[[math.log(x) for x in q]]])
    ln2, ln43, ln23 = math.log(2), math.log(4 / 3), math.log(2 / 3)

    def value(direction, beta=0.5, temperature=1.0):
        return Ft.token_divergence(student, teacher, None, direction, beta, temperature, shift=False).item()

    # KL(p‖q) = ½ ln(½ / ¼) + ¼ ln(¼ / ½) + ¼ ln 1 = ½ ln 2 − ¼ ln 2 = ¼ ln 2; KL(q‖p) is the same by symmetry here.
    assert value("forward") == pytest.approx(0.25 * ln2, abs=1e-7)
    assert value("reverse") == pytest.approx(0.25 * ln2, abs=1e-7)
    # TV = ½ (¼ + ¼ + 0) = ¼.
    assert value("tvd") == pytest.approx(0.25, abs=1e-7)
    # β = ½: m = (3/8, 3/8, 1/4); KL(p‖m) = ½ ln(4/3) + ¼ ln(2/3) = KL(q‖m); JSD = ½·that + ½·that.
    assert value("jsd") == pytest.approx(0.5 * ln43 + 0.25 * ln23, abs=1e-7)
    # β = ¼ (teacher's share): m = ¼ p + ¾ q = (5/16, 7/16, 1/4).
    m = [5 / 16, 7 / 16, 1 / 4]
    kl_pm = 0.5 * math.log(0.5 / m[0]) + 0.25 * math.log(0.25 / m[1])
    kl_qm = 0.25 * math.log(0.25 / m[0]) + 0.5 * math.log(0.5 / m[1])
    assert value("jsd", beta=0.25) == pytest.approx(0.25 * kl_pm + 0.75 * kl_qm, abs=1e-7)
    # Temperature 2: p ∝ (√2, 1, 1), q ∝ (1, √2, 1), and the value is scaled by T² = 4.
    r = math.sqrt(2)
    p2 = [r / (r + 2), 1 / (r + 2), 1 / (r + 2)]
    q2 = [1 / (r + 2), r / (r + 2), 1 / (r + 2)]
    assert value("forward", temperature=2.0) == pytest.approx(4 * _kl(p2, q2), abs=1e-6)


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_zero_when_the_student_is_the_teacher_and_never_negative(direction, beta, chunk_size):
    student, teacher, labels = _logits(3)
    same = Ft.token_divergence(teacher, teacher.clone(), labels, direction, beta, chunk_size=chunk_size)
    assert same.abs().item() < 1e-6
    for seed in range(4):
        s, t, lab = _logits(10 + seed, scale=5.0)
        assert Ft.token_divergence(s, t, lab, direction, beta, chunk_size=chunk_size).item() >= 0.0


def test_beta_weights_the_teachers_end():
    student, teacher, labels = _logits(4)

    def jsd(s, t, beta):
        return Ft.token_divergence(s, t, labels, "jsd", beta).item()

    forward = Ft.token_divergence(student, teacher, labels, "forward").item()
    reverse = Ft.token_divergence(student, teacher, labels, "reverse").item()
    # The ends are defined as TRL defines them: β = 0 is KL(teacher ‖ student), β = 1 is KL(student ‖ teacher) ...
    assert jsd(student, teacher, 0.0) == pytest.approx(forward, rel=1e-6)
    assert jsd(student, teacher, 1.0) == pytest.approx(reverse, rel=1e-6)
    # ... which are the limits of JSD_β / β and JSD_β / (1 − β) (the JSD itself vanishes at both ends).
    eps = 1e-3
    assert jsd(student, teacher, eps) / eps == pytest.approx(forward, rel=0.02)
    assert jsd(student, teacher, 1 - eps) / eps == pytest.approx(reverse, rel=0.02)
    # Swapping the two sides swaps the ends: JSD_β(p, q) = JSD_{1−β}(q, p).
    assert jsd(student, teacher, 0.2) == pytest.approx(jsd(teacher, student.detach(), 0.8), rel=1e-5)


def test_shift_drops_the_position_before_a_masked_last_label():
    student, teacher, labels = _logits(5)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    labels[0, -1] = -100  # row 0: the last token is not a target, so the logits at T−2 predict nothing
    loss = Ft.token_divergence(student, teacher, labels, "forward")
    # The same by hand with shift=False: logits 0..T−2 against labels 1..T−1.
    manual = Ft.token_divergence(student[:, :-1], teacher[:, :-1], labels[:, 1:], "forward", shift=False)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # Positions counted: row 0 has T−2, row 1 has T−1.
    assert Ft.count_real_tokens(labels) == (T - 2) + (T - 1)
    rows, cols = Ft.real_positions(labels, B, T)
    assert (0, T - 2) not in set(zip(rows.tolist(), cols.tolist()))
    # The logits at T−2 of row 0 and at T−1 of every row are never read: garbage there changes nothing.
    garbage_s, garbage_t = student.detach().clone(), teacher.clone()
    garbage_s[0, T - 2] = float("nan")
    garbage_s[:, T - 1] = float("inf")
    garbage_t[0, T - 2] = 1e4
    garbage_t[:, T - 1] = float("nan")
    assert Ft.token_divergence(garbage_s, garbage_t, labels, "forward").item() == pytest.approx(loss.item(), rel=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
def test_masked_positions_change_neither_the_loss_nor_the_gradients(direction, chunk_size):
    student, teacher, labels = _logits(6)
    loss = Ft.token_divergence(student, teacher, labels, direction, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, student)
    # Positions whose logits are never read: row 0 logits 0 (predicts masked label 1), row 1 logits 2 (label 3
    # masked), and the last position of each row.
    unread = torch.zeros(B, T, dtype=torch.bool)
    unread[0, 0] = unread[1, 2] = True
    unread[:, -1] = True
    messy_s = student.detach().clone()
    messy_s[unread] = float("nan")
    messy_s = messy_s.requires_grad_()
    messy_t = teacher.clone()
    messy_t[unread] = float("-inf")
    loss2 = Ft.token_divergence(messy_s, messy_t, labels, direction, chunk_size=chunk_size)
    (grad2,) = torch.autograd.grad(loss2, messy_s)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-7)
    assert torch.equal(grad2[~unread], grad[~unread])
    assert not grad2[unread].any() and not grad[unread].any()


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ids_ruled_out_with_minus_infinity_add_nothing(direction, beta, chunk_size):
    # A vocabulary id with logit −inf (a masked or padding id) has probability 0: 0 · log 0 = 0, not NaN.
    student, teacher, labels = _logits(21)
    s = student.detach().clone()
    s[..., 0] = float("-inf")
    t = teacher.clone()
    t[..., 0] = float("-inf")
    if direction not in ("reverse",) and not (direction == "jsd" and beta == 1.0):
        t[..., 1] = float("-inf")  # the teacher alone rules id 1 out: finite unless KL(q ‖ p) is asked for
    s.requires_grad_()
    loss = Ft.token_divergence(s, t, labels, direction, beta, chunk_size=chunk_size)
    assert loss.item() == pytest.approx(_reference(s, t, labels, direction, beta), abs=1e-6, rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("direction,beta", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_equals_unchunked_in_value_and_gradient(direction, beta, chunk_size):
    student, teacher, labels = _logits(7)
    full = Ft.token_divergence(student, teacher, labels, direction, beta, 2.0)
    (g_full,) = torch.autograd.grad(full, student)
    chunked = Ft.token_divergence(student, teacher, labels, direction, beta, 2.0, chunk_size=chunk_size)
    (g_chunked,) = torch.autograd.grad(chunked, student)
    assert chunked.item() == pytest.approx(full.item(), abs=1e-6, rel=1e-6)
    assert torch.allclose(g_chunked, g_full, atol=1e-6, rtol=1e-6)
    # A weight on the loss scales the gradient as usual.
    (g_weighted,) = torch.autograd.grad(
        0.3 * Ft.token_divergence(student, teacher, labels, chunk_size=chunk_size), student
    )
    (g_ref,) = torch.autograd.grad(0.3 * Ft.token_divergence(student, teacher, labels), student)
    assert torch.allclose(g_weighted, g_ref, atol=1e-7)


def test_chunked_without_grad_and_a_student_that_needs_none():
    student, teacher, labels = _logits(8)
    want = Ft.token_divergence(student, teacher, labels).item()
    with torch.no_grad():
        assert Ft.token_divergence(student, teacher, labels, chunk_size=2).item() == pytest.approx(want, rel=1e-6)
    value = Ft.token_divergence(student.detach(), teacher, labels, chunk_size=2)
    assert not value.requires_grad and value.item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd", "tvd"])
def test_gradcheck_in_float64(direction):
    student, teacher, labels = _logits(9, b=2, t=4, v=4)
    s = student.detach().double().requires_grad_()
    t = teacher.double()

    def fn(x):
        return Ft.token_divergence(x, t, labels, direction, 0.3, 1.5)

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradient_goes_only_into_the_student(chunk_size):
    student, teacher, labels = _logits(10)
    teacher.requires_grad_()
    Ft.token_divergence(student, teacher, labels, "jsd", chunk_size=chunk_size).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_teacher_logits_made_under_inference_mode(chunk_size):
    student, teacher, labels = _logits(11)
    with torch.inference_mode():
        frozen = teacher.clone()
    Ft.token_divergence(student, frozen, labels, "reverse", chunk_size=chunk_size).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("direction", ["forward", "jsd"])
def test_bf16_logits_give_the_float32_loss_of_the_upcast_logits(direction, chunk_size):
    student, teacher, labels = _logits(12)
    s16 = student.detach().bfloat16().requires_grad_()
    t16 = teacher.bfloat16()
    got = Ft.token_divergence(s16, t16, labels, direction, chunk_size=chunk_size)
    want = Ft.token_divergence(s16.detach().float(), t16.float(), labels, direction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    got.backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad).all()


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_global_count_makes_accumulation_exact(chunk_size):
    # 4 sequences with unequal numbers of real tokens, as 3 micro-batches of an optimizer step.
    g = torch.Generator().manual_seed(13)
    student = torch.randn(4, 6, V, generator=g, requires_grad=True)
    teacher = torch.randn(4, 6, V, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    labels[0, :4] = -100
    labels[2, :] = -100  # no real token at all
    labels[3, 5] = -100
    whole = Ft.token_divergence(student, teacher, labels, "jsd", chunk_size=chunk_size)
    (g_whole,) = torch.autograd.grad(whole, student)
    count = sum(Ft.count_real_tokens(labels[sl]) for sl in (slice(0, 1), slice(1, 3), slice(3, 4)))
    assert count == Ft.count_real_tokens(labels) == 2 + 5 + 0 + 4  # labels 1..5 of each row
    total = 0.0
    for sl in (slice(0, 1), slice(1, 3), slice(3, 4)):
        total = total + Ft.token_divergence(
            student[sl], teacher[sl], labels[sl], "jsd", num_real_tokens=count, chunk_size=chunk_size
        )
    (g_accum,) = torch.autograd.grad(total, student)
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(g_accum, g_whole, atol=1e-7)
    # The count may come as a tensor (an all-reduced count stays on the device, no sync).
    as_tensor = Ft.token_divergence(student, teacher, labels, "jsd", num_real_tokens=torch.tensor(count))
    assert as_tensor.item() == pytest.approx(whole.item(), rel=1e-6)
    # The data discriminates: averaging the micro-batches' own means (each divided by its local count) is not it.
    naive = sum(
        Ft.token_divergence(student[sl], teacher[sl], labels[sl], "jsd").item() for sl in (slice(0, 1), slice(1, 4))
    )
    assert naive / 2 != pytest.approx(whole.item(), rel=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_no_real_token_gives_zero_with_a_gradient_path(chunk_size):
    student, teacher, _ = _logits(14)
    labels = torch.full((B, T), -100)
    loss = Ft.token_divergence(student, teacher, labels, chunk_size=chunk_size)
    loss.backward()
    assert loss.item() == 0.0 and not student.grad.any()


def test_bad_arguments_fail_clearly():
    student, teacher, labels = _logits(15)
    with pytest.raises(ValueError, match="direction"):
        Ft.token_divergence(student, teacher, labels, "sideways")
    with pytest.raises(ValueError, match="beta"):
        Ft.token_divergence(student, teacher, labels, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Ft.token_divergence(student, teacher, labels, temperature=0)
    with pytest.raises(ValueError, match="shape"):
        Ft.token_divergence(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="labels"):
        Ft.token_divergence(student, teacher, labels[:, :-1])
    with pytest.raises(ValueError, match="num_real_tokens"):
        Ft.token_divergence(student, teacher, labels, num_real_tokens=1)


# ----------------------------------------------------------------------------------------------------------------
# TRL's generalized_jsd_loss, the peer's own source (dev-only; skipped without trl). Importing
# trl.experimental.gkd pulls in the whole Trainer stack (~10 s on 2 cores), too slow for this tier, so the test
# compiles just that one static function from the installed file.
# ----------------------------------------------------------------------------------------------------------------


def _trl_generalized_jsd_loss():
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl (a dev-only peer) is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(root.rglob("gkd_trainer.py")) + sorted(root.rglob("*.py"))
    for path in candidates:
        text = path.read_text(encoding="utf-8")
        if "def generalized_jsd_loss" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
                node.decorator_list = []
                namespace = {"torch": torch, "F": torch.nn.functional}
                exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
                return namespace["generalized_jsd_loss"]
    pytest.skip("this trl has no generalized_jsd_loss")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trls_generalized_jsd_loss(beta, temperature):
    trl_loss = _trl_generalized_jsd_loss()
    student, teacher, labels = _logits(16)
    ours = Ft.token_divergence(student, teacher, labels, "jsd", beta, temperature)
    # TRL's GKDTrainer.compute_loss shifts (logits[:, :-1] against labels[:, 1:]) before calling it; it computes
    # in the input dtype (float64 here) and does not multiply by T².
    theirs = trl_loss(
        student.detach()[:, :-1].double(),
        teacher[:, :-1].double(),
        labels=labels[:, 1:],
        beta=beta,
        temperature=temperature,
    )
    assert ours.item() == pytest.approx(temperature**2 * theirs.item(), abs=1e-6, rel=1e-6)
    count = Ft.count_real_tokens(labels) + 7
    ours_global = Ft.token_divergence(student, teacher, labels, "jsd", beta, temperature, num_real_tokens=count)
    theirs_global = trl_loss(
        student.detach()[:, :-1].double(),
        teacher[:, :-1].double(),
        labels=labels[:, 1:],
        beta=beta,
        temperature=temperature,
        num_items_in_batch=count,
    )
    assert ours_global.item() == pytest.approx(temperature**2 * theirs_global.item(), abs=1e-6, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The TokenKL module.
# ----------------------------------------------------------------------------------------------------------------


def _outputs(student, teacher, labels):
    batch = Batch(inputs=labels.clamp_min(0), labels=labels, index=torch.arange(labels.shape[0]))
    return ModelOutputs(student), ModelOutputs(teacher), batch


def test_token_kl_module_is_the_function():
    student, teacher, labels = _logits(17)
    s, t, batch = _outputs(student, teacher, labels)
    for direction, beta in CASES:
        loss = TokenKL(direction, beta=beta, temperature=2.0, chunk_size=3)
        want = Ft.token_divergence(student, teacher, labels, direction, beta, 2.0)
        assert loss(s, t, batch).item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
    assert TokenKL().describe() == "token_kl(forward, T=1)"
    assert TokenKL("jsd", beta=0.1, temperature=2).describe() == "token_kl(jsd, beta=0.1, T=2)"
    assert TokenKL.name == "token_kl"


def test_token_kl_global_count_from_the_constructor_or_the_call():
    student, teacher, labels = _logits(18)
    s, t, batch = _outputs(student, teacher, labels)
    want = Ft.token_divergence(student, teacher, labels, num_real_tokens=50).item()
    assert TokenKL(num_real_tokens=50)(s, t, batch).item() == pytest.approx(want, rel=1e-6)
    assert TokenKL()(s, t, batch, num_real_tokens=50).item() == pytest.approx(want, rel=1e-6)


def test_token_kl_in_a_weighted_loss_trains_only_the_student():
    student, teacher, labels = _logits(19)
    teacher.requires_grad_()
    s, t, batch = _outputs(student, teacher, labels)
    out = WeightedLoss([(0.7, TokenKL("reverse", chunk_size=4))])(s, t, batch)
    out.loss.backward()
    assert set(out.parts) == {"token_kl"}
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_token_kl_padded_vocabulary():
    # Both output layers padded past the V real ids, to different widths (as Qwen's 151936 vs 152064 over one
    # 151665-token tokenizer): vocab_size=V compares the shared ids only.
    student, teacher, labels = _logits(20)
    g = torch.Generator().manual_seed(0)
    student_padded = torch.cat([student.detach(), torch.randn(B, T, 1, generator=g)], dim=-1).requires_grad_()
    teacher_padded = torch.cat([teacher, torch.randn(B, T, 3, generator=g)], dim=-1)
    s, t, batch = _outputs(student_padded, teacher_padded, labels)
    with pytest.raises(CompatibilityError, match=f"{V + 1} ids, teacher logits {V + 3}"):
        TokenKL()(s, t, batch)
    for chunk_size in (None, 2):
        value = TokenKL(vocab_size=V, chunk_size=chunk_size)(s, t, batch)
        assert value.item() == pytest.approx(Ft.token_divergence(student, teacher, labels).item(), rel=1e-6)
        (grad,) = torch.autograd.grad(value, student_padded)
        (want,) = torch.autograd.grad(Ft.token_divergence(student, teacher, labels), student)
        assert torch.allclose(grad[..., :V], want, atol=1e-7) and not grad[..., V:].any()


def test_token_kl_rejects_bad_parameters():
    for kwargs in ({"direction": "both"}, {"beta": -0.1}, {"temperature": 0}, {"chunk_size": 0}, {"vocab_size": 0}):
        with pytest.raises(ValueError):
            TokenKL(**kwargs)
