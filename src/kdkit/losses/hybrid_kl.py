"""Hybrid cross-tokenizer distillation: exact KL on the tokens both vocabularies share, ULD on the rest.

TRL's GOLD trainer (trl/experimental/gold, "hybrid ULD": uld_use_hybrid_loss) maps the teacher's and the student's
tokens that are the same string, compares their probabilities id by id, and compares the remaining, unmatched
probabilities as sorted vectors (ULD, Boizard et al. 2024, arXiv 2402.12030). GOLD weights the two parts by the
share of the vocabulary that matched and uses a JSD on the unnormalised matched probabilities. kdkit instead splits
the KL divergence exactly by the chain rule of relative entropy (Cover & Thomas, "Elements of Information Theory",
Thm 2.5.3) over the partition {shared ids, the rest}, and replaces only the one term that cannot be computed across
vocabularies by ULD. Forward (teacher p, student q):

    KL(p ‖ q) = KL(Bern(m_p) ‖ Bern(m_q))  +  m_p · KL(p̃_shared ‖ q̃_shared)  +  (1 − m_p) · KL(p̃_rest ‖ q̃_rest)

    hybrid   = T² · [ KL(Bern(m_p) ‖ Bern(m_q))  +  m_p · KL(p̃_shared ‖ q̃_shared)  +  (1 − m_p) · ULD(p̃_rest, q̃_rest) ]

m_p, m_q: each side's probability mass on the shared ids; p̃_shared = p restricted to the shared ids and renormalised
by m_p (likewise q̃ by m_q, and the rest by 1 − m); the shared ids are paired by the map, so the shared KL is exact.
The first term is the KL of the two-way split itself (how much mass each side puts on shared ids): without it the
student could move mass between shared and unmatched ids unseen. Reverse: the same with p and q exchanged in the
KL terms and weights m_q, 1 − m_q (ULD is symmetric). With identical tokenizers (identity map, no rest) the mass and
rest terms vanish and the hybrid is exactly kdkit's token_kl (kdkit.losses.token_functional) at the same positions.
A map that leaves ids unmatched on one side only is refused: that side's rest mass would be 0 and the split KL
infinite.

The shared map (shared_vocab) pairs tokens by their decoded text, not their vocabulary strings: byte-level BPE's
"Ġthe" is " the", WordPiece's "##ing" is "ing" and its word-initial "the" is " the" (each tokenizer's own decoder
says so, see token_surfaces).

Conventions as kdkit.losses.token_functional: fp32 softmax, T², teacher detached, sum over real aligned positions
divided by their number (or num_real).

A top-k teacher (the offline cache across tokenizers, kdkit.data.cross_cache: teacher.sparse, at the cache's
temperature, which must be the loss's) knows its k largest probabilities by id and only the total r of the others.
hybrid_topk_per_position applies the same chain rule to a coarser partition that both sides can compute, per
position: S_k = the shared ids among the teacher's top k (paired with their student ids), and the rest (the top-k's
unshared ids, and every id outside the top k, shared or not, whose mass only r tells):

    m_p = Σ_{S_k} p,  m_q = Σ_{map(S_k)} q;   exact KL on S_k;   ULD_k on the rest (kdkit.losses.uld)

where ULD_k compares the top-k's unshared values, sorted, one by one and the tail r as one mass against the
student's rest mass past as many values (a lower bound of ULD on the rest, made by coarsening both tails). Keeping
the tail as a mass rather than dropping it keeps the rest normalised: dropped, the student could put any mass past
its largest unshared values unseen, and p̃_rest would be renormalised over its known part only, overstating every
value by 1/(1 − r). With k = V_teacher, S_k is every shared id and r = 0, so this is the live hybrid exactly (up to the
cache's float16 log-probs); as k falls, the shared ids that leave the top k move to the rest, ruled by ULD_k.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kdkit.data.align import AlignedBatch, take
from kdkit.losses import token_functional as Ft
from kdkit.losses.at_positions import in_order, is_identity, logits_at
from kdkit.losses.base import Loss, choice, positive
from kdkit.losses.uld import alignment_of, sorted_l1, topk_sorted_l1
from kdkit.types import Batch, ModelOutputs, SparseLogprobs

HYBRID_DIRECTIONS = ("forward", "reverse")
ANCHOR = "a"  # a plain word decoded before each token, so that decoders keep a token's leading space


def _backend(tokenizer: Any):
    from tokenizers import Tokenizer

    return tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer


def token_surfaces(tokenizer: Any) -> list[str | None]:
    """The text each id adds after a word, by the tokenizer's own decoder: decode([anchor, id]) minus decode([anchor])
    with anchor = the tokens of "a". Byte-level BPE "Ġthe" → " the", "the" → "the"; WordPiece "the" → " the",
    "##ing" → "ing"; SentencePiece "▁the" → " the". None for a special token, an id with no token, an empty
    surface, and a piece of a character (a byte token, which decodes to U+FFFD)."""
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    anchor = backend.encode(ANCHOR, add_special_tokens=False).ids
    prefix = backend.decode(anchor, skip_special_tokens=False)
    present = set(vocab.values())
    decoded = backend.decode_batch([anchor + [i] for i in range(size)], skip_special_tokens=False)
    out: list[str | None] = []
    for i, text in enumerate(decoded):
        surface = text[len(prefix) :] if text.startswith(prefix) else ""
        ok = i in present and i not in special and surface and "\ufffd" not in surface
        out.append(surface if ok else None)
    return out


def shared_vocab(teacher_tokenizer: Any, student_tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher_ids, student_ids): int64 (K,) pairs of ids with the same token_surfaces text, by teacher id.

    Identical vocabularies (get_vocab() equal): the identity over every id. Otherwise, where several ids of one
    side decode to the same text (a byte-fallback "<0x41>" and "A"), the lowest id is kept."""
    t_backend, s_backend = _backend(teacher_tokenizer), _backend(student_tokenizer)
    t_vocab = t_backend.get_vocab(with_added_tokens=True)
    if t_vocab == s_backend.get_vocab(with_added_tokens=True):
        ids = torch.arange(max(t_vocab.values(), default=-1) + 1, dtype=torch.long)
        return ids, ids.clone()
    firsts = []
    for tokenizer in (teacher_tokenizer, student_tokenizer):
        first: dict[str, int] = {}
        for i, surface in enumerate(token_surfaces(tokenizer)):
            if surface is not None:
                first.setdefault(surface, i)
        firsts.append(first)
    t_first, s_first = firsts
    pairs = sorted((t_first[x], s_first[x]) for x in t_first.keys() & s_first.keys())
    t_ids = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    s_ids = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return t_ids, s_ids


