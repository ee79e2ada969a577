"""Universal Logit Distillation across tokenizers: the L1 distance between sorted probability vectors.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"
(arXiv 2402.12030). Two vocabularies share no ids, so the teacher's and the student's next-token distributions cannot
be compared id by id. ULD compares them as distributions of probability values: with both vectors sorted in
descending order and the shorter zero-padded to the longer vocabulary,

    ULD(p, q) = Σ_i | p_(i) − q_(i) |

the closed form of the Wasserstein-1 distance that the paper derives (its eq. 5, with a uniform transport cost and
a sum over the vocabulary). It is zero when the two distributions are the same up to a renaming of the ids, and
symmetric.

kdkit's conventions (as kdkit.losses.token_functional): logits upcast to float32 (float64 kept) before the softmax;
p = softmax(teacher / T) and q = softmax(student / T), and the distance is multiplied by T² like every kdkit token
loss (the paper uses T = 1; at T ≠ 1 this is T² times TRL's GOLD ULD term); the teacher is detached; the loss is the
sum over the real aligned positions divided by their number, or by the global count num_real when given.

Positions come from the alignment (kdkit.data.align.SpanIndex): each span's last token on each side, where both
models have read the same text, so both predict what follows it.

A teacher read from the offline cache across tokenizers (kdkit.data.cross_cache: teacher.sparse, its top-k log-probs
and the log of the rest mass r at the cache's temperature, which must be the loss's) knows its k largest values but
not how r is spread over the other ids. uld_topk_per_position compares the sorted top-k one by one and the rest as
one mass against the student's mass past its k largest values:

    ULD_k(p, q) = Σ_{i ≤ k} | p_(i) − q_(i) |  +  | r − Σ_{i > k} q_(i) |

By the triangle inequality this is a lower bound of ULD(p, q) that coarsens both tails to one bucket (as token_kl's
k + 1 buckets do), and it is ULD itself when k = V_teacher (r = 0; the narrower side zero-padded). The teacher's
k + 1 masses are renormalised first (they are stored in float16).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdkit.data.align import AlignedBatch, take
from kdkit.losses import token_functional as Ft
from kdkit.losses.at_positions import logits_at
from kdkit.losses.base import Loss, positive
from kdkit.types import Batch, ModelOutputs, SparseLogprobs


def sorted_desc(x: torch.Tensor) -> torch.Tensor:
    """x sorted descending along its last dimension, with x's gradient (a gather by the sorting order). On the CPU
    the order comes from numpy (its vectorised sorts: ~3× torch.sort's speed with the order, ~10× for values alone,
    float32 rows of 4k on one thread), elsewhere from torch.sort; the values are the same either way."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() == 0:
        return x.sort(dim=-1, descending=True).values
    if not x.requires_grad:
        return -torch.from_numpy(np.sort(-x.detach().numpy(), axis=-1))
    return x.gather(-1, torch.from_numpy(_order_desc(x.detach().numpy())))


def _order_desc(x: np.ndarray) -> np.ndarray:
    """The descending order of each row of x (argsort), ties in any order. float32 rows of fewer than 2³¹ values are
    ordered by one sort of int64 keys, each a value's bits (made monotone: negative floats' magnitude bits flipped)
    above its column: numpy sorts integers with its vectorised sort, ~1.7× its float argsort."""
    if x.dtype != np.float32 or x.shape[-1] >= 2**31:
        return np.argsort(-x, axis=-1)
    bits = np.ascontiguousarray(x).view(np.int32)
    monotone = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)
    keys = np.sort((monotone << 32) | np.arange(x.shape[-1], dtype=np.int64), axis=-1)
    return (keys[..., ::-1] & 0xFFFFFFFF).astype(np.int64)


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_i |p_(i) − q_(i)|, p and q sorted descending, the narrower zero-padded: (N, V₁), (N, V₂) → (N,).

    For inputs ≥ 0 (probabilities) the padded part needs no sort: past the narrower width k the other side is 0, so
    its terms sum to the wider side's mass outside its k largest values. Only those k are found (topk), which on a
    49k-token teacher against a few-thousand-token student is ~5× cheaper than sorting the whole row; values and
    gradients equal the padded full sort's (tests/unit/losses/test_uld.py)."""
    wide, narrow = (p, q) if p.shape[-1] >= q.shape[-1] else (q, p)
    k = narrow.shape[-1]
    narrow_sorted = sorted_desc(narrow)
    if k == wide.shape[-1]:
        return (sorted_desc(wide) - narrow_sorted).abs().sum(-1)
    top = wide.topk(k, dim=-1, sorted=True).values
    tail = (wide.sum(-1) - top.sum(-1)).clamp_min(0)  # Σ of the wide side's values past its k largest: |x − 0|
    return (top - narrow_sorted).abs().sum(-1) + tail


