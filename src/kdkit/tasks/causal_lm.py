"""Causal language models (data.task: causal_lm): a teacher's next-token distributions taught to a smaller LM.

Data: corpus blocks (kdkit.data.lm). Teacher: AutoModelForCausalLM members sharing one vocabulary, frozen, or their
top-k cache on disk. Students (tasks/lm_student.py): the teacher's own layers, pruned in width or not, a smaller
config of its family, or a folder. The baseline learns the text alone (token_ce); the distilled student the
configured token losses, optionally with the teacher's continuations (sequence-level KD) and the student's own
continuations (on-policy, GKD). Evaluation on held-out text: perplexity, bits per byte, agreement, KL to the
teacher, cost; the student folder is an HF folder.

A teacher with another tokenizer than the student's (data.tokenizer) is read through the cross-tokenizer losses
(uld, hybrid_kl, span_likelihood; every teacher loss must then be one of them): the blocks keep their text, the
live teacher reads its own tokens of it, aligned to the student's by byte offsets (kdkit.run.cross_teacher), or
(distill.cache_teacher) its cached tokens and top-k (kdkit.data.cross_cache: no teacher runs while training). Not
yet with sequence-level or on-policy distillation, or a draft. Its evaluation is on its own tokens.
The student's tokenizer may be trained by kdkit on the training documents alone (data.train_tokenizer; the corpus
is then split by documents first, kdkit.data.lm.build_lm_data_by_documents). hybrid_kl with two vocabularies that
share no token (by decoded text) is refused: it would be uld exactly, so the config should say uld.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.config import KDConfig, dump_config, load_config
from kdkit.data.align import check_fast
from kdkit.data.lm import LMBundle, LMData, build_lm_data, build_lm_data_by_documents, concat
from kdkit.engine import TrainOptions, train
from kdkit.engine.runtime import is_main_process, main_process_first
from kdkit.errors import CompatibilityError, ConfigError
from kdkit.evaluate import footprint
from kdkit.evaluate.lm import lm_metrics
from kdkit.losses import LOSSES, build_loss
from kdkit.models.causal_lm import load_causal_lm, save_lm_folder
from kdkit.models.vocab import check_tokenizers
from kdkit.run import Phase, Recipe, RunDir
from kdkit.run.cross_teacher import CrossTeacher, same_vocabulary
from kdkit.run.features import wire_features
from kdkit.run.losses import baseline_loss, loss_schedules, loss_terms
from kdkit.run.phases import phase_summary
from kdkit.run.teacher import LiveTeacher, frozen
from kdkit.run.teacher_groups import TeacherGroup, one_source, teacher_groups
from kdkit.tasks import causal_lm_eval
from kdkit.tasks.base import CACHE_OFF
from kdkit.tasks.causal_lm_eval import context_length
from kdkit.tasks.lm_student import LMStudents
from kdkit.teachers import TeacherEnsemble


class CausalLM:
    name = "causal_lm"
    columns = causal_lm_eval.COLUMNS
    search_metrics = ("loss", "accuracy")
    auto_switch = "distill.auto"  # `kdkit train --auto` sets <auto_switch>.enabled (kdkit.search.auto)
    shipping = (
        "a language-model run's student is already an HF folder (RUN_DIR/student: "
        "AutoModelForCausalLM.from_pretrained and AutoTokenizer load it, with its report as README.md); serve it "
        "with an LLM server such as vLLM or text-generation-inference"
    )

    def load_config(self, config, overrides: tuple[str, ...]) -> KDConfig:
        return load_config(config, overrides)

    def dump_config(self, cfg: KDConfig) -> str:
        return dump_config(cfg)

    def check(self, cfg: KDConfig) -> None:
        from kdkit.data.lm import CORPORA
        from kdkit.validate import check_names

        check_names(cfg, CORPORA)
        check_cross_tokenizer(cfg)

    def load_data(self, cfg: KDConfig, run: RunDir) -> LMBundle:
        """The corpus in blocks, tokenised by data.tokenizer or the first teacher member's tokenizer, or split by
        documents and tokenised by a tokenizer trained on the training ones (data.train_tokenizer); with their
        texts for the cross-tokenizer losses."""
        d = cfg.data
        if d.train_tokenizer is not None:
            check_builtin_members(cfg)  # a missing model package: one line now, not after training a tokenizer
            data = build_lm_data_by_documents(
                d.source, d.name, d.path, d.data_files, d.text_column, student_tokenizer_trainer(cfg, run),
                d.max_length, d.val_fraction, d.test_fraction, d.split_seed, d.limit, with_text=cross_tokenizer(cfg),
                block_chars=d.block_chars)
        else:
            data = build_lm_data(d.source, d.name, d.path, d.data_files, d.text_column, lm_tokenizer(cfg),
                                 d.max_length, d.val_fraction, d.test_fraction, d.split_seed, d.limit,
                                 with_text=cross_tokenizer(cfg), block_chars=d.block_chars)
        cut = f" (cut by text, {d.block_chars} characters each: {data.truncated} held more tokens and were cut " \
              "short)" if d.block_chars else ""
        run.log(
            f"data: {data.documents} documents, {data.tokens:,} tokens → blocks of {data.block_size}{cut}: "
            f"{len(data.train)} train / {len(data.val) if data.val else 0} val / {len(data.test)} test"
        )
        return data

    def build_teacher(self, cfg: KDConfig, data: LMBundle, run: RunDir) -> TeacherEnsemble:
        return build_lm_teacher(cfg, data.tokenizer, run)

    def recipe(self, cfg, data, teacher, run, on_epoch=None) -> Recipe:
        return lm_recipe(cfg, data, teacher, run, on_epoch)

    def evaluate(self, cfg, data, teacher, results, run, best, recipe):
        untrained = LMStudents(cfg, teacher, data) if cfg.llm.draft.enabled else None
        cross = others = None
        if cross_tokenizer(cfg):  # the teacher measured is members.0's group; the others' bits per byte beside it
            groups = cross_groups(cfg, teacher)
            cross, *rest = cross_sources(cfg, data.test, groups, data.tokenizer)
            teacher = groups[0].ensemble
            others = [(g.where, g.members, g.weight, source) for g, source in zip(groups[1:], rest)]
        return causal_lm_eval.evaluate(cfg, data, teacher, results, run.device, best, recipe,
                                       untrained_draft=untrained, log=run.log, cross=cross, other_teachers=others)

    def save_student(self, model: nn.Module, folder: Path, data: LMBundle, cfg: KDConfig) -> None:
        save_lm_folder(model, data.tokenizer, folder)

    def load_student(self, folder: Path) -> nn.Module:
        model, _ = load_causal_lm(str(folder), "RUN_DIR/student")
        return model

    def report(self, cfg, run, metrics, histories, recipe, extras) -> None:
        causal_lm_eval.report(cfg, run, metrics, histories, recipe, extras)

    def cache_teacher(self, cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, run: RunDir) -> dict:
        """The top-k cache of the training data (with the sequence-level KD examples), as train reads it."""
        if not cfg.distill.cache_teacher:
            raise ConfigError(CACHE_OFF)
        check_cross_tokenizer(cfg)
        kd_data = with_sequence_kd(cfg, data, teacher, run)
        loss = build_loss(loss_terms(cfg.distill.losses))
        if not loss.needs_teacher:
            raise ConfigError("distill.losses: no loss reads the teacher (add token_kl), so there is nothing to cache")
        if cross_tokenizer(cfg):
            _, info = cross_cache_source(cfg, kd_data, cross_groups(cfg, teacher), data.tokenizer, run)
        else:
            _, info = lm_teacher_source(cfg, kd_data, teacher, loss, run)
        return info["teacher_cache"]


# ---------------------------------------------------------------------------------------------------------------
# Teacher


def lm_tokenizer(cfg: KDConfig):
    """data.tokenizer, or the first teacher member's tokenizer."""
    if cfg.data.tokenizer:
        from kdkit.data.text import load_tokenizer

        return load_tokenizer(cfg.data.tokenizer)
    return teacher_tokenizer(cfg)


