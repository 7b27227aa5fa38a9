"""Ops that the torch.export front end meets as ATen calls with no ``rules/`` op behind them
(``torch.addmm`` in Hugging Face's GPT-2 ``Conv1D``, ``torch.pow(x, 3.0)`` in its ``gelu_new``).
Their ATen overloads are bound in :mod:`fbcompile.aten_spellings`; the Python spellings are
declared here too, so both front ends use one rule.

addmm: y = beta b + alpha X W, X (rows, in), W (in, out), b broadcast to (rows, out).

- T (exact): J_G g = alpha g W^T into X, alpha X^T g into an active W, beta sum_to(g) into an
  active b. Parameter gradients: dW = alpha X^T g, db = beta sum over the broadcast rows of g.
  A product of two activations (X and W both active) is refused: target modes would need the
  difference-corrected bilinear rule of ``rules/bilinear.py`` (write ``x @ w`` to get it).

pow with a constant exponent p: y = x^p elementwise.

- T: J_G g = p x^(p-1) g (the diagonal Jacobian is symmetric, so J_G = J_F^T exactly). Its target
  map is that linear map (kind "linearised": target modes use the slope at the forward value).
  A tensor exponent is refused.
"""
from __future__ import annotations

import numbers
import operator

import torch

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule

from .arith import sum_to
from .vjp_ops import autograd_vjp


def addmm(bias, input, weight, beta=1, alpha=1):
    return torch.addmm(bias, input, weight, beta=beta, alpha=alpha)


def addmm_param_grads(ctx, g):
    """dW = alpha X^T g, db = beta sum_to(g, shape of b)."""
    alpha, beta = ctx.const("alpha", 1), ctx.const("beta", 1)
    grads = {}
    if "weight" in ctx.op_call.params:
        grads["weight"] = alpha * (ctx.saved("input").t() @ g)
    if "bias" in ctx.op_call.params:
        grads["bias"] = beta * ctx.call(sum_to, g, ctx.shape("bias"))
    return grads


ADDMM = declare_op("addmm", addmm, functions=[torch.addmm], param_grads=addmm_param_grads,
                   batch_local=lambda ctx: not ctx.is_active("weight") and not ctx.is_active("bias"))


def _one_matrix_active(ctx):
    if ctx.is_active("input") and ctx.is_active("weight"):
        return (f"{ctx.name}: addmm of two activations (X and W both computed from the input) has no rule here; "
                "write it as x @ w (+ b) to use the bilinear matmul rule")
    return None


@register_rule(ADDMM, conditions="T", kind="exact", supports=_one_matrix_active)
def addmm_transpose(ctx, g):
    """J_G g = alpha g W^T (into X), alpha X^T g (into an active W), beta sum_to(g) (into an active b)."""
    alpha, beta = ctx.const("alpha", 1), ctx.const("beta", 1)
    out = {}
    if ctx.is_active("input"):
        out["input"] = alpha * (g @ ctx.weight("weight").t())
    if ctx.is_active("weight"):
        out["weight"] = alpha * (ctx.saved("input").t() @ g)
    if ctx.is_active("bias"):
        out["bias"] = beta * ctx.call(sum_to, g, ctx.saved_shape("bias"))
    return out


def pow_(input, exponent):
    return torch.pow(input, exponent)


POW = declare_op("pow", pow_, functions=[torch.pow, operator.pow], methods=[tensor_method("pow")],
                 inplace=[tensor_method("pow_"), operator.ipow])


def _constant_exponent(ctx) -> bool:
    exponent = ctx.op_call.args.get("exponent")
    return isinstance(exponent, numbers.Real) and not isinstance(exponent, bool) and ctx.is_active("input")


@register_rule(POW, conditions="T", kind="linearised")
def pow_transpose(ctx, g):
    """J_G g = p x^(p-1) g (diagonal, so J_F^T = J_F) for a constant exponent p; a tensor exponent or
    a constant base (2 ** x) gets autograd's vjp, into the base and the exponent as they are active."""
    if not _constant_exponent(ctx):
        return autograd_vjp(ctx, g)
    p = ctx.const("exponent")
    return {"input": g * (p * ctx.saved("input") ** (p - 1))}
