"""The causal_lm task's evaluation and report: perplexity, bits per byte and per character (comparable across
tokenizers), agreement and KL to the teacher on held-out text, per seed; the cost of each model measured the same
way (kdkit.evaluate.cost); greedy continuations side by side; and, with a top-k cache, what the cache loses against
the dense teacher.

A teacher with another tokenizer (cross: kdkit.run.cross_teacher) is measured on its own tokens of the same test
texts: its perplexity is per teacher token, so only bits per byte and per character compare it with the students.
What needs one vocabulary (agreement, KL and acceptance against the teacher, the acceptance curves) is left out;
in its place, span_agreement: whether a student's greedy next token and the teacher's start the same text at the
aligned span boundaries of the test blocks (kdkit.evaluate.span_agreement). The teacher's cost is timed on its
own tokens of the test blocks, and its greedy continuations start from its own tokens of the same prompts."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from kdkit.config import KDConfig, dump_config
from kdkit.data.lm import LMBundle
from kdkit.evaluate.cost import measure_cost
from kdkit.evaluate.lm import lm_metrics, text_decoder
from kdkit.evaluate.schema import assemble
from kdkit.report.table import LM_COLUMNS
from kdkit.run.cross_teacher import CrossTeacher, pad_id_of
from kdkit.run.disk import append_disk_section
from kdkit.run.phases import KINDS
from kdkit.run.teacher import frozen
from kdkit.teachers import TeacherEnsemble

COLUMNS = LM_COLUMNS
GAIN_KEYS = ("nll", "perplexity", "bits_per_byte", "bits_per_char", "accuracy", "agreement", "kl", "acceptance")


def evaluate(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, results: dict, device: str, best: dict,
             recipe=None, untrained_draft: Callable[[int], nn.Module] | None = None,
             log: Callable[[str], None] = print, cross: CrossTeacher | None = None, other_teachers=None):
    """(metrics.json, extras for the report) on the test blocks. untrained_draft(seed): the student as the recipe
    builds it before training (llm.draft.enabled: metrics.json's "draft", see draft_metrics). cross: the source of
    a teacher with another tokenizer (module docstring). other_teachers: with members of several tokenizers, the
    groups after members.0's (which `teacher` and `cross` are), each (name, members, weight, its CrossTeacher over
    the test blocks): their bits per byte on their own tokens go to metrics.json's "other_teachers"."""
    info = dict(recipe.info) if recipe is not None else {}
    if other_teachers:
        info["other_teachers"] = other_teacher_scores(other_teachers, data, cfg.eval.batch_size, device)
    if cross is not None and not cross.same:
        return evaluate_cross(cfg, data, teacher, results, device, best, info, cross)
    e = cfg.eval
    models: dict[str, Callable] = {"teacher": teacher.logits}
    for kind, _ in KINDS:
        for r in results[kind]:
            models[r.phase.name] = r.model.to(device).eval()
    if untrained_draft is not None:
        models[UNTRAINED] = untrained_draft(best["seed"]).to(device).eval()
    widths = [teacher.members[0].model.get_output_embeddings().weight.shape[0]]
    widths += [r.model.get_output_embeddings().weight.shape[0] for k, _ in KINDS for r in results[k]]
    shared = min(widths) if len(set(widths)) > 1 else None
    cache = dict(info.get("teacher_cache") or {})
    topk = TopKError(best["phase"], cache["k"], cache["kd_temperature"]) if "k" in cache else None
    drafts = {"student": best["phase"]}
    base = [r.phase.name for r in results["baseline"] if r.phase.seed == best["seed"]]
    if base:
        drafts["baseline_student"] = base[0]
    curves = AcceptanceCurves(drafts, shared)
    ks = tuple(range(1, max(AcceptanceCurves.KS[-1], cfg.llm.draft.k) + 1))
    draft_curves = AcceptanceCurves({"untrained": UNTRAINED, **drafts}, shared, ks) if UNTRAINED in models else None

    def on_batch(logits, labels):
        curves(logits, labels)
        if draft_curves is not None:
            draft_curves(logits, labels)
        if topk is not None:
            topk(logits, labels)

    # Bits per byte need the text back: the data's tokenizer decodes each test block once.
    decode = text_decoder(data.tokenizer) if data.tokenizer is not None else None
    scores = lm_metrics(models, data.test, e.batch_size, device, teacher="teacher", vocab_size=shared,
                        on_batch=on_batch, decode=decode)
    if topk is not None:
        info["teacher_cache"] = cache | topk.summary()
    info["acceptance_curve"] = curves.summary()
    if draft_curves is not None:
        from kdkit.tasks.draft_eval import draft_metrics

        phases = {"untrained": UNTRAINED, **drafts}
        info["draft"] = draft_metrics(cfg, data, teacher, results, phases, scores, draft_curves.summary(),
                                      models.pop(UNTRAINED), device, log)
    per_seed = {key: [scores[r.phase.name] for r in results[kind]] for kind, key in KINDS if results[kind]}
    seeds = [r.phase.seed for r in results["student"]]
    cost = costs(cfg, data, teacher, results, device)
    gain_keys = [key for key in GAIN_KEYS if key in scores["teacher"]]  # no tokenizer: no bits per byte
    metrics = assemble("causal_lm", seeds, scores["teacher"], per_seed["student"], per_seed.get("baseline_student"),
                       cost, gain_keys, best, **info)
    extras = {"samples": greedy_samples(cfg, data, teacher, results, device)}
    for kind, _ in KINDS:
        for r in results[kind]:
            r.model.cpu()
    return metrics, extras


