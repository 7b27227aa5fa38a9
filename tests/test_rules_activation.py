"""Activation rules (float64): every activation's T rule has J_G = J_F^T at the operating point
(exact for the invertible ones, linearised for relu, gelu, silu, hardtanh, relu6, hardswish,
hardsigmoid, mish and for hyperparameters that make an activation non-monotone), the adjoint
identity holds, error mode equals autograd at the kinks too, the target map's Jacobian at t = h is
the error map, and every spelling is one op."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.func import jacrev

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.verify.checks import rule_errors
from fbcompile.verify.evaluate import forward_values

from helpers import compare_with_autograd

TOL = 1e-10
EXACT = {"tanh", "sigmoid", "leaky_relu", "elu", "softplus"}
LINEARISED = {"relu", "gelu", "silu", "hardtanh", "relu6", "hardswish", "hardsigmoid", "mish"}


def activation_modules(draw):
    """(canonical op name, module) with random hyperparameters."""
    name = draw(st.sampled_from(sorted(EXACT | LINEARISED | {"gelu_tanh"})))
    floats = lambda lo, hi: draw(st.floats(lo, hi))
    module = {
        "tanh": lambda: nn.Tanh(), "sigmoid": lambda: nn.Sigmoid(), "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(floats(0.01, 0.9)), "elu": lambda: nn.ELU(floats(0.1, 2.0)),
        "softplus": lambda: nn.Softplus(floats(0.5, 3.0), floats(1.0, 20.0)),
        "gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": lambda: nn.SiLU(),
        "hardtanh": lambda: nn.Hardtanh(-floats(0.2, 1.5), floats(0.2, 1.5)),
        "relu6": lambda: nn.ReLU6(), "hardswish": lambda: nn.Hardswish(), "hardsigmoid": lambda: nn.Hardsigmoid(),
        "mish": lambda: nn.Mish(),
    }[name]()
    return name.replace("gelu_tanh", "gelu"), module


@settings(max_examples=40, deadline=None)
@given(st.data(), st.sampled_from([(3, 5), (2, 3, 4)]), st.floats(0.5, 4.0))
def test_activation_transpose_rules(data, shape, scale):
    name, act = activation_modules(data.draw)
    model = nn.Sequential(act).double()
    x = scale * torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    node = next(iter(program.rules))
    assert program.rules[node].op == name
    kind = program.rules[node].kind_for(EagerContext(node, {}, model))
    jumps = name == "softplus" and math.log1p(math.exp(-act.threshold)) / act.beta > 1e-8 * act.threshold / act.beta
    assert kind == ("exact" if name in EXACT and not jumps else "linearised")
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert tjml_rel < TOL and gap < TOL
    assert max(compare_with_autograd(model, x, program=program)) < TOL


def _eager(program, x):
    node = next(iter(program.rules))
    return node, program.rules[node], EagerContext(node, forward_values(program, (x,)), program.model)


@settings(max_examples=30, deadline=None)
@given(st.data(), st.booleans())
def test_target_map_jacobian_at_the_operating_point_is_the_error_map(data, hadamard):
    """d G(t) / dt at t = h equals J_G (T, and the Hadamard variant of eq. 29)."""
    _, act = activation_modules(data.draw)
    model = nn.Sequential(act).double()
    x = 2 * torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, variants=("hadamard",) if hadamard else ())
    node, rule, ctx = _eager(program, x)
    if hadamard:
        assert rule.variant == "hadamard" and rule.kind_for(ctx) == "surrogate"
    h = model(x).detach()
    j_target = jacrev(lambda t: rule.target_map()(ctx, t)["input"])(h).reshape(12, 12)
    j_error = jacrev(lambda g: rule.error(ctx, g)["input"])(torch.zeros_like(h)).reshape(12, 12)
    assert torch.allclose(j_target, j_error, rtol=1e-9, atol=1e-9)


def test_softplus_with_a_small_threshold_is_not_invertible():
    """torch's softplus(x) jumps at x = threshold / beta; with threshold 1 outputs in
    (1, log(1 + e)] have two preimages, so there is no inverse and the rule is linearised."""
    x = torch.linspace(0.5, 1.5, 11, dtype=torch.float64).reshape(1, -1)
    for threshold, kind in ((1.0, "linearised"), (20.0, "exact")):
        model = nn.Sequential(nn.Softplus(1.0, threshold)).double()
        program = fbcompile.compile(model, x)
        node = next(iter(program.rules))
        assert program.rules[node].kind_for(EagerContext(node, {}, model)) == kind
    with pytest.raises(fbcompile.FBCompileError, match="softplus"):
        fbcompile.compile(nn.Sequential(nn.Softplus(1.0, 1.0)).double(), x, condition="I")


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.2), nn.Tanh(), nn.ELU(0.7), nn.Softplus(2.0), nn.Sigmoid()])
def test_invertible_target_is_varsigma_with_varsigma_prime_sigma_prime(act):
    """G(t) = varsigma(t) with varsigma(sigma(0)) = 0 and varsigma'(h) = sigma'(x) (eq. 27)."""
    model = nn.Sequential(act).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    _, rule, ctx = _eager(program, x)
    zero = model(torch.zeros(1, dtype=torch.float64))
    assert float(rule.target_map()(ctx, zero)["input"].abs().max()) < 1e-12
    h = model(x).detach()
    slope = torch.func.vmap(torch.func.grad(lambda t: rule.target_map()(ctx, t)["input"]))
    xx = x.clone().requires_grad_()
    sigma_prime, = torch.autograd.grad(model(xx).sum(), xx)
    assert torch.allclose(slope(h.reshape(-1)).reshape(h.shape), sigma_prime, rtol=1e-10, atol=1e-12)


class Spellings(nn.Module):
    """relu through module, function, torch function, method and the in-place forms."""

    def __init__(self):
        super().__init__()
        self.act, self.act_inplace = nn.ReLU(), nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.act(x - 0.1)
        b = F.relu(x + 0.2)
        c = torch.relu(x * 1.5)
        d = (x - 0.3).relu()
        e = (x + 0.4).relu_()
        f = self.act_inplace(x * 0.5)
        g = F.relu(x - 0.5, inplace=True)
        return a + b + c + d + e + f + g


def test_every_relu_spelling_is_one_op_and_inplace_runs_out_of_place():
    model = Spellings().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert sum(rule.op == "relu" for rule in program.rules.values()) == 7
    assert max(compare_with_autograd(model, x, program=program)) < TOL


@pytest.mark.parametrize("spell", [
    lambda x: torch.tanh(x), lambda x: x.tanh(), lambda x: torch.sigmoid(x), lambda x: x.sigmoid(),
    lambda x: F.leaky_relu(x, 0.3), lambda x: F.elu(x, 0.5), lambda x: F.softplus(x, 2.0, 5.0),
    lambda x: F.gelu(x, approximate="tanh"), lambda x: F.silu(x), lambda x: F.hardtanh(x, -0.5, 0.7),
    lambda x: F.relu6(x), lambda x: F.hardswish(x), lambda x: F.hardsigmoid(x), lambda x: F.mish(x)])
def test_functional_spellings_are_exact(spell):
    class Functional(nn.Module):
        def forward(self, x):
            return spell(x)

    x = 4 * torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(Functional(), x)
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert tjml_rel < TOL and gap < TOL


# the breakpoints of the piecewise activations, where torch's derivative convention decides
KINKS = {"relu6": [0.0, 6.0], "hardswish": [-3.0, 3.0], "hardsigmoid": [-3.0, 3.0], "hardtanh": [-1.0, 1.0],
         "relu": [0.0]}


@pytest.mark.parametrize("name,act", [("relu6", nn.ReLU6()), ("hardswish", nn.Hardswish()),
                                      ("hardsigmoid", nn.Hardsigmoid()), ("hardtanh", nn.Hardtanh()),
                                      ("relu", nn.ReLU())])
def test_error_mode_equals_autograd_at_the_kinks(name, act):
    """Inputs exactly at the breakpoints: the feedback takes torch's one-sided derivative there
    (hardswish' = 0 at -3 and 1 at 3, relu6' = 0 at 0 and 6, hardsigmoid' = 0 at +-3), and so does
    the sympy-derived sigma' that the Hadamard variant uses."""
    kinks = torch.tensor(KINKS[name], dtype=torch.float64)
    x = torch.cat([kinks, 4 * torch.randn(10, dtype=torch.float64)]).repeat(3, 1)
    model = nn.Sequential(act).double()
    program = fbcompile.compile(model, x)
    assert max(compare_with_autograd(model, x, program=program)) < TOL
    (tjml_rel, gap), = rule_errors(program, x).values()
    assert tjml_rel < TOL and gap < TOL
    _, _, ctx = _eager(program, x)
    xx = x.clone().requires_grad_()
    sigma_prime, = torch.autograd.grad(model(xx).sum(), xx)
    from fbcompile.rules.activation import derived
    assert torch.allclose(derived(ctx).derivative(x), sigma_prime, rtol=1e-7, atol=0)


@pytest.mark.parametrize("act", [nn.LeakyReLU(-0.5), nn.LeakyReLU(0.0), nn.ELU(-0.7), nn.ELU(0.0),
                                 nn.Softplus(-1.5)])
def test_non_monotone_hyperparameters_make_the_rule_linearised(act):
    """leaky_relu with slope <= 0, elu with alpha <= 0 and softplus with beta < 0 have no inverse
    on their range (two inputs share an output, or a branch is flat, or the branches swap order):
    their T rule is declared linearised, condition I refuses them, and error mode stays exact."""
    model = nn.Sequential(act).double()
    x = 3 * torch.randn(4, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    node = next(iter(program.rules))
    assert program.rules[node].kind_for(EagerContext(node, {}, model)) == "linearised"
    assert max(compare_with_autograd(model, x, program=program)) < TOL
    with pytest.raises(fbcompile.FBCompileError, match="not invertible"):
        fbcompile.compile(model, x, condition="I")


@pytest.mark.parametrize("module,function", [(nn.ReLU6, F.relu6), (nn.Hardswish, F.hardswish),
                                             (nn.Hardsigmoid, F.hardsigmoid), (nn.Mish, F.mish)])
def test_new_activation_spellings_are_one_op(module, function):
    """Module, in-place module, function and in-place function: one op, run out of place."""
    class Spelled(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.act_inplace = module(), module(inplace=True)

        def forward(self, x):
            return self.act(x) + self.act_inplace(x + 0.5) + function(2 * x) + function(x - 1, inplace=True)

    model = Spelled().double()
    x = 4 * torch.randn(3, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    assert len({rule.op for rule in program.rules.values() if rule.op not in ("add", "mul", "sub")}) == 1
    assert max(compare_with_autograd(model, x, program=program)) < TOL
