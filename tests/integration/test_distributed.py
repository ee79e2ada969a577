"""Two CPU processes (torchrun, gloo) give the same final metrics as one process with the same global batch,
and really are two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

CONFIG = {
    "run": {"name": "ddp", "seeds": [0], "progress": False, "tensorboard": False},
    "data": {"source": "builtin", "name": "digits", "limit": 640},
    "teacher": {
        "members": [{"model": {"name": "mlp", "kwargs": {"hidden": [32]}}}],
        "train": {"epochs": 2, "batch_size": 16},
    },
    "student": {"model": {"name": "mlp", "kwargs": {"hidden": [16]}}, "baseline": False},
    "distill": {"cache_teacher": True},
    "train": {"epochs": 2, "batch_size": 16},
    "eval": {"robustness": False, "latency_repeats": 2, "latency_warmup": 0},
}


NO_TORCHRUN = shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")
)


def _one_and_two(tmp_path, config: dict, two_sets: list[str]):
    """Run `config` in one process and under torchrun with 2 processes; return their metrics.json."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDKIT_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    sets = [x for item in two_sets for x in ("--set", item)]
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kdkit", "train", str(cfg), "--out",
         str(tmp_path / "two"), *sets],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "env.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "env.json").read_text())["processes"] == 1
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    return a, b, two


@pytest.mark.skipif(NO_TORCHRUN, reason="torchrun is not installed beside this Python")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    a, b, two = _one_and_two(tmp_path, CONFIG, ["train.batch_size=8", "teacher.train.batch_size=8"])
    for model in ("teacher", "student"):
        assert b[model]["accuracy"] == pytest.approx(a[model]["accuracy"], abs=1e-9)
        assert b[model]["nll"] == pytest.approx(a[model]["nll"], rel=1e-4)  # float reduction order may differ
    assert two.stdout.count("distilled student") == 1  # one process reports


@pytest.mark.skipif(NO_TORCHRUN, reason="torchrun is not installed beside this Python")
def test_a_trained_adapter_stays_in_step_across_processes(tmp_path):
    # A hint loss trains a linear adapter (16 → 32) beside the student; DDP averages only the student's
    # gradients, so the engine averages the adapter's: otherwise the two processes' students would drift apart.
    config = {
        **CONFIG,
        "distill": {
            "cache_teacher": False,
            "losses": [
                {"name": "ce", "weight": 0.5},
                {"name": "hint", "weight": 1.0, "params": {"student_layer": "net.2", "teacher_layer": "net.2"}},
            ],
        },
    }
    a, b, _ = _one_and_two(tmp_path, config, ["train.batch_size=8", "teacher.train.batch_size=8"])
    assert b["student"]["nll"] == pytest.approx(a["student"]["nll"], rel=1e-4)
    assert b["student"]["accuracy"] == pytest.approx(a["student"]["accuracy"], abs=1e-9)


@pytest.mark.skipif(NO_TORCHRUN, reason="torchrun is not installed beside this Python")
def test_language_model_tokens_are_counted_over_both_processes(lm_world, tmp_path):
    # Blocks of unequal real length (sequence-level examples are shorter): each process must divide by the
    # step's token count over BOTH processes, or the two-process run would weigh tokens differently.
    corpus, teacher, _ = lm_world
    config = {
        "run": {"name": "lm", "seeds": [0], "progress": False, "tensorboard": False, "device": "cpu"},
        "data": {"task": "causal_lm", "source": "text_folder", "path": str(corpus), "max_length": 24},
        "teacher": {"members": [{"model": {"source": "hf", "path": str(teacher)}}]},
        "student": {"model": {"source": "hf", "path": str(teacher), "teacher_layers": [0, 3]}, "baseline": False},
        "distill": {
            "losses": [{"name": "token_ce", "weight": 0.5}, {"name": "token_kl", "weight": 0.5}],
            "cache_teacher": True,
            "cache_dir": str(tmp_path / "lmcache"),
        },
        "llm": {"sequence_level": 6, "prompt_tokens": 6, "report_samples": 0, "generation": {"max_new_tokens": 5}},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.003, "keep_best": "none"},
        "eval": {"batch_size": 8, "latency_repeats": 3},
    }
    a, b, _ = _one_and_two(tmp_path, config, ["train.batch_size=4"])
    assert b["student"]["nll"] == pytest.approx(a["student"]["nll"], rel=1e-4)
    assert b["data"]["sequence_kd_examples"] == a["data"]["sequence_kd_examples"] == 6
