"""SyncBatchNorm: BatchNorm whose batch statistics are those of the GLOBAL batch (every rank's shard).

Ranks r = 1..R hold shards x_r (channel c, entries over batch and spatial dims); with N = sum_r n_r
the global count, the statistics are

    mu = (1/N) sum_r sum x_r,   var = (1/N) sum_r sum (x_r - mu)^2,   rstd = 1/sqrt(var + eps),
    y_r = gamma (x_r - mu) rstd + beta,

computed with two all-reduces (sums, then centred squares: the two-pass variance, as accurate as
one process's). The running statistics are updated as ``nn.SyncBatchNorm`` does (momentum, or the
cumulative average when momentum is None; the unbiased var * N / (N - 1)). Without an initialised
process group (or with one rank) this is BatchNorm. The forward here is our own (tapped, saving mu
and rstd): torch's ``SyncBatchNorm.forward`` accepts only GPU inputs once torch.distributed is
initialised, while this one runs on gloo (CPU) and NCCL alike. The all-reduces are
``torch.distributed.nn.functional.all_reduce``, differentiable, so the autograd executors see the
same global function.

Feedback, for g_r = dL_r/dy_r on each rank and s_r = gamma g_r (the global means also all-reduced):

- T, train mode (kind "frozen-statistics", BatchNorm's default): rstd is frozen, the centring over
  the global batch is kept: G(g)_r = rstd (s_r - mean(s));
- variant "exact-statistics" (kind "exact"): the full transpose through the global statistics,
  J^T g_r = rstd (s_r - mean(s) - x_hat_r mean(x_hat s)), which is what the ranks' average of
  ``.grad`` needs to equal one process's backprop on the whole batch;
- eval mode (running statistics, kind "exact"): G(g) = gamma g / sqrt(running_var + eps).

Weight gradients stay local (dgamma_r = sum g_r x_hat_r, dbeta_r = sum g_r); the learner's average
over the ranks makes them the whole batch's.
"""
from __future__ import annotations

import torch
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.passes import units as _units
from fbcompile.registry import register_rule


def _group(training):
    """The process group of a SyncBatchNorm module (None when there is nothing to sync with)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(training, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _global_sum(tensor, group):
    """sum over the ranks (differentiable); the tensor itself without a group."""
    if group is None:
        return tensor
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(tensor, group=group)


def _layout(x):
    return (0,) + tuple(range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)


def _batch_statistics(training, running_mean) -> bool:
    mode = training.training if isinstance(training, nn.Module) else bool(training)
    return mode or running_mean is None


def global_statistics(x, group):
    """(mu, var, N) over the global batch, per channel (two-pass)."""
    dims, view = _layout(x)
    local = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    packed = _global_sum(torch.cat([x.sum(dims), local.reshape(1)]), group)
    count = packed[-1]
    mean = packed[:-1] / count
    var = _global_sum(((x - mean.reshape(view)) ** 2).sum(dims), group) / count
    return mean, var, count


def sync_batch_norm_tapped(input, running_mean, running_var, weight=None, bias=None, training=False,
                           momentum=0.1, eps=1e-5):
    """The live forward: ``(y, mu, rstd)`` with global statistics in train mode (running ones in eval
    mode), running statistics updated in place as nn.SyncBatchNorm's forward would."""
    dims, view = _layout(input)
    if not _batch_statistics(training, running_mean):
        mean, rstd = running_mean, torch.rsqrt(running_var + eps)
    else:
        mean, var, count = global_statistics(input, _group(training))
        if float(count.detach()) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
        rstd = torch.rsqrt(var + eps)
        module = training if isinstance(training, nn.Module) else None
        if module is not None and module.training and module.track_running_stats and running_mean is not None:
            factor = momentum
            if module.num_batches_tracked is not None:
                module.num_batches_tracked.add_(1)
                if momentum is None:
                    factor = 1.0 / float(module.num_batches_tracked)
            with torch.no_grad():
                running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                running_var.mul_(1 - factor).add_(var.detach() * (count / (count - 1)), alpha=factor)
    y = (input - mean.reshape(view)) * rstd.reshape(view)
    if weight is not None:
        y = y * weight.reshape(view)
    if bias is not None:
        y = y + bias.reshape(view)
    return y, mean, rstd


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5):
    """The pure function (running statistics read, never updated; global statistics in train mode)."""
    return sync_batch_norm_tapped(input, running_mean, running_var, weight, bias,
                                  _batch_statistics(training, running_mean), momentum, eps)[0]


