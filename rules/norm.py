"""Normalisation: LayerNorm, BatchNorm, GroupNorm (frozen or exact statistics) and F.normalize.

LayerNorm over the last dims (d entries): y = gamma * x_hat + beta, x_hat = (x - mu) / sigma.
Paper 002 (eq. 30-35) splits it into mean-centering C = I - (1/d) 1 1^T (linear, symmetric) and the
scaling 1/sigma, with sigma frozen from the forward pass. T (kind "frozen-statistics"):

    G(g) = (1/sigma) C (gamma * g)

The exact Jacobian is J_F = diag(gamma) (1/sigma) (C - x_hat x_hat^T / d), so J_G - J_F^T is the
dropped term x_hat x_hat^T diag(gamma) / (d sigma): for gamma = 1 and unit-variance rows its Frobenius
norm is 1/sigma (ALGORITHMS.md check 4). Weight gradients: dgamma = sum g * x_hat, dbeta = sum g.

Variant "exact-statistics" (kind "exact"): the full transpose J_F^T g = (1/sigma) (C (gamma g) -
x_hat mean(x_hat gamma g)), which also differentiates through the statistics, so error propagation
and DTP with beta -> 0 equal true BP. Which rule a mode uses is chosen per mode family
(fbcompile.compiler.DEFAULT_VARIANTS): error modes (bp, fa, dfa, sdfa, drtp, every error path)
prefer "exact-statistics" (autograd's backward); target modes (TP, DTP) keep the frozen statistics
of paper 002. ``compile(..., variants={"error": ()})`` or ``{"target": ("exact-statistics",)}``
chooses otherwise; a plain tuple applies to both.

BatchNorm (per channel c, statistics over the N = batch * spatial entries). The tapped forward is
torch.native_batch_norm, which also returns the batch mean and invstd = 1/sqrt(var_B + eps) (and
updates the running statistics exactly as the module would); the feedback never recomputes them.
Exact (both modes, and "exact-statistics" in train mode): ONE aten.native_batch_norm_backward per
BN gives, with x_hat = (x - mean) invstd,

    dbeta = sum g,   dgamma = sum g x_hat,   dx = gamma invstd (g - dbeta / N - x_hat dgamma / N)

(the rule and the weight-gradient formula share that call; bitwise equal to autograd). In eval mode
the map is affine, dx = gamma g / sqrt(running_var + eps), and both rules are exact. Frozen statistics
(train mode, kind "frozen-statistics"): 1/sigma_B is held constant but the centering kept, i.e. the
exact dx without its x_hat dgamma / N term:

    dx = (g - dbeta / N) gamma invstd,

with dbeta the same kernel's where the weight gradients are emitted too, else one sum of g.

GroupNorm (input (N, C, *), C split into G groups; statistics per sample and group over the group's
channels and spatial dims): the same two rules over each group, gamma and beta per channel. T (kind
"frozen-statistics"): G(g) = (1/sigma) C_group (gamma * g); variant "exact-statistics" (kind "exact"):
the full transpose (1/sigma) (C_group (gamma g) - x_hat mean_group(x_hat gamma g)).

F.normalize with p = 2 over dims D: y = x / max(n, eps), n = ||x|| over D. Where n >= eps (torch's
clamp_min passes the gradient at n = eps), J = (I - y y^T) / n, else J = I / eps; both symmetric.
T: J^T g = (g - y <y, g>) / max(n, eps) (the y term only where n >= eps); target map the
linearisation x + J^T (t - h), kind "linearised" (the norm is lost: no inverse). P: I - y y^T is an
orthogonal projector (|y| = 1), so J^+ g = max(n, eps) (g - y <y, g>) (again the y term only where
n >= eps). I is refused where n >= eps (J y = 0). Other p: T is autograd's vjp (same linearised
target map), P and I are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule
from fbcompile.trace import info

from .kernel_dtypes import like
from .vjp_ops import autograd_vjp


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


def layer_norm_tapped(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Forward that also returns the statistics: (y, mean, rstd), via torch.native_layer_norm."""
    return torch.native_layer_norm(input, list(normalized_shape), weight, bias, eps)


