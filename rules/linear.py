"""Linear layers: y = x W^T + b, over any number of leading dimensions.

Row convention: x is (..., in), W is (out, in), J_F = W acting on each row.

- T (exact): J_G = W^T, i.e. g -> g W. With a feedback weight B in place of W (FA, FWDTP,
  learned feedback) the same rule gives g -> g B.
- P (exact): J_G = W^+, g -> g (W^+)^T; target G(t) = (t - b) (W^+)^T.
- I (exact): J_G = W^-1 for a square, non-singular W; target G(t) = (t - b) W^-T, so that
  G(F(x)) = x. A non-square W is refused at compile time, a singular one when it is met.

Weight gradient: dW = g^T x and db = sum of g over the leading dimensions.

Bilinear layers (``nn.Bilinear``, ``F.bilinear``): y_k = x1^T W_k x2 + b_k with W (out, in1, in2).
T (kind "linearised": J depends on the other input): g -> (sum_k g_k W_k x2, sum_k g_k W_k^T x1),
with a feedback weight B in place of W under FA or learned feedback. The weight and bias gradients
(dW_k = sum over rows of g_k x1 x2^T, db = sum g) are autograd's vjp of the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.errors import ConditionError
from fbcompile.ops import declare_op
from fbcompile.registry import register_rule


def linear(input, weight, bias=None):
    return F.linear(input, weight, bias)


def linear_param_grads(ctx, g):
    """dW = g^T x, db = sum(g), with the leading dimensions flattened into rows (a traced (N, in)
    input is rows already: no reshape ops in the generated code)."""
    rows_g, rows_x = g, ctx.saved("input")
    traced = ctx.shape("input")
    if traced is None or len(traced) != 2:
        out_features, in_features = ctx.shape("weight")
        rows_g, rows_x = g.reshape(-1, out_features), rows_x.reshape(-1, in_features)
    grads = {"weight": rows_g.t() @ rows_x}
    if ctx.has("bias"):
        grads["bias"] = rows_g.sum(0)
    return grads


LINEAR = declare_op("linear", linear, functions=[F.linear],
                    modules={nn.Linear: lambda m: {"weight": m.weight, "bias": m.bias}},
                    param_grads=linear_param_grads)


@register_rule(LINEAR, conditions="T", kind="exact")
def linear_transpose(ctx, g):
    """G(g) = W^T g, in rows g W (the feedback weight W may be swapped for B)."""
    return {"input": g @ ctx.weight("weight")}


def _unbias(ctx, t):
    bias = ctx.param("bias")
    return t if bias is None else t - bias


def _pinv_target(ctx, t):
    return {"input": _unbias(ctx, t) @ torch.linalg.pinv(ctx.weight("weight")).t()}


@register_rule(LINEAR, conditions="P", kind="exact", target=_pinv_target, affine=True)
def linear_pinv(ctx, g):
    """G(g) = W^+ g, in rows g (W^+)^T."""
    return {"input": g @ torch.linalg.pinv(ctx.weight("weight")).t()}


def checked_inverse(weight, node_name: str):
    """W^-1, or a ConditionError naming the node when W is singular (to working precision)."""
    inverse, info = torch.linalg.inv_ex(weight)
    if int(info) != 0 or not torch.isfinite(inverse).all():
        raise ConditionError(f"condition I: the weight of Linear node {node_name!r} is singular "
                             "and has no inverse; use condition P (pseudo-inverse) or T")
    return inverse


def _inverse_target(ctx, t):
    return {"input": _unbias(ctx, t) @ ctx.call(checked_inverse, ctx.weight("weight"), ctx.name).t()}


def _square(ctx):
    out_features, in_features = ctx.shape("weight")
    if out_features != in_features:
        return (f"condition I needs a square weight, but {ctx.name} maps {in_features} -> {out_features} "
                "features; use condition P (pseudo-inverse) or T")
    return None


@register_rule(LINEAR, conditions="I", kind="exact", target=_inverse_target, affine=True, supports=_square)
def linear_inverse(ctx, g):
    """G(g) = W^-1 g, in rows g W^-T."""
    return {"input": g @ ctx.call(checked_inverse, ctx.weight("weight"), ctx.name).t()}


# -- bilinear ------------------------------------------------------------------------------------
def bilinear(input1, input2, weight, bias=None):
    return F.bilinear(input1, input2, weight, bias)


BILINEAR = declare_op("bilinear", bilinear, functions=[F.bilinear],
                      modules={nn.Bilinear: lambda m: {"weight": m.weight, "bias": m.bias}})


def bilinear_input_feedback(g, weight, other, first: bool):
    """sum_k g_k W_k x2 (into input1, ``first``) or sum_k g_k W_k^T x1 (into input2), over rows."""
    pattern = "...k,kij,...j->...i" if first else "...k,kij,...i->...j"
    return torch.einsum(pattern, g, weight, other)


@register_rule(BILINEAR, conditions="T", kind="linearised")
def bilinear_transpose(ctx, g):
    """G(g) = J^T g at the forward inputs (module docstring); W may be swapped for B."""
    weight, args = ctx.weight("weight"), ctx.forward_args()
    return {name: ctx.call(bilinear_input_feedback, g, weight, args[other], name == "input1")
            for name, other in (("input1", "input2"), ("input2", "input1")) if ctx.is_active(name)}
