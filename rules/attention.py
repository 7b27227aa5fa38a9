"""Attention: F.scaled_dot_product_attention and nn.MultiheadAttention, each as one op.

Index conventions: q (..., L, E), k (..., S, E), v (..., S, Ev), an additive bias B (..., L, S) that
holds the masks (-inf where a query may not look), a scale c (default 1/sqrt(E)) and, in train mode
with dropout, the forward's keep mask D (scaled by 1/(1-p)):

    Z = c q k^T + B,   P = softmax(Z) (rows that are masked entirely give 0),   A = P * D,   y = A v.

Transposed Jacobian at the forward point, for the error g at y and g_A at A (MultiheadAttention
returns A when need_weights):

    dv = A^T g,   dA = g v^T + g_A,   dP = dA * D,   dZ = P * (dP - rowsum(dP * P)),
    dq = c dZ k,  dk = c dZ^T q,  dB = dZ (summed to the bias's shape: a learned attention bias).

P is recomputed from the saved q and k; D is the tapped forward's mask (with dropout the forward
computes attention explicitly and saves D; without it, torch's fused kernel runs). The error map is
exact; the target map is the same linear map at the forward point (the softmax and the products are
held at their forward values), so the rules are "linearised" (exact when only v depends on the
input: y is linear in v).

MultiheadAttention (both batch layouts, unbatched inputs, kdim/vdim, key_padding_mask, attn_mask,
need_weights, average_attn_weights, the is_causal hint) adds the projections around the core:
q = x_q W_q^T + b_q (likewise k, v), heads split, y = concat_heads(A v) W_o^T + b_o. Its feedback
passes g through W_o, the core and W_q, W_k, W_v (the feedback weights: FA swaps in its own), and its
weight gradients are dW_o = g^T o, dW_q = dq^T x_q, ... in closed form. add_bias_kv and add_zero_attn
are refused.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op
from fbcompile.registry import register_rule
from fbcompile.trace import info

from .arith import sum_to


# -- the core ----------------------------------------------------------------------------------------

def _as_bias(mask, attend_where_true: bool, dtype):
    """An additive float bias from a bool mask (-inf where attention is not allowed) or a float one."""
    if mask is None or mask.is_floating_point():
        return mask
    allowed = mask if attend_where_true else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, float("-inf"))


def causal_bias(length: int, source: int, dtype, device):
    """0 on and below the diagonal, -inf above (query i sees keys 0..i)."""
    allowed = torch.ones(length, source, dtype=torch.bool, device=device).tril()
    return _as_bias(allowed, True, dtype)


def attention_probs(q, k, bias, scale):
    """P = softmax(c q k^T + B); a row with every entry masked gives zeros (as torch's kernels do)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def attend(q, k, v, bias, scale, drop):
    """(y, A) = (A v, P * D) computed explicitly."""
    probs = attention_probs(q, k, bias, scale)
    weights = probs if drop is None else probs * drop
    return weights @ v, weights


def attention_backward(g, g_weights, q, k, v, bias, scale, drop):
    """(dq, dk, dv, dZ) at the forward point; see the module docstring."""
    probs = attention_probs(q, k, bias, scale)
    weights = probs if drop is None else probs * drop
    d_weights = g @ v.transpose(-2, -1)
    if g_weights is not None:
        d_weights = d_weights + g_weights
    d_probs = d_weights if drop is None else d_weights * drop
    d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True))
    return (d_scores @ k) * scale, (d_scores.transpose(-2, -1) @ q) * scale, weights.transpose(-2, -1) @ g, d_scores


def _drop_mask(like, p: float):
    return F.dropout(torch.ones_like(like), p, True)


def _attention_kind(ctx) -> str:
    from_input = {arg for arg, _, src in ctx.op_call.active if info(src).from_input}
    return "exact" if from_input <= {"value"} else "linearised"


# -- scaled_dot_product_attention ------------------------------------------------------------------

def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


def _sdpa_bias(query, key, attn_mask, is_causal):
    if is_causal:
        return causal_bias(query.shape[-2], key.shape[-2], query.dtype, query.device)
    return _as_bias(attn_mask, True, query.dtype)


