"""Ops whose T rule is autograd's own vector-Jacobian product at the forward values: statistics
(``var``, ``std``, ``logsumexp``, ``prod``), ``cumsum``, ``square``, the activations ``selu``,
``celu``, ``logsigmoid``, ``softsign``, ``tanhshrink``, ``hardshrink``, ``softshrink`` and ``glu``,
``prelu`` (``nn.PReLU``), ``rms_norm`` (``nn.RMSNorm``), ``instance_norm`` (``nn.InstanceNorm*d``
with each instance's statistics), ``local_response_norm``, ``pixel_shuffle`` / ``pixel_unshuffle``,
``unfold`` / ``fold``, ``maximum`` / ``minimum``, ``addcmul``, ``addcdiv``, ``lerp``, ``triu`` /
``tril``, ``mv`` and ``outer``.

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


def prod(input, dim=None, keepdim=False, dtype=None):
    return torch.prod(input, dtype=dtype) if dim is None else torch.prod(input, dim, keepdim, dtype=dtype)


def addcmul(input, tensor1, tensor2, value=1):
    return torch.addcmul(input, tensor1, tensor2, value=value)


def addcdiv(input, tensor1, tensor2, value=1):
    return torch.addcdiv(input, tensor1, tensor2, value=value)


def lerp(input, end, fraction):
    """``torch.lerp(input, end, weight)``; its ``weight`` is named ``fraction`` here, as an argument
    named weight marks an op holding weights (units, feedback weights)."""
    return torch.lerp(input, end, fraction)


def triu(input, diagonal=0):
    return torch.triu(input, diagonal)


def tril(input, diagonal=0):
    return torch.tril(input, diagonal)


def mv(input, vec):
    return torch.mv(input, vec)


def outer(input, vec2):
    return torch.outer(input, vec2)


def unfold(input, kernel_size, dilation=1, padding=0, stride=1):
    return F.unfold(input, kernel_size, dilation, padding, stride)


def fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    return F.fold(input, output_size, kernel_size, dilation, padding, stride)


def hardshrink(input, lambd=0.5):
    return F.hardshrink(input, lambd)


def softshrink(input, lambd=0.5):
    return F.softshrink(input, lambd)


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    return F.local_response_norm(input, size, alpha, beta, k)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    return F.instance_norm(input, None, None, weight, bias, True, momentum, eps)


def _instance_module(m):
    return {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
            "eps": m.eps}


def _keeps_samples_apart(ctx) -> bool:
    """A reduction or scan along dims that do not include the batch dim 0."""
    dim = ctx.const("dim")
    rank = len(ctx.shape("input"))
    dims = range(rank) if dim is None else (dim if isinstance(dim, (tuple, list)) else (dim,))
    return 0 not in {d % rank for d in dims}


VJP_OPS = [
    declare_op("var", var, functions=[torch.var], methods=[tensor_method("var")], batch_local=_keeps_samples_apart),
    declare_op("std", std, functions=[torch.std], methods=[tensor_method("std")], batch_local=_keeps_samples_apart),
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
    declare_op("prod", prod, functions=[torch.prod], methods=[tensor_method("prod")], batch_local=_keeps_samples_apart),
    declare_op("addcmul", addcmul, functions=[torch.addcmul], methods=[tensor_method("addcmul")]),
    declare_op("addcdiv", addcdiv, functions=[torch.addcdiv], methods=[tensor_method("addcdiv")]),
    declare_op("lerp", lerp, functions=[torch.lerp], methods=[tensor_method("lerp")]),
    declare_op("triu", triu, functions=[torch.triu], methods=[tensor_method("triu")], batch_local=lambda ctx: False),
    declare_op("tril", tril, functions=[torch.tril], methods=[tensor_method("tril")], batch_local=lambda ctx: False),
    declare_op("mv", mv, functions=[torch.mv], methods=[tensor_method("mv")], batch_local=lambda ctx: False),
    declare_op("outer", outer, functions=[torch.outer, torch.ger], methods=[tensor_method("outer")],
               batch_local=lambda ctx: False),
    declare_op("unfold", unfold, functions=[F.unfold], modules={nn.Unfold: lambda m: {
        "kernel_size": m.kernel_size, "dilation": m.dilation, "padding": m.padding, "stride": m.stride}}),
    declare_op("fold", fold, functions=[F.fold], modules={nn.Fold: lambda m: {
        "output_size": m.output_size, "kernel_size": m.kernel_size, "dilation": m.dilation, "padding": m.padding,
        "stride": m.stride}}),
    declare_op("hardshrink", hardshrink, functions=[F.hardshrink], modules={nn.Hardshrink: lambda m: {"lambd": m.lambd}}),
    declare_op("softshrink", softshrink, functions=[F.softshrink], modules={nn.Softshrink: lambda m: {"lambd": m.lambd}}),
    declare_op("local_response_norm", local_response_norm, functions=[F.local_response_norm],
               modules={nn.LocalResponseNorm: lambda m: {"size": m.size, "alpha": m.alpha, "beta": m.beta, "k": m.k}}),
    declare_op("instance_norm", instance_norm, functions=[F.instance_norm],
               modules={cls: _instance_module for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)}),
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
    if ctx.op_call.args.get("running_mean") is not None or ctx.op_call.args.get("use_input_stats") is False:
        return (f"{ctx.name}: instance normalisation with running statistics (track_running_stats=True) is not "
                "supported; each instance's own statistics are")
    return None


def autograd_vjp(ctx, g):
    """J_G g = J_F(x)^T g by autograd's vjp at the saved inputs, for every active argument."""
    roles = tuple(dict.fromkeys(name for name, _, _ in ctx.op_call.active))
    grads = ctx.call(vjp_at, ctx.op_call.spec.name, ctx.forward_args(), roles, g)
    return {role: grads[i] for i, role in enumerate(roles)}


for _op in VJP_OPS:
    register_rule(_op, conditions="T", kind="linearised", supports=_whole_arguments)(autograd_vjp)
