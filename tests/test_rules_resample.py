"""Resampling (rules/resample.py) and the 3-d convolution, pooling and BatchNorm of video models, in
float64 through both front ends: every rule's TJML residual and adjoint gap with random vectors,
input and parameter gradients equal to autograd's, and DTP's small-beta limit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = [("nearest", {}), ("nearest-exact", {}), ("bilinear", {"align_corners": False}),
         ("bilinear", {"align_corners": True}), ("bicubic", {"align_corners": False}), ("area", {}),
         ("bilinear", {"align_corners": False, "antialias": True})]


class Pyramid(nn.Module):
    """An FPN-like join: a stride-2 branch upsampled back to the skip's size (read at run time) and
    the same branch upsampled by a scale factor."""

    def __init__(self, mode, options):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 8 * 12, 3)
        self.mode, self.options = mode, options

    def forward(self, x):
        skip = torch.tanh(self.stem(x))
        low = torch.tanh(self.down(skip))
        by_size = F.interpolate(low, size=skip.shape[-2:], mode=self.mode, **self.options)
        by_scale = F.interpolate(low, scale_factor=2, mode=self.mode, **self.options)
        return self.head((skip + by_size * by_scale).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("mode,options", MODES, ids=[f"{m}-{sorted(o.items())}" for m, o in MODES])
def test_interpolate_equals_autograd(mode, options, frontend):
    model = randomise_vectors(Pyramid(mode, options).double())
    op = "adaptive_avg_pool2d" if (mode, frontend) == ("area", "export") else "interpolate"   # ATen's spelling
    assert_matches_autograd(model, torch.randn(2, 3, 8, 12, dtype=torch.float64), frontend, ops=[op])


@pytest.mark.parametrize("mode,options", MODES[:3], ids=["nearest", "nearest-exact", "bilinear"])
def test_interpolate_meets_the_small_beta_limit(mode, options):
    model = randomise_vectors(Pyramid(mode, options))
    assert dtp_angle(model, torch.randn(2, 3, 8, 12, dtype=torch.float64)) < 0.01


class Upsamplers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bilinear, self.nearest = nn.Upsample(scale_factor=2, mode="bilinear"), nn.UpsamplingNearest2d(size=(10, 12))
        self.corners = nn.UpsamplingBilinear2d(scale_factor=2)
        self.head = nn.Linear(4 * 10 * 12, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        return self.head((self.bilinear(h) + self.nearest(h) + self.corners(h)).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_upsample_modules_equal_autograd(frontend):
    model = randomise_vectors(Upsamplers().double())
    assert_matches_autograd(model, torch.randn(2, 3, 5, 6, dtype=torch.float64), frontend, ops=["interpolate"])


class Resample1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv3 = nn.Conv1d(2, 3, 3, padding=1), nn.Conv3d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 21 + 3 * 4 * 6 * 6, 3)

    def forward(self, x1, x3):
        line = F.interpolate(torch.tanh(self.conv1(x1)), scale_factor=3, mode="linear")
        vol = F.interpolate(torch.tanh(self.conv3(x3)), size=(4, 6, 6), mode="trilinear")
        return self.head(torch.cat([line.flatten(1), vol.flatten(1)], 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_linear_and_trilinear_interpolation_equal_autograd(frontend):
    model = randomise_vectors(Resample1d3d().double())
    x = (torch.randn(2, 2, 7, dtype=torch.float64), torch.randn(2, 2, 2, 3, 3, dtype=torch.float64))
    import fbcompile
    from fbcompile.verify.checks import relative_error
    program = fbcompile.compile(model, x, frontend=frontend)
    out = model(*x)
    error = torch.randn_like(out)
    reference = torch.autograd.grad((out * error).sum(), list(model.parameters()))
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, error)
    for p, g in zip(model.parameters(), reference):
        assert relative_error(p.grad, g) < 1e-10


class Video(nn.Module):
    """A video-ResNet stem: Conv3d with per-dim stride, padding and dilation, BatchNorm3d, a grouped
    'same' Conv3d with a residual, 3-d max, average and adaptive pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=(1, 2, 0), stride=(1, 2, 1), dilation=(1, 1, 2))
        self.bn = nn.BatchNorm3d(4)
        self.c2 = nn.Conv3d(4, 4, 3, padding="same", groups=2)
        self.max = nn.MaxPool3d(2, ceil_mode=True)
        self.avg = nn.AvgPool3d((1, 2, 2), padding=(0, 1, 1), count_include_pad=False)
        self.adaptive = nn.AdaptiveAvgPool3d((2, 3, 1))
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.c1(x)))
        h = F.relu(self.c2(h)) + h
        return self.head(self.adaptive(self.avg(self.max(h))).flatten(1))


def _video():
    model = randomise_vectors(Video().double())
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_3d_convolution_pooling_and_batch_norm_equal_autograd(frontend):
    assert_matches_autograd(_video(), torch.randn(2, 2, 5, 9, 10, dtype=torch.float64), frontend,
                            ops=["conv3d", "batch_norm", "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d"])


def test_3d_video_stem_meets_the_small_beta_limit():
    assert dtp_angle(_video(), torch.randn(2, 2, 5, 9, 10, dtype=torch.float64)) < 0.01


class Decoder(nn.Module):
    """A U-Net/generator decoder: transposed convolutions with stride, padding, output_padding,
    groups and dilation, in 1-3 dimensions."""

    def __init__(self, n):
        super().__init__()
        conv, transposed = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1], (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                                       nn.ConvTranspose3d)[n - 1]
        self.down = conv(2, 4, 3, stride=2, padding=1)
        self.up = transposed(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.up2 = transposed(6, 2, 2, stride=1, padding=0, dilation=2, bias=False)
        self.n = n

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.down(x))))
        return self.up2(h).flatten(1)


SIZES = {1: (2, 2, 8), 2: (2, 2, 6, 8), 3: (2, 2, 4, 4, 6)}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_transposed_convolutions_equal_autograd(n, frontend):
    model = randomise_vectors(Decoder(n).double())
    assert_matches_autograd(model, torch.randn(*SIZES[n], dtype=torch.float64), frontend,
                            ops=[f"conv_transpose{n}d"])


@pytest.mark.parametrize("n", [1, 2])
def test_transposed_convolutions_meet_the_small_beta_limit_and_train_with_fa(n):
    import fbcompile
    model = randomise_vectors(Decoder(n).double())
    x = torch.randn(*SIZES[n], dtype=torch.float64)
    out = model(x)
    assert dtp_angle(nn.Sequential(model, nn.Linear(out.shape[1], 3).double()), x) < 0.01
    learner = fbcompile.learner(fbcompile.compile(model, x), "fa", seed=0)
    learner.step(x, torch.randn_like(out), F.mse_loss)
    assert all(p.grad is not None for p in model.parameters())
