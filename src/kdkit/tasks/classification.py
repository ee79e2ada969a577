"""Classification (images, tables, text): the teacher's class distribution taught to a smaller classifier.

Data: kdkit.data (built-in sets, arrays, csv/parquet, image and text folders, HF datasets). Teacher: members
loaded from checkpoints or trained here (as phases teacher-<i>), frozen, averaged. Students: a registry model, an
HF classifier, or DistilBERT-style layers of the teacher; deep mutual learning trains student and members together.
Evaluation: accuracy, macro F1, ECE, agreement with the teacher, robustness, cost.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kdkit.config import KDConfig, dump_config, load_config
from kdkit.data import DataBundle, TeacherCache, build_data
from kdkit.data.augment import Augment
from kdkit.engine import TrainOptions, train
from kdkit.engine.runtime import main_process_first, world_size
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.evaluate.predict import predict
from kdkit.losses import build_loss
from kdkit.models import build_model, load_model_folder, model_spec, output_classes, save_model_folder
from kdkit.models.build import comes_trained
from kdkit.models.hf import student_from_teacher
from kdkit.models.peers import Peers
from kdkit.models.qat import prepare_qat, strip_qat
from kdkit.run import Phase, PhaseResult, Recipe, RunDir
from kdkit.run.features import wire_features
from kdkit.run.losses import baseline_loss, loss_schedules, loss_terms, needs_teacher
from kdkit.run.phases import phase_summary, run_phase
from kdkit.run.teacher import LiveTeacher, frozen
from kdkit.tasks import classification_eval
from kdkit.tasks.base import CACHE_OFF
from kdkit.teachers import TeacherEnsemble


class Classification:
    name = "classification"
    columns = classification_eval.COLUMNS
    search_metrics = ("accuracy", "f1_macro", "loss")
    auto_switch = "distill.auto"  # `kdkit train --auto` sets <auto_switch>.enabled (kdkit.search.auto)
    shipping = None  # kdkit export and serve take its runs

    def load_config(self, config: str | Path | dict, overrides: tuple[str, ...]) -> KDConfig:
        return load_config(config, overrides)

    def dump_config(self, cfg: KDConfig) -> str:
        return dump_config(cfg)

    def check(self, cfg: KDConfig) -> None:
        from kdkit.validate import check_names

        check_names(cfg)

    def load_data(self, cfg: KDConfig, run: RunDir) -> DataBundle:
        data = build_data(**cfg.data.model_dump())
        run.log(
            f"data: {len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test, "
            f"{data.num_classes} classes, input {data.input_shape}"
        )
        return data

    def build_teacher(self, cfg: KDConfig, data: DataBundle, run: RunDir) -> TeacherEnsemble | None:
        if cfg.distill.mutual.enabled and not run.read_only:
            return None  # trained with the student (recipe), taken from the first seed's peers (evaluate)
        return build_teacher(cfg, data, run)

    def recipe(self, cfg, data, teacher, run, on_epoch=None) -> Recipe:
        if cfg.distill.mutual.enabled:
            return mutual_recipe(cfg, data, run, on_epoch)
        return student_recipe(cfg, data, teacher, run, on_epoch)

    def evaluate(self, cfg, data, teacher, results, run, best, recipe=None):
        if teacher is None:  # mutual learning: the first seed's trained peers
            teacher = mutual_teacher(cfg, data, results["student"][0], run)
        info = recipe.info if recipe is not None else {}
        return classification_eval.evaluate(cfg, data, teacher, results, run.device, best, info)

    def save_student(self, model: nn.Module, folder: Path, data: DataBundle, cfg: KDConfig) -> None:
        """The student folder, and beside it preprocess.json: how a raw image or text becomes its input, exactly as
        the data pipeline made them (kdkit.data.preprocess), for kdkit serve and exports."""
        from kdkit.data.preprocess import describe, save_preprocess

        save_model_folder(model, folder, student_spec(cfg, data))
        save_preprocess(folder, describe(cfg.data.model_dump(), data), data.tokenizer)

    def load_student(self, folder: Path) -> nn.Module:
        return load_model_folder(folder, where="RUN_DIR/student")

    def report(self, cfg, run, metrics, histories, recipe, extras) -> None:
        classification_eval.report(cfg, run, metrics, histories, recipe, extras)

    def cache_teacher(self, cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, run: RunDir) -> dict:
        """The teacher's logits over the training split (with distill.cache_views augmented views), as train
        reads them; members the run trains are trained first (and kept in RUN_DIR/teachers)."""
        if not cfg.distill.cache_teacher:
            raise ConfigError(CACHE_OFF)
        return cache_info(teacher_source(cfg, data, teacher, run))["teacher_cache"]


# ---------------------------------------------------------------------------------------------------------------
# Teacher


def build_from_spec(m, data: DataBundle, where: str, log=None) -> nn.Module:
    """One network from its config section (a ModelSpec), for this data's input shape and class count; `log`
    hears which tensors of m.init_from were re-initialised."""
    return build_model(
        m.source, m.name, m.kwargs, data.input_shape, data.num_classes, m.path, m.checkpoint, where=where,
        pretrained=m.pretrained, init_from=m.init_from, log=log,
    )


def build_teacher(cfg: KDConfig, data: DataBundle, run: RunDir) -> TeacherEnsemble:
    """Load each member from its checkpoint, or train it here with cross-entropy (on the labelled examples only:
    a transfer set is for the student), or reuse it from RUN_DIR/teachers/member_<i> (--resume, eval, export);
    wrap them frozen. A text member with its own tokenizer is trained on the texts in its tokenisation and fed
    through a Retokenizer."""
    members, inputs_for = [], []
    for i, member in enumerate(cfg.teacher.members):
        member_data = data
        retok = data.retokenizer(member.tokenizer, f"teacher.members.{i}.tokenizer") if member.tokenizer else None
        if retok is not None:  # the same texts and split, tokenised for this member
            member_data = build_data(**(cfg.data.model_dump() | {"tokenizer": member.tokenizer}))
        inputs_for.append(retok)
        model = teacher_member(cfg, i, member_data, run)
        members.append(frozen(model, cfg.distill, member_data.example(8), run.device, run.log))
    ensemble = TeacherEnsemble(
        members, [mb.weight for mb in cfg.teacher.members], cfg.teacher.combine, cfg.teacher.feature_member,
        inputs_for=inputs_for,
    )
    if any(inputs_for):
        names = [f"{i}: {mb.tokenizer}" for i, mb in enumerate(cfg.teacher.members) if inputs_for[i] is not None]
        run.log(f"teacher: members with their own tokenizer ({'; '.join(names)}) see the texts in their own ids")
    ensemble.check(data.example(2).to(run.device), data.num_classes)
    return ensemble


def teacher_member(cfg: KDConfig, i: int, data: DataBundle, run: RunDir) -> nn.Module:
    """Member i: built from its checkpoint or folder, or trained here as phase teacher-<i> (reused when done)."""
    member = cfg.teacher.members[i]
    m, where = member.model, f"teacher.members.{i}.model"
    folder = run.path / "teachers" / f"member_{i}"
    if run.read_only and cfg.distill.mutual.enabled:  # trained as a peer of the first seed's student
        return load_model_folder(folder, where=f"RUN_DIR/teachers/member_{i}")
    if comes_trained(m.source, m.checkpoint) or m.trained:
        return build_from_spec(m, data, where)
    seed = member.seed if member.seed is not None else i
    spec = model_spec(m.source, m.name, m.kwargs, data.input_shape, data.num_classes, m.path, f"{where}.path")
    labelled = data.labelled()

    def make() -> nn.Module:
        torch.manual_seed(seed)
        return build_from_spec(m, labelled, where, run.log)

    def fit(phase: Phase):
        return train_classifier(cfg, cfg.teacher.train, labelled, run, phase, make, build_loss([("ce", 1.0, {})]),
                                where=where, augment_where="teacher.train.augment")

    recipe = Recipe([], fit, lambda model, folder: save_model_folder(model, folder, spec), load_model_folder)
    return run_phase(run, Phase(f"teacher-{i}", seed, f"teacher-{i}"), recipe, folder).model


def student_spec(cfg: KDConfig, data: DataBundle) -> dict:
    s = cfg.student.model
    return model_spec(s.source, s.name, s.kwargs, data.input_shape, data.num_classes, s.path, "student.model.path")


# ---------------------------------------------------------------------------------------------------------------
# Students


def student_recipe(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, run: RunDir, on_epoch) -> Recipe:
    """Per seed: a baseline on labels alone (same budget) and the distilled student (the configured losses)."""
    losses = cfg.distill.losses
    loss, schedules = build_loss(loss_terms(losses)), loss_schedules(losses)
    uses_teacher = needs_teacher(loss, schedules)
    check_text_teacher(cfg, data, teacher, loss, uses_teacher)
    baseline_train = baseline_budget(cfg, data, run)
    teacher_outputs = teacher_source(cfg, data, teacher, run) if uses_teacher else None
    base_loss = baseline_loss("ce", losses)
    kinds = ["baseline"] * cfg.student.baseline + ["student"]
    run.log(f"loss: {loss.formula()}" + (f"   (baseline: {base_loss.formula()})" if "baseline" in kinds else ""))
    for sv in schedules:
        run.log(f"schedule: {loss.parts[sv.term].name}.{sv.what}: {sv.schedule.describe()}")
    s, spec = cfg.student.model, student_spec(cfg, data)

    def fit(phase: Phase):
        torch.manual_seed(phase.seed)
        if s.teacher_layers is not None:  # DistilBERT-style: the trained teacher's chosen layers
            model = student_from_teacher(teacher.members[0].model, s.teacher_layers)
        else:
            model = build_from_spec(s, data, "student.model", run.log)
        if phase.kind == "baseline":  # the baseline has no teacher to label a transfer set
            return train_classifier(cfg, baseline_train, data.labelled(), run, phase, lambda: model, base_loss,
                                    on_epoch=on_epoch, qat=cfg.student.qat)
        seeded = build_loss(loss_terms(losses))  # adapters are per seed
        taps = wire_features(seeded, model, teacher, data.example(2), run.device, cfg.distill.cache_teacher)
        try:
            return train_classifier(cfg, cfg.train, data, run, phase, lambda: model, seeded, teacher_outputs,
                                    taps, schedules, on_epoch=on_epoch, qat=cfg.student.qat)
        finally:
            teacher.tap([])  # feature taps are for training only
            if taps is not None:
                taps.remove()

    info = cache_info(teacher_outputs)
    return Recipe(kinds, fit, lambda model, folder: save_model_folder(model, folder, spec), load_model_folder,
                  loss.formula(), selection(cfg), info)


def selection(cfg: KDConfig) -> tuple[str, str, str]:
    """The best seed by train.keep_best in its own direction (loss: lowest); with none, the last epoch's loss."""
    keep = cfg.train.keep_best
    if keep == "none":
        return ("loss", "min", "last")
    return (keep, "min" if keep == "loss" else "max", "best")


