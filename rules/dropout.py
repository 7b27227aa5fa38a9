"""Dropout: y = x * m with m the forward's random keep mask scaled by 1/(1-p) (all ones in eval).
Channel dropout (dropout1d/2d/3d; ATen's ``feature_dropout``, how torch.export writes them) masks
whole channels.

The tapped forward draws the mask as dropout applied to ones (the same distribution and shape
convention as the op itself, so dropout1d/2d masks whole channels) and saves it; the feedback
reuses that mask. T (exact): G(g) = m g. P (exact): G(g) = m^+ g (1/m where m != 0, else 0).
I: the same map, refused at run time when the mask dropped anything.

Alpha dropout (SELU networks; ``feature_alpha_dropout`` per channel): y = x m + c, m = a k and
c = alpha' a (k - 1 + p) with the keep draw k (:func:`alpha_dropout_draw`): the same J = diag(m), so
the same rules. Randomized leaky ReLU (``nn.RReLU``): y = x m with m the slope of each entry (1 where
x > 0); in train mode the slopes ATen's kernel drew are saved, in eval m is leaky ReLU's.

Stochastic depth (torchvision.ops.stochastic_depth(input, p, mode, training)): y = x * m with
m = b / (1 - p), b ~ Bernoulli(1 - p) drawn once per sample (mode "row", shape (N, 1, ..., 1)) or
once for the batch (mode "batch", shape (1, ..., 1)); m = 0 when p = 1; identity in eval or p = 0.
The tapped forward draws m exactly so and saves it; the dropout rules above apply unchanged (m
broadcasts over g). Spellings are declared with :func:`declare_stochastic_depth`: torchvision's
function and ``StochasticDepth`` module once the user has imported torchvision (the module then is one node and
its live ``training`` flag is read every step), and any function of the same signature and
semantics (timm-style helpers, ``torch.fx.wrap``-ed so that fx records a call to it).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.errors import ConditionError, RuleError
from fbcompile.ops import OpSpec, declare_op, declared_ops, optional_spellings
from fbcompile.registry import register_rule

from .dense import elementwise_pinv

def _mode(training) -> bool:
    return training.training if isinstance(training, nn.Module) else bool(training)


def _make(name, drop):
    def apply(input, p=0.5, training=True, inplace=False):
        return drop(input, p, _mode(training))

    def tapped(input, p=0.5, training=True, inplace=False):
        """(y, mask): the mask is ``drop(ones)``, None when nothing is dropped (eval or p = 0)."""
        if not _mode(training) or p == 0:
            return input, None
        mask = drop(torch.ones_like(input), p, True)
        return input * mask, mask

    def replay(extras, input, p=0.5, training=True, inplace=False):
        """The forward with the saved mask (verification differentiates the pass that ran)."""
        return input if extras["mask"] is None else input * extras["mask"]

    apply.__name__ = apply.__qualname__ = name
    tapped.__name__ = tapped.__qualname__ = f"{name}_tapped"
    return apply, tapped, replay


def _module(m):
    return {"p": m.p, "training": m, "inplace": m.inplace}


DROPOUTS = []
for _name, _drop, _cls in (("dropout", F.dropout, nn.Dropout), ("dropout1d", F.dropout1d, nn.Dropout1d),
                           ("dropout2d", F.dropout2d, nn.Dropout2d), ("dropout3d", F.dropout3d, nn.Dropout3d),
                           ("feature_dropout", torch.feature_dropout, None)):
    _apply, _tapped, _replay = _make(_name, _drop)
    DROPOUTS.append(declare_op(_name, _apply, functions=[_drop], modules={_cls: _module} if _cls else {},
                               tapped=_tapped, extras=("mask",), replay=_replay))


def apply_mask(g, mask):
    return g if mask is None else g * mask


def apply_mask_pinv(g, mask, node_name=None):
    """g / m where m != 0 (else 0); with ``node_name`` a dropped entry is an error (condition I)."""
    if mask is None:
        return g
    if node_name is not None and bool((mask == 0).any()):
        raise ConditionError(f"condition I: node {node_name!r} multiplied entries by zero in this pass (dropped "
                             "them), so it is not invertible; use condition P or T, or eval mode")
    return g * elementwise_pinv(mask)


def mask(ctx, g):
    """G(g) = m g with the forward's mask m."""
    return {"input": ctx.call(apply_mask, g, ctx.saved("mask"))}


def mask_pinv(ctx, g):
    """G(g) = m^+ g."""
    return {"input": ctx.call(apply_mask_pinv, g, ctx.saved("mask"))}


