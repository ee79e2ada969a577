"""Vocabulary compatibility between a student and a teacher language model.

Token-level distillation compares the two models' distributions id by id, so id i must mean the same token on
both sides. Three cases:

- identical vocabularies: nothing to do;
- one model's output layer padded to a different size (Qwen2.5: 151936 logits for the small models, 152064 for the
  7B and up, with one tokenizer of 151665 tokens; the extra rows are padding that no token maps to): both logits
  are sliced to the shared leading ids, and each side's softmax is taken over those ids only;
- different tokenizers (another token at the same id): a CompatibilityError, one line naming both vocabulary sizes
  and the first id whose tokens differ. Cross-tokenizer distillation needs a token mapping, which this is not.

check_tokenizers runs when the run is built (Teacher's compatibility check); align_vocab is the per-batch slice.
"""

from __future__ import annotations

from typing import Any

import torch

from kdkit.errors import CompatibilityError


def _id_to_token(tokenizer: Any, side: str, where: str) -> dict[int, str]:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise CompatibilityError(f"{where}: the {side} tokenizer ({type(tokenizer).__name__}) has no get_vocab()")
    return {int(i): tok for tok, i in get_vocab().items()}


def check_tokenizers(student_tokenizer: Any, teacher_tokenizer: Any, where: str = "tokenizer") -> int:
    """The number of leading ids whose tokens the two tokenizers share; a CompatibilityError when they differ.

    Compares get_vocab() (token → id, added tokens included) id by id over the shared range 0 … min(n_s, n_t) − 1.
    When the sizes differ and the shared range agrees (one tokenizer extends the other, e.g. with added tokens),
    the shared size is returned: logits sliced to it (align_vocab) drop the extra ids, and the teacher's
    distribution is renormalised over the shared ids.
    """
    inv_s = _id_to_token(student_tokenizer, "student", where)
    inv_t = _id_to_token(teacher_tokenizer, "teacher", where)
    n_s, n_t = len(inv_s), len(inv_t)
    shared = min(n_s, n_t)
    for i in range(shared):
        tok_s, tok_t = inv_s.get(i), inv_t.get(i)
        if tok_s != tok_t:
            raise CompatibilityError(
                f"{where}: the student's and the teacher's tokenizers differ (student vocabulary {n_s}, teacher "
                f"{n_t}): first mismatch at id {i}: student {tok_s!r}, teacher {tok_t!r}; token-level distillation "
                f"needs one tokenizer"
            )
    return shared


def shared_vocab_size(
    student_size: int, teacher_size: int, real_vocab: int | None = None, where: str = "vocab"
) -> int | None:
    """How many leading logit ids to keep on both sides: None when the logit widths are equal (identity, no slice).

    student_size, teacher_size: the widths of the two models' logits (their config.vocab_size). When they differ,
    one is taken as the other padded: keep real_vocab ids (the tokenizer's size, from check_tokenizers) if given,
    else the smaller width. real_vocab larger than either width is a CompatibilityError: the logits cannot hold it.
    """
    if student_size == teacher_size:
        return None
    keep = min(student_size, teacher_size) if real_vocab is None else int(real_vocab)
    if keep < 1 or keep > min(student_size, teacher_size):
        raise CompatibilityError(
            f"{where}: {keep} shared token ids do not fit the student's {student_size} and the teacher's "
            f"{teacher_size} logits"
        )
    return keep


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, shared: int | None, where: str = "vocab"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits (…, V_s), (…, V_t) restricted to their first `shared` ids: views, no copies.

    shared None: the widths must already be equal (returned unchanged); otherwise a CompatibilityError naming both
    widths. Ids ≥ shared get no probability and no gradient.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if shared is None:
        if v_s != v_t:
            raise CompatibilityError(
                f"{where}: student logits have {v_s} ids, teacher logits {v_t}; check the tokenizers "
                f"(kdkit.models.vocab.check_tokenizers) and give the shared vocabulary size"
            )
        return student_logits, teacher_logits
    if shared < 1 or shared > min(v_s, v_t):
        raise CompatibilityError(f"{where}: {shared} shared ids do not fit student logits ({v_s}) and teacher ({v_t})")
    return student_logits[..., :shared], teacher_logits[..., :shared]
