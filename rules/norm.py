"""Normalisation: LayerNorm and BatchNorm with frozen statistics.

LayerNorm over the last dims (d entries): y = gamma * x_hat + beta, x_hat = (x - mu) / sigma.
Paper 002 (eq. 30-35) splits it into mean-centering C = I - (1/d) 1 1^T (linear, symmetric) and the
scaling 1/sigma, with sigma frozen from the forward pass. T (kind "frozen-statistics"):

    G(g) = (1/sigma) C (gamma * g)

The exact Jacobian is J_F = diag(gamma) (1/sigma) (C - x_hat x_hat^T / d), so J_G - J_F^T is the
dropped term x_hat x_hat^T diag(gamma) / (d sigma): for gamma = 1 and unit-variance rows its Frobenius
norm is 1/sigma (ALGORITHMS.md check 4). Weight gradients: dgamma = sum g * x_hat, dbeta = sum g.

Variant "exact-statistics" (kind "exact", ``compile(..., variants=("exact-statistics",))``): the
full transpose J_F^T g = (1/sigma) (C (gamma g) - x_hat mean(x_hat gamma g)), which also
differentiates through the statistics, so error propagation and DTP with beta -> 0 equal true BP.

BatchNorm (per channel, statistics over batch and spatial dims). In eval mode it is the affine map
y = gamma (x - running_mean) / sqrt(running_var + eps) + beta and T is exact: G(g) = gamma g / sigma.
In train mode the batch statistics are frozen the same way as LayerNorm's: the centering over
(batch, spatial) is kept and 1/sigma_B frozen, kind "frozen-statistics". Its "exact-statistics" variant
is the full transpose over (batch, spatial), as for LayerNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule


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
                        tapped=layer_norm_tapped, extras=("mean", "rstd"), param_grads=layer_norm_param_grads,
                        leader=True)


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


@register_rule(LAYER_NORM, conditions="T", kind="exact", variant="exact-statistics", name="layer_norm.exact")
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


def batch_norm_statistics(x, running_mean, running_var, training, eps):
    """(mean, 1/sigma, per-channel view shape, reduced dims, batch statistics?) used by the forward."""
    dims = (0,) + tuple(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    if uses_batch_statistics(training, running_mean):
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        return mean.reshape(view), torch.rsqrt(var + eps).reshape(view), dims, True
    return running_mean.reshape(view), torch.rsqrt(running_var + eps).reshape(view), dims, False


def batch_norm_feedback(g, x, running_mean, running_var, weight, training, eps):
    """G(g) = gamma g / sigma, centred over (batch, spatial) when batch statistics were used."""
    _, rstd, dims, batch = batch_norm_statistics(x, running_mean, running_var, training, eps)
    scaled = g * weight.reshape(rstd.shape) if weight is not None else g
    if batch:
        scaled = scaled - scaled.mean(dims, keepdim=True)
    return scaled * rstd


def batch_norm_weight_grads(g, x, running_mean, running_var, training, eps):
    """(dgamma, dbeta) = (sum g * x_hat, sum g) over (batch, spatial)."""
    mean, rstd, dims, _ = batch_norm_statistics(x, running_mean, running_var, training, eps)
    return (g * (x - mean) * rstd).sum(dims), g.sum(dims)


def _bn_args(ctx):
    training = ctx.param("training") if ctx.module is not None else ctx.const("training", False)
    return ctx.param("running_mean"), ctx.param("running_var"), training, ctx.const("eps", 1e-5)


def batch_norm_param_grads(ctx, g):
    running_mean, running_var, training, eps = _bn_args(ctx)
    grads = ctx.call(batch_norm_weight_grads, g, ctx.saved("input"), running_mean, running_var, training, eps)
    return {"weight": grads[0], "bias": grads[1]}


BATCH_NORM = declare_op("batch_norm", batch_norm, functions=[F.batch_norm],
                        modules={nn.BatchNorm1d: _bn_module, nn.BatchNorm2d: _bn_module},
                        param_grads=batch_norm_param_grads, batch_local=lambda ctx: _bn_kind(ctx) == "exact")


def _bn_kind(ctx):
    training = ctx.module if ctx.module is not None else ctx.const("training", False)
    running = ctx.module.running_mean if ctx.module is not None else ctx.op_call.args.get("running_mean")
    return "frozen-statistics" if uses_batch_statistics(training, running) else "exact"


@register_rule(BATCH_NORM, conditions="T", kind=_bn_kind)
def batch_norm_transpose(ctx, g):
    """Eval: G(g) = gamma g / sigma (exact). Train: centred over the batch, 1/sigma_B frozen."""
    running_mean, running_var, training, eps = _bn_args(ctx)
    return {"input": ctx.call(batch_norm_feedback, g, ctx.saved("input"), running_mean, running_var,
                              ctx.param("weight"), training, eps)}


def batch_norm_exact_feedback(g, x, running_mean, running_var, weight, training, eps):
    """J_F^T g with the batch statistics differentiated (train mode); eval mode is already exact."""
    mean, rstd, dims, batch = batch_norm_statistics(x, running_mean, running_var, training, eps)
    scaled = g * weight.reshape(rstd.shape) if weight is not None else g
    if not batch:
        return scaled * rstd
    return normalisation_transpose(scaled, (x - mean) * rstd, rstd, dims)


@register_rule(BATCH_NORM, conditions="T", kind="exact", variant="exact-statistics", name="batch_norm.exact")
def batch_norm_exact(ctx, g):
    """J_F^T g in both modes (see the module docstring)."""
    running_mean, running_var, training, eps = _bn_args(ctx)
    return {"input": ctx.call(batch_norm_exact_feedback, g, ctx.saved("input"), running_mean, running_var,
                              ctx.param("weight"), training, eps)}
