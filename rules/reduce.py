"""Reductions: mean / sum over dims (global average pooling, the MLP-Mixer token mean).

J = (1/n) 1^T (mean) or 1^T (sum) over the n reduced entries. T: g broadcast back over the reduced
dims times 1/n (or 1); only the input's shape is read (``ctx.saved_shape``: the input is not
saved). P: J^+ = 1 (mean) or (1/n) 1 (sum). I only when n = 1.
"""
from __future__ import annotations

import torch

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule


def mean(input, dim=None, keepdim=False, dtype=None):
    return input.mean() if dim is None else input.mean(dim, keepdim=keepdim)


def sum_(input, dim=None, keepdim=False, dtype=None):
    return input.sum() if dim is None else input.sum(dim, keepdim=keepdim)


MEAN = declare_op("mean", mean, functions=[torch.mean], methods=[tensor_method("mean")],
                  batch_local=lambda ctx: 0 not in _reduced_dims(ctx))
SUM = declare_op("sum", sum_, functions=[torch.sum], methods=[tensor_method("sum")],
                 batch_local=lambda ctx: 0 not in _reduced_dims(ctx))


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


def broadcast_back(g, shape, dims, keepdim, scale):
    """g (reduced over ``dims``) expanded back to the input's ``shape``, times ``scale``."""
    if not keepdim:
        for d in dims:
            g = g.unsqueeze(d)
    return (g * scale).expand(shape)


def _reduction_back(ctx, g, scale):
    return {"input": ctx.call(broadcast_back, g, ctx.saved_shape("input"), _reduced_dims(ctx),
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


@register_rule(MEAN, conditions="I", supports=_single)
def mean_inverse(ctx, g):
    """J = (1/n) 1^T with n = 1: G(g) = g (:func:`mean_pinv`)."""
    return mean_pinv(ctx, g)


@register_rule(SUM, conditions="I", supports=_single)
def sum_inverse(ctx, g):
    """J = 1^T with n = 1: G(g) = g (:func:`sum_pinv`)."""
    return sum_pinv(ctx, g)
