"""Real-size reference architectures, written here so fbcompile never depends on torchvision.

- :func:`resnet18_imagenet`: ResNet-18 as torchvision defines it (He et al. 2016): a 7x7 stride-2
  conv-BN-ReLU stem and a 3x3 stride-2 max pool, four stages of two basic blocks (64, 128, 256, 512
  channels; the first block of stages 2-4 strides by 2 and has a 1x1-conv-BN downsample skip),
  global average pooling and a Linear head. 11.7M parameters at 1000 classes.
- :func:`mobilenet_v2`: MobileNetV2 as torchvision defines it (Sandler et al. 2018): a 3x3 stride-2
  conv-BN-ReLU6 stem, 17 inverted residual blocks (1x1 expansion conv-BN-ReLU6 unless the
  expansion factor is 1, 3x3 depthwise conv-BN-ReLU6, 1x1 linear projection conv-BN; a skip when
  the block keeps stride 1 and its width), a 1x1 conv-BN-ReLU6 to 1280 channels, global average
  pooling, dropout 0.2 and a Linear head. 3.5M parameters at 1000 classes.

Module names, parameter names and initialisation follow torchvision's, so a torchvision
``state_dict`` loads into these modules unchanged (tests cross-check the outputs when torchvision is
importable). Both accept any input of at least 32x32 (3x32x32 is what ``examples/bench_models.py``
measures).
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_init(module: nn.Module) -> None:
    """torchvision's initialisation: convs Kaiming normal (fan_out, ReLU gain), BatchNorm gamma 1 and
    beta 0, Linear N(0, 0.01) weights (MobileNetV2) and zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- ResNet-18 ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """out = ReLU(BN(conv3x3(ReLU(BN(conv3x3_stride(x))))) + skip(x)), skip = x or BN(conv1x1_stride(x))."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, layers=(2, 2, 2, 2)):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        self.apply(_conv_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.inplanes, planes, stride)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_imagenet(input_shape=(3, 224, 224), num_classes: int = 1000) -> ResNet18:
    """torchvision's ResNet-18 architecture for ``input_shape`` = (channels, height, width)."""
    return ResNet18(num_classes, in_channels=input_shape[0])


# -- MobileNetV2 --------------------------------------------------------------------------------
def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNActivation(nn.Sequential):
    """Conv2d (padding (k - 1) / 2, no bias) -> BatchNorm2d -> ReLU6 (torchvision's Conv2dNormActivation)."""

    def __init__(self, inp: int, out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(inp, out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))
        self.out_channels = out


class InvertedResidual(nn.Module):
    """x + project(depthwise(expand(x))) when stride 1 keeps the width, else without the skip."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [ConvBNActivation(inp, hidden, kernel_size=1)]
        layers += [ConvBNActivation(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


#: (expansion t, output channels c, repeats n, first stride s) per stage (the paper's Table 2)
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2, in_channels: int = 3):
        super().__init__()
        channels = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNActivation(in_channels, channels, stride=2)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNActivation(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self.apply(_conv_init)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(input_shape=(3, 224, 224), num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.2) -> MobileNetV2:
    """torchvision's MobileNetV2 architecture for ``input_shape`` = (channels, height, width)."""
    return MobileNetV2(num_classes, width_mult, dropout, in_channels=input_shape[0])


ZOO_MODELS = {"resnet18-imagenet": resnet18_imagenet, "mobilenet-v2": mobilenet_v2}