def _norm_dims(ctx):
    shape = ctx.const("normalized_shape")
    count = 1 if isinstance(shape, int) else len(shape)
    return tuple(range(-count, 0))


def layer_norm_param_grads(ctx, g):
    """dgamma = sum over leading dims of g * x_hat; dbeta = sum of g."""
    dims = len(_norm_dims(ctx))
    x_hat = (ctx.saved("input") - ctx.saved("mean")) * ctx.saved("rstd")
    lead = tuple(range(len(ctx.shape()) - dims))
    return {"weight": (g * x_hat).sum(lead), "bias": g.sum(lead)}


LAYER_NORM = declare_op("layer_norm", layer_norm, functions=[F.layer_norm],
                        modules={nn.LayerNorm: lambda m: {"normalized_shape": m.normalized_shape,
                                                          "weight": m.weight, "bias": m.bias, "eps": m.eps}},
                        tapped=layer_norm_tapped, extras=("mean", "rstd"), param_grads=layer_norm_param_grads)


@register_rule(LAYER_NORM, conditions="T", kind="frozen-statistics")
def layer_norm_frozen(ctx, g):
    """G(g) = (1/sigma) C (gamma * g): exact mean-centering, frozen 1/sigma (eq. 32, 34, 35)."""
    weight = ctx.param("weight")
    scaled = g * weight if weight is not None else g
    centered = scaled - scaled.mean(_norm_dims(ctx), keepdim=True)
    return {"input": centered * ctx.saved("rstd")}


def normalisation_transpose(scaled, x_hat, rstd, dims):
    """J^T of x -> (x - mean) / sigma over ``dims`` applied to ``scaled`` = gamma * g:
    (1/sigma) (scaled - mean(scaled) - x_hat mean(x_hat scaled))."""
    centered = scaled - scaled.mean(dims, keepdim=True)
    return (centered - x_hat * (x_hat * scaled).mean(dims, keepdim=True)) * rstd


@register_rule(LAYER_NORM, conditions="T", kind="exact", variant="exact-statistics")
def layer_norm_exact(ctx, g):
    """J_F^T g, statistics included (see the module docstring)."""
    weight = ctx.param("weight")
    scaled = g * weight if weight is not None else g
    rstd = ctx.saved("rstd")
    x_hat = (ctx.saved("input") - ctx.saved("mean")) * rstd
    return {"input": ctx.call(normalisation_transpose, scaled, x_hat, rstd, _norm_dims(ctx))}


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """BatchNorm as a pure function (running statistics are read, never updated)."""
    batch_stats = uses_batch_statistics(training, running_mean)
    return F.batch_norm(input, None if batch_stats else running_mean, None if batch_stats else running_var,
                        weight, bias, batch_stats, 0.0, eps)


def uses_batch_statistics(training, running_mean) -> bool:
    """``training`` is the module (live mode) or a bool from a functional call."""
    mode = training.training if isinstance(training, nn.Module) else bool(training)
    return mode or running_mean is None


def _bn_module(m):
    return {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
            "training": m, "momentum": m.momentum, "eps": m.eps}


def batch_norm_tapped(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                      eps=1e-5):
    """The live forward (running statistics updated in place exactly as the module or F.batch_norm
    call would) that also returns the statistics the backward kernel reads, via
    torch.native_batch_norm: ``(y, mean, invstd)`` with the batch mean and 1/sqrt(var + eps) when
    batch statistics are used (empty tensors in eval mode, where the kernel reads the running ones)."""
    batch = uses_batch_statistics(training, running_mean)
    factor = 0.0 if momentum is None else momentum
    if isinstance(training, nn.Module) and training.training and training.track_running_stats:
        tracked = training.num_batches_tracked
        if tracked is not None:             # nn.BatchNorm's own bookkeeping, before the kernel runs
            tracked.add_(1)
            factor = 1.0 / float(tracked) if momentum is None else momentum
    if batch and input.numel() // input.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    return torch.native_batch_norm(input, weight, bias, running_mean, running_var, batch, factor, eps)


