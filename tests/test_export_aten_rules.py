"""Rules of the ATen-only ops (rules/aten_ops.py: addmm, pow with a constant exponent), reached
through the torch.export front end: the adjoint identity <J v, u> = <v, J_G u> with random float64
vectors (J v by forward-mode autograd, J_G u by the compiled error-mode feedback), and parameter
gradients equal to autograd's."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.verify.checks import relative_error

from helpers import grads_of


class Conv1DLike(nn.Module):
    """GPT-2's Conv1D (x.view(-1, n) then addmm(b, x, W)) with alpha/beta, then pow like gelu_new."""

    def __init__(self, beta=1.0, alpha=1.0, exponent=3.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.beta, self.alpha, self.exponent = beta, alpha, exponent

    def forward(self, x):
        rows = torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight, beta=self.beta, alpha=self.alpha)
        if x.shape[0] > 1:            # fx cannot trace this: frontend="auto" uses torch.export
            rows = rows + 0.1 * torch.pow(rows, self.exponent)
        return rows.view(*x.shape[:-1], 4)


@pytest.mark.parametrize("beta,alpha,exponent", [(1.0, 1.0, 3.0), (0.5, -2.0, 2.0), (2.0, 0.7, 1.5)])
def test_addmm_and_pow_adjoint_identity_and_parameter_gradients(beta, alpha, exponent):
    torch.manual_seed(0)
    model = Conv1DLike(beta, alpha, exponent)
    x = torch.rand(3, 2, 5, dtype=torch.float64) + 0.5       # positive rows for a fractional exponent
    with torch.no_grad():
        model.bias.uniform_(0.5, 1.0)
        model.weight.abs_()
    program = fbcompile.compile(model, x)
    assert program.traced.meta["fbcompile_frontend"][0] == "export"
    ops = {program.rules[n].op for n in program.rules}
    assert {"addmm", "pow"} <= ops
    v, u = torch.randn_like(x), torch.randn(3, 2, 4, dtype=torch.float64)
    _, jv = torch.func.jvp(model, (x,), (v,))
    model.zero_grad(set_to_none=True)
    jgu = program.propagate_error(x, u)
    left, right = float((jv * u).sum()), float((v * jgu).sum())
    assert abs(left - right) <= 1e-12 * max(abs(left), 1.0)
    ours = grads_of(model)
    reference = torch.autograd.grad((model(x) * u).sum(), [model.weight, model.bias])
    assert relative_error(ours["weight"], reference[0]) < 1e-12
    assert relative_error(ours["bias"], reference[1]) < 1e-12


class TensorExponent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4).double()

    def forward(self, x):
        h = torch.sigmoid(self.fc(x)) + 0.5
        return torch.pow(h, h)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_pow_of_an_activation_to_itself_gets_both_shares(frontend):
    """d(h^h)/dh = h^h (log h + 1): the base's and the exponent's share, by autograd's vjp."""
    model, x = TensorExponent(), torch.rand(2, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    u = torch.randn(2, 4, dtype=torch.float64)
    ours = program.propagate_error(x, u)
    leaf = x.clone().requires_grad_()
    reference = torch.autograd.grad((model(leaf) * u).sum(), leaf)[0]
    assert relative_error(ours, reference) < 1e-12


class ArithmeticAliases(nn.Module):
    """torch.multiply, subtract, divide and true_divide (Hugging Face ConvBERT multiplies with
    torch.multiply), out of place, with scalars and in place: ATen keeps each under its own name."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h, k = torch.tanh(self.a(x)), torch.sigmoid(self.b(x)) + 0.5
        y = torch.subtract(torch.multiply(h, k), torch.true_divide(h, k))
        y = torch.divide(y, 3.0) + torch.multiply(k, 2.0) - torch.subtract(h, 0.5)
        z = y.clone()
        z.multiply_(k)
        return z.subtract_(h).true_divide_(k)


def test_arithmetic_aliases_are_their_ops_under_export():
    torch.manual_seed(1)
    model, x = ArithmeticAliases().double(), torch.randn(3, 4, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="export")
    assert {program.rules[n].op for n in program.rules} >= {"mul", "sub", "div"}
    u = torch.randn(3, 4, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, u)
    leaf = x.clone().requires_grad_()
    reference = torch.autograd.grad((model(leaf) * u).sum(), [leaf, *model.parameters()])
    assert relative_error(ours, reference[0]) < 1e-12
    for param, expected in zip(model.parameters(), reference[1:]):
        assert relative_error(param.grad, expected) < 1e-12
