"""Feature distillation on the demo data: each distillation variant against labels only, paired by seed.

The teacher (an ensemble of small CNNs, features from member 0) is trained once and shared; the student is the same
CNN at width 4. The labels-only baseline and every variant are trained for every seed with the same budget, and each
variant's test accuracy is compared with the baseline's *of the same seed*: the mean paired difference and its
Student-t 95% interval (kdkit.evaluate.schema.paired_gain). An interval above 0 means the variant beats labels only,
below 0 that it loses, and one that holds 0 that the seeds cannot tell them apart.

The "auto" variants turn on distill.auto: before their seeds train, an Optuna study on the *validation* split
(trial 0 = the config as given, trial 1 = labels alone) chooses the teacher share, temperature and feature-loss
scale, once, on distill.auto.seeds (default: the first run seed); every seed then trains with that choice. The test
split is never seen by the choice. Prints one JSON object; --write appends a section to docs/benchmarks.md.

    python bench/features.py [--seeds 0 1 ... 9] [--epochs 10] [--auto-trials 8] [--no-auto] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    append_section,
    loadavg,
    log,
    machine_info,
    machine_line,
    markdown_table,
    open_bench_run,
    train_variant,
)

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "labels only (baseline)"
HINT = [{"name": "hint", "weight": 1.0, "params": {"student_layer": "features.5", "teacher_layer": "features.5"}}]
ATTENTION = [
    {
        "name": "attention_transfer",
        "weight": 1.0,
        "params": {"pairs": [["features.2", "features.2"], ["features.5", "features.5"]]},
    }
]
# name -> (feature terms added to ce + soft_kl, whether distill.auto chooses the weights first)
VARIANTS = {
    "KD alone": ([], False),
    "KD + hint (FitNets)": (HINT, False),
    "KD + attention transfer": (ATTENTION, False),
    "KD alone, auto": ([], True),
    "KD + attention transfer, auto": (ATTENTION, True),
}
QUICK_AUTO_TRIALS = 3  # the two enqueued trials and one the sampler picks: enough to exercise the path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--auto-trials", type=int, default=8, help="distill.auto.trials of the auto variants (>= 2)")
    ap.add_argument("--no-auto", action="store_true", help="leave out the auto variants")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (figures mean nothing)")
    ap.add_argument("--write", action="store_true", help="append a dated section to --docs (not with --quick)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--out", default="runs/bench-features")
    args = ap.parse_args(argv)
    if args.auto_trials < 2:
        ap.error(f"--auto-trials: {args.auto_trials}; expected >= 2 (the config as given and labels alone)")
    return args


def base_config(args: argparse.Namespace) -> dict:
    """configs/features_hint.yaml as a mapping, with this bench's seeds, epochs and (--quick) tiny sizes."""
    from kdkit.config import load_config

    base = load_config(ROOT / "configs" / "features_hint.yaml").model_dump(mode="json")
    base["run"].update(progress=False, tensorboard=False, seeds=args.seeds)
    base["train"]["epochs"] = args.epochs
    if args.quick:
        base["data"]["limit"] = 400
        base["teacher"]["train"]["epochs"] = 1
        base["train"]["epochs"] = 1
        base["run"]["seeds"] = args.seeds[:1]
    return base


def kd_terms(base: dict) -> list[dict]:
    """The configured soft-label KD loss (ce + soft_kl) without the config's feature term."""
    return [t for t in base["distill"]["losses"] if t["name"] in ("ce", "soft_kl")]


def auto_trials(args: argparse.Namespace) -> int:
    return min(args.auto_trials, QUICK_AUTO_TRIALS) if args.quick else args.auto_trials


def variant_config(base: dict, terms: list[dict], auto_trials: int | None) -> dict:
    """The raw config of one variant: its loss terms; distill.auto on with `auto_trials` trials when not None."""
    distill = {**base["distill"], "losses": terms}
    if auto_trials is not None:
        distill["auto"] = {**distill["auto"], "enabled": True, "trials": auto_trials}
    return {**base, "distill": distill}


def choose_setting(raw: dict, data, teacher, folder: Path) -> tuple:
    """distill.auto's choice with the already-built teacher (study in FOLDER/auto): (chosen config, its record)."""
    from kdkit.run import RunDir
    from kdkit.search.auto import choose
    from kdkit.tasks import TASKS

    task = TASKS["classification"]
    cfg = task.load_config(raw, ())
    return choose(task, raw, (), cfg, data, teacher, RunDir(folder, False, "cpu", log))


def accuracies_on_test(models, data, labels) -> list[float]:
    from kdkit.evaluate import classification_metrics
    from kdkit.evaluate.predict import predict

    return [classification_metrics(predict(m.eval(), data.test, 256)[0], labels)["accuracy"] for m in models]


def verdict(ci95: list[float] | None) -> str | None:
    """The verdict against labels only: "beats" / "loses" when the 95% interval excludes 0, "cannot be told
    apart" when it holds 0; None with one seed (no interval)."""
    if ci95 is None:
        return None
    if ci95[0] > 0:
        return "beats"
    if ci95[1] < 0:
        return "loses"
    return "cannot be told apart"


