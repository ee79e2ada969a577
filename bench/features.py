"""Feature distillation on the demo data: KD alone vs KD + each feature loss, over seeds (test accuracy).

The teacher (an ensemble of small CNNs, features from member 0) is trained once and shared; the student is the same
CNN at width 4. For every variant and seed the distilled student is trained with the same budget; the labels-only
baseline is trained too. Prints one JSON object; --write appends a section to docs/benchmarks.md.

    python bench/features.py [--seeds 0 1 2] [--epochs 10] [--quick] [--write]
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
VARIANTS = {
    "KD alone": [],
    "KD + hint (FitNets)": [
        {"name": "hint", "weight": 1.0, "params": {"student_layer": "features.5", "teacher_layer": "features.5"}}
    ],
    "KD + attention transfer": [
        {
            "name": "attention_transfer",
            "weight": 1.0,
            "params": {"pairs": [["features.2", "features.2"], ["features.5", "features.5"]]},
        }
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (figures mean nothing)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--out", default="runs/bench-features")
    args = ap.parse_args()

    import torch

    from kdkit.config import load_config
    from kdkit.data import build_data
    from kdkit.evaluate import classification_metrics
    from kdkit.evaluate.predict import predict
    from kdkit.evaluate.schema import spread
    from kdkit.tasks.classification import build_teacher

    base = load_config(ROOT / "configs" / "features_hint.yaml").model_dump(mode="json")
    base["run"].update(progress=False, tensorboard=False, seeds=args.seeds)
    base["train"]["epochs"] = args.epochs
    if args.quick:
        base["data"]["limit"] = 400
        base["teacher"]["train"]["epochs"] = 1
        base["train"]["epochs"] = 1
        base["run"]["seeds"] = args.seeds[:1]
    kd_terms = [t for t in base["distill"]["losses"] if t["name"] in ("ce", "soft_kl")]
    load_before = loadavg()
    started = time.time()
    out = Path(args.out)
    cfg0 = load_config({**base, "distill": {**base["distill"], "losses": kd_terms}})
    run = open_bench_run(out, cfg0, False, log)
    data = build_data(**cfg0.data.model_dump())
    teacher = build_teacher(cfg0, data, run)
    t_logits, labels = predict(teacher, data.test, 256)
    results = {"teacher": classification_metrics(t_logits, labels)["accuracy"], "variants": {}}
    for i, (name, extra) in enumerate(VARIANTS.items()):
        log(f"variant: {name}")
        raw = {**base, "distill": {**base["distill"], "losses": kd_terms + extra}}
        cfg = load_config(raw)
        kinds = ["baseline", "student"] if i == 0 else ["student"]
        runs, recipe = train_variant(cfg, data, teacher, out / f"v{i}", kinds)
        for kind in kinds:
            accs = []
            for r in runs[kind]:
                logits, _ = predict(r.model.eval(), data.test, 256)
                accs.append(classification_metrics(logits, labels)["accuracy"])
            key = "labels only (baseline)" if kind == "baseline" else name
            results["variants"][key] = {
                "formula": recipe.formula if kind == "student" else "total = 1*ce",
                **spread(accs),  # mean, population std, per_seed: as in metrics.json
            }
        torch.manual_seed(0)
    results.update(
        seconds=round(time.time() - started, 1),
        load_before=load_before,
        load_after=loadavg(),
        machine=machine_info(),
        seeds=base["run"]["seeds"],
        epochs=base["train"]["epochs"],
        command="python bench/features.py " + " ".join(sys.argv[1:]),
    )
    print(json.dumps(results, indent=1))
    if args.write and not args.quick:
        kd = results["variants"]["KD alone"]
        rows = []
        for key, v in results["variants"].items():
            delta = "" if key in ("KD alone",) else f"{100 * (v['mean'] - kd['mean']):+.2f}"
            rows.append([key, f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}", delta, f"`{v['formula']}`"])
        section = "\n".join(
            [
                f"## Feature distillation on MNIST-5k ({time.strftime('%Y-%m-%d')})",
                "",
                f"Teacher: ensemble of two small CNNs (width 16; features from member 0), test accuracy "
                f"{100 * results['teacher']:.2f}%. Student: the same CNN at width 4; {results['epochs']} epochs, "
                f"seeds {results['seeds']}; test accuracy, mean ± std (population) over seeds.",
                "",
                markdown_table(["student", "accuracy %", "Δ vs KD alone (pts)", "loss"], rows),
                "",
                f"Machine: {machine_line(results['machine'])}. Load before/after: {load_before} / "
                f"{results['load_after']}. Took {results['seconds']} s. Command: `{results['command']}`.",
            ]
        )
        append_section(ROOT / "docs" / "benchmarks.md", section)


if __name__ == "__main__":
    main()
