"""Bilinear products: matmul (``@``), mm, bmm and einsum, of one or two active operands.

Index conventions: A is (..., m, k), B is (..., k, n), Z = A B is (..., m, n); the batch dims "..."
broadcast (torch.matmul's rules; a 1-D A is a row (1, k), a 1-D B a column (k, 1), and the added
dim is dropped from Z).

- T: dZ/dA^T g = g B^T and dZ/dB^T g = A^T g, each summed over the batch dims its operand was
  broadcast along (autograd's sum_to). Exact per operand. With two active operands (attention
  scores Q K^T, attention mixing P V) each operand's feedback is evaluated with the other operand at
  its forward value; that map is linear in g, so it is also the target map and difference
  correction reduces to it (DTP's small-beta limit is backpropagation). The joint map (A, B) -> A B
  is bilinear, so a product of two activations is declared "linearised"; one active operand times a
  constant or parameter is "exact". No P or I rule: a product is rarely square, and refused.
- einsum: Z[out] = sum over the other letters of prod_j X_j[s_j]. The transpose for operand i is the
  einsum that swaps the output and that operand's subscripts: G_i(g) = einsum(out, s_j (j != i)
  -> s_i; g, X_j), with letters that appear only in s_i (summed inside X_i alone) broadcast back and
  size-1 (broadcast) dims summed. Ellipses are spelled out as letters. Repeated letters in one
  operand (diagonals, traces) are refused.

A parameter operand (``x @ self.W``) gets the same per-operand transpose as its weight gradient.
"""
from __future__ import annotations

import operator
import string

import torch

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule

from .arith import product_kind, sum_to
from .vjp_ops import autograd_vjp, note_parameter_weights


def matmul(input, other):
    return torch.matmul(input, other)


def mm(input, mat2):
    return torch.mm(input, mat2)


def bmm(input, mat2):
    return torch.bmm(input, mat2)


def einsum(equation, *operands):
    return torch.einsum(equation, *operands)


def matmul_feedback(g, a, b, wrt: str):
    """Row ``wrt`` ("input" is A, anything else B) of the transposed Jacobian of Z = A @ B applied to
    g: g B^T summed to A's shape, or A^T g summed to B's shape (1-D operands lifted as in matmul)."""
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    if b.dim() == 1:
        g = g.unsqueeze(-1)
    if a.dim() == 1:
        g = g.unsqueeze(-2)
    if wrt == "input":
        return sum_to(g @ b2.transpose(-1, -2), a2.shape).reshape(a.shape)
    return sum_to(a2.transpose(-1, -2) @ g, b2.shape).reshape(b.shape)


def _operand(ctx, name, weight: bool):
    """An operand's forward value; with ``weight`` (input feedback), a parameter operand is the
    rule's weight (:meth:`~fbcompile.context.RuleContext.weight`: feedback weights stand in for it)."""
    if name not in ctx.op_call.params:
        return ctx.saved(name)
    return ctx.weight(name) if weight else ctx.param(name)


def _matmul_grads(ctx, g, names, weight: bool = False) -> dict:
    first, second = ctx.op_call.spec.signature.parameters
    a, b = _operand(ctx, first, weight), _operand(ctx, second, weight)
    return {name: ctx.call(matmul_feedback, g, a, b, name) for name in names}


def _matmul_param_grads(ctx, g):
    """A parameter operand gets its row of J^T g (:func:`matmul_feedback`)."""
    return _matmul_grads(ctx, g, list(ctx.op_call.params))


def _matmul_batch_local(ctx) -> bool:
    """Samples stay independent when every active operand's dim 0 is the output's dim 0: it has the
    output's rank (a lower-rank operand is broadcast, its dim 0 is not the batch) and the same size
    there (not a size-1 dim broadcast over the batch); with B active the product must be batched
    (rank >= 3), since a 2-D B's rows are not samples."""
    first, second = ctx.op_call.spec.signature.parameters
    out = ctx.shape()
    active = [name for name in (first, second) if ctx.is_active(name)]
    if ctx.is_active(second) and len(out) < 3:
        return False
    return len(out) >= 2 and all(len(ctx.shape(n)) == len(out) and ctx.shape(n)[0] == out[0] for n in active)


def _declare_product(name, apply, functions, methods):
    return declare_op(name, apply, functions=functions, methods=methods, param_grads=_matmul_param_grads,
                      batch_local=_matmul_batch_local)


MATMUL = _declare_product("matmul", matmul, [torch.matmul, operator.matmul], [tensor_method("matmul")])
MM = _declare_product("mm", mm, [torch.mm], [tensor_method("mm")])
BMM = _declare_product("bmm", bmm, [torch.bmm], [tensor_method("bmm")])


