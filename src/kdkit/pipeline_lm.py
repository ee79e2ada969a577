"""The language-model flow (data.task: causal_lm), top to bottom:
config → corpus blocks → frozen teacher (or its top-k cache) → students → token losses → engine → perplexity → report.

Per seed it trains a baseline student on the text alone (token_ce) and a distilled student (the configured losses),
from the same initialisation and data order, then compares them with the teacher on held-out text. Optional:
sequence-level KD (the teacher's continuations of training prompts join the distilled student's data) and
on-policy KD (a share λ of batches is continued by the student and scored by the live teacher).

A run directory holds: config.yaml env.json metrics.json history.json report.md plots/ student/ (an HF folder:
AutoModelForCausalLM and AutoTokenizer load it) phases/<phase>/ checkpoints/<phase>/ generations.jsonl.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.atomic import write_json, write_text
from kdkit.config import KDConfig, dump_config
from kdkit.data.lm import LMBundle, LMData, build_lm_data, concat
from kdkit.engine import TrainOptions, train
from kdkit.engine.runtime import init_processes, is_main_process, main_process_first, resolve_device, wait_for_everyone
from kdkit.engine.schedules import Schedule, ScheduledValue
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.evaluate import footprint, summarize_seeds
from kdkit.evaluate.latency import latency_ms
from kdkit.evaluate.lm import lm_metrics, tokens_per_second
from kdkit.losses import build_loss
from kdkit.models.causal_lm import load_causal_lm, save_lm_folder, smaller_lm, student_from_teacher_lm
from kdkit.models.vocab import check_tokenizers
from kdkit.pipeline import RunResult, _quiet, prepare_run_dir, wire_features
from kdkit.report.lm import write_lm_report
from kdkit.teachers import Teacher, TeacherEnsemble

Log = Callable[[str], None]


def distill_lm(cfg: KDConfig, run_dir: Path, resume: bool, log: Log = print) -> RunResult:
    """Train baseline and distilled language-model students for each seed; evaluate; report."""
    init_processes(cfg.run.device)
    if not is_main_process():
        log = _quiet
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    env = prepare_run_dir(run_dir, cfg, resume, device)

    teacher, tokenizer = build_lm_teacher(cfg, device, log)
    d = cfg.data
    data = _lm_data(cfg, tokenizer)
    log(
        f"data: {data.documents} documents, {data.tokens:,} tokens → blocks of {data.block_size}: "
        f"{len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test"
    )
    train_data = data.train
    kd_data = with_sequence_kd(cfg, data, teacher, run_dir, device, log)

    terms = [(t.name, *t.start_values()) for t in cfg.distill.losses]
    loss = build_loss(terms)
    baseline_loss = build_loss([("token_ce", 1.0, {})])
    schedules = [
        ScheduledValue(
            i, what, Schedule(spec.schedule, spec.start, spec.end, spec.unit, spec.warmup_steps, spec.every, spec.gamma)
        )
        for i, t in enumerate(cfg.distill.losses)
        for what, spec in t.schedules().items()
    ]
    log(f"loss: {loss.formula()}   (baseline: {baseline_loss.formula()})")
    teacher_outputs, cache_info = lm_teacher_source(cfg, kd_data, teacher, loss, device, log)
    on_policy = make_on_policy(cfg, tokenizer, teacher)

    runs: dict[str, list[dict]] = {"baseline": [], "student": []}
    kinds = ["baseline"] * cfg.student.baseline + ["student"]
    for seed in cfg.run.seeds:
        for kind in kinds:
            phase = f"{kind}-s{seed}"
            distilled = kind == "student"
            model, result = run_lm_phase(
                cfg,
                phase,
                lambda seed=seed: build_lm_student(cfg, teacher, seed),
                build_loss(terms) if distilled else baseline_loss,
                kd_data if distilled else train_data,
                data,
                tokenizer,
                teacher if distilled else None,
                teacher_outputs if distilled else None,
                schedules if distilled else (),
                on_policy if distilled else None,
                run_dir,
                seed,
                resume,
                device,
                log,
            )
            runs[kind].append({"phase": phase, "model": model, **result})

    best = min(runs["student"], key=lambda r: r["val_score"] if r["val_score"] is not None else math.inf)
    if not is_main_process():
        wait_for_everyone()
        return RunResult(run_dir, {}, best["model"], teacher)
    metrics, samples = evaluate_lm(cfg, data, teacher, runs, tokenizer, device, cache_info, best["phase"])
    metrics["data"] = {
        "corpus": d.name if d.source in ("builtin", "hf") else d.path,
        "documents": data.documents,
        "tokens": data.tokens,
        "block_size": data.block_size,
        "train_blocks": len(train_data),
        "sequence_kd_examples": len(kd_data) - len(train_data),
    }
    if cache_info:
        metrics["teacher_cache"] = cache_info
    save_lm_folder(best["model"], tokenizer, run_dir / "student")
    write_json(run_dir / "metrics.json", metrics)
    histories = {r["phase"]: r["history"] for kind in runs.values() for r in kind}
    write_json(run_dir / "history.json", histories)
    report = write_lm_report(
        run_dir,
        metrics=metrics,
        histories=histories,
        formula=loss.formula(),
        config_yaml=dump_config(cfg),
        env=env,
        samples=samples,
    )
    # The HF folder carries the report as its model card (plots stay in the run directory).
    write_text(run_dir / "student" / "README.md", report.read_text().replace("](plots/", "](../plots/"))
    wait_for_everyone()
    return RunResult(run_dir, metrics, best["model"], teacher)


def cache_teacher(config, overrides: tuple[str, ...] = (), log: Log = print) -> dict:
    """`kdkit cache-teacher`: build (or verify) the top-k teacher cache of a causal_lm config's training data,
    including the sequence-level KD examples, exactly as `kdkit train` would read it."""
    from kdkit.config import load_config

    cfg = config if isinstance(config, KDConfig) else load_config(config, overrides)
    if cfg.data.task != "causal_lm" or not cfg.distill.cache_teacher:
        raise ConfigError(
            "distill.cache_teacher: kdkit cache-teacher needs data.task: causal_lm and distill.cache_teacher: true"
        )
    init_processes(cfg.run.device)
    device = resolve_device(cfg.run.device)
    teacher, tokenizer = build_lm_teacher(cfg, device, log)
    data = _lm_data(cfg, tokenizer)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    kd_data = with_sequence_kd(cfg, data, teacher, run_dir, device, log)
    loss = build_loss([(t.name, *t.start_values()) for t in cfg.distill.losses])
    _, info = lm_teacher_source(cfg, kd_data, teacher, loss, device, log)
    if info is None:
        raise ConfigError("distill.losses: no loss reads the teacher (add token_kl), so there is nothing to cache")
    return info


def _lm_data(cfg: KDConfig, tokenizer) -> LMBundle:
    d = cfg.data
    return build_lm_data(
        d.source,
        d.name,
        d.path,
        d.data_files,
        d.text_column,
        tokenizer,
        d.max_length,
        d.val_fraction,
        d.test_fraction,
        d.split_seed,
        d.limit,
    )


def build_lm_teacher(cfg: KDConfig, device: str, log: Log) -> tuple[TeacherEnsemble, object]:
    """Each member from its folder / hub id / builtin name, frozen; the tokenizer is data.tokenizer or member 0's.
    Members must share the vocabulary (a padded output layer is fine)."""
    members, tokenizers = [], []
    for i, member in enumerate(cfg.teacher.members):
        where = f"teacher.members.{i}.model.path"
        model, tok = load_causal_lm(member.model.path, where)
        log(f"teacher member {i}: {type(model).__name__}, {footprint(model)['params'] / 1e6:.1f} M parameters")
        if cfg.data.max_length > _context(model):
            raise ConfigError(
                f"data.max_length: {cfg.data.max_length} tokens per block; teacher member {i} reads at most "
                f"{_context(model)} positions (its max_position_embeddings)"
            )
        members.append(Teacher(model.to(device), cfg.distill.teacher_precision))
        tokenizers.append(tok)
    tokenizer = tokenizers[0]
    if cfg.data.tokenizer:
        from kdkit.data.text import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer)
    for i, tok in enumerate(tokenizers):
        check_tokenizers(tokenizer, tok, f"teacher.members.{i}: tokenizer vs data.tokenizer")
    widths = {m.model.get_output_embeddings().weight.shape[0] for m in members}
    if len(widths) > 1:
        raise CompatibilityError(
            f"teacher.members: output vocabularies of different sizes ({sorted(widths)}); an ensemble averages "
            "distributions id by id, so the members need one output size"
        )
    ensemble = TeacherEnsemble(members, [m.weight for m in cfg.teacher.members], cfg.teacher.combine)
    return ensemble, tokenizer


def build_lm_student(cfg: KDConfig, teacher: TeacherEnsemble, seed: int) -> nn.Module:
    """teacher_layers: a copy of member 0 with those decoder layers; pretrained false: a random-init config of the
    teacher's family changed by kwargs; else the model at student.model.path."""
    s = cfg.student.model
    torch.manual_seed(seed)
    base = teacher.members[0].model
    if s.teacher_layers is not None:
        model = student_from_teacher_lm(base, s.teacher_layers, "student.model.teacher_layers")
    elif not s.pretrained:
        model = smaller_lm(base, where="student.model.kwargs", **s.kwargs)
    else:
        model, _ = load_causal_lm(s.path, "student.model.path")
    for p in model.parameters():  # a copy of the frozen teacher's layers must learn
        p.requires_grad_(True)
    return model.train()


