"""Elementwise activations y = sigma(x).

Each activation is one :class:`Activation` record, declared with :func:`declare_activation` right
where it is written: its forward, its branches (:class:`fbcompile.symbolic.Piece`) with the known
inverse of each branch where it is invertible, torch's fused kernel for sigma'(x) g, the
hyperparameters they read, and its spellings. sympy derives everything else
(:func:`fbcompile.symbolic.derive`); the four rules below serve every activation.

Rules (x = saved input, y = saved output, g = feedback at y):

- T, invertible (tanh, sigmoid, leaky_relu, elu, softplus; torch's softplus jumps by
  log(1 + e^-threshold) / beta where it turns linear, so with a small threshold it is not
  injective and gets the linearised rules), kind "exact":
  target G(t) = varsigma(t) = integral of sigma'(sigma^-1(t)) dt (paper 002, eq. 27) on sigma's
  range, constant beyond a finite end of it (t clamped to the range, see :func:`_target`);
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

import math
from typing import Callable, NamedTuple

import sympy
import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import OpSpec, declare_op, tensor_method
from fbcompile.registry import register_rule
from fbcompile.symbolic import Piece, derive, sigmoid, softplus, x, y

from .dense import elementwise_pinv

aten = torch.ops.aten
slope, alpha, beta, threshold = sympy.symbols("negative_slope alpha beta threshold", real=True)
lo, hi = sympy.symbols("min_val max_val", real=True)
SQRT_2_OVER_PI = sympy.sqrt(2 / sympy.pi)


class Activation(NamedTuple):
    """Everything about one elementwise activation y = sigma(x).

    ``apply``: the canonical forward (its signature is the op's); ``branches(**string constants)``:
    the :class:`Piece` s of sigma, with each branch's known inverse where sigma is invertible (the
    rule's kind follows: exact where invertible for the call's hyperparameters, else linearised);
    ``derivative(g, x, y, constants)``: sigma'(x) g with torch's fused backward kernel;
    ``constants``: the hyperparameters the branches and the kernel read; ``output_only``: the kernel
    reads y alone, so the feedback saves y only (the tensor the next op saves anyway), not also x;
    then the spellings: ``functions``, Tensor ``methods`` (names), ``inplace`` spellings (functions
    or method names) and ``modules`` (class -> binder)."""
    apply: Callable
    branches: Callable
    derivative: Callable
    constants: tuple = ()
    output_only: bool = False
    functions: tuple = ()
    methods: tuple = ()
    inplace: tuple = ()
    modules: dict | None = None


ACTIVATIONS: dict[str, Activation] = {}
_BY_OP: dict[OpSpec, Activation] = {}


def _method(spelling):
    return tensor_method(spelling) if isinstance(spelling, str) else spelling


def declare_activation(name: str, record: Activation) -> OpSpec:
    """Declare the op ``name`` with the record's spellings and register the activation rules."""
    apply = record.apply
    apply.__name__ = apply.__qualname__ = name
    spec = declare_op(name, apply, modules=record.modules or {}, functions=record.functions,
                      methods=[tensor_method(m) for m in record.methods],
                      inplace=[_method(s) for s in record.inplace])
    ACTIVATIONS[name] = _BY_OP[spec] = record
    affine = any(p.inverse is None for p in record.branches())   # affine target maps
    register_rule(spec, conditions="T", kind=_kind_T, target=_target, affine=affine)(transpose)
    register_rule(spec, conditions="T", kind="surrogate", target=_hadamard_target, variant="hadamard")(hadamard)
    register_rule(spec, conditions="P", kind=_kind_T, target=_inverse_target, affine=affine)(pinv)
    register_rule(spec, conditions="I", kind="exact", target=_inverse_target, supports=_requires_invertible)(inverse)
    return spec


def _no_arguments(m):
    return {}


def _inplace_only(m):
    return {"inplace": m.inplace}


# -- the rules (x = saved input, y = saved output, g = feedback at y) ----------------------------
def derived(ctx):
    """The sympy-derived functions for this call's activation and hyperparameters."""
    record = _BY_OP[ctx.op_call.spec]
    consts = _consts(ctx)
    numeric = {k: v for k, v in consts.items() if not isinstance(v, str)}
    branches = record.branches(**{k: v for k, v in consts.items() if isinstance(v, str)})
    return derive(ctx.op_call.spec.name + "".join(f"_{v}" for v in consts.values() if isinstance(v, str)),
                  branches, **numeric)


