"""Ops whose T rule is autograd's own vector-Jacobian product at the forward values: statistics
(``var``, ``std``, ``logsumexp``, ``prod``), ``cumsum``, ``square``, the activations ``selu``,
``celu``, ``logsigmoid``, ``softsign``, ``tanhshrink``, ``hardshrink``, ``softshrink`` and ``glu``,
``prelu`` (``nn.PReLU``), ``rms_norm`` (``nn.RMSNorm``), ``instance_norm`` (``nn.InstanceNorm*d``
with each instance's statistics), ``local_response_norm``, ``pixel_shuffle`` / ``pixel_unshuffle``,
``unfold`` / ``fold``, ``maximum`` / ``minimum``, ``addcmul``, ``addcdiv``, ``lerp``, ``triu`` /
``tril``, ``softmin`` (torch.fx; ATen writes it as a softmax), ``mv``, ``outer``, ``threshold``,
``channel_shuffle``, ``cosine_similarity``, ``pairwise_distance``, ``atan2``, ``hypot``, ``diagonal``,
``movedim``, ``cumprod``, ``repeat_interleave``, sliding windows (``Tensor.unfold``) and ``embedding_bag`` (without ``max_norm``, dense gradients).

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
from torch import fx, nn

from fbcompile.ops import declare_op, get_op, substituted, tensor_method
from fbcompile.trace import info
from fbcompile.registry import register_rule


def var(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.var(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def std(input, dim=None, unbiased=None, keepdim=False, correction=None):
    return torch.std(input, dim, correction=_correction(unbiased, correction), keepdim=keepdim)


def _correction(unbiased, correction):
    return correction if correction is not None else (0 if unbiased is False else 1)


def logsumexp(input, dim, keepdim=False):
    return torch.logsumexp(input, dim, keepdim)


def softmin(input, dim=None, _stacklevel=3, dtype=None):
    return F.softmin(input, dim, dtype=dtype)


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


def threshold(input, threshold, value, inplace=False):
    return F.threshold(input, threshold, value)


def channel_shuffle(input, groups):
    return F.channel_shuffle(input, groups)


def cosine_similarity(x1, x2, dim=1, eps=1e-8):
    return F.cosine_similarity(x1, x2, dim, eps)


def pairwise_distance(x1, x2, p=2.0, eps=1e-6, keepdim=False):
    return F.pairwise_distance(x1, x2, p, eps, keepdim)


def atan2(input, other):
    return torch.atan2(input, other)


def hypot(input, other):
    return torch.hypot(input, other)


def diagonal(input, offset=0, dim1=0, dim2=1):
    return torch.diagonal(input, offset, dim1, dim2)


def movedim(input, source, destination):
    return torch.movedim(input, source, destination)


def cumprod(input, dim, dtype=None):
    return torch.cumprod(input, dim, dtype=dtype)


def repeat_interleave(input, repeats, dim=None, output_size=None):
    return torch.repeat_interleave(input, repeats, dim, output_size=output_size)


def unfold_windows(input, dimension, size, step):
    return input.unfold(dimension, size, step)


def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    return F.embedding_bag(input, weight, offsets, None, norm_type, scale_grad_by_freq, mode, False,
                           per_sample_weights, include_last_offset, padding_idx)


def _embedding_bag_module(m):
    return {"weight": m.weight, "max_norm": m.max_norm, "norm_type": m.norm_type, "mode": m.mode, "sparse": m.sparse,
            "scale_grad_by_freq": m.scale_grad_by_freq, "include_last_offset": m.include_last_offset,
            "padding_idx": m.padding_idx}


def _instance_module(m):
    return {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
            "eps": m.eps}


def _keeps_samples_apart(ctx, dims=("dim",), tensor="input", default=None) -> bool:
    """A reduction, scan or move along the dims named by the arguments ``dims`` (all dims where
    one is None), none of which is the batch dim 0."""
    rank = len(ctx.shape(tensor))
    named = [ctx.const(name) for name in dims]
    named = [default if d is None else d for d in named]
    if any(d is None for d in named):
        return False
    flat = [d for value in named for d in (value if isinstance(value, (tuple, list)) else (value,))]
    return rank > 1 and 0 not in {d % rank for d in flat}


def mixes_samples(ctx) -> bool:
    """``batch_local`` of an op that reads the whole tensor at once (a loss, a matrix product of the
    batch, a write at indices anywhere): never batch-local."""
    return False


def _apart(dims=("dim",), tensor="input", default=None):
    return lambda ctx: _keeps_samples_apart(ctx, dims, tensor, default)


VJP_OPS = [
    declare_op("var", var, functions=[torch.var], methods=[tensor_method("var")], batch_local=_keeps_samples_apart),
    declare_op("std", std, functions=[torch.std], methods=[tensor_method("std")], batch_local=_keeps_samples_apart),
    declare_op("logsumexp", logsumexp, functions=[torch.logsumexp], methods=[tensor_method("logsumexp")],
               batch_local=_keeps_samples_apart),
    declare_op("softmin", softmin, functions=[F.softmin], modules={nn.Softmin: lambda m: {"dim": m.dim}},
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
    declare_op("threshold", threshold, functions=[F.threshold], modules={nn.Threshold: lambda m: {
        "threshold": m.threshold, "value": m.value, "inplace": m.inplace}}),
    declare_op("channel_shuffle", channel_shuffle, functions=[F.channel_shuffle],
               modules={nn.ChannelShuffle: lambda m: {"groups": m.groups}}),
    declare_op("cosine_similarity", cosine_similarity, functions=[F.cosine_similarity],
               modules={nn.CosineSimilarity: lambda m: {"dim": m.dim, "eps": m.eps}},
               batch_local=_apart(tensor="x1", default=1)),
    declare_op("pairwise_distance", pairwise_distance, functions=[F.pairwise_distance],
               modules={nn.PairwiseDistance: lambda m: {"p": m.norm, "eps": m.eps, "keepdim": m.keepdim}},
               batch_local=lambda ctx: len(ctx.shape("x1")) > 1),
    declare_op("atan2", atan2, functions=[torch.atan2, torch.arctan2], methods=[tensor_method("atan2")]),
    declare_op("hypot", hypot, functions=[torch.hypot], methods=[tensor_method("hypot")]),
    declare_op("diagonal", diagonal, functions=[torch.diagonal], methods=[tensor_method("diagonal")],
               batch_local=_apart(("dim1", "dim2"), default=0)),
    declare_op("movedim", movedim, functions=[torch.movedim, torch.moveaxis],
               methods=[tensor_method("movedim"), tensor_method("moveaxis")],
               batch_local=_apart(("source", "destination"))),
    declare_op("cumprod", cumprod, functions=[torch.cumprod], methods=[tensor_method("cumprod")],
               batch_local=_keeps_samples_apart),
    declare_op("repeat_interleave", repeat_interleave, functions=[torch.repeat_interleave],
               methods=[tensor_method("repeat_interleave")], batch_local=_keeps_samples_apart),
    declare_op("unfold_windows", unfold_windows, methods=[tensor_method("unfold")],
               batch_local=lambda ctx: ctx.const("dimension") % len(ctx.shape("input")) != 0),
    declare_op("embedding_bag", embedding_bag, functions=[F.embedding_bag], modules={nn.EmbeddingBag: _embedding_bag_module},
               batch_local=lambda ctx: len(ctx.shape("input")) == 2 and ctx.const("offsets") is None),
]


def vjp_at(op_name: str, arguments: dict, slots: tuple, g) -> tuple:
    """J_F^T g for the arguments at ``slots``, ``(name, None)`` for an argument and ``(name, i)`` for
    element i of a list argument, at ``arguments`` (``torch.func``: also under the transforms
    verification applies)."""
    spec = get_op(op_name)
    out, pullback = torch.func.vjp(lambda *xs: spec.run(spec.apply, substituted(arguments, slots, xs)),
                                   *[arguments[n] if i is None else arguments[n][i] for n, i in slots])
    if isinstance(out, tuple):      # feedback at some outputs of a multi-output op: zero at the others
        parts = tuple(torch.zeros_like(o) if part is None else part for o, part in zip(out, g))
        g = parts if type(out) is tuple else type(out)(parts)       # a torch.return_types record
    return pullback(g)


def _refused_options(ctx):
    args = ctx.op_call.args
    if args.get("running_mean") is not None or args.get("use_input_stats") is False:
        return (f"{ctx.name}: instance normalisation with running statistics (track_running_stats=True) is not "
                "supported; each instance's own statistics are")
    refused = {"max_norm": "max_norm (it renormalises "
               "rows of the weight in place during the forward)", "sparse": "sparse=True (sparse gradients)"}
    for name, what in refused.items():
        if args.get(name) not in (None, False):
            return f"{ctx.name}: {ctx.op_call.spec.name} with {what} is not supported"
    return None


def note_parameter_weights(ctx, slotted: tuple = ()) -> None:
    """Tell the context when an input-dependent operand meets a trainable parameter operand (a
    parameter, or a value computed from parameters only) whose forward value the feedback reads
    with no feedback slot (:meth:`~fbcompile.context.RuleContext.weight_without_slot`): fixed random
    or learned feedback cannot stand in for it, so learners with feedback weights refuse the program
    instead of silently feeding back through the true weight. ``slotted``: the arguments the rule
    reads through ``ctx.weight`` (matmul's ``x @ self.W``), which have slots."""
    operands = [(name, v) for name, value in ctx.op_call.args.items()
                for v in (value if isinstance(value, (list, tuple)) else (value,)) if isinstance(v, fx.Node)]
    weights = [v for name, v in operands if info(v).param_only and not (name in slotted and v.op == "get_attr")]
    if weights and any(info(v).from_input for _, v in operands):
        ctx.weight_without_slot()


# products whose parameter operand is a linear map of the input, a weight in FA's sense (filled in by
# the modules declaring them); elsewhere a parameter is a gain or a shape of the op (an exponent, an
# interpolation weight), read as it is, as elementwise scales and normalisation gains are
LINEAR_MAPS: set = set()


def autograd_vjp(ctx, g):
    """J_G g = J_F(x)^T g by autograd's vjp at the saved inputs, for every active argument (each
    active element of a list argument: ``{name: [feedback or None per element]}``). A product's
    parameter operands are read at their forward values (:func:`note_parameter_weights`)."""
    if ctx.op_call.spec in LINEAR_MAPS:
        note_parameter_weights(ctx)
    slots = tuple(dict.fromkeys((name, index) for name, index, _ in ctx.op_call.active))
    grads = ctx.call(vjp_at, ctx.op_call.spec.name, ctx.forward_args(), slots, g)
    feedback = {}
    for i, (name, index) in enumerate(slots):
        if index is None:
            feedback[name] = grads[i]
        else:
            feedback.setdefault(name, [None] * len(ctx.op_call.args[name]))[index] = grads[i]
    return feedback


for _op in VJP_OPS:
    register_rule(_op, conditions="T", kind="linearised", supports=_refused_options, complex_values=True)(autograd_vjp)