def mask_inverse(ctx, g):
    """G(g) = m^-1 g; fails when the mask dropped anything."""
    return {"input": ctx.call(apply_mask_pinv, g, ctx.saved("mask"), ctx.name)}


# -- alpha dropout and randomized leaky ReLU: y = x m + c, the random m saved -----------------------
SELU_SATURATION = 1.7580993408473766     # alpha' = scale * alpha of SELU: where a dropped entry is set


def alpha_dropout_draw(input, p, feature):
    """(m, c) of alpha dropout, drawn as ATen draws them (so seeded runs agree): keep k ~
    Bernoulli(1 - p) per entry (per channel for ``feature``), a = ((alpha'^2 p + 1)(1 - p))^-1/2,
    m = a k, c = alpha' a (k - 1 + p): y = x m + c keeps SELU's mean 0 and variance 1."""
    shape = tuple(input.shape[:2]) + (1,) * (input.dim() - 2) if feature else input.shape
    keep = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    a = 1.0 / math.sqrt((SELU_SATURATION ** 2 * p + 1.0) * (1.0 - p))
    return keep * a, (keep - 1.0 + p) * (SELU_SATURATION * a)


def _make_alpha(name, drop, feature):
    def apply(input, p=0.5, training=False, inplace=False):
        return drop(input, p, _mode(training))

    def tapped(input, p=0.5, training=False, inplace=False):
        """(y, m, c); m and c None when nothing is dropped (eval or p = 0); at p = 1, y = 0 (ATen)."""
        if not _mode(training) or p == 0:
            return input, None, None
        if p == 1:
            return input * 0.0, torch.zeros_like(input), None
        m, c = alpha_dropout_draw(input, p, feature)
        return input * m + c, m, c

    def replay(extras, input, p=0.5, training=False, inplace=False):
        out = input if extras["mask"] is None else input * extras["mask"]
        return out if extras["shift"] is None else out + extras["shift"]

    apply.__name__ = apply.__qualname__ = name
    tapped.__name__ = tapped.__qualname__ = f"{name}_tapped"
    return apply, tapped, replay


for _name, _drop, _cls, _feature in (("alpha_dropout", F.alpha_dropout, nn.AlphaDropout, False),
                                     ("feature_alpha_dropout", F.feature_alpha_dropout, nn.FeatureAlphaDropout, True)):
    _apply, _tapped, _replay = _make_alpha(_name, _drop, _feature)
    DROPOUTS.append(declare_op(_name, _apply, functions=[_drop], modules={_cls: _module}, tapped=_tapped,
                               extras=("mask", "shift"), replay=_replay))


def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    return F.rrelu(input, lower, upper, _mode(training))