def _consts(ctx) -> dict:
    parameters = ctx.op_call.spec.signature.parameters
    return {n: ctx.const(n, parameters[n].default) for n in _BY_OP[ctx.op_call.spec].constants}


def _fused_error(ctx, g):
    record = _BY_OP[ctx.op_call.spec]
    x_ = None if record.output_only else ctx.saved("input")
    return ctx.call(record.derivative, g, x_, ctx.saved("output"), _consts(ctx))


def _local_slope(ctx):
    """sigma'(x) as a tensor (the fused kernel applied to ones)."""
    return _fused_error(ctx, torch.ones_like(ctx.saved("output")))


def _invertible(ctx) -> bool:
    return derived(ctx).inverse is not None


def _kind_T(ctx):
    return "exact" if _invertible(ctx) else "linearised"


def output_range(ctx) -> tuple:
    """(sigma(-inf), sigma(+inf)) of an increasing activation for this call's hyperparameters: the
    closure of its range, each end None where it is infinite (sigmoid (0, 1), tanh (-1, 1),
    elu (-alpha, None), softplus (0, None), leaky_relu (None, None))."""
    record = _BY_OP[ctx.op_call.spec]
    consts = {k: v for k, v in _consts(ctx).items() if not isinstance(v, str)}
    key = (ctx.op_call.spec.name, tuple(sorted(consts.items())))
    if key not in _RANGES:
        ends = record.apply(torch.tensor([-math.inf, math.inf], dtype=torch.float64), **consts).tolist()
        _RANGES[key] = tuple(None if math.isinf(e) else e for e in ends)
    return _RANGES[key]


_RANGES: dict = {}


def clamp_to_range(t, lo, hi):
    """t clamped to [lo, hi] (None: that side unbounded); the identity, with slope 1, inside."""
    return torch.clamp(t, lo, hi)


def _target(ctx, t):
    """Invertible: G(t) = varsigma(clamp(t, sigma(-inf), sigma(+inf))) (sigma's own kernel where
    varsigma is sigma). varsigma' = sigma'(sigma^-1) exists only on sigma's range and tends to 0 at
    a finite end of it (sigmoid, tanh, elu, softplus), so varsigma continues as a constant outside:
    G stays continuous and non-decreasing, and its Jacobian at the operating point t = y (inside the
    range) is unchanged. varsigma's own formula outside the range is not a target map: sigmoid's
    y^2/2 - y^3/3 and tanh's y - y^3/3 turn cubic and decreasing, elu's and softplus's decrease, so
    one target delta of 10 at a sigmoid gate becomes ~300 and chained gates overflow (issue 11:
    efficientnet_b0's squeeze-excitation gates). Otherwise the linearisation
    G(t) = x + sigma'(x) (t - y)."""
    if not _invertible(ctx):
        return {"input": ctx.saved("input") + _local_slope(ctx) * (t - ctx.saved("output"))}
    functions = derived(ctx)
    if functions.varsigma_is_forward:
        return {"input": ctx.call(_BY_OP[ctx.op_call.spec].functions[0], t, **_consts(ctx))}
    lo, hi = output_range(ctx)
    if lo is not None or hi is not None:
        t = ctx.call(clamp_to_range, t, lo, hi)
    return {"input": ctx.call(functions.varsigma, t)}


def transpose(ctx, g):
    """J_G g = sigma'(x) g (diagonal, so the transpose of J_F)."""
    return {"input": _fused_error(ctx, g)}


def _hadamard_target(ctx, t):
    """G(t) = sigma(sigma'(x) * t), paper 002 eq. 29."""
    return {"input": ctx.call(derived(ctx).forward, _local_slope(ctx) * t)}


def hadamard(ctx, g):
    """J_G g = sigma'(sigma'(x) y) sigma'(x) g, the Jacobian of eq. 29's G at t = y."""
    slope_ = _local_slope(ctx)
    outer = ctx.call(derived(ctx).derivative, slope_ * ctx.saved("output"))
    return {"input": outer * slope_ * g}


def _inverse_target(ctx, t):
    if _invertible(ctx):
        return {"input": ctx.call(derived(ctx).inverse, t)}
    x_, y_ = ctx.saved("input"), ctx.saved("output")
    return {"input": x_ + ctx.call(elementwise_pinv, _local_slope(ctx)) * (t - y_)}


