"""Softmax and log-softmax along one dim (n entries), s = softmax(x), and every spelling of each.

softmax: J = diag(s) - s s^T, symmetric.
    T:  J^T g = s * (g - <g, s>)                                  (<.,.> and sums along dim)
log_softmax, y = x - logsumexp(x): J = I - 1 s^T.
    T:  J^T g = g - s * sum(g)

Both Jacobians are singular: adding a constant along dim leaves the output unchanged (J 1 = 0), so
there is no inverse (condition I is refused) and no invertible target map; the target map is the
linearisation at the forward operating point, G(t) = x + J^T (t - h), kind "linearised" (its
Jacobian is J_F^T there, so DTP's difference G(t) - G(h) = J^T (t - h) and small-beta DTP is BP).

Condition P, derived here (kind "linearised" for the same reason; the error map is exactly J^+).
Let P = I - 1 1^T / n (centring along dim) and D = diag(s).

- softmax: J^+ = P D^-1 P. J is symmetric with null space span(1) and range 1^perp. For v in 1^perp,
  J P D^-1 P v = J D^-1 v = v - s (1^T v) = v (J P = J since J 1 = 0), and P D^-1 P is symmetric
  with P D^-1 P 1 = 0: it inverts J on its range and vanishes on the null space, the definition of
  J^+. An entry with s_i = 0 (exp underflow) has a zero row and column in J; the same formula holds
  on the support {s_i > 0} (centring over the support, zero elsewhere).
- log_softmax: J is the oblique projection onto s^perp along 1 (J^2 = J). J^+ = P Q with
  Q = I - s s^T / <s, s>: J J^+ = J Q = Q (orthogonal projector onto range J = s^perp) and
  J^+ J = P Q (I - 1 s^T) = P (I - 1 s^T) = P (projector onto the row space 1^perp).

``dtype=``: the input is cast to dtype before the op; the feedback is cast back to the input's
dtype (the cast's own transpose). ``dim=None`` resolves as torch's legacy rule does: dim 0 for
0-, 1- and 3-dimensional inputs, else dim 1 (``nn.Softmax()`` without a dim).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule


def resolved_dim(dim, ndim: int) -> int:
    """``dim`` as a non-negative index; None follows torch's legacy implicit choice."""
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
    return dim % max(ndim, 1)


def _cast_dtype(_stacklevel, dtype):
    """F.softmax takes ``_stacklevel`` third, torch.softmax and Tensor.softmax take ``dtype`` third;
    both bind to the one canonical signature, so a dtype found in the third place is the dtype."""
    return _stacklevel if dtype is None and isinstance(_stacklevel, torch.dtype) else dtype


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    return F.softmax(input, resolved_dim(dim, input.dim()), dtype=_cast_dtype(_stacklevel, dtype))


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    return F.log_softmax(input, resolved_dim(dim, input.dim()), dtype=_cast_dtype(_stacklevel, dtype))


def _dim(ctx) -> int:
    return resolved_dim(ctx.const("dim"), len(ctx.shape()))


def _batch_local(ctx) -> bool:
    return _dim(ctx) != 0


def _module(m):
    return {"dim": m.dim}


SOFTMAX = declare_op("softmax", softmax, functions=[F.softmax, torch.softmax, torch.special.softmax],
                     methods=[tensor_method("softmax")],
                     modules={nn.Softmax: _module, nn.Softmax2d: lambda m: {"dim": -3}}, batch_local=_batch_local)
LOG_SOFTMAX = declare_op("log_softmax", log_softmax,
                         functions=[F.log_softmax, torch.log_softmax, torch.special.log_softmax],
                         methods=[tensor_method("log_softmax")], modules={nn.LogSoftmax: _module},
                         batch_local=_batch_local)


# -- the maps, on tensors (s = softmax output; for log_softmax s = exp(y)) ----------------------
def softmax_transpose(g, s, dim):
    """J^T g = s * (g - <g, s>)."""
    return s * (g - (g * s).sum(dim, keepdim=True))


def log_softmax_transpose(g, s, dim):
    """J^T g = g - s * sum(g)."""
    return g - s * g.sum(dim, keepdim=True)


def softmax_pinv(g, s, dim):
    """J^+ g = P D^-1 P g on the support of s (see the module docstring)."""
    support = s > 0
    count = support.sum(dim, keepdim=True)

    def centred(v):
        v = torch.where(support, v, torch.zeros_like(v))
        return torch.where(support, v - v.sum(dim, keepdim=True) / count, torch.zeros_like(v))

    return centred(centred(g) / torch.where(support, s, torch.ones_like(s)))


def log_softmax_pinv(g, s, dim):
    """J^+ g = P (g - s <s, g> / <s, s>)."""
    projected = g - s * (s * g).sum(dim, keepdim=True) / (s * s).sum(dim, keepdim=True)
    return projected - projected.mean(dim, keepdim=True)


# -- rules ----------------------------------------------------------------------------------------
def _probabilities(ctx):
    out = ctx.saved("output")
    return out.exp() if ctx.op_call.spec is LOG_SOFTMAX else out


def _to_input_dtype(ctx, value):
    if _cast_dtype(ctx.const("_stacklevel", 3), ctx.const("dtype")) is None:
        return value
    return value.to(ctx.saved("input").dtype)


_MAPS = {(SOFTMAX, "T"): softmax_transpose, (LOG_SOFTMAX, "T"): log_softmax_transpose,
         (SOFTMAX, "P"): softmax_pinv, (LOG_SOFTMAX, "P"): log_softmax_pinv}


def _map(ctx, condition, g):
    fn = _MAPS[(ctx.op_call.spec, condition)]
    return _to_input_dtype(ctx, ctx.call(fn, g, _probabilities(ctx), _dim(ctx)))


def _linearised_target(ctx, t, condition):
    """G(t) = x + J^T (t - h) (or J^+ for condition P), the linearisation at the forward operating point."""
    return {"input": ctx.saved("input") + _map(ctx, condition, t - ctx.saved("output"))}


def transpose(ctx, g):
    """T: J^T g (softmax: s * (g - <g, s>); log_softmax: g - s sum(g))."""
    return {"input": _map(ctx, "T", g)}


def pinv(ctx, g):
    """P: J^+ g (see the module docstring for the derivation)."""
    return {"input": _map(ctx, "P", g)}


def inverse(ctx, g):
    """Refused (J is singular); were it allowed, J^+ g as :func:`pinv`."""
    return pinv(ctx, g)


def _singular(ctx):
    return (f"{ctx.op_call.spec.name}'s Jacobian is singular (adding a constant along dim {_dim(ctx)} does "
            "not change its output, J 1 = 0), so condition I has no rule for it; use condition T or P")


for _op in (SOFTMAX, LOG_SOFTMAX):
    register_rule(_op, conditions="T", kind="linearised", target=partial(_linearised_target, condition="T"),
                  affine=True)(transpose)
    register_rule(_op, conditions="P", kind="linearised", target=partial(_linearised_target, condition="P"),
                  affine=True)(pinv)
    register_rule(_op, conditions="I", kind="exact", supports=_singular)(inverse)
