"""Elementwise activations y = sigma(x).

Each activation is given by its branches (:class:`fbcompile.symbolic.Piece`) and, where it is
invertible, the known inverse of each branch; sympy derives everything else
(:func:`fbcompile.symbolic.derive`).

Rules (x = saved input, y = saved output, g = feedback at y):

- T, invertible (tanh, sigmoid, leaky_relu, elu, softplus; torch's softplus jumps by
  log(1 + e^-threshold) / beta where it turns linear, so with a small threshold it is not
  injective and gets the linearised rules), kind "exact":
  target G(t) = varsigma(t) = integral of sigma'(sigma^-1(t)) dt (paper 002, eq. 27);
  error J_G g = varsigma'(y) g = sigma'(x) g, computed with torch's fused backward kernel.
- T, variant "hadamard" (eq. 29), kind "surrogate": G(t) = sigma(sigma'(x) * t);
  error = sigma'(sigma'(x) y) sigma'(x) g, its Jacobian at t = y.
- Invertible means strictly increasing for the call's hyperparameters (each branch's ``increasing``
  condition): leaky_relu with negative_slope <= 0, elu with alpha <= 0 and softplus with beta < 0
  have no inverse on their range and get the linearised rules below.
- T, non-invertible (relu, gelu, silu, hardtanh, relu6, hardswish, hardsigmoid, mish), kind
  "linearised": the affine map
  G(t) = x + sigma'(x) (t - y), whose Jacobian sigma'(x) equals J_F^T at the operating point.
- P and I, invertible: G(t) = sigma^-1(t), error g / sigma'(x), kind "exact".
- P, non-invertible: G(t) = x + sigma'(x)^+ (t - y) with the elementwise pseudo-inverse
  (1/d where d != 0, else 0), kind "linearised"; I is refused (not invertible).
"""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule
from fbcompile.symbolic import Piece, derive, sigmoid, softplus, x, y

aten = torch.ops.aten
slope, alpha, beta, threshold = sympy.symbols("negative_slope alpha beta threshold", real=True)
lo, hi = sympy.symbols("min_val max_val", real=True)
SQRT_2_OVER_PI = sympy.sqrt(2 / sympy.pi)


def _gelu_pieces(approximate="none"):
    if approximate == "tanh":
        return (Piece(x * (1 + sympy.tanh(SQRT_2_OVER_PI * (x + sympy.Rational(44715, 10 ** 6) * x ** 3))) / 2),)
    return (Piece(x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2),)


def _kernels():
    """sigma'(x) * g with torch's fused backward kernel for each activation (x input, y output)."""
    def tanh_grad(g, x_, y_, c):
        return aten.tanh_backward(g, y_)

    def sigmoid_grad(g, x_, y_, c):
        return aten.sigmoid_backward(g, y_)

    def leaky_relu_grad(g, x_, y_, c):
        return aten.leaky_relu_backward(g, x_, c["negative_slope"], False)

    def elu_grad(g, x_, y_, c):
        return aten.elu_backward(g, c["alpha"], 1.0, 1.0, False, x_)

    def softplus_grad(g, x_, y_, c):
        return aten.softplus_backward(g, x_, c["beta"], c["threshold"])

    def relu_grad(g, x_, y_, c):
        return aten.threshold_backward(g, y_, 0)

    def gelu_grad(g, x_, y_, c):
        return aten.gelu_backward(g, x_, approximate=c["approximate"])

    def silu_grad(g, x_, y_, c):
        # sigma'(x) = s (1 + x (1 - s)), s = sigmoid(x); written out because aten.silu_backward has
        # no derivative, and verification differentiates feedback maps (vjp of G)
        s = torch.sigmoid(x_)
        return g * (s * (1 + x_ * (1 - s)))

    def hardtanh_grad(g, x_, y_, c):
        return aten.hardtanh_backward(g, x_, c["min_val"], c["max_val"])

    def relu6_grad(g, x_, y_, c):
        return aten.hardtanh_backward(g, x_, 0.0, 6.0)

    def hardswish_grad(g, x_, y_, c):
        return aten.hardswish_backward(g, x_)

    def hardsigmoid_grad(g, x_, y_, c):
        # aten.hardsigmoid_backward has no derivative: its slope at g = 1 times g (the very numbers
        # autograd uses; its 1/6 is a float32 constant even in float64)
        return g * aten.hardsigmoid_backward(torch.ones_like(x_), x_)

    def mish_grad(g, x_, y_, c):
        # mish'(x) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2), sp = softplus(x), written out as
        # aten.mish_backward's kernel computes it (it has no derivative and no vmap batching rule)
        t = torch.tanh(F.softplus(x_))
        return g * (t + x_ * torch.sigmoid(x_) * (1 - t * t))
    return {f.__name__[:-5]: f for f in (tanh_grad, sigmoid_grad, leaky_relu_grad, elu_grad, softplus_grad,
                                         relu_grad, gelu_grad, silu_grad, hardtanh_grad, relu6_grad,
                                         hardswish_grad, hardsigmoid_grad, mish_grad)}


