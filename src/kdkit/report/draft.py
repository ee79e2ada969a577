"""A draft for speculative decoding in words (llm.draft.enabled; metrics.json's "draft", kdkit.tasks.draft_eval):
report.md's section and the draft folder's model card, which shows the assisted-generation call."""

from __future__ import annotations

from kdkit.report.markdown import _table

DRAFTS = (("untrained", "untrained draft"), ("baseline_student", "text-only draft"), ("student", "distilled draft"))
END_TO_END = (("", "distilled draft"), ("_baseline", "text-only draft"))


def draft_section(metrics: dict) -> str | None:
    """llm.draft: the student as the draft of speculative decoding for its target (metrics["draft"]): acceptance
    and expected tokens per target call at k on the test text and on the target's own continuations, for the
    untrained, text-only and distilled drafts; then the measured end-to-end speed-up and acceptance with HF
    assisted generation, the check that its output is the target's own, and speculative sampling's acceptance."""
    draft = metrics.get("draft")
    if not draft:
        return None
    k, target = draft["k"], draft["target"]
    rows = []
    for key, label in DRAFTS:
        if key in draft:
            curve = draft[key]["curve"]
            at_k = [curve.get(mode, {}).get(str(k)) for mode in ("temperature_1", "greedy")]
            rows.append([label, f"{draft[key]['acceptance']:.3f}",
                         *("—" if v is None else f"{v:.2f}" for v in at_k)])
    parts = [
        "## Draft for speculative decoding",
        f"Made for the target **{target['name']}** (teacher fingerprint `{target['fingerprint']}`). Acceptance: "
        "Σ min(p_target, q_draft) per position of the test text at T = 1 (1 − TVD); expected tokens per target "
        f"call when the draft proposes k = {k} tokens, estimated teacher-forced (at most {k + 1}).",
        _table(["draft", "acceptance (T = 1)", f"tokens/call, k={k}, T = 1", f"tokens/call, k={k}, greedy"], rows),
    ]
    own = target_text_table(draft.get("on_target_text"))
    if own:
        parts.append(own)
    speed = speed_table(draft.get("speed_model"))
    if speed:
        parts.append(speed)
    assisted = [(label, draft[f"assisted{s}"]) for s, label in END_TO_END if f"assisted{s}" in draft]
    if "assisted_chosen_k" in draft:
        chosen = draft["speed_model"]["chosen_k"]
        assisted.insert(1, (f"distilled draft, chosen k = {chosen}", draft["assisted_chosen_k"]))
    if assisted:
        parts.append(
            f"Measured end to end: Hugging Face assisted generation (greedy, batch 1, k = {k}) on "
            f"{assisted[0][1]['prompts']} held-out prompts, {assisted[0][1]['max_new_tokens']} new tokens each, one "
            "timed run each, alternating with the target alone (a wall-clock figure of this machine and its load); "
            "accepted: the share of the draft's tokens the target kept, of all it drafted and of those it checked "
            "(up to the first rejection in a round; the per-position rate, comparable to the estimates above).\n\n"
            + _table(["draft", "target tokens/s", "assisted tokens/s", "speed-up", "tokens/target call",
                      "accepted of drafted", "accepted of checked", "output = target's"],
                     [[label, f"{a['target_tokens_per_s']:.1f}", f"{a['assisted_tokens_per_s']:.1f}",
                       f"{a['speedup']:.2f}×", f"{a['tokens_per_target_call']:.2f}", _pct(a.get("acceptance")),
                       _pct(a.get("verified_acceptance")),
                       "yes" if a["identical"] else f"**NO: {a['mismatches']} prompt(s) differ**"]
                      for label, a in assisted])
        )
        if not all(a["identical"] for _, a in assisted):
            parts.append("**WARNING: greedy assisted generation changed the output on some prompts; speculative "
                         "decoding must give exactly the target's output. Do not ship this draft before finding why.**")
    sampled = [(label, draft[f"sampled{s}"]) for s, label in END_TO_END if f"sampled{s}" in draft]
    if sampled:
        parts.append(
            "Speculative sampling at temperature 1 (assisted generation with do_sample, the same prompts, untimed): "
            "the share of draft tokens the target accepted, of all drafted and of those it checked.\n\n"
            + _table(["draft", "accepted of drafted", "accepted of checked", "tokens/target call"],
                     [[label, _pct(s["acceptance"]), _pct(s.get("verified_acceptance")),
                       f"{s['tokens_per_target_call']:.2f}"] for label, s in sampled])
        )
    return "\n\n".join(parts)


def speed_table(model: dict | None) -> str | None:
    """The measured step costs and the expected greedy speed-up by k of each draft (kdkit.evaluate.draft_speed)."""
    if not model:
        return None
    c = model["costs"]
    rows = [[label, *(f"{v:.2f}×" for v in model["expected_speedup"][key].values())]
            for key, label in DRAFTS if key in model["expected_speedup"]]
    ks = list(next(iter(model["expected_speedup"].values())))
    return (
        f"Speed model on this machine: one target step {c['target_token_ms']:.1f} ms, one draft step "
        f"{c['draft_token_ms']:.1f} ms ({c['draft_cost_ratio']:.2f}× the target's), the target verifying k + 1 "
        "tokens " + ", ".join(f"{v:.1f}" for v in c["verify_ms"].values()) + f" ms for k = {ks[0]} … {ks[-1]}. "
        "Expected greedy speed-up E(k)·t_target / (k·t_draft + t_verify(k)), with E(k) from each draft's curve on "
        "the target's own text (an upper bound: generation's own per-round work is left out). Chosen "
        f"k = {model['chosen_k']} (expected {model['chosen_expected']:.2f}×).\n\n"
        + _table(["draft", *(f"k={k}" for k in ks)], rows)
    )


