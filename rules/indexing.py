"""Selections: indexing, select, narrow, gather, index_select, padding, masking (max/min: rules.extreme).

Every op here has a 0/1 Jacobian with at most one 1 per row: each output entry is a copy of one
input entry (or a constant). So J^T scatters g back to where the forward read,
*adding* where an entry was read several times (repeated indices, reflected padding), and condition P
is J^+ = diag(1/c) J^T with c = J^T 1 (:func:`rules.structural.pinv_by_counts`). None is invertible
in general (entries are dropped or repeated): condition I is refused with the reason.

- ``x[idx]``: basic indices (ints, negative too, slices with steps, None, ...): G(g) = zeros with g
  written at idx. Advanced indices (integer or boolean tensors, a constant buffer or a value computed
  in forward, lists of ints, mixed with basic ones): the flat input position of every output entry is
  ``arange(numel).reshape(shape)[idx]`` and G(g) = zeros.index_add(positions, g).
- select(dim, i) / narrow(dim, start, length): G(g) = select_scatter / slice_scatter into zeros.
- gather(dim, index): G(g) = zeros.scatter_add(dim, index, g); index_select(dim, index):
  G(g) = zeros.index_add(dim, index, g).
- pad: constant mode: G(g) = pad(g, -pad) (crops; negative pads were crops, their adjoint pads with
  zeros); ``value`` is an offset and does not enter J. reflect / replicate / circular: the padded
  positions map of one plane (the forward pad applied to arange) and G(g) = index_add of g at it, so
  every mirrored, replicated or wrapped copy adds to its source entry.
- where(condition, input, other), condition a constant (or boolean, which carries no derivative):
  G_input(g) = where(c, g, 0), G_other(g) = where(c, 0, g), each summed to its operand's shape;
  masked_fill(mask, value): G_input(g) = g with masked entries zeroed; an active 0-dim value gets
  the sum of g over the mask.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fbcompile.ops import declare_op, tensor_method
from fbcompile.trace import info

from .structural import _off_batch, register_copy_rules


def _selection_rules(op, transpose, supports=None):
    """T, P (by counts) and a refused I for an op that may drop or repeat entries."""
    register_copy_rules(op, transpose, lambda ctx: (
        f"{ctx.op_call.spec.name} selects entries (it may drop or repeat some), so it has no inverse; "
        "use condition T or P"), supports)


# -- x[idx] -------------------------------------------------------------------------------------------
BASIC = (int, slice, type(None), type(Ellipsis))


def index(input, idx):
    return input[idx]


def _items(idx):
    return idx if isinstance(idx, tuple) else (idx,)


def _is_advanced(item) -> bool:
    return isinstance(item, (fx.Node, list, torch.Tensor)) or isinstance(item, bool)


def _index_local(ctx):
    """Batch-local when dim 0 is kept whole (``x[:, ...]``, or ``x[..., i]`` not reaching it) and at
    most one advanced index is used (several separated ones move their dims to the front)."""
    items = _items(ctx.op_call.args["idx"])
    if sum(_is_advanced(i) for i in items) > 1 or not items:
        return False
    if items[0] == slice(None):
        return True
    used = sum(len(info(i).shape) if isinstance(i, fx.Node) and info(i).dtype == torch.bool else 1
               for i in items[1:] if i is not None)
    return items[0] is Ellipsis and used < len(ctx.shape("input"))


INDEX = declare_op("index", index, functions=[operator.getitem], batch_local=_index_local)


def _index_problem(ctx):
    for item in _items(ctx.op_call.args["idx"]):
        if isinstance(item, list) and any(isinstance(v, fx.Node) for v in item):
            return f"index list {item} holds run-time values; use a tensor (a buffer) of indices"
        if not isinstance(item, BASIC) and not _is_advanced(item):
            return f"index {item!r} of type {type(item).__name__} is not supported"
    return None


def _index_value(ctx):
    """The index with every graph value in it resolved (a saved forward value), slice bounds computed
    at run time (``x[..., : x.shape[-1] // 2]``) included."""
    idx = ctx.op_call.args["idx"]
    if isinstance(idx, fx.Node):
        return ctx.saved("idx")

    def item_value(i, item):
        if isinstance(item, fx.Node):
            return ctx.saved("idx", i)
        return ctx.run_time(item)           # slice bounds computed at run time
    if isinstance(idx, tuple):
        return tuple(item_value(i, item) for i, item in enumerate(idx))
    return item_value(None, idx)


def index_adjoint(g, shape, idx):
    """Zeros of the input's ``shape`` with ``g`` written at the basic (never repeating) index ``idx``.
    The zeros come from ``g`` (``new_zeros``), so under torch.func's vmap the write is batched."""
    out = g.new_zeros(shape)
    out[idx] = g
    return out


def advanced_index_adjoint(g, shape, idx):
    """Zeros of the input's ``shape`` with every entry of ``g`` added at the input position it was
    read from: positions = arange(numel).reshape(shape)[idx] (repeated indices add up)."""
    numel = math.prod(shape)
    positions = torch.arange(numel, device=g.device).reshape(shape)[idx]
    flat = g.new_zeros(numel).index_add(0, positions.reshape(-1), g.reshape(-1))
    return flat.reshape(shape)


def index_scatter(ctx, g):
    """G(g) = zeros with g placed (added, for advanced indices) where the forward read."""
    idx = ctx.op_call.args["idx"]
    basic = all(isinstance(i, BASIC) and not isinstance(i, bool) for i in _items(idx))
    fn = index_adjoint if basic else advanced_index_adjoint
    return {"input": ctx.call(fn, g, ctx.saved_shape("input"), _index_value(ctx)), "idx": None}


# -- select, narrow, gather, index_select -----------------------------------------------------------
def select(input, dim, index):
    return torch.select(input, dim, index)


def narrow(input, dim, start, length):
    return torch.narrow(input, dim, start, length)


def gather(input, dim, index, sparse_grad=False):
    return torch.gather(input, dim, index)


def index_select(input, dim, index):
    return torch.index_select(input, dim, index)


SELECT = declare_op("select", select, functions=[torch.select], methods=[tensor_method("select")],
                    batch_local=_off_batch("dim"))
NARROW = declare_op("narrow", narrow, functions=[torch.narrow], methods=[tensor_method("narrow")],
                    batch_local=_off_batch("dim"))
GATHER = declare_op("gather", gather, functions=[torch.gather], methods=[tensor_method("gather")],
                    batch_local=_off_batch("dim"))
INDEX_SELECT = declare_op("index_select", index_select, functions=[torch.index_select],
                          methods=[tensor_method("index_select")], batch_local=_off_batch("dim"))


def narrow_adjoint(g, shape, dim, start, length):
    start = start % shape[dim]
    return torch.slice_scatter(g.new_zeros(shape), g, dim, start, start + length)


def select_scatter(ctx, g):
    """G(g) = zeros with g written at ``index`` along ``dim`` (select_scatter)."""
    return {"input": ctx.call(torch.select_scatter, ctx.call(zeros_from, g, ctx.saved_shape("input")), g,
                              ctx.const("dim"), ctx.const("index"))}


def slice_scatter(ctx, g):
    """G(g) = zeros with g written at start .. start + length along ``dim`` (slice_scatter)."""
    return {"input": ctx.call(narrow_adjoint, g, ctx.saved_shape("input"), ctx.const("dim"), ctx.const("start"),
                              ctx.const("length"))}


def zeros_from(g, shape):
    """Zeros of the input's ``shape`` (only its shape is read: ``ctx.saved_shape``)."""
    return g.new_zeros(shape)


def scatter_add(ctx, g):
    """gather: G(g) = zeros.scatter_add(dim, index, g); index_select: zeros.index_add(dim, index, g)."""
    zeros, dim = ctx.call(zeros_from, g, ctx.saved_shape("input")), ctx.const("dim")
    if ctx.op_call.spec is GATHER:
        return {"input": zeros.scatter_add(dim, ctx.saved("index"), g), "index": None}
    return {"input": zeros.index_add(dim, ctx.saved("index"), g), "index": None}


def _constant_positions(ctx):
    for name in ("dim", "index", "start", "length"):
        value = ctx.op_call.args.get(name)
        if isinstance(value, fx.Node):
            return f"argument {name!r} of {ctx.op_call.spec.name} is a run-time value; only constants are supported"
    return None


for _op, _rule, _supports in ((INDEX, index_scatter, _index_problem), (SELECT, select_scatter, _constant_positions),
                             (NARROW, slice_scatter, _constant_positions), (GATHER, scatter_add, None),
                             (INDEX_SELECT, scatter_add, None)):
    _selection_rules(_op, _rule, _supports)


# -- pad ------------------------------------------------------------------------------------------------
def pad(input, pad, mode="constant", value=None):
    return F.pad(input, pad, mode, value)


def _pad_module(mode):
    return lambda m: {"pad": tuple(m.padding), "mode": mode, **({"value": m.value} if mode == "constant" else {})}


_PAD_MODULES = {getattr(nn, f"{kind}Pad{n}d"): _pad_module(mode) for n in (1, 2, 3)
                for kind, mode in (("Zero", "constant"), ("Constant", "constant"), ("Reflection", "reflect"),
                                   ("Replication", "replicate"), ("Circular", "circular"))}
PAD = declare_op("pad", pad, functions=[F.pad], modules=_PAD_MODULES,
                 batch_local=lambda ctx: len(ctx.const("pad")) // 2 < len(ctx.shape("input")))


def padded_positions(shape, pad, mode, device):
    """For each entry of one padded plane (the last len(pad) // 2 dims of an input of ``shape``), the
    flat position of the input entry it copies: the forward pad applied to arange (float64 holds
    these integers exactly)."""
    n = len(pad) // 2
    plane = tuple(shape[-n:])
    source = torch.arange(math.prod(plane), dtype=torch.float64, device=device).reshape((1,) + plane)
    return F.pad(source, pad, mode).reshape(-1).long()


def mode_pad_adjoint(g, shape, pad, mode):
    """Adjoint of reflect / replicate / circular padding: every copy adds to its source entry."""
    n = len(pad) // 2
    flat = g.reshape(tuple(g.shape[:-n]) + (-1,))
    plane = math.prod(shape[-n:])
    positions = padded_positions(shape, pad, mode, g.device)
    out = flat.new_zeros(tuple(g.shape[:-n]) + (plane,)).index_add(-1, positions, flat)
    return out.reshape(shape)


def pad_back(ctx, g):
    """Constant mode: G(g) = pad(g, -pad) (crop; the fill value is an offset, not in J). Other modes:
    G(g) = the padded entries added back onto the entries they copy (:func:`mode_pad_adjoint`)."""
    pads, mode = tuple(ctx.sizes("pad")), ctx.const("mode", "constant")
    if mode == "constant":
        return {"input": F.pad(g, tuple(-p for p in pads))}
    return {"input": ctx.call(mode_pad_adjoint, g, ctx.saved_shape("input"), pads, mode)}


def _pad_problem(ctx):
    if ctx.const("mode", "constant") not in ("constant", "reflect", "replicate", "circular"):
        return f"pad mode {ctx.const('mode')!r} is not supported"
    return None


_selection_rules(PAD, pad_back, _pad_problem)


# -- where, masked_fill -----------------------------------------------------------------------------------
def where(condition, input, other):
    return torch.where(condition, input, other)


def tensor_where(input, condition, other):
    return torch.where(condition, input, other)


def masked_fill(input, mask, value):
    return torch.masked_fill(input, mask, value)


WHERE = declare_op("where", where, functions=[torch.where])
TENSOR_WHERE = declare_op("tensor_where", tensor_where, methods=[tensor_method("where")])
MASKED_FILL = declare_op("masked_fill", masked_fill, functions=[torch.masked_fill],
                         methods=[tensor_method("masked_fill")], inplace=[tensor_method("masked_fill_")])


def _graph_value(ctx, name):
    """A tensor argument as a value: saved when it is a graph value, else the constant itself."""
    return ctx.saved(name) if isinstance(ctx.op_call.args.get(name), fx.Node) else ctx.const(name)


def where_split(ctx, g):
    """G_input(g) = where(c, g, 0), G_other(g) = where(c, 0, g), each summed to its operand's shape."""
    condition, fed = _graph_value(ctx, "condition"), {"condition": None}
    for name, keep in (("input", True), ("other", False)):
        if ctx.is_active(name):
            chosen = ctx.call(where_part, g, condition, keep)
            fed[name] = chosen.sum_to_size(ctx.saved_shape(name))
    return fed


def where_part(g, condition, keep):
    zeros = g.new_zeros(())
    return torch.where(condition, g, zeros) if keep else torch.where(condition, zeros, g)


def mask_back(ctx, g):
    """G_input(g) = g with the masked entries zeroed; an active fill value gets sum(g over the mask)."""
    mask = _graph_value(ctx, "mask")
    fed = {"input": g.masked_fill(mask, 0), "mask": None, "value": None}
    if ctx.is_active("value"):
        fed["value"] = ctx.call(where_part, g, mask, True).sum()
    return fed


def _value_shape(ctx):
    if ctx.is_active("value") and len(ctx.shape("value")) != 0:
        return "masked_fill needs a 0-dim value"
    return None


for _op in (WHERE, TENSOR_WHERE):
    _selection_rules(_op, where_split)
_selection_rules(MASKED_FILL, mask_back, _value_shape)
