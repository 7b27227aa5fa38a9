"""Blocks mirroring torchvision's families, written here: a squeeze-excitation block with hard
activations (MobileNetV3), an MBConv with stochastic depth (EfficientNet) and a ConvNeXt block
(depthwise 7x7, channels-last LayerNorm, GELU MLP, layer scale, stochastic depth). For each:
error mode equals autograd in float64 with exact statistics (eval mode, every parameter), and one
step of every learner in train mode. Stochastic depth is our own ``torch.fx.wrap``-ed function of
torchvision's semantics, declared as stochastic depth; the same thing written with a Bernoulli
mask inside forward is traced as random values whose forward draw the feedback reuses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.rules.dropout import declare_stochastic_depth
from fbcompile.verify.checks import autograd_gradients, relative_error

from helpers import compare_with_autograd, grads_of, randomise_vectors

TOL = 1e-8
LEARNERS = ("bp", "fa", "dtp", "dfa", "drtp", "mf")


def stochastic_depth(input, p, mode, training=True):
    """torchvision.ops.stochastic_depth's semantics: drop whole rows (samples) or the whole batch
    with probability p, scale survivors by 1 / (1 - p); identity in eval or at p = 0."""
    if not training or p == 0.0:
        return input
    survival = 1.0 - p
    size = [input.shape[0]] + [1] * (input.dim() - 1) if mode == "row" else [1] * input.dim()
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return input * noise


torch.fx.wrap("stochastic_depth")
STOCHASTIC_DEPTH = declare_stochastic_depth(stochastic_depth, name="tests.stochastic_depth")


def _randomise(model):
    """No parameter or statistic at its exact default: biases, norms' affine parameters, layer
    scales and BatchNorm running statistics drawn at random."""
    randomise_vectors(model)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
        for module in model.modules():
            if isinstance(module, SqueezeExcitation):
                # keep the gate's ReLU and hard sigmoid in their active range, else some draws leave
                # the SE branch with an exactly zero gradient and the comparison vacuous
                module.fc1.bias.uniform_(0.5, 1.0)
                module.fc2.bias.uniform_(-0.5, 0.5)
    return model


class SqueezeExcitation(nn.Module):
    """MobileNetV3's SE: x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))."""

    def __init__(self, channels, squeezed):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = self.fc2(F.relu(self.fc1(scale)))
        return x * F.hardsigmoid(scale)


class MobileNetV3Block(nn.Module):
    """Inverted residual with hardswish, SE and a residual."""

    def __init__(self, channels=4, expanded=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded),
                                    nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
                                       nn.BatchNorm2d(expanded), nn.Hardswish(inplace=True))
        self.se = SqueezeExcitation(expanded, 4)
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x):
        return self.head(x + self.project(self.se(self.depthwise(self.expand(x)))))


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, SE (SiLU, sigmoid gate), project, stochastic
    depth on the residual branch (our fx-wrapped function, row mode)."""

    def __init__(self, channels=4, expanded=8, p=0.5, mode="row"):
        super().__init__()
        self.p, self.mode = p, mode
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
                                       nn.BatchNorm2d(expanded), nn.SiLU())
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x):
        branch = self.project(self.depthwise(self.expand(x)))
        return self.head(x + stochastic_depth(branch, self.p, self.mode, self.training))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, permute to channels-last, LayerNorm(C), Linear 4C, GELU, Linear C,
    layer scale gamma * x, permute back, stochastic depth (batch mode here), residual."""

    def __init__(self, channels=4, p=0.5, mode="batch"):
        super().__init__()
        self.p, self.mode = p, mode
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(channels, 4 * channels), nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x + stochastic_depth(y, self.p, self.mode, self.training))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's LayerNorm2d: F.layer_norm on a channels-last view, permuted back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtStem(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, channels, 2, stride=2), LayerNorm2d(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 9, 3))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


BLOCKS = [
    pytest.param(MobileNetV3Block, id="mobilenet_v3_se"),
    pytest.param(MBConv, id="mbconv_stochastic_depth"),
    pytest.param(ConvNeXtBlock, id="convnext_block"),
    pytest.param(ConvNeXtStem, id="convnext_layernorm2d"),
]


