"""Reusable checks for people writing rules (used by fbcompile's own tests).

- :func:`adjoint_check`: the adjoint identity <J_F u, v> = <u, J_G v> with random u, v (never
  all-ones vectors) for one node, in the program's dtype (use float64).
- :func:`autograd_gradients`: what ``loss.backward()`` would write, for comparing with
  :meth:`FeedbackProgram.propagate_error`.
- :func:`relative_error`: ||a - b|| / ||b|| over matching tensors.
- :func:`rule_errors`: both measures (relative TJML from :func:`fbcompile.verify` and the adjoint
  gap) for every node of a program, for property tests of new rules.

A node has up to two paths (:func:`fbcompile.verify.evaluate.node_paths`): its activations, and the
parameter path error mode feeds (class tokens, transposed weights, embeddings on integer ids). Both
checks take the worse of the node's paths.
"""
from __future__ import annotations

import torch
from torch.func import jvp, vjp

from ..errors import OptionError
from ..program import as_tuple
from .evaluate import forward_values, node_paths, node_problem


def adjoint_check(program, node_name: str, inputs, *, trials: int = 3, seed: int = 0) -> float:
    """Largest relative gap |<J_F u, v> - <u, J_G v>| / (||J_F u|| ||v|| + ||u|| ||J_G v||) over
    ``trials`` random (u, v) pairs at the forward operating point of ``inputs``, over every path of
    the node. The scale is the Cauchy-Schwarz bound of both inner products: dividing by
    |<J_F u, v>| itself would blow up whenever a random pair happens to be nearly orthogonal (a
    low-rank J_F, such as a normalised group of three entries, makes that common)."""
    node = next((n for n in program.rules if n.name == node_name), None)
    if node is None:
        raise OptionError(f"adjoint_check: {node_name!r} is not a node with a feedback rule; nodes: "
                          f"{', '.join(n.name for n in program.rules)}")
    values = forward_values(program, as_tuple(inputs))
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for path in node_paths(node):
            worst = max(worst, _adjoint_gap(node_problem(program, node, values, path=path), trials, generator))
    return worst


def _norm(parts) -> float:
    """Euclidean norm of a sequence of tensors taken together (None entries skipped)."""
    return sum(float((p * p).sum()) for p in parts if p is not None) ** 0.5


def _adjoint_gap(problem, trials: int, generator) -> float:
    worst = 0.0
    for _ in range(trials):
        u = tuple(_randn(x, generator) for x in problem.inputs)
        v = tuple(torch.randn(s, dtype=u[0].dtype, device="cpu", generator=generator).to(u[0].device)
                  for s in problem.output_shapes)
        gv = problem.feedback(*v)
        if problem.reverse_only:    # <J_F u, v> as <u, J_F^T v>, J_F^T by autograd's vjp
            jtv = vjp(problem.forward, *problem.inputs)[1](v)
            left = sum(float((a * b).sum()) for a, b in zip(u, jtv))
            scale = _norm(u) * _norm(jtv)
        else:
            ju = jvp(problem.forward, tuple(problem.inputs), u)[1]
            left = sum(float((a * b).sum()) for a, b in zip(ju, v))
            scale = _norm(ju) * _norm(v)
        right = sum(float((a * b).sum()) for a, b in zip(u, gv))
        scale += _norm(u) * _norm(gv)
        worst = max(worst, abs(left - right) / (scale + 1e-300))
    return worst


def _randn(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, dtype=like.dtype, device="cpu", generator=generator).to(like.device)


def autograd_gradients(model, inputs, output_error) -> tuple[tuple, dict]:
    """(input gradients, {parameter name: gradient}) of <model(inputs), output_error> by autograd,
    leaving the model's ``.grad`` untouched."""
    inputs = tuple(x.detach().clone().requires_grad_(True) for x in as_tuple(inputs))
    params = dict(model.named_parameters())
    out = model(*inputs)
    outs, errors = as_tuple(out), as_tuple(output_error)
    total = sum((o * e).sum() for o, e in zip(outs, errors))
    grads = torch.autograd.grad(total, list(inputs) + list(params.values()), allow_unused=True)
    return grads[:len(inputs)], dict(zip(params, grads[len(inputs):]))


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are zero), over tensors or matching sequences of tensors, real or
    complex."""
    a_list, b_list = as_tuple(a), as_tuple(b)
    num = sum(float((x - y).abs().pow(2).sum()) for x, y in zip(a_list, b_list)) ** 0.5
    den = sum(float(y.abs().pow(2).sum()) for y in b_list) ** 0.5
    return 0.0 if num == 0 else num / den if den > 0 else float("inf")


def rule_errors(program, inputs, *, nodes=None, trials: int = 2, **verify_options) -> dict:
    """``{node name: (relative TJML, adjoint gap)}`` for every ruled node of ``program`` (or the
    named ``nodes``) at ``inputs``, the worse of the node's paths. For exact T rules both are
    ~1e-15 in float64. PJML and IJML are skipped unless ``pinv_limit`` is passed (they need an SVD
    per node)."""
    from . import verify
    verify_options.setdefault("pinv_limit", 0)
    worst = {}
    for row in verify(program, inputs, units=False, limit=None, **verify_options).rows:
        worst[row["node"]] = max(worst.get(row["node"], 0.0), row["tjml_rel"])
    names = [n.name for n in program.rules] if nodes is None else list(nodes)
    return {name: (worst[name], adjoint_check(program, name, inputs, trials=trials)) for name in names}