def with_sequence_kd(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, run_dir: Path, device: str, log: Log):
    """The distilled student's training data: the training blocks, plus (llm.sequence_level > 0) the teacher's
    continuations of that many training prompts, kept in RUN_DIR/generations.jsonl and reused on --resume."""
    n = cfg.llm.sequence_level
    if n == 0:
        return data.train
    from kdkit.llm.generate import generate, read_generations, sequence_kd_examples, write_generations

    g = cfg.llm.generation
    path = run_dir / "generations.jsonl"
    p = cfg.llm.prompt_tokens
    rng = np.random.default_rng(cfg.data.split_seed)
    rows = np.sort(rng.permutation(len(data.train))[: min(n, len(data.train))])
    prompts = [data.train.ids[i, :p].tolist() for i in rows]
    with main_process_first():
        if path.is_file():
            records = read_generations(path)
            completions = [r["completion_ids"] for r in records]
            if [r["prompt_ids"] for r in records] != prompts:
                raise ConfigError(f"llm.sequence_level: {path} was written for other prompts; delete it")
        else:
            log(f"sequence-level KD: the teacher continues {len(prompts)} prompts ({g.max_new_tokens} new tokens)")
            try:
                completions = generate(
                    teacher.members[0].model,
                    prompts,
                    _settings(cfg),
                    pad_id=data.train.pad_id,
                    eos_id=data.train.eos_id,
                    seed=cfg.data.split_seed,
                    batch_size=cfg.eval.batch_size,
                    context_length=_context(teacher.members[0].model),
                )
            except ValueError as exc:  # settings that do not fit the model or the prompts
                raise ConfigError(f"llm.generation: {exc}") from None
            if is_main_process():
                write_generations(path, prompts, completions, data.tokenizer)
    examples = sequence_kd_examples(prompts, completions, data.train.pad_id, data.block_size)
    if not examples:
        log("sequence-level KD: the teacher wrote no tokens for any prompt; training on the blocks alone")
        return data.train
    ids = torch.full((len(examples), data.block_size), data.train.pad_id, dtype=torch.long)
    lengths, prompt_lengths = [], []
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = ex["input_ids"]
        lengths.append(n)
        prompt_lengths.append(int((ex["labels"] == -100).sum()))  # -100 only on the prompt, at the start
    extra = LMData(ids, torch.tensor(lengths), data.train.pad_id, data.train.eos_id)
    extra.prompt_lengths = torch.tensor(prompt_lengths)
    return concat([data.train, extra])