def run_variants(args: argparse.Namespace, base: dict, data, teacher, labels, out: Path) -> dict:
    """{name: {formula, mean, std, per_seed[, gain_vs_labels_only, verdict, auto]}}, the baseline first."""
    import torch

    from kdkit.config import load_config
    from kdkit.evaluate.schema import paired_gain, spread

    trials = auto_trials(args)
    variants: dict = {}
    for i, (name, (extra, auto)) in enumerate(VARIANTS.items()):
        if auto and args.no_auto:
            continue
        log(f"variant: {name}")
        raw = variant_config(base, kd_terms(base) + extra, trials if auto else None)
        record = None
        if auto:
            cfg, record = choose_setting(raw, data, teacher, out / f"v{i}")
        else:
            cfg = load_config(raw)
        kinds = ["student"] if variants else ["baseline", "student"]
        runs, recipe = train_variant(cfg, data, teacher, out / f"v{i}", kinds)
        if "baseline" in kinds:
            accs = accuracies_on_test([r.model for r in runs["baseline"]], data, labels)
            variants[BASELINE] = {"formula": "total = 1*ce", **spread(accs)}  # mean, population std, per_seed
        accs = accuracies_on_test([r.model for r in runs["student"]], data, labels)
        baseline = variants[BASELINE]["per_seed"]
        gain = paired_gain([{"accuracy": a} for a in accs], [{"accuracy": b} for b in baseline], ["accuracy"])
        variants[name] = {
            "formula": recipe.formula,  # for auto: the chosen weights and temperature
            **spread(accs),
            "gain_vs_labels_only": gain["accuracy"],  # mean, std, n, ci95 of (variant − baseline), same seed
            "verdict": verdict(gain["accuracy"]["ci95"]),
            **({"auto": record} if record is not None else {}),
        }
        torch.manual_seed(0)
    return variants


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    from kdkit.config import load_config
    from kdkit.data import build_data
    from kdkit.evaluate import classification_metrics
    from kdkit.evaluate.predict import predict
    from kdkit.tasks.classification import build_teacher

    base = base_config(args)
    load_before = loadavg()
    started = time.time()
    out = Path(args.out)
    cfg0 = load_config(variant_config(base, kd_terms(base), None))
    run = open_bench_run(out, cfg0, False, log)  # a used folder starts clean: no stale phases or auto study
    data = build_data(**cfg0.data.model_dump())
    teacher = build_teacher(cfg0, data, run)
    t_logits, labels = predict(teacher, data.test, 256)
    results = {
        "teacher": classification_metrics(t_logits, labels)["accuracy"],
        "variants": run_variants(args, base, data, teacher, labels, out),
    }
    results.update(
        seconds=round(time.time() - started, 1),
        load_before=load_before,
        load_after=loadavg(),
        machine=machine_info(),
        seeds=base["run"]["seeds"],
        epochs=base["train"]["epochs"],
        auto_trials=None if args.no_auto else auto_trials(args),
        quick=args.quick,
        command="python bench/features.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    print(json.dumps(results, indent=1))
    if args.write and not args.quick:
        append_section(args.docs, docs_section(results))
    return results


def _pts(value: float) -> str:
    return f"{100 * value:+.2f}"


def delta_cell(v: dict) -> str:
    """The Δ cell: "+0.53 [+0.10, +0.96]" (points, 95% interval); "+0.53 [—]" with one seed; "reference" for
    the baseline."""
    gain = v.get("gain_vs_labels_only")
    if gain is None:
        return "reference"
    ci = gain["ci95"]
    return f"{_pts(gain['mean'])} [{_pts(ci[0])}, {_pts(ci[1])}]" if ci is not None else f"{_pts(gain['mean'])} [—]"


def reading(results: dict) -> str:
    """One sentence from the numbers: which variants beat labels only (interval above 0), which lose (below 0),
    which cannot be told apart (interval holds 0)."""
    n = len(results["seeds"])
    rated = {k: v for k, v in results["variants"].items() if "verdict" in v}
    if n < 2:
        return f"With {n} seed there is no interval (—): no variant can be told apart from labels only."
    groups: dict[str, list[str]] = {"beats": [], "loses": [], "cannot be told apart": []}
    for name, v in rated.items():
        groups[v["verdict"]].append(f"{name} ({delta_cell(v)})")
    beats, loses, tied = (", ".join(groups[k]) or "none" for k in ("beats", "loses", "cannot be told apart"))
    return (
        f"Against labels only, paired by seed over {n} seeds (Δ in points [95% interval]): better, with an interval "
        f"above 0: {beats}; worse, with an interval below 0: {loses}; cannot be told apart (the interval holds 0): "
        f"{tied}."
    )


def auto_reading(results: dict) -> str:
    """What distill.auto chose for each auto variant, on validation (empty without auto variants)."""
    from kdkit.search.auto import auto_line

    lines = [
        f"{name}: {auto_line(v['auto']).removeprefix('auto: ')}."
        for name, v in results["variants"].items()
        if "auto" in v
    ]
    if not lines:
        return ""
    return (
        "distill.auto chose once, on the validation split, then every seed trained with that choice (test accuracy "
        "never enters the choice). " + " ".join(lines)
    )


def docs_section(results: dict) -> str:
    rows = [
        [name, f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}", delta_cell(v), f"`{v['formula']}`"]
        for name, v in results["variants"].items()
    ]
    return "\n".join(
        [
            f"## Feature distillation on MNIST-5k ({time.strftime('%Y-%m-%d')})",
            "",
            f"Teacher: ensemble of two small CNNs (width 16; features from member 0), test accuracy "
            f"{100 * results['teacher']:.2f}%. Student: the same CNN at width 4; {results['epochs']} epochs, "
            f"seeds {results['seeds']}; test accuracy, mean ± std (population) over seeds. Δ: the mean over seeds of "
            "(variant − labels only) with the same seed, in points, with its Student-t 95% interval.",
            "",
            markdown_table(["student", "accuracy %", "Δ vs labels only (pts) [95% CI]", "loss"], rows),
            "",
            reading(results),
            *(["", text] if (text := auto_reading(results)) else []),
            "",
            f"Machine: {machine_line(results['machine'])}. Load before/after: {results['load_before']} / "
            f"{results['load_after']}. Took {results['seconds']} s. Command: `{results['command']}`.",
        ]
    )


if __name__ == "__main__":
    main()