def _bn_args(ctx):
    """The kernel's arguments; the mode is the live module (read when the feedback runs, so a program
    compiled in train mode follows ``.eval()``) or a functional call's constant."""
    training = ctx.param("training") if ctx.module is not None else ctx.const("training", False)
    return (ctx.saved("input"), ctx.param("weight"), ctx.param("running_mean"), ctx.param("running_var"),
            ctx.saved("mean"), ctx.saved("invstd"), training, ctx.const("eps", 1e-5))


def batch_norm_backward(g, x, weight, running_mean, running_var, mean, invstd, training, eps):
    """``(dx, dgamma, dbeta)``: aten.native_batch_norm_backward, the kernel autograd runs, on the
    forward's own saved statistics (nothing recomputed). With batch statistics, per channel over its
    N = batch * spatial entries, x_hat = (x - mean) invstd:

        dbeta = sum g,  dgamma = sum g x_hat,  dx = gamma invstd (g - dbeta / N - x_hat dgamma / N)

    (the full transpose, statistics differentiated); in eval mode dx = gamma g / sqrt(running_var + eps).
    The kernel takes the error in x's dtype (:mod:`fbcompile.rules.kernel_dtypes`)."""
    batch = uses_batch_statistics(training, running_mean)
    return torch.ops.aten.native_batch_norm_backward(like(g, x), x, weight, running_mean, running_var, mean, invstd,
                                                     batch, eps, [True, True, True])


def _per_channel(weight, x):
    return weight.reshape((1, -1) + (1,) * (x.dim() - 2))


def frozen_batch_feedback(g, weight, invstd, grads, training, running_mean, running_var, eps):
    """With batch statistics dx = (g - dbeta / N) gamma invstd: the centering over the N = batch *
    spatial entries of each channel kept, 1/sigma_B frozen (the exact transpose without its
    x_hat dgamma / N term); dbeta = sum g is the kernel's when ``grads`` (the weight gradients are
    emitted too), else one reduction. In eval mode the map is affine: dx = gamma g / sqrt(var + eps)."""
    if not uses_batch_statistics(training, running_mean):
        if grads is not None:
            return grads[0]
        invstd = torch.rsqrt(running_var + eps)
        return g * _per_channel(invstd if weight is None else weight * invstd, g)
    dbeta = grads[2] if grads is not None else g.sum((0,) + tuple(range(2, g.dim())))
    scale = _per_channel(invstd if weight is None else weight * invstd, g)
    return (g - _per_channel(dbeta, g) * (g.shape[1] / g.numel())) * scale


def _bn_kernel(ctx, g):
    return ctx.call_once(batch_norm_backward, g, *_bn_args(ctx))


def batch_norm_param_grads(ctx, g):
    """dgamma = sum g x_hat, dbeta = sum g: the kernel call the exact rule shares (one per BN)."""
    grads = _bn_kernel(ctx, g)
    return {"weight": grads[1], "bias": grads[2]}


def batch_norm_apart(arguments: dict):
    """The call on fixed statistics, each sample mapped on its own (the op's ``apart``): the running
    ones, or mean 0 and variance 1 where the call keeps none."""
    x = arguments["input"]
    mean, var = arguments.get("running_mean"), arguments.get("running_var")
    if mean is None or var is None:
        mean, var = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
    return F.batch_norm(x, mean, var, arguments.get("weight"), arguments.get("bias"), False, 0.0,
                        arguments.get("eps", 1e-5))


BATCH_NORM = declare_op("batch_norm", batch_norm, functions=[F.batch_norm],
                        modules={nn.BatchNorm1d: _bn_module, nn.BatchNorm2d: _bn_module, nn.BatchNorm3d: _bn_module},
                        tapped=batch_norm_tapped, extras=("mean", "invstd"), apart=batch_norm_apart,
                        param_grads=batch_norm_param_grads, batch_local=lambda ctx: _bn_kind(ctx) == "exact")


def _bn_kind(ctx):
    training = ctx.module if ctx.module is not None else ctx.const("training", False)
    running = ctx.module.running_mean if ctx.module is not None else ctx.op_call.args.get("running_mean")
    return "frozen-statistics" if uses_batch_statistics(training, running) else "exact"


