"""The whole tabular run (kdkit.pipeline.distill on an interpret config) on a small mixed-type table, its run
directory, prediction from it, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kdkit.interpret import load_run, predict_table
from kdkit.interpret.tabular import encode_target, split_rows
from kdkit.pipeline import distill

FAST = {
    "kind": "interpret",
    "run": {"name": "credit", "seeds": [0]},
    "data": {"source": "csv", "target": "outcome", "test_fraction": 0.25},
    "teacher": {"members": [{"kind": "gradient_boosting", "params": {"n_estimators": 30}}]},
    "student": {"tree": {"max_depth": 3}},
    "neighbourhood": {"points": 500, "eval_points": 300},
}
FILES = [
    "config.yaml",
    "env.json",
    "metrics.json",
    "history.json",
    "report.md",
    "student/encoder.json",
    "student/rules.txt",
    "student/student.json",
    "phases/student-s0/student.json",
    "phases/baseline-s0/student.json",  # the same tree on the labels alone
    "plots/importance.png",
    "plots/fidelity.png",
    "plots/accuracy.png",
]


@pytest.fixture(scope="module")
def credit_csv(tmp_path_factory) -> Path:
    """A credit-like table: numbers with gaps, a category with a missing level, a bool, a text target."""
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n).astype(float),
            "income": rng.lognormal(3, 0.5, n).round(2),
            "purpose": rng.choice(["car", "house", "study"], n),
            "owner": rng.random(n) < 0.4,
        }
    )
    score = 0.05 * (frame["age"] - 45) + 0.08 * (frame["income"] - 20) + 1.5 * (frame["purpose"] == "house")
    frame["outcome"] = np.where(score + rng.normal(0, 0.7, n) > 0, "good", "bad")
    frame.loc[rng.choice(n, 30, replace=False), "age"] = np.nan
    frame.loc[rng.choice(n, 20, replace=False), "purpose"] = None
    path = tmp_path_factory.mktemp("data") / "credit.csv"
    frame.to_csv(path, index=False)
    return path


def _config(tmp_path: Path, csv: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(FAST))
    cfg["data"]["path"] = str(csv)
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "interpret.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_writes_the_run_directory_and_predicts_from_it(tmp_path, credit_csv):
    lines = []
    run = distill(_config(tmp_path, credit_csv), out=tmp_path / "run", log=lines.append).run_dir
    for name in FILES + ["plots/tree.png"]:
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["task"] == "tabular"
    for model, key in (
        ("teacher", "accuracy"),
        ("student", "accuracy"),
        ("baseline_student", "accuracy"),
        ("student", "fidelity_test"),
        ("student", "fidelity_neighbourhood"),
        ("student", "leaves"),
        ("student", "rules"),
    ):
        assert key in saved[model], (model, key)
    s = saved["student"]  # one seed: plain numbers
    assert s["fidelity_test"] > 0.8 and s["depth"] <= 3
    assert set(saved["per_class"]["test"]) == {"bad", "good"}
    encoder = json.loads((run / "student" / "encoder.json").read_text())
    age = next(c for c in encoder["numeric"] if c["name"] == "age")
    assert age["missing"] > 0 and encoder["categorical"][0]["levels"][-1] == "(missing)"
    assert "rule 1: IF" in (run / "student" / "rules.txt").read_text()
    assert "## Fidelity per class" in (run / "report.md").read_text()
    assert any(line.startswith("student-s0: teacher") for line in lines)

    # Prediction from the saved encoder + student reproduces the student's test accuracy in metrics.json
    frame = pd.read_csv(credit_csv)
    y, _, keep = encode_target(frame, "outcome")
    _, test = split_rows(y, 0.25, 0)
    probs = predict_table(run, frame.iloc[test].drop(columns=["outcome"]))
    assert probs.shape == (len(test), 2) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(1) == y[test]).mean() == pytest.approx(s["accuracy"])

    if importlib.util.find_spec("skops") is not None:  # the scikit-learn objects, saved safely, predict the same
        import skops.io as sio

        assert (run / "teachers" / "member_0.skops").is_file()
        path = run / "student" / "student.skops"
        tree = sio.load(path, trusted=sio.get_untrusted_types(file=path))
        encoder, _ = load_run(run)
        assert np.allclose(tree.predict(encoder.transform(frame.iloc[test])), probs, atol=1e-5)


def test_logistic_student_writes_its_coefficients(tmp_path, credit_csv):
    config = _config(tmp_path, credit_csv, student={"kind": "logistic_l1", "logistic": {"C": 0.5}})
    result = distill(config, out=tmp_path / "run", log=lambda _: None)
    run = result.run_dir
    for name in FILES:
        assert (run / name).is_file(), name
    assert not (run / "plots" / "tree.png").exists()
    text = (run / "student" / "rules.txt").read_text()
    assert "## good" in text and "income" in text
    assert result.metrics["student"]["fidelity_test"] > 0.8


def _cli(*args: str, capsys) -> tuple[int, str, str]:
    from kdkit.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_input_exits_2_with_one_line(tmp_path, credit_csv, capsys):
    config = _config(tmp_path, credit_csv)
    code, _, err = _cli("interpret", str(config), "--set", "student.tree.max_depth=0", capsys=capsys)
    assert code == 2 and "student.tree.max_depth: got 0; input should be greater than 0" in err
    code, _, err = _cli("interpret", str(config), "--set", "data.features=[age, incom]", capsys=capsys)
    assert code == 2 and "'incom'" in err and "columns found: age, income, purpose, owner, outcome" in err
    one_class = tmp_path / "one.csv"
    pd.read_csv(credit_csv).assign(outcome="good").to_csv(one_class, index=False)
    code, _, err = _cli("interpret", str(config), "--set", f"data.path={one_class}", capsys=capsys)
    assert code == 2 and "one class" in err
    code, _, err = _cli("demo", "tabulr", capsys=capsys)
    assert code == 2 and "did you mean: tabular" in err and "main, text, llm, llm-cross, draft, tabular" in err
    for _, _, e in [(code, None, err)]:
        assert "Traceback" not in e
    code, out, _ = _cli("validate", str(config), capsys=capsys)
    assert code == 0 and ": ok" in out


def test_demo_tabular_runs_as_a_process(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env.pop("KDKIT_DEBUG", None)
    small = [
        "run.seeds=[0]",
        "run.save_skops=false",
        "neighbourhood.points=500",
        "neighbourhood.eval_points=300",
        "teacher.members.0.params.n_estimators=20",
    ]
    args = [sys.executable, "-m", "kdkit", "demo", "tabular", "--out", str(out)]
    for item in small:
        args += ["--set", item]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "distilled" in result.stdout and "fidelity test" in result.stdout  # the summary table
    assert (out / "report.md").is_file() and (out / "plots" / "tree.png").is_file()
    assert (out / "student" / "student.json").is_file() and not (out / "student" / "student.skops").exists()


def test_demo_without_argument_still_runs_the_main_demo(monkeypatch, capsys):
    """`kdkit demo` and `kdkit demo main` call the main pipeline with demo.yaml, --out and --set as before."""
    import types

    from kdkit.errors import KdkitError

    def fake_distill(config, out=None, overrides=(), log=None, **_):  # resume=... too (kdkit train)
        raise KdkitError(f"main demo: {Path(config).name} out={out} overrides={list(overrides)}")

    monkeypatch.setitem(sys.modules, "kdkit.pipeline", types.SimpleNamespace(distill=fake_distill))
    for argv in (["demo"], ["demo", "main"]):
        code, _, err = _cli(*argv, "--out", "x", "--set", "train.epochs=1", capsys=capsys)
        assert code == 2 and "main demo: demo.yaml out=x overrides=['train.epochs=1']" in err