@register_rule(MATMUL, conditions="T", kind=product_kind)
@register_rule(MM, conditions="T", kind=product_kind)
@register_rule(BMM, conditions="T", kind=product_kind)
def transpose(ctx, g):
    """G(g) = (g B^T, A^T g), each summed to its operand's shape, for the active operands. A
    parameter operand is the rule's weight (``x @ self.W``: FA's B stands in for W); one computed
    from parameters has no slot (:func:`note_parameter_weights`)."""
    note_parameter_weights(ctx, slotted=tuple(ctx.op_call.params))
    return _matmul_grads(ctx, g, [arg for arg, _, _ in ctx.op_call.active], weight=True)


# -- einsum ----------------------------------------------------------------------------------------

def _letters_for_ellipsis(equation: str, count: int) -> str:
    unused = [c for c in string.ascii_letters if c not in equation]
    return "".join(unused[:count])


def explicit_subscripts(equation: str, ranks: list) -> tuple[list, str]:
    """(subscripts of each operand, output subscripts) with ``...`` spelled out as letters (right
    aligned, as broadcasting aligns them) and an implicit output made explicit (torch's rule:
    ellipsis dims, then the letters used exactly once, sorted)."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    inputs = lhs.split(",")
    widest = max((rank - len(s.replace("...", "")) for s, rank in zip(inputs, ranks) if "..." in s), default=0)
    fill = _letters_for_ellipsis(equation, widest)
    spelled = []
    for s, rank in zip(inputs, ranks):
        if "..." in s:
            n = rank - len(s.replace("...", ""))
            s = s.replace("...", fill[widest - n:] if n else "")
        spelled.append(s)
    if arrow:
        out = rhs.replace("...", fill)
    else:
        counts = "".join(spelled)
        out = fill + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c not in fill))
    return spelled, out


def einsum_feedback(g, operands, subscripts: list, out: str, i: int):
    """J_i^T g for Z = einsum(subscripts -> out; operands), operand i: the einsum from (out, the
    other operands' subscripts) to s_i; letters of s_i found nowhere else are broadcast back, dims
    operand i broadcast (size 1 against a larger size) are summed."""
    own, x = subscripts[i], operands[i]
    others = [j for j in range(len(operands)) if j != i]
    available = set(out).union(*(subscripts[j] for j in others))
    kept = "".join(c for c in own if c in available)
    r = torch.einsum(",".join([out] + [subscripts[j] for j in others]) + "->" + kept,
                     g, *(operands[j] for j in others))
    for d, c in enumerate(own):
        if c not in available:
            r = r.unsqueeze(d)
    summed = tuple(d for d in range(x.dim()) if x.shape[d] == 1 and r.shape[d] != 1)
    if summed:
        r = r.sum(summed, keepdim=True)
    return r.expand(x.shape)


def _einsum_plan(ctx) -> tuple[list, str]:
    ranks = [len(ctx.shape("operands", i)) for i in range(len(ctx.op_call.args["operands"]))]
    return explicit_subscripts(ctx.const("equation"), ranks)


def _repeats_a_letter(ctx) -> bool:
    """A letter twice within one operand (``bii->bi``: a diagonal, ``ii->``: a trace)."""
    subscripts, _ = _einsum_plan(ctx)
    return any(len(set(s)) != len(s) for s in subscripts)


def _einsum_batch_local(ctx) -> bool:
    """The output's first letter is every active operand's first letter, and no other operand has it."""
    subscripts, out = _einsum_plan(ctx)
    active = {index for _, index, _ in ctx.op_call.active}
    return bool(out) and all((s[:1] == out[0]) == (j in active) and out[0] not in s[1:]
                             for j, s in enumerate(subscripts))


EINSUM = declare_op("einsum", einsum, functions=[torch.einsum], batch_local=_einsum_batch_local)


@register_rule(EINSUM, conditions="T", kind=product_kind)
def einsum_transpose(ctx, g):
    """G_i(g) = einsum(out, s_j (j != i) -> s_i; g, X_j) for each active operand i
    (:func:`einsum_feedback`). An operand that repeats a letter (a diagonal or a trace) has no such
    einsum (its feedback is zero off the diagonal): autograd's vjp (:mod:`fbcompile.rules.vjp_ops`)."""
    if _repeats_a_letter(ctx):
        return autograd_vjp(ctx, g)
    note_parameter_weights(ctx)
    subscripts, out = _einsum_plan(ctx)
    operands = ctx.forward_args()["operands"]
    feedback = [None] * len(operands)
    for _, index, _ in ctx.op_call.active:
        feedback[index] = ctx.call(einsum_feedback, g, operands, subscripts, out, index)
    return {"operands": feedback}
