"""Selections along a dim that return (values, indices): sort, topk, kthvalue, median and nanmedian
over a dim, mode, cummax and cummin.

Each value is one entry of the input, the one at the returned index along ``dim``:
values = gather(x, dim, indices) (keepdim=False drops the reduced dim). So J has unit-vector rows
and, as autograd does (ties follow the returned index, no even split):

    T: G(g) = J^T g = zeros(x.shape).scatter_add(dim, indices, g)

For sort, topk, kthvalue, median, nanmedian and mode the indices of one row are distinct, the rows
of J are orthonormal (J J^T = I) and J^+ = J^T: P is the same map. sort is a permutation, so J^-1 =
J^T and I holds too; the others drop entries and I is refused. cummax and cummin repeat an index
(the running extreme), J J^T is not diagonal and only T is claimed.

The indices output is an integer tensor: no feedback reaches it; only the values carry g.
``median(input)`` / ``nanmedian(input)`` over all entries return the value alone, and autograd
splits its feedback evenly among tied entries: T is autograd's vjp (:mod:`fbcompile.rules.vjp_ops`).
"""
from __future__ import annotations

import torch

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule

from .vjp_ops import autograd_vjp


def sort(input, dim=-1, descending=False, stable=False):
    return torch.sort(input, dim=dim, descending=descending, stable=bool(stable))


def topk(input, k, dim=-1, largest=True, sorted=True):
    return torch.topk(input, k, dim, largest, sorted)


def kthvalue(input, k, dim=-1, keepdim=False):
    return torch.kthvalue(input, k, dim, keepdim)


def median(input, dim=None, keepdim=False):
    return torch.median(input) if dim is None else torch.median(input, dim, keepdim)


def nanmedian(input, dim=None, keepdim=False):
    return torch.nanmedian(input) if dim is None else torch.nanmedian(input, dim, keepdim)


def mode(input, dim=-1, keepdim=False):
    return torch.mode(input, dim, keepdim)


def cummax(input, dim):
    return torch.cummax(input, dim)


def cummin(input, dim):
    return torch.cummin(input, dim)


def _dim(ctx) -> int:
    dim = ctx.const("dim", -1)
    return dim % len(ctx.shape("input"))


def _batch_local(ctx) -> bool:
    return ctx.const("dim", -1) is not None and _dim(ctx) != 0


def _spec(name, apply, torch_function):
    return declare_op(name, apply, functions=[torch_function], methods=[tensor_method(name)], batch_local=_batch_local)


SORT = _spec("sort", sort, torch.sort)
MEDIANS = (_spec("median", median, torch.median), _spec("nanmedian", nanmedian, torch.nanmedian))
DISTINCT = [SORT, _spec("topk", topk, torch.topk), _spec("kthvalue", kthvalue, torch.kthvalue), *MEDIANS,
            _spec("mode", mode, torch.mode)]
CUMULATIVE = [_spec("cummax", cummax, torch.cummax), _spec("cummin", cummin, torch.cummin)]


def scatter_to_indices(g, input, indices, dim):
    """zeros(x.shape).scatter_add(dim, indices, g), g and the indices unsqueezed at ``dim`` where the
    forward dropped it (a reduction with keepdim=False)."""
    if indices.dim() < input.dim():
        g, indices = g.unsqueeze(dim), indices.unsqueeze(dim)
    return g.new_zeros(input.shape).scatter_add(dim, indices, g)


def to_indices(ctx, g):
    """G(g) = J^T g: each value's feedback goes to the entry it was selected from. ``median(input)``
    over all entries returns no index (autograd splits its feedback among ties): autograd's vjp."""
    if _over_all_entries(ctx):
        return autograd_vjp(ctx, g)
    values_feedback = g[0] if isinstance(g, (list, tuple)) else g
    if values_feedback is None:
        return {"input": None}
    return {"input": ctx.call(scatter_to_indices, values_feedback, ctx.saved("input"), ctx.saved("output")[1],
                              _dim(ctx))}


def _over_all_entries(ctx) -> bool:
    return ctx.op_call.spec in MEDIANS and ctx.const("dim") is None


def _over_a_dim(ctx):
    if _over_all_entries(ctx):
        return (f"{ctx.name}: torch.{ctx.op_call.spec.name}(input) over all entries (autograd splits it among ties) "
                f"has a condition-T rule only; condition P needs {ctx.op_call.spec.name}(input, dim)")
    return None


def _not_invertible(ctx):
    return _over_a_dim(ctx) or (f"{ctx.op_call.spec.name} drops entries, so it has no inverse; use condition T or P")


register_rule(SORT, conditions="TPI")(to_indices)
for _op in DISTINCT[1:]:
    register_rule(_op, conditions="T")(to_indices)
    register_rule(_op, conditions="P", supports=_over_a_dim)(to_indices)
    register_rule(_op, conditions="I", supports=_not_invertible)(to_indices)
for _op in CUMULATIVE:
    register_rule(_op, conditions="T")(to_indices)