def other_teacher_scores(others, data: LMBundle, batch_size: int, device: str) -> dict:
    """{name: members, weight, and bits per byte / per char / tokens of the group on its own tokens of the test
    texts} for the groups of other tokenizers (evaluate's other_teachers)."""
    out = {}
    for name, members, weight, source in others:
        scores = lm_metrics({"teacher": source.teacher.logits}, source.teacher_data(data.test), batch_size, device,
                            decode=text_decoder(source.tokenizer))["teacher"]
        keys = ("bits_per_byte", "bits_per_char", "perplexity", "tokens")
        out[name] = {"members": list(members), "weight": round(float(weight), 6), "vocabulary": len(source.tokenizer),
                     **{k: scores[k] for k in keys if k in scores}}
    return out


def evaluate_cross(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, results: dict, device: str, best: dict,
                   info: dict, cross: CrossTeacher):
    """evaluate() for a teacher with another tokenizer: the students as usual without the teacher's comparisons,
    the teacher on its own tokens of the test texts (module docstring)."""
    e = cfg.eval
    models: dict[str, Callable] = {}
    for kind, _ in KINDS:
        for r in results[kind]:
            models[r.phase.name] = r.model.to(device).eval()
    scores = lm_metrics(models, data.test, e.batch_size, device, decode=text_decoder(data.tokenizer))
    teacher_test = cross.teacher_data(data.test)
    teacher_scores = lm_metrics({"teacher": teacher.logits}, teacher_test, e.batch_size, device,
                                decode=text_decoder(cross.tokenizer))["teacher"]
    agreement, spans = span_agreements(models, cross, data, e.batch_size, device)
    for name, value in agreement.items():
        scores[name]["span_agreement"] = value
    info = dict(info)
    info["cross_tokenizer"] = {
        "teacher_vocabulary": len(cross.tokenizer),
        "student_vocabulary": len(data.tokenizer),
        "teacher_tokens_per_student_token": round(teacher_scores["tokens"] / scores[best["phase"]]["tokens"], 4),
        "comparable": ["bits_per_byte", "bits_per_char"],
        "span_agreement_spans": spans,
    }
    per_seed = {key: [scores[r.phase.name] for r in results[kind]] for kind, key in KINDS if results[kind]}
    seeds = [r.phase.seed for r in results["student"]]
    cost = costs(cfg, data, teacher, results, device, teacher_ids=teacher_test.ids)
    gain_keys = [key for key in GAIN_KEYS if key in teacher_scores] + ["span_agreement"]
    metrics = assemble("causal_lm", seeds, teacher_scores, per_seed["student"], per_seed.get("baseline_student"),
                       cost, gain_keys, best, **info)
    extras = {"samples": greedy_samples(cfg, data, teacher, results, device, cross.tokenizer)}
    for kind, _ in KINDS:
        for r in results[kind]:
            r.model.cpu()
    return metrics, extras


