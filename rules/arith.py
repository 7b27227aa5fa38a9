"""Arithmetic and reductions.

- add(x, y, alpha) / sub(x, y, alpha): J = [I, +-alpha I] (broadcast dims summed back).
  T: each active operand receives g (times +-alpha), summed over broadcast dimensions: the skip
  connection rule g*(x) + x of paper 002 eq. 39 falls out of this plus fan-out summation.
  P: J^+ of [I, a I] is [I; a I] / (1 + a^2) for two activations; with a constant operand J = I.
- mul / div by a constant c (a number or a non-active tensor): T: g * c, P = I: g / c.
- neg: T = P = I: -g.
- mean / sum over dims (GAP, the MLP-Mixer token mean): J = (1/n) 1^T (or 1^T).
  T: g broadcast back times 1/n (or 1). P: J^+ = 1 (mean) or (1/n) 1 (sum); I only when n = 1.

An operand that is a model parameter (a learned offset like a position embedding) gets its weight
gradient g summed to its shape.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule
from fbcompile.trace import AttrRef


def add(input, other, alpha=1):
    return torch.add(input, other, alpha=alpha) if alpha != 1 else input + other


def sub(input, other, alpha=1):
    return torch.sub(input, other, alpha=alpha) if alpha != 1 else input - other


def mul(input, other):
    return input * other


def div(input, other, rounding_mode=None):
    return torch.div(input, other, rounding_mode=rounding_mode)


def neg(input):
    return -input


def mean(input, dim=None, keepdim=False, dtype=None):
    return input.mean() if dim is None else input.mean(dim, keepdim=keepdim)


def sum_(input, dim=None, keepdim=False, dtype=None):
    return input.sum() if dim is None else input.sum(dim, keepdim=keepdim)


def sum_to(g, shape):
    """Sum ``g`` over the dimensions broadcasting added to reach ``shape`` (autograd's sum_to)."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)


def _param_grads(ctx, g):
    """A parameter operand of add/sub (e.g. a position embedding) gets g (or -alpha g) summed."""
    grads = {}
    for name, sign in (("input", 1), ("other", _other_sign(ctx))):
        if name in ctx.op_call.params:
            grads[name] = ctx.call(sum_to, g * sign if sign != 1 else g, ctx.shape(name))
    return grads


ADD = declare_op("add", add, functions=[operator.add, torch.add], methods=[tensor_method("add")],
                 inplace=[operator.iadd, tensor_method("add_")], param_grads=_param_grads)
SUB = declare_op("sub", sub, functions=[operator.sub, torch.sub], methods=[tensor_method("sub")],
                 inplace=[operator.isub, tensor_method("sub_")], param_grads=_param_grads)
MUL = declare_op("mul", mul, functions=[operator.mul, torch.mul], methods=[tensor_method("mul")],
                 inplace=[operator.imul, tensor_method("mul_")])
DIV = declare_op("div", div, functions=[operator.truediv, torch.div, torch.true_divide],
                 methods=[tensor_method("div"), tensor_method("true_divide")],
                 inplace=[operator.itruediv, tensor_method("div_")])
NEG = declare_op("neg", neg, functions=[operator.neg, torch.neg], methods=[tensor_method("neg")])
MEAN = declare_op("mean", mean, functions=[torch.mean], methods=[tensor_method("mean")])
SUM = declare_op("sum", sum_, functions=[torch.sum], methods=[tensor_method("sum")])


def _other_sign(ctx):
    alpha = ctx.const("alpha", 1)
    return -alpha if ctx.op_call.spec is SUB else alpha


def _both_scales(ctx):
    return {"input": 1, "other": _other_sign(ctx)}


def _scaled_to(ctx, g, name, scale):
    if not ctx.is_active(name):
        return None
    return ctx.call(sum_to, g * scale if scale != 1 else g, ctx.saved(name).shape)


@register_rule(ADD, conditions="T")
def add_transpose(ctx, g):
    """Each active operand receives g (times its coefficient), summed to its shape."""
    return {name: _scaled_to(ctx, g, name, s) for name, s in _both_scales(ctx).items()}


register_rule(SUB, conditions="T", name="sub.add_transpose")(add_transpose)


def add_pinv(ctx, g):
    """J = [I, a I] has J^+ = [I; a I] / (1 + a^2); with one active operand J = I."""
    scales = _both_scales(ctx)
    both = ctx.is_active("input") and ctx.is_active("other")
    norm = 1 + scales["other"] ** 2 if both else 1
    return {name: _scaled_to(ctx, g, name, s / norm if both else 1 / s) for name, s in scales.items()}


def _one_active(ctx):
    if ctx.is_active("input") and ctx.is_active("other"):
        return "the sum of two activations is not invertible (J = [I, I] is not square); use condition P or T"
    return None


for _op in (ADD, SUB):
    register_rule(_op, conditions="P", name=f"{_op.name}.pinv")(add_pinv)
    register_rule(_op, conditions="I", supports=_one_active, name=f"{_op.name}.inverse")(add_pinv)


def _constant_factor(ctx):
    """The non-active operand of mul/div (a number or a tensor computed without the input)."""
    if ctx.op_call.spec is DIV:
        return "divisor" if ctx.is_active("other") else None
    active = [ctx.is_active("input"), ctx.is_active("other")]
    return None if active.count(True) == 1 else "product"


def _scale_of(ctx):
    """(value of the constant factor, name of the active operand) for mul/div."""
    name = "input" if ctx.is_active("input") else "other"
    other = "other" if name == "input" else "input"
    value = ctx.op_call.args[other]
    if isinstance(value, fx.Node):
        return (ctx.param(other) if value.op == "get_attr" else ctx.saved(other)), name
    if isinstance(value, AttrRef):
        return ctx.param(other), name
    return value, name


def _mul_supported(ctx):
    reason = _constant_factor(ctx)
    if reason is None:
        return None
    return (f"{ctx.op_call.spec.name} of two activations is not supported (only multiplication or division "
            "by a constant or by a tensor that does not depend on the input)")


@register_rule(MUL, conditions="T", supports=_mul_supported)
def mul_transpose(ctx, g):
    """J = diag(c): G(g) = c g, summed to the active operand's shape."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(sum_to, g * factor, ctx.saved(name).shape)}


@register_rule(MUL, conditions="PI", supports=_mul_supported)
def mul_inverse(ctx, g):
    """J = diag(c): G(g) = g / c (c must be non-zero; broadcast constants only)."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(sum_to, g / factor, ctx.saved(name).shape)}


@register_rule(DIV, conditions="T", supports=_mul_supported)
def div_transpose(ctx, g):
    """J = diag(1/c): G(g) = g / c."""
    return {"input": ctx.call(sum_to, g / _scale_of(ctx)[0], ctx.saved("input").shape)}


@register_rule(DIV, conditions="PI", supports=_mul_supported)
def div_inverse(ctx, g):
    """J = diag(1/c): G(g) = c g."""
    return {"input": ctx.call(sum_to, g * _scale_of(ctx)[0], ctx.saved("input").shape)}


@register_rule(NEG, conditions="TPI")
def neg_back(ctx, g):
    """J = -I: G(g) = -g."""
    return {"input": -g}


def _reduced_dims(ctx):
    dim = ctx.const("dim")
    rank = len(ctx.shape("input"))
    if dim is None:
        return tuple(range(rank))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return tuple(sorted(d % rank for d in dims))


def _count(ctx):
    shape = ctx.shape("input")
    n = 1
    for d in _reduced_dims(ctx):
        n *= shape[d]
    return n


def broadcast_back(g, input, dims, keepdim, scale):
    """g (reduced over ``dims``) expanded back to ``input``'s shape, times ``scale``."""
    if not keepdim:
        for d in dims:
            g = g.unsqueeze(d)
    return (g * scale).expand(input.shape)


def _reduction_back(ctx, g, scale):
    return {"input": ctx.call(broadcast_back, g, ctx.saved("input"), _reduced_dims(ctx),
                              ctx.const("keepdim", False), scale)}


@register_rule(MEAN, conditions="T")
def mean_transpose(ctx, g):
    """J = (1/n) 1^T: G(g) = g / n broadcast over the reduced dims (paper 002 eq. 37)."""
    return _reduction_back(ctx, g, 1.0 / _count(ctx))


@register_rule(SUM, conditions="T")
def sum_transpose(ctx, g):
    """J = 1^T: G(g) = g broadcast over the reduced dims."""
    return _reduction_back(ctx, g, 1.0)


def _single(ctx):
    return None if _count(ctx) == 1 else (f"a {ctx.op_call.spec.name} over {_count(ctx)} entries is not "
                                          "invertible (J is 1 x n); use condition P or T")


@register_rule(MEAN, conditions="P")
def mean_pinv(ctx, g):
    """J = (1/n) 1^T has J^+ = 1: G(g) = g copied over the reduced dims."""
    return _reduction_back(ctx, g, 1.0)


@register_rule(SUM, conditions="P")
def sum_pinv(ctx, g):
    """J = 1^T has J^+ = (1/n) 1: G(g) = g / n copied over the reduced dims."""
    return _reduction_back(ctx, g, 1.0 / _count(ctx))


register_rule(MEAN, conditions="I", supports=_single, name="mean.inverse")(mean_pinv)
register_rule(SUM, conditions="I", supports=_single, name="sum.inverse")(sum_pinv)
