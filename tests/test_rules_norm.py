"""Normalisation rules (float64). LayerNorm with frozen statistics leaves exactly the dropped term
x_hat x_hat^T diag(gamma) / (d sigma) (ALGORITHMS.md check 4), built here from dense torch.func
Jacobians; BatchNorm in eval mode is exact, in train mode it freezes the batch statistics. LayerNorm
on channels-last views (ConvNeXt) and GroupNorm with exact statistics equal autograd; GroupNorm's
frozen rule leaves the same dropped term per group; F.normalize's T and P rules are exact."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st
from torch import nn
from torch.func import jacrev

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.verify.checks import autograd_gradients, relative_error, rule_errors
from fbcompile.verify.evaluate import forward_values

from helpers import assert_a_step_learns, compare_with_autograd

TOL = 1e-10


def rule_jacobian(program, node_name, x):
    """Dense J_G of the node's rule over the whole batch, as (n_in, n_out)."""
    node = next(n for n in program.rules if n.name == node_name)
    ctx = EagerContext(node, forward_values(program, (x,)), program.model)
    out = program.model(x)
    jac = jacrev(lambda g: program.rules[node].error(ctx, g)["input"])(torch.zeros_like(out))
    return jac.reshape(x.numel(), out.numel())


def dropped_term(x, dims, gamma, eps):
    """Block diagonal over the normalised groups: x_hat x_hat^T diag(gamma) / (d sigma)."""
    d = math.prod(x.shape[-dims:])
    rows = x.reshape(-1, d)
    sigma = torch.sqrt(rows.var(1, unbiased=False, keepdim=True) + eps)
    x_hat = (rows - rows.mean(1, keepdim=True)) / sigma
    g = gamma.reshape(d) if gamma is not None else torch.ones(d, dtype=x.dtype)
    blocks = [torch.outer(h, h) * g / (d * s) for h, s in zip(x_hat, sigma[:, 0])]
    return torch.block_diag(*blocks), sigma[:, 0]


