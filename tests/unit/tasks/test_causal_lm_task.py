"""The language-model flow end to end on a tiny Llama: teacher cache, baseline and distilled students, perplexity,
report, an HF folder that transformers reloads; sequence-level and on-policy distillation; resume; bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdkit.config import load_config
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.evaluate.schema import check_metrics
from kdkit.pipeline import distill


def lm_config(corpus, teacher, tmp_path, **sections) -> dict:
    cfg = {
        "run": {"name": "lm", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {
            "task": "causal_lm",
            "source": "text_folder",
            "path": str(corpus),
            "max_length": 24,
            "val_fraction": 0.1,
            "test_fraction": 0.2,
        },
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3]}},
        "distill": {
            "losses": [{"name": "token_ce", "weight": 0.5}, {"name": "token_kl", "weight": 0.5}],
            "cache_teacher": True,
            "cache_dir": str(tmp_path / "cache"),
        },
        "llm": {"top_k": 8, "prompt_tokens": 6, "report_samples": 2, "generation": {"max_new_tokens": 5}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "keep_best": "loss"},
        "eval": {"batch_size": 8, "latency_repeats": 3},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def test_cached_teacher_run_end_to_end(lm_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus, teacher, _ = lm_world
    result = distill(lm_config(corpus, teacher, tmp_path), out=tmp_path / "run", log=lambda m: None)
    m = result.metrics
    for key in ("teacher", "baseline_student", "student"):
        assert m[key]["perplexity"] > 1.0 and 0.0 <= m[key]["accuracy"] <= 1.0
        # Bits per byte and per character of the same test text: the nll in bits, per byte / character.
        e = m[key]
        assert e["bytes"] >= e["chars"] > 0 and e["bytes"] == m["teacher"]["bytes"]
        assert e["bits_per_byte"] == pytest.approx(e["nll"] / math.log(2) * e["tokens"] / e["bytes"], rel=1e-9)
        assert e["bits_per_char"] == pytest.approx(e["nll"] / math.log(2) * e["tokens"] / e["chars"], rel=1e-9)
    assert m["gain"]["bits_per_byte"]["mean"] == pytest.approx(
        m["student"]["bits_per_byte"] - m["baseline_student"]["bits_per_byte"])
    assert m["teacher"]["kl"] == 0.0 and m["teacher"]["agreement"] == 1.0
    assert m["student"]["kl"] > 0.0
    # The teacher as a speculative-decoding target: acceptance 1 for itself, a probability for the students; tokens
    # per target call grow with k from 1 + α towards at most k + 1, for both students and both modes.
    assert m["teacher"]["acceptance"] == pytest.approx(1.0)
    assert 0.0 < m["student"]["acceptance"] < 1.0
    for mode in ("temperature_1", "greedy"):
        for key in ("student", "baseline_student"):
            curve = [m["acceptance_curve"][mode][key][str(k)] for k in range(1, 9)]
            assert all(1.0 <= e <= k + 1 for k, e in enumerate(curve, start=1)), (mode, key, curve)
            assert curve == sorted(curve)
    assert 0.0 <= m["teacher_cache"]["heldout_kl_rel_error"] <= 1.0
    assert (
        m["teacher_cache"]["k"] == 8 and m["teacher_cache"]["bytes_per_token"] <= 8 * (2 + 2) + 4 + 1
    )  # + .npy headers
    assert m["gain"]["nll"]["n"] == 1 and m["seeds"] == [0]
    assert m["cost"]["student"]["params"] < m["cost"]["teacher"]["params"]
    check_metrics(m)
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    assert "perplexity" in report and "bits/byte" in report and "Greedy continuations" in report
    assert (run / "plots" / "perplexity.png").is_file() and (run / "plots" / "acceptance.png").is_file()
    assert "The student as a draft for the teacher" in report
    # The exported student is a plain HF folder: transformers reloads it and gives the same logits.
    reloaded = AutoModelForCausalLM.from_pretrained(str(run / "student")).eval()
    AutoTokenizer.from_pretrained(str(run / "student"))
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.student.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert reloaded.config.num_hidden_layers == 2
    assert "perplexity" in (run / "student" / "README.md").read_text()  # the model card
    history = json.loads((run / "history.json").read_text())
    assert {"baseline-s0", "student-s0"} <= set(history)
    assert any("train/token_kl" in r for r in history["student-s0"])
    assert not any("train/token_kl" in r for r in history["baseline-s0"])


def test_resume_reuses_finished_phases_and_cache(lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    cfg = lm_config(corpus, teacher, tmp_path, train={"epochs": 1})
    first = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    said = []
    again = distill(cfg, out=tmp_path / "run", resume=True, log=said.append)
    assert any("finished earlier" in s for s in said)
    assert any("teacher top-k cache: reading" in s for s in said)
    assert again.metrics["student"]["nll"] == pytest.approx(first.metrics["student"]["nll"], abs=1e-6)


def test_live_teacher_with_sequence_level_and_on_policy(lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    cfg = lm_config(
        corpus,
        teacher,
        tmp_path,
        distill={"cache_teacher": False},
        llm={"sequence_level": 4, "on_policy_fraction": 0.5},
        train={"epochs": 1},
    )
    result = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    gens = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 4
    assert result.metrics["data"]["sequence_kd_examples"] == 4
    assert "teacher_cache" not in result.metrics


def test_random_init_smaller_student(lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    cfg = lm_config(
        corpus,
        teacher,
        tmp_path,
        student={
            "model": {"source": "hf", "path": str(teacher), "pretrained": False, "kwargs": {"num_hidden_layers": 1}}
        },
        train={"epochs": 1},
    )
    result = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    assert result.student.config.num_hidden_layers == 1


def test_bad_input_is_named(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = lm_config(corpus, teacher, tmp_path)
    with pytest.raises(ConfigError, match="llm.prompt_tokens: 30; expected fewer than data.max_length"):
        load_config({**cfg, "llm": {"prompt_tokens": 30}})
    with pytest.raises(ConfigError, match="on_policy_fraction: the student's own continuations need the live teacher"):
        load_config({**cfg, "llm": {"on_policy_fraction": 0.5}})
    with pytest.raises(ConfigError, match="llm: settings for language models"):
        load_config({**cfg, "data": {"source": "builtin", "name": "digits"}})
    with pytest.raises(ConfigError, match="sampling_temperature"):
        load_config({**cfg, "llm": {"generation": {"sampling_temperature": 0}}})
    mixed = lm_config(corpus, teacher, tmp_path)
    mixed["teacher"]["members"].append({"model": {"source": "hf", "path": str(other)}})
    with pytest.raises(CompatibilityError, match="teacher.members.1"):
        distill(mixed, out=tmp_path / "mixed", log=lambda m: None)


def test_hidden_state_with_a_learned_projection_on_decoder_layers(lm_world, tmp_path):
    # A narrower random-init student (16 wide vs the teacher's 32): hidden_state pairs its 2 decoder layers with
    # the teacher's layers uniformly, through projections trained with it; the projections never reach the export.
    corpus, teacher, _ = lm_world
    cfg = lm_config(
        corpus,
        teacher,
        tmp_path,
        student={
            "model": {
                "source": "hf",
                "path": str(teacher),
                "pretrained": False,
                "kwargs": {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32},
            }
        },
        distill={
            "cache_teacher": False,
            "losses": [
                {"name": "token_ce", "weight": 0.5},
                {"name": "token_kl", "weight": 0.5},
                {"name": "hidden_state", "weight": 1.0},
            ],
        },
        train={"epochs": 1},
    )
    result = distill(cfg, out=tmp_path / "run", log=lambda m: None)
    history = json.loads((tmp_path / "run" / "history.json").read_text())["student-s0"]
    assert any(r.get("train/hidden_state", 0) > 0 for r in history)
    assert result.student.config.hidden_size == 16
    plain = type(result.student)(result.student.config)
    assert set(result.student.state_dict()) == set(plain.state_dict())  # no projection leaked into the student
    cached = {**cfg, "distill": {**cfg["distill"], "cache_teacher": True}}
    with pytest.raises(ConfigError, match="feature losses need the live teacher"):
        distill(cached, out=tmp_path / "run2", log=lambda m: None)


# ---------------------------------------------------------------------------------------------------------------
# llm.draft: the student as the draft of speculative decoding for the teacher


def draft_config(corpus, teacher, tmp_path, **sections) -> dict:
    """The LM run above as a draft run: DistillSpec's TVD with a little token_ce, k = 3, two prompts end to end."""
    losses = [{"name": "token_ce", "weight": 0.1}, {"name": "token_kl", "weight": 0.9, "params": {"direction": "tvd"}}]
    train = {"epochs": 2, "keep_best": "acceptance"}
    cfg = lm_config(corpus, teacher, tmp_path, distill={"losses": losses}, train=train,
                    llm={"draft": {"enabled": True, "k": 3, "prompts": 2, "max_new_tokens": 8, "continuations": 2}})
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def test_draft_run_reports_acceptance_and_assisted_generation(lm_world, tmp_path):
    from kdkit.evaluate.schema import per_seed_of

    corpus, teacher, _ = lm_world
    said = []
    cfg = draft_config(corpus, teacher, tmp_path, run={"seeds": [0, 1]})
    result = distill(cfg, out=tmp_path / "run", log=said.append)
    m = result.metrics
    check_metrics(m)
    d = m["draft"]
    assert d["k"] == 3
    assert d["target"] == {"name": str(teacher), "fingerprint": result.teacher.fingerprint()[:12]}
    for key in ("untrained", "baseline_student", "student"):
        assert 0.0 < d[key]["acceptance"] <= 1.0, key
        for mode in ("temperature_1", "greedy"):
            curve = d[key]["curve"][mode]
            assert [int(k) for k in curve] == list(range(1, 9))
            assert all(1.0 <= e <= int(k) + 1 for k, e in curve.items()), (key, mode, curve)
    # The trained drafts' figures are the ones the run's own acceptance metrics hold; training moved the draft.
    # Both drafts are validated by the target's acceptance and kept by it (keep_best: acceptance).
    assert m["best_seed"]["by"] == "val/acceptance"
    for phase in ("baseline-s0", "student-s1"):
        history = json.loads((tmp_path / "run" / "phases" / phase / "result.json").read_text())["history"]
        accepted = [h["val/acceptance"] for h in history if "val/acceptance" in h]
        assert len(accepted) == 2 and all(0.0 < a < 1.0 for a in accepted), phase
    best = m["seeds"].index(m["best_seed"]["seed"])
    for key in ("student", "baseline_student"):
        assert d[key]["acceptance"] == pytest.approx(per_seed_of(m[key]["acceptance"])[best], abs=1e-4)
    for mode in ("temperature_1", "greedy"):
        assert d["student"]["curve"][mode] == m["acceptance_curve"][mode]["student"]
    assert d["untrained"]["acceptance"] != pytest.approx(d["student"]["acceptance"], abs=1e-6)
    for key in ("assisted", "assisted_baseline"):
        a = d[key]
        assert a["identical"] is True and a["mismatches"] == 0, a
        assert a["prompts"] == 2 and a["max_new_tokens"] == 8 and 0 < a["new_tokens"] <= 2 * 8
        assert 1.0 <= a["tokens_per_target_call"] <= 3 + 1
        assert a["target_tokens_per_s"] > 0 and a["assisted_tokens_per_s"] > 0 and a["speedup"] > 0
    for key in ("sampled", "sampled_baseline"):
        s = d[key]
        assert s["temperature"] == 1.0 and s["prompts"] == 2 and 0 < s["new_tokens"] <= 2 * 8
        assert 0.0 <= s["acceptance"] <= 1.0 and 1.0 <= s["tokens_per_target_call"] <= 3 + 1
    assert 0.0 <= d["assisted"]["acceptance"] <= 1.0
    # Acceptance on the target's own greedy continuations: every seed of both drafts, the paired gain.
    own = d["on_target_text"]
    assert own["prompts"] == 2 and 0 < own["tokens"] <= 2 * 8
    for mode in ("temperature_1", "greedy"):
        assert 0.0 <= own["untrained"][mode] <= 1.0
        for key in ("student", "baseline_student"):
            assert len(own[key][mode]["per_seed"]) == 2
        gain = own["gain"][mode]
        assert gain["n"] == 2
        assert gain["mean"] == pytest.approx(own["student"][mode]["mean"] - own["baseline_student"][mode]["mean"],
                                             abs=2e-4)
    # The speed model: measured step costs, the expected speed-up by k from the target-text curves, the chosen k.
    speed = d["speed_model"]
    assert set(speed["costs"]["verify_ms"]) == {str(k) for k in range(1, 9)}
    assert speed["costs"]["target_token_ms"] > 0 and speed["costs"]["draft_token_ms"] > 0
    chosen = speed["chosen_k"]
    assert speed["chosen_expected"] == max(speed["expected_speedup"]["student"].values())
    assert speed["expected_speedup"]["student"][str(chosen)] == speed["chosen_expected"]
    for key in ("untrained", "student", "baseline_student"):
        curve = own[key]["curve_greedy"]
        assert [int(k) for k in curve] == list(range(1, 9)) and all(1.0 <= e <= int(k) + 1 for k, e in curve.items())
    if chosen != 3:
        assert d["assisted_chosen_k"]["identical"] is True
    else:
        assert "assisted_chosen_k" not in d
    assert any(f"draft: distilled draft ({m['best_seed']['phase']})" in s and "identical" in s for s in said)
    assert "Speed model on this machine" in (tmp_path / "run" / "report.md").read_text()
    assert any("acceptance on the target's own continuations" in s for s in said)
    card = (tmp_path / "run" / "student" / "README.md").read_text()
    assert card.startswith(f"# Draft model for speculative decoding of {teacher}")
    assert "assistant_model=draft" in card and "num_assistant_tokens = 3" in card
    assert "# kdkit report" in card  # the run's report follows the card
    saved = json.loads((tmp_path / "run" / "student" / "draft.json").read_text())
    assert saved["target"] == d["target"] and saved["k"] == 3 and saved["assisted"] == d["assisted"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Draft for speculative decoding" in report
    assert d["target"]["fingerprint"] in report and str(teacher) in report
    for label in ("untrained draft", "text-only draft", "distilled draft", "tokens/call, k=3"):
        assert label in report, label


def test_draft_bad_input_is_named_in_one_line(lm_world, tmp_path):
    corpus, teacher, other = lm_world
    cfg = draft_config(corpus, teacher, tmp_path)
    with pytest.raises(ConfigError, match="llm.draft.k"):
        load_config({**cfg, "llm": {"draft": {"enabled": True, "k": 0}}})
    # A draft as big as its target (the target itself, loaded from its folder): refused before anything is trained.
    same = draft_config(corpus, teacher, tmp_path, student={"model": {"source": "hf", "path": str(teacher)}})
    with pytest.raises(CompatibilityError) as caught:
        distill(same, out=tmp_path / "same", log=lambda m: None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("student.model: the draft has ") and message.endswith("; a draft must be smaller")
    params = sum(p.numel() for p in result_model(teacher).parameters())
    assert f"the draft has {params} parameters, the target {params}" in message
    assert not (tmp_path / "same" / "phases").exists() or not any((tmp_path / "same" / "phases").iterdir())
    # A smaller draft with another tokenizer, and two targets: one line each.
    foreign = draft_config(corpus, teacher, tmp_path, student={"model": {"source": "hf", "path": str(other)}})
    with pytest.raises(CompatibilityError, match=r"^student.model: draft vocab_size: \d+; expected the target's"):
        distill(foreign, out=tmp_path / "foreign", log=lambda m: None)
    with pytest.raises(ConfigError, match="train.keep_best: acceptance is a draft's metric; set llm.draft.enabled"):
        load_config(lm_config(corpus, teacher, tmp_path, train={"keep_best": "acceptance"}))
    two = draft_config(corpus, teacher, tmp_path)
    two["teacher"]["members"].append({"model": {"source": "hf", "path": str(teacher)}})
    with pytest.raises(ConfigError, match="teacher.members: 2 members; llm.draft.enabled needs one target"):
        distill(two, out=tmp_path / "two", log=lambda m: None)


def result_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder))


