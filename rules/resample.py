"""Resampling: ``F.interpolate`` / ``nn.Upsample`` in every mode (nearest, nearest-exact, linear,
bilinear, bicubic, trilinear, area, antialiased), the upsampling of segmentation heads, FPNs and
U-Nets, MobileViT's and BEiT's resizes.

For fixed sizes and mode, y = R x is linear in x and R does not depend on x, so the T rule is its
adjoint, G(g) = R^T g, exact. R^T is taken from autograd as the vjp of the same call at a zero input
of the input's shape (:func:`resample_transpose`): the input is never saved, only its shape, and the
result is what autograd's backward of the call gives, for every mode and option torch has. (R is not
injective for downsampling modes and not surjective for upsampling, so no P or I rule is claimed.)
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                recompute_scale_factor=None, antialias=False):
    return F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)


def _upsample_module(m):
    return {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
            "recompute_scale_factor": getattr(m, "recompute_scale_factor", None)}


INTERPOLATE = declare_op("interpolate", interpolate, functions=[F.interpolate, F.upsample],
                         modules={nn.Upsample: _upsample_module})


def resample_transpose(g, input_shape, scale_factor, mode, align_corners, recompute_scale_factor, antialias):
    """R^T g: the vjp of the same resampling at a zero input of ``input_shape``. Exact, since the
    Jacobian of a linear map is the map. The forward's scale factors are used as given (they place
    the samples, not only the size); otherwise the size is g's, which also serves sizes computed at
    run time (``F.interpolate(x, size=skip.shape[-2:])``)."""
    by_scale = scale_factor is not None and not recompute_scale_factor
    size = None if by_scale else tuple(g.shape[2:])
    resample = partial(F.interpolate, size=size, scale_factor=scale_factor if by_scale else None, mode=mode,
                       align_corners=align_corners, recompute_scale_factor=recompute_scale_factor if by_scale else None,
                       antialias=antialias)
    _, pullback = torch.func.vjp(resample, g.new_zeros(input_shape))   # torch.func: also under vmap
    return pullback(g)[0]


def _constant_scale(ctx):
    scale = ctx.op_call.args.get("scale_factor")
    values = scale if isinstance(scale, (tuple, list)) else [scale]
    if not all(v is None or isinstance(v, (int, float)) for v in values):
        return f"{ctx.name}: interpolate is supported with a constant scale_factor only (got {scale!r})"
    return None


@register_rule(INTERPOLATE, conditions="T", kind="exact", supports=_constant_scale)
def resample_adjoint(ctx, g):
    """G(g) = R^T g, autograd's backward of the same resampling (module docstring)."""
    return {"input": ctx.call(resample_transpose, g, ctx.saved_shape("input"), ctx.const("scale_factor"),
                              ctx.const("mode", "nearest"), ctx.const("align_corners"),
                              ctx.const("recompute_scale_factor"), ctx.const("antialias", False))}
