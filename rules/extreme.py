"""Extremes: max, min, amax, amin, reductions that select (the selections are in :mod:`rules.indexing`).

max/min over ``dim`` (values, indices): J selects the arg-max; G(g) = g scattered to the forward's
indices (autograd's convention at ties). amax/amin, and max/min of the whole tensor: autograd
splits evenly among ties, J_{r,p} = m_p / n_r (m_p = 1 where x_p equals its group's maximum, n_r
the number of such entries): G(g) = m g / n (expanded). J J^T = diag(1/n), so
J^+ = J^T diag(n): G(g) = m g (no division), which equals T where there are no ties.
None is invertible (entries are dropped): condition I is refused with the reason.
"""
from __future__ import annotations

import torch
from torch import fx

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule


def max_(input, dim=None, keepdim=False):
    return torch.max(input) if dim is None else torch.max(input, dim, keepdim)


def min_(input, dim=None, keepdim=False):
    return torch.min(input) if dim is None else torch.min(input, dim, keepdim)


def amax(input, dim=(), keepdim=False):
    return torch.amax(input, dim, keepdim)


def amin(input, dim=(), keepdim=False):
    return torch.amin(input, dim, keepdim)


def _dims(ctx):
    dim, rank = ctx.const("dim"), len(ctx.shape("input"))
    dims = range(rank) if dim is None or dim in ((), []) else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return tuple(sorted(d % rank for d in dims))


def _reduction_local(ctx):
    return 0 not in _dims(ctx)


MAX = declare_op("max", max_, functions=[torch.max], methods=[tensor_method("max")], batch_local=_reduction_local)
MIN = declare_op("min", min_, functions=[torch.min], methods=[tensor_method("min")], batch_local=_reduction_local)
AMAX = declare_op("amax", amax, functions=[torch.amax], methods=[tensor_method("amax")], batch_local=_reduction_local)
AMIN = declare_op("amin", amin, functions=[torch.amin], methods=[tensor_method("amin")], batch_local=_reduction_local)


def _routes_by_indices(ctx):
    return ctx.op_call.spec in (MAX, MIN) and ctx.const("dim") is not None


def _reduction_problem(ctx):
    if isinstance(ctx.op_call.args.get("dim"), fx.Node):     # (of two tensors it is torch.maximum: canonical.py)
        return (f"argument 'dim' of torch.{ctx.op_call.spec.name} is a run-time value computed in forward; "
                "give it as a constant")
    return None


def tie_mask(input, output, dims, keepdim):
    """m = 1 where an entry equals its group's extreme value, and n = the number of such entries."""
    out = output if keepdim else output.reshape([1 if d in dims else s for d, s in enumerate(input.shape)])
    mask = (input == out).to(input.dtype)
    return mask, mask.sum(dims, keepdim=True)


def spread(g, input, output, dims, keepdim, divide):
    """m g / n (T, autograd's even split at ties) or m g (P), g expanded over the reduced dims."""
    mask, count = tie_mask(input, output, dims, keepdim)
    g = g if keepdim else g.reshape(count.shape)
    return mask * g / count if divide else mask * g


def route_to_indices(g, input, indices, dim, keepdim):
    """Zeros with g written at the forward's arg-max / arg-min along ``dim``."""
    if not keepdim:
        g, indices = g.unsqueeze(dim), indices.unsqueeze(dim)
    return g.new_zeros(input.shape).scatter(dim, indices, g)


def _reduction_back(ctx, g, divide):
    if _routes_by_indices(ctx):
        if g[0] is None:
            return {"input": None}
        output = ctx.saved("output")
        dim = _dims(ctx)[0]
        return {"input": ctx.call(route_to_indices, g[0], ctx.saved("input"), output[1], dim,
                                  ctx.const("keepdim", False))}
    return {"input": ctx.call(spread, g, ctx.saved("input"), ctx.saved("output"), _dims(ctx),
                              ctx.const("keepdim", False), divide)}


def transpose(ctx, g):
    """G(g) = J^T g: to the forward's indices (over a dim), or m g / n split among ties."""
    return _reduction_back(ctx, g, True)


def pinv(ctx, g):
    """G(g) = J^+ g = J^T diag(n) g: to the forward's indices (rows are unit vectors: P = T), or m g."""
    return _reduction_back(ctx, g, False)


def inverse(ctx, g):
    """Refused (a reduction drops entries); were it allowed, J^+ g as :func:`pinv`."""
    return pinv(ctx, g)


def _drops_entries(ctx):
    return _reduction_problem(ctx) or (f"{ctx.op_call.spec.name} drops entries, so it has no inverse; "
                                       "use condition T or P")


for _op in (MAX, MIN, AMAX, AMIN):
    register_rule(_op, conditions="T", supports=_reduction_problem)(transpose)
    register_rule(_op, conditions="P", supports=_reduction_problem)(pinv)
    register_rule(_op, conditions="I", supports=_drops_entries)(inverse)
