"""Convolutions (1d, 2d, 3d): y = W * x + b with stride s, padding, dilation d and groups.

T (exact): the adjoint of a convolution is the transposed convolution with the same weight, i.e.
a convolution with the kernel rotated by 180 degrees and its in/out channels swapped (paper 002,
eq. 20), applied to the stride-dilated feedback. The size is restored exactly: per spatial dim, with
input size H, padding (l, r), output size H_out,

    full = (H_out - 1) s + d (k - 1) + 1          (rows the forward read, padding included)
    output_padding = (H + l + r) - full           (rows of the padded input no window reached;
                                                   0 <= output_padding < s)

and conv_transpose with padding l gives H + (r - l) rows; the extra r - l rows of asymmetric
('same' with an even kernel) padding are cut off the end. Nothing is guessed from H_out alone.

Weight gradient: dW = aten.convolution_backward (correlation of x with g), db = sum of g.

Fused backward: where the feedback graph emits the weight gradients from the same g (error modes),
the input feedback and (dW, db) come from ONE aten.convolution_backward call, the kernel autograd
runs (bitwise equal to it), except at one output position per sample on the CPU, where dW is one
GEMM (equal to rounding; see :mod:`fbcompile.rules.conv_position`). Measured per conv (``python examples/bench_models.py --convs``: CPU, 2
threads, batch 32, medians of 15 interleaved rounds on a shared machine) against conv_transpose + a
weight-only convolution_backward, the fused call was as fast or faster in 11 of 12 measurements
over two runs (ResNet-18's 3x3 64x8x8: 1.16 vs 1.35 ms; MobileNetV2's depthwise 96x8x8: 0.37 vs
0.41 ms, 32x16x16: 0.50 vs 0.54 and 1.38 vs 1.80 ms), once slower (1x1 96->576, 5.1 vs 3.8 ms,
0.73 vs 0.76 ms in the other run): the grouped transposed convolution is no slow path here, and
the fused call is chosen for being autograd's own kernel. Target modes (no weight gradient),
convs reading a model input and, in the per-unit gradient graphs, convs reading another unit's
output (feedback that is dropped there) keep conv_transpose + the weight-only kernel, so dead
input feedback is pruned.
P and I: the dense per-sample operator (see :mod:`fbcompile.rules.dense`), for small inputs.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule

from .conv_position import one_output_position, padding_pairs, single_position_backward
from .dense import dense_inverse_apply, dense_size_problem
from .kernel_dtypes import as_autocast_ran

aten = torch.ops.aten


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv1d(input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv3d(input, weight, bias, stride, padding, dilation, groups)


def _conv_module(m):
    return {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
            "dilation": m.dilation, "groups": m.groups, "padding_mode": m.padding_mode}


def _tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def geometry(ctx):
    """Per spatial dim: stride, dilation, kernel, (left, right) padding, input and output sizes."""
    n = len(ctx.shape("weight")) - 2
    kernel = ctx.shape("weight")[2:]
    stride, dilation = _tuple(ctx.const("stride", 1), n), _tuple(ctx.const("dilation", 1), n)
    pads = padding_pairs(ctx.const("padding", 0), kernel, dilation)
    return n, stride, dilation, kernel, pads, ctx.shape("input")[-n:], ctx.shape()[-n:]


def conv_adjoint(g, weight, stride, dilation, pads, output_padding, groups, in_sizes):
    """x-gradient of the convolution: transposed convolution, then the asymmetric-padding crop."""
    n = len(pads)
    transpose = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    out = transpose(g, weight, None, stride, [l for l, _ in pads], output_padding, groups, dilation)
    for i, (left, right) in enumerate(pads):
        if right != left:
            out = out.narrow(out.dim() - n + i, 0, in_sizes[i])
    return out


def conv_backward(g, x, weight, stride, dilation, pads, groups, has_bias, input_grad=True):
    """(dx, dW, db) from one aten.convolution_backward (dx None unless ``input_grad``), on the
    operands autocast gave the forward (:mod:`fbcompile.rules.kernel_dtypes`). Asymmetric padding is
    applied to x explicitly and cut off dx again."""
    g, x, weight = as_autocast_ran(g, x, weight)
    padding = [l for l, _ in pads]
    asymmetric = any(l != r for l, r in pads)
    if asymmetric:
        x = F.pad(x, [p for l, r in reversed(pads) for p in (l, r)])
        padding = [0] * len(pads)
    if one_output_position(g, x, groups):
        dx, dw, db = single_position_backward(g, x, weight, dilation, padding, has_bias, input_grad)
    else:
        bias_sizes = [weight.shape[0]] if has_bias else None
        dx, dw, db = aten.convolution_backward(g, x, weight, bias_sizes, list(stride), padding, list(dilation),
                                               False, [0] * len(pads), groups, [input_grad, True, has_bias])
    if asymmetric and dx is not None:
        n = len(pads)
        for i, (left, _) in enumerate(pads):
            dx = dx.narrow(dx.dim() - n + i, left, x.shape[dx.dim() - n + i] - left - pads[i][1])
    return dx, dw, db


def conv_weight_grads(g, x, weight, stride, dilation, pads, groups, has_bias):
    """(dW, db) without the input gradient (:func:`conv_backward`)."""
    return conv_backward(g, x, weight, stride, dilation, pads, groups, has_bias, False)[1:]


def _fused(ctx) -> bool:
    """One convolution_backward for input feedback and weight gradients (see the module docstring)."""
    return ctx.with_param_grads and not ctx.feedback_dropped("input")


def _fused_call(ctx, g):
    _, stride, dilation, _, pads, _, _ = geometry(ctx)
    return ctx.call_once(conv_backward, g, ctx.saved("input"), ctx.weight("weight"), stride, dilation, pads,
                         ctx.const("groups", 1), ctx.has("bias"))


def _param_grads(ctx, g):
    if _fused(ctx):
        grads = _fused_call(ctx, g)[1:]
    else:
        _, stride, dilation, _, pads, _, _ = geometry(ctx)
        grads = ctx.call(conv_weight_grads, g, ctx.saved("input"), ctx.param("weight"), stride, dilation, pads,
                         ctx.const("groups", 1), ctx.has("bias"))
    return {"weight": grads[0], "bias": grads[1] if ctx.has("bias") else None}


def _zeros_padding(ctx):
    mode = ctx.const("padding_mode", "zeros")
    return None if mode == "zeros" else f"padding_mode={mode!r} is not supported (only 'zeros')"


CONV1D = declare_op("conv1d", lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros": conv1d(input, weight, bias, stride, padding, dilation, groups),
                    functions=[F.conv1d], modules={nn.Conv1d: _conv_module}, param_grads=_param_grads)
CONV2D = declare_op("conv2d", lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros": conv2d(input, weight, bias, stride, padding, dilation, groups),
                    functions=[F.conv2d], modules={nn.Conv2d: _conv_module}, param_grads=_param_grads)
CONV3D = declare_op("conv3d", lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros": conv3d(input, weight, bias, stride, padding, dilation, groups),
                    functions=[F.conv3d], modules={nn.Conv3d: _conv_module}, param_grads=_param_grads)


@register_rule(CONV1D, conditions="T", supports=_zeros_padding)
@register_rule(CONV2D, conditions="T", supports=_zeros_padding)
@register_rule(CONV3D, conditions="T", supports=_zeros_padding)
def transpose(ctx, g):
    """G(g) = ROT(W) * g: the transposed convolution, output size restored exactly (the fused
    convolution_backward's dx where the weight gradients are emitted too)."""
    if _fused(ctx):
        return {"input": _fused_call(ctx, g)[0]}
    n, stride, dilation, kernel, pads, in_sizes, out_sizes = geometry(ctx)
    output_padding = [h + l + r - ((o - 1) * s + d * (k - 1) + 1)
                      for h, (l, r), o, s, d, k in zip(in_sizes, pads, out_sizes, stride, dilation, kernel)]
    return {"input": ctx.call(conv_adjoint, g, ctx.weight("weight"), stride, dilation, pads, output_padding,
                              ctx.const("groups", 1), in_sizes)}


# -- conditions P and I: the dense per-sample operator ---------------------------------------------
def _dense(ctx, g, condition):
    spec = ctx.op_call.spec
    args = {k: ctx.const(k, v.default) for k, v in spec.signature.parameters.items()
            if k not in ("input", "weight", "bias", "padding_mode")}
    return ctx.call(DENSE_CONV[spec], g, ctx.weight("weight"), args, ctx.shape("input")[1:], condition, ctx.name)


def _dense_target(ctx, t, condition):
    bias = ctx.param("bias")
    if bias is not None:
        t = t - bias.reshape((-1,) + (1,) * (len(ctx.shape()) - 2))
    return {"input": _dense(ctx, t, condition)}


def dense_conv(conv, g, weight, args, sample_shape, condition, node_name):
    """J^+ g or J^-1 g with J the dense per-sample operator of ``conv`` (:func:`conv1d`, ..., :func:`conv3d`)."""
    key = (conv.__name__, repr(sorted(args.items())), tuple(weight.shape))
    return dense_inverse_apply(g, lambda basis: conv(basis, weight, None, **args), sample_shape, key, condition,
                               node_name, (weight._version,), owner=weight)


# the feedback graph calls these by reference (its arguments are plain values, not functions)
def dense_conv1d(g, weight, args, sample_shape, condition, node_name):
    return dense_conv(conv1d, g, weight, args, sample_shape, condition, node_name)


def dense_conv2d(g, weight, args, sample_shape, condition, node_name):
    return dense_conv(conv2d, g, weight, args, sample_shape, condition, node_name)


def dense_conv3d(g, weight, args, sample_shape, condition, node_name):
    return dense_conv(conv3d, g, weight, args, sample_shape, condition, node_name)


DENSE_CONV = {CONV1D: dense_conv1d, CONV2D: dense_conv2d, CONV3D: dense_conv3d}


def _dense_problem(ctx, condition):
    return _zeros_padding(ctx) or dense_size_problem(ctx, condition)


_DENSE_P = dict(conditions="P", target=partial(_dense_target, condition="P"), affine=True,
                supports=partial(_dense_problem, condition="P"))
_DENSE_I = dict(conditions="I", target=partial(_dense_target, condition="I"), affine=True,
                supports=partial(_dense_problem, condition="I"))


@register_rule(CONV3D, **_DENSE_P)
@register_rule(CONV2D, **_DENSE_P)
@register_rule(CONV1D, **_DENSE_P)
def dense_pinv(ctx, g):
    """G(g) = J^+ g with J the dense per-sample convolution operator."""
    return {"input": _dense(ctx, g, "P")}


@register_rule(CONV3D, **_DENSE_I)
@register_rule(CONV2D, **_DENSE_I)
@register_rule(CONV1D, **_DENSE_I)
def dense_inverse(ctx, g):
    """G(g) = J^-1 g with J the dense per-sample convolution operator (square, non-singular)."""
    return {"input": _dense(ctx, g, "I")}