def _settings(cfg: KDConfig):
    from kdkit.llm.generate import GenerationSettings

    g = cfg.llm.generation
    try:
        return GenerationSettings(g.sampling_temperature, g.top_p, g.max_new_tokens, g.do_sample)
    except ValueError as exc:
        raise ConfigError(f"llm.generation: {exc}") from None


def _context(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048))


def make_on_policy(cfg: KDConfig, tokenizer, teacher: TeacherEnsemble):
    """GKD's on-policy batches: a share λ of batches continued by the student (scored by the live teacher)."""
    lam = cfg.llm.on_policy_fraction
    if lam == 0:
        return None
    from kdkit.llm.generate import OnPolicy

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = _context(teacher.members[0].model)
    try:
        return OnPolicy(
            lam, _settings(cfg), cfg.llm.prompt_tokens, pad, tokenizer.eos_token_id, cfg.data.split_seed, context
        )
    except ValueError as exc:
        raise ConfigError(f"llm.generation: {exc}") from None


def lm_teacher_source(cfg: KDConfig, data: LMData, teacher: TeacherEnsemble, loss, device: str, log: Log):
    """The live teacher, or its top-k cache over `data` (built once, reused while teacher and data match)."""
    if not loss.needs_teacher:
        return None, None
    if not cfg.distill.cache_teacher:
        return LiveTeacher(teacher), None
    from kdkit.data.lm_cache import TopKCache

    temperature = _kd_temperature(cfg)
    teacher_fp, data_fp = teacher.fingerprint(), data.fingerprint()
    k = cfg.llm.top_k
    # One folder per (teacher, data, k, T): another teacher or data set never meets this cache, it gets its own.
    name = f"lm-topk-{teacher_fp[:12]}-{data_fp[:12]}-k{k}-T{temperature:g}"
    path = Path(cfg.distill.cache_dir or Path(cfg.run.out_dir) / "cache") / name
    with main_process_first():
        cache = TopKCache.build_or_load(
            path,
            data,
            teacher.logits,
            k,
            temperature,
            teacher_fp,
            data_fp,
            lengths=data.lengths.tolist(),
            batch_size=cfg.eval.batch_size,
            device=device,
            log=log,
        )
    info = {
        "path": str(cache.path),
        "k": cfg.llm.top_k,
        "kd_temperature": temperature,
        "tokens": cache.tokens,
        "bytes": cache.size_bytes,
        "bytes_per_token": round(cache.bytes_per_token, 1),
    }
    log(f"teacher cache: {info['tokens']:,} tokens, {info['bytes_per_token']} bytes/token at k={cfg.llm.top_k}")
    return cache, info