def span_agreements(models: dict[str, Callable], cross: CrossTeacher, data: LMBundle, batch_size: int,
                    device: str) -> tuple[dict[str, float], int]:
    """({name: span agreement with the teacher}, aligned spans) over the test blocks (data.test, which `cross` reads):
    the teacher once per batch on its own tokens, each model on the student's (kdkit.evaluate.span_agreement)."""
    from torch.utils.data import DataLoader

    from kdkit.evaluate.span_agreement import span_agreement_counts, token_text

    student_text, teacher_text = token_text(data.tokenizer), token_text(cross.tokenizer)
    agree, spans = dict.fromkeys(models, 0), 0
    loader = DataLoader(data.test, batch_size=batch_size, shuffle=False, collate_fn=data.test.collate)
    with torch.inference_mode():
        for batch in loader:
            batch = batch.to(device)
            teacher_out = cross(batch)
            index = teacher_out.alignment.index
            for name, model in models.items():
                out = model(batch.inputs)
                agree[name] += span_agreement_counts(getattr(out, "logits", out), teacher_out.logits, index,
                                                     student_text, teacher_text)[0]
            spans += int(index.mask.sum())
    return {name: n / spans if spans else float("nan") for name, n in agree.items()}, spans


def costs(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, results: dict, device: str,
          teacher_ids: torch.Tensor | None = None) -> dict:
    """Teacher and students timed the same way: behind the same frozen wrapper, batch 1 (one block) for latency,
    a batch of blocks for throughput (blocks/s and tokens/s). teacher_ids: a teacher with another tokenizer is
    timed on its own tokens of the test blocks (cross-tokenizer runs)."""
    e = cfg.eval

    def measure(forward, modules, ids: torch.Tensor) -> dict:
        block = ids[: min(len(ids), e.batch_size)].to(device)
        return measure_cost(forward, modules, ids[:1].to(device), block, repeats=e.latency_repeats,
                            warmup=e.latency_warmup, tokens_per_example=block.shape[1])

    one = data.test.ids[:1].to(device)
    t_ids = data.test.ids if teacher_ids is None else teacher_ids
    out = {"teacher": measure(teacher, [m.model for m in teacher.members], t_ids)}
    for kind, key in KINDS:
        if results[kind]:
            model = results[kind][0].model
            out[key] = measure(frozen(copy.deepcopy(model), cfg.distill, one, device, lambda m: None), [model],
                               data.test.ids)
    return out  # speed-ups: one definition, added by assemble


def context_length(model: nn.Module) -> int:
    """The positions a causal LM reads at most (max_position_embeddings or n_positions)."""
    c = model.config
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048))


class TopKError:
    """What the top-k cache loses, on held-out text: the kept student's forward KL to the dense teacher vs to the
    teacher's top-k (the loss it was trained with), token-weighted. Fed by lm_metrics' forward passes."""

    def __init__(self, student: str, k: int, temperature: float):
        self.student, self.k, self.temperature = student, k, temperature
        self.totals: dict[str, float] = {}
        self.tokens = 0

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        from kdkit.data.lm_cache import topk_logprobs
        from kdkit.losses.token_functional import topk_kl_error

        t, s = logits["teacher"], logits[self.student].float()
        v = min(t.shape[-1], s.shape[-1])  # a padded output layer: the shared ids
        t, s = t[..., :v], s[..., :v]
        r = topk_kl_error(s, t, topk_logprobs(t, self.k, self.temperature), labels, self.temperature)
        for key in ("dense_kl", "sparse_kl", "teacher_kl", "topk_mass"):
            self.totals[key] = self.totals.get(key, 0.0) + r[key] * r["tokens"]
        self.tokens += r["tokens"]

    def summary(self) -> dict:
        out = {f"heldout_{key}": round(v / max(self.tokens, 1), 4) for key, v in self.totals.items()}
        dense = out.get("heldout_dense_kl", 0.0)
        out["heldout_kl_rel_error"] = round((dense - out.get("heldout_sparse_kl", 0.0)) / dense, 4) if dense else 0.0
        return out


UNTRAINED = "draft-untrained"  # the untrained draft's key among the evaluated models