def pinv(ctx, g):
    """J_G g = g / sigma'(x) (the elementwise pseudo-inverse of the diagonal Jacobian)."""
    return {"input": g * ctx.call(elementwise_pinv, _local_slope(ctx))}


def inverse(ctx, g):
    """J_G g = g / sigma'(x), the inverse of the diagonal Jacobian (invertible activations only)."""
    return pinv(ctx, g)


def _requires_invertible(ctx):
    if not _invertible(ctx):
        return (f"{ctx.op_call.spec.name} is not invertible, so condition I has no rule for it; "
                "use an invertible activation (tanh, sigmoid, leaky_relu, elu, softplus) or condition P")
    return None


# -- the activations --------------------------------------------------------------------------------
def tanh_grad(g, x_, y_, c):
    return aten.tanh_backward(g, y_)


TANH = declare_activation("tanh", Activation(
    lambda input: torch.tanh(input),
    lambda: (Piece(sympy.tanh(x), sympy.true, sympy.atanh(y)),),
    tanh_grad, output_only=True, functions=(torch.tanh,), methods=("tanh",), inplace=(torch.tanh_, "tanh_"),
    modules={nn.Tanh: _no_arguments}))


def sigmoid_grad(g, x_, y_, c):
    return aten.sigmoid_backward(g, y_)


SIGMOID = declare_activation("sigmoid", Activation(
    lambda input: torch.sigmoid(input),
    lambda: (Piece(1 / (1 + sympy.exp(-x)), sympy.true, sympy.log(y / (1 - y))),),
    sigmoid_grad, output_only=True, functions=(torch.sigmoid,), methods=("sigmoid",),
    inplace=(torch.sigmoid_, "sigmoid_"), modules={nn.Sigmoid: _no_arguments}))


def leaky_relu_grad(g, x_, y_, c):
    return aten.leaky_relu_backward(g, x_, c["negative_slope"], False)


LEAKY_RELU = declare_activation("leaky_relu", Activation(
    lambda input, negative_slope=0.01, inplace=False: F.leaky_relu(input, negative_slope),
    lambda: (Piece(x, x > 0, y, 0), Piece(slope * x, sympy.true, y / slope, increasing=slope > 0)),
    leaky_relu_grad, ("negative_slope",), functions=(F.leaky_relu,), inplace=(F.leaky_relu_,),
    modules={nn.LeakyReLU: lambda m: {"negative_slope": m.negative_slope, "inplace": m.inplace}}))


def elu_grad(g, x_, y_, c):
    return aten.elu_backward(g, c["alpha"], 1.0, 1.0, False, x_)


ELU = declare_activation("elu", Activation(
    lambda input, alpha=1.0, inplace=False: F.elu(input, alpha),
    lambda: (Piece(x, x > 0, y, 0), Piece(alpha * (sympy.exp(x) - 1), sympy.true, sympy.log(1 + y / alpha),
                                          increasing=alpha > 0)),
    elu_grad, ("alpha",), functions=(F.elu,), inplace=(F.elu_,),
    modules={nn.ELU: lambda m: {"alpha": m.alpha, "inplace": m.inplace}}))


def softplus_grad(g, x_, y_, c):
    return aten.softplus_backward(g, x_, c["beta"], c["threshold"])


SOFTPLUS = declare_activation("softplus", Activation(
    lambda input, beta=1.0, threshold=20.0: F.softplus(input, beta, threshold),
    lambda: (Piece(x, beta * x > threshold, y, threshold / beta, increasing=beta > 0),
             Piece(sympy.log(1 + sympy.exp(beta * x)) / beta, sympy.true, sympy.log(sympy.exp(beta * y) - 1) / beta)),
    softplus_grad, ("beta", "threshold"), functions=(F.softplus,),
    modules={nn.Softplus: lambda m: {"beta": m.beta, "threshold": m.threshold}}))


def relu_grad(g, x_, y_, c):
    return aten.threshold_backward(g, y_, 0)


RELU = declare_activation("relu", Activation(
    lambda input, inplace=False: torch.relu(input),
    lambda: (Piece(x, x > 0), Piece(sympy.Integer(0))),
    relu_grad, output_only=True, functions=(torch.relu, F.relu), methods=("relu",),
    inplace=(torch.relu_, F.relu_, "relu_"), modules={nn.ReLU: _inplace_only}))


def _gelu_pieces(approximate="none"):
    if approximate == "tanh":
        return (Piece(x * (1 + sympy.tanh(SQRT_2_OVER_PI * (x + sympy.Rational(44715, 10 ** 6) * x ** 3))) / 2),)
    return (Piece(x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2),)