@register_rule(BATCH_NORM, conditions="T", kind=_bn_kind)
def batch_norm_transpose(ctx, g):
    """Eval: G(g) = gamma g / sigma (exact, the kernel's dx). Train: dx = (g - dbeta / N) gamma invstd,
    centred over the batch with 1/sigma_B frozen (:func:`frozen_batch_feedback`)."""
    training = ctx.param("training") if ctx.module is not None else ctx.const("training", False)
    grads = _bn_kernel(ctx, g) if ctx.with_param_grads else None      # asks for the taps only if called
    return {"input": ctx.call(frozen_batch_feedback, g, ctx.param("weight"), ctx.saved("invstd"), grads, training,
                              ctx.param("running_mean"), ctx.param("running_var"), ctx.const("eps", 1e-5))}


@register_rule(BATCH_NORM, conditions="T", kind="exact", variant="exact-statistics")
def batch_norm_exact(ctx, g):
    """J_F^T g in both modes: the kernel's dx (:func:`batch_norm_backward`)."""
    return {"input": _bn_kernel(ctx, g)[0]}


# -- GroupNorm ------------------------------------------------------------------------------------
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return F.group_norm(input, num_groups, weight, bias, eps)


def group_norm_tapped(input, num_groups, weight=None, bias=None, eps=1e-5):
    """(y, mean, rstd) with the (N, G) statistics, via torch.native_group_norm (which, unlike
    F.group_norm, takes only a contiguous input: timm's SHViT normalises a slice of the channels)."""
    n, c = input.shape[0], input.shape[1]
    input = input if input.is_contiguous() else input.contiguous()
    return torch.native_group_norm(input, weight, bias, n, c, input[0, 0].numel(), num_groups, eps)


def grouped_statistics(x, mean, rstd):
    """x viewed as (N, G, channels-per-group * spatial), and x_hat in that view."""
    grouped = x.reshape(mean.shape[0], mean.shape[1], -1)
    return grouped, (grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def group_norm_feedback(g, x, mean, rstd, weight, exact):
    """(1/sigma) C_group (gamma g), minus x_hat mean_group(x_hat gamma g) when ``exact``."""
    scaled = g * _per_channel(weight, x) if weight is not None else g
    grouped, x_hat = grouped_statistics(x, mean, rstd)
    scaled = scaled.reshape(grouped.shape)
    if exact:
        return normalisation_transpose(scaled, x_hat, rstd.unsqueeze(-1), (-1,)).reshape(x.shape)
    return ((scaled - scaled.mean(-1, keepdim=True)) * rstd.unsqueeze(-1)).reshape(x.shape)


def group_norm_weight_grads(g, x, mean, rstd):
    """(dgamma, dbeta) = (sum g * x_hat, sum g) over batch and spatial dims, per channel."""
    x_hat = grouped_statistics(x, mean, rstd)[1].reshape(x.shape)
    dims = (0,) + tuple(range(2, x.dim()))
    return (g * x_hat).sum(dims), g.sum(dims)


def group_norm_param_grads(ctx, g):
    grads = ctx.call(group_norm_weight_grads, g, ctx.saved("input"), ctx.saved("mean"), ctx.saved("rstd"))
    return {"weight": grads[0], "bias": grads[1]}


GROUP_NORM = declare_op("group_norm", group_norm, functions=[F.group_norm],
                        modules={nn.GroupNorm: lambda m: {"num_groups": m.num_groups, "weight": m.weight,
                                                          "bias": m.bias, "eps": m.eps}},
                        tapped=group_norm_tapped, extras=("mean", "rstd"), param_grads=group_norm_param_grads)


def _group_norm_rule(ctx, g, exact):
    return {"input": ctx.call(group_norm_feedback, g, ctx.saved("input"), ctx.saved("mean"),
                              ctx.saved("rstd"), ctx.param("weight"), exact)}


@register_rule(GROUP_NORM, conditions="T", kind="frozen-statistics")
def group_norm_frozen(ctx, g):
    """G(g) = (1/sigma) C_group (gamma g), the statistics frozen."""
    return _group_norm_rule(ctx, g, False)


@register_rule(GROUP_NORM, conditions="T", kind="exact", variant="exact-statistics")
def group_norm_exact(ctx, g):
    """J_F^T g = (1/sigma) (C_group (gamma g) - x_hat mean_group(x_hat gamma g))."""
    return _group_norm_rule(ctx, g, True)


# -- F.normalize ----------------------------------------------------------------------------------
def normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    return F.normalize(input, p, dim, eps)


def _normalize_dims(ctx):
    dim = ctx.const("dim", 1)
    return tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)