class AcceptanceCurves:
    """The teacher as the target of speculative decoding, each draft (the best seed's distilled student, the
    baseline of the same seed) as its draft: the expected tokens per target call for k = 1 … 8 draft tokens,
    estimated teacher-forced on the test text (kdkit.evaluate.acceptance), when sampling at temperature 1 and
    greedy. Fed by lm_metrics' forward passes."""

    KS = tuple(range(1, 9))

    def __init__(self, drafts: dict[str, str], vocab_size: int | None, ks: tuple[int, ...] = KS):
        self.drafts, self.vocab_size, self.ks = drafts, vocab_size, ks
        self.alpha: dict[str, dict[str, list[torch.Tensor]]] = {"temperature_1": {}, "greedy": {}}

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        from kdkit.evaluate.acceptance import token_acceptance

        v = self.vocab_size
        t = logits["teacher"] if v is None else logits["teacher"][..., :v]
        for key, phase in self.drafts.items():
            d = logits[phase] if v is None else logits[phase][..., :v]
            for mode, temperature in (("temperature_1", 1.0), ("greedy", 0.0)):
                alpha = token_acceptance(d, t, labels, temperature=temperature).cpu()
                self.alpha[mode].setdefault(key, []).append(alpha)

    def summary(self) -> dict:
        from kdkit.evaluate.acceptance import acceptance_curve

        out = {}
        for mode, by_key in self.alpha.items():
            out[mode] = {}
            for key, parts in by_key.items():
                alpha = torch.cat(parts)
                ks = [k for k in self.ks if k < alpha.shape[1]]
                out[mode][key] = {str(k): round(v, 4) for k, v in acceptance_curve(alpha, ks).items()}
        return out


def greedy_samples(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, results: dict, device: str,
                   teacher_tokenizer=None) -> list:
    """Greedy continuations of held-out prompts by the teacher and the first seed of each student.
    teacher_tokenizer: a teacher with another tokenizer continues its own tokens of the prompt's text."""
    n = min(cfg.llm.report_samples, len(data.test))
    if n == 0:
        return []
    from kdkit.generation.generate import GenerationSettings, generate

    p = cfg.llm.prompt_tokens
    prompts = [data.test.ids[i, :p].tolist() for i in range(n)]
    settings = GenerationSettings(1.0, 1.0, min(cfg.llm.generation.max_new_tokens, 48), False)
    models = {"teacher": teacher.members[0].model}
    models.update({key: results[kind][0].model for kind, key in KINDS if results[kind]})
    out = [{"prompt": data.tokenizer.decode(q)} for q in prompts]
    for key, model in models.items():
        tok, rows, pad, eos = data.tokenizer, prompts, data.test.pad_id, data.test.eos_id
        if key == "teacher" and teacher_tokenizer is not None:
            tok = teacher_tokenizer
            rows = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in out]
            pad, eos = pad_id_of(tok), tok.eos_token_id
        ids = generate(model.to(device), rows, settings, pad_id=pad, eos_id=eos, seed=0, batch_size=n,
                       context_length=context_length(model))
        for row, c in zip(out, ids):
            row[key] = tok.decode(c)
    return out


def report(cfg: KDConfig, run, metrics: dict, histories: dict, recipe, extras: dict) -> None:
    """report.md; the HF student folder carries it as its model card (plots stay in the run directory); the run
    directory's sizes are added to report.md only, after the card is written."""
    from kdkit.report.lm import write_lm_report  # matplotlib: when a report is written

    path = write_lm_report(run.path, metrics=metrics, histories=histories, formula=recipe.formula,
                           config_yaml=dump_config(cfg), env=run.env, samples=extras["samples"])
    from kdkit.report.draft import draft_card

    card = path.read_text().replace("](plots/", "](../plots/")
    head = draft_card(metrics, str(run.path / "student"))
    run.write_text("student/README.md", card if head is None else head + "\n\n" + card)
    if head is not None:
        run.write_json("student/draft.json", {key: metrics["draft"][key] for key in ("target", "k")}
                       | {"on_target_text": metrics["draft"].get("on_target_text"),
                          "assisted": metrics["draft"].get("assisted"), "sampled": metrics["draft"].get("sampled")})
    append_disk_section(run.path)
