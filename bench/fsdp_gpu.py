"""GPU check of kdkit's engine: bf16 mixed precision and FSDP2 (one process) on a small random-init Llama.

    python bench/fsdp_gpu.py                 # on a machine with one CUDA GPU; prints one JSON object
    python bench/fsdp_gpu.py --device cpu --small --no-fsdp   # a smoke test of the script itself (no GPU)

Four runs of `kdkit.engine.train` with the token cross-entropy on random token blocks, same seed and data:
  plain fp32, plain bf16 (train.precision: bf16 = autocast), and the same two sharded with FSDP2, each started as
  `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 bench/fsdp_gpu.py --worker ...`.
Reported per run: final training loss (finite?), held-out loss of the returned student (computed in fp32), peak
GPU memory, training tokens/s (including the one-off setup), and the checks: bf16 vs fp32 held-out loss (relative
difference), FSDP vs plain final weights (max |Δ|, fp32; one process, so only reduction order may differ), and
that the student comes back as a plain (unsharded) module.

Imports only torch, transformers, accelerate and kdkit's engine, losses, data and types (no pydantic/typer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from kdkit.data.lm import LMData  # noqa: E402
from kdkit.engine import TrainOptions, train  # noqa: E402
from kdkit.losses import build_loss  # noqa: E402

SHAPES = {  # name → (vocab, hidden, intermediate, layers, heads, block length, blocks, batch)
    "small": (32000, 512, 1408, 8, 8, 256, 1024, 8),  # ~42M parameters (33M of them in embeddings + head)
    "tiny": (128, 32, 64, 2, 4, 16, 32, 4),
}


def build_model(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, inter, layers, heads, *_ = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg)


def build_data(shape: str) -> tuple[LMData, LMData]:
    vocab, *_, block, blocks, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    # A learnable stream: each block repeats a short random pattern, so the loss falls well below log(vocab).
    pattern = torch.randint(1, vocab, (blocks + 16, 8), generator=g)
    ids = pattern.repeat(1, math.ceil(block / 8))[:, :block]
    return LMData(ids[:blocks], None, pad_id=0), LMData(ids[blocks:], None, pad_id=0)


def held_out_loss(model, val: LMData, device: str) -> float:
    model = model.to(device).float().eval()
    batch = val.collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        logits = model(batch.inputs.to(device)).logits.float()
    labels = batch.labels.to(device)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    return float(nll)


def one_run(shape: str, precision: str, device: str, weights_out: Path | None) -> dict:
    *_, batch = SHAPES[shape]
    train_data, val = build_data(shape)
    model = build_model(shape)
    opts = TrainOptions(
        epochs=2,
        batch_size=batch,
        optimizer="adamw",
        lr=3e-3,
        schedule="constant",
        grad_clip=1.0,
        precision=precision,
        keep_best="none",
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(
        model,
        build_loss([("token_ce", 1.0, {})]),
        train_data,
        opts,
        seed=0,
        device=device,
        progress=False,
        log=lambda _: None,
    )
    seconds = time.perf_counter() - started
    from accelerate.state import PartialState

    train_loss = result.history[-1]["train/total"]
    out = {
        "precision": precision,
        "processes": PartialState().num_processes,
        "distributed_type": str(PartialState().distributed_type),
        "student_class": type(model).__name__,
        "plain_tensors": all(type(p.data) is torch.Tensor for p in model.parameters()),
        "steps": result.steps,
        "train_loss_first": result.history[0]["train/total"],
        "train_loss_final": train_loss,
        "loss_finite": math.isfinite(train_loss),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
        "tokens_per_s": round(opts.epochs * len(train_data) * train_data.block_size / seconds),
        "seconds": round(seconds, 2),
    }
    out["held_out_loss"] = held_out_loss(model, val, device)
    if weights_out is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(weights_out))
    return out


def launch_fsdp(shape: str, precision: str, folder: Path) -> dict:
    """This script as one FSDP2 process under Accelerate's launcher; returns its JSON."""
    out = folder / f"fsdp_{precision}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "1",
        str(Path(__file__).resolve()),
        "--worker",
        precision,
        "--shape",
        shape,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    return json.loads(out.read_text())


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="the tiny shape (a smoke test)")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--no-fsdp", action="store_true")
    ap.add_argument("--worker", default=None, help="internal: one FSDP run at this precision")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = args.shape or ("tiny" if args.small else "small")

    if args.worker:  # inside `accelerate launch` with the FSDP config
        out = Path(args.out)
        r = one_run(shape, args.worker, "cuda", out.with_suffix(".safetensors"))
        out.write_text(json.dumps(r))
        return

    folder = Path(tempfile.mkdtemp(prefix="kdkit_fsdp_gpu_"))
    report: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "shape": dict(
            zip(("vocab", "hidden", "intermediate", "layers", "heads", "block", "blocks", "batch"), SHAPES[shape])
        ),
        "parameters": sum(p.numel() for p in build_model(shape).parameters()),
    }
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[f"plain_{precision}"] = one_run(shape, precision, args.device, folder / f"plain_{precision}.safetensors")
    if not args.no_fsdp:
        for precision in ("fp32", "bf16"):
            runs[f"fsdp_{precision}"] = launch_fsdp(shape, precision, folder)
    report["runs"] = runs

    def rel(a: str, b: str) -> float | None:
        if "held_out_loss" not in runs.get(a, {}) or "held_out_loss" not in runs.get(b, {}):
            return None
        x, y = runs[a]["held_out_loss"], runs[b]["held_out_loss"]
        return abs(x - y) / abs(y)

    checks = {
        "all_losses_finite": all(r.get("loss_finite", False) for r in runs.values()),
        "bf16_vs_fp32_held_out_rel_diff": rel("plain_bf16", "plain_fp32"),
        "loss_fell": all(r.get("train_loss_final", 1e9) < r.get("train_loss_first", 0) for r in runs.values()),
    }
    if not args.no_fsdp:
        checks["fsdp_bf16_vs_fp32_held_out_rel_diff"] = rel("fsdp_bf16", "fsdp_fp32")
        checks["fsdp_vs_plain_fp32_held_out_rel_diff"] = rel("fsdp_fp32", "plain_fp32")
        if (folder / "fsdp_fp32.safetensors").exists():
            checks["fsdp_vs_plain_fp32_max_abs_weight_diff"] = max_abs_diff(
                folder / "fsdp_fp32.safetensors", folder / "plain_fp32.safetensors"
            )
        checks["fsdp_student_plain"] = all(
            runs[k].get("plain_tensors") and runs[k].get("student_class") == "LlamaForCausalLM"
            for k in ("fsdp_fp32", "fsdp_bf16")
        )
        checks["fsdp_really_sharded"] = all(
            runs[k].get("distributed_type") == "DistributedType.FSDP" for k in ("fsdp_fp32", "fsdp_bf16")
        )
    report["checks"] = checks
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