def baseline_budget(cfg: KDConfig, data: DataBundle, run: RunDir):
    """The baseline's train section: with a transfer set, as many example passes over the labelled examples as
    the distilled student makes over labelled + transfer examples."""
    if not data.transfer:
        return cfg.train
    n_labelled = len(data.train) - data.transfer
    epochs = max(1, round(cfg.train.epochs * len(data.train) / n_labelled))
    run.log(
        f"transfer set: {data.transfer} unlabelled training examples labelled by the teacher only "
        f"(the distilled student sees {len(data.train)} per epoch; the baseline the {n_labelled} labelled ones, "
        f"for {epochs} epochs: the same example passes)"
    )
    return cfg.train.model_copy(update={"epochs": epochs})


def train_classifier(cfg: KDConfig, train_cfg, data: DataBundle, run: RunDir, phase: Phase, make, loss,
                     teacher_outputs=None, taps=None, schedules=(), *, where: str = "student.model",
                     augment_where: str = "train.augment", on_epoch=None, qat=None) -> tuple[nn.Module, dict]:
    """Train one network with the engine; returns (model on CPU, the phase summary for result.json). qat (the
    student.qat section): trained with fake int8 when enabled, returned with float weights and nothing added."""
    model = make()
    got = output_classes(model, data.example(2), where)
    if got != data.num_classes:
        raise CompatibilityError(f"{where}: outputs {got} classes ({phase.name}); the data has {data.num_classes}")
    if qat is not None and qat.enabled:
        prepare_student_qat(model, qat, train_cfg, cfg.train.epochs, data, run, phase)
    on_eval = None
    if data.val is not None:
        evaluations = []

        def on_eval(m):
            metrics = val_metrics(m, data, cfg.eval.batch_size, run.device)
            evaluations.append(metrics)
            if on_epoch is not None:
                on_epoch(phase.name, len(evaluations), metrics)
            return metrics

    result = train(
        model, loss, data.train, TrainOptions.from_dict(train_cfg.model_dump()),
        augment=make_augment(train_cfg.augment, data, augment_where), teacher=teacher_outputs, on_eval=on_eval,
        seed=phase.seed, device=run.device, ckpt_dir=run.checkpoints(phase.name), resume=run.resume,
        tb_dir=(run.path / "tb" / phase.name) if cfg.run.tensorboard else None, progress=cfg.run.progress,
        desc=phase.name, log=run.log, student_taps=taps, schedules=schedules,
    )
    return strip_qat(model).cpu(), phase_summary(result)


