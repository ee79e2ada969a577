"""Cross-tokenizer distillation's training step against same-tokenizer token_kl: cost per student token (issue #14).

The goal: hybrid_kl through CrossTeacher costs at most 1.3× same-tokenizer token_kl per training token, on the
same models. Every configuration times one full optimizer step, as the engine runs it (kdkit.engine.loop
optimizer_step, gradient accumulation 1): the teacher source on the batch (for a cross run: the teacher's own
tokens of each block's text, the byte-offset alignment, then the teacher's forward), the student's forward, the
loss, backward, gradient clipping and the AdamW step.

- Tokenizers: two byte-level BPE tokenizers of the same vocabulary size trained here with the `tokenizers` library
  on Shakespeare (kdkit.data.lm.shakespeare_texts), the teacher's on the even documents and the student's on the
  odd ones: different merges, so the two tokenisations of a text differ (and the vocabularies partly overlap)
  while the teacher's architecture, vocabulary size included, stays exactly the same in every configuration.
- Models: random-init LlamaForCausalLM (SmolLM2-shaped: tied head), teacher 4 layers, student 2 layers; speed does
  not depend on the weights. Each configuration trains its own copy of one student initialisation.
- Data: the student's blocks of Shakespeare text with their texts and offsets (kdkit.data.lm
  tokenize_corpus_with_text, as `with_text` builds them); every configuration gets the same batches.
- Configurations: `token_kl` — same tokenizer, the teacher (kdkit's frozen TeacherEnsemble of one Teacher) reads
  the student's ids through LiveTeacher, with the fused head as the causal_lm task builds it by default
  (llm.fused_head: true); `token_kl_logits` — the same on whole logits (llm.fused_head: false); `hybrid_kl`
  (forward, T=1, the shared map from shared_vocab) and `uld` — the teacher with its own tokenizer through
  CrossTeacher, alignment included in the step, both models' heads applied at the aligned span ends only
  (kdkit.losses.at_positions, as the causal_lm task runs them by default); `hybrid_kl_logits` — hybrid_kl on both
  models' whole logits (llm.fused_head: false). The KD loss alone (weight 1), no token_ce.

Method (/work/shared/BENCH.md): one process; after a warm-up of every configuration, rounds run them in turn
(A B C D E, then E D C B A, ...), `steps` steps each on the same batches. A step's stages are timed with
perf_counter: align (CrossTeacher.align: the teacher's tokenisation of the block texts and the alignment),
teacher (the rest of the teacher source: its forward, the ensemble's log-softmax), student (its forward), loss,
backward, optimizer (clipping, step, zero_grad). The ratio is per student token: the steps carry the same
student tokens, so it is the step-time ratio; the median of the per-round ratios, with the ratio of the medians.
A side measurement splits the alignment itself (student_encoding, teacher_encoding, align_offsets, span_index).

    python bench/cross_tokenizer.py            # prints one JSON object on stdout (~2–4 min on 2 quiet cores)
    python bench/cross_tokenizer.py --write    # and appends a dated section to docs/benchmarks.md
    python bench/cross_tokenizer.py --quick    # seconds: tiny tokenizers and models; figures mean nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace

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

GOAL = 1.3  # hybrid_kl step time ÷ same-tokenizer token_kl step time per student token, at most (#14)
CONFIGS = ("token_kl", "token_kl_logits", "hybrid_kl", "hybrid_kl_logits", "uld")
CROSS = ("hybrid_kl", "hybrid_kl_logits", "uld")
STAGES = ("align", "teacher", "student", "loss", "backward", "optimizer")
ALIGN_PARTS = ("student_encoding", "teacher_encoding", "align_offsets", "span_index")


@dataclass(frozen=True)
class Settings:
    vocab_size: int = 8_000  # each tokenizer's (the configs/llm_cross.yaml student tokenizer's size)
    tokenizer_chars: int = 1_500_000  # Shakespeare characters each tokenizer is trained on
    data_chars: int = 300_000  # characters of text cut into the student's blocks
    hidden: int = 256
    heads: int = 4
    intermediate: int = 1024
    teacher_layers: int = 4
    student_layers: int = 2
    batch_size: int = 8  # configs/llm_cross.yaml: 8 blocks of 128 tokens
    seq_len: int = 128
    warmup_steps: int = 2
    steps: int = 4  # timed steps per configuration per round
    rounds: int = 4
    lr: float = 1e-4
    grad_clip: float = 1.0
    threads: int | None = None
    seed: int = 0


QUICK = Settings(
    vocab_size=400,
    tokenizer_chars=40_000,
    data_chars=20_000,
    hidden=32,
    heads=2,
    intermediate=64,
    teacher_layers=2,
    student_layers=1,
    batch_size=2,
    seq_len=16,
    warmup_steps=1,
    steps=1,
    rounds=1,
    threads=1,
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with <eos> (as configs/llm_cross.yaml makes the student's), as a fast transformers tokenizer."""
    import tokenizers as t
    from transformers import PreTrainedTokenizerFast

    tok = t.Tokenizer(t.models.BPE())
    tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = t.decoders.ByteLevel()
    trainer = t.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def take_chars(docs: list[str], chars: int) -> list[str]:
    """The documents' beginnings, an equal share of `chars` each."""
    share = max(1, chars // max(1, len(docs)))
    return [d[:share] for d in docs]


def tokenizers_for(s: Settings):
    """(teacher tokenizer, student tokenizer): trained on the even and on the odd Shakespeare documents."""
    from kdkit.data.lm import shakespeare_texts

    docs = shakespeare_texts()
    teacher = train_tokenizer(take_chars(docs[0::2], s.tokenizer_chars), s.vocab_size)
    student = train_tokenizer(take_chars(docs[1::2], s.tokenizer_chars), s.vocab_size)
    return teacher, student, docs


def llama(s: Settings, layers: int, vocab: int, seed: int):
    """A random-init LlamaForCausalLM, SmolLM2-shaped (tied embeddings), identical for a given seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=4 * s.seq_len,  # the teacher's rows may hold more tokens than the student's
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def student_data(s: Settings, tokenizer, docs: list[str]):
    """The student's blocks with their texts and offsets (LMData, as build_lm_data with_text makes them)."""
    from kdkit.data.lm import LMData, tokenize_corpus_with_text

    blocks, _, text = tokenize_corpus_with_text(take_chars(docs, s.data_chars), tokenizer, s.seq_len)
    return LMData(blocks, None, tokenizer.pad_token_id, tokenizer.eos_token_id, text.texts, text.offsets)


def batches(s: Settings, data) -> list:
    """Every step's batch, in order (the same for every configuration), with the engine's token count."""
    from kdkit.data.lm import predicted_positions
    from kdkit.errors import DataError

    n = s.warmup_steps + s.steps
    if len(data) < n * s.batch_size:
        raise DataError(f"data_chars={s.data_chars}: {len(data)} blocks, fewer than {n * s.batch_size}; raise it")
    out = []
    for k in range(n):
        batch = data.collate([data[i] for i in range(k * s.batch_size, (k + 1) * s.batch_size)])
        batch.num_real_tokens = predicted_positions(batch.labels).float()  # as the engine's _prepare_group
        out.append(batch)
    return out


class Timed:
    """A callable that adds its seconds to `seconds[stage]`."""

    def __init__(self, fn, seconds: dict, stage: str):
        self.fn, self.seconds, self.stage = fn, seconds, stage

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + time.perf_counter() - start


class Config:
    """One configuration: its student, loss, teacher source and optimizer; step() runs one timed optimizer step."""

    def __init__(self, name: str, s: Settings, teacher_model, student_init, teacher_tok, student_tok, data,
                 vocab_map):
        import copy

        import torch

        from kdkit.losses import build_loss
        from kdkit.run.cross_teacher import CrossTeacher
        from kdkit.run.teacher import LiveTeacher
        from kdkit.teachers import Teacher, TeacherEnsemble

        self.name, self.s = name, s
        self.student = copy.deepcopy(student_init).train()
        loss_name = name.removesuffix("_logits")
        params = {"direction": "forward", "temperature": 1.0} if loss_name != "uld" else {"temperature": 1.0}
        self.loss = build_loss([(loss_name, 1.0, params)])
        self.loss.fuse_head = not name.endswith("_logits")  # llm.fused_head (default true) as the causal_lm task
        for part in self.loss.modules():
            if hasattr(part, "set_vocab_map"):
                part.set_vocab_map(*vocab_map)
        teacher = TeacherEnsemble([Teacher(teacher_model)])
        self.stages: dict[str, float] = {}
        if name in CROSS:
            self.source = CrossTeacher(teacher, teacher_tok, student_tok, data, max_length=4 * s.seq_len,
                                       hidden=self.loss.teacher_at_positions)  # as the causal_lm task sets it
            self.source.align = Timed(self.source.align, self.stages, "align")  # the instance's, for this bench
        else:
            self.source = LiveTeacher(teacher, hidden=self.loss.fuses_head)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr)

    def step(self, batch) -> dict[str, float]:
        """One optimizer step on `batch`: {stage: seconds} and "step" (the whole step)."""
        import torch

        from kdkit.models.lm_head import fusable_head, hidden_outputs
        from kdkit.types import ModelOutputs

        self.stages.clear()
        t0 = time.perf_counter()
        t_out = self.source(batch)
        t1 = time.perf_counter()
        # kdkit.engine.step.distill_step's body, split so that the student's forward and the loss are timed apart.
        head = fusable_head(self.student) if self.loss.fuses_head else None
        student_out = hidden_outputs(self.student, batch.inputs, head) if head is not None else None
        if student_out is None:
            student_out = ModelOutputs(logits=self.student(batch.inputs).logits)
        t2 = time.perf_counter()
        out = self.loss(student_out, t_out, batch)
        t3 = time.perf_counter()
        out.loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        align = self.stages.get("align", 0.0)
        return {
            "step": t5 - t0,
            "align": align,
            "teacher": t1 - t0 - align,
            "student": t2 - t1,
            "loss": t3 - t2,
            "backward": t4 - t3,
            "optimizer": t5 - t4,
            "loss_value": float(out.loss.detach()),
        }


