"""kdkit's token-level distillation step against TRL's GKDTrainer: tokens/s and peak memory (issue #5).

Same teacher, student, data, sequence length, batch, precision (fp32) and temperature (1) for both tools:
random-init LlamaForCausalLM teacher and student with SmolLM2's vocabulary (49,152 ids), synthetic token blocks
(random ids; speed does not depend on which ids they are), forward KL(teacher ‖ student) per real token.

- kdkit: `kdkit.engine.train()` with `token_kl` (direction forward) and a live teacher, as a config gets it by
  default ("kdkit, default": the fused head, kdkit.losses.fused_head — student and teacher give their last hidden
  state and head, the logits are made a chunk at a time) and, for comparison, on whole logits (the fused head off)
  at several chunk sizes (None: the whole (B, T, V) at once).
- TRL: `trl.experimental.gkd.GKDTrainer(...).train()` with lmbda=0 (no on-policy generation: every batch is the
  data's), beta=0 and fp32, no gradient checkpointing. In TRL 1.16's generalized_jsd_loss, beta=0 is
  `F.kl_div(student_log_probs, teacher_log_probs, log_target=True)` = Σ p_teacher (log p_teacher − log q_student),
  i.e. forward KL(teacher ‖ student) — the same end convention as kdkit's `jsd` (β weights the teacher's end).
  compute_loss applies no KD temperature (GKDConfig.temperature is the sampling temperature), so T = 1 on both sides.

Method (/work/shared/BENCH.md): every (tool, configuration) runs in a fresh subprocess, so one configuration's
memory peak cannot hide another's; rounds alternate the tools (A B C … then reversed). A step is timed end to end,
from the start of one step to the start of the next (data fetch, teacher forward, student forward, loss, backward,
clipping, optimizer step, logging): kdkit's steps are timestamped when the engine calls the teacher, TRL's by a
TrainerCallback's on_step_begin (it runs `trainer.train()` with max_steps). Speed is the median over the steps after
a warm-up; memory is the peak RSS (ru_maxrss) minus the RSS after the models and data were built, so both tools are
charged for their training step and their own setup only. With `--device cuda` timing synchronises the GPU at every
timestamp and memory is torch.cuda.max_memory_allocated minus the allocation after building.

A side check runs both losses on one identical, partly padded batch and compares them with an independent float64
reference (loss values, and the gradients they send into the student).

    python bench/llm.py               # prints one JSON object on stdout (~5 min on 2 quiet cores)
    python bench/llm.py --write       # and appends a dated section to docs/benchmarks.md
    python bench/llm.py --device cuda # on a GPU machine (bigger batch by default)
    python bench/llm.py --quick       # seconds: tiny models, in-process; for the smoke test, figures mean nothing
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from math import nan
from pathlib import Path

from common import (  # noqa: I001
    CpuWatch,
    add_run_args,
    loadavg,
    log,
    machine_info,
    machine_line,
    markdown_table,
    median,
    report_result,
    wait_for_quiet,
)

SPEED_GOAL = {"cpu": 2.2, "cuda": 1.3}  # kdkit tokens/s ÷ TRL tokens/s with the default settings, at least (#17)
MEMORY_GOAL = 0.5  # kdkit peak ÷ TRL peak with the default settings, at most (#17)
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 49_152  # SmolLM2's vocabulary (issue #5 asks for ≥ 32k)
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    teacher_layers: int = 4
    student_layers: int = 2
    batch_size: int = 4
    seq_len: int = 256
    warmup_steps: int = 2
    steps: int = 5  # timed steps per run (median)
    rounds: int = 2  # runs per configuration, alternated
    chunk_sizes: tuple[int | None, ...] = (None, 64)  # the logits path, beside the default (fused) one
    lr: float = 1e-4
    grad_clip: float = 1.0  # TRL's default max_grad_norm; kdkit gets the same
    check_batch: int = 4
    check_len: int = 64
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0


QUICK = Settings(
    vocab_size=512,
    hidden=32,
    heads=2,
    intermediate=64,
    teacher_layers=2,
    student_layers=1,
    batch_size=2,
    seq_len=16,
    warmup_steps=1,
    steps=2,
    rounds=1,
    chunk_sizes=(None, 8),
    check_batch=2,
    check_len=12,
    threads=1,
)

# ---------------------------------------------------------------------------------------------------------------
# Shared by both tools: models, data, memory and clocks


def llama(s: Settings, layers: int, seed: int):
    """A random-init LlamaForCausalLM, SmolLM2-shaped (tied embeddings), identical for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max(s.seq_len, s.check_len),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def build_models(s: Settings):
    teacher = llama(s, s.teacher_layers, s.seed + 1)
    student = llama(s, s.student_layers, s.seed + 2)
    return teacher, student


