"""End to end, float64: error propagation through all-exact T programs equals autograd."""
import copy

import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.models import build_model

from helpers import compare_with_autograd

EXACT_MODELS = [
    ("mlp", (784,), {}),
    ("lenet", (1, 32, 32), {}),
    ("vgg-simple", (3, 32, 32), {}),
    ("resnet-small", (3, 16, 16), {}),
    ("conv1d", (1, 40), {}),
]


@pytest.mark.parametrize("name,shape,options", EXACT_MODELS, ids=[m[0] for m in EXACT_MODELS])
def test_exact_program_equals_autograd(name, shape, options):
    model = build_model(name, shape, 10, **options).double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < 1e-10
    assert param_rel < 1e-10


def test_mlp_784_5x256_10_tanh_is_the_default_mlp():
    model = build_model("mlp", (784,), 10)
    widths = [m.out_features for m in model if isinstance(m, nn.Linear)]
    assert widths == [256] * 5 + [10] and any(isinstance(m, nn.Tanh) for m in model)


def test_resnet_has_identity_and_strided_downsample_skips():
    model = build_model("resnet-small", (3, 16, 16), 10)
    blocks = [m for m in model.modules() if m.__class__.__name__ == "BasicBlock"]
    assert any(b.downsample is None for b in blocks)
    assert any(b.downsample is not None and b.downsample[0].stride == (2, 2) for b in blocks)


class DetachedVarianceLayerNorm(nn.Module):
    """LayerNorm whose 1/sigma is a constant for autograd: the function frozen statistics differentiate."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        dims = tuple(range(-len(self.norm.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + self.norm.eps).detach()
        return (x - mean) * rstd * self.norm.weight + self.norm.bias


def _detach_variances(model):
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, child_name, DetachedVarianceLayerNorm(child))
    return reference


def test_mixer_matches_autograd_with_variance_detached():
    model = build_model("mixer", (3, 16, 16), 10, patch=4, dim=16, hidden=32).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    # frozen statistics in error modes too (the error modes' default is the exact backward)
    program = fbcompile.compile(model, x, variants={"error": ()})
    reference = _detach_variances(model)
    error = torch.randn(3, 10, dtype=torch.float64)
    from fbcompile.verify.checks import autograd_gradients, relative_error
    ref_inputs, ref_params = autograd_gradients(reference, x, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    assert relative_error(ours, ref_inputs[0]) < 1e-10
    for name, param in model.named_parameters():
        ref_name = name if name in ref_params else name.replace("norm1.", "norm1.norm.").replace("norm2.", "norm2.norm.")
        assert relative_error(param.grad, ref_params[ref_name]) < 1e-10, name


def test_batchnorm_train_mode_freezes_batch_statistics():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    rows = {r["node"]: r for r in fbcompile.verify(program, x).rows}
    assert rows["_1"]["kind"] == "frozen-statistics"
    model.eval()
    assert compare_with_autograd(model, x, program=program)[0] < 1e-10
    assert fbcompile.verify(program, x).rows[1]["kind"] == "exact"


@pytest.mark.parametrize("case", ["mixer", "batchnorm-train"])
def test_exact_statistics_variant_equals_true_autograd(case):
    """With variants=("exact-statistics",) LayerNorm and train-mode BatchNorm feed back their full
    Jacobian transpose: error propagation equals autograd on the unmodified model."""
    from fbcompile.verify.checks import autograd_gradients, relative_error
    if case == "mixer":
        model = build_model("mixer", (3, 16, 16), 10, patch=4, dim=16, hidden=32).double()
        x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                              nn.Linear(4 * 36, 3)).double().train()
        x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    assert {r["kind"] for r in fbcompile.verify(program, x).rows} == {"exact"}
    error = torch.randn(len(x), 10 if case == "mixer" else 3, dtype=torch.float64)
    ref_inputs, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    assert relative_error(program.propagate_error(x, error), ref_inputs[0]) < 1e-10
    for name, param in model.named_parameters():
        # a conv bias right before BatchNorm has a zero gradient: compare absolutely there
        scale = max(float(ref_params[name].norm()), 1e-3)
        assert float((param.grad - ref_params[name]).norm()) / scale < 1e-10, name


def test_dropout_reuses_the_forward_mask():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.4), nn.Linear(8, 2)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    error = torch.randn(7, 2, dtype=torch.float64)
    torch.manual_seed(11)
    model.zero_grad()
    ours = program.propagate_error(x, error)
    mine = model[0].weight.grad.clone()
    torch.manual_seed(11)   # dropout(ones) in the tapped forward draws exactly what dropout(x) draws
    xx = x.clone().requires_grad_()
    model.zero_grad()
    (model(xx) * error).sum().backward()
    assert torch.allclose(ours, xx.grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(mine, model[0].weight.grad, rtol=1e-12, atol=1e-14)


class FunctionalNet(nn.Module):
    """Parameters reached through get_attr, tensor methods, in-place ops and fan-out."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 5))
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(3, 8))
        self.offset = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.w1, self.b1).tanh()
        h2 = h * 2.0
        h2 += h                       # fan-out and an in-place add
        h2 = torch.relu_(h2 - self.offset)
        a, b = h2.chunk(2, dim=1)
        h3 = torch.cat([b, a], dim=1).view(x.size(0), -1)
        return torch.nn.functional.linear(h3 / 3.0, self.w2)


def test_functional_spellings_get_attr_inplace_and_fanout():
    model = FunctionalNet().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < 1e-10 and param_rel < 1e-10


def test_multiple_inputs_return_one_error_each():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, x, y):
            return torch.tanh(self.a(x) + self.b(y))

    model = TwoInputs().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    program = fbcompile.compile(model, (x, y))
    error = torch.randn(5, 4, dtype=torch.float64)
    gx, gy = program.propagate_error((x, y), error)
    xx, yy = x.clone().requires_grad_(), y.clone().requires_grad_()
    (model(xx, yy) * error).sum().backward()
    assert torch.allclose(gx, xx.grad) and torch.allclose(gy, yy.grad)