def student_tokenizer_trainer(cfg: KDConfig, run: RunDir):
    """data.train_tokenizer as make_tokenizer(training documents) → tokenizer, cached under distill.cache_dir (or
    run.out_dir/cache)/tokenizers, so every phase, `kdkit eval` and a resumed run read the same one."""
    from kdkit.data.train_tokenizer import trained_tokenizer

    spec = cfg.data.train_tokenizer
    cache = Path(cfg.distill.cache_dir or Path(cfg.run.out_dir) / "cache") / "tokenizers"

    def make(texts: list[str]):
        with main_process_first():  # the main process trains and writes; the others then read its file
            return trained_tokenizer(texts, spec.kind, spec.vocab_size, spec.min_frequency, cache, run.log)

    return make


def check_builtin_members(cfg: KDConfig) -> None:
    """Every builtin:<name> member's package is installed (a one-line ConfigError naming the member otherwise)."""
    from kdkit.models.causal_lm import builtin_lm_file

    for i, member in enumerate(cfg.teacher.members):
        if member.model.path and member.model.path.startswith("builtin:"):
            builtin_lm_file(member.model.path.split(":", 1)[1], f"teacher.members.{i}.model.path")


def teacher_tokenizer(cfg: KDConfig, member: int = 0):
    """A teacher member's tokenizer (by default the first's: the data's tokenizer without data.tokenizer)."""
    from transformers import AutoTokenizer

    from kdkit.data.text import from_pretrained
    from kdkit.models.causal_lm import resolve_lm_path

    where = f"teacher.members.{member}.model.path"
    path = cfg.teacher.members[member].model.path
    try:
        return from_pretrained(AutoTokenizer, resolve_lm_path(path, where), where)
    except (ValueError, TypeError) as exc:  # transformers' own refusals, many lines long
        raise ConfigError(unloadable(where, path, exc)) from None


