"""kdkit's built-in networks, in plain torch: an MLP, a small CNN and a CIFAR-style ResNet.

Each takes `in_shape` (one example's shape, e.g. (1, 28, 28)) and `num_classes`, set by kdkit from the data,
plus knobs that the config passes through `kwargs`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten → [Linear → ReLU → Dropout] × len(hidden) → Linear."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: list[int] = (64,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (width, 2·width, 4·width), each followed by 2×2 max-pooling except the last,
    then global average pooling, dropout and a linear head. Pooling early keeps it cheap on CPU."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 16, dropout: float = 0.1):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"small_cnn expects image inputs (C, H, W), got shape {tuple(in_shape)}")
        c = in_shape[0]
        self.features = nn.Sequential(
            _conv_bn(c, width),
            nn.MaxPool2d(2),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
            _conv_bn(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet: depth = 6n + 2 (20, 32, 44, 56, 110), three stages of width, 2·width, 4·width."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"resnet expects image inputs (C, H, W), got shape {tuple(in_shape)}")
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth={depth}; expected 6n + 2 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = _conv_bn(in_shape[0], width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


BUILTIN_MODELS = {
    "mlp": MLP,
    "small_cnn": SmallCNN,
    "resnet": CifarResNet,
}