def rrelu_tapped(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """(y, m): y = x m with m = 1 where x > 0, else a slope r ~ U(lower, upper) per entry drawn by
    ATen's own kernel (train mode) or (lower + upper) / 2 (eval: leaky ReLU). (Autograd itself uses
    the mean slope when upper - lower <= 1e-6 in train mode; m is the slope the forward used.)"""
    if _mode(training):
        slopes = torch.empty_like(input)
        return torch.ops.aten.rrelu_with_noise(input, slopes, lower, upper, True), slopes
    slopes = torch.where(input > 0, torch.ones_like(input), torch.full_like(input, (lower + upper) / 2))
    return input * slopes, slopes


def rrelu_replay(extras, input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    return input * extras["mask"]


DROPOUTS.append(declare_op("rrelu", rrelu, functions=[F.rrelu],
                           modules={nn.RReLU: lambda m: {"lower": m.lower, "upper": m.upper, "training": m,
                                                         "inplace": m.inplace}},
                           tapped=rrelu_tapped, extras=("mask",), replay=rrelu_replay))


def native_dropout(input, p, train=None):
    """ATen's ``native_dropout``, how torch.export writes dropout once it decomposes a program (one
    that writes through views): the pair (y, keep) with y = x keep / (1 - p) in train mode (``train``
    None counts as train), keep a boolean map; (x, all true) in eval."""
    return torch.native_dropout(input, p, train)


def native_dropout_tapped(input, p, train=None):
    """((y, keep), m) with m = keep / (1 - p) (0 where p = 1), None when nothing can be dropped."""
    pair = torch.native_dropout(input, p, train)
    if train is False or p == 0:
        return pair, None
    keep = pair[1].to(input.dtype)
    return pair, keep / (1.0 - p) if p < 1 else keep


def native_dropout_replay(extras, input, p, train=None):
    m = extras["mask"]
    return (input, torch.ones_like(input, dtype=torch.bool)) if m is None else (input * m, m != 0)


NATIVE_DROPOUT = declare_op("native_dropout", native_dropout, functions=[torch.native_dropout],
                            tapped=native_dropout_tapped, extras=("mask",), replay=native_dropout_replay)


def _values_feedback(g):
    """The feedback of the values of a (values, keep) pair (the boolean keep map gets none)."""
    return g[0] if isinstance(g, (list, tuple)) else g


def values_mask(ctx, g):
    """G(g) = m g, g the values' feedback."""
    values = _values_feedback(g)
    return {"input": None} if values is None else mask(ctx, values)


def values_mask_pinv(ctx, g):
    """G(g) = m^+ g, g the values' feedback."""
    values = _values_feedback(g)
    return {"input": None} if values is None else mask_pinv(ctx, values)


def values_mask_inverse(ctx, g):
    """G(g) = m^-1 g, g the values' feedback; fails when the mask dropped anything."""
    values = _values_feedback(g)
    return {"input": None} if values is None else mask_inverse(ctx, values)


register_rule(NATIVE_DROPOUT, conditions="T")(values_mask)
register_rule(NATIVE_DROPOUT, conditions="P")(values_mask_pinv)
register_rule(NATIVE_DROPOUT, conditions="I")(values_mask_inverse)

for _op in DROPOUTS:
    register_rule(_op, conditions="T")(mask)
    register_rule(_op, conditions="P")(mask_pinv)
    register_rule(_op, conditions="I")(mask_inverse)


# -- stochastic depth ---------------------------------------------------------------------------
SD_MODES = ("row", "batch")


def stochastic_depth_mask(input, p, mode):
    """m = Bernoulli(1 - p) / (1 - p), one draw per sample (row) or per batch (batch); the draw is
    the one torchvision makes (``torch.empty(size).bernoulli_(1 - p)``), so seeded runs agree."""
    size = [input.shape[0]] + [1] * (input.dim() - 1) if mode == "row" else [1] * input.dim()
    mask = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return mask / (1.0 - p) if p < 1.0 else mask


def stochastic_depth_apply(input, p, mode, training=True):
    return stochastic_depth_tapped(input, p, mode, training)[0]


def stochastic_depth_tapped(input, p, mode, training=True):
    """(y, mask), the mask None when nothing is dropped (eval or p = 0)."""
    if not _mode(training) or p == 0:
        return input, None
    mask = stochastic_depth_mask(input, p, mode)
    return input * mask, mask


def stochastic_depth_replay(extras, input, p, mode, training=True):
    return input if extras["mask"] is None else input * extras["mask"]


def _valid_stochastic_depth(ctx):
    p, mode = ctx.const("p"), ctx.const("mode")
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        return f"stochastic depth needs a drop probability p in [0, 1], got {p!r}"
    if mode not in SD_MODES:
        return f"stochastic depth mode must be 'row' or 'batch', got {mode!r}"
    return None


def _sd_module(m):
    return {"p": m.p, "mode": m.mode, "training": m}


def declare_stochastic_depth(function, *, name: str, module: type | None = None) -> OpSpec:
    """Declare ``function`` (signature ``(input, p, mode, training=True)``, torchvision's semantics)
    and optionally a ``module`` class with attributes ``p`` and ``mode`` as stochastic depth, op
    ``name``, with the mask rules. ``function`` must be what fx records: a function wrapped with
    ``torch.fx.wrap`` (else fx traces through it and sees the random draw as plain values)."""
    if not callable(function):
        raise RuleError(f"declare_stochastic_depth({name!r}): {function!r} is not callable")
    spec = declare_op(name, stochastic_depth_apply, functions=[function],
                      modules={module: _sd_module} if module is not None else None,
                      tapped=stochastic_depth_tapped, extras=("mask",), replay=stochastic_depth_replay)
    register_rule(spec, conditions="T", supports=_valid_stochastic_depth)(mask)
    register_rule(spec, conditions="P", supports=_valid_stochastic_depth)(mask_pinv)
    register_rule(spec, conditions="I", supports=_valid_stochastic_depth)(mask_inverse)
    return spec


@optional_spellings
def declare_torchvision_stochastic_depth() -> None:
    """torchvision is optional and never imported by fbcompile: once the user's code has imported
    ``torchvision.ops``, its ``stochastic_depth`` and ``StochasticDepth`` are declared (before the
    next capture)."""
    ops = sys.modules.get("torchvision.ops")
    if ops is None or "stochastic_depth" in declared_ops() or not hasattr(ops, "stochastic_depth"):
        return
    declare_stochastic_depth(ops.stochastic_depth, name="stochastic_depth", module=getattr(ops, "StochasticDepth", None))