class TopKError:
    """What the top-k cache loses, on held-out text: the distilled student's forward KL to the dense teacher vs to
    the teacher's top-k (the loss it was trained with), token-weighted. Fed by lm_metrics' forward passes."""

    def __init__(self, student: str, k: int, temperature: float):
        self.student, self.k, self.temperature = student, k, temperature
        self.totals: dict[str, float] = {}
        self.tokens = 0

    def __call__(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        from kdkit.data.lm_cache import topk_logprobs
        from kdkit.losses.token_functional import topk_kl_error

        t, s = logits["teacher"], logits[self.student].float()
        v = min(t.shape[-1], s.shape[-1])  # a padded output layer: the shared ids
        t, s = t[..., :v], s[..., :v]
        r = topk_kl_error(s, t, topk_logprobs(t, self.k, self.temperature), labels, self.temperature)
        for key in ("dense_kl", "sparse_kl", "teacher_kl", "topk_mass"):
            self.totals[key] = self.totals.get(key, 0.0) + r[key] * r["tokens"]
        self.tokens += r["tokens"]

    def summary(self) -> dict:
        out = {f"heldout_{key}": round(v / max(self.tokens, 1), 4) for key, v in self.totals.items()}
        dense = out.get("heldout_dense_kl", 0.0)
        out["heldout_kl_rel_error"] = round((dense - out.get("heldout_sparse_kl", 0.0)) / dense, 4) if dense else 0.0
        return out


class LiveTeacher:
    """The teacher source the engine calls when nothing is cached: the frozen teacher on the batch's tokens."""

    def __init__(self, teacher: TeacherEnsemble):
        self.teacher = teacher

    def __call__(self, batch):
        return self.teacher(batch.inputs)


def _kd_temperature(cfg: KDConfig) -> float:
    """The cache stores log-probabilities at the token_kl temperature; a scheduled temperature cannot be cached."""
    temps = {float(t.params.get("temperature", 1.0)) for t in cfg.distill.losses if t.name == "token_kl"}
    if any(isinstance(t.params.get("temperature"), dict) for t in cfg.distill.losses):
        raise ConfigError("distill.cache_teacher: a scheduled kd temperature cannot be cached; use the live teacher")
    if len(temps) > 1:
        raise ConfigError(f"distill.losses: token_kl temperatures {sorted(temps)} differ; the cache holds one")
    return temps.pop() if temps else 1.0


def run_lm_phase(
    cfg: KDConfig,
    phase: str,
    make: Callable[[], nn.Module],
    loss,
    train_data: LMData,
    data: LMBundle,
    tokenizer,
    teacher: TeacherEnsemble | None,
    teacher_outputs,
    schedules,
    transform,
    run_dir: Path,
    seed: int,
    resume: bool,
    device: str,
    log: Log,
) -> tuple[nn.Module, dict]:
    """Train one student (or reuse it when a resumed run already finished this phase)."""
    folder = run_dir / "phases" / phase
    done = folder / "result.json"
    if resume and done.is_file():
        log(f"{phase}: finished earlier, reusing {folder}")
        model, _ = load_causal_lm(str(folder), f"phases/{phase}")
        return model, json.loads(done.read_text())
    model = make()
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise CompatibilityError(
            f"student.model: {width} output logits; the tokenizer has {len(tokenizer)} tokens (expected at least that)"
        )
    batch_size = cfg.eval.batch_size
    # Feature losses (hidden_state on decoder layers, with a learned projection when the widths differ) tap both
    # models; they need the live teacher (wire_features refuses the cache, which holds output distributions only).
    taps = wire_features(cfg, loss, model, teacher, data, device) if teacher is not None else None

    def on_eval(m: nn.Module) -> dict[str, float]:
        was = m.training
        m.eval()
        r = lm_metrics({"m": m}, data.val, batch_size, device)["m"]
        m.train(was)
        return {"loss": r["nll"], "perplexity": r["perplexity"], "accuracy": r["accuracy"]}

    result = train(
        model,
        loss,
        train_data,
        TrainOptions.from_dict(cfg.train.model_dump()),
        teacher=teacher_outputs,
        on_eval=on_eval if data.val is not None else None,
        seed=seed,
        device=device,
        ckpt_dir=run_dir / "checkpoints" / phase,
        resume=resume,
        tb_dir=(run_dir / "tb" / phase) if cfg.run.tensorboard else None,
        progress=cfg.run.progress,
        desc=phase,
        log=log,
        schedules=schedules,
        transform=transform,
        student_taps=taps,
    )
    if taps is not None:
        taps.remove()
        teacher.tap([])
    model = model.cpu()
    summary = {
        "history": result.history,
        "val_score": result.best_value,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "seconds": result.seconds,
        "tokens_seen": int(sum(int(x) for x in train_data.lengths)) * result.epochs_run,
    }
    if is_main_process():
        save_lm_folder(model, tokenizer, folder)
        write_json(done, summary)
    wait_for_everyone()
    return model, summary


def evaluate_lm(
    cfg: KDConfig,
    data: LMBundle,
    teacher: TeacherEnsemble,
    runs: dict,
    tokenizer,
    device: str,
    cache_info: dict | None = None,
    best_phase: str | None = None,
):
    """Test-split metrics of teacher and students (mean ± std over seeds), cost, speed-up, greedy samples; with a
    top-k cache, its KL error for the best distilled student (added to cache_info) from the same forward passes."""
    e = cfg.eval
    models: dict[str, Callable] = {"teacher": teacher.logits}
    for kind in ("baseline", "student"):
        for r in runs[kind]:
            r["model"].to(device).eval()
            models[r["phase"]] = r["model"]
    widths = [teacher.members[0].model.get_output_embeddings().weight.shape[0]]
    widths += [r["model"].get_output_embeddings().weight.shape[0] for k in runs.values() for r in k]
    shared = min(widths) if len(set(widths)) > 1 else None
    topk = TopKError(best_phase, cache_info["k"], cache_info["kd_temperature"]) if cache_info else None
    scores = lm_metrics(models, data.test, e.batch_size, device, teacher="teacher", vocab_size=shared, on_batch=topk)
    if topk is not None:
        cache_info.update(topk.summary())

    block = data.test.ids[: min(len(data.test), e.batch_size)].to(device)
    one = data.test.ids[:1].to(device)

    def cost(forward, modules) -> dict:
        return {
            **footprint(modules),
            "latency_ms": latency_ms(forward, one, max(5, e.latency_repeats // 4), 1),
            "tokens_per_s": tokens_per_second(forward, block),
        }

    metrics = {"teacher": {**scores["teacher"], **cost(teacher.logits, [m.model for m in teacher.members])}}
    metrics["teacher"]["speedup"] = 1.0
    student_cost = None
    for kind, key in (("baseline", "baseline_student"), ("student", "student")):
        if not runs[kind]:
            continue
        per_seed = [{**scores[r["phase"]], "seed": r["phase"]} for r in runs[kind]]
        if student_cost is None:
            m = runs[kind][0]["model"]
            student_cost = cost(m, [m])
            # Throughput over a batch of blocks: steadier than one batch-1 call on a shared CPU.
            student_cost["speedup"] = student_cost["tokens_per_s"] / max(metrics["teacher"]["tokens_per_s"], 1e-9)
        metrics[key] = {**summarize_seeds(per_seed), **student_cost}
    if runs["baseline"]:
        s = np.array([scores[r["phase"]]["nll"] for r in runs["student"]])
        b = np.array([scores[r["phase"]]["nll"] for r in runs["baseline"]])
        diff = s - b
        sp, bp = metrics["student"]["perplexity"], metrics["baseline_student"]["perplexity"]
        metrics["gain"] = {
            "nll_diff": float(diff.mean()),
            "nll_diff_std": float(diff.std(ddof=0)),
            "seeds": int(len(diff)),
            "student_perplexity": sp,
            "baseline_perplexity": bp,
            "perplexity_change_pct": 100.0 * (sp - bp) / bp,
        }
    samples = greedy_samples(cfg, data, teacher, runs, tokenizer, device)
    for kind in runs.values():
        for r in kind:
            r["model"].cpu()
    return metrics, samples


def greedy_samples(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, runs: dict, tokenizer, device: str):
    n = min(cfg.llm.report_samples, len(data.test))
    if n == 0:
        return []
    from kdkit.llm.generate import GenerationSettings, generate

    p = cfg.llm.prompt_tokens
    prompts = [data.test.ids[i, :p].tolist() for i in range(n)]
    settings = GenerationSettings(1.0, 1.0, min(cfg.llm.generation.max_new_tokens, 48), False)
    pad, eos = data.test.pad_id, data.test.eos_id
    models = {"teacher": teacher.members[0].model}
    for kind, key in (("baseline", "baseline_student"), ("student", "student")):
        if runs[kind]:
            models[key] = runs[kind][0]["model"]
    out = [{"prompt": tokenizer.decode(q)} for q in prompts]
    for key, model in models.items():
        ids = generate(
            model.to(device),
            prompts,
            settings,
            pad_id=pad,
            eos_id=eos,
            seed=0,
            batch_size=n,
            context_length=_context(model),
        )
        for row, c in zip(out, ids):
            row[key] = tokenizer.decode(c)
    return out