def load_member(path: str, where: str):
    """load_causal_lm, with a tokenizer that cannot be loaded (no tokenizer files, a class that needs an absent
    library) said in one line naming the member, not transformers' many."""
    try:
        return load_causal_lm(path, where)
    except (ValueError, TypeError) as exc:
        raise ConfigError(unloadable(where, path, exc)) from None


def unloadable(where: str, path: str, exc: Exception) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"{where}: {path!r} could not be loaded with its tokenizer ({first[:160]}); expected a folder with the "
            "model and its tokenizer (tokenizer.json or the files its tokenizer class reads)")


def build_lm_teacher(cfg: KDConfig, tokenizer, run: RunDir) -> TeacherEnsemble:
    """Each member from its folder / hub id / builtin name, frozen. Members must share the vocabulary of the
    data's tokenizer (a padded output layer is fine), or, with the cross-tokenizer losses, each have a fast
    tokenizer; members may then mix tokenizers, one group per tokenizer (kdkit.run.teacher_groups; each reads its
    tokens of the text, at most its context)."""
    members, cross, tokenizers = [], cross_tokenizer(cfg), []
    for i, member in enumerate(cfg.teacher.members):
        model, tok = load_member(member.model.path, f"teacher.members.{i}.model.path")
        run.log(f"teacher member {i}: {type(model).__name__}, {footprint(model)['params'] / 1e6:.1f} M parameters")
        if cross:
            check_fast(tok, f"teacher.members.{i}")
            tokenizers.append(tok)
            members.append(frozen(model, cfg.distill, tokenizer_example(tok), run.device, run.log))
            continue
        if cfg.data.max_length > context_length(model):
            raise ConfigError(
                f"data.max_length: {cfg.data.max_length} tokens per block; teacher member {i} reads at most "
                f"{context_length(model)} positions (its max_position_embeddings)"
            )
        try:
            check_tokenizers(tokenizer, tok, f"teacher.members.{i}: tokenizer vs data.tokenizer")
        except CompatibilityError as exc:
            raise CompatibilityError(
                f"{exc}; for a teacher with another tokenizer, use the cross-tokenizer losses "
                f"({', '.join(cross_tokenizer_losses())}) as its losses in distill.losses"
            ) from None
        members.append(frozen(model, cfg.distill, tokenizer_example(tokenizer), run.device, run.log))
    weights = [m.weight for m in cfg.teacher.members]
    groups = teacher_groups(members, weights, tokenizers) if cross else [TeacherGroup(list(range(len(members))),
                                                                                      tokenizer, None, 1.0)]
    for g in groups:
        if cross:
            same = same_vocabulary(g.tokenizer, tokenizer)
            name = ("cross-tokenizer teacher" if len(groups) == 1 else
                    f"cross-tokenizer teacher members {g.members} (weight {g.weight:.3g})")
            run.log(f"{name}: " + ("the same vocabulary as the student's; it reads the student's ids" if same else
                                   f"its own tokenizer ({len(g.tokenizer)} tokens, the student's {len(tokenizer)}); "
                                   "blocks aligned by byte offsets"))
        widths = {members[i].model.get_output_embeddings().weight.shape[0] for i in g.members}
        if len(widths) > 1:
            raise CompatibilityError(
                f"teacher.members {g.members}: output vocabularies of different sizes ({sorted(widths)}) for one "
                "tokenizer; an ensemble averages distributions id by id, so the members need one output size"
            )
    return TeacherEnsemble(members, weights, cfg.teacher.combine)


def cross_tokenizer_losses() -> list[str]:
    """The registered losses that read a teacher with another tokenizer (Loss attribute cross_tokenizer)."""
    from kdkit.losses import LOSSES

    return [name for name, cls in LOSSES.items() if getattr(cls, "cross_tokenizer", False)]


def cross_tokenizer(cfg: KDConfig) -> bool:
    """distill.losses has a cross-tokenizer loss: the teacher then reads its own tokens of the blocks' text."""
    names = cross_tokenizer_losses()
    return any(t.name in names for t in cfg.distill.losses)


def check_cross_tokenizer(cfg: KDConfig) -> None:
    """With a cross-tokenizer loss: every teacher loss is one (the teacher's outputs are over its own tokens), and
    nothing that needs the teacher on the student's tokens is on. One line per refusal."""
    if not cross_tokenizer(cfg):
        return
    from kdkit.losses import LOSSES

    names = ", ".join(cross_tokenizer_losses())
    for i, term in enumerate(cfg.distill.losses):
        cls = LOSSES[term.name]
        if cls.needs_teacher and not getattr(cls, "cross_tokenizer", False):
            raise ConfigError(
                f"distill.losses.{i}.name: {term.name!r} reads the teacher on the student's tokens; beside a "
                f"cross-tokenizer loss every teacher loss must be one ({names})"
            )
    if cfg.distill.cache_teacher:
        cross_kd_temperature(cfg)  # one temperature the cache can hold
    if cfg.llm.on_policy_fraction > 0:
        raise ConfigError(f"llm.on_policy_fraction: {cfg.llm.on_policy_fraction}; on-policy KD with a "
                          "cross-tokenizer teacher is not supported yet (it scores the student's tokens): set 0")
    if cfg.llm.draft.enabled:
        raise ConfigError("llm.draft.enabled: a draft shares its target's tokenizer; the cross-tokenizer losses are "
                          "for a student with its own: set draft.enabled: false or use token_kl")


