"""Models: kdkit's small nets, timm/torchvision by name, kdkit model folders."""

from kdkit.models.build import (
    build_model,
    load_model_folder,
    load_weights,
    model_spec,
    output_classes,
    save_model_folder,
)
from kdkit.models.small import BUILTIN_MODELS, MLP, CifarResNet, SmallCNN

__all__ = [
    "BUILTIN_MODELS",
    "MLP",
    "SmallCNN",
    "CifarResNet",
    "build_model",
    "load_model_folder",
    "load_weights",
    "model_spec",
    "output_classes",
    "save_model_folder",
]
