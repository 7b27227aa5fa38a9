"""Built-in models: the architectures of the papers, sized from the input shape.

``build_model(name, input_shape, num_classes, **options)`` with name one of :data:`BUILTIN_MODELS`:

- ``mlp``: Flatten, ``depth`` hidden Linear+activation layers of ``width``, a Linear head
  (paper 003's 784-5x256-10 tanh network by default).
- ``lenet``: LeNet-5 (conv5-act-maxpool x2, FC 120-84-classes); convs pad 2 so small inputs fit.
- ``vgg-simple``: paper 002's Simplified-VGG: five conv3x3-act-maxpool blocks (pooling stops at
  1x1) and a Linear head.
- ``mixer``: paper 002's MLP-Mixer: patch embedding conv, ``blocks`` x (spatial MLP
  LN-transpose-FC-act-transpose + skip; channel MLP LN-FC-act-FC + skip), token mean, head.
- ``resnet-small``: conv-BN-ReLU stem and basic residual blocks (identity skips and strided
  1x1-conv-BN downsample skips), global average pool, head; ``resnet18`` has 8 blocks in 4 stages.
- ``conv1d``: two conv1d-act-maxpool blocks and a Linear head (for MNIST-1D).
- ``resnet18-imagenet``, ``mobilenet-v2``: torchvision's ResNet-18 and MobileNetV2 architectures
  (:mod:`fbcompile.zoo_models`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .errors import OptionError, choices_text
from .zoo_models import mobilenet_v2, resnet18_imagenet

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "elu": nn.ELU,
                "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise OptionError(f"activation={name!r} is unknown; use {choices_text(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def mlp(input_shape, num_classes=10, width=256, depth=5, act="tanh"):
    layers, features = [nn.Flatten()], math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), activation(act)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def _flat_size(body: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return body(torch.zeros(1, *input_shape)).numel()


class LeNet5(nn.Module):
    def __init__(self, input_shape=(1, 32, 32), num_classes=10, act="tanh"):
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2 if min(input_shape[1:]) < 16 else 0), activation(act),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2 if min(input_shape[1:]) < 16 else 0), activation(act), nn.MaxPool2d(2))
        flat = _flat_size(self.features, input_shape)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 120), activation(act), nn.Linear(120, 84),
                                        activation(act), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class SimplifiedVGG(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), num_classes=10, widths=(32, 64, 128, 128, 128), act="leaky_relu"):
        super().__init__()
        layers, channels, size = [], input_shape[0], min(input_shape[1:])
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), activation(act)]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(self.features, input_shape), num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class MixerBlock(nn.Module):
    """Spatial MLP (LN, token FC, act) + skip, then channel MLP (LN, FC, act, FC) + skip (eq. 44-47)."""

    def __init__(self, tokens, dim, hidden, act):
        super().__init__()
        self.norm1, self.token_fc, self.act1 = nn.LayerNorm(dim), nn.Linear(tokens, tokens), activation(act)
        self.norm2, self.fc1, self.act2, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), activation(act), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.act1(self.token_fc(self.norm1(x).transpose(1, 2))).transpose(1, 2)
        return x + self.fc2(self.act2(self.fc1(self.norm2(x))))


class MLPMixer(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), num_classes=10, patch=4, dim=64, hidden=128, blocks=2,
                 act="leaky_relu"):
        super().__init__()
        channels, height, width = input_shape
        if height % patch or width % patch:
            raise OptionError(f"mixer: patch={patch} must divide the input size {height}x{width}")
        tokens = (height // patch) * (width // patch)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, hidden, act) for _ in range(blocks)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(dim=1))


class BasicBlock(nn.Module):
    def __init__(self, channels_in, channels_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class ResNet(nn.Module):
    def __init__(self, input_shape=(3, 32, 32), num_classes=10, widths=(16, 32), blocks_per_stage=(1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks_per_stage)):
            for i in range(count):
                blocks.append(BasicBlock(channels, width, 2 if (i == 0 and stage > 0) else 1))
                channels = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(input_shape=(3, 32, 32), num_classes=10):
    """ResNet-18's shape: 8 basic blocks in 4 stages (64-128-256-512 channels)."""
    return ResNet(input_shape, num_classes, widths=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2))


class Conv1dNet(nn.Module):
    def __init__(self, input_shape=(1, 40), num_classes=10, channels=(16, 32), act="relu"):
        super().__init__()
        layers, c = [], input_shape[0]
        for width in channels:
            layers += [nn.Conv1d(c, width, 5, padding=2), activation(act), nn.MaxPool1d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(self.features, input_shape), num_classes))

    def forward(self, x):
        return self.head(self.features(x))


BUILTIN_MODELS = {
    "mlp": mlp,
    "lenet": LeNet5,
    "vgg-simple": SimplifiedVGG,
    "mixer": MLPMixer,
    "resnet-small": ResNet,
    "resnet18": resnet18,
    "conv1d": Conv1dNet,
    "resnet18-imagenet": resnet18_imagenet,
    "mobilenet-v2": mobilenet_v2,
}


def build_model(name: str, input_shape, num_classes: int = 10, **options) -> nn.Module:
    """A built-in model for inputs of ``input_shape`` (no batch dim) and ``num_classes`` outputs."""
    if name not in BUILTIN_MODELS:
        raise OptionError(f"model {name!r} is not built in; use {choices_text(BUILTIN_MODELS)} or "
                          "path/to/file.py:Class")
    try:
        return BUILTIN_MODELS[name](tuple(input_shape), num_classes, **options)
    except TypeError as exc:
        raise OptionError(f"model {name!r}: {exc}") from exc