def target_text_table(own: dict | None) -> str | None:
    """Acceptance on the target's own greedy continuations (teacher-forced), mean ± std over seeds, and the gain."""
    if not own:
        return None
    rows = []
    for key, label in DRAFTS:
        if key in own:
            rows.append([label, *(_spread(own[key][mode]) for mode in ("temperature_1", "greedy"))])
    text = (
        f"On the target's own greedy continuations of {own['prompts']} held-out prompts ({own['tokens']} tokens, "
        "teacher-forced; the text a draft meets when it serves), mean ± std over seeds:\n\n"
        + _table(["draft", "acceptance (T = 1)", "acceptance (greedy)"], rows)
    )
    gain = own.get("gain")
    if gain:
        t1, greedy = gain["temperature_1"], gain["greedy"]
        text += (f"\n\nDistilled − text-only, paired by seed ({t1['n']}): {100 * t1['mean']:+.1f} ± "
                 f"{100 * t1['std']:.1f} points at T = 1, {100 * greedy['mean']:+.1f} ± {100 * greedy['std']:.1f} "
                 "points greedy.")
    return text


def draft_card(metrics: dict, folder_hint: str = "path/to/draft") -> str | None:
    """The head of the draft folder's README.md: what target it was made for, how to use it with Hugging Face
    assisted generation, and its measured figures (None for a run that is not a draft)."""
    draft = metrics.get("draft")
    if not draft:
        return None
    k, target = draft["k"], draft["target"]
    lines = [
        f"# Draft model for speculative decoding of {target['name']}",
        f"Made by kdkit for the target **{target['name']}** (teacher fingerprint `{target['fingerprint']}`, the "
        "first 12 hex digits of kdkit's TeacherEnsemble.fingerprint()). It shares the target's tokenizer. With "
        "greedy decoding the output is exactly the target's own; the draft only makes it faster when the target "
        "accepts enough of its tokens on your text and hardware — measure it there.",
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"target = AutoModelForCausalLM.from_pretrained(TARGET)   # the model named above ({target['name']})\n"
        f"draft = AutoModelForCausalLM.from_pretrained(\"{folder_hint}\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{folder_hint}\")\n"
        f"draft.generation_config.num_assistant_tokens = {k}   # draft tokens per target call\n"
        "draft.generation_config.num_assistant_tokens_schedule = \"constant\"\n"
        "inputs = tokenizer(\"To be, or not to be\", return_tensors=\"pt\")\n"
        "out = target.generate(**inputs, assistant_model=draft, do_sample=False, max_new_tokens=64)\n"
        "print(tokenizer.decode(out[0]))\n"
        "```",
    ]
    facts = [["draft tokens per target call (k)", str(k)]]
    for key, label in DRAFTS:
        if key in draft:
            facts.append([f"acceptance on the test text, T = 1 ({label})", _pct(draft[key]["acceptance"])])
    own = draft.get("on_target_text") or {}
    if "student" in own:
        facts.append(["acceptance on the target's own continuations, greedy (distilled draft, mean over seeds)",
                      _pct(own["student"]["greedy"]["mean"])])
    if "assisted" in draft:
        a = draft["assisted"]
        facts.append(["tokens per target call, greedy, measured", f"{a['tokens_per_target_call']:.2f}"])
        facts.append(["speed-up over the target alone, greedy, batch 1 (the machine that trained it)",
                      f"{a['speedup']:.2f}×"])
        facts.append(["output identical to the target's", "yes" if a["identical"] else "NO"])
    if "sampled" in draft:
        facts.append(["accepted draft tokens, sampling at T = 1", _pct(draft["sampled"]["acceptance"])])
    if "speed_model" in draft:
        sm = draft["speed_model"]
        facts.append(["k with the largest expected greedy speed-up (the machine that trained it)",
                      f"{sm['chosen_k']} ({sm['chosen_expected']:.2f}×, an upper bound)"])
    lines.append(_table(["", "value"], facts, numeric=False))
    lines.append("The run's full report follows.")
    return "\n\n".join(lines)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _spread(value) -> str:
    if isinstance(value, dict):
        return f"{100 * value['mean']:.1f}% ± {100 * value['std']:.1f}"
    return _pct(value)


def draft_summary(metrics: dict) -> str:
    """What the CLI prints after a draft run: acceptance and end-to-end figures of each draft, one line each."""
    draft = metrics["draft"]
    own = draft.get("on_target_text") or {}
    lines = [f"draft for {draft['target']['name']} (k = {draft['k']}):"]
    for key, label in DRAFTS:
        if key not in draft:
            continue
        text = f"  {label:>16}: acceptance {_pct(draft[key]['acceptance'])} on the test text"
        if key in own:
            text += f", {_spread(own[key]['greedy'])} greedy on the target's own text"
        suffix = {"student": "", "baseline_student": "_baseline"}.get(key)
        a = draft.get(f"assisted{suffix}") if suffix is not None else None
        if a:
            text += (f"; assisted generation {a['speedup']:.2f}× the target ({a['tokens_per_target_call']:.2f} "
                     f"tokens/call, output {'identical' if a['identical'] else 'NOT IDENTICAL'})")
        lines.append(text)
    gain = own.get("gain")
    if gain:
        g = gain["greedy"]
        lines.append(f"  distilled − text-only on the target's own text: {100 * g['mean']:+.1f} ± "
                     f"{100 * g['std']:.1f} points greedy, {100 * gain['temperature_1']['mean']:+.1f} at T = 1 "
                     f"(paired, {g['n']} seed(s))")
    return "\n".join(lines)