def topk_sorted_l1(
    p_top: torch.Tensor, p_tail: torch.Tensor, q: torch.Tensor, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_{i ≤ c} |p_(i) − q_(i)| + |p_tail − Σ_{i > c} q_(i)| per row (module docstring, ULD_k), q sorted descending.

    p_top (N, k): one side's known values, sorted descending, of which the first count (N,) are real (default all k;
    the slots past count are ignored); p_tail (N,): that side's mass outside them; q (N, V) the other side's whole
    vector (≥ 0), whose c largest values are compared one by one and the rest summed. (N,)."""
    k, v = p_top.shape[-1], q.shape[-1]
    if k <= v:
        q_top = q.topk(k, dim=-1, sorted=True).values
    else:  # a narrower student: its sorted values, zero-padded
        q_top = F.pad(sorted_desc(q), (0, k - v))
    keep = torch.ones_like(p_top, dtype=torch.bool) if count is None else (
        torch.arange(k, device=p_top.device)[None, :] < count.to(p_top.device)[:, None]
    )
    head = torch.where(keep, (p_top - q_top).abs(), 0.0).sum(-1)
    q_tail = (q.sum(-1) - torch.where(keep, q_top, 0.0).sum(-1)).clamp_min(0)
    return head + (p_tail - q_tail).abs()


def uld_topk_per_position(
    student_logits: torch.Tensor, logprobs: torch.Tensor, rest: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · ULD_k of a top-k teacher (module docstring) per row: (N, V_s), (N, k), (N,) → (N,) float32. logprobs and
    rest are the teacher's at temperature T already (the cache's); T divides the student's logits."""
    t = float(temperature)
    q = F.softmax(Ft._upcast(student_logits) / t, dim=-1)
    p = Ft._teacher_buckets(logprobs, rest, q.dtype).exp()  # (N, k + 1), renormalised
    k = logprobs.shape[-1]
    p_top = p[:, :k].sort(dim=-1, descending=True).values
    return topk_sorted_l1(p_top, p[:, k], q) * (t * t)


def uld_per_position(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · ULD(softmax(teacher / T), softmax(student / T)) per row: (N, V_student), (N, V_teacher) → (N,) float32."""
    t = float(temperature)
    q = F.softmax(Ft._upcast(student_logits) / t, dim=-1)
    p = F.softmax(Ft._upcast(teacher_logits.detach()) / t, dim=-1)
    return sorted_l1(p, q) * (t * t)


def uld_loss(
    student_logits: torch.Tensor | ModelOutputs,
    teacher_logits: torch.Tensor | ModelOutputs,
    student_positions: torch.Tensor,
    teacher_positions: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    num_real: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ over real aligned positions of uld_per_position / N.

    student_logits (B, T_s, V_s), teacher_logits (B, T_t, V_t), or either side's ModelOutputs with its hidden state
    and head (kdkit.losses.at_positions: the head runs at the compared positions only); student_positions,
    teacher_positions, mask (B, S): the positions compared (SpanIndex.student_last, teacher_last) and which are real.
    N = the number of real positions, or num_real (a global count over micro-batches and processes). No real
    position: 0 (with a graph).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    s = logits_at(student_logits, student_positions, mask)
    t = logits_at(teacher_logits, teacher_positions, mask).detach()
    denom = Ft.denominator(s.shape[0], num_real, s.device)
    return uld_per_position(s, t, temperature).sum() / denom


def uld_topk_loss(
    student_logits: torch.Tensor | ModelOutputs,
    sparse: SparseLogprobs,
    student_positions: torch.Tensor,
    teacher_positions: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    num_real: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """uld_loss with a top-k teacher (sparse: ids, logprobs (B, T_t, k), rest (B, T_t)): Σ over real aligned
    positions of uld_topk_per_position / N."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    s = logits_at(student_logits, student_positions, mask)
    device = s.device
    lp = take(sparse.logprobs.detach().to(device), teacher_positions, mask)
    rest = take(sparse.rest.detach().to(device), teacher_positions, mask)
    denom = Ft.denominator(s.shape[0], num_real, device)
    return uld_topk_per_position(s, lp, rest, temperature).sum() / denom


def alignment_of(
    loss: Loss, batch: Batch, alignment: AlignedBatch | None, teacher: ModelOutputs | None = None
) -> AlignedBatch:
    """The AlignedBatch a cross-tokenizer loss reads: the one passed, else the teacher outputs' (the cross-tokenizer
    teacher source, kdkit.run.cross_teacher, sends it with its logits), else batch.alignment; a one-line error else."""
    if alignment is None and teacher is not None:
        alignment = teacher.alignment
    alignment = alignment if alignment is not None else getattr(batch, "alignment", None)
    if alignment is None:
        raise ValueError(
            f"{loss.name}: no alignment; expected an AlignedBatch (kdkit.data.align.align_batch) passed as "
            "alignment=, sent with the teacher's outputs (ModelOutputs.alignment) or set as batch.alignment"
        )
    return alignment


class ULD(Loss):
    """uld_loss at each span's last token (kdkit.data.align): the teacher's and the student's next-token distributions
    after the same text, compared as sorted probability vectors. temperature: kd temperature T (× T²)."""

    name = "uld"
    reads_positions = True  # reads both sides' logits at the aligned positions only (kdkit.losses.at_positions)
    cross_tokenizer = True  # reads a teacher with another tokenizer through the alignment (kdkit.run.cross_teacher)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = positive("temperature", temperature)

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: Batch,
        alignment: AlignedBatch | None = None,
        num_real_tokens: int | torch.Tensor | None = None,
    ):
        index = alignment_of(self, batch, alignment, teacher).index
        if teacher.logits is None and teacher.sparse is not None:  # the offline cache across tokenizers
            return uld_topk_loss(student, teacher.sparse, index.student_last, index.teacher_last, index.mask,
                                 self.temperature, num_real_tokens)
        return uld_loss(
            student,
            teacher,
            index.student_last,
            index.teacher_last,
            index.mask,
            self.temperature,
            num_real_tokens,
        )

    def describe(self) -> str:
        return f"uld(T={self.temperature:g})"