def gelu_grad(g, x_, y_, c):
    return aten.gelu_backward(g, x_, approximate=c["approximate"])


GELU = declare_activation("gelu", Activation(
    lambda input, approximate="none": F.gelu(input, approximate=approximate), _gelu_pieces,
    gelu_grad, ("approximate",), functions=(F.gelu,), modules={nn.GELU: lambda m: {"approximate": m.approximate}}))


def silu_grad(g, x_, y_, c):
    # sigma'(x) = s (1 + x (1 - s)), s = sigmoid(x); written out because aten.silu_backward has
    # no derivative, and verification differentiates feedback maps (vjp of G)
    s = torch.sigmoid(x_)
    return g * (s * (1 + x_ * (1 - s)))


SILU = declare_activation("silu", Activation(
    lambda input, inplace=False: F.silu(input), lambda: (Piece(x * sigmoid(x)),),
    silu_grad, functions=(F.silu,), modules={nn.SiLU: _inplace_only}))


def hardtanh_grad(g, x_, y_, c):
    return aten.hardtanh_backward(g, x_, c["min_val"], c["max_val"])


HARDTANH = declare_activation("hardtanh", Activation(
    lambda input, min_val=-1.0, max_val=1.0, inplace=False: F.hardtanh(input, min_val, max_val),
    lambda: (Piece(lo, x <= lo), Piece(hi, x >= hi), Piece(x)),
    hardtanh_grad, ("min_val", "max_val"), functions=(F.hardtanh,), inplace=(F.hardtanh_,),
    modules={nn.Hardtanh: lambda m: {"min_val": m.min_val, "max_val": m.max_val, "inplace": m.inplace}}))


# torch's derivative conventions at the kinks (hardtanh_backward, hardswish_backward,
# hardsigmoid_backward): relu6' = 0 at 0 and 6, hardswish' = 0 at -3 and 1 at 3, hardsigmoid' = 0
# at +-3; each branch owns the bound its condition includes, which gives exactly these
def relu6_grad(g, x_, y_, c):
    return aten.hardtanh_backward(g, x_, 0.0, 6.0)


RELU6 = declare_activation("relu6", Activation(
    lambda input, inplace=False: F.relu6(input),
    lambda: (Piece(sympy.Integer(6), x >= 6), Piece(x, x > 0), Piece(sympy.Integer(0))),
    relu6_grad, functions=(F.relu6,), modules={nn.ReLU6: _inplace_only}))


def hardswish_grad(g, x_, y_, c):
    return aten.hardswish_backward(g, x_)


HARDSWISH = declare_activation("hardswish", Activation(
    lambda input, inplace=False: F.hardswish(input),
    lambda: (Piece(x, x >= 3), Piece(x * (x + 3) / 6, x > -3), Piece(sympy.Integer(0))),
    hardswish_grad, functions=(F.hardswish,), modules={nn.Hardswish: _inplace_only}))


def hardsigmoid_grad(g, x_, y_, c):
    # aten.hardsigmoid_backward has no derivative: its slope at g = 1 times g (the very numbers
    # autograd uses; its 1/6 is a float32 constant even in float64)
    return g * aten.hardsigmoid_backward(torch.ones_like(x_), x_)


HARDSIGMOID = declare_activation("hardsigmoid", Activation(
    lambda input, inplace=False: F.hardsigmoid(input),
    lambda: (Piece(sympy.Integer(1), x >= 3), Piece(x / 6 + sympy.Rational(1, 2), x > -3), Piece(sympy.Integer(0))),
    hardsigmoid_grad, functions=(F.hardsigmoid,), modules={nn.Hardsigmoid: _inplace_only}))


def mish_grad(g, x_, y_, c):
    # mish'(x) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2), sp = softplus(x), written out as
    # aten.mish_backward's kernel computes it (it has no derivative and no vmap batching rule)
    t = torch.tanh(F.softplus(x_))
    return g * (t + x_ * torch.sigmoid(x_) * (1 - t * t))


MISH = declare_activation("mish", Activation(
    lambda input, inplace=False: F.mish(input), lambda: (Piece(x * sympy.tanh(softplus(x))),),
    mish_grad, functions=(F.mish,), modules={nn.Mish: _inplace_only}))


KERNELS = {name: record.derivative for name, record in ACTIVATIONS.items()}   # name -> sigma'(x) g