def token_blocks(s: Settings, n: int, seed: int):
    """n synthetic blocks of seq_len random token ids (avoiding the pad id 0), int64 (n, T)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, s.vocab_size, (n, s.seq_len), generator=g)


def rss_bytes() -> int:
    """The current resident set size (not the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Memory:
    """The training step's memory: peak minus what the process held after building models and data."""

    def __init__(self, device: str):
        import gc

        import torch

        self.device = device
        gc.collect()
        self.rss0, self.peak0 = rss_bytes(), peak_rss_bytes()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda0 = torch.cuda.memory_allocated()

    def result(self) -> dict:
        import torch

        mib = 2**20
        out = {
            "rss_after_build_mib": round(self.rss0 / mib, 1),
            "peak_rss_mib": round(peak_rss_bytes() / mib, 1),
            "peak_rss_before_training_mib": round(self.peak0 / mib, 1),
            "train_rss_peak_mib": round((peak_rss_bytes() - self.rss0) / mib, 1),
        }
        if self.device == "cuda":
            torch.cuda.synchronize()
            out |= {
                "cuda_allocated_after_build_mib": round(self.cuda0 / mib, 1),
                "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / mib, 1),
                "train_cuda_peak_mib": round((torch.cuda.max_memory_allocated() - self.cuda0) / mib, 1),
            }
        out["train_peak_mib"] = out["train_cuda_peak_mib" if self.device == "cuda" else "train_rss_peak_mib"]
        return out


class Clock:
    """Timestamps the start of every step; on CUDA it first waits for the GPU, so a step is its real time."""

    def __init__(self, device: str):
        self.device = device
        self.starts: list[float] = []

    def tick(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def steps(self, warmup: int) -> list[float]:
        """The durations of the steps after the warm-up (start of a step to the start of the next)."""
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return gaps[warmup:]


# ---------------------------------------------------------------------------------------------------------------
# The two tools' training runs (each in its own process)


def run_kdkit(s: Settings, chunk_size: int | None, fused: bool) -> dict:
    import torch

    from kdkit.data.lm import LMData
    from kdkit.engine import TrainOptions, train
    from kdkit.losses import build_loss
    from kdkit.run.teacher import LiveTeacher
    from kdkit.teachers import Teacher

    teacher_model, student = build_models(s)
    steps = s.warmup_steps + s.steps + 1  # one more step start ends the last timed step
    data = LMData(token_blocks(s, steps * s.batch_size, s.seed + 3), None, pad_id=0)
    if s.device == "cuda":
        teacher_model = teacher_model.cuda()  # the engine moves the student; a teacher is the caller's to place
    memory = Memory(s.device)
    clock = Clock(s.device)
    loss = build_loss([("token_kl", 1.0, {"direction": "forward", "temperature": 1.0, "chunk_size": chunk_size})])
    loss.fuse_head = fused  # on unless turned off: the default
    source = LiveTeacher(Teacher(teacher_model), hidden=loss.fuses_head)  # as the causal_lm task makes it

    def timed_teacher(batch):
        clock.tick()  # the engine calls the teacher first in every step
        return source(batch)

    opts = TrainOptions(
        epochs=1,
        batch_size=s.batch_size,
        optimizer="adamw",
        lr=s.lr,
        schedule="constant",
        grad_clip=s.grad_clip,
        precision="fp32",
        keep_best="none",
    )
    with CpuWatch() as watch:
        result = train(
            student, loss, data, opts, teacher=timed_teacher, seed=s.seed, device=s.device, progress=False, log=log
        )
    losses = [h["train/total"] for h in result.history if "train/total" in h]
    return {
        "step_s": clock.steps(s.warmup_steps),
        "memory": memory.result(),
        "others_cpu_fraction": watch.others_fraction,
        "noisy": watch.noisy,
        "last_logged_loss": losses[-1] if losses else None,
        "torch_threads": torch.get_num_threads(),
    }


def tiny_tokenizer():
    """A word-level tokenizer with pad/eos ids: GKDTrainer (an SFTTrainer) needs a processing class with a pad
    token even when the data come pre-tokenised; nothing is tokenised with it here."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def collate_features(features: list[dict]) -> dict:
    """Pre-tokenised examples → tensors (input_ids, attention_mask, labels), what GKDTrainer.compute_loss reads."""
    import torch

    return {
        k: torch.tensor([f[k] for f in features], dtype=torch.long) for k in ("input_ids", "attention_mask", "labels")
    }


def trl_trainer(s: Settings, teacher_model, student, ids, lengths, max_steps: int, out_dir: str, callbacks=()):
    """A GKDTrainer with lmbda=0, beta=0, fp32, no gradient checkpointing, on pre-tokenised (ids, lengths)."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    real = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    inputs = ids.masked_fill(~real, 0)
    dataset = Dataset.from_dict(
        {
            "input_ids": inputs.tolist(),
            "attention_mask": real.long().tolist(),
            "labels": inputs.masked_fill(~real, -100).tolist(),
        }
    )
    args = GKDConfig(
        output_dir=out_dir,
        per_device_train_batch_size=s.batch_size,
        max_steps=max_steps,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=s.grad_clip,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        max_length=ids.shape[1],
        logging_steps=max(1, max_steps // 4),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=s.device == "cpu",
        seed=s.seed,
    )
    return GKDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=args,
        data_collator=collate_features,
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        callbacks=list(callbacks),
    )


def run_trl(s: Settings) -> dict:
    import torch
    import trl.experimental.gkd  # noqa: F401  (imported before the baseline: import memory is not the step's)
    from transformers import TrainerCallback

    teacher_model, student = build_models(s)
    steps = s.warmup_steps + s.steps + 1
    ids = token_blocks(s, steps * s.batch_size, s.seed + 3)
    lengths = torch.full((len(ids),), s.seq_len)
    if s.device == "cuda":
        teacher_model, student = teacher_model.cuda(), student.cuda()
    memory = Memory(s.device)
    clock = Clock(s.device)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.tick()

    with tempfile.TemporaryDirectory(prefix="kdkit-bench-trl-") as out_dir:
        trainer = trl_trainer(s, teacher_model, student, ids, lengths, steps, out_dir, [StepClock()])
        with CpuWatch() as watch:
            trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "step_s": clock.steps(s.warmup_steps),
        "memory": memory.result(),
        "others_cpu_fraction": watch.others_fraction,
        "noisy": watch.noisy,
        "last_logged_loss": losses[-1] if losses else None,
        "optimizer": type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
        + (" (fused)" if trainer.args.optim == "adamw_torch_fused" else ""),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Correctness on the side: both losses on one identical batch against a float64 reference


def check_losses(s: Settings) -> dict:
    """kdkit's token_kl and TRL's GKDTrainer.compute_loss on one partly padded batch, and a float64 reference.

    The batch has right padding (labels -100, attention mask 0) on some rows. kdkit's loss is computed as its
    engine does (num_real_tokens = the predicted positions labels[:, 1:] ≠ -100); TRL's through compute_loss with
    num_items_in_batch from the Trainer's own _get_num_items_in_batch, and once with None (its batchmean path).
    """
    import torch
    import torch.nn.functional as F

    from kdkit.data.lm import LMData, predicted_positions
    from kdkit.engine.step import distill_step
    from kdkit.losses import build_loss
    from kdkit.run.teacher import LiveTeacher
    from kdkit.teachers import Teacher
    from kdkit.types import ModelOutputs

    check = replace(s, seq_len=s.check_len, batch_size=s.check_batch)
    teacher_model, student = build_models(check)
    device = torch.device(s.device)
    teacher_model, student = teacher_model.to(device), student.to(device)
    ids = token_blocks(check, check.batch_size, s.seed + 4)
    lengths = torch.full((len(ids),), check.seq_len)
    lengths[1::2] = torch.linspace(check.seq_len // 3, check.seq_len - 2, len(lengths[1::2])).long()
    data = LMData(ids, lengths, pad_id=0)
    batch = data.collate([data[i] for i in range(len(data))]).to(device)
    batch.num_real_tokens = predicted_positions(batch.labels).float()

    student.train()
    out = {"batch": f"{check.batch_size}×{check.seq_len}, lengths {lengths.tolist()}"}

    def student_grads(loss_value):
        grads = torch.autograd.grad(loss_value, [p for p in student.parameters() if p.requires_grad])
        return torch.cat([g.reshape(-1) for g in grads])

    # Independent reference: float64 log-softmax over the shifted real positions, summed / their count.
    s_logits = student(batch.inputs).logits
    with torch.no_grad():
        t_logits = teacher_model(batch.inputs).logits
    keep = batch.labels[:, 1:] != -100
    log_q = F.log_softmax(s_logits[:, :-1][keep].double(), -1)
    log_p = F.log_softmax(t_logits[:, :-1][keep].double(), -1)
    reference = (log_p.exp() * (log_p - log_q)).sum() / keep.sum()
    ref_grad = student_grads(reference.float())
    out["reference_f64"] = reference.item()
    out["predicted_positions"] = int(keep.sum())
    out["all_label_positions"] = int((batch.labels != -100).sum())

    teacher = Teacher(teacher_model)
    kdkit_values = {}
    for chunk in (None, 8):
        loss = build_loss([("token_kl", 1.0, {"direction": "forward", "chunk_size": chunk})]).to(device)
        st = loss(ModelOutputs(logits=student(batch.inputs).logits), teacher(batch.inputs), batch)
        kdkit_values[str(chunk)] = (st.loss.item(), student_grads(st.loss))
    loss = build_loss([("token_kl", 1.0, {"direction": "forward"})]).to(device)  # the default: the fused head
    st = distill_step(student, loss, batch, LiveTeacher(teacher, hidden=True)(batch))
    kdkit_values["default"] = (st.loss.item(), student_grads(st.loss))
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-trl-") as out_dir:
        trainer = trl_trainer(check, teacher_model, student, ids, lengths, 1, out_dir)
        inputs = {
            "input_ids": batch.inputs,
            "attention_mask": batch.attention_mask,
            "labels": batch.labels,
        }
        n_items = trainer._get_num_items_in_batch([inputs], device)
        trl_loss = trainer.compute_loss(student, dict(inputs), num_items_in_batch=n_items)
        trl_value, trl_grad = trl_loss.item(), student_grads(trl_loss)
        trl_batchmean = trainer.compute_loss(student, dict(inputs), num_items_in_batch=None).item()
    out["trl_num_items_in_batch"] = int(n_items) if n_items is not None else None

    def compare(value: float, grad) -> dict:
        return {
            "loss": value,
            "abs_diff_vs_reference": abs(value - out["reference_f64"]),
            "rel_diff_vs_reference": abs(value - out["reference_f64"]) / abs(out["reference_f64"]),
            "grad_max_abs_diff_vs_reference": (grad - ref_grad).abs().max().item(),
            "grad_rel_norm_diff": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
        }

    out["kdkit"] = {k if k == "default" else f"chunk_{k}": compare(v, g) for k, (v, g) in kdkit_values.items()}
    out["trl"] = compare(trl_value, trl_grad)
    out["trl_batchmean_no_num_items"] = trl_batchmean
    out["kdkit_vs_trl_rel_diff"] = abs(kdkit_values["default"][0] - trl_value) / abs(trl_value)
    # What dividing by every label position (the unshifted count) would give, for comparison with older TRL.
    out["if_divided_by_all_label_positions"] = (
        out["reference_f64"] * out["predicted_positions"] / out["all_label_positions"]
    )
    out["agree"] = bool(
        out["kdkit_vs_trl_rel_diff"] < 1e-4
        and all(v["rel_diff_vs_reference"] < 1e-4 for v in out["kdkit"].values())
        and out["trl"]["rel_diff_vs_reference"] < 1e-4
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# The driver: one subprocess per (tool, configuration), alternated


def config_names(s: Settings) -> list[str]:
    return ["trl", "kdkit_default"] + [f"kdkit_chunk_{c}" for c in s.chunk_sizes]


def worker(job: dict) -> dict:
    """Run one job in this process: {"what": "trl" | "kdkit_default" | "kdkit_chunk_<n|None>" | "check",
    "settings": {...}}."""
    s = Settings(**{**job["settings"], "chunk_sizes": tuple(job["settings"]["chunk_sizes"])})
    import torch

    if s.threads:
        torch.set_num_threads(s.threads)
    what = job["what"]
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    try:
        # stdout carries only the JSON result: the Trainer prints its logs there.
        with contextlib.redirect_stdout(sys.stderr):
            if what == "check":
                result = check_losses(s)
            elif what == "trl":
                result = run_trl(s)
            elif what == "kdkit_default":
                result = run_kdkit(s, None, fused=True)
            else:
                chunk = what.removeprefix("kdkit_chunk_")
                result = run_kdkit(s, None if chunk == "None" else int(chunk), fused=False)
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller (the smoke test) keeps its own setting
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def spawn(job: dict, in_process: bool) -> dict:
    if in_process:
        return worker(job)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=None,  # the worker's progress goes straight to our stderr
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {job['what']} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(s: Settings, runs: dict[str, list[dict]]) -> dict:
    tokens = s.batch_size * s.seq_len  # every position of the synthetic blocks is real
    out: dict = {}
    for name, rs in runs.items():
        step = [median(r["step_s"]) for r in rs]
        peak = [r["memory"]["train_peak_mib"] for r in rs]
        out[name] = {
            "step_s_per_run": [round(v, 4) for v in step],
            "step_s": round(median(step), 4),
            "tokens_per_s": round(tokens / median(step), 1),
            "train_peak_mib_per_run": peak,
            "train_peak_mib": round(median(peak), 1),
            "memory_first_run": rs[0]["memory"],
            "others_cpu_fraction_per_run": [r["others_cpu_fraction"] for r in rs],
            "noisy": any(r["noisy"] for r in rs),
            "last_logged_loss": rs[-1]["last_logged_loss"],
        }
        if "optimizer" in rs[0]:
            out[name]["optimizer"] = rs[0]["optimizer"]
    trl = runs["trl"]
    for name, rs in runs.items():
        if name == "trl":
            continue
        speed = [median(t["step_s"]) / median(k["step_s"]) for k, t in zip(rs, trl)]  # kdkit tokens/s ÷ TRL's
        # A tiny (--quick) run can peak below the RSS measured before training: no ratio then, not a crash.
        mem = [
            k["memory"]["train_peak_mib"] / t["memory"]["train_peak_mib"] if t["memory"]["train_peak_mib"] > 0 else nan
            for k, t in zip(rs, trl)
        ]
        out[name] |= {
            "speed_vs_trl": round(median(speed), 3),
            "speed_vs_trl_per_round": [round(v, 3) for v in speed],
            "memory_vs_trl": round(median(mem), 3),
            "memory_vs_trl_per_round": [round(v, 3) for v in mem],
        }
    return out


def run(s: Settings, load_wait: dict | None = None, command: str = "", quick: bool = False) -> dict:
    started = time.perf_counter()
    machine = machine_info() | {"loadavg_before": loadavg(), "load_wait": load_wait}
    if s.threads:
        machine["torch_threads"] = s.threads
    if s.device == "cuda":
        import torch

        machine["gpu"] = torch.cuda.get_device_name(0)
    import transformers
    import trl

    machine |= {"transformers": transformers.__version__, "trl": trl.__version__}
    settings = asdict(s)
    names = config_names(s)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    log(f"check: kdkit's and TRL's loss on one padded {s.check_batch}×{s.check_len} batch")
    check = spawn({"what": "check", "settings": settings}, quick)
    log(
        f"check: kdkit {check['kdkit']['default']['loss']:.6g}, trl {check['trl']['loss']:.6g}, "
        f"agree {check['agree']}"
    )
    for r in range(s.rounds):
        for name in names if r % 2 == 0 else list(reversed(names)):
            res = spawn({"what": name, "settings": settings}, quick)
            runs[name].append(res)
            log(
                f"round {r + 1}/{s.rounds} {name}: {median(res['step_s']):.3f} s/step, "
                f"train peak {res['memory']['train_peak_mib']:.0f} MiB, others {res['others_cpu_fraction']}"
            )
    configs = summarise(s, runs)
    default = configs["kdkit_default"]
    speed_goal = SPEED_GOAL["cuda" if s.device == "cuda" else "cpu"]
    goals = {
        "speed_vs_trl": {
            "goal": speed_goal,
            "best_config": "kdkit_default",
            "ratio": default["speed_vs_trl"],
            "met": default["speed_vs_trl"] >= speed_goal,
            "rule": "kdkit tokens/s ÷ TRL tokens/s, median of per-round ratios, kdkit with its default settings",
        },
        "memory_vs_trl": {
            "goal": MEMORY_GOAL,
            "best_config": "kdkit_default",
            "ratio": default["memory_vs_trl"],
            "met": default["memory_vs_trl"] <= MEMORY_GOAL,
            "speed_vs_trl_there": default["speed_vs_trl"],
            "rule": "kdkit train-step peak ÷ TRL train-step peak, median of per-round ratios, default settings",
        },
    }
    machine |= {"loadavg_after": loadavg()}
    noisy = [n for n, c in configs.items() if c["noisy"]]
    return {
        "bench": "llm",
        "quick": quick,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "settings": settings
        | {
            "teacher": f"LlamaForCausalLM {s.teacher_layers}L×{s.hidden}, vocab {s.vocab_size}, random init",
            "student": f"LlamaForCausalLM {s.student_layers}L×{s.hidden}, vocab {s.vocab_size}, random init",
            "tokens_per_step": s.batch_size * s.seq_len,
            "data": "synthetic random token ids, no padding",
            "loss": "forward KL(teacher ‖ student) per real token, T=1, fp32",
            "timing": {
                "kdkit": "kdkit.engine.train(), one epoch; a step = gap between consecutive teacher calls",
                "trl": "GKDTrainer.train() with max_steps; a step = gap between consecutive on_step_begin callbacks",
            },
            "memory": "peak minus the process's memory after building models and data, fresh process per run"
            + (" (torch.cuda.max_memory_allocated)" if s.device == "cuda" else " (ru_maxrss − VmRSS)"),
        },
        "check": check,
        "configs": configs,
        "goals": goals,
        "under_load": {"noisy_configs": noisy, "noisy": bool(noisy)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def fmt_chunk(name: str) -> str:
    if name == "trl":
        return "TRL GKDTrainer (lmbda=0, beta=0)"
    if name == "kdkit_default":
        return "kdkit, default (fused head)"
    chunk = name.removeprefix("kdkit_chunk_")
    return "kdkit, whole logits" if chunk == "None" else f"kdkit, logits in chunks of {chunk}"


def to_markdown(result: dict) -> str:
    st, m, g, c = result["settings"], result["machine"], result["goals"], result["check"]
    unit = "GPU memory (max_memory_allocated)" if st["device"] == "cuda" else "RSS"
    lines = [
        f"## {result['date']} — LLM token distillation: kdkit vs TRL GKDTrainer (`bench/llm.py`)",
        "",
        f"- Command: `{result['command']}`{' (a smoke run: the figures mean nothing)' if result['quick'] else ''}",
        f"- Machine: {machine_line(m)}; transformers {m['transformers']}, trl {m['trl']}"
        + (f"; GPU {m['gpu']}" if "gpu" in m else "")
        + f". Load average before {m['loadavg_before']}, after {m['loadavg_after']} (includes the bench's own "
        "threads).",
        f"- Teacher {st['teacher']}; student {st['student']}. Batch {st['batch_size']} × {st['seq_len']} tokens "
        f"({st['tokens_per_step']} per step), {st['data']}, device {st['device']}. Loss: {st['loss']}. AdamW lr "
        f"{st['lr']}, grad clip {st['grad_clip']}, constant schedule, for both.",
        f"- Timing: kdkit — {st['timing']['kdkit']}; TRL — {st['timing']['trl']}. Median of {st['steps']} steps "
        f"after {st['warmup_steps']} warm-up steps per run; {st['rounds']} runs per configuration, each in a fresh "
        "process, alternated (order reversed every other round). Ratios are medians of per-round ratios.",
        f"- Memory: {st['memory']}.",
        "",
    ]
    rows = []
    for name, cfg in result["configs"].items():
        if name == "trl":
            speed, mem = "1", "1"
        else:
            speed = f"**{cfg['speed_vs_trl']}** {cfg['speed_vs_trl_per_round']}"
            mem = f"**{cfg['memory_vs_trl']}** {cfg['memory_vs_trl_per_round']}"
        rows.append(
            [
                fmt_chunk(name),
                cfg["step_s"],
                cfg["tokens_per_s"],
                f"{cfg['train_peak_mib']} {cfg['train_peak_mib_per_run']}",
                speed,
                mem,
                cfg["others_cpu_fraction_per_run"],
            ]
        )
    lines.append(
        markdown_table(
            [
                "configuration",
                "s/step",
                "tokens/s",
                f"train-step peak {unit}, MiB (per run)",
                "tokens/s ÷ TRL (per round)",
                "peak ÷ TRL (per round)",
                "others' CPU share per run",
            ],
            rows,
        )
    )
    gs, gm = g["speed_vs_trl"], g["memory_vs_trl"]
    lines += [
        "",
        f"Goals: tokens/s ≥ {gs['goal']}× TRL — best {fmt_chunk(gs['best_config'])} at **{gs['ratio']}** "
        f"({'met' if gs['met'] else 'missed'}); peak ≤ {gm['goal']}× TRL — "
        f"{fmt_chunk(gm['best_config'])} at **{gm['ratio']}** ({'met' if gm['met'] else 'missed'}). "
        f"TRL's optimizer: {result['configs']['trl'].get('optimizer', '?')}; "
        "kdkit's: torch.optim.AdamW (fused where the parameters allow, kdkit.engine.optim).",
        "",
        f"Loss check on one padded batch ({c['batch']}; {c['predicted_positions']} predicted positions, "
        f"{c['all_label_positions']} label positions), against a float64 reference "
        f"({c['reference_f64']:.6f}): kdkit {c['kdkit']['default']['loss']:.6f} "
        f"(rel. diff {c['kdkit']['default']['rel_diff_vs_reference']:.1e}; whole logits "
        f"{c['kdkit']['chunk_None']['rel_diff_vs_reference']:.1e}, in chunks "
        f"{c['kdkit']['chunk_8']['rel_diff_vs_reference']:.1e}), TRL {c['trl']['loss']:.6f} "
        f"(rel. diff {c['trl']['rel_diff_vs_reference']:.1e}; its Trainer passes num_items_in_batch = "
        f"{c['trl_num_items_in_batch']}); gradients vs reference, relative norm of the difference: kdkit "
        f"{c['kdkit']['default']['grad_rel_norm_diff']:.1e}, TRL {c['trl']['grad_rel_norm_diff']:.1e}. "
        f"Agree: {c['agree']}. Dividing by all {c['all_label_positions']} label positions instead would give "
        f"{c['if_divided_by_all_label_positions']:.6f}.",
    ]
    if result["under_load"]["noisy"]:
        lines += ["", f"Noisy (others used the cores): {', '.join(result['under_load']['noisy_configs'])}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, in-process, one thread: a smoke run")
    add_run_args(p)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4 on CPU, 16 on CUDA)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256 on CPU, 1024 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 5 on CPU, 20 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="runs per configuration (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--chunks", default=None,
                   help="chunk sizes of the whole-logits comparison runs, comma-separated, 'none' for whole logits")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    if args.device == "cuda" and not args.quick:
        s = replace(s, batch_size=16, seq_len=1024, steps=20, rounds=3, warmup_steps=3, chunk_sizes=(None, 256))
    s = replace(s, device=args.device)
    for field_name, value in (
        ("batch_size", args.batch_size),
        ("seq_len", args.seq_len),
        ("steps", args.steps),
        ("rounds", args.rounds),
        ("threads", args.threads),
    ):
        if value:
            s = replace(s, **{field_name: value})
    if args.chunks:
        s = replace(
            s, chunk_sizes=tuple(None if c.strip().lower() == "none" else int(c) for c in args.chunks.split(","))
        )
    return s


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        result = worker(json.loads(args.worker))
        print(json.dumps(result))
        return result
    s = settings_from(args)
    load_wait = None
    if not (args.quick or args.no_wait or args.device == "cuda"):
        load_wait = wait_for_quiet(args.load_threshold, args.max_wait)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/llm.py", *argv])])
    result = run(s, load_wait=load_wait, command=command, quick=args.quick)
    return report_result(result, args, to_markdown)


if __name__ == "__main__":
    main()
