"""Structural ops: they move or copy entries without arithmetic, so J_F is a 0/1 matrix with at most
one 1 per row (every output entry is a copy of one input entry, or a constant).

Such a J has columns with disjoint supports, so J^T J = diag(c) with c = J^T 1 the number of output
entries copying each input entry: J^+ = diag(1/c) J^T (0 where c = 0), :func:`pinv_by_counts`.
Permutations (c = 1, J square) have T = P = I.

- reshape family (flatten, view, reshape, squeeze, unsqueeze, unflatten): G(g) = g reshaped to the
  saved input's shape (J_F is the identity on the flattened entries).
- transpose(d0, d1), ``.T``, ``.mT``: G(g) = g transposed back; permute(p): G(g) = g permuted by p^-1.
- contiguous, clone, Identity, Dropout in eval: G(g) = g.
- cat(tensors, dim): G(g) = the slices of g along dim, one per input; stack: G(g) = unbind(g, dim).
- split / chunk / unbind: G(g_1..g_k) = cat (stack) of the pieces (zeros for pieces without feedback).
- roll(shifts, dims): G(g) = roll(g, -shifts, dims); flip(dims), fliplr, flipud: G(g) = flip of g.
- copies (expand, expand_as, broadcast_to, repeat, tile): out = x copied k times, so J^T sums the k
  copies and J^T J = k I: T: G(g) = sum over copies; P: G(g) = mean over copies; I only when k = 1.
Indexing, gather, padding, masking and max/min selections are in :mod:`rules.indexing`.
"""
from __future__ import annotations

import builtins

import math

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


def transpose(input, dim0=0, dim1=-1):
    """``x.transpose(dim0, dim1)``; without dims, ``x.t()`` (2-D transpose; 1-D: the identity)."""
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


def _off_batch(*dims):
    """``batch_local`` for ops with dim hyperparameters: local unless one of them is dim 0."""
    def local(ctx):
        rank = len(ctx.shape("input") if "input" in ctx.op_call.args else ctx.shape())
        return all(v % rank != 0 for v in _flat_ints([ctx.const(d, 0) for d in dims]))
    return local


def _flat_ints(value) -> list:
    """Every int in a (nested) tuple/list of dims."""
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _flat_ints(item)]
    return [value]


def _permute_local(ctx):
    return _as_shape(ctx.const("dims"))[0] % len(ctx.shape()) == 0


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
TRANSPOSE = declare_op("transpose", transpose, functions=[torch.transpose, torch.swapaxes, torch.swapdims, torch.t],
                       methods=[tensor_method(m) for m in ("transpose", "swapaxes", "swapdims", "t")],
                       batch_local=_off_batch("dim0", "dim1"))
PERMUTE = declare_op("permute", permute, functions=[torch.permute], methods=[tensor_method("permute")],
                     batch_local=_permute_local)
IDENTITY = declare_op("identity", identity, methods=[tensor_method("contiguous"), tensor_method("clone")],
                      functions=[torch.clone], modules={nn.Identity: lambda m: {}})
CAT = declare_op("cat", cat, functions=[torch.cat, torch.concat, torch.concatenate], batch_local=_off_batch("dim"))
SPLIT = declare_op("split", split, functions=[torch.split], methods=[tensor_method("split")],
                   batch_local=_off_batch("dim"))
CHUNK = declare_op("chunk", chunk, functions=[torch.chunk], methods=[tensor_method("chunk")],
                   batch_local=_off_batch("dim"))


def reshape_back(ctx, g):
    """G(g) = g viewed in the input's shape (J_F is an identity on flattened entries)."""
    return {"input": g.reshape(ctx.saved_shape("input"))}


for _op in (RESHAPE, FLATTEN, UNFLATTEN, SQUEEZE, UNSQUEEZE):
    register_rule(_op, conditions="TPI", complex_values=True)(reshape_back)


@register_rule(TRANSPOSE, conditions="TPI", complex_values=True)
def transpose_back(ctx, g):
    """G(g) = g^T over the same two dims (a transposition is its own inverse)."""
    return {"input": g.transpose(ctx.const("dim0", 0), ctx.const("dim1", -1))}