def _module(m):
    return {"running_mean": m.running_mean, "running_var": m.running_var, "weight": m.weight, "bias": m.bias,
            "training": m, "momentum": m.momentum, "eps": m.eps}


def sync_feedback(g, x, mean, rstd, weight, training, running_mean, exact):
    """G(g) (see the module docstring): rstd (s - mean(s) [- x_hat mean(x_hat s)]), global means."""
    dims, view = _layout(x)
    scaled = g * weight.reshape(view) if weight is not None else g
    rstd = rstd.reshape(view)
    if not _batch_statistics(training, running_mean):
        return scaled * rstd
    x_hat = (x - mean.reshape(view)) * rstd
    local = torch.tensor([float(x.numel() // x.shape[1])], dtype=g.dtype, device=g.device)
    parts = [scaled.sum(dims)] + ([(x_hat * scaled).sum(dims)] if exact else []) + [local]
    packed = _global_sum(torch.cat(parts), _group(training))
    channels = scaled.shape[1]
    count = packed[-1]
    out = scaled - (packed[:channels] / count).reshape(view)
    if exact:
        out = out - x_hat * (packed[channels:2 * channels] / count).reshape(view)
    return out * rstd


def sync_weight_grads(g, x, mean, rstd):
    """(dgamma, dbeta) = (sum g x_hat, sum g) over this rank's (batch, spatial)."""
    dims, view = _layout(x)
    return (g * (x - mean.reshape(view)) * rstd.reshape(view)).sum(dims), g.sum(dims)


def _param_grads(ctx, g):
    grads = ctx.call(sync_weight_grads, g, ctx.saved("input"), ctx.saved("mean"), ctx.saved("rstd"))
    return {"weight": grads[0], "bias": grads[1]}


def _kind(ctx):
    running = ctx.module.running_mean if ctx.module is not None else ctx.op_call.args.get("running_mean")
    return "frozen-statistics" if _batch_statistics(ctx.module, running) else "exact"


SYNC_BATCH_NORM = declare_op("sync_batch_norm", sync_batch_norm, modules={nn.SyncBatchNorm: _module},
                             functions=[sync_batch_norm],
                             tapped=sync_batch_norm_tapped, extras=("mean", "rstd"), param_grads=_param_grads,
                             batch_local=lambda ctx: _kind(ctx) == "exact")


# A channel normalisation joins its producer's TP unit, as BatchNorm does (passes/units.py matches
# them by the function they spell; this op's own function is its spelling).
if sync_batch_norm not in _units.CHANNEL_NORMALISATIONS:
    _units.CHANNEL_NORMALISATIONS = (*_units.CHANNEL_NORMALISATIONS, sync_batch_norm)


def _rule(ctx, g, exact):
    return {"input": ctx.call(sync_feedback, g, ctx.saved("input"), ctx.saved("mean"), ctx.saved("rstd"),
                              ctx.param("weight"), ctx.param("training"), ctx.param("running_mean"), exact)}


@register_rule(SYNC_BATCH_NORM, conditions="T", kind=_kind)
def sync_batch_norm_transpose(ctx, g):
    """Train: rstd (s - mean_global(s)), rstd frozen. Eval: gamma g / sigma_running (exact)."""
    return _rule(ctx, g, exact=False)


@register_rule(SYNC_BATCH_NORM, conditions="T", kind="exact", variant="exact-statistics")
def sync_batch_norm_exact(ctx, g):
    """J_F^T g through the global statistics (train mode); eval mode as the T rule."""
    return _rule(ctx, g, exact=True)
