"""Ops whose T rule is autograd's own vector-Jacobian product at the forward values: statistics
(``var``, ``std``, ``logsumexp``), ``cumsum``, ``square``, the activations ``selu``, ``celu``,
``logsigmoid``, ``softsign``, ``tanhshrink`` and ``glu``, ``prelu`` (``nn.PReLU``), ``rms_norm``
(``nn.RMSNorm``), ``pixel_shuffle`` / ``pixel_unshuffle`` and ``maximum`` / ``minimum`` of two tensors.

T (kind "linearised"): J_G g = J_F(x)^T g, computed by ``torch.func.vjp`` of the op at its saved
inputs, so error mode gives autograd's gradient to rounding (ties of maximum/minimum split as
autograd splits them) and every active input gets its share (both of maximum's arguments). The map
is linear in g: target modes move a target by the Jacobian at the forward value, which keeps DTP's
small-beta limit; no P or I rule is claimed. Parameters (PReLU's slopes, RMSNorm's gain) get their
gradients from the op's vjp too (the default ``param_grads``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op, get_op, tensor_method
from fbcompile.registry import register_rule


def var(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.var(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def std(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.std(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def _correction(unbiased, correction):
    return correction if correction is not None else (0 if unbiased is False else 1)


def logsumexp(input, dim, keepdim=False):
    return torch.logsumexp(input, dim, keepdim)


def cumsum(input, dim, dtype=None):
    return torch.cumsum(input, dim, dtype=dtype)


def square(input):
    return torch.square(input)


def selu(input, inplace=False):
    return F.selu(input)


def celu(input, alpha=1.0, inplace=False):
    return F.celu(input, alpha)


def logsigmoid(input):
    return F.logsigmoid(input)


def softsign(input):
    return F.softsign(input)


def tanhshrink(input):
    return F.tanhshrink(input)


def glu(input, dim=-1):
    return F.glu(input, dim)


def prelu(input, weight):
    return F.prelu(input, weight)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    return F.rms_norm(input, normalized_shape, weight, eps)


def pixel_shuffle(input, upscale_factor):
    return F.pixel_shuffle(input, upscale_factor)


def pixel_unshuffle(input, downscale_factor):
    return F.pixel_unshuffle(input, downscale_factor)


def maximum(input, other):
    return torch.maximum(input, other)


def minimum(input, other):
    return torch.minimum(input, other)


def _keeps_samples_apart(ctx) -> bool:
    """A reduction or scan along dims that do not include the batch dim 0."""
    dim = ctx.const("dim")
    rank = len(ctx.shape("input"))
    dims = range(rank) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return 0 not in {d % rank for d in dims}


VAR = declare_op("var", var, functions=[torch.var], methods=[tensor_method("var")], batch_local=_keeps_samples_apart)
STD = declare_op("std", std, functions=[torch.std], methods=[tensor_method("std")], batch_local=_keeps_samples_apart)
VJP_OPS = [
    VAR, STD,
    declare_op("logsumexp", logsumexp, functions=[torch.logsumexp], methods=[tensor_method("logsumexp")],
               batch_local=_keeps_samples_apart),
    declare_op("cumsum", cumsum, functions=[torch.cumsum], methods=[tensor_method("cumsum")],
               batch_local=_keeps_samples_apart),
    declare_op("square", square, functions=[torch.square], methods=[tensor_method("square")]),
    declare_op("selu", selu, functions=[F.selu], modules={nn.SELU: lambda m: {"inplace": m.inplace}}),
    declare_op("celu", celu, functions=[F.celu], modules={nn.CELU: lambda m: {"alpha": m.alpha, "inplace": m.inplace}}),
    declare_op("logsigmoid", logsigmoid, functions=[F.logsigmoid], modules={nn.LogSigmoid: lambda m: {}}),
    declare_op("softsign", softsign, functions=[F.softsign], modules={nn.Softsign: lambda m: {}}),
    declare_op("tanhshrink", tanhshrink, functions=[F.tanhshrink], modules={nn.Tanhshrink: lambda m: {}}),
    declare_op("glu", glu, functions=[F.glu], modules={nn.GLU: lambda m: {"dim": m.dim}}),
    declare_op("prelu", prelu, functions=[F.prelu], modules={nn.PReLU: lambda m: {"weight": m.weight}}),
    declare_op("rms_norm", rms_norm, functions=[F.rms_norm],
               modules={nn.RMSNorm: lambda m: {"normalized_shape": m.normalized_shape, "weight": m.weight,
                                               "eps": m.eps}}),
    declare_op("pixel_shuffle", pixel_shuffle, functions=[F.pixel_shuffle],
               modules={nn.PixelShuffle: lambda m: {"upscale_factor": m.upscale_factor}}),
    declare_op("pixel_unshuffle", pixel_unshuffle, functions=[F.pixel_unshuffle],
               modules={nn.PixelUnshuffle: lambda m: {"downscale_factor": m.downscale_factor}}),
    declare_op("maximum", maximum, functions=[torch.maximum]),
    declare_op("minimum", minimum, functions=[torch.minimum]),
]


def vjp_at(op_name: str, arguments: dict, roles: tuple, g) -> tuple:
    """J_F^T g for the arguments named in ``roles``, at ``arguments`` (``torch.func``: also under the
    transforms verification applies)."""
    spec = get_op(op_name)
    _, pullback = torch.func.vjp(lambda *xs: spec.run(spec.apply, {**arguments, **dict(zip(roles, xs))}),
                                 *[arguments[r] for r in roles])
    return pullback(g)


def _whole_arguments(ctx):
    if any(index is not None for _, index, _ in ctx.op_call.active):
        return f"{ctx.name}: an activation inside a list argument of {ctx.op_call.spec.name} is not supported"
    return None


def autograd_vjp(ctx, g):
    """J_G g = J_F(x)^T g by autograd's vjp at the saved inputs, for every active argument."""
    roles = tuple(dict.fromkeys(name for name, _, _ in ctx.op_call.active))
    grads = ctx.call(vjp_at, ctx.op_call.spec.name, ctx.forward_args(), roles, g)
    return {role: grads[i] for i, role in enumerate(roles)}


for _op in VJP_OPS:
    register_rule(_op, conditions="T", kind="linearised", supports=_whole_arguments)(autograd_vjp)