def cross_groups(cfg: KDConfig, teacher: TeacherEnsemble) -> list[TeacherGroup]:
    """The members grouped by tokenizer (kdkit.run.teacher_groups), members.0's group first; one group (the whole
    ensemble) when they share one."""
    tokenizers = [teacher_tokenizer(cfg, i) for i in range(len(cfg.teacher.members))]
    return teacher_groups(list(teacher.members), [m.weight for m in cfg.teacher.members], tokenizers,
                          cfg.teacher.combine, whole=teacher)


def group_context(group: TeacherGroup) -> int | None:
    """The most tokens per row a group reads: its shortest member context."""
    return min(context_length(m.model) for m in group.ensemble.members)


def cross_sources(cfg: KDConfig, data: LMData, groups: list[TeacherGroup], student_tokenizer) -> list[CrossTeacher]:
    """The cross-tokenizer teacher source of each group over `data` (its blocks with texts): the group's tokenizer,
    at most its shortest member context per row."""
    return [CrossTeacher(g.ensemble, g.tokenizer, student_tokenizer, data, group_context(g),
                         where=f"{g.where} (its tokenizer)") for g in groups]


def grouped(sources: list, groups: list[TeacherGroup], maps: list | None):
    """The teacher source of the groups' sources (kdkit.run.teacher_groups.one_source); with several groups and
    hybrid_kl, each source sends its own shared-vocabulary map (one group: the loss holds it)."""
    if len(sources) > 1 and maps is not None:
        for source, vocab_map in zip(sources, maps):
            source.vocab_map = vocab_map
    return one_source(sources, [g.weight for g in groups])


def cross_kd_temperature(cfg: KDConfig) -> float:
    """The temperature the cache across tokenizers stores the teacher's top-k at: uld's and hybrid_kl's (they must
    agree and not be scheduled); 1 when only span_likelihood reads the teacher (it reads log-probs at T = 1)."""
    names = ("uld", "hybrid_kl")
    terms = [(i, t) for i, t in enumerate(cfg.distill.losses) if t.name in names]
    for i, t in terms:
        if isinstance(t.params.get("temperature"), dict):
            raise ConfigError(f"distill.losses.{i}.params.temperature: scheduled; the cache across tokenizers holds "
                              "the teacher at one temperature: use a number or cache_teacher: false")
    temps = sorted({float(t.params.get("temperature", 1.0)) for _, t in terms})
    if len(temps) > 1:
        raise ConfigError(f"distill.losses: uld/hybrid_kl temperatures {temps} differ; the cache across tokenizers "
                          "holds the teacher at one temperature")
    return temps[0] if temps else 1.0


def cross_cache_source(cfg: KDConfig, data: LMData, groups: list[TeacherGroup], student_tokenizer, run: RunDir,
                       maps: list | None = None):
    """(the cached cross-tokenizer teacher source over `data`, info): for each group (kdkit.run.teacher_groups) the
    teacher's tokens of every block and its top-k (kdkit.data.cross_cache), built once per (teacher, its tokenizer
    and context, block texts, k, T) and reused by any student whose blocks hold the same texts; training then never
    runs a teacher. info["teacher_cache"]: the cache's description (several groups: each one's under "groups")."""
    sources, infos = [], []
    for g in groups:
        source, info = group_cache_source(cfg, data, g, student_tokenizer, run)
        sources.append(source)
        infos.append(info)
    described = infos[0] if len(infos) == 1 else {"groups": infos, "tokens": sum(i["tokens"] for i in infos)}
    return grouped(sources, groups, maps), {"teacher_cache": described}


def group_cache_source(cfg: KDConfig, data: LMData, group: TeacherGroup, student_tokenizer, run: RunDir):
    """One group's cache across tokenizers (cross_cache_source) and its description."""
    from kdkit.data.cross_cache import CrossTopKCache, text_fingerprint
    from kdkit.run.cross_teacher import CachedCrossTeacher, cross_cache_key, teacher_tokens

    tok, teacher, context = group.tokenizer, group.ensemble, group_context(group)
    same = same_vocabulary(tok, student_tokenizer)
    temperature, k = cross_kd_temperature(cfg), cfg.llm.top_k
    teacher_fp, data_fp = cross_cache_key(teacher.fingerprint(), tok, context, same), text_fingerprint(data)
    name = f"lm-cross-topk-{teacher_fp.split(':')[-1][:12]}-{data_fp.split(':')[-1][:12]}-k{k}-T{temperature:g}"
    path = Path(cfg.distill.cache_dir or Path(cfg.run.out_dir) / "cache") / name
    alone = len(teacher.members) == 1 and teacher.inputs_for[0] is None  # as lm_teacher_source
    logits_fn = teacher.members[0].logits if alone else teacher.logits
    with main_process_first():
        cache = CrossTopKCache.build_or_load(
            path, lambda: teacher_tokens(tok, data, context, same), logits_fn, k, temperature, teacher_fp, data_fp,
            batch_size=cfg.eval.batch_size, device=run.device, log=run.log,
        )
    info = cache.describe()
    run.log(f"teacher cache across tokenizers ({group.where}): {info['tokens']:,} teacher tokens, "
            f"{info['bytes_per_token']} bytes/teacher token at k={k}")
    return CachedCrossTeacher(cache, data, where=f"{group.where} (its cached tokens)"), info