def _sdpa_scale(query, scale):
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def sdpa_tapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(y, D): with dropout the attention is computed explicitly and its keep mask D saved; without,
    torch's kernel runs and D is None."""
    if dropout_p == 0:
        return sdpa(query, key, value, attn_mask, 0.0, is_causal, scale), None
    bias, c = _sdpa_bias(query, key, attn_mask, is_causal), _sdpa_scale(query, scale)
    drop = _drop_mask(attention_probs(query, key, bias, c), dropout_p)
    return attend(query, key, value, bias, c, drop)[0], drop


def sdpa_replay(extras, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """The forward with the saved dropout mask (verification differentiates the pass that ran)."""
    bias = _sdpa_bias(query, key, attn_mask, is_causal)
    return attend(query, key, value, bias, _sdpa_scale(query, scale), extras["mask"])[0]


def sdpa_feedback(g, query, key, value, attn_mask, is_causal, scale, drop):
    """(dq, dk, dv, dB) of scaled_dot_product_attention, each summed to its operand's shape."""
    bias = _sdpa_bias(query, key, attn_mask, is_causal)
    dq, dk, dv, d_scores = attention_backward(g, None, query, key, value, bias, _sdpa_scale(query, scale), drop)
    d_bias = sum_to(d_scores, attn_mask.shape) if attn_mask is not None and attn_mask.is_floating_point() else None
    return sum_to(dq, query.shape), sum_to(dk, key.shape), sum_to(dv, value.shape), d_bias


_SDPA_OPERANDS = ("query", "key", "value", "attn_mask")


def _sdpa_grads(ctx, g, names) -> dict:
    args = ctx.forward_args()
    grads = ctx.call(sdpa_feedback, g, args["query"], args["key"], args["value"], args.get("attn_mask"),
                     bool(ctx.const("is_causal", False)), ctx.const("scale"), ctx.saved("mask"))
    return {name: grads[_SDPA_OPERANDS.index(name)] for name in names}


def _sdpa_param_grads(ctx, g):
    """A parameter operand (a learned attention bias as attn_mask) gets its row of J^T g."""
    return _sdpa_grads(ctx, g, list(ctx.op_call.params))


SDPA = declare_op("scaled_dot_product_attention", sdpa, functions=[F.scaled_dot_product_attention],
                  tapped=sdpa_tapped, extras=("mask",), replay=sdpa_replay, param_grads=_sdpa_param_grads)


def _sdpa_supported(ctx):
    if ctx.const("enable_gqa", False):
        return "scaled_dot_product_attention with enable_gqa=True (grouped key/value heads) is not supported"
    if not isinstance(ctx.const("dropout_p", 0.0), (int, float)):
        return "scaled_dot_product_attention needs a constant dropout_p"
    return None


@register_rule(SDPA, conditions="T", kind=_attention_kind, supports=_sdpa_supported)
def sdpa_transpose(ctx, g):
    """(dq, dk, dv, dB) = (c dZ k, c dZ^T q, A^T g, dZ) at the forward point (module docstring)."""
    return _sdpa_grads(ctx, g, [arg for arg, _, _ in ctx.op_call.active])


# -- nn.MultiheadAttention ----------------------------------------------------------------------------

_PROJECTIONS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                "out_proj_weight", "out_proj_bias")


def multihead_attention(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                        average_attn_weights=True, is_causal=False, *, in_proj_weight=None, in_proj_bias=None,
                        q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, out_proj_weight=None,
                        out_proj_bias=None, bias_k=None, bias_v=None, num_heads=1, dropout=0.0, batch_first=False,
                        add_zero_attn=False, training=False):
    """nn.MultiheadAttention's forward from its parts (torch's functional form)."""
    layout = _Layout(query, batch_first)
    out, weights = F.multi_head_attention_forward(
        *(layout.time_first(t) for t in (query, key, value)), query.shape[-1], num_heads, in_proj_weight,
        in_proj_bias, bias_k, bias_v, add_zero_attn, dropout, out_proj_weight, out_proj_bias,
        training=_mode(training), key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, use_separate_proj_weight=in_proj_weight is None, q_proj_weight=q_proj_weight,
        k_proj_weight=k_proj_weight, v_proj_weight=v_proj_weight, average_attn_weights=average_attn_weights,
        is_causal=is_causal)
    return layout.time_first(out), weights


_SIGNATURE = inspect.signature(multihead_attention)


