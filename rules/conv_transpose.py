"""Transposed convolutions (1d, 2d, 3d): the upsampling layers of U-Nets, segmentation decoders and
generators, y = W^T * x + b with stride s, padding p, output_padding, groups and dilation d.

J_F is the adjoint of the convolution with the same weight and geometry, so J_F^T is that
convolution itself: T (exact): G(g) = conv(g, W) with stride s, padding p, dilation d, groups (the
output_padding rows are the ones no input reached, which the convolution never reads). Input
feedback and weight gradients come from one ``aten.convolution_backward(..., transposed=True)``, the
kernel autograd runs for this op (bitwise equal to it); dW = the correlation of g with x laid out as
(C_in, C_out / groups, *k), db = sum of g. Only the input's shape is needed for the input feedback
alone (a feedback without weight gradients, target modes), where the call reads x for the weight
gradient it is not asked for: x is saved, as autograd saves it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule

from .kernel_dtypes import as_autocast_ran

aten = torch.ops.aten
TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _transposed_module(m):
    return {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
            "output_padding": m.output_padding, "groups": m.groups, "dilation": m.dilation,
            "padding_mode": m.padding_mode}


def _declare(n: int):
    def apply(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
              padding_mode="zeros"):
        return TRANSPOSED[n](input, weight, bias, stride, padding, output_padding, groups, dilation)
    apply.__name__ = apply.__qualname__ = f"conv_transpose{n}d"
    module = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n]
    return declare_op(apply.__name__, apply, functions=[TRANSPOSED[n]], modules={module: _transposed_module},
                      param_grads=_param_grads)


def _tuple(value, n):
    return list(value) if isinstance(value, (tuple, list)) else [value] * n


def transposed_backward(g, x, weight, stride, padding, output_padding, dilation, groups, has_bias, mask):
    """(dx, dW, db) of conv_transpose by autograd's kernel, on the operands autocast gave the
    forward (:mod:`fbcompile.rules.kernel_dtypes`); ``mask`` picks which are computed."""
    g, x, weight = as_autocast_ran(g, x, weight)
    n = weight.dim() - 2
    bias_sizes = [weight.shape[1] * groups] if has_bias else None
    return aten.convolution_backward(g, x, weight, bias_sizes, _tuple(stride, n), _tuple(padding, n),
                                     _tuple(dilation, n), True, _tuple(output_padding, n), groups,
                                     [mask[0], mask[1], mask[2] and has_bias])


def _geometry(ctx) -> tuple:
    return (ctx.const("stride", 1), ctx.const("padding", 0), ctx.const("output_padding", 0),
            ctx.const("dilation", 1), ctx.const("groups", 1), ctx.has("bias"))


def _fused(ctx) -> bool:
    return ctx.with_param_grads and not ctx.feedback_dropped("input")


def _call(ctx, g, mask):
    stride, padding, output_padding, dilation, groups, has_bias = _geometry(ctx)
    weight = ctx.weight("weight") if mask[0] else ctx.param("weight")   # feedback weights carry the input's
    return ctx.call_once(transposed_backward, g, ctx.saved("input"), weight, stride, padding, output_padding,
                         dilation, groups, has_bias, mask)


def _param_grads(ctx, g):
    grads = _call(ctx, g, (True, True, True) if _fused(ctx) else (False, True, True))
    return {"weight": grads[1], "bias": grads[2] if ctx.has("bias") else None}


def _zeros_padding(ctx):
    mode = ctx.const("padding_mode", "zeros")
    return None if mode == "zeros" else f"padding_mode={mode!r} is not supported (only 'zeros')"


CONV_TRANSPOSE = [_declare(n) for n in (1, 2, 3)]


def convolution(ctx, g):
    """G(g) = conv(g, W): the adjoint of the transposed convolution (one convolution_backward,
    shared with the weight gradients where those are emitted too)."""
    return {"input": _call(ctx, g, (True, True, True) if _fused(ctx) else (True, False, False))[0]}


for _op in CONV_TRANSPOSE:
    register_rule(_op, conditions="T", supports=_zeros_padding)(convolution)
