"""The causal_lm task's evaluation of a draft for speculative decoding (llm.draft.enabled): metrics.json's "draft".

The teacher is the target; the student is its draft. What the draft is worth is how often the target accepts its
tokens, measured four ways, each for the draft before training, trained on the text alone and distilled:

- on the test text, teacher-forced (acceptance and the curve by k come from lm_metrics' forward passes);
- on the target's own greedy continuations of held-out prompts, teacher-forced, for every seed (the text a draft
  meets when it serves: the target writes it) — `on_target_text`, with the paired distilled − text-only gain;
- end to end with Hugging Face assisted generation, greedy: tokens/s against the target alone, the measured
  acceptance, and the check that every output is the target's own (`assisted`, `assisted_baseline`);
- end to end with sampling at temperature 1 (speculative sampling's acceptance, untimed; `sampled`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdkit.config import KDConfig
from kdkit.data.lm import LMBundle
from kdkit.evaluate.schema import paired_gain, spread
from kdkit.run.phases import KINDS
from kdkit.teachers import TeacherEnsemble

DRAFT_MODES = (("temperature_1", 1.0), ("greedy", 0.0))  # acceptance at T = 1 (Σ min(p, q)) and greedy (argmax)
KS = tuple(range(1, 9))  # draft tokens per target call the curves and the cost model cover


def draft_metrics(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, results: dict, phases: dict[str, str],
                  scores: dict, curves: dict, untrained: nn.Module, device: str,
                  log: Callable[[str], None]) -> dict:
    """metrics.json's "draft" (llm.draft.enabled): the student as the draft of speculative decoding for the teacher.

    target: the teacher's name and fingerprint (its first 12 hex digits); k: draft tokens per target call.
    untrained / baseline_student / student: {"acceptance": Σ min(p, q) per position at T = 1, "curve": {mode:
    {k: expected tokens per target call}}} on the test text, for the draft before training, trained on the text
    alone and distilled (the best seed's). on_target_text: see target_text_acceptance. assisted (assisted_baseline):
    HF greedy assisted generation of the first llm.draft.prompts test prompts, target alone vs target + draft, with
    the check that the outputs are the target's own: identical False is logged loudly, not raised, so the run keeps
    its figures. sampled (sampled_baseline): speculative sampling at temperature 1 on the same prompts, untimed.
    """
    d = cfg.llm.draft
    target = teacher.members[0].model
    out: dict = {
        "target": {"name": cfg.teacher.members[0].model.path, "fingerprint": teacher.fingerprint()[:12]},
        "k": d.k,
    }
    for key, phase in phases.items():
        curve = {mode: by_key[key] for mode, by_key in curves.items()}
        out[key] = {"acceptance": round(scores[phase]["acceptance"], 4), "curve": curve}
    best_seed = next(r.phase.seed for r in results["student"] if r.phase.name == phases["student"])
    own = target_text_acceptance(cfg, data, target, results, untrained, best_seed, device, log)
    out["on_target_text"] = own
    prompts = held_out_prompts(cfg, data, d.prompts)
    trained = {r.phase.name: r.model for kind, _ in KINDS for r in results[kind]}
    out["speed_model"] = speed_model(target, trained[phases["student"]].to(device), prompts[0], own, log)
    chosen = out["speed_model"]["chosen_k"]
    for key, suffix in (("student", ""), ("baseline_student", "_baseline")):
        if key in phases:
            model = trained[phases[key]].to(device)
            what = f"{'distilled' if key == 'student' else 'text-only'} draft ({phases[key]})"
            out[f"assisted{suffix}"] = assisted(target, model, prompts, d.k, d.max_new_tokens, data.test.eos_id,
                                                what, log)
            if key == "student" and chosen != d.k:
                out["assisted_chosen_k"] = assisted(target, model, prompts, chosen, d.max_new_tokens,
                                                    data.test.eos_id, f"{what} at the chosen k = {chosen}", log)
            out[f"sampled{suffix}"] = sampled(target, model, prompts, d.k, d.max_new_tokens, data.test.eos_id,
                                              what, log)
    return out


def speed_model(target: nn.Module, draft: nn.Module, prompt: list[int], own: dict,
                log: Callable[[str], None]) -> dict:
    """The costs of one decoding step of each model and of the target's verifying pass for every k, measured on this
    machine (kdkit.evaluate.draft_speed), and the expected speed-up by k from each draft's greedy curve on the
    target's own text; chosen_k: the k with the largest expected speed-up of the distilled draft."""
    from kdkit.evaluate.draft_speed import best_k, measure_decode_costs, speedup_by_k

    costs = measure_decode_costs(target, draft, prompt, KS)
    expected = {key: {str(k): round(v, 3) for k, v in speedup_by_k(own[key]["curve_greedy"], costs).items()}
                for key in ("untrained", "baseline_student", "student") if key in own}
    k, speed = best_k(own["student"]["curve_greedy"], costs)
    log(f"draft: one target step {1e3 * costs.target_token_s:.1f} ms, one draft step {1e3 * costs.draft_token_s:.1f} "
        f"ms ({costs.draft_token_s / costs.target_token_s:.2f}×), verifying k = {k} tokens "
        f"{1e3 * costs.verify_s[k]:.1f} ms; expected greedy speed-up at most {speed:.2f}× at k = {k}")
    return {"costs": costs.as_dict(), "expected_speedup": expected, "chosen_k": k, "chosen_expected": round(speed, 3)}


def held_out_prompts(cfg: KDConfig, data: LMBundle, n: int) -> list[list[int]]:
    """The first llm.prompt_tokens tokens of the first n test blocks."""
    lengths = data.test.lengths.tolist()
    p = cfg.llm.prompt_tokens
    return [data.test.ids[i, : min(p, lengths[i])].tolist() for i in range(min(n, len(data.test)))]


def target_text_acceptance(cfg: KDConfig, data: LMBundle, target: nn.Module, results: dict, untrained: nn.Module,
                           best_seed: int, device: str, log: Callable[[str], None]) -> dict:
    """Acceptance on the target's own greedy continuations of llm.draft.continuations test prompts
    (llm.draft.max_new_tokens each), teacher-forced, at T = 1 and greedy, for the untrained draft and every seed
    of the distilled and text-only drafts; gain: distilled − text-only, paired by seed.

    {"prompts", "tokens", "untrained": {mode: α}, "student" / "baseline_student": {mode: spread over seeds},
    "gain": {mode: {"mean", "std", "n"}}}; each draft's "curve_greedy" ({k: expected tokens per target call}) is
    the best seed's. Only the continuation's positions count (the prompt is context).
    """
    from kdkit.generation.generate import GenerationSettings, generate

    d = cfg.llm.draft
    prompts = held_out_prompts(cfg, data, d.continuations)
    settings = GenerationSettings(1.0, 1.0, d.max_new_tokens, False)
    completions = generate(target.to(device), prompts, settings, pad_id=data.test.pad_id, eos_id=data.test.eos_id,
                           seed=0, batch_size=8)
    inputs, labels = continuation_batch(prompts, completions, data.test.pad_id)
    drafts: dict[str, list[nn.Module]] = {"untrained": [untrained]}
    for kind, key in KINDS:
        if results[kind]:
            drafts[key] = [r.model for r in results[kind]]
    with torch.inference_mode():  # the target's logits once, for every draft
        target_logits = target.to(device).eval()(inputs.to(device)).logits
    scored = {key: [continuation_acceptance(target_logits, m, inputs, labels, device) for m in models]
              for key, models in drafts.items()}
    per_draft = {key: [acceptance for acceptance, _ in runs] for key, runs in scored.items()}
    out: dict = {"prompts": len(prompts), "tokens": int((labels[:, 1:] != -100).sum())}
    out["untrained"] = {**per_draft.pop("untrained")[0], "curve_greedy": scored["untrained"][0][1]}
    seeds = [r.phase.seed for r in results["student"]]
    for key, per_seed in per_draft.items():
        out[key] = {mode: {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v])
                           for k, v in spread([s[mode] for s in per_seed]).items()} for mode, _ in DRAFT_MODES}
        # the greedy curve of the best seed's draft (the one assisted generation runs), for choosing k
        index = seeds.index(best_seed) if best_seed in seeds else 0
        out[key]["curve_greedy"] = scored[key][index][1]
    if "student" in per_draft and "baseline_student" in per_draft:
        gain = paired_gain(per_draft["student"], per_draft["baseline_student"], [m for m, _ in DRAFT_MODES])
        out["gain"] = {mode: {k: round(v, 4) if isinstance(v, float) else v for k, v in g.items()}
                       for mode, g in gain.items()}
        g = out["gain"]["temperature_1"]
        log(f"draft: acceptance on the target's own continuations ({out['tokens']} tokens), distilled − text-only: "
            f"{100 * g['mean']:+.1f} ± {100 * g['std']:.1f} points at T = 1 over {g['n']} seed(s)")
    return out