@register_rule(PERMUTE, conditions="TPI", complex_values=True)
def permute_back(ctx, g):
    """G(g) = g permuted by the inverse permutation."""
    dims = [d % len(ctx.shape()) for d in _as_shape(ctx.const("dims"))]
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return {"input": g.permute(inverse)}


@register_rule(IDENTITY, conditions="TPI", complex_values=True)
def identity_back(ctx, g):
    """G(g) = g."""
    return {"input": g}


@register_rule(CAT, conditions="TPI", complex_values=True)
def cat_back(ctx, g):
    """G(g) = g sliced along ``dim`` at the inputs' sizes (their shapes only: ``ctx.saved_shape``)."""
    tensors = ctx.op_call.args["tensors"]
    sizes = [ctx.saved_shape("tensors", i)[ctx.const("dim", 0)] for i in range(len(tensors))]
    parts = ctx.call(split_sizes, g, sizes, ctx.const("dim", 0))
    return {"tensors": [parts[i] for i in range(len(tensors))]}


def split_sizes(g, sizes, dim):
    return torch.split(g, list(sizes), dim)


@register_rule(SPLIT, conditions="TPI", complex_values=True)
@register_rule(CHUNK, conditions="TPI", complex_values=True)
def pieces_back(ctx, g):
    """G(g_1, ..., g_k) = cat(g_1, ..., g_k) along ``dim``; pieces without feedback count as zeros."""
    by_size = ctx.op_call.spec is SPLIT
    return {"input": ctx.call(cat_or_zeros, g, ctx.saved("input"), by_size,
                              ctx.const("split_size_or_sections") if by_size else ctx.const("chunks"),
                              ctx.const("dim", 0))}


def cat_or_zeros(pieces, input, by_size, size, dim):
    reference = (torch.split(input, size, dim) if by_size else torch.chunk(input, size, dim))
    parts = [p if p is not None else torch.zeros_like(r) for p, r in zip(pieces, reference)]
    return torch.cat(parts, dim)


# -- shared by every copy/selection rule ---------------------------------------------------------
def _ones_like(g):
    return [None if p is None else torch.ones_like(p) for p in g] if isinstance(g, list) else torch.ones_like(g)


def _divide(moved, counts):
    if isinstance(moved, list):
        return [_divide(m, c) for m, c in zip(moved, counts)]
    return None if moved is None else moved / counts.clamp(min=1)


_COPY_TRANSPOSES = {}   # op -> the T rule of a copy/selection op (register_copy_rules)


def pinv_by_counts(ctx, g):
    """Condition P from the T rule of an op whose J is 0/1 with at most one 1 per row:
    G(g) = J^+ g = diag(1/c) J^T g with c = J^T 1 (the T rule applied to ones), 0 where c = 0."""
    transpose = _COPY_TRANSPOSES[ctx.op_call.spec]
    moved, counts = transpose(ctx, g), transpose(ctx, _ones_like(g))
    return {name: _divide(value, counts[name]) for name, value in moved.items()}


def register_copy_rules(op, transpose, inverse_problem, supports=None):
    """T = ``transpose``; P = :func:`pinv_by_counts`; I = ``transpose`` where ``inverse_problem(ctx)``
    returns None (J is then a permutation, J^-1 = J^T), refused with its reason otherwise.
    ``supports(ctx)`` (a reason or None) applies to all three."""
    either = lambda ctx: (supports and supports(ctx)) or inverse_problem(ctx)
    _COPY_TRANSPOSES[op] = transpose
    register_rule(op, conditions="T", supports=supports, complex_values=True)(transpose)
    register_rule(op, conditions="P", supports=supports, complex_values=True)(pinv_by_counts)
    register_rule(op, conditions="I", supports=either, complex_values=True)(transpose)


def _same_size(ctx):
    """I is J^T only when no entry is copied or dropped (as many outputs as inputs)."""
    inputs, outputs = ctx.shape("input"), ctx.shape()
    if math.prod(inputs) != math.prod(outputs):
        return (f"{ctx.op_call.spec.name} maps {math.prod(inputs)} entries to {math.prod(outputs)}, so it has no "
                "inverse; use condition T or P")
    return None