def prepare_student_qat(model: nn.Module, qat, train_cfg, epochs: int, data: DataBundle, run: RunDir,
                        phase: Phase) -> None:
    """student.qat on a student or baseline, in place (kdkit.models.qat). start_epoch and freeze_epoch are epochs of
    train.epochs; a phase with another budget (the baseline beside a transfer set) starts and freezes at the same
    share of its training forwards (per process: Accelerate gives each process every N-th batch)."""
    if data.modality != "tensor":
        raise ConfigError(
            f"student.qat.enabled: the student reads {data.modality} (token ids); quantization-aware training "
            "covers students with float inputs (images, feature vectors), as kdkit export --quantize does"
        )
    per_epoch = math.ceil(math.ceil(len(data.train) / train_cfg.batch_size) / world_size())
    total = per_epoch * train_cfg.epochs
    start = round(total * qat.start_epoch / epochs)
    freeze = None if qat.freeze_epoch is None else round(total * qat.freeze_epoch / epochs)
    quantizers = prepare_qat(model, start, freeze, qat.range_momentum)
    run.log(f"{phase.name}: quantization-aware: {quantizers.describe()} (of {total})")


def val_metrics(model: nn.Module, data: DataBundle, batch_size: int, device: str) -> dict[str, float]:
    from kdkit.evaluate import classification_metrics

    logits, labels = predict(model, data.val, batch_size, device)
    m = classification_metrics(logits, labels)
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "loss": m["nll"]}


