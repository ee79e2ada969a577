"""The language-model verbs as a user runs them: `kdkit cache-teacher` then `kdkit train` reading that cache, and
the one-line errors of bad language-model input (exit 2, no traceback)."""

from __future__ import annotations

import yaml
from test_bad_input import assert_user_error


def _config(tmp_path, corpus, teacher, **llm) -> dict:
    return {
        "run": {"name": "lm", "out_dir": str(tmp_path / "runs"), "seeds": [0], "progress": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "max_length": 24},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, -1]}, "baseline": False},
        "distill": {
            "losses": [{"name": "token_kl", "weight": 1.0}],
            "cache_teacher": True,
            "cache_dir": str(tmp_path / "cache"),
        },
        "llm": {"top_k": 4, "prompt_tokens": 6, "report_samples": 0, **llm},
        "train": {"epochs": 1, "batch_size": 8, "keep_best": "none"},
        "eval": {"batch_size": 8, "latency_repeats": 3},
    }


def test_cache_teacher_then_train_reads_it(cli_process, lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    cfg = tmp_path / "lm.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp_path, corpus, teacher)))
    built = cli_process("cache-teacher", cfg)
    assert built.returncode == 0, built.describe()
    assert "bytes_per_token=" in built.stdout and "k=4" in built.stdout
    trained = cli_process("train", cfg, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.describe()
    assert "teacher top-k cache: reading" in trained.stdout
    assert "perplexity" in trained.stdout and "bits/byte" in trained.stdout


def test_bad_language_model_input_is_one_line(cli, cli_process, make_config, lm_world, tmp_path):
    corpus, teacher, other = lm_world
    # One real process (what a user sees); the other cases run in this process through the same error mapping.
    # Every verb works for every task: a classifier's teacher cache is built too; with the cache off it is refused.
    off = make_config(lambda c: c["distill"].update(cache_teacher=False), name="off.yaml")
    assert_user_error(cli_process("cache-teacher", off), "distill.cache_teacher", "causal_lm")
    built = cli("cache-teacher", make_config())
    assert built.returncode == 0 and "bytes_per_example=" in built.stdout, built.describe()
    bad = _config(tmp_path, corpus, teacher)
    bad["teacher"]["members"].append({"model": {"source": "hf", "path": str(other)}})
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(bad))
    assert_user_error(cli("train", cfg, "--out", tmp_path / "r1"), "teacher.members.1")
    missing = _config(tmp_path, corpus, tmp_path / "no-such-model")
    cfg = tmp_path / "missing.yaml"
    cfg.write_text(yaml.safe_dump(missing))
    assert_user_error(cli("train", cfg, "--out", tmp_path / "r2"), "teacher.members.0.model.path", "no-such")
    long = _config(tmp_path, corpus, teacher)
    long["data"]["max_length"] = 1000
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump(long))
    assert_user_error(cli("train", cfg, "--out", tmp_path / "r3"), "data.max_length", "1000")
    gen = _config(tmp_path, corpus, teacher, sequence_level=3, generation={"max_new_tokens": 200})
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump(gen))
    assert_user_error(cli("train", cfg, "--out", tmp_path / "r4"), "llm.generation", "max_new_tokens")


def test_export_of_a_language_model_run_points_at_its_hf_folder(cli, lm_world, tmp_path):
    corpus, teacher, _ = lm_world
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_config(tmp_path, corpus, teacher)))
    assert_user_error(cli("export", run), "language-model run", "AutoModelForCausalLM")