NORMALIZE = declare_op("normalize", normalize, functions=[F.normalize],
                       batch_local=lambda ctx: all(d % len(ctx.shape()) != 0 for d in _normalize_dims(ctx)))


def unit_norm_feedback(g, x, y, dims, eps, pinv):
    """J^T g = (g - y <y, g>) / max(n, eps), or J^+ g = max(n, eps) (g - y <y, g>) when ``pinv``;
    the y term only where n >= eps (see the module docstring)."""
    n = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
    radial = torch.where(n >= eps, (y * g).sum(dims, keepdim=True), torch.zeros_like(n))
    tangent = g - y * radial
    scale = n.clamp_min(eps)
    return tangent * scale if pinv else tangent / scale


def _normalize_map(ctx, g, pinv):
    """J^T g (J^+ g when ``pinv``); for p != 2 (T only) autograd's vjp (:mod:`fbcompile.rules.vjp_ops`)."""
    if ctx.const("p", 2.0) != 2:
        return autograd_vjp(ctx, g)["input"]
    return ctx.call(unit_norm_feedback, g, ctx.saved("input"), ctx.saved("output"), _normalize_dims(ctx),
                    ctx.const("eps", 1e-12), pinv)


def _two_norm_only(ctx):
    p = ctx.const("p", 2.0)
    if p != 2:
        return f"F.normalize with p={p!r}: only the Euclidean norm (p=2) has a condition-P or -I rule; use condition T"
    return None


def _linearised_target(pinv):
    def target(ctx, t):
        """G(t) = x + J^T (t - h) (or J^+ for condition P): the linearisation at the forward point."""
        return {"input": ctx.saved("input") + _normalize_map(ctx, t - ctx.saved("output"), pinv)}
    return target


@register_rule(NORMALIZE, conditions="T", kind="linearised", affine=True, target=_linearised_target(False))
def normalize_transpose(ctx, g):
    """J^T g = (g - y <y, g>) / max(n, eps) for p = 2; autograd's vjp for other p."""
    return {"input": _normalize_map(ctx, g, False)}


@register_rule(NORMALIZE, conditions="P", kind="linearised", supports=_two_norm_only, affine=True,
               target=_linearised_target(True))
def normalize_pinv(ctx, g):
    """J^+ g = max(n, eps) (g - y <y, g>)."""
    return {"input": _normalize_map(ctx, g, True)}


def _normalize_singular(ctx):
    return (_two_norm_only(ctx) or "F.normalize's Jacobian (I - y y^T) / n is singular (scaling x does not "
            "change y), so condition I has no rule for it; use condition T or P")


@register_rule(NORMALIZE, conditions="I", kind="exact", supports=_normalize_singular)
def normalize_inverse(ctx, g):
    """Refused (J is singular); were it allowed, J^+ g as :func:`normalize_pinv`."""
    return normalize_pinv(ctx, g)


# -- weight normalisation -----------------------------------------------------------------------------
def weight_norm(v, g, dim=0):
    return torch._weight_norm(v, g, dim)


WEIGHT_NORM = declare_op("weight_norm", weight_norm, functions=[torch._weight_norm])


def _weights_only(ctx):
    if ctx.op_call.active and any(info(src).from_input for _, _, src in ctx.op_call.active):
        return f"{ctx.name}: weight normalisation of a value computed from the model input is not supported"
    return None


@register_rule(WEIGHT_NORM, conditions="TPI", supports=_weights_only)
def weight_norm_feedback(ctx, g):
    """w = g v / ||v|| (``nn.utils.parametrizations.weight_norm``) lies on a parameter path only:
    no activation feedback; v and g get their gradients from the op's own vjp (the default
    ``param_grads``, or the parameter-path vjp when they are computed from parameters)."""
    return {}
