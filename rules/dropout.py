"""Dropout: y = x * m with m the forward's random keep mask scaled by 1/(1-p) (all ones in eval).

The tapped forward draws the mask as dropout applied to ones (the same distribution and shape
convention as the op itself, so dropout1d/2d masks whole channels) and saves it; the feedback
reuses that mask. T (exact): G(g) = m g. P (exact): G(g) = m^+ g (1/m where m != 0, else 0).
I: the same map, refused at run time when the mask dropped anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.errors import ConditionError
from fbcompile.ops import declare_op
from fbcompile.registry import register_rule

_DROP = {"dropout": F.dropout, "dropout1d": F.dropout1d, "dropout2d": F.dropout2d}


def _mode(training) -> bool:
    return training.training if isinstance(training, nn.Module) else bool(training)


def _make(name):
    drop = _DROP[name]

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
for _name, _cls in (("dropout", nn.Dropout), ("dropout1d", nn.Dropout1d), ("dropout2d", nn.Dropout2d)):
    _apply, _tapped, _replay = _make(_name)
    DROPOUTS.append(declare_op(_name, _apply, functions=[_DROP[_name]], modules={_cls: _module},
                               tapped=_tapped, extras=("mask",), replay=_replay))


def apply_mask(g, mask):
    return g if mask is None else g * mask


def apply_mask_pinv(g, mask, node_name=None):
    """g / m where m != 0 (else 0); with ``node_name`` a dropped entry is an error (condition I)."""
    if mask is None:
        return g
    if node_name is not None and bool((mask == 0).any()):
        raise ConditionError(f"condition I: dropout node {node_name!r} dropped entries in this pass, "
                             "so it is not invertible; use condition P or T, or eval mode")
    inverse = torch.where(mask != 0, 1.0 / torch.where(mask != 0, mask, torch.ones_like(mask)), torch.zeros_like(mask))
    return g * inverse


def dropout_transpose(ctx, g):
    """G(g) = m g with the forward's mask m."""
    return {"input": ctx.call(apply_mask, g, ctx.saved("mask"))}


def dropout_pinv(ctx, g):
    """G(g) = m^+ g."""
    return {"input": ctx.call(apply_mask_pinv, g, ctx.saved("mask"))}


def dropout_inverse(ctx, g):
    """G(g) = m^-1 g; fails when the mask dropped anything."""
    return {"input": ctx.call(apply_mask_pinv, g, ctx.saved("mask"), ctx.name)}


for _op in DROPOUTS:
    register_rule(_op, conditions="T", name=f"{_op.name}.mask")(dropout_transpose)
    register_rule(_op, conditions="P", name=f"{_op.name}.mask_pinv")(dropout_pinv)
    register_rule(_op, conditions="I", name=f"{_op.name}.mask_inverse")(dropout_inverse)