# -- copies: expand, expand_as, broadcast_to, repeat, tile -----------------------------------------
def expand(input, *sizes):
    return input.expand(_as_shape(sizes))


def expand_as(input, other):
    return input.expand_as(other)


def broadcast_to(input, *size):
    return torch.broadcast_to(input, _as_shape(size))


def repeat(input, *repeats):
    return input.repeat(_as_shape(repeats))


def tile(input, dims):
    return torch.tile(input, dims)


def _repeat_local(name):
    """Local when no copy dim is added in front and dim 0 is not repeated."""
    def local(ctx):
        given = ctx.op_call.args[name]
        reps = _as_shape(given) if name == "repeats" else tuple(given)
        if not all(isinstance(r, int) for r in reps):
            return False            # a count computed at run time: not known to leave dim 0 alone
        rank = len(ctx.shape("input"))
        return len(reps) <= rank and (len(reps) < rank or reps[0] == 1)
    return local


def _expand_local(name):
    """Local when no dim is added in front and dim 0 is named -1 (a one-sample replay must work)."""
    def local(ctx):
        sizes = _as_shape(ctx.const(name))
        return len(sizes) == len(ctx.shape("input")) and sizes[0] == -1
    return local


EXPAND = declare_op("expand", expand, methods=[tensor_method("expand")], batch_local=_expand_local("sizes"))
EXPAND_AS = declare_op("expand_as", expand_as, methods=[tensor_method("expand_as")],
                       batch_local=lambda ctx: len(ctx.shape()) == len(ctx.shape("input")), shape_only=("other",))
BROADCAST_TO = declare_op("broadcast_to", broadcast_to, functions=[torch.broadcast_to],
                          methods=[tensor_method("broadcast_to")], batch_local=_expand_local("size"))
REPEAT = declare_op("repeat", repeat, methods=[tensor_method("repeat")], batch_local=_repeat_local("repeats"))
TILE = declare_op("tile", tile, functions=[torch.tile], methods=[tensor_method("tile")],
                  batch_local=_repeat_local("dims"))


def sum_copies(ctx, g):
    """G(g) = g summed over the copies broadcasting made (sum_to_size to the input's shape)."""
    return {"input": g.sum_to_size(ctx.saved_shape("input"))}


