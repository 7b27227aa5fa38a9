"""Rules of rules/elementwise.py (exp, log, sqrt, rsqrt, reciprocal, abs, sin, cos, log1p, expm1, erf,
clamp, dtype casts), the vector norms of rules/reduce.py, reshape_as / view_as and weight
normalisation, through both front ends, in float64: every rule's TJML residual and adjoint gap
(random vectors), input and parameter gradients equal to autograd's, and DTP's small-beta limit.
Also the feedback of operands an op promotes to a wider dtype, which must come back in the
operand's own dtype as autograd's engine casts it."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.verify.checks import autograd_gradients, relative_error, rule_errors

from helpers import compare_with_autograd, randomise_vectors

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-10
UNARY = ["exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "sin", "cos", "log1p", "expm1", "erf"]


def assert_matches_autograd(model, x, frontend="auto", ops=()):
    """Every rule exact (TJML and adjoint gap), and input and parameter gradients equal autograd's."""
    program = fbcompile.compile(model, x, frontend=frontend)
    assert set(ops) <= {program.rules[n].op for n in program.rules}, "the ops under test were not compiled"
    for name, (tjml, gap) in rule_errors(program, x).items():
        assert tjml < TOL and gap < TOL, (name, tjml, gap)
    assert_gradients_match(model, x, program)
    return program


def assert_gradients_match(model, x, program, tol=TOL):
    """The input's and every parameter's gradient equal autograd's for a random output error."""
    input_error, worst_parameter = compare_with_autograd(model, x, program=program)
    assert input_error < tol and worst_parameter < tol, (input_error, worst_parameter)


def dtp_angle(model, x, classes=3):
    """Degrees between analytic DTP's update at beta = 1e-6 and BP's (float64, eval)."""
    model = model.double().eval()
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    y = torch.randint(0, classes, (x.shape[0],))
    updates = []
    for algorithm, options in (("bp", {}), ("dtp", {"beta": 1e-6})):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, **options).step(x, y, F.cross_entropy)
        updates.append({n: p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None})
    assert updates[0].keys() == updates[1].keys(), "bp and dtp update different parameters"
    updates = [torch.cat(list(u.values())) for u in updates]
    cosine = float(updates[0] @ updates[1] / (updates[0].norm() * updates[1].norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


class Unary(nn.Module):
    """Linear -> softplus (positive, for log / sqrt / rsqrt) -> the op -> Linear."""

    def __init__(self, op, spelling="function"):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.op, self.spelling = op, spelling

    def forward(self, x):
        h = F.softplus(self.a(x)) + 0.1
        h = h if self.op in ("log", "sqrt", "rsqrt", "reciprocal") else h - 0.8   # both signs where allowed
        h = getattr(torch, self.op)(h) if self.spelling == "function" else getattr(h, self.op)()
        return self.b(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("op", UNARY)
def test_unary_ops_equal_autograd(op, frontend):
    model = randomise_vectors(Unary(op).double())
    assert_matches_autograd(model, torch.randn(4, 5, dtype=torch.float64), frontend, ops=[op])


@pytest.mark.parametrize("op", ["exp", "rsqrt", "abs"])
def test_tensor_method_spellings_and_the_small_beta_limit(op):
    model = randomise_vectors(Unary(op, spelling="method").double())
    x = torch.randn(4, 5, dtype=torch.float64)
    assert_matches_autograd(model, x, "fx", ops=[op])
    assert dtp_angle(model, x) < 0.01


class Clamped(nn.Module):
    def __init__(self, low, high):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.low, self.high = low, high

    def forward(self, x):
        return self.b(torch.clamp(self.a(x), self.low, self.high))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("low,high", [(-0.3, 0.4), (0.0, None), (None, 0.2)])
def test_clamp_equals_autograd(low, high, frontend):
    model = randomise_vectors(Clamped(low, high).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=["clamp"])


def test_clamp_passes_feedback_at_its_bounds_as_autograd_does():
    """x exactly at a bound gets the feedback (both ends included), unlike hardtanh's backward."""
    model = nn.Sequential(nn.Identity()).double()
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]], dtype=torch.float64)

    class Clamp(nn.Module):
        def forward(self, v):
            return torch.clamp(v, -0.5, 0.5)

    program = fbcompile.compile(Clamp(), x)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    expected = torch.autograd.grad(torch.clamp(x.requires_grad_(), -0.5, 0.5), x, g)[0]
    assert torch.equal(program.propagate_error(x.detach(), g), expected)
    assert expected.tolist() == [[0.0, 2.0, 3.0, 4.0, 0.0]]
    del model


