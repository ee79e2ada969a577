"""report.md, its plots and the terminal table, from fabricated metrics (built with evaluate.schema, so in the
schema of docs/metrics.md) and histories."""

from __future__ import annotations

import ast
import math
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console

from kdkit.evaluate.schema import assemble, check_metrics
from kdkit.report import CLASSIFICATION_COLUMNS, LM_COLUMNS, gain_line, summary_table, write_lm_report, write_report
from kdkit.report.table import summary_headers, summary_rows

ALWAYS_DRAWN = ["loss_parts.png", "val_accuracy.png", "reliability.png", "comparison.png"]
FORMULA = "total = 0.1*ce + 0.9*soft_kl(T=4)"
GAIN_KEYS = ["accuracy", "f1_macro", "ece"]


def seed_metrics(accuracy: float) -> dict:
    """One classifier's quality on one seed."""
    return {
        "accuracy": accuracy,
        "precision_macro": accuracy - 0.01,
        "recall_macro": accuracy - 0.01,
        "f1_macro": accuracy - 0.02,
        "agreement": accuracy + 0.01,
        "ece": 0.031,
    }


def model_cost(latency: float, params: int = 50_890) -> dict:
    return {
        "params": params,
        "size_mb": params * 4 / 1e6,
        "latency_ms": latency,
        "throughput": 1000 / latency,
        "batch_size": 256,
    }


def classification(
    seeds: list[int], teacher: dict, students: list[dict], baselines: list[dict] | None, costs: dict
) -> dict:
    metrics = assemble("classification", seeds, teacher, students, baselines, costs, GAIN_KEYS, None)
    check_metrics(metrics)
    return metrics


def fabricated_metrics(with_baseline: bool = True) -> dict:
    students = [seed_metrics(a) for a in (0.941, 0.945, 0.938)]
    baselines = [seed_metrics(a) for a in (0.932, 0.940, 0.931)] if with_baseline else None
    costs = {"teacher": {**model_cost(2.0, 1_200_000), "members": 2}, "student": model_cost(0.2)}
    if with_baseline:
        costs["baseline_student"] = model_cost(0.2)
    teacher = {**seed_metrics(0.975), "agreement": 1.0}
    return classification([0, 1, 2], teacher, students, baselines, costs)


def fabricated_histories(with_baseline: bool = True) -> dict:
    def phase(seed: int, parts: list[str]) -> list[dict]:
        records = []
        for epoch in range(3):
            for step in range(epoch * 10, epoch * 10 + 10, 5):
                record = {"step": step, "epoch": step / 10, "lr": 0.1}
                record.update({f"train/{p}": 2.0 / (step + 1) + seed * 0.01 for p in parts})
                record["train/total"] = sum(record[f"train/{p}"] for p in parts)
                records.append(record)
            records.append({"step": epoch * 10 + 9, "epoch": epoch + 1.0, "val/accuracy": 0.8 + 0.05 * epoch})
        return records

    histories = {"teacher-0": phase(0, ["ce"]), "teacher-1": phase(1, ["ce"])}
    for seed in range(3):
        histories[f"student-s{seed}"] = phase(seed, ["ce", "soft_kl"])
        if with_baseline:
            histories[f"baseline-s{seed}"] = phase(seed, ["ce"])
    return histories


def curve(shift: float) -> dict:
    confidence = [0.35, 0.55, 0.75, 0.95]
    return {"confidence": confidence, "accuracy": [c - shift for c in confidence], "count": [5, 10, 20, 65]}


def report(tmp_path, num_classes: int = 5, with_confusion: bool = True, with_baseline: bool = True):
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 20, size=(num_classes, num_classes)) + np.eye(num_classes, dtype=int) * 100
    curves = {"teacher": curve(0.01), "student": curve(0.03)}
    if with_baseline:
        curves["baseline_student"] = curve(0.06)
    return write_report(
        tmp_path,
        metrics=fabricated_metrics(with_baseline),
        histories=fabricated_histories(with_baseline),
        formula=FORMULA,
        config_yaml="task: classification\nstudent:\n  name: mlp\n",
        class_names=[f"class {i}" for i in range(num_classes)],
        confusion_matrix=matrix if with_confusion else None,
        reliability_curves=curves,
        env={"torch": "2.x", "seed": 0, "device": "cpu"},
    )


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG"), path
    assert len(data) > 5_000, path  # a real plot, not an empty canvas