KERNELS = _kernels()

# name -> (apply, branches(string constants) -> pieces, constants used)
ACTIVATIONS = {
    "tanh": (lambda input: torch.tanh(input),
             lambda: (Piece(sympy.tanh(x), sympy.true, sympy.atanh(y)),), ()),
    "sigmoid": (lambda input: torch.sigmoid(input),
                lambda: (Piece(1 / (1 + sympy.exp(-x)), sympy.true, sympy.log(y / (1 - y))),), ()),
    "leaky_relu": (lambda input, negative_slope=0.01, inplace=False: F.leaky_relu(input, negative_slope),
                   lambda: (Piece(x, x > 0, y, 0), Piece(slope * x, sympy.true, y / slope, increasing=slope > 0)),
                   ("negative_slope",)),
    "elu": (lambda input, alpha=1.0, inplace=False: F.elu(input, alpha),
            lambda: (Piece(x, x > 0, y, 0), Piece(alpha * (sympy.exp(x) - 1), sympy.true, sympy.log(1 + y / alpha),
                                                   increasing=alpha > 0)), ("alpha",)),
    "softplus": (lambda input, beta=1.0, threshold=20.0: F.softplus(input, beta, threshold),
                 lambda: (Piece(x, beta * x > threshold, y, threshold / beta, increasing=beta > 0),
                          Piece(sympy.log(1 + sympy.exp(beta * x)) / beta, sympy.true,
                                sympy.log(sympy.exp(beta * y) - 1) / beta)), ("beta", "threshold")),
    "relu": (lambda input, inplace=False: torch.relu(input),
             lambda: (Piece(x, x > 0), Piece(sympy.Integer(0))), ()),
    "gelu": (lambda input, approximate="none": F.gelu(input, approximate=approximate), _gelu_pieces, ("approximate",)),
    "silu": (lambda input, inplace=False: F.silu(input), lambda: (Piece(x * sigmoid(x)),), ()),
    "hardtanh": (lambda input, min_val=-1.0, max_val=1.0, inplace=False: F.hardtanh(input, min_val, max_val),
                 lambda: (Piece(lo, x <= lo), Piece(hi, x >= hi), Piece(x)), ("min_val", "max_val")),
    # torch's derivative conventions at the kinks (hardtanh_backward, hardswish_backward,
    # hardsigmoid_backward): relu6' = 0 at 0 and 6, hardswish' = 0 at -3 and 1 at 3, hardsigmoid' = 0
    # at +-3; each branch owns the bound its condition includes, which gives exactly these
    "relu6": (lambda input, inplace=False: F.relu6(input),
              lambda: (Piece(sympy.Integer(6), x >= 6), Piece(x, x > 0), Piece(sympy.Integer(0))), ()),
    "hardswish": (lambda input, inplace=False: F.hardswish(input),
                  lambda: (Piece(x, x >= 3), Piece(x * (x + 3) / 6, x > -3), Piece(sympy.Integer(0))), ()),
    "hardsigmoid": (lambda input, inplace=False: F.hardsigmoid(input),
                    lambda: (Piece(sympy.Integer(1), x >= 3), Piece(x / 6 + sympy.Rational(1, 2), x > -3),
                             Piece(sympy.Integer(0))), ()),
    "mish": (lambda input, inplace=False: F.mish(input), lambda: (Piece(x * sympy.tanh(softplus(x))),), ()),
}

