"""Max unpooling (1d, 2d, 3d): the partial inverse of a max pool that returned its indices.

y = MaxUnpool(x, idx) writes each entry of x at its index in a zero plane of the output size:
y_flat[idx_j] = x_j within every (sample, channel) plane; the indices are an integer input that no
feedback reaches. J_F has one unit entry per column (x_j's position idx_j), so

    T (exact): G(g) = J^T g = gather(g_flat, idx), g read at every input's index,

autograd's derivative too. This is J's transpose only while the indices of a plane are distinct: a
repeated index (overlapping pooling windows can select one position twice) makes MaxUnpool keep one
of the writes, chosen by the kernel, and the other input gets no derivative at all. So the
indices are known distinct (they come straight from a max pool whose windows do not overlap) or are
checked at every step, and a repeat fails the step naming the node. Learners that differentiate a
unit with autograd itself (Mono-Forward's and DDTP's local losses) would get autograd's gather:
the tapped forward checks the indices whenever autograd will differentiate it. Distinct indices make the
columns orthonormal, J^T J = I and J^+ = J^T: P is the same gather. y has more entries than x, so
there is no inverse (I is refused). Under torch.export the output size arrives resolved
(aten.max_unpool2d/3d) and the kernel size is absent: the op then calls the ATen kernel itself.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fbcompile.errors import FBCompileError
from fbcompile.ops import declare_op
from fbcompile.registry import register_rule
from fbcompile.trace import info

from .pool import MAX_POOLS, window_sizes

aten = torch.ops.aten


def max_unpool1d(input, indices, kernel_size=None, stride=None, padding=0, output_size=None):
    return F.max_unpool1d(input, indices, kernel_size, stride, padding, output_size)


def max_unpool2d(input, indices, kernel_size=None, stride=None, padding=0, output_size=None):
    if kernel_size is None:           # torch.export's aten.max_unpool2d: the output size is resolved
        return aten.max_unpool2d(input, indices, output_size)
    return F.max_unpool2d(input, indices, kernel_size, stride, padding, output_size)


def max_unpool3d(input, indices, kernel_size=None, stride=None, padding=0, output_size=None):
    if kernel_size is None:           # torch.export's aten.max_unpool3d
        return aten.max_unpool3d(input, indices, output_size, stride, padding)
    return F.max_unpool3d(input, indices, kernel_size, stride, padding, output_size)


def _checked_under_autograd(apply, n_spatial: int):
    """The tapped forward: ``apply``, its indices checked when autograd will differentiate it
    (Mono-Forward's and DDTP's local losses differentiate their units with autograd itself, whose
    gather is wrong at a repeated index). Its one extra, ``checked``, is those indices."""
    def tapped(input, indices, kernel_size=None, stride=None, padding=0, output_size=None):
        out = apply(input, indices, kernel_size, stride, padding, output_size)
        if torch.is_grad_enabled() and input.requires_grad:
            check_distinct(indices, out, n_spatial, f"max_unpool{n_spatial}d")
        return out, indices
    tapped.__name__ = tapped.__qualname__ = f"max_unpool{n_spatial}d_tapped"
    return tapped


def _module(m):
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding}


MAX_UNPOOL1D = declare_op("max_unpool1d", max_unpool1d, functions=[F.max_unpool1d], modules={nn.MaxUnpool1d: _module},
                            tapped=_checked_under_autograd(max_unpool1d, 1), extras=("checked",))
MAX_UNPOOL2D = declare_op("max_unpool2d", max_unpool2d, functions=[F.max_unpool2d], modules={nn.MaxUnpool2d: _module},
                            tapped=_checked_under_autograd(max_unpool2d, 2), extras=("checked",))
MAX_UNPOOL3D = declare_op("max_unpool3d", max_unpool3d, functions=[F.max_unpool3d], modules={nn.MaxUnpool3d: _module},
                            tapped=_checked_under_autograd(max_unpool3d, 3), extras=("checked",))
SPATIAL_DIMS = {MAX_UNPOOL1D: 1, MAX_UNPOOL2D: 2, MAX_UNPOOL3D: 3}


def gather_at_indices(g, indices, n_spatial: int, check_distinct_at: str | None = None):
    """J^T g: the output error read at each input's flat position within its plane. With
    ``check_distinct_at`` (the node's name) the indices are first checked to be distinct per plane."""
    if check_distinct_at is not None:
        check_distinct(indices, g, n_spatial, check_distinct_at)
    flat_indices = indices.flatten(start_dim=-n_spatial)
    return g.flatten(start_dim=-n_spatial).gather(-1, flat_indices).reshape(indices.shape)


def check_distinct(indices, output, n_spatial: int, where: str) -> None:
    """Raise, naming ``where``, when a plane of ``indices`` holds one index twice: writes counted per
    position of the ``output`` plane, linear in its size (half a sort's time)."""
    flat = indices.flatten(start_dim=-n_spatial)
    counts = flat.new_zeros(flat.shape[:-1] + (output.shape[-n_spatial:].numel(),), dtype=torch.int32)
    if bool((counts.scatter_add_(-1, flat, torch.ones_like(flat, dtype=torch.int32)) > 1).any()):
        raise FBCompileError(
            f"{where}: max unpooling got one index twice within a plane (overlapping pooling windows can "
            f"select one position twice); MaxUnpool then keeps one of the writes, chosen by the kernel, so "
            f"J^T is not the gather autograd assumes. Use pooling windows that do not overlap")


def gather(ctx, g):
    """G(g) = J^T g = J^+ g: g gathered at the unpooling indices (the indices get no feedback), once
    the indices are known, or checked, to be distinct."""
    check = None if _known_distinct(ctx) else ctx.name
    return {"input": ctx.call(gather_at_indices, g, ctx.saved("indices"), SPATIAL_DIMS[ctx.op_call.spec], check),
            "indices": None}


def _known_distinct(ctx) -> bool:
    """Whether the indices come straight from a max pool whose windows do not overlap (stride at
    least the dilated kernel extent), so that each plane's indices are distinct."""
    indices = ctx.op_call.args.get("indices")
    if not (isinstance(indices, fx.Node) and indices.target is operator.getitem):
        return False
    pool = indices.args[0]
    call = info(pool).call if isinstance(pool, fx.Node) else None
    if call is None or call.spec not in MAX_POOLS:
        return False
    n = MAX_POOLS[call.spec]
    kernel = window_sizes(call.args.get("kernel_size"), None, n)
    stride = window_sizes(call.args.get("stride"), kernel, n)
    dilation = window_sizes(call.args.get("dilation", 1), 1, n)
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


def _no_inverse(ctx):
    return f"{ctx.op_call.spec.name} has more outputs than inputs, so it has no inverse; use condition T or P"


for _op in SPATIAL_DIMS:
    register_rule(_op, conditions="TP")(gather)
    register_rule(_op, conditions="I", supports=_no_inverse)(gather)