def test_report_has_the_summary_and_every_plot(tmp_path):
    path = report(tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")
    assert FORMULA in text
    for row in ("| teacher |", "| baseline student |", "| distilled student |"):
        assert row in text
    assert "94.13 ± 0.29" in text  # student accuracy: mean ± population std over 3 seeds, in %
    assert "50,890" in text and "10.0×" in text  # speed-ups from metrics["cost"]: 2.0 ms / 0.2 ms, 5,000 / 500
    assert "The teacher is an ensemble of 2 members." in text
    assert "Students: mean ± std (population) over 3 seeds." in text
    assert "| 1 | 94.50 | 92.50 | 0.031 | 95.50 | 94.00 | 92.00 | 0.031 | +0.50 |" in text  # per seed: seed 1
    assert "Distillation gain (accuracy): +0.70 ± 0.16 points over 3 seeds, 95% CI [+0.20, +1.20]\n" in text
    assert "```yaml\ntask: classification" in text
    assert "| device | cpu |" in text
    for name in ALWAYS_DRAWN + ["confusion.png"]:
        assert f"](plots/{name})" in text
        assert_png(tmp_path / "plots" / name)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files behind
    assert plt.get_fignums() == []  # every figure was closed


def test_no_confusion_plot_above_twenty_classes(tmp_path):
    text = report(tmp_path, num_classes=21).read_text(encoding="utf-8")
    assert not (tmp_path / "plots" / "confusion.png").exists()
    assert "not drawn above 20 classes" in text


def test_no_confusion_plot_without_a_matrix_and_a_stale_one_is_removed(tmp_path):
    report(tmp_path)
    assert (tmp_path / "plots" / "confusion.png").exists()
    text = report(tmp_path, with_confusion=False).read_text(encoding="utf-8")  # the same run dir, rewritten
    assert not (tmp_path / "plots" / "confusion.png").exists()
    assert "confusion.png" not in text


def test_report_without_a_baseline(tmp_path):
    text = report(tmp_path, with_baseline=False, with_confusion=False).read_text(encoding="utf-8")
    assert "| baseline student | — | — |" in text
    assert "No baseline student was trained" in text
    assert "Distillation gain" not in text
    for name in ALWAYS_DRAWN:
        assert_png(tmp_path / "plots" / name)


def test_plots_without_data_are_skipped(tmp_path):
    costs = {"teacher": model_cost(1.0), "student": model_cost(0.5)}
    metrics = classification([0], seed_metrics(0.9), [seed_metrics(0.8)], None, costs)
    text = write_report(
        tmp_path,
        metrics=metrics,
        histories={"student-s0": [{"step": 0, "epoch": 0.0, "train/total": math.nan}], "teacher-0": []},
        formula=FORMULA,
        config_yaml="",
        class_names=[],
        confusion_matrix=None,
        reliability_curves={},
        env={},
    ).read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["comparison.png"]
    assert "loss_parts.png" not in text


def test_summary_rows_formats_and_missing_values():
    teacher = {**seed_metrics(0.9435), "agreement": math.nan}
    costs = {"teacher": model_cost(1.0), "student": model_cost(0.5)}
    metrics = classification([0], teacher, [seed_metrics(0.9)], None, costs)
    teacher, baseline, student = summary_rows(metrics)
    assert summary_headers()[5:] == [
        "params",
        "size MB",
        "latency ms",
        "examples/s",
        "speed-up (latency)",
        "speed-up (throughput)",
    ]
    assert teacher[:5] == ["teacher", "94.35", "92.35", "—", "0.031"]
    assert teacher[5:] == ["50,890", "0.204", "1.000", "1,000", "1.0×", "1.0×"]
    assert student[5:] == ["50,890", "0.204", "0.500", "2,000", "2.0×", "2.0×"]
    assert baseline == ["baseline student"] + ["—"] * 10
    assert "±" not in " ".join(student)  # a single run has no spread
    assert summary_rows(metrics, CLASSIFICATION_COLUMNS) == summary_rows(metrics)  # the default columns


def test_terminal_table_and_gain_line():
    metrics = fabricated_metrics()
    console = Console(record=True, width=200)
    console.print(summary_table(metrics))
    rendered = console.export_text()
    assert "distilled student" in rendered and "94.13 ± 0.29" in rendered
    # Differences 0.5, 0.7, 0.9 pts (hand-checked): sample std 0.2, t(0.975, 2) = 4.3027, half-width 0.50.
    assert gain_line(metrics) == "distillation gain: accuracy +0.70 ± 0.16 pts, 95% CI [+0.20, +1.20] (3 seeds)"
    assert gain_line(fabricated_metrics(with_baseline=False)) == ""


def test_gain_line_with_one_seed_has_no_spread():
    costs = {"teacher": model_cost(1.0), "student": model_cost(0.2), "baseline_student": model_cost(0.2)}
    metrics = classification([0], seed_metrics(0.99), [seed_metrics(0.95)], [seed_metrics(0.94)], costs)
    assert gain_line(metrics) == "distillation gain: accuracy +1.00 pts (1 seed)"


def test_gain_line_says_when_the_interval_contains_zero():
    costs = {"teacher": model_cost(1.0), "student": model_cost(0.2), "baseline_student": model_cost(0.2)}
    students, baselines = [seed_metrics(0.96), seed_metrics(0.93)], [seed_metrics(0.94), seed_metrics(0.94)]
    metrics = classification([0, 1], seed_metrics(0.99), students, baselines, costs)
    # Differences +2 and -1 pts: mean +0.50, sample std 2.12, t(0.975, 1) = 12.706, half-width 19.06 pts.
    assert gain_line(metrics) == (
        "distillation gain: accuracy +0.50 ± 1.50 pts, 95% CI [-18.56, +19.56], not distinguishable from no gain "
        "(2 seeds)"
    )


def test_evaluate_and_report_import_nothing_above_them():
    # evaluate/ and report/ sit above the engine and below pipeline/cli, and take no dependency on the engine.
    forbidden = ("kdkit.engine", "kdkit.pipeline", "kdkit.cli", "kdkit.serve", "kdkit.export", "kdkit.search")
    src = Path(__file__).resolve().parents[3] / "src" / "kdkit"
    for path in [*(src / "evaluate").glob("*.py"), *(src / "report").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith(forbidden), f"{path.name} imports {name}"


def test_schedules_plot_only_when_something_is_scheduled(tmp_path):
    from kdkit.report.plots import plot_schedules

    plain = {"student-s0": [{"step": s, "lr": 0.1, "train/total": 1.0} for s in range(1, 5)]}
    assert plot_schedules(plain, tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    scheduled = {
        "student-s0": [{"step": s, "lr": 0.1 / s, "sched/soft_kl.temperature": 8 - s} for s in range(1, 6)],
        "baseline-s0": [{"step": 1, "lr": 0.1}],
    }
    assert_png(plot_schedules(scheduled, tmp_path / "b.png"))
    assert plt.get_fignums() == []


def robustness_entry(per_seed: list[float], clean: list[float] | None = None) -> dict:
    """The layout of evaluate.robustness entries, built here so that this test does not import evaluate."""
    entry = {"mean": statistics.mean(per_seed), "std": statistics.pstdev(per_seed), "per_seed": per_seed}
    if clean is not None:
        drops = [c - a for c, a in zip(clean, per_seed, strict=True)]
        entry["drop"], entry["drop_std"] = statistics.mean(drops), statistics.pstdev(drops)
    return entry


def fabricated_robustness() -> dict:
    clean = {"teacher": [0.975], "baseline_student": [0.932, 0.940, 0.931], "student": [0.941, 0.945, 0.938]}
    result = {"clean": {model: robustness_entry(accs) for model, accs in clean.items()}}
    for kind, strengths in (("gaussian_noise", ["0.25", "0.5", "1.0"]), ("blur", ["0.5", "2.0"])):
        result[kind] = {}
        for i, strength in enumerate(strengths, start=1):
            result[kind][strength] = {
                model: robustness_entry([a - 0.1 * i for a in accs], accs) for model, accs in clean.items()
            }
    return result


def test_report_with_robustness_has_its_table_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    text = write_report(
        tmp_path,
        metrics=fabricated_metrics(),
        histories=fabricated_histories(),
        formula=FORMULA,
        config_yaml="",
        class_names=[f"class {i}" for i in range(3)],
        confusion_matrix=rng.integers(0, 20, size=(3, 3)),
        reliability_curves={"student": curve(0.03)},
        env={},
        robustness=fabricated_robustness(),
    ).read_text(encoding="utf-8")
    assert "## Robustness" in text
    assert "| corruption | strength | teacher | baseline student | distilled student |" in text
    assert "| clean | 0 | 97.50 | 93.43 ± 0.40 | 94.13 ± 0.29 |" in text
    assert "| gaussian noise | 1 | 67.50 | 63.43 ± 0.40 | 64.13 ± 0.29 |" in text
    assert "| blur | 2 | 77.50 | 73.43 ± 0.40 | 74.13 ± 0.29 |" in text
    assert "teacher 18.00 points" in text  # mean drop over the 5 (kind, strength) cells: (10+20+30+10+20)/5
    assert "](plots/robustness.png)" in text
    assert_png(tmp_path / "plots" / "robustness.png")
    assert plt.get_fignums() == []

    # Rewritten without robustness in the same run dir: no section, and the stale plot is removed.
    text = report(tmp_path).read_text(encoding="utf-8")
    assert "## Robustness" not in text and "robustness.png" not in text
    assert not (tmp_path / "plots" / "robustness.png").exists()


def test_robustness_plot_without_corruptions_draws_nothing(tmp_path):
    from kdkit.report.plots import plot_robustness

    clean_only = {"clean": {"teacher": {"mean": 0.9, "std": 0.0, "per_seed": [0.9]}}}
    assert plot_robustness(clean_only, tmp_path / "r.png") is None
    assert not (tmp_path / "r.png").exists()
    one_model = {**clean_only, "occlusion": {"0.1": {"teacher": {"mean": 0.8, "std": 0.0, "per_seed": [0.8]}}}}
    assert_png(plot_robustness(one_model, tmp_path / "r.png"))


def lm_metrics(seeds: list[int], with_baseline: bool = True) -> dict:
    """A causal_lm run in the schema: perplexities per seed, costs with tokens/s (blocks of 128 tokens)."""

    def scores(perplexity: float, kl: float) -> dict:
        return {
            "nll": math.log(perplexity),
            "perplexity": perplexity,
            "bits_per_byte": math.log2(perplexity) / 4,  # 4 bytes of text per token
            "accuracy": 0.4,
            "agreement": 0.6,
            "kl": kl,
            "acceptance": 1.0 - kl / 2,
            "tokens": 4096,
        }

    def lm_cost(latency: float, params: int) -> dict:
        return {**model_cost(latency, params), "tokens_per_s": 128 * 1000 / latency, "batch_size": 8}

    students = [scores(p, 0.5) for p in (20.0, 22.0, 21.0)][: len(seeds)]
    baselines = [scores(p, 0.9) for p in (24.0, 25.0, 26.0)][: len(seeds)] if with_baseline else None
    costs = {"teacher": lm_cost(8.0, 134_515_008), "student": lm_cost(2.0, 30_000_000)}
    if with_baseline:
        costs["baseline_student"] = costs["student"]
    teacher = {**scores(12.0, 0.0), "agreement": 1.0}
    best = {"phase": f"student-s{seeds[0]}", "seed": seeds[0], "by": "val/loss", "value": 3.0}
    metrics = assemble("causal_lm", seeds, teacher, students, baselines, costs, ["nll", "perplexity"], best)
    check_metrics(metrics)
    return metrics


def test_lm_summary_table_reads_the_schema():
    metrics = lm_metrics([0, 1, 2])
    assert summary_headers(LM_COLUMNS) == [
        "model",
        "perplexity",
        "bits/byte",
        "nll / token",
        "next-token acc. %",
        "top-1 agreement %",
        "KL(teacher‖model)",
        "acceptance %",
        "params",
        "size MB",
        "latency ms",
        "tokens/s",
        "speed-up (latency)",
        "speed-up (throughput)",
    ]
    teacher, baseline, student = summary_rows(metrics, LM_COLUMNS)
    assert teacher == [
        "teacher",
        "12.00",
        f"{math.log2(12.0) / 4:.3f}",
        f"{math.log(12.0):.4f}",
        "40.00",
        "100.00",
        "0.0000",
        "100.00",
        "134,515,008",
        "538.06",
        "8.000",
        "16,000",
        "1.0×",
        "1.0×",
    ]
    assert student[1] == "21.00 ± 0.82"  # mean ± population std of 20, 22, 21
    bpb = [math.log2(p) / 4 for p in (20.0, 22.0, 21.0)]
    assert student[2] == f"{statistics.mean(bpb):.3f} ± {statistics.pstdev(bpb):.3f}"
    assert student[7] == "75.00 ± 0.00"  # acceptance 1 − 0.5 / 2, the same in every seed
    assert student[8:] == ["30,000,000", "120.00", "2.000", "64,000", "4.0×", "4.0×"]
    assert baseline[1] == "25.00 ± 0.82"
    console = Console(record=True, width=250)
    console.print(summary_table(metrics, LM_COLUMNS))
    assert "21.00 ± 0.82" in console.export_text()
    # The generic gain line on the LM's headline column: paired perplexity differences -4, -3, -5.
    # Sample std 1, t(0.975, 2) = 4.3027: half-width 4.3027/√3 = 2.48.
    expected = "distillation gain: perplexity -4.00 ± 0.82, 95% CI [-6.48, -1.52] (3 seeds)"
    assert gain_line(metrics, LM_COLUMNS) == expected
    assert gain_line(lm_metrics([0], with_baseline=False), LM_COLUMNS) == ""


def test_lm_report_keeps_its_sections_and_gain_sentence(tmp_path):
    from kdkit.report.lm import gain_line as lm_gain_line
    from kdkit.report.lm import summary_rows as lm_summary_rows

    metrics = lm_metrics([0, 1, 2])
    nll = [math.log(20 / 24), math.log(22 / 25), math.log(21 / 26)]
    bpb = {p: math.log2(p) / 4 for p in (20, 21, 22, 24, 25, 26)}
    expected = (
        "Distillation vs the same student trained on the text alone: perplexity 25.00 → 21.00 (-16.0%), bits/byte "
        f"{statistics.mean([bpb[24], bpb[25], bpb[26]]):.3f} → {statistics.mean([bpb[20], bpb[22], bpb[21]]):.3f}, "
        f"nll {statistics.mean(nll):+.4f} ± {statistics.pstdev(nll):.4f} per token (paired over 3 seed(s))."
    )
    assert lm_gain_line(metrics) == expected
    # A run written before bits per byte were measured: the sentence and the table do without them.
    older = {key: ({k: v for k, v in entry.items() if k != "bits_per_byte"} if isinstance(entry, dict) else entry)
             for key, entry in metrics.items()}
    assert "bits/byte" not in lm_gain_line(older) and "perplexity 25.00 → 21.00 (-16.0%), nll" in lm_gain_line(older)
    assert lm_summary_rows(older)[2][2] == "—"
    assert [row[0] for row in lm_summary_rows(lm_metrics([0], with_baseline=False))] == ["teacher", "distilled student"]
    samples = [{"prompt": "To be", "teacher": " or not", "baseline_student": " and", "student": " or"}]
    histories = {"student-s0": [{"step": 1, "epoch": 1.0, "train/total": 2.0, "val/loss": 3.1}]}
    path = write_lm_report(
        tmp_path, metrics=metrics, histories=histories, formula=FORMULA, config_yaml="", env={}, samples=samples
    )
    text = path.read_text(encoding="utf-8")
    assert "## Test text" in text and "| distilled student | 21.00 ± 0.82 |" in text
    assert "bits/byte: −log2 p of every predicted test token, summed, ÷ the UTF-8 bytes" in text
    assert expected in text
    assert "speed-up (throughput): this model's throughput ÷ the teacher's, at batch 8" in text
    assert "Greedy continuations" in text and "](plots/perplexity.png)" in text
    assert_png(tmp_path / "plots" / "perplexity.png")
    assert plt.get_fignums() == []