@st.composite
def layer_norm_cases(draw):
    lead = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2))))
    normalized = tuple(draw(st.integers(2, 4)) for _ in range(draw(st.integers(1, 2))))
    affine, bias = draw(st.booleans()), draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-2, 0.0]))
    norm = nn.LayerNorm(normalized, eps=eps, elementwise_affine=affine, bias=bias).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            if norm.bias is not None:
                norm.bias.normal_()
    scale = draw(st.floats(0.1, 10.0))
    return norm, scale * torch.randn(*lead, *normalized, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(layer_norm_cases())
def test_layer_norm_residual_is_exactly_the_dropped_term(case):
    norm, x = case
    model = nn.Sequential(norm)
    program = fbcompile.compile(model, x)
    dims = len(norm.normalized_shape)
    j_f = jacrev(lambda v: F.layer_norm(v, norm.normalized_shape, norm.weight, norm.bias, norm.eps))(x)
    j_f = j_f.reshape(x.numel(), x.numel())
    residual = rule_jacobian(program, "_0", x) - j_f.t()
    expected, _ = dropped_term(x.detach(), dims, norm.weight.detach() if norm.weight is not None else None, norm.eps)
    assert torch.allclose(residual, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    row = fbcompile.verify(program, x).rows[0]
    assert row["kind"] == "frozen-statistics"
    assert abs(row["tjml"] - float(torch.linalg.norm(expected))) < 1e-9 * (1 + row["tjml"])


def test_unit_variance_rows_leave_one_over_sigma():
    """gamma = 1, eps = 0: every row's residual has Frobenius norm ||x_hat||^2 / (d sigma) = 1/sigma."""
    d = 6
    x = torch.randn(4, d, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True) * torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    model = nn.Sequential(nn.LayerNorm(d, eps=0.0)).double()
    program = fbcompile.compile(model, x)
    j_f = jacrev(lambda v: F.layer_norm(v, (d,), eps=0.0))(x).reshape(x.numel(), x.numel())
    residual = rule_jacobian(program, "_0", x) - j_f.t()
    sigma = x.std(1, unbiased=False)
    for b in range(4):
        block = residual[b * d:(b + 1) * d, b * d:(b + 1) * d]
        assert abs(float(torch.linalg.norm(block.detach())) - 1 / float(sigma[b])) < 1e-12


def test_layer_norm_parameter_gradients_equal_autograd():
    """dgamma = sum g x_hat and dbeta = sum g are exact (the frozen statistics affect only the input)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    error = torch.randn(4, 3, dtype=torch.float64)
    _, ref = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    fbcompile.compile(model, x).propagate_error(x, error)
    assert relative_error(model[1].weight.grad, ref["1.weight"]) < TOL
    assert relative_error(model[1].bias.grad, ref["1.bias"]) < TOL
    assert relative_error(model[2].weight.grad, ref["2.weight"]) < TOL


def _batch_norm(dims, channels, affine):
    cls = nn.BatchNorm1d if dims < 2 else nn.BatchNorm2d
    norm = cls(channels, affine=affine).double()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        if affine:
            norm.weight.normal_()
            norm.bias.normal_()
    return norm


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2), st.integers(1, 3), st.booleans(), st.integers(2, 4))
def test_batch_norm_eval_is_exact(spatial_dims, channels, affine, batch):
    norm = _batch_norm(spatial_dims, channels, affine).eval()
    x = torch.randn(batch, channels, *(3,) * spatial_dims, dtype=torch.float64)
    if spatial_dims == 2:
        x = x.reshape(batch, channels, 3, 3)
    model = nn.Sequential(norm)
    program = fbcompile.compile(model, x)
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert program.rules[next(iter(program.rules))].kind_for(EagerContext(next(iter(program.rules)), {}, model)) == "exact"
    assert tjml_rel < TOL and gap < TOL


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2), st.integers(1, 3), st.booleans(), st.integers(2, 4))
def test_batch_norm_train_freezes_batch_statistics(spatial_dims, channels, affine, batch):
    """Per channel c over its m = batch * spatial entries, the residual is
    gamma_c x_hat_c x_hat_c^T / (m sigma_c): ||.||_F = |gamma_c| ||x_hat_c||^2 / (m sigma_c)."""
    norm = _batch_norm(spatial_dims, channels, affine).train()
    x = torch.randn(batch, channels, *(3,) * spatial_dims, dtype=torch.float64)
    program = fbcompile.compile(nn.Sequential(norm), x)
    row = fbcompile.verify(program, x).rows[0]
    assert row["kind"] == "frozen-statistics"
    per_channel = x.transpose(0, 1).reshape(channels, -1)
    m = per_channel.shape[1]
    sigma = torch.sqrt(per_channel.var(1, unbiased=False) + norm.eps)
    x_hat = (per_channel - per_channel.mean(1, keepdim=True)) / sigma[:, None]
    gamma = norm.weight.detach() if affine else torch.ones(channels, dtype=torch.float64)
    expected = torch.sqrt(((gamma.abs() * (x_hat ** 2).sum(1) / (m * sigma)) ** 2).sum())
    assert abs(row["tjml"] - float(expected)) < 1e-9 * (1 + float(expected))


def test_functional_batch_norm_with_buffers_through_get_attr():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.randn(3))
            self.register_buffer("var", torch.rand(3) + 0.5)
            self.gamma, self.beta = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

        def forward(self, x):
            return F.batch_norm(torch.tanh(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)

    model = Functional().double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name
    error = torch.randn(4, 3, 5, dtype=torch.float64)
    _, ref = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, error)
    assert relative_error(model.gamma.grad, ref["gamma"]) < TOL and relative_error(model.beta.grad, ref["beta"]) < TOL


# -- LayerNorm over channels-last views (ConvNeXt) ------------------------------------------------
class ChannelsLast(nn.Module):
    """Permute (N, C, H, W) to channels-last, LayerNorm over the trailing ``dims`` dims, permute back."""

    def __init__(self, shape, dims, functional):
        super().__init__()
        self.norm = nn.LayerNorm(shape[-dims:]).double()
        self.functional = functional
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        if self.functional:
            y = F.layer_norm(y, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            y = self.norm(y)
        return y.permute(0, 3, 1, 2)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.booleans(), st.floats(0.1, 5.0))
def test_channels_last_layer_norm_exact_statistics_equals_autograd(dims, functional, scale):
    x = scale * torch.randn(2, 3, 4, 2, dtype=torch.float64)
    model = ChannelsLast(tuple(x.permute(0, 2, 3, 1).shape), dims, functional)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name
    error = torch.randn_like(x)
    ref_inputs, ref = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    assert relative_error(program.propagate_error(x, error), ref_inputs[0]) < TOL
    assert relative_error(model.norm.weight.grad, ref["norm.weight"]) < TOL
    assert relative_error(model.norm.bias.grad, ref["norm.bias"]) < TOL


# -- GroupNorm --------------------------------------------------------------------------------------
@st.composite
def group_norm_cases(draw):
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2))))
    # a group of one or two entries normalises to 0 or +-1 whatever x (torch refuses one): its
    # Jacobian is O(eps), computed by cancellation on both sides, nothing but rounding to compare
    assume(channels // groups * math.prod(spatial) >= 3)
    affine = draw(st.booleans())
    norm = nn.GroupNorm(groups, channels, eps=draw(st.sampled_from([1e-5, 1e-2])), affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
    x = draw(st.floats(0.1, 10.0)) * torch.randn(draw(st.integers(1, 3)), channels, *spatial, dtype=torch.float64)
    return norm, x


def _functional_group_norm(norm):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.bias = norm.weight, norm.bias

        def forward(self, x):
            return F.group_norm(x, norm.num_groups, self.weight, self.bias, norm.eps)
    return Functional()


@settings(max_examples=25, deadline=None)
@given(group_norm_cases(), st.booleans())
def test_group_norm_exact_statistics_is_exact(case, functional):
    norm, x = case
    model = _functional_group_norm(norm) if functional else nn.Sequential(norm)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    row = fbcompile.verify(program, x).rows[0]
    assert row["kind"] == "exact" and row["tjml_rel"] < TOL
    (_, gap), = rule_errors(program, x).values()
    assert gap < TOL
    error = torch.randn_like(x)
    ref_inputs, ref = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    assert relative_error(program.propagate_error(x, error), ref_inputs[0]) < TOL
    for name, p in model.named_parameters():
        assert relative_error(p.grad, ref[name]) < TOL, name


@settings(max_examples=20, deadline=None)
@given(group_norm_cases())
def test_group_norm_frozen_residual_is_exactly_the_dropped_term(case):
    """Per sample and group (m entries, gamma per channel): J_G - J_F^T = x_hat x_hat^T diag(gamma) / (m sigma)."""
    norm, x = case
    program = fbcompile.compile(nn.Sequential(norm), x)
    j_f = jacrev(lambda v: F.group_norm(v, norm.num_groups, norm.weight, norm.bias, norm.eps))(x)
    j_f = j_f.reshape(x.numel(), x.numel())
    residual = rule_jacobian(program, "_0", x) - j_f.t()
    groups = x.reshape(x.shape[0], norm.num_groups, -1)
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones(x.shape[1], dtype=x.dtype)
    per_entry = gamma.reshape(1, -1, *([1] * (x.dim() - 2))).expand_as(x).reshape(groups.shape)
    sigma = torch.sqrt(groups.var(-1, unbiased=False) + norm.eps)
    x_hat = (groups - groups.mean(-1, keepdim=True)) / sigma[..., None]
    m = groups.shape[-1]
    blocks = [torch.outer(x_hat[n, k], x_hat[n, k]) * per_entry[n, k] / (m * sigma[n, k])
              for n in range(x.shape[0]) for k in range(norm.num_groups)]
    expected = torch.block_diag(*blocks)
    assert torch.allclose(residual, expected, rtol=1e-9, atol=1e-9 * (1 + float(expected.abs().max())))
    assert fbcompile.verify(program, x).rows[0]["kind"] == "frozen-statistics"


# -- F.normalize ------------------------------------------------------------------------------------
class Normalize(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=self.dim, eps=self.eps)


@settings(max_examples=25, deadline=None)
@given(st.integers(-3, 2), st.sampled_from([1e-12, 0.5, 3.0]), st.floats(0.05, 4.0), st.sampled_from(["T", "P"]),
       st.integers(1, 2 ** 31))
def test_normalize_rules_are_exact(dim, eps, scale, condition, seed):
    """T is J^T and P is J^+ on both sides of the clamp (eps = 3 clamps most rows, 0.5 some).
    x comes from its own generator: Hypothesis seeds torch's global one with 0, the seed the adjoint
    check draws its probe u from, and u parallel to x is J's null direction (<J u, v> = 0)."""
    x = scale * torch.randn(3, 4, 2, dtype=torch.float64, device="cpu", generator=torch.Generator().manual_seed(seed))
    model = Normalize(dim, eps)
    program = fbcompile.compile(model, x, condition=condition)
    row = fbcompile.verify(program, x).rows[0]
    assert row["kind"] == "linearised"
    assert row["tjml_rel" if condition == "T" else "pjml_rel"] < 1e-9
    if condition == "T":
        (_, gap), = rule_errors(program, x).values()
        assert gap < TOL
        assert max(compare_with_autograd(model, x, program=program)) < TOL


def test_normalize_at_the_clamp_takes_torchs_side():
    """||x|| == eps exactly: torch's clamp_min passes the gradient through the norm there."""
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    model = Normalize(1, 1.0)
    assert max(compare_with_autograd(model, x, program=fbcompile.compile(model, x))) < TOL


class OtherNorm(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.normalize(torch.tanh(x), p=self.p, dim=1) * x


@pytest.mark.parametrize("p", [1.0, 3.0, float("inf")])
def test_normalize_with_another_p_takes_autograds_vjp(p):
    x = torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(OtherNorm(p), x)
    (residual, gap), = [v for k, v in rule_errors(program, x).items() if "normalize" in k]
    assert residual < TOL and gap < TOL
    assert max(compare_with_autograd(OtherNorm(p), x, program=program)) < TOL


@pytest.mark.parametrize("p,condition,reason", [(1.0, "P", "only the Euclidean norm"), (2.0, "I", "singular")])
def test_normalize_refusals_name_the_reason(p, condition, reason):
    with pytest.raises(fbcompile.FBCompileError, match=reason):
        fbcompile.compile(OtherNorm(p), torch.randn(2, 3, dtype=torch.float64), condition=condition)


class GroupNormOfASlice(nn.Module):
    """timm's SHViT pattern: GroupNorm of the first channels of a tensor split along them, a view
    contiguous in no memory format (torch.native_group_norm refused it at the first run)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(2, 6, 1), nn.GroupNorm(2, 4), nn.Linear(6 * 9, 3)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        normalised, kept = torch.split(self.conv(x), [4, 2], dim=1)
        return self.head(torch.tanh(torch.cat([self.norm(normalised), kept], 1)).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_group_norm_of_a_non_contiguous_view_equals_autograd(frontend):
    torch.manual_seed(4)
    model, x = GroupNormOfASlice().double(), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend, variants=("exact-statistics",))
    for node, (tjml, gap) in rule_errors(program, x).items():          # J^T and <J v, u> = <v, G u>
        assert tjml < TOL and gap < TOL, (node, tjml, gap)
    assert max(compare_with_autograd(model, x, program=program)) < TOL
    for algorithm in ("bp", "dtp", "dfa", "mf"):
        assert_a_step_learns(model, fbcompile.learner(program, algorithm), x, torch.randint(0, 3, (5,)),
                             F.cross_entropy)
