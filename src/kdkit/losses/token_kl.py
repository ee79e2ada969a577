"""Token-level distillation for language models: forward/reverse KL, generalized JSD or TVD per real token."""

from __future__ import annotations

import torch

from kdkit.errors import CompatibilityError
from kdkit.losses import token_functional as Ft
from kdkit.losses.base import Loss, ParamError, choice, number, positive
from kdkit.losses.fused_head import TokenTerm
from kdkit.models.vocab import align_vocab
from kdkit.types import Batch, ModelOutputs, SparseLogprobs


class TokenKL(Loss):
    """Ft.token_divergence(student logits, teacher logits, batch.labels) over (B, T, V) logits.

    direction: "forward" KL(teacher ‖ student), "reverse" KL(student ‖ teacher), "jsd" (β weights the teacher's
    end: m = β·p_teacher + (1 − β)·q_student; β = 0 is forward KL, β = 1 reverse KL, as in TRL), "tvd".
    temperature: kd_temperature T, softmax(logits / T) on both sides, loss × T² (not the sampling temperature).
    shift: causal LM (logits t predict labels t + 1); false: labels already aligned with the logits. Labels -100
    are ignored. chunk_size: positions per chunk.
    num_real_tokens: the global count of real tokens to divide by (all micro-batches of the optimizer step, all
    processes); None divides by the engine's count for this shift setting (Ft.step_count), else by this batch's
    count. The engine may also pass it per call to forward().
    vocab_size: the shared vocabulary (kdkit.models.vocab) when the logit widths differ (a padded vocabulary);
    None requires equal widths.
    A teacher read from the offline top-k cache (teacher.sparse, kdkit.data.lm_cache) is compared over its k ids
    plus one bucket for the rest (Ft.sparse_token_divergence); its ids must lie within the student's (shared)
    logits, and the cache must have been built at this temperature (the cache's manifest records it).
    drop_hardest: AdaSPEC's token filter (Ft.drop_hardest_labels), 0 ≤ x < 1. In each call, of the n_real positions
    that count (labels ≠ -100 after the shift), the floor(x · n_real) with the largest divergence (this direction,
    β and temperature, computed without gradient, chunk_size positions at a time) get no loss and no gradient; ties
    drop the earlier position in row-major (b, t) order first. The loss is Σ_kept D / N' with N' = kept when no
    count is given (the mean over the kept positions), else N' = N · kept / n_real for the given (global) count N:
    the scale stays that of a mean per kept token, and the micro-batches of an accumulation step add up to
    Σ_kept D / (kept tokens of the step) exactly when each keeps the same share (each is weighted by its real
    tokens, as without the filter). Both teachers (dense logits and the cached top-k); not the fused head
    (token_term gives None, so the loss runs on whole logits). 0 (the default) is the loss without the filter.
    """

    name = "token_kl"

    def __init__(
        self,
        direction: str = "forward",
        beta: float = 0.5,
        temperature: float = 1.0,
        chunk_size: int | None = None,
        shift: bool = True,
        num_real_tokens: int | None = None,
        vocab_size: int | None = None,
        drop_hardest: float = 0.0,
    ):
        super().__init__()
        choice("direction", direction, Ft.DIRECTIONS)
        beta = number("beta", beta, lambda v: 0 <= v <= 1, "0 <= beta <= 1")
        temperature = positive("temperature", temperature)
        drop_hardest = number("drop_hardest", drop_hardest, lambda v: 0 <= v < 1, "0 <= drop_hardest < 1")
        for param, value, what in (
            ("chunk_size", chunk_size, "a positive number of positions or null"),
            ("vocab_size", vocab_size, "a positive number of shared ids or null"),
            ("num_real_tokens", num_real_tokens, "a positive count or null"),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ParamError(param, value, what)
        if not isinstance(shift, bool):
            raise ParamError("shift", shift, "true or false")
        self.direction = direction
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.chunk_size = chunk_size
        self.shift = bool(shift)
        self.num_real_tokens = num_real_tokens
        self.vocab_size = vocab_size
        self.drop_hardest = drop_hardest
        self._checked_widths: set[int] = set()

    def forward(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: Batch,
        num_real_tokens: int | torch.Tensor | None = None,
    ):
        if num_real_tokens is None:  # the engine's share of the optimizer step's global count, for this shift
            num_real_tokens = Ft.step_count(batch, self.shift)
        count = self.num_real_tokens if num_real_tokens is None else num_real_tokens
        if teacher.sparse is not None:
            return self._sparse(student, teacher.sparse, batch, count)
        s, t = align_vocab(student.logits, teacher.logits, self.vocab_size, where=self.name)

        def values_at(r, c):
            return Ft.per_position_divergence(s[r, c], t[r, c], self.direction, self.beta, self.temperature)

        labels, count = self._keep(s, values_at, batch.labels, count)
        return Ft.token_divergence(
            s,
            t,
            labels,
            direction=self.direction,
            beta=self.beta,
            temperature=self.temperature,
            shift=self.shift,
            num_real_tokens=count,
            chunk_size=self.chunk_size,
        )

    def _sparse(self, student: ModelOutputs, sparse: SparseLogprobs, batch: Batch, count):
        """The top-k teacher of the offline cache: Ft.sparse_token_divergence over the student's shared ids."""
        s = student.logits if self.vocab_size is None else student.logits[..., : self.vocab_size]
        self._check_ids(sparse, s.shape[-1])
        labels = batch.labels
        if self.drop_hardest > 0:
            Ft._check_sparse(s, sparse)  # the shapes, named, before the filter indexes the entries
            ids, lp, rest = (x.detach().to(s.device) for x in (sparse.ids, sparse.logprobs, sparse.rest))

            def values_at(r, c):
                return Ft.sparse_per_position_divergence(
                    s[r, c], ids[r, c], lp[r, c], rest[r, c], self.direction, self.beta, self.temperature
                )

            labels, count = self._keep(s, values_at, labels, count)
        return Ft.sparse_token_divergence(
            s,
            sparse,
            labels,
            direction=self.direction,
            beta=self.beta,
            temperature=self.temperature,
            shift=self.shift,
            num_real_tokens=count,
            chunk_size=self.chunk_size,
        )

    def _keep(self, s: torch.Tensor, values_at, labels: torch.Tensor | None, count):
        """(labels, count) for the loss: with drop_hardest, the hardest positions' labels set to -100
        (Ft.drop_hardest_labels) and a given count scaled by kept / real (see the class docstring)."""
        if self.drop_hardest == 0:
            return labels, count
        b, t = s.shape[:2]
        labels, kept, n_real = Ft.drop_hardest_labels(
            values_at, labels, b, t, self.drop_hardest, self.shift, self.chunk_size, device=s.device
        )
        if count is None or kept == n_real:
            return labels, count
        return labels, count * (kept / n_real)

    def _check_ids(self, sparse: SparseLogprobs, width: int) -> None:
        # An id ≥ width cannot be read. Checked on the first batch only: .max() waits for the device, and a cache
        # holds one teacher's vocabulary throughout.
        top = int(sparse.ids.max()) if sparse.ids.numel() and width not in self._checked_widths else -1
        self._checked_widths.add(width)
        if top >= width:
            raise CompatibilityError(
                f"{self.name}: the cached teacher has token id {top}, beyond the student's {width} logits; the cache "
                f"needs a teacher with the student's vocabulary ({width} ids)"
            )

    def token_term(
        self, teacher: ModelOutputs, batch: Batch, n_real: int, weight: float, vocab: int
    ) -> TokenTerm | None:
        """This loss for the fused head (kdkit.losses.fused_head), or None where it cannot run there (a padded
        vocabulary; drop_hardest > 0, which must rank all of a batch's positions before the first chunk). Dense
        teacher: per_position_divergence on the teacher's chunk, forward KL in closed form; the cached top-k
        teacher: sparse_per_position_divergence on its entries at the chunk's positions."""
        if self.vocab_size is not None or self.drop_hardest > 0:
            return None
        count = Ft.step_count(batch, self.shift)
        count = self.num_real_tokens if count is None else count
        denom = Ft.denominator(n_real, count, batch.labels.device)
        direction, beta, temp = self.direction, self.beta, self.temperature
        if teacher.sparse is not None:
            sp = teacher.sparse
            if tuple(sp.ids.shape[:2]) != tuple(batch.labels.shape):
                raise ValueError(
                    f"sparse teacher ids {tuple(sp.ids.shape)} do not fit labels {tuple(batch.labels.shape)}"
                )
            self._check_ids(sp, vocab)
            ids, lp, rest = (x.detach().to(batch.labels.device) for x in (sp.ids, sp.logprobs, sp.rest))

            def sparse_values(z, t, r, c):
                return Ft.sparse_per_position_divergence(z, ids[r, c], lp[r, c], rest[r, c], direction, beta, temp)

            return TokenTerm(sparse_values, denom, weight, reads_teacher=False)

        def values(z, t, r, c):
            return Ft.per_position_divergence(z, t, direction, beta, temp)

        def values_and_grad(z, t, r, c):
            return Ft.forward_kl_with_grad(z, t, temp)

        closed = values_and_grad if direction == "forward" or (direction == "jsd" and beta == 0.0) else None
        return TokenTerm(values, denom, weight, reads_teacher=True, values_and_grad=closed)

    def describe(self) -> str:
        what = f"jsd, beta={self.beta:g}" if self.direction == "jsd" else self.direction
        drop = f", drop {100 * self.drop_hardest:g}%" if self.drop_hardest > 0 else ""
        return f"token_kl({what}, T={self.temperature:g}{drop})"
