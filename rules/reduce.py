"""Reductions: mean / sum over dims (global average pooling, the MLP-Mixer token mean), and vector
norms (ConvNeXt-V2's global response normalisation, ``torch.norm(x, p=2, dim=...)``).

J = (1/n) 1^T (mean) or 1^T (sum) over the n reduced entries. T: g broadcast back over the reduced
dims times 1/n (or 1); only the input's shape is read (``ctx.saved_shape``: the input is not
saved). P: J^+ = 1 (mean) or (1/n) 1 (sum). I only when n = 1.

Vector norm ||x||_p over the reduced dims, p = 2 or 1. T (kind "linearised": target modes use the
slope at the forward value): J^T g = g x / ||x||_2 (0 where the norm is 0, as autograd), or
g sgn(x) for p = 1, with g and the norm broadcast back over the reduced dims.
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


@register_rule(MEAN, conditions="T", complex_values=True)
def mean_transpose(ctx, g):
    """J = (1/n) 1^T: G(g) = g / n broadcast over the reduced dims (paper 002 eq. 37)."""
    return _reduction_back(ctx, g, 1.0 / _count(ctx))


@register_rule(SUM, conditions="T", complex_values=True)
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


# -- vector norms ---------------------------------------------------------------------------------------
def vector_norm(input, ord=2, dim=None, keepdim=False, dtype=None):
    return torch.linalg.vector_norm(input, ord, dim, keepdim, dtype=dtype)


def norm(input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    return torch.norm(input, p, dim, keepdim, dtype=dtype)


VECTOR_NORM = declare_op("vector_norm", vector_norm, functions=[torch.linalg.vector_norm],
                         batch_local=lambda ctx: 0 not in _reduced_dims(ctx))
NORM = declare_op("norm", norm, functions=[torch.norm], methods=[tensor_method("norm")],
                  batch_local=lambda ctx: 0 not in _reduced_dims(ctx))
ORDER = {VECTOR_NORM: "ord", NORM: "p"}


def _order(ctx):
    """The norm's order as 1 or 2 (the Frobenius norm of ``torch.norm`` is the 2-norm of the entries)."""
    order = ctx.const(ORDER[ctx.op_call.spec], 2 if ctx.op_call.spec is VECTOR_NORM else "fro")
    return 2 if order == "fro" else order


def _supported_norm(ctx):
    if _order(ctx) not in (1, 2) or ctx.const("dtype") is not None or ctx.has("out"):
        return (f"{ctx.name}: a vector norm is supported for p = 1 or 2 without dtype or out arguments "
                f"(got p={_order(ctx)!r}, dtype={ctx.const('dtype')!r})")
    return None


def vector_norm_back(g, x, n, dims, keepdim, order):
    """J^T g = x (g / ||x||) with 0 where the norm is 0 (p = 2), or g sgn(x) (p = 1)."""
    if not keepdim:
        for d in dims:
            g, n = g.unsqueeze(d), n.unsqueeze(d)
    if order == 1:
        return g * x.sgn()
    return x * (g / n).masked_fill(n == 0, 0)


@register_rule(VECTOR_NORM, conditions="T", kind="linearised", supports=_supported_norm)
@register_rule(NORM, conditions="T", kind="linearised", supports=_supported_norm)
def norm_transpose(ctx, g):
    """J^T g of ||x||_p over the reduced dims (module docstring)."""
    return {"input": ctx.call(vector_norm_back, g, ctx.saved("input"), ctx.saved("output"), _reduced_dims(ctx),
                              ctx.const("keepdim", False), _order(ctx))}