def _input(block):
    return torch.randn(3, 3 if isinstance(block, ConvNeXtStem) else 4, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("make", BLOCKS)
def test_block_error_mode_equals_autograd(make):
    torch.manual_seed(0)
    model = _randomise(make().double()).eval()
    x = _input(model)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, torch.randn(3, 3, dtype=torch.float64))
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


@pytest.mark.parametrize("make", BLOCKS)
@pytest.mark.parametrize("algorithm", LEARNERS)
def test_every_learner_steps_in_train_mode(make, algorithm):
    torch.manual_seed(1)
    model = _randomise(make()).train()
    x, y = _input(model).float(), torch.tensor([0, 2, 1])
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=0)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_in_train_mode_reuses_the_forward_mask(mode):
    """Same seed for autograd and the program: the same mask is drawn, and error mode equals
    autograd through it (dropped rows get no feedback, kept rows 1 / (1 - p))."""
    model = _randomise(MBConv(p=0.4, mode=mode).double()).eval()
    model.training = True   # the block's own flag (traced into the call); BatchNorm stays in eval
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    assert [r.op for r in program.rules.values()].count("tests.stochastic_depth") == 1
    for seed in range(4):
        error = torch.randn(8, 3, dtype=torch.float64)
        torch.manual_seed(seed)
        ref_inputs, ref_params = autograd_gradients(model, x, error)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        ours = program.propagate_error(x, error)
        assert relative_error(ours, ref_inputs[0]) < TOL
        assert max(relative_error(g, ref_params[n]) for n, g in grads_of(model).items()) < TOL


def test_stochastic_depth_drops_what_the_forward_dropped():
    """p = 1 drops everything: the residual branch's parameters get zero gradient."""
    model = _randomise(MBConv(p=1.0).double()).eval()
    model.training = True
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, torch.randn(3, 3, dtype=torch.float64))
    assert float(model.expand[0].weight.grad.abs().max()) == 0.0
    assert float(model.head[2].weight.grad.abs().max()) > 0.0


@pytest.mark.parametrize("p,mode,reason", [(1.5, "row", "p in \\[0, 1\\]"), (0.2, "rows", "'row' or 'batch'")])
def test_invalid_stochastic_depth_is_refused_naming_the_node(p, mode, reason):
    model = MBConv(p=p, mode=mode).double().eval()
    with pytest.raises(fbcompile.FBCompileError, match=reason) as caught:
        fbcompile.compile(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    assert "stochastic_depth" in str(caught.value)


class HandWrittenDropPath(nn.Module):
    """Stochastic depth written inline, as people do: a Bernoulli mask scaled by 1 / (1 - p)."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p, self.fc, self.out = p, nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        branch = torch.tanh(self.fc(x))
        if self.training:
            mask = torch.empty((branch.shape[0], 1), dtype=branch.dtype, device=branch.device).bernoulli_(1 - self.p)
            branch = branch * mask / (1 - self.p)
        return self.out(x + branch)


@pytest.mark.parametrize("training", [True, False])
def test_hand_written_bernoulli_mask_reuses_the_forward_draw(training):
    """fx records the draw (torch.empty, bernoulli_) as values computed in the forward; the product
    with the mask taps that value, so feedback uses the very mask the forward drew (train) and the
    branch is the identity in eval (traced in eval, the draw is not in the graph at all)."""
    model = HandWrittenDropPath().double().train(training)
    x = torch.randn(16, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert any(n.target == torch.Tensor.bernoulli_ or n.target == "bernoulli_"
               for n in program.traced.graph.nodes) == training
    error = torch.randn(16, 3, dtype=torch.float64)
    torch.manual_seed(5)
    ref_inputs, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ours = program.propagate_error(x, error)
    assert relative_error(ours, ref_inputs[0]) < TOL
    assert max(relative_error(g, ref_params[n]) for n, g in grads_of(model).items()) < TOL