def tokenizer_example(tokenizer) -> torch.Tensor:
    """Two short rows of token ids, the example a member's settings are checked on."""
    return torch.tensor([[tokenizer.eos_token_id or 0] * 4] * 2)


# ---------------------------------------------------------------------------------------------------------------
# Students


def lm_recipe(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, run: RunDir, on_epoch) -> Recipe:
    """Per seed: a baseline on the text alone (token_ce) and the distilled student, same initialisation and order."""
    groups = cross_groups(cfg, teacher) if cross_tokenizer(cfg) else None
    sources = cross_sources(cfg, data.train, groups, data.tokenizer) if groups else None
    cross = sources[0] if sources else None  # members.0's group: the student's family and the loss's own map
    students = LMStudents(cfg, teacher, data, run.log, own_vocabulary=cross is not None and not cross.same)
    check_draft(cfg, teacher, run, students)
    kd_data = with_sequence_kd(cfg, data, teacher, run)
    losses = cfg.distill.losses
    maps = [shared_vocab_map(cfg, source, data.tokenizer, run, g.where)
            for g, source in zip(groups, sources)] if sources else None
    vocab_map = maps[0] if maps else None
    loss, schedules, base_loss = lm_loss(cfg, vocab_map), loss_schedules(losses), baseline_loss("token_ce", ())
    base_loss.fuse_head = cfg.llm.fused_head
    run.log(f"loss: {loss.formula()}   (baseline: {base_loss.formula()})")
    if cross is None:
        teacher_outputs, info = lm_teacher_source(cfg, kd_data, teacher, loss, run)
    elif cfg.distill.cache_teacher and loss.needs_teacher:
        teacher_outputs, info = cross_cache_source(cfg, kd_data, groups, data.tokenizer, run,
                                                   maps if vocab_map is not None else None)
    else:  # the live source over what the student trains on (the teacher's texts too, with sequence-level KD)
        live = sources if kd_data is data.train else cross_sources(cfg, kd_data, groups, data.tokenizer)
        for source in live:  # every teacher part reads the aligned positions only: the teacher's head runs there
            source.hidden = loss.teacher_at_positions  # (CrossTeacher's hidden)
        teacher_outputs, info = grouped(live, groups, maps if vocab_map is not None else None), {}
    on_policy = make_on_policy(cfg, data.tokenizer, teacher)
    info["data"] = data_info(cfg, data, kd_data)

    target = teacher.logits if cfg.llm.draft.enabled else None  # both drafts are validated the same way

    def fit(phase: Phase):
        model = students(phase.seed)
        if phase.kind == "baseline":
            return train_lm(cfg, data, data.train, run, phase, model, base_loss, on_epoch=on_epoch, target=target)
        loss = lm_loss(cfg, vocab_map)
        if vocab_map is not None:
            for g, group_map in zip(groups, maps):
                check_vocab_map(cfg, group_map, model, g.ensemble)
        return train_lm(cfg, data, kd_data, run, phase, model, loss, teacher,
                        teacher_outputs, schedules, on_policy, on_epoch, target)

    def load(folder: Path) -> nn.Module:
        return load_causal_lm(str(folder), f"phases/{folder.name}")[0]

    keep = cfg.train.keep_best
    selection = ("loss", "min", "last") if keep == "none" else (keep, "min" if keep == "loss" else "max", "best")
    return Recipe(["baseline"] * cfg.student.baseline + ["student"], fit,
                  lambda model, folder: save_lm_folder(model, data.tokenizer, folder), load, loss.formula(),
                  selection, info)


