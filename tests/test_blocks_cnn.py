"""Blocks mirroring torchvision's convnet families, written here: error mode equals autograd
(float64, eval mode, exact statistics) for the input and every parameter."""
import pytest
import torch
from torch import nn

import fbcompile

from helpers import compare_with_autograd

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-8


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU6())


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, linear project 1x1, identity skip."""

    def __init__(self, c=6, expand=3):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c * expand, 1), conv_bn(c * expand, c * expand, groups=c * expand),
                                  nn.Conv2d(c * expand, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class Inception(nn.Module):
    """GoogLeNet: four branches from one input (1x1, 1x1-3x3, 1x1-5x5, maxpool-1x1), concatenated."""

    def __init__(self, c=6):
        super().__init__()
        self.b1 = conv_bn(c, 4, 1)
        self.b2 = nn.Sequential(conv_bn(c, 3, 1), conv_bn(3, 4))
        self.b3 = nn.Sequential(conv_bn(c, 2, 1), conv_bn(2, 3, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), conv_bn(c, 3, 1))

    def forward(self, x):
        x = torch.relu(x)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class DenseBlock(nn.Module):
    """DenseNet: each layer reads the concatenation of every earlier output."""

    def __init__(self, c=4, growth=3, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                                                  nn.Conv2d(c + i * growth, growth, 3, padding=1))
                                    for i in range(layers))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2: split channels, transform one half, concatenate, shuffle (sizes read from x)."""

    def __init__(self, c=8):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(c // 2, c // 2, 1), conv_bn(c // 2, c // 2, groups=c // 2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = out.size()
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Classifier(nn.Module):
    def __init__(self, block, width_in, width_out):
        super().__init__()
        self.stem, self.block = conv_bn(3, width_in), block
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(width_out, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


BLOCKS = {"inverted_residual": lambda: Classifier(InvertedResidual(), 6, 6),
          "inception": lambda: Classifier(Inception(), 6, 14),
          "dense_block": lambda: Classifier(DenseBlock(), 4, 13),
          "channel_shuffle": lambda: Classifier(ShuffleUnit(), 8, 8)}


def _randomised(model):
    """Eval mode, float64, BatchNorm statistics and affine parameters away from their defaults."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    return model.double().eval()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_error_mode_equals_autograd(name):
    model, x = _randomised(BLOCKS[name]()), torch.randn(2, 3, 7, 7, dtype=torch.float64)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