def continuation_batch(prompts: list[list[int]], completions: list[list[int]],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) (B, L) right-padded: prompt + completion, labels -100 on the prompt and the padding, so
    that with shift=True exactly the completion's tokens are predicted (the first from the last prompt token)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    inputs = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c, dtype=torch.long)
        inputs[row, : len(seq)] = seq
        labels[row, len(p) : len(seq)] = seq[len(p) :]
    return inputs, labels


def continuation_acceptance(target_logits: torch.Tensor, draft: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                            device: str, ks: tuple[int, ...] = KS) -> tuple[dict[str, float], dict[str, float]]:
    """({mode: mean acceptance}, {k: expected tokens per target call, greedy}) of `draft` for the target
    whose logits on `inputs` are target_logits, on (inputs, labels), teacher-forced (shift=True)."""
    from kdkit.evaluate.acceptance import acceptance_curve, mean_acceptance, token_acceptance

    with torch.inference_mode():
        ids = inputs.to(device)
        t = target_logits
        q = draft.to(device).eval()(ids).logits
        v = min(t.shape[-1], q.shape[-1])  # a padded output layer: the shared ids
        y = labels.to(device)
        alpha = {mode: token_acceptance(q[..., :v], t[..., :v], y, temperature=tau).cpu() for mode, tau in DRAFT_MODES}
    curve = {str(k): round(e, 4) for k, e in acceptance_curve(alpha["greedy"], ks).items()}
    return {mode: mean_acceptance(a) for mode, a in alpha.items()}, curve