def check_draft(cfg: KDConfig, teacher: TeacherEnsemble, run: RunDir, students: LMStudents) -> None:
    """llm.draft.enabled: the student is the draft of speculative decoding for the teacher, so it must have fewer
    parameters than the target (one member) and its vocabulary. Checked on the first seed's student as the recipe
    builds it (the architecture is the same for every seed), before anything is generated or trained."""
    if not cfg.llm.draft.enabled:
        return
    if len(teacher.members) != 1:
        raise ConfigError(
            f"teacher.members: {len(teacher.members)} members; llm.draft.enabled needs one target model (one member)"
        )
    from kdkit.generation.assisted import check_pair

    with torch.random.fork_rng(devices=[]):  # building seeds torch; the run's random state stays as it was
        target, draft = teacher.members[0].model, students(cfg.run.seeds[0])
    t_params, d_params = (sum(p.numel() for p in m.parameters()) for m in (target, draft))
    if d_params >= t_params:
        raise CompatibilityError(
            f"student.model: the draft has {d_params} parameters, the target {t_params}; a draft must be smaller"
        )
    try:
        check_pair(target, draft, cfg.llm.draft.k)
    except ValueError as exc:
        raise CompatibilityError(f"student.model: {exc}") from None
    run.log(f"draft: {d_params / 1e6:.2f} M parameters for a target of {t_params / 1e6:.2f} M "
            f"({d_params / t_params:.1%}); k = {cfg.llm.draft.k} draft tokens per target call")