def align_parts(batches: list, data, teacher_tok) -> dict:
    """The alignment's own parts over every batch (seconds, summed), and the teacher's tokens per student token."""
    from kdkit.data.align import align_offsets, span_index
    from kdkit.run.cross_teacher import student_encoding, teacher_encoding

    seconds = dict.fromkeys(ALIGN_PARTS, 0.0)
    student_tokens = teacher_tokens = 0
    for batch in batches:
        index = batch.index.tolist()
        texts = [data.texts[i] for i in index]
        t0 = time.perf_counter()
        student = student_encoding(data, index, batch.inputs, batch.attention_mask.sum(1))
        t1 = time.perf_counter()
        teacher = teacher_encoding(teacher_tok, texts, student, data.eos_id, 4 * data.block_size)
        t2 = time.perf_counter()
        spans = [align_offsets(x, t, s) for x, t, s in zip(texts, teacher.offsets, student.offsets)]
        t3 = time.perf_counter()
        span_index(spans, teacher.input_ids.shape[1], student.input_ids.shape[1])
        t4 = time.perf_counter()
        for part, a, b in zip(ALIGN_PARTS, (t0, t1, t2, t3), (t1, t2, t3, t4)):
            seconds[part] += b - a
        student_tokens += int(student.attention_mask.sum())
        teacher_tokens += int(teacher.attention_mask.sum())
    return {
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "ms_per_1k_student_tokens": {k: round(1000 * v / student_tokens * 1000, 3) for k, v in seconds.items()},
        "teacher_tokens_per_student_token": round(teacher_tokens / student_tokens, 3),
    }


