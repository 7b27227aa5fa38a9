"""Embedding lookup: y[..., :] = W[i[...], :] for integer ids i (nn.Embedding, F.embedding).

The ids are integers: no feedback goes into them (they are never active). The map is linear in W:
J_W = S, the selection of rows, so the weight gradient is S^T g, an index_add of the output error
rows into the rows they were read from:

    dW[v] = sum over positions p with i[p] = v of g[p]   (divided by the count of v in the batch with
    scale_grad_by_freq), and dW[padding_idx] = 0.

When the table itself is computed from parameters (a scaled or tied weight), the same S^T g is the
feedback into it. ``max_norm`` (which renormalises rows of W in place during the forward) and
``sparse=True`` (a sparse gradient) are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
              sparse=False):
    return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)


def embedding_weight_grad(g, ids, num_embeddings: int, padding_idx, scale_grad_by_freq: bool):
    """S^T g: the output error rows added into the table rows they were read from (see the module
    docstring), zero at ``padding_idx``."""
    flat = ids.reshape(-1)
    rows = g.reshape(flat.numel(), g.shape[-1])
    if scale_grad_by_freq:
        counts = torch.bincount(flat, minlength=num_embeddings)
        rows = rows / counts[flat].unsqueeze(1).to(rows.dtype)
    grad = rows.new_zeros(num_embeddings, rows.shape[1]).index_add_(0, flat, rows)
    if padding_idx is not None:
        grad[padding_idx % num_embeddings] = 0
    return grad


def _weight_grad(ctx, g):
    return ctx.call(embedding_weight_grad, g, ctx.saved("input"), ctx.shape("weight")[0], ctx.const("padding_idx"),
                    bool(ctx.const("scale_grad_by_freq", False)))


def embedding_param_grads(ctx, g):
    """dW = S^T g (:func:`embedding_weight_grad`)."""
    return {"weight": _weight_grad(ctx, g)}


def _module(m: nn.Embedding) -> dict:
    return {"weight": m.weight, "padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
            "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse}


EMBEDDING = declare_op("embedding", embedding, functions=[F.embedding], modules={nn.Embedding: _module},
                       param_grads=embedding_param_grads)


def _supported(ctx):
    if ctx.const("max_norm") is not None:
        return (f"embedding with max_norm={ctx.const('max_norm')} renormalises rows of its weight in place during "
                "the forward pass; that is not supported (drop max_norm, or renormalise outside the model)")
    if ctx.const("sparse", False):
        return "embedding with sparse=True asks for a sparse weight gradient, which fbcompile does not produce"
    return None


def _table_only(ctx):
    reason = _supported(ctx)
    if reason is None and ctx.is_active("weight"):
        return ("conditions P and I are not implemented for an embedding table computed from parameters "
                "(a selection S has S^+ = (S^T S)^-1 S^T only for ids without repeats); use condition T")
    return reason


def _table_feedback(ctx, g):
    """No feedback into the integer ids; a table computed from parameters receives S^T g."""
    return {"weight": _weight_grad(ctx, g)} if ctx.is_active("weight") else {}


@register_rule(EMBEDDING, conditions="T", kind="exact", supports=_supported)
def transpose(ctx, g):
    """G(g) = S^T g into the table when it is computed from parameters; nothing into the ids."""
    return _table_feedback(ctx, g)


@register_rule(EMBEDDING, conditions="PI", kind="exact", supports=_table_only)
def no_input(ctx, g):
    """No feedback into the integer ids (P and I refuse a table computed from parameters)."""
    return _table_feedback(ctx, g)
