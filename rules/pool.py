"""Pooling (1d, 2d, 3d): max, average and adaptive average.

Max pooling. J_F selects, for every output position, the input position holding the window's
maximum (the forward's indices). T (exact): G(g) = MaxUnpool with those indices, implemented as a
scatter-*add*: with overlapping windows (stride < kernel) one input can be the maximum of several
windows and its feedback is the sum of theirs (a plain MaxUnpool would overwrite). Padding and
ceil_mode need no special care: indices refer to unpadded input positions.
A model's own return_indices=True makes the output the pair (values, indices); the indices are an
integer tensor that no feedback reaches (a MaxUnpool reading them: :mod:`fbcompile.rules.unpool`).
P (exact): J_F has orthogonal columns, J^T J = diag(c) with c the number of windows selecting each
input, so J^+ = diag(1/c) J^T: the same scatter-add divided by the counts (0 where c = 0).

Average pooling is linear and input-independent. T (exact): its adjoint, aten.avg_pool2d_backward
(1d runs as 2d with a unit height), which honours padding, ceil_mode, count_include_pad and
divisor_override (3d: avg_pool3d_backward). Adaptive average pooling:
aten._adaptive_avg_pool{2,3}d_backward, exact for overlapping bins too. P and I: the dense operator (small inputs); global adaptive pooling (output
size 1) is a mean and has J^+ = copy.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule

from .dense import dense_inverse_apply, dense_size_problem
from .kernel_dtypes import like

aten = torch.ops.aten


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return F.max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=bool(return_indices))


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=bool(return_indices))


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return F.max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=bool(return_indices))


def max_pool1d_tapped(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return with_indices(max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, True), return_indices)


def max_pool2d_tapped(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return with_indices(max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, True), return_indices)


def max_pool3d_tapped(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return with_indices(max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode, True), return_indices)


def with_indices(pooled: tuple, return_indices) -> tuple:
    """A tapped max pool's ``(out, indices)``: ``out`` is what the model's call returns, the values
    alone or, with return_indices=True, the (values, indices) pair itself."""
    values, indices = pooled
    return (pooled if return_indices else values), indices


def _pair_always(fn, name: str):
    """``fn`` (a max pool's apply or tapped forward) with return_indices forced on: the forward of
    F.max_pool2d_with_indices, how fx records F.max_pool2d(..., return_indices=True), which returns
    the (values, indices) pair whatever its own return_indices says."""
    def pair(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=True):
        return fn(input, kernel_size, stride, padding, dilation, ceil_mode, True)
    pair.__name__ = pair.__qualname__ = name
    return pair


def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return F.avg_pool3d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def adaptive_avg_pool3d(input, output_size):
    return F.adaptive_avg_pool3d(input, output_size)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return F.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def adaptive_avg_pool1d(input, output_size):
    return F.adaptive_avg_pool1d(input, output_size)


def adaptive_avg_pool2d(input, output_size):
    return F.adaptive_avg_pool2d(input, output_size)


def _max_module(m):
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
            "ceil_mode": m.ceil_mode, "return_indices": m.return_indices}


def _avg_module(m):
    extra = {"divisor_override": m.divisor_override} if hasattr(m, "divisor_override") else {}
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode,
            "count_include_pad": m.count_include_pad, **extra}


MAX_POOL1D = declare_op("max_pool1d", max_pool1d, functions=[F.max_pool1d], modules={nn.MaxPool1d: _max_module},
                        tapped=max_pool1d_tapped, extras=("indices",))
MAX_POOL2D = declare_op("max_pool2d", max_pool2d, functions=[F.max_pool2d], modules={nn.MaxPool2d: _max_module},
                        tapped=max_pool2d_tapped, extras=("indices",))
MAX_POOL3D = declare_op("max_pool3d", max_pool3d, functions=[F.max_pool3d], modules={nn.MaxPool3d: _max_module},
                        tapped=max_pool3d_tapped, extras=("indices",))
MAX_POOLS_WITH_INDICES = [
    declare_op(f"max_pool{n}d_with_indices", _pair_always(apply, f"max_pool{n}d_with_indices"), functions=[function],
               tapped=_pair_always(tapped, f"max_pool{n}d_with_indices_tapped"), extras=("indices",))
    for n, apply, function, tapped in ((1, max_pool1d, F.max_pool1d_with_indices, max_pool1d_tapped),
                                       (2, max_pool2d, F.max_pool2d_with_indices, max_pool2d_tapped),
                                       (3, max_pool3d, F.max_pool3d_with_indices, max_pool3d_tapped))]
MAX_POOLS = {MAX_POOL1D: 1, MAX_POOL2D: 2, MAX_POOL3D: 3, **{op: n + 1 for n, op in enumerate(MAX_POOLS_WITH_INDICES)}}
AVG_POOL3D = declare_op("avg_pool3d", avg_pool3d, functions=[F.avg_pool3d], modules={nn.AvgPool3d: _avg_module})
ADAPTIVE3D = declare_op("adaptive_avg_pool3d", adaptive_avg_pool3d, functions=[F.adaptive_avg_pool3d],
                        modules={nn.AdaptiveAvgPool3d: lambda m: {"output_size": m.output_size}})
AVG_POOL1D = declare_op("avg_pool1d", avg_pool1d, functions=[F.avg_pool1d], modules={nn.AvgPool1d: _avg_module})
AVG_POOL2D = declare_op("avg_pool2d", avg_pool2d, functions=[F.avg_pool2d], modules={nn.AvgPool2d: _avg_module})
ADAPTIVE1D = declare_op("adaptive_avg_pool1d", adaptive_avg_pool1d, functions=[F.adaptive_avg_pool1d],
                        modules={nn.AdaptiveAvgPool1d: lambda m: {"output_size": m.output_size}})
ADAPTIVE2D = declare_op("adaptive_avg_pool2d", adaptive_avg_pool2d, functions=[F.adaptive_avg_pool2d],
                        modules={nn.AdaptiveAvgPool2d: lambda m: {"output_size": m.output_size}})


def unpool_add(g, indices, shape, n_spatial: int, normalise: bool):
    """Scatter-add g into zeros of the input's ``shape`` at the max-pool ``indices`` (flat positions
    within each channel plane); with ``normalise`` divide by how many windows chose each position."""
    flat_g = g.flatten(start_dim=-n_spatial)
    flat_idx = indices.flatten(start_dim=-n_spatial)
    plane = 1
    for size in shape[-n_spatial:]:
        plane *= size
    out = g.new_zeros(tuple(shape[:-n_spatial]) + (plane,)).scatter_add_(-1, flat_idx, flat_g)   # in place: one buffer
    if normalise:
        counts = torch.zeros_like(out).scatter_add(-1, flat_idx, torch.ones_like(flat_g))
        out = out / counts.clamp(min=1)
    return out.reshape(shape)


# spatial dims of each pooling op (1d pooling runs on 2d kernels over a unit-height plane)
SPATIAL_DIMS = {**MAX_POOLS, AVG_POOL1D: 1, AVG_POOL2D: 2, AVG_POOL3D: 3,
                ADAPTIVE1D: 1, ADAPTIVE2D: 2, ADAPTIVE3D: 3}


def _n_spatial(ctx):
    return SPATIAL_DIMS[ctx.op_call.spec]


def _unpooled(ctx, g, normalise: bool) -> dict:
    values_feedback = g[0] if isinstance(g, (list, tuple)) else g      # a (values, indices) output
    if values_feedback is None:
        return {"input": None}
    return {"input": ctx.call(unpool_add, values_feedback, ctx.saved("indices"), ctx.saved_shape("input"),
                              _n_spatial(ctx), normalise)}


def unpool(ctx, g):
    """G(g) = J^T g: MaxUnpool with the forward indices, overlapping windows adding up."""
    return _unpooled(ctx, g, False)


def unpool_pinv(ctx, g):
    """G(g) = J^+ g = diag(1/c) J^T g, c = number of windows choosing each input."""
    return _unpooled(ctx, g, True)


def _not_invertible(ctx):
    return f"{ctx.op_call.spec.name} is not invertible (it drops entries); use condition P or T"


def register_max_pool_rules(ops: dict) -> None:
    """Max pooling's T, P and I (refused) rules for ``ops`` ({op: spatial dims}), ops whose tapped
    forward saves the flat per-plane ``indices`` of each window's maximum (fractional and adaptive
    max pooling too)."""
    SPATIAL_DIMS.update(ops)
    for op in ops:
        register_rule(op, conditions="T")(unpool)
        register_rule(op, conditions="P")(unpool_pinv)
        register_rule(op, conditions="I", supports=_not_invertible)(unpool_pinv)


register_max_pool_rules(MAX_POOLS)


def window_sizes(value, fill, n):
    """Pooling hyperparameter as an n-tuple (``None`` or empty means ``fill``)."""
    value = fill if value is None or value == [] or value == () else value
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def avg_pool_adjoint(g, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, n):
    """The adjoint of average pooling; 1d pooling runs as 2d over a unit-height plane. The kernel
    takes the error in the input's dtype (:mod:`fbcompile.rules.kernel_dtypes`)."""
    g = like(g, input)
    kernel = window_sizes(kernel_size, None, n)
    stride, padding = window_sizes(stride, kernel, n), window_sizes(padding, 0, n)
    if n == 1:
        out = aten.avg_pool2d_backward(g.unsqueeze(-2), input.unsqueeze(-2), (1,) + kernel, (1,) + stride,
                                       (0,) + padding, ceil_mode, count_include_pad, None)
        return out.squeeze(-2)
    backward = aten.avg_pool2d_backward if n == 2 else aten.avg_pool3d_backward
    return backward(g, input, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


def adaptive_adjoint(g, input, n):
    g = like(g, input)
    if n == 1:
        return aten._adaptive_avg_pool2d_backward(g.unsqueeze(-2), input.unsqueeze(-2)).squeeze(-2)
    backward = aten._adaptive_avg_pool2d_backward if n == 2 else aten._adaptive_avg_pool3d_backward
    return backward(g, input)


@register_rule(AVG_POOL3D, conditions="T")
@register_rule(AVG_POOL2D, conditions="T")
@register_rule(AVG_POOL1D, conditions="T")
def adjoint(ctx, g):
    """G(g) = J^T g, the adjoint of average pooling."""
    return {"input": ctx.call(avg_pool_adjoint, g, ctx.saved("input"), ctx.const("kernel_size"),
                              ctx.const("stride"), ctx.const("padding", 0),
                              ctx.const("ceil_mode", False), ctx.const("count_include_pad", True),
                              ctx.const("divisor_override", None), _n_spatial(ctx))}


@register_rule(ADAPTIVE3D, conditions="T")
@register_rule(ADAPTIVE2D, conditions="T")
@register_rule(ADAPTIVE1D, conditions="T")
def adaptive_transpose(ctx, g):
    """G(g) = J^T g, the adjoint of adaptive average pooling (overlapping bins add). Global pooling
    (output size 1) is a mean over the m spatial entries: G(g) = g / m broadcast, read from the
    input's shape alone (:func:`global_pool_adjoint`)."""
    if _is_global(ctx):
        return {"input": ctx.call(global_pool_adjoint, g, ctx.saved_shape("input"), _n_spatial(ctx))}
    return {"input": ctx.call(adaptive_adjoint, g, ctx.saved("input"), _n_spatial(ctx))}


def global_pool_adjoint(g, shape, n):
    """J^T g of the mean over the last ``n`` dims of an input of ``shape``: g / m expanded (a view)."""
    return (g / math.prod(shape[-n:])).expand(shape)


def dense_pool(pool, g, args, sample_shape, condition, node_name):
    """J^+ g or J^-1 g with J the dense per-sample operator of the average pooling ``pool``."""
    key = (pool.__name__, repr(sorted(args.items())))
    return dense_inverse_apply(g, lambda basis: pool(basis, **args), sample_shape, key, condition, node_name)


# the feedback graph calls these by reference (its arguments are plain values, not functions)
def dense_avg_pool1d(g, args, sample_shape, condition, node_name):
    return dense_pool(avg_pool1d, g, args, sample_shape, condition, node_name)


def dense_avg_pool2d(g, args, sample_shape, condition, node_name):
    return dense_pool(avg_pool2d, g, args, sample_shape, condition, node_name)


def dense_adaptive_avg_pool1d(g, args, sample_shape, condition, node_name):
    return dense_pool(adaptive_avg_pool1d, g, args, sample_shape, condition, node_name)


def dense_adaptive_avg_pool2d(g, args, sample_shape, condition, node_name):
    return dense_pool(adaptive_avg_pool2d, g, args, sample_shape, condition, node_name)


def dense_avg_pool3d(g, args, sample_shape, condition, node_name):
    return dense_pool(avg_pool3d, g, args, sample_shape, condition, node_name)


def dense_adaptive_avg_pool3d(g, args, sample_shape, condition, node_name):
    return dense_pool(adaptive_avg_pool3d, g, args, sample_shape, condition, node_name)


DENSE_POOL = {AVG_POOL1D: dense_avg_pool1d, AVG_POOL2D: dense_avg_pool2d, AVG_POOL3D: dense_avg_pool3d,
              ADAPTIVE1D: dense_adaptive_avg_pool1d, ADAPTIVE2D: dense_adaptive_avg_pool2d,
              ADAPTIVE3D: dense_adaptive_avg_pool3d}


def _dense_pool_rule(ctx, g, condition):
    spec = ctx.op_call.spec
    args = {k: ctx.const(k, v.default) for k, v in spec.signature.parameters.items() if k != "input"}
    return {"input": ctx.call(DENSE_POOL[spec], g, args, ctx.shape("input")[1:], condition, ctx.name)}


def _is_global(ctx):
    size = ctx.const("output_size")
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _dense_pinv_problem(ctx):
    return dense_size_problem(ctx, "P")


def _dense_inverse_problem(ctx):
    return dense_size_problem(ctx, "I")


@register_rule(AVG_POOL1D, conditions="P", supports=_dense_pinv_problem)
@register_rule(AVG_POOL2D, conditions="P", supports=_dense_pinv_problem)
@register_rule(AVG_POOL3D, conditions="P", supports=_dense_pinv_problem)
def pinv(ctx, g):
    """G(g) = J^+ g with J the dense per-sample average-pooling operator."""
    return _dense_pool_rule(ctx, g, "P")


def _adaptive_pinv_problem(ctx):
    return None if _is_global(ctx) else dense_size_problem(ctx, "P")


@register_rule(ADAPTIVE1D, conditions="P", supports=_adaptive_pinv_problem)
@register_rule(ADAPTIVE2D, conditions="P", supports=_adaptive_pinv_problem)
@register_rule(ADAPTIVE3D, conditions="P", supports=_adaptive_pinv_problem)
def adaptive_pinv(ctx, g):
    """Global adaptive pooling is a mean: J^+ = copy. Otherwise the dense per-sample pseudo-inverse."""
    if _is_global(ctx):
        return {"input": g.expand(ctx.saved_shape("input"))}
    return _dense_pool_rule(ctx, g, "P")


@register_rule(AVG_POOL1D, conditions="I", supports=_dense_inverse_problem)
@register_rule(AVG_POOL2D, conditions="I", supports=_dense_inverse_problem)
@register_rule(ADAPTIVE1D, conditions="I", supports=_dense_inverse_problem)
@register_rule(ADAPTIVE2D, conditions="I", supports=_dense_inverse_problem)
@register_rule(AVG_POOL3D, conditions="I", supports=_dense_inverse_problem)
@register_rule(ADAPTIVE3D, conditions="I", supports=_dense_inverse_problem)
def dense_inverse(ctx, g):
    """G(g) = J^-1 g with J the dense per-sample pooling operator (square cases only)."""
    return _dense_pool_rule(ctx, g, "I")
