"""Structural ops: they move or copy entries without arithmetic, so J_F is a permutation-like
(0/1) matrix with orthonormal rows or columns and T = P = I wherever the inverse exists.

- reshape family (flatten, view, reshape, squeeze, unsqueeze, unflatten): G(g) = g reshaped to the
  saved input's shape (J_F is the identity on the flattened entries).
- transpose(d0, d1): G(g) = g transposed back; permute(p): G(g) = g permuted by p^-1.
- contiguous, clone, Identity, Dropout in eval: G(g) = g.
- cat(tensors, dim): G(g) = the slices of g along dim, one per input.
- split / chunk: G(g_1..g_k) = cat of the pieces (zeros for pieces that received no feedback).
- basic indexing x[idx] (ints, slices, None, ...): G(g) = zeros of x's shape with g placed at idx
  (T = P; I only if nothing is dropped, which is not offered).
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule


def _as_shape(shape):
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else tuple(shape)


def view(input, *shape):
    return input.reshape(_as_shape(shape))


def flatten(input, start_dim=0, end_dim=-1):
    return torch.flatten(input, start_dim, end_dim)


def unflatten(input, dim, sizes):
    return torch.unflatten(input, dim, sizes)


def squeeze(input, dim=None):
    return input.squeeze() if dim is None else input.squeeze(dim)


def unsqueeze(input, dim):
    return input.unsqueeze(dim)


def transpose(input, dim0, dim1):
    return input.transpose(dim0, dim1)


def permute(input, *dims):
    return input.permute(_as_shape(dims))


def identity(input, *args, **kwargs):
    return input


def cat(tensors, dim=0):
    return torch.cat(tensors, dim)


def split(input, split_size_or_sections, dim=0):
    return torch.split(input, split_size_or_sections, dim)


def chunk(input, chunks, dim=0):
    return torch.chunk(input, chunks, dim)


def index(input, idx):
    return input[idx]


def _off_batch(*dims):
    """``batch_local`` for ops with dim hyperparameters: local unless one of them is dim 0."""
    def local(ctx):
        rank = len(ctx.shape("input") if "input" in ctx.op_call.args else ctx.shape())
        values = [ctx.const(d, 0) for d in dims]
        flat = [v for value in values for v in (value if isinstance(value, (tuple, list)) else (value,))]
        return all(v % rank != 0 for v in flat)
    return local


def _permute_local(ctx):
    return _as_shape(ctx.const("dims"))[0] % len(ctx.shape()) == 0


def _index_local(ctx):
    """x[:, ...] and x[..., i] (when it cannot reach dim 0) keep every sample in its row."""
    idx = ctx.const("idx")
    items = idx if isinstance(idx, tuple) else (idx,)
    if items and items[0] == slice(None):
        return True
    touched = [i for i in items[1:] if i is not None]
    return bool(items) and items[0] is Ellipsis and len(touched) < len(ctx.shape("input"))


# view/reshape name their sizes, the batch size included, so a one-sample replay would fail: verify
# measures them over the whole batch (``batch_local`` False); the others name dims only.
RESHAPE = declare_op("view", view, methods=[tensor_method("view"), tensor_method("reshape")],
                     functions=[torch.reshape], batch_local=lambda ctx: False)
FLATTEN = declare_op("flatten", flatten, functions=[torch.flatten], methods=[tensor_method("flatten")],
                     modules={nn.Flatten: lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim}},
                     batch_local=_off_batch("start_dim"))
UNFLATTEN = declare_op("unflatten", unflatten, functions=[torch.unflatten], methods=[tensor_method("unflatten")],
                       modules={nn.Unflatten: lambda m: {"dim": m.dim, "sizes": m.unflattened_size}},
                       batch_local=_off_batch("dim"))
SQUEEZE = declare_op("squeeze", squeeze, functions=[torch.squeeze], methods=[tensor_method("squeeze")],
                     batch_local=lambda ctx: ctx.const("dim") is not None and _off_batch("dim")(ctx))
UNSQUEEZE = declare_op("unsqueeze", unsqueeze, functions=[torch.unsqueeze], methods=[tensor_method("unsqueeze")])
TRANSPOSE = declare_op("transpose", transpose, functions=[torch.transpose],
                       methods=[tensor_method("transpose")], batch_local=_off_batch("dim0", "dim1"))
PERMUTE = declare_op("permute", permute, functions=[torch.permute], methods=[tensor_method("permute")],
                     batch_local=_permute_local)
IDENTITY = declare_op("identity", identity, methods=[tensor_method("contiguous"), tensor_method("clone")],
                      functions=[torch.clone], modules={nn.Identity: lambda m: {}})
CAT = declare_op("cat", cat, functions=[torch.cat, torch.concat, torch.concatenate], batch_local=_off_batch("dim"))
SPLIT = declare_op("split", split, functions=[torch.split], methods=[tensor_method("split")],
                   batch_local=_off_batch("dim"))
CHUNK = declare_op("chunk", chunk, functions=[torch.chunk], methods=[tensor_method("chunk")],
                   batch_local=_off_batch("dim"))
INDEX = declare_op("index", index, functions=[operator.getitem], batch_local=_index_local)


def _reshape_back(ctx, g):
    """G(g) = g viewed in the input's shape (J_F is an identity on flattened entries)."""
    return {"input": g.reshape(ctx.saved("input").shape)}