class RMSNorm(nn.Module):
    """Llama's RMSNorm: the variance in float32 inside a float64 model, cast back, then scaled."""

    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(width)), eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LlamaBlock(nn.Module):
    """RMSNorm, a rotary-style half rotation with cos/sin of the positions, a SiLU-gated MLP."""

    def __init__(self, width=8, hidden=12, classes=3):
        super().__init__()
        self.norm = RMSNorm(width)
        self.gate, self.up, self.down = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, classes)
        self.register_buffer("angles", torch.rand(width // 2) * 3)

    def forward(self, x):
        h = self.norm(x)
        cos, sin = torch.cos(self.angles), torch.sin(self.angles)
        first, second = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        h = torch.cat([first * cos - second * sin, second * cos + first * sin], -1)
        h = h + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_llama_block_with_float32_casts_inside_equals_autograd(frontend):
    torch.manual_seed(1)
    model = randomise_vectors(LlamaBlock().double())
    x = torch.randn(4, 8, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert {"cast", "rsqrt"} <= {program.rules[n].op for n in program.rules}
    # the model rounds to float32 inside: autograd and the rules round the same values, and equal
    # each other far below float32's resolution
    assert_gradients_match(model, x, program, 1e-12)


def test_a_llama_block_meets_the_small_beta_limit():
    torch.manual_seed(2)
    assert dtp_angle(randomise_vectors(LlamaBlock()), torch.randn(4, 8, dtype=torch.float64)) < 0.01


class Promoting(nn.Module):
    """A float32 branch added to a float64 one: the sum is float64 and the float32 operand's
    feedback must be cast back to float32 before its Linear (else a dtype mismatch, or float64
    feedback through a float32 layer)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5).float()
        self.b = nn.Linear(4, 5).double()
        self.c = nn.Linear(5, 3).double()

    def forward(self, x):
        narrow = self.a(x.to(torch.float32))
        return self.c(torch.tanh(narrow + self.b(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_feedback_of_a_promoted_operand_comes_back_in_its_dtype(frontend):
    model = Promoting()
    x = torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    error = torch.randn(3, 3, dtype=torch.float64)
    ref_input, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    assert ours.dtype == torch.float64 and relative_error(ours, ref_input[0]) < 1e-6
    assert model.a.weight.grad.dtype == torch.float32
    assert relative_error(model.a.weight.grad, ref_params["a.weight"]) < 1e-6
    assert relative_error(model.b.weight.grad, ref_params["b.weight"]) < 1e-12


class Casts(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)
        self.spelling = spelling

    def forward(self, x):
        h = self.a(x)
        if self.spelling == "to(dtype)":
            h = h.to(torch.float32).to(torch.float64)
        elif self.spelling == "to(x.dtype)":
            h = h.to(torch.float32).to(x.dtype)
        else:
            h = h.to(torch.float32).type_as(x)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("spelling", ["to(dtype)", "to(x.dtype)", "type_as"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_dtype_casts_equal_autograd(spelling, frontend):
    model = randomise_vectors(Casts(spelling).double())
    x = torch.randn(4, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert "cast" in {program.rules[n].op for n in program.rules}
    assert_gradients_match(model, x, program, 1e-12)


class DeviceMove(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x).to("cpu")


def test_a_device_move_in_python_is_refused_by_name():
    problems = fbcompile.coverage(DeviceMove(), torch.randn(2, 4), frontend="fx")
    assert len(problems) == 1 and "dtype conversion only" in problems[0].reason and problems[0].node == "to"


class IntegerBranch(nn.Module):
    """A value cast to integers carries no feedback (autograd has none either), its other use does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = 3.0 * self.a(x)
        return self.b(torch.tanh(h) + h.to(torch.int64).to(h.dtype))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_integer_cast_carries_no_feedback_as_in_autograd(frontend):
    model = randomise_vectors(IntegerBranch().double())
    x = torch.randn(4, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert_gradients_match(model, x, program, 1e-12)


class Norms(nn.Module):
    def __init__(self, spelling, p, dim, keepdim):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6 if keepdim or dim is None else 2, 3)
        self.spelling, self.p, self.dim, self.keepdim = spelling, p, dim, keepdim

    def forward(self, x):
        h = self.a(x).view(-1, 2, 3)
        if self.spelling == "vector_norm":
            n = torch.linalg.vector_norm(h, self.p, self.dim, self.keepdim)
        else:
            n = torch.norm(h, self.p, self.dim, self.keepdim)
        if self.keepdim:
            n = (h * n).flatten(1)        # GRN-style: the norm scales the value it was taken of
        elif self.dim is None:
            n = h.flatten(1) * n
        return self.b(n)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("spelling,p,dim,keepdim", [("vector_norm", 2, -1, False), ("vector_norm", 1, -1, False),
                                                    ("vector_norm", 2, (1, 2), True), ("norm", 2, -1, False),
                                                    ("norm", "fro", (1, 2), True), ("norm", 1, 2, False)])
def test_vector_norms_equal_autograd(spelling, p, dim, keepdim, frontend):
    model = randomise_vectors(Norms(spelling, p, dim, keepdim).double())
    assert_matches_autograd(model, torch.randn(3, 4, dtype=torch.float64), frontend)


def test_a_zero_norm_gets_zero_feedback_as_in_autograd():
    class Norm(nn.Module):
        def forward(self, v):
            return torch.linalg.vector_norm(v, dim=1)

    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 2.0]], dtype=torch.float64)
    program = fbcompile.compile(Norm(), x)
    g = torch.tensor([1.5, -2.0], dtype=torch.float64)
    expected = torch.autograd.grad(torch.linalg.vector_norm(x.requires_grad_(), dim=1), x, g)[0]
    assert torch.equal(program.propagate_error(x.detach(), g), expected)


class ShapedLike(nn.Module):
    def __init__(self, method):
        super().__init__()
        self.a, self.b, self.method = nn.Linear(6, 6), nn.Linear(6, 3), method

    def forward(self, x):
        grid = self.a(x).view(-1, 2, 3)
        flat = torch.tanh(grid) + 1.0
        return self.b(getattr(flat, self.method)(x) * torch.sigmoid(x))


@pytest.mark.parametrize("method", ["reshape_as", "view_as"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_reshape_as_and_view_as_equal_autograd(method, frontend):
    model = randomise_vectors(ShapedLike(method).double())
    assert_matches_autograd(model, torch.randn(4, 6, dtype=torch.float64), frontend)


class WeightNormed(nn.Module):
    """wav2vec2's positional conv: a weight-normalised conv1d (parametrizations.weight_norm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(3, 4, 3, padding=1), dim=2)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_weight_normalised_conv_equals_autograd_and_meets_the_small_beta_limit(frontend):
    model = randomise_vectors(WeightNormed().double())
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    program = assert_matches_autograd(model, x, frontend, ops=["weight_norm"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())   # v and g too
    del program
    assert dtp_angle(model, x) < 0.01