def lm_loss(cfg: KDConfig, vocab_map: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The distillation loss of distill.losses, with the fused head on or off (llm.fused_head), and the shared
    vocabulary map given to the losses that take one (hybrid_kl)."""
    loss = build_loss(loss_terms(cfg.distill.losses))
    loss.fuse_head = cfg.llm.fused_head
    for part in loss.parts:
        if vocab_map is not None and hasattr(part, "set_vocab_map"):
            part.set_vocab_map(*vocab_map)
    return loss


def shared_vocab_map(cfg: KDConfig, cross: CrossTeacher | None, student_tokenizer, run: RunDir,
                     member: str = "teacher.members.0"):
    """(teacher ids, student ids) of the tokens both vocabularies share (kdkit.losses.hybrid_kl.shared_vocab), once
    per run and teacher tokenizer (member: the group's first member, named in messages), when a loss takes the
    map; else None."""
    if cross is None or not any(hasattr(LOSSES[t.name], "set_vocab_map") for t in cfg.distill.losses):
        return None
    from kdkit.losses.hybrid_kl import shared_vocab

    teacher_ids, student_ids = shared_vocab(cross.tokenizer, student_tokenizer)
    if teacher_ids.numel() == 0:
        i = next(i for i, t in enumerate(cfg.distill.losses) if hasattr(LOSSES[t.name], "set_vocab_map"))
        raise CompatibilityError(
            f"distill.losses.{i} ({cfg.distill.losses[i].name}): {member}'s {len(cross.tokenizer)} tokens and the "
            f"student's {len(student_tokenizer)} share none (no two decode to the same text), so its exact part is "
            "empty and it is uld exactly: use uld, or check the tokenizers' decoders"
        )
    run.log(f"shared vocabulary: {teacher_ids.numel()} tokens of {member}'s {len(cross.tokenizer)} and the "
            f"student's {len(student_tokenizer)} decode to the same text")
    return teacher_ids, student_ids


def check_vocab_map(cfg: KDConfig, vocab_map, model: nn.Module, teacher: TeacherEnsemble) -> None:
    """The map fits both output layers and leaves unmatched ids on both sides or neither (else the split KL is
    infinite): a one-line CompatibilityError before training, not at the first step."""
    from kdkit.losses.hybrid_kl import hybrid_per_position

    v_s = model.get_output_embeddings().weight.shape[0]
    v_t = teacher.members[0].model.get_output_embeddings().weight.shape[0]
    i = next(i for i, t in enumerate(cfg.distill.losses) if hasattr(LOSSES[t.name], "set_vocab_map"))
    try:
        hybrid_per_position(torch.zeros(1, v_s), torch.zeros(1, v_t), *vocab_map)
    except ValueError as exc:
        raise CompatibilityError(f"distill.losses.{i} ({cfg.distill.losses[i].name}): {exc}") from None


def train_lm(cfg: KDConfig, data: LMBundle, train_data: LMData, run: RunDir, phase: Phase, model: nn.Module, loss,
             teacher=None, teacher_outputs=None, schedules=(), transform=None, on_epoch=None,
             target=None) -> tuple[nn.Module, dict]:
    """Train one language-model student with the engine; returns (model on CPU, the phase summary). target: the
    target's logits for a draft (llm.draft): validation adds its acceptance of the student (keep_best: acceptance)."""
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(data.tokenizer):
        raise CompatibilityError(
            f"student.model: {width} output logits; the tokenizer has {len(data.tokenizer)} tokens (expected at "
            "least that)"
        )
    # Feature losses (hidden_state on decoder layers) tap both models; they need the live teacher.
    taps = None
    if teacher is not None:
        taps = wire_features(loss, model, teacher, data.train.ids[:2].to(run.device), run.device,
                             cfg.distill.cache_teacher)
    evaluations = []

    def on_eval(m: nn.Module) -> dict[str, float]:
        was = m.training
        m.eval()
        models = {"m": m} if target is None else {"m": m, "target": target}
        r = lm_metrics(models, data.val, cfg.eval.batch_size, run.device, teacher=None if target is None else "target")
        r = r["m"]
        m.train(was)
        metrics = {"loss": r["nll"], "perplexity": r["perplexity"], "accuracy": r["accuracy"]}
        if target is not None:
            metrics["acceptance"] = r["acceptance"]
        evaluations.append(metrics)
        if on_epoch is not None:
            on_epoch(phase.name, len(evaluations), metrics)
        return metrics

    try:
        result = train(
            model, loss, train_data, TrainOptions.from_dict(cfg.train.model_dump()), teacher=teacher_outputs,
            on_eval=on_eval if data.val is not None else None, seed=phase.seed, device=run.device,
            ckpt_dir=run.checkpoints(phase.name), resume=run.resume,
            tb_dir=(run.path / "tb" / phase.name) if cfg.run.tensorboard else None, progress=cfg.run.progress,
            desc=phase.name, log=run.log, schedules=schedules, transform=transform, student_taps=taps,
        )
    finally:
        if taps is not None:
            taps.remove()
            teacher.tap([])
    summary = phase_summary(result)
    summary["tokens_seen"] = int(sum(int(x) for x in train_data.lengths)) * result.epochs_run
    return model.cpu(), summary


def data_info(cfg: KDConfig, data: LMBundle, kd_data: LMData) -> dict:
    d = cfg.data
    return {
        "corpus": d.path or d.name,
        "documents": data.documents,
        "tokens": data.tokens,
        "block_size": data.block_size,
        "train_blocks": len(data.train),
        "sequence_kd_examples": len(kd_data) - len(data.train),
    }


# ---------------------------------------------------------------------------------------------------------------
# Sequence-level and on-policy distillation


def with_sequence_kd(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, run: RunDir):
    """The distilled student's training data: the training blocks, plus (llm.sequence_level > 0) the teacher's
    continuations of that many training prompts, kept in RUN_DIR/generations.jsonl and reused on --resume. A
    cross-tokenizer teacher writes text: it reads each prompt's text in its own tokens and the student trains on its
    own tokens of what the teacher wrote (kdkit.run.cross_sequence)."""
    n = cfg.llm.sequence_level
    if n == 0:
        return data.train
    from kdkit.generation.generate import sequence_kd_examples

    p = cfg.llm.prompt_tokens
    rng = np.random.default_rng(cfg.data.split_seed)
    rows = np.sort(rng.permutation(len(data.train))[: min(n, len(data.train))]).tolist()
    if cross_tokenizer(cfg):
        extra = cross_sequence_kd(cfg, data, teacher, run, rows, p)
    else:
        prompts = [data.train.ids[i, :p].tolist() for i in rows]
        completions = teacher_continuations(cfg, teacher, run, prompts, data.train.pad_id, data.train.eos_id,
                                            data.tokenizer)
        extra = lm_examples(sequence_kd_examples(prompts, completions, data.train.pad_id, data.block_size), data)
    if extra is None:
        run.log("sequence-level KD: the teacher wrote no tokens for any prompt; training on the blocks alone")
        return data.train
    return concat([data.train, extra])


def lm_examples(examples: list[dict], data: LMBundle) -> LMData | None:
    """sequence_kd_examples as LMData of the blocks' width, their prompts marked (prompt_lengths); None for none."""
    if not examples:
        return None
    ids = torch.full((len(examples), data.block_size), data.train.pad_id, dtype=torch.long)
    lengths, prompt_lengths = [], []
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = ex["input_ids"]
        lengths.append(n)
        prompt_lengths.append(int((ex["labels"] == -100).sum()))  # -100 only on the prompt, at the start
    extra = LMData(ids, torch.tensor(lengths), data.train.pad_id, data.train.eos_id)
    extra.prompt_lengths = torch.tensor(prompt_lengths)
    return extra


def cross_sequence_kd(cfg: KDConfig, data: LMBundle, teacher: TeacherEnsemble, run: RunDir, rows: list[int],
                      p: int) -> LMData | None:
    """Sequence-level KD across tokenizers (kdkit.run.cross_sequence): the teacher continues the text of the
    rows' first p student tokens in its own tokens; the student's examples are its tokens of the text written."""
    from kdkit.run.cross_sequence import completion_text, cross_sequence_examples, teacher_prompts
    from kdkit.run.cross_teacher import pad_id_of

    first = cross_groups(cfg, teacher)[0]  # members.0 writes (teacher_continuations): its group's tokenizer
    tok = first.tokenizer
    prompts = teacher_prompts(tok, data.train, rows, p, group_context(first))
    completions = teacher_continuations(cfg, teacher, run, prompts, pad_id_of(tok), tok.eos_token_id, tok)
    written = [completion_text(tok, prompt, c) for prompt, c in zip(prompts, completions)]
    eos = data.tokenizer.eos_token if data.train.eos_id is not None else None
    return cross_sequence_examples(data.train, rows, p, written, data.tokenizer, None if eos is None else str(eos))


def teacher_continuations(cfg: KDConfig, teacher: TeacherEnsemble, run: RunDir, prompts: list, pad_id: int,
                          eos_id: int | None, tokenizer):
    """The teacher's continuations of the prompts (its own token ids): read from RUN_DIR/generations.jsonl, or
    generated and kept (with their texts decoded by `tokenizer`, the teacher's)."""
    from kdkit.generation.generate import generate, read_generations, write_generations

    path = run.path / "generations.jsonl"
    with main_process_first():
        if path.is_file():
            records = read_generations(path)
            if [r["prompt_ids"] for r in records] != prompts:
                raise ConfigError(f"llm.sequence_level: {path} was written for other prompts; delete it")
            return [r["completion_ids"] for r in records]
        run.log(f"sequence-level KD: the teacher continues {len(prompts)} prompts "
                f"({cfg.llm.generation.max_new_tokens} new tokens)")
        model = teacher.members[0].model
        try:
            completions = generate(model, prompts, generation_settings(cfg), pad_id=pad_id, eos_id=eos_id,
                                   seed=cfg.data.split_seed, batch_size=cfg.eval.batch_size,
                                   context_length=context_length(model))
        except ValueError as exc:  # settings that do not fit the model or the prompts
            raise ConfigError(f"llm.generation: {exc}") from None
        if is_main_process():
            write_generations(path, prompts, completions, tokenizer)
    return completions


def generation_settings(cfg: KDConfig):
    from kdkit.generation.generate import GenerationSettings

    g = cfg.llm.generation
    try:
        return GenerationSettings(g.sampling_temperature, g.top_p, g.max_new_tokens, g.do_sample)
    except ValueError as exc:
        raise ConfigError(f"llm.generation: {exc}") from None


def make_on_policy(cfg: KDConfig, tokenizer, teacher: TeacherEnsemble):
    """GKD's on-policy batches: a share λ of batches continued by the student (scored by the live teacher)."""
    lam = cfg.llm.on_policy_fraction
    if lam == 0:
        return None
    from kdkit.generation.generate import OnPolicy

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = context_length(teacher.members[0].model)
    try:
        return OnPolicy(
            lam, generation_settings(cfg), cfg.llm.prompt_tokens, pad, tokenizer.eos_token_id, cfg.data.split_seed,
            context,
        )
    except ValueError as exc:
        raise ConfigError(f"llm.generation: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Teacher outputs during training


def lm_teacher_source(cfg: KDConfig, data: LMData, teacher: TeacherEnsemble, loss, run: RunDir):
    """(teacher source, info): the live teacher, or its top-k cache over `data` (built once, reused while teacher
    and data match); info holds the cache's figures for metrics.json."""
    if not loss.needs_teacher:
        return None, {}
    if not cfg.distill.cache_teacher:
        return LiveTeacher(teacher, hidden=loss.fuses_head), {}
    from kdkit.data.lm_cache import TopKCache

    temperature = kd_temperature(cfg)
    teacher_fp, data_fp = teacher.fingerprint(), data.fingerprint()
    k = cfg.llm.top_k
    # One folder per (teacher, data, k, T): another teacher or data set never meets this cache, it gets its own.
    name = f"lm-topk-{teacher_fp[:12]}-{data_fp[:12]}-k{k}-T{temperature:g}"
    path = Path(cfg.distill.cache_dir or Path(cfg.run.out_dir) / "cache") / name
    # A one-member ensemble's logits are its member's shifted per position (log_softmax under combine="probs"), which
    # top-k log-probs at any temperature do not see: calling the member skips a (B, T, V) pass as costly as the model.
    alone = len(teacher.members) == 1 and teacher.inputs_for[0] is None
    logits_fn = teacher.members[0].logits if alone else teacher.logits
    with main_process_first():
        cache = TopKCache.build_or_load(
            path, data, logits_fn, k, temperature, teacher_fp, data_fp, lengths=data.lengths.tolist(),
            batch_size=cfg.eval.batch_size, device=run.device, log=run.log,
        )
    info = {
        "path": str(cache.path),
        "k": k,
        "kd_temperature": temperature,
        "tokens": cache.tokens,
        "bytes": cache.size_bytes,
        "bytes_per_token": round(cache.bytes_per_token, 1),
    }
    run.log(f"teacher cache: {info['tokens']:,} tokens, {info['bytes_per_token']} bytes/token at k={k}")
    return cache, {"teacher_cache": info}


def kd_temperature(cfg: KDConfig) -> float:
    """The cache stores log-probabilities at the token_kl temperature; a scheduled temperature cannot be cached."""
    temps = {float(t.params.get("temperature", 1.0)) for t in cfg.distill.losses if t.name == "token_kl"}
    if any(isinstance(t.params.get("temperature"), dict) for t in cfg.distill.losses):
        raise ConfigError("distill.cache_teacher: a scheduled kd temperature cannot be cached; use the live teacher")
    if len(temps) > 1:
        raise ConfigError(f"distill.losses: token_kl temperatures {sorted(temps)} differ; the cache holds one")
    return temps.pop() if temps else 1.0
