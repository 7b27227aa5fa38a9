"""Arithmetic and reductions.

- add(x, y, alpha) / sub(x, y, alpha): J = [I, +-alpha I] (broadcast dims summed back).
  T: each active operand receives g (times +-alpha), summed over broadcast dimensions: the skip
  connection rule g*(x) + x of paper 002 eq. 39 falls out of this plus fan-out summation.
  P: J^+ of [I, a I] is [I; a I] / (1 + a^2) for two activations; with a constant operand J = I;
  broadcast operands by the Woodbury identity (:func:`add_pinv_feedback`). I: one full-size operand.
- mul / div by a constant c (a number or a non-active tensor): T: g * c; P: g / c, or
  S^T (c g) / S^T (c^2) when c broadcasts the operand (:func:`scale_pinv`); I: g / c.
- neg: T = P = I: -g.
- mean / sum over dims (GAP, the MLP-Mixer token mean): J = (1/n) 1^T (or 1^T).
  T: g broadcast back times 1/n (or 1). P: J^+ = 1 (mean) or (1/n) 1 (sum); I only when n = 1.

An operand that is a model parameter (a learned offset like a position embedding) gets its weight
gradient g summed to its shape.
"""
from __future__ import annotations

import math
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
MEAN = declare_op("mean", mean, functions=[torch.mean], methods=[tensor_method("mean")],
                  batch_local=lambda ctx: 0 not in _reduced_dims(ctx))
SUM = declare_op("sum", sum_, functions=[torch.sum], methods=[tensor_method("sum")],
                 batch_local=lambda ctx: 0 not in _reduced_dims(ctx))


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


def add_pinv_feedback(g, shape_x, shape_y, c_x, c_y):
    """J^+ g for J = [c_x S_x, c_y S_y], S broadcasting an operand to g's shape (shape None: the
    operand is not active). One operand, copied m times (S^T S = m I): S^T g / (c m). Two, with f of
    g's size and b copied m times (Woodbury with S_b^T S_b = m I, d = c_f^2 + c_b^2 m):

        fb_f = (g - c_b^2 S_b S_b^T g / d) / c_f,   fb_b = c_b S_b^T g / d.

    Both of g's size is m = 1: J^+ = [c_x; c_y] / (c_x^2 + c_y^2)."""
    n = g.numel()
    if shape_x is None or shape_y is None:
        shape, c = (shape_x, c_x) if shape_y is None else (shape_y, c_y)
        fb = sum_to(g, shape) / (c * (n // math.prod(shape)))
        return (fb, None) if shape_y is None else (None, fb)
    x_full = math.prod(shape_x) == n
    f_shape, c_f, b_shape, c_b = (shape_x, c_x, shape_y, c_y) if x_full else (shape_y, c_y, shape_x, c_x)
    d = c_f ** 2 + c_b ** 2 * (n // math.prod(b_shape))
    summed = sum_to(g, b_shape)
    fb_f = sum_to((g - (c_b ** 2 / d) * torch.broadcast_to(summed, g.shape)) / c_f, f_shape)
    fb_b = (c_b / d) * summed
    return (fb_f, fb_b) if x_full else (fb_b, fb_f)


def add_pinv(ctx, g):
    """G(g) = J^+ g of J = [S_x, a S_y] (see :func:`add_pinv_feedback`)."""
    scales = _both_scales(ctx)
    shapes = {name: ctx.saved(name).shape if ctx.is_active(name) else None for name in scales}
    fb = ctx.call(add_pinv_feedback, g, shapes["input"], shapes["other"], scales["input"], scales["other"])
    return {name: fb[i] if shapes[name] is not None else None for i, name in enumerate(scales)}


def _full_size(ctx, name):
    return math.prod(ctx.shape(name)) == math.prod(ctx.shape())


def _pinv_supported(ctx):
    if ctx.is_active("input") and ctx.is_active("other") and not (_full_size(ctx, "input") or _full_size(ctx, "other")):
        return (f"the pseudo-inverse of {ctx.op_call.spec.name} of two activations that are both broadcast "
                "(J does not have full row rank) is not implemented; use condition T")
    return None


def _one_active(ctx):
    if ctx.is_active("input") and ctx.is_active("other"):
        return "the sum of two activations is not invertible (J = [I, I] is not square); use condition P or T"
    name = "input" if ctx.is_active("input") else "other"
    if not _full_size(ctx, name):
        return f"a broadcast operand ({ctx.shape(name)} -> {ctx.shape()}) is not invertible; use condition P or T"
    return None


for _op in (ADD, SUB):
    register_rule(_op, conditions="P", supports=_pinv_supported, name=f"{_op.name}.pinv")(add_pinv)
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


def scale_pinv(g, factor, shape, divide: bool):
    """J^+ g for J = diag(c) S (c = factor, or 1 / factor for div; S broadcasts the active operand to
    g's shape): (S^T D^2 S)^-1 S^T D g = S^T (c g) / S^T (c^2), 0 where every copy of c is 0.
    Without broadcasting this is g / c."""
    c = 1.0 / factor if divide else factor
    numerator = sum_to(g * c, shape)
    denominator = sum_to(torch.zeros_like(g) + c * c, shape)
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator != 0, numerator / safe, torch.zeros_like(numerator))


def _mul_inverse_supported(ctx):
    reason = _mul_supported(ctx)
    name = "input" if ctx.is_active("input") else "other"
    if reason is None and not _full_size(ctx, name):
        return f"a broadcast operand ({ctx.shape(name)} -> {ctx.shape()}) is not invertible; use condition P or T"
    return reason


@register_rule(MUL, conditions="P", supports=_mul_supported)
def mul_pinv(ctx, g):
    """J = diag(c) S: G(g) = S^T (c g) / S^T (c^2) (= g / c without broadcasting)."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(scale_pinv, g, factor, ctx.saved(name).shape, False)}


@register_rule(MUL, conditions="I", supports=_mul_inverse_supported)
def mul_inverse(ctx, g):
    """J = diag(c): G(g) = g / c (c must be non-zero)."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(sum_to, g / factor, ctx.saved(name).shape)}


@register_rule(DIV, conditions="T", supports=_mul_supported)
def div_transpose(ctx, g):
    """J = diag(1/c): G(g) = g / c."""
    return {"input": ctx.call(sum_to, g / _scale_of(ctx)[0], ctx.saved("input").shape)}


@register_rule(DIV, conditions="P", supports=_mul_supported)
def div_pinv(ctx, g):
    """J = diag(1/c) S: G(g) = S^T (g / c) / S^T (1 / c^2) (= c g without broadcasting)."""
    return {"input": ctx.call(scale_pinv, g, _scale_of(ctx)[0], ctx.saved("input").shape, True)}


@register_rule(DIV, conditions="I", supports=_mul_inverse_supported)
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
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):   # torch: dim=() reduces all dims
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