def sum_tiles(g, shape):
    """Adjoint of repeat/tile: output dim i is (r_i copies) x (size s_i), so view g as
    (r_0, s_0, r_1, s_1, ...) and sum the r_i dims. The input ``shape`` padded with leading 1s to g's
    rank gives r_i = g.shape[i] / s_i, so repeat counts computed at run time (DeBERTa repeats by the
    batch size) need no constant."""
    padded = (1,) * (g.dim() - len(shape)) + tuple(shape)
    reps = [n // s if s else 1 for n, s in zip(g.shape, padded)]
    interleaved = [size for pair in zip(reps, padded) for size in pair]
    return g.reshape(interleaved).sum(dim=tuple(range(0, 2 * len(reps), 2))).reshape(shape)


def sum_repeats(ctx, g):
    """G(g) = sum over the tiled copies of each entry (repeat and tile)."""
    return {"input": ctx.call(sum_tiles, g, ctx.saved_shape("input"))}


for _op in (EXPAND, EXPAND_AS, BROADCAST_TO):
    register_copy_rules(_op, sum_copies, _same_size)
for _op in (REPEAT, TILE):
    register_copy_rules(_op, sum_repeats, _same_size)


# -- permutations: roll, flip, unbind / stack, .T / .mT --------------------------------------------
def roll(input, shifts, dims=None):
    return torch.roll(input, shifts, dims)


def flip(input, *dims):
    return torch.flip(input, _as_shape(dims))


def fliplr(input):
    return torch.fliplr(input)


def flipud(input):
    return torch.flipud(input)


def unbind(input, dim=0):
    return torch.unbind(input, dim)


def stack(tensors, dim=0):
    return torch.stack(tensors, dim)


def attribute(input, name):
    return getattr(input, name)


TRANSPOSING_ATTRIBUTES = ("T", "mT", "H", "mH")
ROLL = declare_op("roll", roll, functions=[torch.roll], methods=[tensor_method("roll")],
                  batch_local=lambda ctx: ctx.const("dims") is not None and _off_batch("dims")(ctx))
FLIP = declare_op("flip", flip, functions=[torch.flip], methods=[tensor_method("flip")],
                  batch_local=_off_batch("dims"))
FLIPLR = declare_op("fliplr", fliplr, functions=[torch.fliplr], methods=[tensor_method("fliplr")])
FLIPUD = declare_op("flipud", flipud, functions=[torch.flipud], methods=[tensor_method("flipud")],
                    batch_local=lambda ctx: False)
UNBIND = declare_op("unbind", unbind, functions=[torch.unbind], methods=[tensor_method("unbind")],
                    batch_local=_off_batch("dim"))
STACK = declare_op("stack", stack, functions=[torch.stack], batch_local=_off_batch("dim"))
ATTRIBUTE = declare_op("attribute", attribute, functions=[builtins.getattr],
                       batch_local=lambda ctx: ctx.const("name") in ("mT", "mH") and len(ctx.shape()) > 2)


@register_rule(ROLL, conditions="TPI", complex_values=True)
def roll_back(ctx, g):
    """G(g) = roll(g, -shifts, dims): a cyclic shift is orthogonal, its inverse shifts back."""
    shifts = ctx.const("shifts")
    back = [-s for s in shifts] if isinstance(shifts, (tuple, list)) else -shifts
    return {"input": torch.roll(g, back, ctx.const("dims"))}


@register_rule(FLIP, conditions="TPI", complex_values=True)
@register_rule(FLIPLR, conditions="TPI", complex_values=True)
@register_rule(FLIPUD, conditions="TPI", complex_values=True)
def flip_back(ctx, g):
    """G(g) = the same flip of g (a reversal is its own inverse and orthogonal)."""
    spec = ctx.op_call.spec
    return {"input": torch.flip(g, _as_shape(ctx.const("dims"))) if spec is FLIP else spec.apply(g)}


@register_rule(UNBIND, conditions="TPI", complex_values=True)
def stack_back(ctx, g):
    """G(g_1, ..., g_k) = stack(g_1, ..., g_k) along ``dim``; pieces without feedback count as zeros."""
    return {"input": ctx.call(stack_or_zeros, g, ctx.const("dim", 0))}


def stack_or_zeros(pieces, dim):
    present = next(p for p in pieces if p is not None)
    return torch.stack([present.new_zeros(present.shape) if p is None else p for p in pieces], dim)


@register_rule(STACK, conditions="TPI", complex_values=True)
def unbind_back(ctx, g):
    """G(g) = unbind(g, dim): entry i goes back to the i-th stacked tensor."""
    parts = ctx.call(torch.unbind, g, ctx.const("dim", 0))
    return {"tensors": [parts[i] for i in range(len(ctx.op_call.args["tensors"]))]}


def _transposing_attribute(ctx):
    name = ctx.op_call.args.get("name")   # .values / .indices of a named tuple are selects (trace.py)
    if name not in TRANSPOSING_ATTRIBUTES:
        return f"tensor attribute {name!r} has no feedback rule; supported: {', '.join(TRANSPOSING_ATTRIBUTES)}"
    if name.startswith(("H", "mH")) and ctx.dtype() is not None and ctx.dtype().is_complex:
        return f"attribute {name!r} of a complex tensor (conjugation) is not supported"
    return None


@register_rule(ATTRIBUTE, conditions="TPI", supports=_transposing_attribute, complex_values=True)
def attribute_back(ctx, g):
    """``.T``/``.H`` reverse all dims, ``.mT``/``.mH`` swap the last two (real tensors: no conjugation);
    both are permutations, so G(g) = g permuted back by the same (self-inverse) permutation."""
    if ctx.const("name") in ("mT", "mH"):
        return {"input": g.transpose(-2, -1)}
    return {"input": g.permute(tuple(reversed(range(len(ctx.shape())))))}
