"""Dense operators for conditions P and I on ops that have no cheap closed form (convolution,
average pooling): the op's Jacobian for one sample is materialised as an (n_out x n_in) matrix by
applying the op's *linear part* to the identity basis, then pseudo-inverted or inverted.

This is only meant for small inputs: the matrix has n_out * n_in entries and its SVD costs
O(n_out n_in min(n_out, n_in)). Nodes above ``DENSE_LIMIT`` entries are refused at compile time
with an error naming the node and its size (raise the limit with :func:`set_dense_limit`).
The inverse is cached per geometry and weight tensor until the weight changes (tracked by its
version counter).
"""
from __future__ import annotations

import math
import weakref

import torch

from fbcompile.errors import ConditionError

DENSE_LIMIT = 1 << 22   # entries of the per-sample dense operator (4,194,304: 32 MB in float64)
_CACHE: dict = {}


def elementwise_pinv(d):
    """The pseudo-inverse of the diagonal operator diag(d): 1/d where d != 0, else 0."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def set_dense_limit(entries: int) -> None:
    """Change the largest dense operator (n_out * n_in entries) conditions P and I will build."""
    global DENSE_LIMIT
    DENSE_LIMIT = int(entries)


def dense_size_problem(ctx, condition: str):
    """A reason string when the node's dense operator exceeds :data:`DENSE_LIMIT`, else None."""
    n_in = math.prod(ctx.shape("input")[1:])
    n_out = math.prod(ctx.shape()[1:])
    if condition == "I" and n_in != n_out:
        return (f"condition I needs a square Jacobian, but {ctx.name} maps {n_in} -> {n_out} values "
                "per sample; use condition P or T")
    if n_in * n_out > DENSE_LIMIT:
        return (f"condition {condition} for {ctx.name} ({ctx.op_call.spec.name}) needs a dense {n_out} x {n_in} "
                f"operator ({n_in * n_out:,} entries), above the limit of {DENSE_LIMIT:,} "
                "(fbcompile.rules.dense.set_dense_limit); use condition T for large layers")
    return None


def dense_inverse_apply(g, linear_map, sample_shape, key, condition: str, node_name: str, versions=(),
                        owner=None):
    """Apply the (pseudo-)inverse of ``linear_map`` (one sample of shape ``sample_shape`` -> output)
    to every sample of ``g``: x = g_flat @ (J^+)^T, reshaped to the input sample shape.

    ``key`` must identify the operator: ``(op name, hyperparameters, ...)``; a weighted operator also
    passes its weight as ``owner`` and the weight's ``versions``: the cached inverse is reused only
    for the very same tensor, unchanged (an ``id`` alone may be reused by a later tensor)."""
    cache_key = (key, tuple(sample_shape), condition, tuple(versions), g.dtype, g.device)
    inverse = _inverse(linear_map, tuple(sample_shape), cache_key, owner, condition, node_name, g)
    flat = g.reshape(g.shape[0], -1) @ inverse.t()
    return flat.reshape((g.shape[0],) + tuple(sample_shape))


def _inverse(linear_map, sample_shape, cache_key, owner, condition, node_name, like):
    cached = _CACHE.get(cache_key)
    if cached is not None and cached[0]() is owner:
        return cached[1]
    n_in = math.prod(sample_shape)
    basis = torch.eye(n_in, dtype=like.dtype, device=like.device).reshape((n_in,) + sample_shape)
    jacobian = linear_map(basis).reshape(n_in, -1).t()          # (n_out, n_in)
    if condition == "I":
        inverse, info = torch.linalg.inv_ex(jacobian)
        if int(info) != 0 or not torch.isfinite(inverse).all():
            raise ConditionError(f"condition I: the Jacobian of {cache_key[0][0]} node {node_name!r} is singular "
                                 "(not invertible); use condition P or T")
    else:
        inverse = torch.linalg.pinv(jacobian)
    if len(_CACHE) > 64:   # weights change every step; keep only recent operators alive
        _CACHE.clear()
    _CACHE[cache_key] = (weakref.ref(owner) if owner is not None else (lambda: None), inverse)
    return inverse