def check_text_teacher(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, loss, uses_teacher: bool) -> None:
    """Refuse what a transfer set or a member with its own tokenizer cannot do, naming the field."""
    if data.transfer:
        if not uses_teacher:
            raise ConfigError(
                f"distill.losses: the transfer set ({data.transfer} unlabelled examples) needs a teacher loss "
                "(e.g. soft_kl); with labels alone it teaches nothing"
            )
        for i, part in enumerate(loss.parts):
            if part.needs_labels:
                raise ConfigError(
                    f"distill.losses.{i}.name: {cfg.distill.losses[i].name} needs the true label of every example; "
                    f"the transfer set has {data.transfer} unlabelled ones (use ce + soft_kl)"
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


# ---------------------------------------------------------------------------------------------------------------
# Teacher outputs during training


def teacher_source(cfg: KDConfig, data: DataBundle, teacher: TeacherEnsemble, run: RunDir):
    """What the loop calls for teacher outputs: the disk cache (looked up by example index), or the live teacher."""
    live_augment = make_augment(cfg.train.augment, data, "train.augment")
    converted = [i for i, f in enumerate(teacher.inputs_for) if f is not None]
    if live_augment is not None and converted:
        raise ConfigError(
            f"train.augment: teacher.members.{converted[0]}.tokenizer differs from the student's, so that member "
            "cannot see the student's augmented token ids; turn augmentation off or use one tokenizer"
        )
    if not cfg.distill.cache_teacher:
        return LiveTeacher(teacher)
    if live_augment is not None and not cfg.distill.cache_views:
        raise ConfigError(
            "distill.cache_views: train.augment is on, so cached un-augmented outputs would not match the "
            "student's inputs; set cache_views (e.g. 8) or cache_teacher: false"
        )
    with main_process_first():  # built once; the other processes then find it on disk
        return TeacherCache.build_or_load(
            data.train, teacher.logits, teacher.fingerprint(), cfg.distill.cache_dir, cfg.eval.batch_size,
            run.device, run.log, augment=live_augment if cfg.distill.cache_views else None,
            views=cfg.distill.cache_views,
        )


def cache_info(teacher_outputs) -> dict:
    """The teacher cache's disk cost for metrics.json (empty without a cache)."""
    if not isinstance(teacher_outputs, TeacherCache):
        return {}
    n = len(teacher_outputs)
    return {"teacher_cache": {
        "path": str(teacher_outputs.path),
        "bytes": int(teacher_outputs.logits.nbytes),
        "examples": n,
        "views": teacher_outputs.views,
        "bytes_per_example": int(teacher_outputs.logits.nbytes) // max(1, n),
    }}


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
        train_data = data.train
        text_aug = TextAugment(
            **{k: values[k] for k in TEXT_AUGMENT_FIELDS}, seed=values["seed"], pad_id=train_data.pad_id,
            mask_id=train_data.mask_id, special_ids=train_data.special_ids,
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


# ---------------------------------------------------------------------------------------------------------------
# Deep mutual learning


def mutual_recipe(cfg: KDConfig, data: DataBundle, run: RunDir, on_epoch) -> Recipe:
    """Per seed, the student and the teacher members train together as peers (and the baseline alone). The
    peers other than the student are kept beside it (phases/<phase>/peer_<i>)."""
    m = cfg.distill.mutual
    terms = [("mutual", 1.0, mutual_params(m))]
    base_loss, loss = build_loss([("ce", 1.0, {})]), build_loss(terms)
    run.log(f"loss: {loss.formula()} over {1 + len(cfg.teacher.members)} peers (student + teacher members)")
    s, spec = cfg.student.model, student_spec(cfg, data)
    specs = [model_spec(mb.model.source, mb.model.name, mb.model.kwargs, data.input_shape, data.num_classes)
             for mb in cfg.teacher.members]

    def fit(phase: Phase):
        torch.manual_seed(phase.seed)
        student = build_from_spec(s, data, "student.model", run.log)
        if phase.kind == "baseline":
            return train_classifier(cfg, cfg.train, data, run, phase, lambda: student, base_loss, on_epoch=on_epoch)
        members = [build_from_spec(mb.model, data, f"teacher.members.{i}.model", run.log)
                   for i, mb in enumerate(cfg.teacher.members)]
        peers, summary = train_classifier(cfg, cfg.train, data, run, phase, lambda: Peers([student, *members]),
                                          build_loss(terms), on_epoch=on_epoch)
        if run.is_main:
            for i, peer in enumerate(peers.peers[1:]):
                save_model_folder(peer, run.phase_dir(phase.name) / f"peer_{i + 1}", specs[i])
        return peers.peers[0], summary

    return Recipe(["baseline"] * cfg.student.baseline + ["student"], fit,
                  lambda model, folder: save_model_folder(model, folder, spec), load_model_folder, loss.formula(),
                  selection(cfg))


def mutual_params(m) -> dict:
    return {"temperature": m.temperature, "kd_weight": m.kd_weight, "peer_target": m.peer_target}


def mutual_teacher(cfg: KDConfig, data: DataBundle, first: PhaseResult, run: RunDir) -> TeacherEnsemble:
    """The first seed's trained peers (other than the student), saved as teachers/member_<i>, frozen."""
    folder = run.phase_dir(first.phase.name)
    members = []
    for i, mb in enumerate(cfg.teacher.members):
        peer = load_model_folder(folder / f"peer_{i + 1}")
        if run.is_main:
            spec = model_spec(mb.model.source, mb.model.name, mb.model.kwargs, data.input_shape, data.num_classes)
            save_model_folder(peer, run.path / "teachers" / f"member_{i}", spec)
        members.append(frozen(peer, cfg.distill, data.example(8), run.device, run.log))
    return TeacherEnsemble(members, [mb.weight for mb in cfg.teacher.members], cfg.teacher.combine)
