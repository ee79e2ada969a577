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


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun is not installed beside this Python",
)
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDKIT_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "200"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "kdkit",
            "train",
            str(cfg),
            "--out",
            str(tmp_path / "two"),
            "--set",
            "train.batch_size=8",
            "--set",
            "teacher.train.batch_size=8",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "env.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "env.json").read_text())["processes"] == 1
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for model in ("teacher", "student"):
        assert b[model]["accuracy"] == pytest.approx(a[model]["accuracy"], abs=1e-9)
        assert b[model]["nll"] == pytest.approx(a[model]["nll"], rel=1e-4)  # float reduction order may differ
    assert two.stdout.count("distilled student") == 1  # one process reports