def _bound(args, kwargs) -> dict:
    """Every argument of :func:`multihead_attention` by name, defaults filled in."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _mode(training) -> bool:
    return training.training if isinstance(training, nn.Module) else bool(training)


class _Layout:
    """Moves (L, N, E) / (N, L, E) / unbatched (L, E) tensors to and from the core's (N, L, E)."""

    def __init__(self, query, batch_first: bool):
        self.batched, self.batch_first = query.dim() == 3, batch_first

    def time_first(self, t):
        """batch_first (N, L, E) <-> (L, N, E): the swap torch's module makes (its own inverse)."""
        return t.transpose(0, 1) if self.batched and self.batch_first else t

    def to_core(self, t):
        if not self.batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def from_core(self, t):
        if not self.batched:
            return t.squeeze(0)
        return t if self.batch_first else t.transpose(0, 1)


def _projection_weights(weights: dict) -> tuple:
    """(W_q, W_k, W_v) from the packed in_proj_weight or the separate q/k/v_proj_weight."""
    if weights.get("in_proj_weight") is not None:
        return weights["in_proj_weight"].chunk(3)
    return weights["q_proj_weight"], weights["k_proj_weight"], weights["v_proj_weight"]


def _heads(t, num_heads):
    n, length, width = t.shape
    return t.reshape(n, length, num_heads, width // num_heads).transpose(1, 2)


def _merge(t):
    n, heads, length, width = t.shape
    return t.transpose(1, 2).reshape(n, length, heads * width)


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _mha_bias(call: dict, n: int, length: int, source: int, dtype, device):
    """The additive bias (N or 1, H or 1, L, S) from attn_mask (True = masked out, the module's
    convention), key_padding_mask (N, S) and the is_causal hint (honoured as torch does: in place of
    attn_mask when neither weights nor a padding mask are asked for)."""
    padding = _as_bias(call["key_padding_mask"], False, dtype)
    if call["is_causal"] and padding is None and not call["need_weights"]:
        bias = causal_bias(length, source, dtype, device)
    else:
        bias = _as_bias(call["attn_mask"], False, dtype)
        if bias is not None and bias.dim() == 3:
            bias = bias.reshape(-1, call["num_heads"], length, source)
    if padding is not None:
        padding = padding.reshape(n, 1, 1, source)
        bias = padding if bias is None else bias + padding
    return bias


def _mha_core(call: dict):
    """The layout, core-layout inputs, projected heads (q, k, v), bias and scale of one call."""
    layout = _Layout(call["query"], call["batch_first"])
    xs = [layout.to_core(call[name]) for name in ("query", "key", "value")]
    biases = call["in_proj_bias"].chunk(3) if call["in_proj_bias"] is not None else (None,) * 3
    heads = [_heads(F.linear(x, w, b), call["num_heads"]) for x, w, b in zip(xs, _projection_weights(call), biases)]
    q, k = heads[0], heads[1]
    bias = _mha_bias(call, q.shape[0], q.shape[2], k.shape[2], q.dtype, q.device)
    return layout, xs, heads, bias, 1.0 / math.sqrt(q.shape[-1])


def mha_explicit(call: dict, drop):
    """(y, A or None): MultiheadAttention computed explicitly with keep mask ``drop`` (None: no dropout)."""
    layout, _, (q, k, v), bias, scale = _mha_core(call)
    mixed, probs = attend(q, k, v, bias, scale, drop)
    out = layout.from_core(F.linear(_merge(mixed), call["out_proj_weight"], call["out_proj_bias"]))
    if not call["need_weights"]:
        return out, None
    returned = probs.mean(1) if call["average_attn_weights"] else probs
    return out, returned if layout.batched else returned.squeeze(0)


def mha_feedback(g_out, g_weights, call: dict, feedback_weights: dict, drop):
    """Feedback into query, key, value (through the feedback weights) and the gradients of every
    projection parameter, at the forward point (module docstring); a None error counts as zero."""
    layout, xs, (q, k, v), bias, scale = _mha_core(call)
    n, heads, length = q.shape[:3]
    out_proj = call["out_proj_weight"]
    g = layout.to_core(g_out) if g_out is not None else q.new_zeros(n, length, out_proj.shape[0])
    g_probs = None
    if g_weights is not None:
        g_probs = g_weights if layout.batched else g_weights.unsqueeze(0)
        if call["average_attn_weights"]:
            g_probs = g_probs.unsqueeze(1).expand(-1, heads, -1, -1) / heads
    d_mixed = _heads(g @ feedback_weights["out_proj_weight"], heads)
    d_heads = [_merge(d) for d in attention_backward(d_mixed, g_probs, q, k, v, bias, scale, drop)[:3]]
    grads = {name: layout.from_core(d @ w) for name, d, w in
             zip(("query", "key", "value"), d_heads, _projection_weights(feedback_weights))}
    d_proj = [_rows(d).t() @ _rows(x) for d, x in zip(d_heads, xs)]
    if call["in_proj_weight"] is not None:
        grads["in_proj_weight"] = torch.cat(d_proj)
    else:
        grads["q_proj_weight"], grads["k_proj_weight"], grads["v_proj_weight"] = d_proj
    grads["in_proj_bias"] = torch.cat([_rows(d).sum(0) for d in d_heads])
    grads["out_proj_weight"] = _rows(g).t() @ _rows(_merge(attend(q, k, v, bias, scale, drop)[0]))
    grads["out_proj_bias"] = _rows(g).sum(0)
    return grads


def _mha_call(ctx, g, names) -> dict:
    call = _bound((), {name: value for name, value in ctx.forward_args().items() if name != "training"})
    del call["training"]
    feedback_weights = {name: ctx.weight(name) if call.get(name) is not None else None
                        for name in _PROJECTIONS if name.endswith("weight")}
    g_out, g_weights = g if isinstance(g, (list, tuple)) else (g, None)
    grads = ctx.call(mha_feedback, g_out, g_weights, call, feedback_weights, ctx.saved("mask"))
    return {name: grads[name] for name in names}


def mha_tapped(*args, **kwargs):
    """((y, A or None), D): in train mode with dropout, computed explicitly with its keep mask D saved;
    otherwise torch's own forward, D None."""
    call = _bound(args, kwargs)
    if not (_mode(call["training"]) and call["dropout"] > 0):
        return multihead_attention(*args, **kwargs), None
    _, _, (q, k, _), bias, scale = _mha_core(call)
    drop = _drop_mask(attention_probs(q, k, bias, scale), call["dropout"])
    return mha_explicit(call, drop), drop


def mha_replay(extras, *args, **kwargs):
    """The forward with the saved dropout mask (verification differentiates the pass that ran)."""
    return mha_explicit(_bound(args, kwargs), extras["mask"])


def _mha_module(m: nn.MultiheadAttention) -> dict:
    return {"in_proj_weight": m.in_proj_weight, "in_proj_bias": m.in_proj_bias, "q_proj_weight": m.q_proj_weight,
            "k_proj_weight": m.k_proj_weight, "v_proj_weight": m.v_proj_weight,
            "out_proj_weight": m.out_proj.weight, "out_proj_bias": m.out_proj.bias, "bias_k": m.bias_k,
            "bias_v": m.bias_v, "num_heads": m.num_heads, "dropout": m.dropout, "batch_first": m.batch_first,
            "add_zero_attn": m.add_zero_attn, "training": m}


def _mha_param_grads(ctx, g):
    """dW_o = g^T o, db_o = sum g, dW_q = dq^T x_q, ... (:func:`mha_feedback`)."""
    return _mha_call(ctx, g, list(ctx.op_call.params))


MULTIHEAD_ATTENTION = declare_op(
    "multihead_attention", multihead_attention, modules={nn.MultiheadAttention: _mha_module},
    tapped=mha_tapped, extras=("mask",), replay=mha_replay, param_grads=_mha_param_grads,
    batch_local=lambda ctx: bool(ctx.const("batch_first")) and len(ctx.shape("query")) == 3)


def _mha_supported(ctx):
    if ctx.has("bias_k") or ctx.const("add_zero_attn", False):
        return ("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True (extra key/value rows) is not "
                "supported")
    return None


@register_rule(MULTIHEAD_ATTENTION, conditions="T", kind=_attention_kind, supports=_mha_supported)
def multihead_attention_transpose(ctx, g):
    """g at (y, A) -> (dx_q, dx_k, dx_v) = (dq W_q, dk W_k, dv W_v) with (dq, dk, dv) the core's
    transpose applied to (g W_o split into heads, g_A) (module docstring)."""
    return _mha_call(ctx, g, [arg for arg, _, _ in ctx.op_call.active])
