"""Models: kdkit's small nets, timm/torchvision by name, kdkit model folders, transformers classifiers.

MODEL_SOURCES (kdkit.models.build) is the literal registry of `model.source` values and their builders."""

from kdkit.models.build import (
    MODEL_SOURCES,
    ModelSource,
    build_model,
    check_model,
    comes_trained,
    load_model_folder,
    load_weights,
    model_spec,
    output_classes,
    save_model_folder,
)
from kdkit.models.small import BUILTIN_MODELS, MLP, CifarResNet, SmallCNN

__all__ = [
    "BUILTIN_MODELS",
    "MODEL_SOURCES",
    "MLP",
    "ModelSource",
    "SmallCNN",
    "CifarResNet",
    "build_model",
    "check_model",
    "comes_trained",
    "load_model_folder",
    "load_weights",
    "model_spec",
    "output_classes",
    "save_model_folder",
]