def _rest(ids: torch.Tensor, width: int) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)


def _check_map(teacher_ids: torch.Tensor, student_ids: torch.Tensor, v_teacher: int, v_student: int) -> None:
    if teacher_ids.dim() != 1 or teacher_ids.shape != student_ids.shape:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and student_ids {tuple(student_ids.shape)}: expected two (K,) "
            "vectors of paired ids"
        )
    for side, ids, width in (("teacher", teacher_ids, v_teacher), ("student", student_ids, v_student)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
            raise ValueError(f"{side}_ids range over [{int(ids.min())}, {int(ids.max())}]; expected ids < {width}")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"{side}_ids repeat an id; expected a one-to-one map")


def vocab_orders(teacher_ids: torch.Tensor, student_ids: torch.Tensor, v_teacher: int,
                 v_student: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher order (V_t,), student order (V_s,)): each side's ids with the shared ones first, paired in map order,
    then the rest: the column orders hybrid_ordered reads. Checks the map (one-line ValueErrors). The checks read
    values back to the host: HybridKL computes these once per map (VocabOrders), not every step."""
    _check_map(teacher_ids, student_ids, v_teacher, v_student)
    t_rest, s_rest = _rest(teacher_ids, v_teacher), _rest(student_ids, v_student)
    if (t_rest.numel() == 0) != (s_rest.numel() == 0):
        side, n = ("student", t_rest.numel()) if s_rest.numel() == 0 else ("teacher", s_rest.numel())
        raise ValueError(
            f"hybrid_kl: every {side} id is shared but the other side has {n} unmatched ids; the split KL would be "
            "infinite. Expected unmatched ids on both sides or on neither (use uld otherwise)"
        )
    return torch.cat([teacher_ids, t_rest]), torch.cat([student_ids, s_rest])


def _log_softmax(logits: torch.Tensor, t: float) -> torch.Tensor:
    x = Ft._upcast(logits)
    return F.log_softmax(x if t == 1.0 else x / t, dim=-1)  # x / 1 is x: the division is skipped, not changed


def hybrid_ordered(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    shared: int,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """The hybrid divergence of the module docstring per row, × T², for logits whose first `shared` columns are the
    shared ids, paired column by column, and whose other columns are each side's rest (vocab_orders): (N, V_s),
    (N, V_t) → (N,) float32.

    Computed in the equivalent form of the chain rule (forward; reverse exchanges p and q, weights r_q)

        KL(Bern(m_p) ‖ Bern(m_q)) + m_p · KL(p̃_shared ‖ q̃_shared) = Σ_shared p (log p − log q) + r_p (log r_p − log r_q)

    (r = 1 − m, the rest mass): no shared sub-vector is renormalised, and every part is a contiguous slice."""
    if direction not in HYBRID_DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {', '.join(HYBRID_DIRECTIONS)}")
    t = float(temperature)
    log_q = _log_softmax(student_logits, t)
    log_p = _log_softmax(teacher_logits.detach(), t)
    if shared == log_p.shape[-1] == log_q.shape[-1]:  # every id shared: the KL itself (token_kl's arithmetic)
        return Ft._divergence(log_p, log_q, direction, 0.5) * (t * t)
    # One split per side (its backward is one concatenation, where two slices would each fill a zero (N, V) tensor).
    (p_sh, p_rest), (q_sh, q_rest) = (x.split([shared, x.shape[-1] - shared], dim=-1) for x in (log_p, log_q))
    kl_shared = Ft._kl(p_sh, q_sh) if direction == "forward" else Ft._kl(q_sh, p_sh)
    log_r_p, log_r_q = p_rest.logsumexp(-1), q_rest.logsumexp(-1)
    log_ra, log_rb = (log_r_p, log_r_q) if direction == "forward" else (log_r_q, log_r_p)
    kl_rest_mass = Ft._kl(log_ra[:, None], log_rb[:, None])
    lowest = torch.finfo(log_p.dtype).min  # a side with no rest mass: its normaliser stays finite
    p_rest = (p_rest - log_r_p.clamp_min(lowest)[:, None]).exp()
    q_rest = (q_rest - log_r_q.clamp_min(lowest)[:, None]).exp()
    return (kl_shared + kl_rest_mass + log_ra.exp() * sorted_l1(p_rest, q_rest)) * (t * t)


def hybrid_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """The hybrid divergence of the module docstring per row, × T²: (N, V_s), (N, V_t), (K,), (K,) → (N,) float32."""
    t_order, s_order = vocab_orders(teacher_ids, student_ids, teacher_logits.shape[-1], student_logits.shape[-1])
    return hybrid_ordered(in_order(student_logits, s_order), in_order(teacher_logits, t_order), teacher_ids.numel(),
                          direction, temperature)


def hybrid_topk_per_position(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    rest: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """The hybrid divergence of a top-k teacher (module docstring) per row, × T²: student_logits (N, V_s), the
    teacher's ids, logprobs (N, k) and rest (N,) at temperature T, the shared map (K,), (K,) → (N,) float32."""
    if direction not in HYBRID_DIRECTIONS:
        raise ValueError(f"direction={direction!r}; expected one of {', '.join(HYBRID_DIRECTIONS)}")
    v_s, k = student_logits.shape[-1], ids.shape[-1]
    t = float(temperature)
    log_q = F.log_softmax(Ft._upcast(student_logits) / t, dim=-1)
    log_pb = Ft._teacher_buckets(logprobs, rest, log_q.dtype)  # (N, k + 1): the top k, then the tail
    lowest, device = torch.finfo(log_q.dtype).min, log_q.device
    ids = ids.to(device).long()
    width = max(int(ids.max()) if ids.numel() else 0, int(teacher_ids.max()) if teacher_ids.numel() else 0) + 1
    table = torch.full((width,), -1, dtype=torch.long, device=device)
    table[teacher_ids.to(device)] = student_ids.to(device)
    s_of = table[ids]  # (N, k): the student id of each top-k teacher id, −1 when unshared
    sh = s_of >= 0
    neg_inf = torch.tensor(float("-inf"), dtype=log_q.dtype, device=device)
    lp_top, lp_tail = log_pb[:, :k], log_pb[:, k]
    log_m_p = torch.where(sh, lp_top, neg_inf).logsumexp(-1)
    log_r_p = torch.cat([torch.where(sh, neg_inf, lp_top), lp_tail[:, None]], -1).logsumexp(-1)
    # The student's side of the same partition: map(S_k) and every other student id.
    lq_sh = log_q.gather(-1, torch.where(sh, s_of, 0))
    picked = torch.zeros(log_q.shape[0], v_s + 1, dtype=torch.bool, device=device)
    picked = picked.scatter_(-1, torch.where(sh, s_of, v_s), True)[:, :v_s]
    log_m_q = torch.where(sh, lq_sh, neg_inf).logsumexp(-1)
    log_r_q = torch.where(picked, lowest, log_q).logsumexp(-1)
    p_mass, q_mass = torch.stack([log_m_p, log_r_p], -1), torch.stack([log_m_q, log_r_q], -1)
    mass = Ft._divergence(p_mass, q_mass, direction, 0.5)
    p_sh = torch.where(sh, lp_top - log_m_p.clamp_min(lowest)[:, None], neg_inf)
    q_sh = torch.where(sh, lq_sh - log_m_q.clamp_min(lowest)[:, None], neg_inf)
    shared = Ft._divergence(p_sh, q_sh, direction, 0.5)
    # The rest, normalised: the top-k's unshared values (sorted, the shared slots last and ignored) and the tail.
    norm_p = log_r_p.clamp_min(lowest)[:, None]
    p_vals = torch.where(sh, -1.0, (lp_top - norm_p).exp()).sort(dim=-1, descending=True).values
    p_tail = (lp_tail - norm_p.squeeze(-1)).exp()
    q_vals = torch.where(picked, 0.0, (log_q - log_r_q.clamp_min(lowest)[:, None]).exp())
    rest_l1 = topk_sorted_l1(p_vals, p_tail, q_vals, (~sh).sum(-1))
    weight = (p_mass if direction == "forward" else q_mass).exp()  # (N, 2): shared mass, rest mass
    return (mass + weight[:, 0] * shared + weight[:, 1] * rest_l1) * (t * t)


