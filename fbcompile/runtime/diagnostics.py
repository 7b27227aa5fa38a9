"""Per-unit diagnostics of a learner's update, without changing any state and without copying the model.

For every unit with parameters:

- ``angle_bp`` (degrees) and ``norm_ratio``: the update the learner would write vs the BP gradient
  of the same loss (autograd), over the unit's parameters;
- ``angle_gn``: vs the update from damped Gauss-Newton targets (paper 003, Condition 2):
  t_i = h_i - beta J_i^T (J_i J_i^T + lambda I)^-1 e with J_i = dh_L/dh_i, which gives the unit's
  parameters the update J_theta^T J_i^T (J_i J_i^T + lambda I)^-1 e (lambda = ``damping``);
- ``feedback_angle``: angle between feedback and forward weights of the unit's feedback slots,
  where the learner has its own feedback weights (FA, FWDTP, learned DTP);
- ``reconstruction``: the last reconstruction loss of learned feedback for the unit.
"""
from __future__ import annotations

import math

import torch

from ..errors import FBCompileError
from ..explain import format_table
from ..trace import preserved_state


def angle(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Angle in degrees between two flattened tensors (None if either is missing or zero)."""
    if a is None or b is None:
        return None
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    denominator = float(a.norm() * b.norm())
    if denominator == 0:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / denominator))))


class Diagnostics:
    def __init__(self, algorithm: str, rows: list[dict]):
        self.algorithm, self.rows = algorithm, rows

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "rows": self.rows}

    def __str__(self):
        columns = ["unit", "name", "angle_bp", "norm_ratio", "angle_gn", "feedback_angle", "reconstruction"]
        shown = [{c: (f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-"))) for c in columns}
                 for r in self.rows]
        return f"diagnostics of {self.algorithm}\n" + format_table(shown, columns)

    __repr__ = __str__


def diagnose(learner, inputs: tuple, targets, loss_fn, damping: float = 1e-3) -> Diagnostics:
    program = learner.program
    with learner.transaction(always_restore=True, inputs=inputs):
        _, update = learner.compute(inputs, targets, loss_fn)
        reconstruction = dict(learner.last.get("reconstruction", {}))
    bp = _autograd_gradients(program, inputs, targets, loss_fn)
    gn = _gauss_newton_updates(program, inputs, targets, loss_fn, damping)
    feedback = getattr(learner, "feedback", None)
    rows = []
    for unit in program.units:
        if not unit.params:
            continue
        cat = lambda grads: _concat([grads.get(p) for p in unit.params], [program.params[p] for p in unit.params])
        mine, reference = cat(update), cat(bp)
        rows.append({
            "unit": unit.index, "name": unit.name,
            "angle_bp": angle(mine, reference),
            "norm_ratio": float(mine.norm() / reference.norm()) if mine is not None and reference is not None
            and float(reference.norm()) > 0 else None,
            "angle_gn": angle(mine, cat(gn)),
            "feedback_angle": _feedback_angle(program, feedback, unit),
            "reconstruction": reconstruction.get(unit.index),
        })
    return Diagnostics(learner.name, rows)


def _concat(grads: list, like: list):
    if all(g is None for g in grads):
        return None
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)])


def _feedback_angle(program, feedback, unit):
    if feedback is None:
        return None
    mapping = feedback.mapping()
    angles = [angle(mapping[key].detach(), program.params[feedback.qualnames[key]].detach())
              for key in feedback.keys if program.partition.unit_of.get(_node(program, key[0])) is unit]
    angles = [a for a in angles if a is not None]
    return sum(angles) / len(angles) if angles else None


def _node(program, name):
    for node in program.traced.graph.nodes:
        if node.name == name:
            return node
    raise FBCompileError(f"feedback slot {name!r} names no node of the traced graph")


def _autograd_gradients(program, inputs, targets, loss_fn) -> dict:
    names = [n for n, p in program.params.items() if p.requires_grad]
    with preserved_state(program.model), torch.enable_grad():
        loss = loss_fn(program.model(*inputs), targets)
        grads = torch.autograd.grad(loss, [program.params[n] for n in names], allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


def _gauss_newton_updates(program, inputs, targets, loss_fn, damping: float) -> dict:
    """Parameter updates from damped Gauss-Newton targets at every unit output."""
    from .losses import output_error
    with preserved_state(program.model):
        output, _, values = program.executable().local_forward()(*inputs)
        _, errors = output_error(output, targets, loss_fn)
        e = torch.cat([err.reshape(-1) for err in errors]).detach()
        roots, deltas = [], []
        for node, h in zip(program.boundary, values):
            if node.op == "placeholder" or not h.requires_grad:
                continue
            point = h.detach().requires_grad_(True)
            with torch.enable_grad():    # plain autograd (BatchNorm's in-place statistics are fine)
                out = torch.cat([o.reshape(-1) for o in program.resume_forward(node.name)(*inputs, point)])
                basis = torch.eye(e.numel(), dtype=out.dtype, device=out.device)
                rows = torch.autograd.grad(out, point, basis, is_grads_batched=True)[0]
            with torch.no_grad():
                jacobian = rows.reshape(e.numel(), -1)                                  # J_i: (n_L, n_i)
                gram = jacobian @ jacobian.t() + damping * torch.eye(e.numel(), dtype=e.dtype, device=e.device)
                delta = jacobian.t() @ torch.linalg.solve(gram, e.to(jacobian.dtype))
            roots.append(h)
            deltas.append(delta.reshape(h.shape))
        names = [n for n, p in program.params.items() if p.requires_grad]
        grads = torch.autograd.grad(roots, [program.params[n] for n in names], deltas, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}