for _op in (RESHAPE, FLATTEN, UNFLATTEN, SQUEEZE, UNSQUEEZE):
    register_rule(_op, conditions="TPI", name=f"{_op.name}.reshape_back")(_reshape_back)


@register_rule(TRANSPOSE, conditions="TPI")
def transpose_back(ctx, g):
    """G(g) = g^T over the same two dims (a transposition is its own inverse)."""
    return {"input": g.transpose(ctx.const("dim0"), ctx.const("dim1"))}


@register_rule(PERMUTE, conditions="TPI")
def permute_back(ctx, g):
    """G(g) = g permuted by the inverse permutation."""
    dims = [d % len(ctx.shape()) for d in _as_shape(ctx.const("dims"))]
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return {"input": g.permute(inverse)}


@register_rule(IDENTITY, conditions="TPI")
def identity_back(ctx, g):
    """G(g) = g."""
    return {"input": g}


@register_rule(CAT, conditions="TPI")
def cat_back(ctx, g):
    """G(g) = g sliced along ``dim`` at the inputs' sizes (read from the saved inputs)."""
    tensors = ctx.op_call.args["tensors"]
    sizes = [ctx.saved("tensors", i).shape[ctx.const("dim", 0)] for i in range(len(tensors))]
    parts = ctx.call(split_sizes, g, sizes, ctx.const("dim", 0))
    return {"tensors": [parts[i] for i in range(len(tensors))]}


def split_sizes(g, sizes, dim):
    return torch.split(g, list(sizes), dim)


def _pieces_back(ctx, g):
    """G(g_1, ..., g_k) = cat(g_1, ..., g_k) along ``dim``; pieces without feedback count as zeros."""
    return {"input": ctx.call(cat_or_zeros, g, ctx.saved("input"), ctx.op_call.spec.name,
                              ctx.const("split_size_or_sections") if ctx.op_call.spec is SPLIT else ctx.const("chunks"),
                              ctx.const("dim", 0))}


def cat_or_zeros(pieces, input, how, size, dim):
    reference = (torch.split(input, size, dim) if how == "split" else torch.chunk(input, size, dim))
    parts = [p if p is not None else torch.zeros_like(r) for p, r in zip(pieces, reference)]
    return torch.cat(parts, dim)


for _op in (SPLIT, CHUNK):
    register_rule(_op, conditions="TPI", name=f"{_op.name}.cat_back")(_pieces_back)


def index_adjoint(g, input, idx):
    """Zeros shaped like ``input`` with ``g`` written at the (basic, non-repeating) index ``idx``.
    The zeros come from ``g`` (``new_zeros``), so under torch.func's vmap the write is batched."""
    out = g.new_zeros(input.shape)
    out[idx] = g
    return out


def _static_index(ctx):
    idx = ctx.op_call.args["idx"]
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items):
        return "indexing with a runtime tensor or value is not supported; only ints, slices, None and ..."
    return None


@register_rule(INDEX, conditions="TP", supports=_static_index)
def index_transpose(ctx, g):
    """G(g) = zeros with g placed where the forward read. J selects distinct entries, so its rows
    are orthonormal and J^+ = J^T: the same rule serves condition P."""
    return {"input": ctx.call(index_adjoint, g, ctx.saved("input"), ctx.const("idx"))}