def hybrid_kl_loss(
    student_logits: torch.Tensor | ModelOutputs,
    teacher_logits: torch.Tensor | ModelOutputs,
    student_positions: torch.Tensor,
    teacher_positions: torch.Tensor,
    mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    direction: str = "forward",
    temperature: float = 1.0,
    num_real: int | torch.Tensor | None = None,
    orders: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ over real aligned positions of hybrid_per_position / N (N = their number, or num_real).

    student_logits (B, T_s, V_s), teacher_logits (B, T_t, V_t), or either side's ModelOutputs with its hidden state
    and head (kdkit.losses.at_positions: the head runs at the compared positions only); positions and mask (B, S)
    (kdkit.data.align.SpanIndex); teacher_ids, student_ids (K,): the shared map (shared_vocab). orders: the map's
    vocab_orders when already computed (None: computed here)."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    v_t, v_s = (_width(x) for x in (teacher_logits, student_logits))
    t_order, s_order = orders if orders is not None else vocab_orders(teacher_ids, student_ids, v_t, v_s)
    s = logits_at(student_logits, student_positions, mask, s_order)
    t = logits_at(teacher_logits, teacher_positions, mask, t_order).detach()
    denom = Ft.denominator(s.shape[0], num_real, s.device)
    return hybrid_ordered(s, t, teacher_ids.numel(), direction, temperature).sum() / denom


def _width(x: torch.Tensor | ModelOutputs) -> int:
    """The vocabulary size of logits or of a ModelOutputs (its logits, or its head's rows)."""
    if isinstance(x, torch.Tensor):
        return x.shape[-1]
    return x.logits.shape[-1] if x.logits is not None else x.head.weight.shape[0]


def hybrid_topk_loss(
    student_logits: torch.Tensor | ModelOutputs,
    sparse: SparseLogprobs,
    student_positions: torch.Tensor,
    teacher_positions: torch.Tensor,
    mask: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_ids: torch.Tensor,
    direction: str = "forward",
    temperature: float = 1.0,
    num_real: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """hybrid_kl_loss with a top-k teacher (sparse: ids, logprobs (B, T_t, k), rest (B, T_t)): Σ over real aligned
    positions of hybrid_topk_per_position / N."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; expected > 0")
    s = logits_at(student_logits, student_positions, mask)
    device = s.device
    ids, lp, rest = (take(x.detach().to(device), teacher_positions, mask)
                     for x in (sparse.ids, sparse.logprobs, sparse.rest))
    denom = Ft.denominator(s.shape[0], num_real, device)
    return hybrid_topk_per_position(s, ids, lp, rest, teacher_ids, student_ids, direction, temperature).sum() / denom


class VocabOrders:
    """vocab_orders of the maps a HybridKL reads, computed once per map and vocabulary sizes (the map is fixed for a
    run, or one per teacher group; its tensors are held here, so their ids name them while cached)."""

    def __init__(self):
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, teacher_ids: torch.Tensor, student_ids: torch.Tensor, v_teacher: int, v_student: int):
        key = (id(teacher_ids), id(student_ids), v_teacher, v_student)
        if key not in self._cache:
            if len(self._cache) >= 16:  # maps replaced over and over (set_vocab_map in a loop): keep the newest
                self._cache.clear()
            orders = vocab_orders(teacher_ids, student_ids, v_teacher, v_student)
            # An identity order is None: in_order then returns the logits without comparing the order every step.
            orders = tuple(None if is_identity(o) else o for o in orders)
            self._cache[key] = (teacher_ids, student_ids, orders)
        return self._cache[key][2]


class HybridKL(Loss):
    """hybrid_kl_loss at each span's last token. The shared map is set once the tokenizers are known:
    loss.set_vocab_map(*shared_vocab(teacher_tokenizer, student_tokenizer)) (not a config value: it is derived)."""

    name = "hybrid_kl"
    reads_positions = True  # reads both sides' logits at the aligned positions only (kdkit.losses.at_positions)
    cross_tokenizer = True  # reads a teacher with another tokenizer through the alignment (kdkit.run.cross_teacher)

    def __init__(self, direction: str = "forward", temperature: float = 1.0):
        super().__init__()
        self.direction = choice("direction", direction, HYBRID_DIRECTIONS)
        self.temperature = positive("temperature", temperature)
        self.register_buffer("teacher_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("student_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self._has_map = False
        self._orders = VocabOrders()

    def set_vocab_map(self, teacher_ids: torch.Tensor, student_ids: torch.Tensor) -> None:
        self.teacher_ids = teacher_ids.to(self.teacher_ids.device, torch.long)
        self.student_ids = student_ids.to(self.student_ids.device, torch.long)
        self._has_map = True

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: Batch,
        alignment: AlignedBatch | None = None,
        num_real_tokens: int | torch.Tensor | None = None,
    ):
        sent = getattr(alignment if alignment is not None else getattr(teacher, "alignment", None), "vocab_map", None)
        if not self._has_map and sent is None:
            raise ValueError("hybrid_kl: no vocabulary map; expected set_vocab_map(*shared_vocab(teacher, student))")
        aligned = alignment_of(self, batch, alignment, teacher)
        # The source's own map where it sends one (several teachers: each group's), else the one set.
        teacher_ids, student_ids = aligned.vocab_map if aligned.vocab_map is not None else (self.teacher_ids,
                                                                                            self.student_ids)
        index = aligned.index
        if teacher.logits is None and teacher.sparse is not None:  # the offline cache across tokenizers
            return hybrid_topk_loss(student, teacher.sparse, index.student_last, index.teacher_last,
                                    index.mask, teacher_ids, student_ids, self.direction, self.temperature,
                                    num_real_tokens)
        return hybrid_kl_loss(
            student,
            teacher,
            index.student_last,
            index.teacher_last,
            index.mask,
            teacher_ids,
            student_ids,
            self.direction,
            self.temperature,
            num_real_tokens,
            self._orders(teacher_ids, student_ids, _width(teacher), _width(student)),
        )

    def describe(self) -> str:
        return f"hybrid_kl({self.direction}, T={self.temperature:g}, shared={self.teacher_ids.numel()})"
