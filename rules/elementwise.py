"""Elementwise math ops y = f(x) that are not activations: exp, log, sqrt, rsqrt, reciprocal, abs,
sin, cos, log1p, expm1, erf, the piecewise constant round, floor, ceil, trunc and sign, and clamp
(also ``clamp_min`` / ``clamp_max``; bounds that are tensors get autograd's vjp). Llama's and T5's
RMSNorm is ``x * rsqrt(mean(x^2) + eps)``; rotary embeddings and gates use the others. Also dtype
casts and ``detach``.

Each op's Jacobian is diagonal, J_F = diag(f'(x)), so J_F^T = J_F and the T rule is

    J_G g = f'(x) g,

written as autograd's own derivative formula (x = saved input, y = saved output), so error mode
gives autograd's gradient:

    exp: g y            log: g / x              sqrt: g / (2 y)         rsqrt: -1/2 g y^3
    reciprocal: -g y^2  abs: g sgn(x)           sin: g cos(x)           cos: -g sin(x)
    log1p: g / (x + 1)  expm1: g (y + 1)        erf: 2/sqrt(pi) exp(-x^2) g
    round, floor, ceil, trunc, sign: 0 (piecewise constant; a straight-through estimator
    ``x + (round(x) - x).detach()`` gets its gradient from the identity path)
    clamp(min, max): g where min <= x <= max, else 0 (both ends included, as autograd)

The rule is linear in g (kind "linearised"): target modes move a target by the slope at the
forward value, G(t) = x + f'(x) (t - y) as differences, which is exact at t = y and so keeps DTP's
small-beta limit. abs, sin, cos and clamp are not injective; the others are, but their inverses hold
only on their range (log's on the positives), so no P or I rule is claimed.

Dtype conversion (``x.to(dtype)``, ATen ``to`` / ``_to_copy`` / ``type_as``), the op "cast" between
floating dtypes: J is the identity up to rounding, and the rule casts the feedback back to the input's
dtype, G(g) = g.to(dtype of x), as autograd does; a cast is inverted by casting back wherever the
value is representable, so T, P and I share that rule. Casts from or to a non-floating dtype are
refused by name, and so is ``x.to(device)`` written in Python; a device argument of an ATen
conversion (torch.export) only places the value on the device it is on in a one-device program, and
the feedback is cast, not moved. (Mixed-precision models, and float64 verification of models that
compute in float32 inside: Llama's RMSNorm casts to float32 and back, GPT-Neo's attention scores.)

``detach`` passes no feedback (T), as autograd passes no gradient through it.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule
from fbcompile.trace import info

from .vjp_ops import autograd_vjp

TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


# f'(x) g, autograd's formula, from the saved value it reads (x: "input", y: "output")
def exp_derivative(g, y):
    return g * y


def log_derivative(g, x):
    return g / x


def sqrt_derivative(g, y):
    return g / (2 * y)


def rsqrt_derivative(g, y):
    return -0.5 * g * y.pow(3)


def reciprocal_derivative(g, y):
    return -g * (y * y)


def abs_derivative(g, x):
    return g * x.sgn()


def sin_derivative(g, x):
    return g * x.cos()


def cos_derivative(g, x):
    return g * -x.sin()


def log1p_derivative(g, x):
    return g / (x + 1)


def expm1_derivative(g, y):
    return g * (y + 1)


def erf_derivative(g, x):
    return TWO_OVER_SQRT_PI * torch.exp(-x.pow(2)) * g


def zero_derivative(g):
    """Piecewise constant ops (round, floor, ceil, trunc, sign): zero almost everywhere, as autograd."""
    return torch.zeros_like(g)


# op name -> (forward, its other spellings, the saved value the derivative reads, the derivative)
DERIVATIVES = {
    "exp": (torch.exp, (), "output", exp_derivative),
    "log": (torch.log, (), "input", log_derivative),
    "sqrt": (torch.sqrt, (), "output", sqrt_derivative),
    "rsqrt": (torch.rsqrt, (), "output", rsqrt_derivative),
    "reciprocal": (torch.reciprocal, (), "output", reciprocal_derivative),
    "abs": (torch.abs, (operator.abs,), "input", abs_derivative),
    "sin": (torch.sin, (), "input", sin_derivative),
    "cos": (torch.cos, (), "input", cos_derivative),
    "log1p": (torch.log1p, (), "input", log1p_derivative),
    "expm1": (torch.expm1, (), "output", expm1_derivative),
    "erf": (torch.erf, (), "input", erf_derivative),
    **{name: (getattr(torch, name), (), None, zero_derivative) for name in ("round", "floor", "ceil", "trunc", "sign")},
}
_BY_OP = {}


def diagonal(ctx, g):
    """J_G g = f'(x) g (J_F is diagonal, so J_F^T = J_F), autograd's formula for f'."""
    reads, derivative = _BY_OP[ctx.op_call.spec]
    return {"input": ctx.call(derivative, g) if reads is None else ctx.call(derivative, g, ctx.saved(reads))}