_SPELLINGS = {
    "tanh": ([torch.tanh], ["tanh"], [torch.tanh_], ["tanh_"], {nn.Tanh: lambda m: {}}),
    "sigmoid": ([torch.sigmoid], ["sigmoid"], [torch.sigmoid_], ["sigmoid_"], {nn.Sigmoid: lambda m: {}}),
    "relu": ([torch.relu, F.relu], ["relu"], [torch.relu_, F.relu_], ["relu_"],
             {nn.ReLU: lambda m: {"inplace": m.inplace}}),
    "leaky_relu": ([F.leaky_relu], [], [F.leaky_relu_], [],
                   {nn.LeakyReLU: lambda m: {"negative_slope": m.negative_slope, "inplace": m.inplace}}),
    "elu": ([F.elu], [], [F.elu_], [], {nn.ELU: lambda m: {"alpha": m.alpha, "inplace": m.inplace}}),
    "softplus": ([F.softplus], [], [], [], {nn.Softplus: lambda m: {"beta": m.beta, "threshold": m.threshold}}),
    "gelu": ([F.gelu], [], [], [], {nn.GELU: lambda m: {"approximate": m.approximate}}),
    "silu": ([F.silu], [], [], [], {nn.SiLU: lambda m: {"inplace": m.inplace}}),
    "hardtanh": ([F.hardtanh], [], [F.hardtanh_], [],
                 {nn.Hardtanh: lambda m: {"min_val": m.min_val, "max_val": m.max_val, "inplace": m.inplace}}),
    "relu6": ([F.relu6], [], [], [], {nn.ReLU6: lambda m: {"inplace": m.inplace}}),
    "hardswish": ([F.hardswish], [], [], [], {nn.Hardswish: lambda m: {"inplace": m.inplace}}),
    "hardsigmoid": ([F.hardsigmoid], [], [], [], {nn.Hardsigmoid: lambda m: {"inplace": m.inplace}}),
    "mish": ([F.mish], [], [], [], {nn.Mish: lambda m: {"inplace": m.inplace}}),
}


def derived(ctx):
    """The sympy-derived functions for this call's activation and hyperparameters."""
    _, pieces, names = ACTIVATIONS[ctx.op_call.spec.name]
    consts = {n: ctx.const(n, _default(ctx, n)) for n in names}
    numeric = {k: v for k, v in consts.items() if not isinstance(v, str)}
    branches = pieces(**{k: v for k, v in consts.items() if isinstance(v, str)})
    return derive(ctx.op_call.spec.name + "".join(f"_{v}" for v in consts.values() if isinstance(v, str)),
                  branches, **numeric)


def _default(ctx, name):
    return ctx.op_call.spec.signature.parameters[name].default


def _consts(ctx) -> dict:
    return {n: ctx.const(n, _default(ctx, n)) for n in ACTIVATIONS[ctx.op_call.spec.name][2]}


# Kernels that read only the forward output: their feedback saves y alone (the same tensor the
# next op already saves), not also x, which would double the activations a program keeps.
OUTPUT_KERNELS = {"tanh", "sigmoid", "relu"}


def _fused_error(ctx, g):
    name = ctx.op_call.spec.name
    x_ = None if name in OUTPUT_KERNELS else ctx.saved("input")
    return ctx.call(KERNELS[name], g, x_, ctx.saved("output"), _consts(ctx))


