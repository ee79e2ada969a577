"""The whole flow, top to bottom: config → data → teacher → student → losses → engine → evaluation → report.

A run directory holds everything a run made and how it was made:
    config.yaml  env.json  metrics.json  history.json  report.md  plots/*.png  tb/
    teachers/member_<i>/   student/ (the chosen seed's student)   phases/<phase>/   checkpoints/<phase>/
A finished phase (a teacher member, a baseline or a student seed) leaves a model folder with result.json under
phases/ or teachers/; `--resume` reuses finished phases and continues the unfinished one from its checkpoint.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.atomic import write_json, write_text
from kdkit.config import KDConfig, config_diff, dump_config, load_config
from kdkit.data import DataBundle, TeacherCache, build_data
from kdkit.data.augment import Augment
from kdkit.engine import TrainOptions, train
from kdkit.engine.runtime import (
    init_processes,
    is_main_process,
    main_process_first,
    resolve_device,
    wait_for_everyone,
    world_size,
)
from kdkit.engine.schedules import Schedule, ScheduledValue
from kdkit.errors import CompatibilityError, ConfigError, TrainingError
from kdkit.evaluate import (
    classification_metrics,
    confusion,
    footprint,
    gain,
    latency_ms,
    reliability,
    summarize_seeds,
    throughput,
)
from kdkit.evaluate.predict import predict
from kdkit.evaluate.robustness import CORRUPTIONS, default_corruptions, robustness
from kdkit.losses import build_loss
from kdkit.models import build_model, load_model_folder, model_spec, output_classes, save_model_folder
from kdkit.models.hf import student_from_teacher
from kdkit.models.peers import Peers
from kdkit.registry import lookup
from kdkit.report import write_report
from kdkit.teachers import Teacher, TeacherEnsemble

Log = Callable[[str], None]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    student: nn.Module
    teacher: TeacherEnsemble


def distill(
    config: KDConfig | str | Path | dict,
    *,
    out: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    log: Log = print,
) -> RunResult:
    """Train (or load) the teacher, then for each seed a baseline student and a distilled student; evaluate, report."""
    cfg = config if isinstance(config, KDConfig) else load_config(config, overrides)
    run_dir = Path(out) if out else Path(cfg.run.out_dir) / cfg.run.name
    if cfg.data.task == "causal_lm":  # language models have their own flow (perplexity, not classes)
        from kdkit.pipeline_lm import distill_lm

        return distill_lm(cfg, run_dir, resume, log)
    init_processes(cfg.run.device)
    if not is_main_process():  # under `accelerate launch`/torchrun every process trains; one speaks and writes
        log = _quiet
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    env = prepare_run_dir(run_dir, cfg, resume, device)
    data = build_data(**cfg.data.model_dump())
    log(
        f"data: {len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test, "
        f"{data.num_classes} classes, input {data.input_shape}"
    )

    kinds = ["baseline"] * cfg.student.baseline + ["student"]
    if cfg.distill.mutual.enabled:
        runs, loss, spec, teacher = train_mutual(cfg, data, run_dir, kinds, resume, device, log)
        teacher_histories = {}
    else:
        teacher, teacher_histories = build_teacher(cfg, data, run_dir, resume, device, log)
        runs, loss, spec = train_students(cfg, data, teacher, run_dir, kinds, resume, device, log)
    cache_info = runs.pop("teacher_cache", None)  # size of the teacher-output cache, for the report

    best = max(runs["student"], key=lambda r: r["val_score"])
    if not is_main_process():
        wait_for_everyone()  # the main process evaluates and writes the run directory
        return RunResult(run_dir, {}, best["model"], teacher)
    metrics, extras = evaluate_all(cfg, data, teacher, runs, device)
    if cache_info:
        metrics["teacher_cache"] = cache_info
    if data.modality == "text":
        metrics["data"] = {"max_length": data.input_shape[0], "truncated_texts": data.truncated}
    save_model_folder(best["model"], run_dir / "student", spec)
    write_json(run_dir / "metrics.json", metrics)
    histories = teacher_histories | {r["phase"]: r["history"] for kind in runs.values() for r in kind}
    write_json(run_dir / "history.json", histories)
    write_report(
        run_dir,
        metrics=metrics,
        histories=histories,
        formula=loss.formula(),
        config_yaml=dump_config(cfg),
        class_names=data.class_names,
        env=env,
        **extras,
    )
    wait_for_everyone()
    return RunResult(run_dir, metrics, best["model"], teacher)


def _quiet(message: str) -> None:
    """The log of processes other than the main one."""


def train_students(
    cfg: KDConfig,
    data: DataBundle,
    teacher: TeacherEnsemble,
    run_dir: Path,
    kinds: list[str],
    resume: bool,
    device: str,
    log: Log,
    on_epoch: Callable[[str, int, dict], None] | None = None,
):
    """For each seed, train each kind of student ("baseline": labels only; "student": the distillation loss).
    Returns ({kind: [phase results]}, the loss (for its formula), the student's model spec).
    on_epoch(phase, epoch, validation metrics) is called after each evaluation (a search prunes through it)."""
    terms = [(t.name, *t.start_values()) for t in cfg.distill.losses]
    loss = build_loss(terms)  # the formula; each student seed gets its own instance (adapters are per seed)
    schedules = [
        ScheduledValue(
            i, what, Schedule(spec.schedule, spec.start, spec.end, spec.unit, spec.warmup_steps, spec.every, spec.gamma)
        )
        for i, t in enumerate(cfg.distill.losses)
        for what, spec in t.schedules().items()
    ]
    needs_teacher = loss.needs_teacher or any(loss.parts[sv.term].needs_teacher for sv in schedules)
    check_text_teacher(cfg, data, teacher, loss, needs_teacher)
    baseline_train = cfg.train
    if data.transfer:
        # The same budget for the baseline: as many example passes over the labelled examples as the distilled
        # student makes over labelled + transfer examples.
        n_labelled = len(data.train) - data.transfer
        epochs = max(1, round(cfg.train.epochs * len(data.train) / n_labelled))
        baseline_train = cfg.train.model_copy(update={"epochs": epochs})
        log(
            f"transfer set: {data.transfer} unlabelled training examples labelled by the teacher only "
            f"(the distilled student sees {len(data.train)} per epoch; the baseline the {n_labelled} labelled ones, "
            f"for {epochs} epochs: the same example passes)"
        )
    teacher_outputs = teacher_source(cfg, data, teacher, device, log) if needs_teacher else None
    baseline_loss = build_loss([("ce", 1.0, next((t.params for t in cfg.distill.losses if t.name == "ce"), {}))])
    log(f"loss: {loss.formula()}" + (f"   (baseline: {baseline_loss.formula()})" if "baseline" in kinds else ""))
    for sv in schedules:
        log(f"schedule: {loss.parts[sv.term].name}.{sv.what}: {sv.schedule.describe()}")

    s = cfg.student.model
    spec = model_spec(s.source, s.name, s.kwargs, data.input_shape, data.num_classes, s.path, "student.model.path")
    runs: dict[str, list[dict]] = {"student": [], "baseline": []}
    for seed in cfg.run.seeds:
        for kind in kinds:
            phase = f"{kind}-s{seed}"

            def attach(model, kind=kind):
                if kind == "baseline":
                    return baseline_loss, None, ()
                seeded = build_loss(terms)
                return seeded, wire_features(cfg, seeded, model, teacher, data, device), schedules

            def make(seed=seed):
                torch.manual_seed(seed)
                if s.teacher_layers is not None:  # DistilBERT-style: the trained teacher's chosen layers
                    return student_from_teacher(teacher.members[0].model, s.teacher_layers)
                return build_from_spec(s, data, "student.model")

            model, result = run_phase(
                cfg,
                cfg.train if kind == "student" else baseline_train,
                data if kind == "student" else data.labelled(),  # the baseline has no teacher to label a transfer set
                run_dir,
                phase,
                make,
                spec,
                attach,
                teacher_outputs if kind == "student" else None,
                seed,
                resume,
                device,
                log,
                on_epoch=(lambda epoch, m, phase=phase: on_epoch(phase, epoch, m)) if on_epoch else None,
            )
            runs[kind].append({"phase": phase, "model": model, **result})
    teacher.tap([])  # feature taps were for training only
    if isinstance(teacher_outputs, TeacherCache):
        runs["teacher_cache"] = {  # popped by distill; a search ignores it
            "path": str(teacher_outputs.path),
            "bytes": int(teacher_outputs.logits.nbytes),
            "examples": len(teacher_outputs),
            "views": teacher_outputs.views,
            "bytes_per_example": int(teacher_outputs.logits.nbytes) // max(1, len(teacher_outputs)),
        }
    return runs, loss, spec


def check_text_teacher(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, loss, needs_teacher: bool) -> None:
    """Refuse what a transfer set or a member with its own tokenizer cannot do, naming the field."""
    if data.transfer:
        if not needs_teacher:
            raise ConfigError(
                f"distill.losses: the transfer set ({data.transfer} unlabelled examples) needs a teacher loss "
                "(e.g. soft_kl); with labels alone it teaches nothing"
            )
        for i, t in enumerate(cfg.distill.losses):
            if t.name in LABEL_LOSSES:
                raise ConfigError(
                    f"distill.losses.{i}.name: {t.name} needs the true label of every example; the transfer set "
                    f"has {data.transfer} unlabelled ones (use ce + soft_kl)"
                )
    converted = [i for i, f in enumerate(teacher.inputs_for) if f is not None]
    if not converted:
        return
    if cfg.student.model.teacher_layers is not None and 0 in converted:
        raise ConfigError(
            "student.model.teacher_layers: member 0 has its own tokenizer (teacher.members.0.tokenizer), so its "
            "layers do not fit the student's token ids; put a member with data.tokenizer first"
        )
    from kdkit.losses.base import Loss

    feature_loss = any(type(p).feature_paths is not Loss.feature_paths for p in loss.parts)
    fm = cfg.teacher.feature_member
    if feature_loss and (fm is None or fm in converted):
        raise ConfigError(
            f"teacher.feature_member: {fm}; feature losses compare token positions, and member "
            f"{converted[0] if fm is None else fm} has its own tokenizer: take features from a member that uses "
            "data.tokenizer"
        )


LABEL_LOSSES = ("dkd",)  # losses that read batch.labels beside ce (which skips unlabelled examples)


def train_mutual(cfg: KDConfig, data: DataBundle, run_dir: Path, kinds: list[str], resume: bool, device: str, log: Log):
    """Deep mutual learning: per seed, the student and the teacher members train together as peers (and the
    baseline alone). The first seed's trained members become the teacher that the evaluation compares against."""
    m = cfg.distill.mutual
    terms = [("mutual", 1.0, {"temperature": m.temperature, "kd_weight": m.kd_weight})]
    baseline_loss = build_loss([("ce", 1.0, {})])
    loss = build_loss(terms)
    log(f"loss: {loss.formula()} over {1 + len(cfg.teacher.members)} peers (student + teacher members)")
    s = cfg.student.model
    spec = model_spec(s.source, s.name, s.kwargs, data.input_shape, data.num_classes, s.path, "student.model.path")
    specs = [spec] + [
        model_spec(mb.model.source, mb.model.name, mb.model.kwargs, data.input_shape, data.num_classes)
        for mb in cfg.teacher.members
    ]
    runs: dict[str, list[dict]] = {"student": [], "baseline": []}
    for seed in cfg.run.seeds:
        for kind in kinds:
            phase = f"{kind}-s{seed}"

            def make(seed=seed, kind=kind):
                torch.manual_seed(seed)
                student = build_from_spec(s, data, "student.model")
                if kind == "baseline":
                    return student
                members = [
                    build_from_spec(mb.model, data, f"teacher.members.{i}.model")
                    for i, mb in enumerate(cfg.teacher.members)
                ]
                peers = Peers([student, *members])
                peers.specs = specs
                return peers

            def attach(model, kind=kind):
                return (baseline_loss if kind == "baseline" else build_loss(terms)), None, ()

            model, result = run_phase(
                cfg, cfg.train, data, run_dir, phase, make, spec, attach, None, seed, resume, device, log
            )
            runs[kind].append({"phase": phase, "model": model, **result})
    first = runs["student"][0]["peers"]
    for i, member in enumerate(first):
        if is_main_process():
            save_model_folder(member, run_dir / "teachers" / f"member_{i}", specs[i + 1])
    teacher = TeacherEnsemble(
        [Teacher(mb.to(device)) for mb in first], [mb.weight for mb in cfg.teacher.members], cfg.teacher.combine
    )
    return runs, loss, spec, teacher


def prepare_run_dir(run_dir: Path, cfg: KDConfig, resume: bool, device: str) -> dict:
    """Write config.yaml and env.json; on resume, refuse a config that differs from the run's own."""
    saved = run_dir / "config.yaml"
    if resume and saved.is_file():
        before = load_config(saved)
        changed = config_diff(before, cfg, ignore=("run.progress", "run.threads"))
        if changed:
            raise TrainingError(
                f"--resume: the config differs from {saved} in {', '.join(changed[:5])}; "
                "resume with the same config, or start a new run directory"
            )
    elif resume:
        raise TrainingError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start it")
    elif is_main_process() and ((run_dir / "metrics.json").exists() or (run_dir / "checkpoints").exists()):
        shutil.rmtree(run_dir)  # a fresh run in a used folder starts clean; stale phases must not be reused
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
    import accelerate
    import numpy
    import sklearn

    from kdkit import __version__

    env = {
        "kdkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "seeds": list(cfg.run.seeds),
        "processes": world_size(),
        "split_seed": cfg.data.split_seed,
    }
    if is_main_process():
        write_text(saved, dump_config(cfg))
        write_json(run_dir / "env.json", env)
    wait_for_everyone()
    return env


def run_phase(
    cfg: KDConfig,
    train_cfg,
    data: DataBundle,
    run_dir: Path,
    phase: str,
    make: Callable[[], nn.Module],
    spec: dict,
    attach: Callable[[nn.Module], tuple],
    teacher_outputs,
    seed: int,
    resume: bool,
    device: str,
    log: Log,
    folder: Path | None = None,
    where: str = "student.model",
    on_epoch: Callable[[int, dict], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Train one network (or reuse it when a resumed run already finished this phase).
    make() builds the network; attach(network) gives its (loss, student feature taps or None, schedules).
    `where` is the config field of the network, for error messages."""
    folder = folder or run_dir / "phases" / phase
    done = folder / "result.json"
    if resume and done.is_file():
        log(f"{phase}: finished earlier, reusing {folder}")
        result = json.loads(done.read_text())
        peer_dirs = sorted(folder.glob("peer_*"), key=lambda p: int(p.name.split("_")[1]))
        if peer_dirs:
            result["peers"] = [load_model_folder(p) for p in peer_dirs]
        return load_model_folder(folder), result
    model = make()
    got = output_classes(model, data.example(2), where)
    if got != data.num_classes:
        raise CompatibilityError(f"{where}: outputs {got} classes ({phase}); the data has {data.num_classes}")
    on_eval = None
    if data.val is not None:
        evaluations = []

        def on_eval(m):
            metrics = val_metrics(m, data, cfg.eval.batch_size, device)
            evaluations.append(metrics)
            if on_epoch is not None:
                on_epoch(len(evaluations), metrics)
            return metrics

    loss, taps, schedules = attach(model)
    result = train(
        model,
        loss,
        data.train,
        TrainOptions.from_dict(train_cfg.model_dump()),
        augment=make_augment(
            train_cfg.augment, data, "teacher.train.augment" if train_cfg is cfg.teacher.train else "train.augment"
        ),
        teacher=teacher_outputs,
        on_eval=on_eval,
        seed=seed,
        device=device,
        ckpt_dir=run_dir / "checkpoints" / phase,
        resume=resume,
        tb_dir=(run_dir / "tb" / phase) if cfg.run.tensorboard else None,
        progress=cfg.run.progress,
        desc=phase,
        log=log,
        student_taps=taps,
        schedules=schedules,
    )
    if taps is not None:
        taps.remove()
    model = model.cpu()
    summary = {
        "history": result.history,
        "val_score": result.best_value if result.best_value is not None else 0.0,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "seconds": result.seconds,
        "stopped_early": result.stopped_early,
    }
    peers = None
    if isinstance(model, Peers):  # mutual learning: the student is peer 0; the others are kept beside it
        for i, peer in enumerate(model.peers[1:], start=1):
            if is_main_process():
                save_model_folder(peer, folder / f"peer_{i}", model.specs[i])
        peers, model = list(model.peers[1:]), model.peers[0]
    if is_main_process():
        save_model_folder(model, folder, spec)
        write_json(done, summary)
    wait_for_everyone()
    if peers is not None:
        summary = {**summary, "peers": peers}
    return model, summary


def build_from_spec(m, data: DataBundle, where: str) -> nn.Module:
    """One network from its config section (a ModelSpec), for this data's input shape and class count."""
    return build_model(
        m.source,
        m.name,
        m.kwargs,
        data.input_shape,
        data.num_classes,
        m.path,
        m.checkpoint,
        where=where,
        pretrained=m.pretrained,
    )


def wire_features(cfg: KDConfig, loss, student: nn.Module, teacher: TeacherEnsemble, data: DataBundle, device: str):
    """For feature losses: resolve layer names against the real models, tap student and teacher by module path,
    and let the losses build their adapters from the tapped shapes (before the optimizer is made)."""
    loss.resolve(student, [m.model for m in teacher.members])
    student_paths, teacher_paths = loss.feature_paths()
    if not student_paths and not teacher_paths:
        return None
    if cfg.distill.cache_teacher:
        raise ConfigError(
            "distill.cache_teacher: true, but feature losses need the live teacher's activations "
            f"({', '.join(teacher_paths)}); the cache stores outputs only: set cache_teacher: false"
        )
    from kdkit.models.taps import FeatureTaps

    taps = FeatureTaps(student, student_paths, "student.model")
    teacher.tap(teacher_paths, "teacher")
    example = data.example(2)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        student(example)
    student.train(was_training)
    student_shapes = {k: v.shape[1:] for k, v in taps.collect().items()}
    teacher_shapes = {k: v.shape[1:] for k, v in teacher(example.to(device)).features.items()}
    loss.setup(student_shapes, teacher_shapes)
    return taps


def val_metrics(model: nn.Module, data: DataBundle, batch_size: int, device: str) -> dict[str, float]:
    logits, labels = predict(model, data.val, batch_size, device)
    m = classification_metrics(logits, labels)
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "loss": m["nll"]}


def build_teacher(
    cfg: KDConfig, data: DataBundle, run_dir: Path, resume: bool, device: str, log: Log
) -> tuple[TeacherEnsemble, dict[str, list[dict]]]:
    """Load each member from its checkpoint, or train it here with cross-entropy (on the labelled examples only:
    a transfer set is for the student); wrap them frozen. A text member with its own tokenizer
    (teacher.members.i.tokenizer) is trained on the texts in its tokenisation and fed through a Retokenizer.
    Returns the ensemble and the training histories of the members trained here."""
    members, histories, inputs_for = [], {}, []
    for i, member in enumerate(cfg.teacher.members):
        m = member.model
        where = f"teacher.members.{i}.model"
        member_data = data
        retok = data.retokenizer(member.tokenizer, f"teacher.members.{i}.tokenizer") if member.tokenizer else None
        if retok is not None:  # the same texts and split, tokenised for this member
            member_data = build_data(**(cfg.data.model_dump() | {"tokenizer": member.tokenizer}))
        inputs_for.append(retok)
        spec = model_spec(
            m.source, m.name, m.kwargs, member_data.input_shape, member_data.num_classes, m.path, f"{where}.path"
        )
        if m.checkpoint or m.source == "kdkit" or m.trained:
            model = build_from_spec(m, member_data, where)
        else:
            seed = member.seed if member.seed is not None else i

            def make(m=m, seed=seed, where=where, member_data=member_data):
                torch.manual_seed(seed)
                return build_from_spec(m, member_data, where)

            model, result = run_phase(
                cfg,
                cfg.teacher.train,
                member_data.labelled(),
                run_dir,
                f"teacher-{i}",
                make,
                spec,
                lambda model: (build_loss([("ce", 1.0, {})]), None, ()),
                None,
                seed,
                resume,
                device,
                log,
                folder=run_dir / "teachers" / f"member_{i}",
                where=where,
            )
            histories[f"teacher-{i}"] = result["history"]
        members.append(
            Teacher(
                model.to(device), cfg.distill.teacher_precision, cfg.distill.channels_last, cfg.distill.teacher_fuse_bn
            )
        )
    ensemble = TeacherEnsemble(
        members,
        [mb.weight for mb in cfg.teacher.members],
        cfg.teacher.combine,
        cfg.teacher.feature_member,
        inputs_for=inputs_for,
    )
    if any(inputs_for):
        names = [f"{i}: {mb.tokenizer}" for i, mb in enumerate(cfg.teacher.members) if inputs_for[i] is not None]
        log(f"teacher: members with their own tokenizer ({'; '.join(names)}) see the texts in their own ids")
    ensemble.check(data.example(2).to(device), data.num_classes)
    return ensemble, histories


def teacher_source(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, device: str, log: Log):
    """What the loop calls for teacher outputs: the disk cache (looked up by example index), or the live teacher."""
    live_augment = make_augment(cfg.train.augment, data, "train.augment")
    converted = [i for i, f in enumerate(teacher.inputs_for) if f is not None]
    if live_augment is not None and converted:
        raise ConfigError(
            f"train.augment: teacher.members.{converted[0]}.tokenizer differs from the student's, so that member "
            "cannot see the student's augmented token ids; turn augmentation off or use one tokenizer"
        )
    if cfg.distill.cache_teacher:
        if live_augment is not None and not cfg.distill.cache_views:
            raise ConfigError(
                "distill.cache_views: train.augment is on, so cached un-augmented outputs would not match the "
                "student's inputs; set cache_views (e.g. 8) or cache_teacher: false"
            )
        augment = live_augment if cfg.distill.cache_views else None
        with main_process_first():  # built once; the other processes then find it on disk
            cache = TeacherCache.build_or_load(
                data.train,
                teacher.logits,
                teacher.fingerprint(),
                cfg.distill.cache_dir,
                cfg.eval.batch_size,
                device,
                log,
                augment=augment,
                views=cfg.distill.cache_views,
            )
        return cache
    return lambda batch: teacher(batch.inputs)


def make_augment(section, data: DataBundle, where: str) -> Augment | None:
    """The augment section → Augment (images, tables) or a TextAugment (token ids; the same interface),
    refusing transforms that do not fit the inputs (each with the field named)."""
    from kdkit.data.text_augment import TextAugment

    values = section.model_dump()
    if data.modality == "text":
        for name in IMAGE_AUGMENT_FIELDS:
            if values[name]:
                raise ConfigError(
                    f"{where}.{name}: {values[name]} does not apply to token ids; for text use token_mask, "
                    "token_delete or token_swap"
                )
        train = data.train
        text_aug = TextAugment(
            **{k: values[k] for k in TEXT_AUGMENT_FIELDS},
            seed=values["seed"],
            pad_id=train.pad_id,
            mask_id=train.mask_id,
            special_ids=train.special_ids,
        )
        if text_aug.token_mask and text_aug.mask_id is None:
            raise ConfigError(f"{where}.token_mask: the tokenizer has neither a mask nor an unk token to mask with")
        return text_aug if text_aug.active else None
    for name in TEXT_AUGMENT_FIELDS:
        if values[name]:
            raise ConfigError(
                f"{where}.{name}: needs text data (token ids); the data has inputs of shape {data.input_shape}"
            )
    aug = Augment(**{k: v for k, v in values.items() if k not in TEXT_AUGMENT_FIELDS})
    if not aug.active:
        return None
    if len(data.input_shape) != 3:
        for name in ("crop_padding", "hflip", "cutmix_alpha"):
            if getattr(aug, name):
                raise ConfigError(
                    f"{where}.{name}: needs image inputs (C, H, W); the data has inputs of shape {data.input_shape}"
                )
    return aug


TEXT_AUGMENT_FIELDS = ("token_mask", "token_delete", "token_swap")
IMAGE_AUGMENT_FIELDS = ("crop_padding", "hflip", "noise_std", "mixup_alpha", "cutmix_alpha")


def evaluate_all(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, runs: dict, device: str):
    """Test-split metrics of teacher, baseline and students (mean ± std over seeds), cost and speed-up."""
    e = cfg.eval
    t_logits, labels = predict(teacher, data.test, e.batch_size, device)
    one, batch = data.example(1).to(device), data.example(e.batch_size).to(device)

    def cost(forward, modules) -> dict:
        return {
            **footprint(modules),
            "latency_ms": latency_ms(forward, one, e.latency_repeats, e.latency_warmup),
            "throughput": throughput(forward, batch),
        }

    teacher_cost = cost(teacher, [mb.model for mb in teacher.members])
    teacher_m = {
        **classification_metrics(t_logits, labels, t_logits, e.ece_bins),
        **teacher_cost,
        "speedup": 1.0,
        "members": len(teacher.members),
    }
    metrics, curves = {"teacher": teacher_m}, {"teacher": reliability(t_logits, labels, e.ece_bins)}
    student_cost = None
    student_logits = None
    for kind, key in (("baseline", "baseline_student"), ("student", "student")):
        if not runs[kind]:
            continue
        per_seed = []
        for r in runs[kind]:
            model = r["model"].to(device).eval()
            logits, _ = predict(model, data.test, e.batch_size, device)
            per_seed.append({**classification_metrics(logits, labels, t_logits, e.ece_bins), "seed": r["phase"]})
            if kind == "student" and student_logits is None:
                student_logits = logits
        if student_cost is None:  # baseline and student share one architecture: one cost measurement
            model = runs[kind][0]["model"]
            student_cost = cost(model, [model])
            student_cost["speedup"] = teacher_cost["latency_ms"] / max(student_cost["latency_ms"], 1e-9)
        metrics[key] = {**summarize_seeds(per_seed), **student_cost}
        curves[key] = reliability(logits, labels, e.ece_bins)
        for r in runs[kind]:
            r["model"].cpu()
    if runs["baseline"]:
        strip = [{k: v for k, v in d.items() if k != "seed"} for d in metrics["student"]["per_seed"]]
        base = [{k: v for k, v in d.items() if k != "seed"} for d in metrics["baseline_student"]["per_seed"]]
        metrics["gain"] = gain(strip, base)
    if e.robustness:
        models = {"teacher": [teacher]}
        models.update({key: [r["model"].to(device) for r in runs[kind]] for kind, key in KINDS if runs[kind]})
        inputs, _ = data.inputs("test")
        text = data.modality == "text"
        options = {"mask_id": data.test.mask_id or 0, "pad_id": data.test.pad_id} if text else {}
        corruptions = list(e.corruptions.items()) if e.corruptions else default_corruptions(data.input_shape, text)
        for name, _ in corruptions:
            lookup(CORRUPTIONS, name, "eval.corruptions")
        try:
            metrics["robustness"] = robustness(
                models,
                inputs,
                labels,
                corruptions,
                seed=cfg.data.split_seed,
                batch_size=e.batch_size,
                device=device,
                **options,
            )
        except ValueError as exc:
            raise ConfigError(f"eval.corruptions: {exc}") from None
        for kind, _ in KINDS:
            for r in runs[kind]:
                r["model"].cpu()
    extras = {
        "confusion_matrix": confusion(student_logits, labels, data.num_classes),
        "reliability_curves": curves,
        "robustness": metrics.get("robustness"),
    }
    return metrics, extras


KINDS = (("baseline", "baseline_student"), ("student", "student"))


def evaluate_run(run_dir: str | Path, log: Log = print) -> dict:
    """Re-evaluate a finished run from its folder: the saved teacher members and student on the test split."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a kdkit run directory (no config.yaml)")
    if not (run_dir / "student" / "model.json").is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} has no trained student (student/model.json); did the run finish?")
    cfg = load_config(run_dir / "config.yaml")
    device = resolve_device(cfg.run.device)
    data = build_data(**cfg.data.model_dump())
    members = []
    for i, member in enumerate(cfg.teacher.members):
        folder = run_dir / "teachers" / f"member_{i}"
        m = member.model
        model = (
            load_model_folder(folder)
            if (folder / "model.json").is_file()
            else build_from_spec(m, data, f"teacher.members.{i}.model")
        )
        members.append(
            Teacher(
                model.to(device), cfg.distill.teacher_precision, cfg.distill.channels_last, cfg.distill.teacher_fuse_bn
            )
        )
    teacher = TeacherEnsemble(
        members, [mb.weight for mb in cfg.teacher.members], cfg.teacher.combine, cfg.teacher.feature_member
    )
    student = load_model_folder(run_dir / "student")
    runs = {"student": [{"phase": "student", "model": student}], "baseline": []}
    metrics, _ = evaluate_all(cfg, data, teacher, runs, device)
    write_json(run_dir / "eval.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Search


FIXED_IN_SEARCH = ("teacher.", "data.", "search.", "run.seeds", "run.out_dir", "run.name")


def search(
    config: str | Path | dict,
    *,
    out: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    trials: int | None = None,
    log: Log = print,
) -> dict:
    """Tune the values declared in `search.space` with Optuna; the teacher is trained (or loaded) once and shared.

    Each trial trains the distilled student for every search seed and scores the mean best validation metric;
    the last-epoch value is recorded beside it. The study is stored in RUN_DIR/search.db: running the same
    command again continues it. Writes RUN_DIR/search/{trials.json, *.png} and RUN_DIR/best_config.yaml."""
    import optuna

    from kdkit.config import read_yaml
    from kdkit.search import open_study, sample_overrides, search_plots, trial_table
    from kdkit.search.study import finished

    raw = read_yaml(config) if not isinstance(config, dict) else dict(config)
    cfg = load_config(raw, overrides)
    sc = cfg.search
    if not sc.space:
        raise ConfigError(
            "search.space: empty; declare what to tune, e.g. train.lr: {low: 1e-4, high: 1e-2, log: true}"
        )
    space = {path: p.model_dump(exclude_none=True) for path, p in sc.space.items()}
    for path, p in space.items():  # every path must name a real config value that accepts the sampled values
        if path.startswith(FIXED_IN_SEARCH):
            raise ConfigError(f"search.space.{path}: the teacher, the data and the run layout stay fixed in a search")
        probes = p.get("choices") or [p["low"], p["high"]]
        for value in probes:
            try:
                load_config(raw, (*overrides, f"{path}={json.dumps(value)}"))
            except ConfigError as exc:
                raise ConfigError(f"search.space.{path}: {exc.details[0] if exc.details else exc}") from None
    run_dir = Path(out) if out else Path(cfg.run.out_dir) / f"{cfg.run.name}-search"
    storage = run_dir / "search.db"
    device = resolve_device(cfg.run.device)
    prepare_run_dir(run_dir, cfg, storage.is_file(), device)
    data = build_data(**cfg.data.model_dump())
    if data.val is None:
        raise ConfigError("data.val_fraction: a search scores trials on the validation split; set it above 0")
    teacher, _ = build_teacher(cfg, data, run_dir, True, device, log)
    seeds = sc.seeds or cfg.run.seeds
    direction = "minimize" if sc.metric == "loss" else "maximize"
    study = open_study(storage, cfg.run.name, direction, sc.sampler_seed, sc.pruner, sc.sampler)
    budget = trials or sc.trials

    def objective(trial: optuna.Trial) -> float:
        trial_overrides = sample_overrides(trial, space)
        tcfg = load_config(raw, (*overrides, *trial_overrides, f"run.seeds={json.dumps(seeds)}", "run.progress=false"))
        log(f"trial {trial.number}: " + " ".join(trial_overrides))

        def on_epoch(phase: str, epoch: int, metrics: dict) -> None:
            if phase == f"student-s{seeds[0]}":
                trial.report(metrics[sc.metric], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        trial_dir = run_dir / "trials" / f"trial_{trial.number:04d}"
        try:
            runs, _, _ = train_students(
                tcfg, data, teacher, trial_dir, ["student"], False, device, lambda m: None, on_epoch
            )
        finally:
            shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
        best, last = [], []
        for r in runs["student"]:
            values = [h[f"val/{sc.metric}"] for h in r["history"] if f"val/{sc.metric}" in h]
            best.append(min(values) if direction == "minimize" else max(values))
            last.append(values[-1])
        stats = {
            "best_mean": float(np.mean(best)),
            "best_std": float(np.std(best)),
            "last_mean": float(np.mean(last)),
            "last_std": float(np.std(last)),
            "per_seed_best": best,
            "overrides": trial_overrides,
        }
        for k, v in stats.items():
            trial.set_user_attr(k, v)
        log(
            f"trial {trial.number}: {sc.metric} best {stats['best_mean']:.4f} ± {stats['best_std']:.4f}, "
            f"last epoch {stats['last_mean']:.4f} ± {stats['last_std']:.4f}"
        )
        return stats["best_mean"]

    remaining = max(0, budget - finished(study))
    if remaining < budget:
        log(f"search: resuming {storage} ({finished(study)} trials done, {remaining} to go)")
    study.optimize(objective, n_trials=remaining, catch=(TrainingError,))
    rows = trial_table(study)
    out_dir = run_dir / "search"
    write_json(out_dir / "trials.json", rows)
    plots = search_plots(study, out_dir)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    if not complete:
        raise TrainingError(f"search: no trial completed ({len(rows)} pruned or failed); see {out_dir / 'trials.json'}")
    best = complete[0]
    best_cfg = load_config(raw, (*overrides, *best["overrides"]))
    write_text(run_dir / "best_config.yaml", dump_config(best_cfg))
    summary = {
        "metric": sc.metric,
        "direction": direction,
        "best": best,
        "trials": len(rows),
        "complete": len(complete),
        "pruned": sum(r["state"] == "PRUNED" for r in rows),
        "best_config": str(run_dir / "best_config.yaml"),
        "plots": [str(p) for p in plots],
    }
    write_json(out_dir / "summary.json", summary)
    return summary