def _declare(name: str, forward, spellings: tuple, reads: str, derivative):
    def apply(input):
        return forward(input)
    apply.__name__ = apply.__qualname__ = name
    spec = declare_op(name, apply, functions=[forward, *spellings], methods=[tensor_method(name)],
                      inplace=[tensor_method(f"{name}_")])
    _BY_OP[spec] = (reads, derivative)
    # |z|'s derivative g sgn(z) is autograd's for a complex z too (sgn(z) = z / |z|); the others' are not
    register_rule(spec, conditions="T", kind="linearised", complex_values=derivative is abs_derivative)(diagonal)
    return spec


ELEMENTWISE = {name: _declare(name, *record) for name, record in DERIVATIVES.items()}


# -- clamp ------------------------------------------------------------------------------------------------
def clamp(input, min=None, max=None):
    return torch.clamp(input, min, max)


def clamp_min(input, min):
    return torch.clamp_min(input, min)


def clamp_max(input, max):
    return torch.clamp_max(input, max)


CLAMPS = (declare_op("clamp", clamp, functions=[torch.clamp, torch.clip], methods=[tensor_method("clamp"),
                     tensor_method("clip")], inplace=[tensor_method("clamp_"), tensor_method("clip_")]),
          declare_op("clamp_min", clamp_min, functions=[torch.clamp_min], methods=[tensor_method("clamp_min")],
                     inplace=[tensor_method("clamp_min_")]),
          declare_op("clamp_max", clamp_max, functions=[torch.clamp_max], methods=[tensor_method("clamp_max")],
                     inplace=[tensor_method("clamp_max_")]))


def clamp_derivative(g, x, low, high):
    """g where low <= x <= high (ends included, as autograd's clamp backward), else 0."""
    inside = torch.ones_like(x, dtype=torch.bool)
    if low is not None:
        inside = inside & (x >= low)
    if high is not None:
        inside = inside & (x <= high)
    return torch.where(inside, g, g.new_zeros(()))


def _number_bounds(ctx) -> bool:
    return all(isinstance(ctx.op_call.args.get(name), (int, float, type(None))) for name in ("min", "max"))


def clamp_back(ctx, g):
    """J_G g = g where min <= x <= max, else 0. With tensor bounds (an activation, a parameter or a
    buffer), autograd's vjp, which also gives the bounds their share: g where x is below min (above
    max), as autograd splits it."""
    if not _number_bounds(ctx):
        return autograd_vjp(ctx, g)
    return {"input": ctx.call(clamp_derivative, g, ctx.saved("input"), ctx.const("min"), ctx.const("max"))}


for _op in CLAMPS:
    register_rule(_op, conditions="T", kind="linearised")(clamp_back)


# -- dtype conversion -------------------------------------------------------------------------------------
def cast(input, dtype):
    """``input.to(dtype)``; ``dtype`` may also be a tensor whose dtype to take (``type_as``)."""
    return input.to(dtype)


CAST = declare_op("cast", cast, methods=[tensor_method("to"), tensor_method("type_as")], shape_only=("dtype",))


def _names_a_dtype(value) -> bool:
    """A dtype constant, ``v.dtype`` read in the graph, or a tensor whose dtype is taken."""
    if isinstance(value, torch.dtype):
        return True
    if isinstance(value, fx.Node):
        reads_dtype = value.op == "call_function" and value.target is getattr and value.args[1:] == ("dtype",)
        return reads_dtype or info(value).dtype is not None
    return False


def _floating_cast(ctx):
    dtype = ctx.op_call.args.get("dtype")
    source, result = info(ctx.op_call.args["input"]).dtype, info(ctx.node).dtype
    if not _names_a_dtype(dtype):
        return (f"{ctx.name}: .to({dtype!r}) is supported as a dtype conversion only (a device move inside the "
                "model has no feedback rule)")
    if not (source is not None and source.is_floating_point and result is not None and result.is_floating_point):
        return (f"{ctx.name}: a conversion from {source} to {result} has no feedback rule (only conversions "
                "between floating dtypes carry feedback)")
    return None


def cast_back(g, dtype):
    return g.to(dtype)


@register_rule(CAST, conditions="TPI", kind="exact", supports=_floating_cast)
def uncast(ctx, g):
    """G(g) = g cast back to the input's dtype (J is the identity up to rounding); a tensor whose
    dtype was taken (``type_as``) is read for its dtype only (``shape_only``) and gets none."""
    return {"input": ctx.call(cast_back, g, info(ctx.op_call.args["input"]).dtype)}


# -- stop-gradient ------------------------------------------------------------------------------------------
def detach(input):
    return input.detach()


DETACH = declare_op("detach", detach, functions=[torch.detach], methods=[tensor_method("detach")])


@register_rule(DETACH, conditions="T")
def stop(ctx, g):
    """No feedback: ``x.detach()`` stops the gradient (a straight-through estimator's
    ``x + (q - x).detach()``, a target network's features), as in autograd."""
    return {"input": None}
