"""Arithmetic and reductions.

- add(x, y, alpha) / sub(x, y, alpha): J = [I, +-alpha I] (broadcast dims summed back).
  T: each active operand receives g (times +-alpha), summed over broadcast dimensions: the skip
  connection rule g*(x) + x of paper 002 eq. 39 falls out of this plus fan-out summation.
  P: J^+ of [I, a I] is [I; a I] / (1 + a^2) for two activations; with a constant operand J = I;
  broadcast operands by the Woodbury identity (:func:`add_pinv_feedback`). I: one full-size operand.
- mul / div by a constant c (a number or a non-active tensor): T: g * c; P: g / c, or
  S^T (c g) / S^T (c^2) when c broadcasts the operand (:func:`scale_pinv`); I: g / c.
- mul / div of two active values (gating, SwiGLU, squeeze-excitation, layer scale): T per operand,
  g y and g x (div: g / y and -g x / y^2), summed to each operand's shape; the other operand is held
  at its forward value (:func:`product_transpose`). P and I are refused unless one factor is
  constant for the input. A complex product (a spectral filter) reads the conjugate of the other
  factor, in autograd's convention (:mod:`fbcompile.rules.fourier`); a real operand of it gets the
  real part.
- neg: T = P = I: -g.
- mean / sum over dims: :mod:`fbcompile.rules.reduce`.

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
from fbcompile.trace import AttrRef, info


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


def sum_to(g, shape):
    """Sum ``g`` over the dimensions broadcasting added to reach ``shape`` (autograd's sum_to)."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)


def _param_grads(ctx, g):
    """A parameter operand of add/sub (e.g. a position embedding) gets g (or -alpha g) summed; a
    real one added to complex values gets the real part."""
    grads = {}
    for name, sign in (("input", 1), ("other", _other_sign(ctx))):
        if name in ctx.op_call.params:
            grads[name] = ctx.call(sum_to, g * _conj(sign) if sign != 1 else g, ctx.shape(name))
            if _complex_output(ctx) and not _is_complex(ctx, name):
                grads[name] = ctx.call(torch.real, grads[name])
    return grads


ADD = declare_op("add", add, functions=[operator.add, torch.add], methods=[tensor_method("add")],
                 inplace=[operator.iadd, tensor_method("add_")], param_grads=_param_grads)
SUB = declare_op("sub", sub, functions=[operator.sub, torch.sub], methods=[tensor_method("sub")],
                 inplace=[operator.isub, tensor_method("sub_")], param_grads=_param_grads)


def _operands_keep_the_batch(ctx) -> bool:
    """mul/div map samples independently only when every active operand has the output's rank (an
    operand with fewer dims is broadcast along dim 0: its dim 0 is not the batch)."""
    rank = len(ctx.shape())
    return all(len(ctx.shape(name)) == rank for name, _, _ in ctx.op_call.active)


MUL = declare_op("mul", mul, functions=[operator.mul, torch.mul], methods=[tensor_method("mul")],
                 inplace=[operator.imul, tensor_method("mul_")], param_grads=lambda ctx, g: product_param_grads(ctx, g),
                 batch_local=_operands_keep_the_batch)
DIV = declare_op("div", div, functions=[operator.truediv, torch.div, torch.true_divide],
                 methods=[tensor_method("div"), tensor_method("true_divide")],
                 inplace=[operator.itruediv, tensor_method("div_")],
                 param_grads=lambda ctx, g: product_param_grads(ctx, g), batch_local=_operands_keep_the_batch)
NEG = declare_op("neg", neg, functions=[operator.neg, torch.neg], methods=[tensor_method("neg")])


def _other_sign(ctx):
    alpha = ctx.const("alpha", 1)
    return -alpha if ctx.op_call.spec is SUB else alpha


def _both_scales(ctx):
    return {"input": 1, "other": _other_sign(ctx)}


def _scaled_to(ctx, g, name, scale):
    """g (times ``scale``) summed to operand ``name``'s shape. Only its shape is read: no node at all
    when the compile-time shapes show there is nothing to sum (equal shapes without a size-1 dim,
    which alone could broadcast at another batch size), else ``ctx.saved_shape`` (no tap of the value)."""
    if not ctx.is_active(name):
        return None
    g = g * _conj(scale) if scale != 1 else g
    shape, out = tuple(ctx.shape(name)), tuple(ctx.shape())
    if shape == out and 1 not in shape:
        return g
    return ctx.call(sum_to, g, ctx.saved_shape(name))


@register_rule(ADD, conditions="T", complex_values=True)
@register_rule(SUB, conditions="T", complex_values=True)
def add_transpose(ctx, g):
    """Each active operand receives g (times its coefficient), summed to its shape."""
    return {name: _scaled_to(ctx, g, name, s) for name, s in _both_scales(ctx).items()}


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


@register_rule(ADD, conditions="P", supports=_pinv_supported)
@register_rule(SUB, conditions="P", supports=_pinv_supported)
def add_pinv(ctx, g):
    """G(g) = J^+ g of J = [S_x, a S_y] (see :func:`add_pinv_feedback`)."""
    scales = _both_scales(ctx)
    shapes = {name: ctx.saved_shape(name) if ctx.is_active(name) else None for name in scales}
    fb = ctx.call(add_pinv_feedback, g, shapes["input"], shapes["other"], scales["input"], scales["other"])
    return {name: fb[i] if shapes[name] is not None else None for i, name in enumerate(scales)}


@register_rule(ADD, conditions="I", supports=_one_active)
@register_rule(SUB, conditions="I", supports=_one_active)
def add_inverse(ctx, g):
    """G(g) = J^-1 g, the pseudo-inverse of a single full-size operand (:func:`add_pinv`)."""
    return add_pinv(ctx, g)


def _from_input(ctx, name) -> bool:
    """Whether operand ``name`` depends on a model input (a parameter path such as
    ``gamma.view(-1, 1, 1)`` is active but constant for the input)."""
    return any(arg == name and info(src).from_input for arg, _, src in ctx.op_call.active)


def product_kind(ctx) -> str:
    """"linearised" when two or more factors of a product depend on the input (the joint map is
    bilinear: its feedback holds each factor at its forward value), else "exact"."""
    return "linearised" if sum(info(src).from_input for _, _, src in ctx.op_call.active) > 1 else "exact"


def _no_single_factor(ctx):
    """Why mul/div is not a multiplication by one factor c that is constant for the input (which the
    P and I rules need): both operands depend on the input, or the divisor does. None when it is."""
    if _from_input(ctx, "input") and _from_input(ctx, "other"):
        what = "two activations"
    elif ctx.op_call.spec is DIV and _from_input(ctx, "other"):
        what = "a constant by an activation"
    else:
        return None
    return (f"condition P/I of {ctx.op_call.spec.name} of {what} is not defined here (J = [diag(y), diag(x)] "
            "has no single constant factor); only multiplication or division by a constant or by a tensor "
            "that does not depend on the input. Use condition T")


def _operand(ctx, name):
    """The forward value of mul/div operand ``name``: a saved activation, a model attribute, or a number."""
    value = ctx.op_call.args[name]
    if isinstance(value, AttrRef) or (isinstance(value, fx.Node) and value.op == "get_attr"):
        return ctx.param(name)
    return ctx.saved(name) if isinstance(value, fx.Node) else value


def _scale_of(ctx):
    """(value of the constant factor, name of the operand that depends on the input) for mul/div."""
    name = "input" if _from_input(ctx, "input") else "other"
    return _operand(ctx, "other" if name == "input" else "input"), name


def _mul_supported(ctx):
    return _rounding_refused(ctx) or _no_single_factor(ctx)


def product_feedback(g, x, y, wrt: str, divide: bool, shape, conjugate: bool = False, real: bool = False):
    """Transposed Jacobian of z = x * y (or x / y) applied to g, for operand ``wrt`` ("input" is x,
    "other" is y), summed to that operand's ``shape`` (broadcast dimensions, autograd's sum_to):

        mul: dz/dx^T g = g y,  dz/dy^T g = g x;   div: dz/dx^T g = g / y,  dz/dy^T g = -g x / y^2.

    Only the values the formula reads are passed (x is None for mul's and div's dz/dx). A complex
    product (``conjugate``) reads conj(x) and conj(y), as autograd's convention asks
    (:mod:`rules.fourier`), and a real operand of it (``real``) keeps the real part."""
    if conjugate:
        x, y = _conj(x), _conj(y)
    if wrt == "input":
        term = g / y if divide else g * y
    else:
        term = -g * x / (y * y) if divide else g * x
    return sum_to(term.real if real else term, shape)


def _conj(value):
    return value.conj() if isinstance(value, torch.Tensor) else value.conjugate() if value is not None else None


def _complex_output(ctx) -> bool:
    return ctx.dtype() is not None and ctx.dtype().is_complex


def _is_complex(ctx, name) -> bool:
    value = ctx.op_call.args[name]
    if isinstance(value, fx.Node):
        return info(value).dtype is not None and info(value).dtype.is_complex
    value = value.value if isinstance(value, AttrRef) else value
    return value.is_complex() if isinstance(value, torch.Tensor) else isinstance(value, complex)


def _operand_shape(ctx, name):
    value = ctx.op_call.args[name]
    return ctx.saved_shape(name) if isinstance(value, fx.Node) and value.op != "get_attr" else ctx.shape(name)


def _product_grads(ctx, g, names) -> dict:
    """Per operand: dz/dx reads y and x's shape, dz/dy reads x (and y for div) and y's shape."""
    divide = ctx.op_call.spec is DIV
    conjugate = _complex_output(ctx)
    grads = {}
    for name in names:
        x = _operand(ctx, "input") if name == "other" else None
        y = _operand(ctx, "other") if name == "input" or divide else None
        grads[name] = ctx.call(product_feedback, g, x, y, name, divide, _operand_shape(ctx, name), conjugate,
                               conjugate and not _is_complex(ctx, name))
    return grads


def product_param_grads(ctx, g):
    """A parameter operand of mul/div (a layer scale gamma * x) gets the same per-operand transpose."""
    return _product_grads(ctx, g, list(ctx.op_call.params))


def _rounding_refused(ctx):
    if ctx.op_call.spec is DIV and ctx.const("rounding_mode") is not None:
        return (f"div with rounding_mode={ctx.const('rounding_mode')!r} is piecewise constant: it has no "
                "useful feedback (its derivative is zero almost everywhere)")
    return None


@register_rule(MUL, conditions="T", kind=product_kind, complex_values=True)
@register_rule(DIV, conditions="T", kind=product_kind, supports=_rounding_refused, complex_values=True)
def product_transpose(ctx, g):
    """J = [diag(y) S_x, diag(x) S_y] (mul) or [diag(1/y) S_x, -diag(x/y^2) S_y] (div), S broadcasting
    an operand to the output: each active operand gets its row of J^T g (:func:`product_feedback`).
    With one active operand this is the constant-factor rule G(g) = c g; with two (gating, SwiGLU,
    squeeze-excitation) it is still exact per operand, each evaluated with the other operand at its
    forward value. That is also the target map: linear in g, so difference correction reduces to it
    and DTP's small-beta limit is backpropagation; the joint map (x, y) -> x y is bilinear, so with two
    operands that depend on the input the rule is declared "linearised" (:func:`product_kind`)."""
    return _product_grads(ctx, g, [n for n in ("input", "other") if ctx.is_active(n)])


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
    name = "input" if _from_input(ctx, "input") else "other"
    if reason is None and not _full_size(ctx, name):
        return f"a broadcast operand ({ctx.shape(name)} -> {ctx.shape()}) is not invertible; use condition P or T"
    return reason


@register_rule(MUL, conditions="P", supports=_mul_supported)
def mul_pinv(ctx, g):
    """J = diag(c) S: G(g) = S^T (c g) / S^T (c^2) (= g / c without broadcasting)."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(scale_pinv, g, factor, ctx.saved_shape(name), False)}


@register_rule(MUL, conditions="I", supports=_mul_inverse_supported)
def mul_inverse(ctx, g):
    """J = diag(c): G(g) = g / c (c must be non-zero)."""
    factor, name = _scale_of(ctx)
    return {name: ctx.call(sum_to, g / factor, ctx.saved_shape(name))}


@register_rule(DIV, conditions="P", supports=_mul_supported)
def div_pinv(ctx, g):
    """J = diag(1/c) S: G(g) = S^T (g / c) / S^T (1 / c^2) (= c g without broadcasting)."""
    return {"input": ctx.call(scale_pinv, g, _scale_of(ctx)[0], ctx.saved_shape("input"), True)}


@register_rule(DIV, conditions="I", supports=_mul_inverse_supported)
def div_inverse(ctx, g):
    """J = diag(1/c): G(g) = c g."""
    return {"input": ctx.call(sum_to, g * _scale_of(ctx)[0], ctx.saved_shape("input"))}


@register_rule(NEG, conditions="TPI", complex_values=True)
def neg_back(ctx, g):
    """J = -I: G(g) = -g."""
    return {"input": -g}