def _local_slope(ctx):
    """sigma'(x) as a tensor (the fused kernel applied to ones)."""
    return _fused_error(ctx, torch.ones_like(ctx.saved("output")))


def _invertible(ctx) -> bool:
    return derived(ctx).inverse is not None


# -- condition T ------------------------------------------------------------------------------
def _varsigma(ctx, t):
    functions = derived(ctx)
    if functions.varsigma_is_forward:
        return {"input": ctx.call(_SPELLINGS[ctx.op_call.spec.name][0][0], t, **_consts(ctx))}
    return {"input": ctx.call(functions.varsigma, t)}


def _linearised_target(ctx, t):
    return {"input": ctx.saved("input") + _local_slope(ctx) * (t - ctx.saved("output"))}


def activation_transpose(ctx, g):
    """J_G g = sigma'(x) g (diagonal, so the transpose of J_F)."""
    return {"input": _fused_error(ctx, g)}


def activation_target(ctx, t):
    return _varsigma(ctx, t) if _invertible(ctx) else _linearised_target(ctx, t)


def _hadamard_target(ctx, t):
    """G(t) = sigma(sigma'(x) * t), paper 002 eq. 29."""
    return {"input": ctx.call(derived(ctx).forward, _local_slope(ctx) * t)}


def activation_hadamard(ctx, g):
    slope_ = _local_slope(ctx)
    outer = ctx.call(derived(ctx).derivative, slope_ * ctx.saved("output"))
    return {"input": outer * slope_ * g}


# -- conditions P and I -------------------------------------------------------------------------
def _elementwise_pinv(d):
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def activation_inverse(ctx, g):
    """J_G g = g / sigma'(x) (the elementwise (pseudo-)inverse of the diagonal Jacobian)."""
    return {"input": g * ctx.call(_elementwise_pinv, _local_slope(ctx))}


def activation_inverse_target(ctx, t):
    if _invertible(ctx):
        return {"input": ctx.call(derived(ctx).inverse, t)}
    x_, y_ = ctx.saved("input"), ctx.saved("output")
    return {"input": x_ + ctx.call(_elementwise_pinv, _local_slope(ctx)) * (t - y_)}


def _requires_invertible(ctx):
    if not _invertible(ctx):
        return (f"{ctx.op_call.spec.name} is not invertible, so condition I has no rule for it; "
                "use an invertible activation (tanh, sigmoid, leaky_relu, elu, softplus) or condition P")
    return None


def _kind_T(ctx):
    return "exact" if _invertible(ctx) else "linearised"


def _declare(name):
    apply = ACTIVATIONS[name][0]
    functions, methods, inplace_fns, inplace_methods, modules = _SPELLINGS[name]
    methods = [tensor_method(m) for m in methods]
    inplace = [*inplace_fns, *(tensor_method(m) for m in inplace_methods)]
    apply.__name__ = apply.__qualname__ = name
    return declare_op(name, apply, modules=modules, functions=functions, methods=methods, inplace=inplace)


for _name, (_, _pieces, _) in ACTIVATIONS.items():
    _spec = _declare(_name)
    _affine = any(p.inverse is None for p in _pieces())   # affine target maps
    register_rule(_spec, conditions="T", kind=_kind_T, target=activation_target,
                  affine=_affine, name=f"{_name}.transpose")(activation_transpose)
    register_rule(_spec, conditions="T", kind="surrogate", target=_hadamard_target, variant="hadamard",
                  name=f"{_name}.hadamard")(activation_hadamard)
    register_rule(_spec, conditions="P", kind=_kind_T, target=activation_inverse_target,
                  affine=_affine, name=f"{_name}.pinv")(activation_inverse)
    register_rule(_spec, conditions="I", kind="exact", target=activation_inverse_target,
                  supports=_requires_invertible, name=f"{_name}.inverse")(activation_inverse)
