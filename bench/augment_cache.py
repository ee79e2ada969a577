"""Augmentation with an augmentation-consistent teacher cache: an epoch of kdkit training that replays K stored
teacher views, divided by a student-alone epoch (same augmentation, cross-entropy only). Goal ≤ 1.15; online KD
costs ~2.3× on these models (BENCH.md). Same models as bench/overhead.py: ResNet-110 teacher, ResNet-20 student,
batch 128, 32×32×3 synthetic data (timing only). Prints one JSON object; --write appends to docs/benchmarks.md.

    python bench/augment_cache.py [--steps 6] [--rounds 3] [--views 4] [--threads 1] [--quick] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_section, loadavg, log, machine_info, machine_line, markdown_table, median  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import torch

    from kdkit.data import TeacherCache, TensorData
    from kdkit.data.augment import Augment
    from kdkit.engine import TrainOptions, train
    from kdkit.losses import build_loss
    from kdkit.models import build_model
    from kdkit.teachers import Teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    batch, steps = (16, 2) if args.quick else (128, args.steps)
    depth_t = 8 if args.quick else 110
    g = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn(steps * batch, 3, 32, 32, generator=g), torch.randint(0, 10, (steps * batch,), generator=g)
    )
    torch.manual_seed(0)
    teacher = Teacher.from_settings(
        build_model("builtin", "resnet", {"depth": depth_t}, (3, 32, 32), 10).eval(), channels_last=True,
        fuse_bn=True, example=data.x[:8], log=lambda message: None,
    )
    aug = Augment(crop_padding=4, hflip=True)
    load_before = loadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        cache = TeacherCache.build_or_load(
            data, teacher.logits, teacher.fingerprint(), folder, batch_size=256, log=log, augment=aug, views=args.views
        )
        build_s = time.perf_counter() - started
        opts = TrainOptions(epochs=1, batch_size=batch, optimizer="sgd", lr=0.05, keep_best="none")
        kd = build_loss([("ce", 0.1, {}), ("soft_kl", 0.9, {"temperature": 4.0})])
        ce = build_loss([("ce", 1.0, {})])

        def run(mode: str) -> float:
            torch.manual_seed(1)
            student = build_model("builtin", "resnet", {"depth": 20}, (3, 32, 32), 10)
            t0 = time.perf_counter()
            if mode == "cached":
                train(student, kd, data, opts, teacher=cache, augment=aug, device="cpu", progress=False)
            else:
                train(student, ce, data, opts, augment=aug, device="cpu", progress=False)
            return time.perf_counter() - t0

        run("cached"), run("alone")  # warm-up
        times = {"cached": [], "alone": []}
        for r in range(1 if args.quick else args.rounds):
            order = ("cached", "alone") if r % 2 == 0 else ("alone", "cached")
            for mode in order:
                times[mode].append(run(mode))
            log(f"round {r + 1}: cached {times['cached'][-1]:.2f} s, alone {times['alone'][-1]:.2f} s")
    ratios = [c / a for c, a in zip(times["cached"], times["alone"])]
    result = {
        "ratio": median(ratios),
        "ratios": ratios,
        "goal": 1.15,
        "met": median(ratios) <= 1.15,
        "epoch_s": {k: median(v) for k, v in times.items()},
        "cache_build_s": build_s,
        "cache_bytes": int(cache.logits.nbytes),
        "views": args.views,
        "steps_per_epoch": steps,
        "batch": batch,
        "load_before": load_before,
        "load_after": loadavg(),
        "machine": machine_info(),
        "command": "python bench/augment_cache.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.write and not args.quick:
        rows = [
            [
                "kdkit, augmentation + consistent cache (0.1 ce + 0.9 soft_kl)",
                f"{result['epoch_s']['cached']:.2f}",
                f"**{result['ratio']:.3f}** {[round(r, 3) for r in ratios]}",
            ],
            ["kdkit, augmentation, student alone (ce)", f"{result['epoch_s']['alone']:.2f}", "1"],
        ]
        section = "\n".join(
            [
                f"## Augmentation with the consistent teacher cache ({time.strftime('%Y-%m-%d')})",
                "",
                f"ResNet-110 teacher (channels-last, folded BN) → ResNet-20 student, batch {batch}, "
                f"{steps} steps per epoch, translate ±4 px + flip; the cache holds {args.views} views per example "
                f"({result['cache_bytes']} bytes, built once in {build_s:.1f} s). Ratio = median over alternating "
                "rounds.",
                "",
                markdown_table(["configuration", "s/epoch", "ratio vs student alone (per round)"], rows),
                "",
                f"Goal ≤ 1.15: **{'met' if result['met'] else 'missed'}**. Machine: {machine_line(result['machine'])}. "
                f"Load before/after: {load_before} / {result['load_after']}. Command: `{result['command']}`.",
            ]
        )
        append_section(ROOT / "docs" / "benchmarks.md", section)


if __name__ == "__main__":
    main()
