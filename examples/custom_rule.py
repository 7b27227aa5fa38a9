"""Teach fbcompile two new ops from user code, without touching the package.

1. ``torch.cumsum(x, dim)``, a function spelling with a hyperparameter. It is linear: J_F is the
   lower-triangular ones matrix along ``dim``, so J_F^T is the upper-triangular one and
   G(g) = reverse cumulative sum of g along ``dim``: flip(cumsum(flip(g))).
2. ``ScaledSoftsign``, a module of our own: y = s x / (1 + |x|). It is invertible, so its exact
   T rule has J_G = diag(sigma'(x)) and the target map varsigma(y) = integral of
   sigma'(sigma^-1(y)) dy (paper 002, eq. 27), derived here by fbcompile.symbolic from the branches
   and their known inverses, x = y / (s - y) for y > 0 and x = y / (s + y) below.

Run it: ``python examples/custom_rule.py``. Registration is global; ``replace=True`` makes
re-running (or importing it twice) safe.
"""
from __future__ import annotations

import sympy
import torch
from torch import nn

import fbcompile
from fbcompile.symbolic import Piece, derive, x, y
from fbcompile.verify.checks import adjoint_check, autograd_gradients, relative_error


# -- 1. cumsum -------------------------------------------------------------------------------------
def cumsum(input, dim, dtype=None):
    """The canonical forward; its signature is how torch.cumsum(x, dim) calls are bound."""
    return torch.cumsum(input, dim)


CUMSUM = fbcompile.declare_op("cumsum", cumsum, functions=[torch.cumsum], methods=[torch.Tensor.cumsum],
                              batch_local=lambda ctx: ctx.const("dim") % len(ctx.shape()) != 0, replace=True)


@fbcompile.register_rule(CUMSUM, conditions="T", kind="exact", replace=True)
def cumsum_transpose(ctx, g):
    """G(g) = J^T g: the cumulative sum from the end, flip(cumsum(flip(g, dim), dim), dim)."""
    dim = ctx.const("dim")
    return {"input": g.flip(dim).cumsum(dim).flip(dim)}


# -- 2. a module of our own: scaled softsign -------------------------------------------------------
class ScaledSoftsign(nn.Module):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.scale = scale

    def forward(self, input):
        return self.scale * input / (1 + input.abs())


def scaled_softsign(input, scale=2.0):
    return scale * input / (1 + input.abs())


SOFTSIGN = fbcompile.declare_op("scaled_softsign", scaled_softsign,
                                modules={ScaledSoftsign: lambda m: {"scale": m.scale}}, replace=True)
s = sympy.Symbol("scale", real=True)
BRANCHES = (Piece(s * x / (1 + x), x > 0, y / (s - y), 0), Piece(s * x / (1 - x), sympy.true, y / (s + y)))


def derived(ctx):
    """sigma', sigma^-1 and varsigma for this call's scale (sympy, cached per scale)."""
    return derive("scaled_softsign", BRANCHES, scale=ctx.const("scale", 2.0))


def softsign_varsigma(ctx, t):
    """Target map G(t) = varsigma(t)."""
    return {"input": ctx.call(derived(ctx).varsigma, t)}


@fbcompile.register_rule(SOFTSIGN, conditions="T", kind="exact", target=softsign_varsigma, replace=True)
def softsign_transpose(ctx, g):
    """J_G g = sigma'(x) g = s g / (1 + |x|)^2 (diagonal, so J_F^T)."""
    return {"input": g * ctx.const("scale", 2.0) / (1 + ctx.saved("input").abs()) ** 2}


# -- a model using both ------------------------------------------------------------------------------
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), ScaledSoftsign(1.5), nn.Linear(8, 3)

    def forward(self, inputs):
        return self.fc2(torch.cumsum(self.act(self.fc1(inputs)), dim=1))


def main() -> fbcompile.VerifyReport:
    torch.manual_seed(0)
    model = Model().double()
    inputs = torch.randn(4, 6, dtype=torch.float64)
    assert fbcompile.coverage(model, inputs) == [], "both new ops are covered"
    program = fbcompile.compile(model, inputs)
    print(program.explain())
    report = fbcompile.verify(program, inputs)
    print(report)
    assert report.ok(1e-10), report.failures(1e-10)
    for node in ("act", "cumsum"):
        assert adjoint_check(program, node, inputs) < 1e-10

    error = torch.randn(4, 3, dtype=torch.float64)
    ref_inputs, ref_params = autograd_gradients(model, inputs, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(inputs, error)
    worst = max(relative_error(p.grad, ref_params[n]) for n, p in model.named_parameters())
    print(f"propagate_error vs autograd: input rel. error {relative_error(ours, ref_inputs[0]):.1e}, "
          f"worst parameter rel. error {worst:.1e}")
    return report


if __name__ == "__main__":
    main()