def measure(s: Settings, configs: dict[str, Config], steps: list) -> list[dict]:
    """Warm-up, then `rounds` rounds of every configuration (order reversed every other round)."""
    log(f"warm-up: {s.warmup_steps} steps of each configuration")
    for cfg in configs.values():
        for batch in steps[: s.warmup_steps]:
            cfg.step(batch)
    timed = steps[s.warmup_steps :]
    rounds = []
    for r in range(s.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        out = {}
        for name in order:
            with CpuWatch() as watch:
                per_step = [configs[name].step(batch) for batch in timed]
            out[name] = {
                key: median([p[key] for p in per_step]) for key in ("step", *STAGES)
            } | {"others_cpu_fraction": watch.others_fraction, "noisy": watch.noisy,
                 "loss_value": per_step[-1]["loss_value"]}
        log(f"round {r + 1}/{s.rounds}: " + ", ".join(f"{n} {out[n]['step']:.3f} s" for n in configs))
        rounds.append(out)
    return rounds


def summarise(s: Settings, rounds: list[dict]) -> dict:
    tokens = s.batch_size * s.seq_len
    out = {}
    for name in CONFIGS:
        step = [r[name]["step"] for r in rounds]
        stages = {st: median([r[name][st] for r in rounds]) for st in STAGES}
        cfg = {
            "step_s": round(median(step), 4),
            "step_s_per_round": [round(v, 4) for v in step],
            "student_tokens_per_s": round(tokens / median(step), 1),
            "stages_s": {k: round(v, 4) for k, v in stages.items()},
            "stages_share": {k: round(v / median(step), 3) for k, v in stages.items()},
            "others_cpu_fraction_per_round": [r[name]["others_cpu_fraction"] for r in rounds],
            "last_loss": round(rounds[-1][name]["loss_value"], 4),
        }
        for base in ("token_kl", "token_kl_logits"):
            if name != base:
                ratios = [r[name]["step"] / r[base]["step"] for r in rounds]
                cfg[f"ratio_vs_{base}"] = round(median(ratios), 3)
                cfg[f"ratio_vs_{base}_per_round"] = [round(v, 3) for v in ratios]
                cfg[f"ratio_vs_{base}_of_medians"] = round(median(step) / median([r[base]["step"] for r in rounds]), 3)
        out[name] = cfg
    return out


def bottleneck(configs: dict) -> dict:
    """Where hybrid_kl's extra time over token_kl goes: each stage's difference, seconds and share of the gap."""
    hy, tk = configs["hybrid_kl"]["stages_s"], configs["token_kl"]["stages_s"]
    gap = configs["hybrid_kl"]["step_s"] - configs["token_kl"]["step_s"]
    diff = {st: round(hy[st] - tk[st], 4) for st in STAGES}
    return {
        "extra_s": round(gap, 4),
        "extra_by_stage_s": diff,
        "largest": max(diff, key=diff.get),
        "align_share_of_hybrid_step": configs["hybrid_kl"]["stages_share"]["align"],
    }


def run(s: Settings, load_wait: dict | None = None, command: str = "", quick: bool = False) -> dict:
    import torch
    import transformers

    from kdkit.losses.hybrid_kl import shared_vocab

    started = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    machine = machine_info() | {"loadavg_before": loadavg(), "load_wait": load_wait}
    machine["transformers"] = transformers.__version__
    t0 = time.perf_counter()
    teacher_tok, student_tok, docs = tokenizers_for(s)
    tokenizer_s = time.perf_counter() - t0
    vocab = max(len(teacher_tok), len(student_tok))  # one size: the same architecture in every configuration
    t0 = time.perf_counter()
    vocab_map = shared_vocab(teacher_tok, student_tok)
    shared_vocab_s = time.perf_counter() - t0
    data = student_data(s, student_tok, docs)
    steps = batches(s, data)
    teacher_model = llama(s, s.teacher_layers, vocab, s.seed + 1)
    student_init = llama(s, s.student_layers, vocab, s.seed + 2)
    log(f"tokenizers {len(teacher_tok)} / {len(student_tok)} ids ({vocab_map[0].numel()} shared), trained in "
        f"{tokenizer_s:.1f} s; {len(data)} student blocks × {s.seq_len}; batch {s.batch_size}")
    configs = {name: Config(name, s, teacher_model, student_init, teacher_tok, student_tok, data, vocab_map)
               for name in CONFIGS}
    rounds = measure(s, configs, steps)
    summary = summarise(s, rounds)
    parts = align_parts(steps[s.warmup_steps :], data, teacher_tok)
    hybrid = summary["hybrid_kl"]["ratio_vs_token_kl"]
    machine["loadavg_after"] = loadavg()
    noisy = [f"round {i + 1} {n}" for i, r in enumerate(rounds) for n in CONFIGS if r[n]["noisy"]]
    return {
        "bench": "cross_tokenizer",
        "quick": quick,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine,
        "settings": asdict(s)
        | {
            "vocab": {"teacher": len(teacher_tok), "student": len(student_tok), "model": vocab,
                      "shared": int(vocab_map[0].numel())},
            "tokenizers": "byte-level BPE trained here on Shakespeare: teacher on the even documents, student on "
            "the odd ones",
            "teacher_params": sum(p.numel() for p in teacher_model.parameters()),
            "student_params": sum(p.numel() for p in student_init.parameters()),
            "student_tokens_per_step": s.batch_size * s.seq_len,
            "blocks": len(data),
            "tokenizer_training_s": round(tokenizer_s, 2),
            "shared_vocab_s": round(shared_vocab_s, 3),
            "optimizer": f"torch.optim.AdamW(lr={s.lr}), clip_grad_norm_ {s.grad_clip}, fp32",
        },
        "configs": summary,
        "alignment": parts,
        "where_the_time_goes": bottleneck(summary),
        "goal": {
            "goal": GOAL,
            "ratio": hybrid,
            "met": hybrid <= GOAL,
            "rule": "hybrid_kl step ÷ token_kl (fused head, the default) step per student token, median of "
            "per-round ratios",
        },
        "under_load": {"noisy_parts": noisy, "noisy": bool(noisy)},
        "seconds": round(time.perf_counter() - started, 1),
    }


def to_markdown(result: dict) -> str:
    st, m, c, a, w, g = (result[k] for k in ("settings", "machine", "configs", "alignment", "where_the_time_goes",
                                              "goal"))
    v = st["vocab"]
    rows = []
    for name in CONFIGS:
        cfg = c[name]
        rows.append([
            name, cfg["step_s"], cfg["student_tokens_per_s"], cfg.get("ratio_vs_token_kl", 1.0),
            cfg.get("ratio_vs_token_kl_logits", 1.0), *(cfg["stages_s"][s] for s in STAGES),
            cfg["others_cpu_fraction_per_round"],
        ])  # fmt: skip
    lines = [
        f"## {result['date']} — cross-tokenizer distillation step vs same-tokenizer token_kl "
        "(`bench/cross_tokenizer.py`)",
        "",
        f"- Command: `{result['command']}`{' (a smoke run: the figures mean nothing)' if result['quick'] else ''}",
        f"- Machine: {machine_line(m)}; transformers {m['transformers']}. Load average before "
        f"{m['loadavg_before']}, after {m['loadavg_after']} (includes the bench's own threads).",
        f"- Models: random-init Llama (tied head), teacher {st['teacher_layers']}L, student {st['student_layers']}L, "
        f"hidden {st['hidden']}, vocab {v['model']} ({st['teacher_params']:,} / {st['student_params']:,} "
        f"parameters). Tokenizers: {st['tokenizers']} ({v['teacher']} / {v['student']} ids, {v['shared']} shared by "
        f"decoded text). {st['batch_size']} blocks × {st['seq_len']} student tokens per step; the teacher reads "
        f"{a['teacher_tokens_per_student_token']} of its tokens per student token. {st['optimizer']}.",
        f"- One full optimizer step per configuration (teacher source incl. alignment, student forward, loss, "
        f"backward, step); KD loss alone, weight 1. After {st['warmup_steps']} warm-up steps each, {st['rounds']} "
        f"rounds alternate the configurations (order reversed every other round), median of {st['steps']} steps "
        "per configuration per round; ratios are per student token, medians of the per-round ratios.",
        "",
        markdown_table(
            ["config", "s/step", "student tokens/s", "÷ token_kl", "÷ token_kl_logits",
             *(f"{s} s" for s in STAGES), "others' CPU share per round"],
            rows,
        ),  # fmt: skip
        "",
        markdown_table(
            ["alignment part", "s over the timed batches", "ms per 1k student tokens"],
            [[p, a["seconds"][p], a["ms_per_1k_student_tokens"][p]] for p in ALIGN_PARTS],
        ),
        "",
        f"hybrid_kl ÷ token_kl (fused head, the default) per student token: **{g['ratio']}** (per round "
        f"{c['hybrid_kl']['ratio_vs_token_kl_per_round']}; of the medians "
        f"{c['hybrid_kl']['ratio_vs_token_kl_of_medians']}); ÷ token_kl on whole logits: "
        f"{c['hybrid_kl']['ratio_vs_token_kl_logits']}. Goal ≤ {g['goal']}: {'met' if g['met'] else 'missed'}. "
        f"hybrid_kl's extra {w['extra_s']} s a step by stage: {w['extra_by_stage_s']} (largest: {w['largest']}; "
        f"the alignment is {w['align_share_of_hybrid_step']:.1%} of the hybrid step).",
    ]
    if result["under_load"]["noisy"]:
        lines += ["", f"Noisy (others used the cores): {', '.join(result['under_load']['noisy_parts'])}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny tokenizers and models, one thread: a smoke run")
    add_run_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="blocks per step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="student tokens per block (default 128)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration per round (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every configuration (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    for name in ("batch_size", "seq_len", "steps", "rounds", "threads"):
        if getattr(args, name):
            s = replace(s, **{name: getattr(args, name)})
    return s


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    s = settings_from(args)
    load_wait = None
    if not (args.quick or args.no_wait):
        load_wait = wait_for_quiet(args.load_threshold, args.max_wait)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/cross_tokenizer.py", *argv])])
    result = run(s, load_wait=load_wait, command=command, quick=args.quick)
    return report_result(result, args, to_markdown)


if __name__ == "__main__":
    main()