def assisted(target: nn.Module, draft: nn.Module, prompts: list[list[int]], k: int, max_new_tokens: int, eos_id,
             what: str, log: Callable[[str], None]) -> dict:
    """compare_assisted (greedy, batch 1, one timed run of each prompt, not strict) as a dict for metrics.json."""
    from kdkit.generation.assisted import compare_assisted

    c = compare_assisted(target, draft, prompts, max_new_tokens, k, repeats=1, strict=False, eos_token_id=eos_id)
    if not c.identical:
        log(f"WARNING draft: {what}: greedy assisted generation differs from the target's own output on prompts "
            f"{c.mismatches}; speculative decoding must not change the output")
    log(f"draft: {what}: {c.speedup:.2f}× the target's tokens/s at k = {k} ({c.tokens_per_target_call:.2f} tokens "
        f"per target call, {c.acceptance:.1%} of draft tokens accepted), outputs "
        f"{'identical' if c.identical else 'NOT IDENTICAL'}")
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "new_tokens": c.new_tokens,
        "target_tokens_per_s": round(c.target_tokens_per_s, 2),
        "assisted_tokens_per_s": round(c.assisted_tokens_per_s, 2),
        "speedup": round(c.speedup, 3),
        "tokens_per_target_call": round(c.tokens_per_target_call, 3),
        "acceptance": round(c.acceptance, 4),
        "verified_acceptance": round(c.verified_acceptance, 4),
        "identical": c.identical,
        "mismatches": len(c.mismatches),
    }


def sampled(target: nn.Module, draft: nn.Module, prompts: list[list[int]], k: int, max_new_tokens: int, eos_id,
            what: str, log: Callable[[str], None]) -> dict:
    """sampled_acceptance (speculative sampling at temperature 1, batch 1, untimed) as a dict for metrics.json."""
    from kdkit.generation.assisted import sampled_acceptance

    s = sampled_acceptance(target, draft, prompts, max_new_tokens, k, temperature=1.0, seed=0, eos_token_id=eos_id)
    log(f"draft: {what}: sampling at T = 1, {s.acceptance:.1%} of draft tokens accepted "
        f"({s.tokens_per_target_call:.2f} tokens per target call)")
    return {
        "prompts": len(prompts),
        "temperature": s.temperature,
        "new_tokens": s.new_tokens,
        "acceptance": round(s.acceptance, 4),
        "verified_acceptance": round(s.verified_acceptance, 4),
        "tokens_per_target_call": round(s.tokens_per_target_call, 3),
    }