def test_draft_section_reads_k_and_flags_a_changed_output():
    from kdkit.report.draft import draft_section

    curve = {"temperature_1": {"1": 1.5, "2": 1.75}, "greedy": {"1": 1.25, "2": 1.5}}
    assisted = {"prompts": 2, "max_new_tokens": 8, "new_tokens": 16, "target_tokens_per_s": 100.0,
                "assisted_tokens_per_s": 150.0, "speedup": 1.5, "tokens_per_target_call": 2.5, "identical": True,
                "mismatches": 0}
    draft = {"target": {"name": "t", "fingerprint": "abcdef012345"}, "k": 2,
             "untrained": {"acceptance": 0.25, "curve": curve}, "student": {"acceptance": 0.5, "curve": curve},
             "assisted": assisted}
    text = draft_section({"draft": draft})
    assert "**t** (teacher fingerprint `abcdef012345`)" in text
    assert "| untrained draft | 0.250 | 1.75 | 1.50 |" in text and "| distilled draft | 0.500 | 1.75 | 1.50 |" in text
    assert "text-only draft" not in text  # no baseline was trained
    assert "| distilled draft | 100.0 | 150.0 | 1.50× | 2.50 | — | — | yes |" in text and "WARNING" not in text
    changed = {**draft, "assisted": {**assisted, "identical": False, "mismatches": 1}}
    text = draft_section({"draft": changed})
    assert "**NO: 1 prompt(s) differ**" in text and "WARNING" in text
    assert draft_section({}) is None
