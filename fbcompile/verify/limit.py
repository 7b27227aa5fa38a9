"""The small-beta limit of target propagation, unit by unit (paper 002: with condition-T feedback,
analytic DTP's update tends to BP's as beta -> 0).

Target mode feeds the output difference d_L = t_L - h_L = -beta e (e: the output error) back through
the "difference" feedback graph: an affine rule maps d by its error map, a non-linear rule k by
d_in = G_k(h_k + d_out) - G_k(h_k), with G_k the rule's *target* map. Each unit u then learns from
its local delta delta_u = (h_u - t_u) / beta = -d_u / beta at its outputs. As beta -> 0,

    delta_u -> J_{G_K} ... J_{G_1} e     (the Jacobians of the target maps at the forward values),

while error mode sends e_u = J_{E_K} ... J_{E_1} e (E_k: the rules' error maps) to the same unit
outputs. A rule whose target map is the linearisation of its error map (J_{G_k}(h_k) = E_k) makes
delta_u = e_u at every unit output, so both updates agree and every angle is 0; a rule whose target
map is anything else (off by a factor, evaluated at the wrong point, a fan-out or shape read combined
wrongly by the target pass) turns up as a non-zero angle in the units upstream of it.

The limit is taken by a central difference over beta, d'(0) = (d(beta) - d(-beta)) / (2 beta),
exact up to O(beta^2) (beta = eps^(1/3) of the dtype: 6e-6 in float64, 5e-3 in float32), with a
random output error e (the limit is linear in e). Both boundary signals, delta_u and e_u, are then
turned into parameter updates by the *same* local backward, autograd through each unit with its
inputs detached (what the DTP learner computes; its compiled "unit_error" graph equals it where
the units' error maps are exact), and each unit's angle is taken between the two updates of the
parameters it trains. Where the units' error maps are exact (kinds exact/linearised) the error-side
update is error mode's own parameter gradient; with frozen-statistics rules inside a unit, using the
same local backward on both sides keeps their known residual out of the angle, so that what remains
measures the target maps alone. One forward, one error pass, two difference passes and two
backward passes: cheap.
"""
from __future__ import annotations

import math

import torch

from ..errors import OptionError, choices_text
from ..program import as_tuple
from ..trace import preserved_state

MODES = ("difference", "unit_difference")


def limit_angles(program, inputs: tuple, *, mode: str = "difference", beta: float | None = None,
                 seed: int = 0, output_error=None) -> dict:
    """``{"mode", "beta", "rows", "problem", "failed"}``: per unit, the angle (degrees) between the target-mode
    update in the small-beta limit and the error-mode update of that unit's trainable parameters.
    Rows: ``unit``, ``name``, ``params`` (number of trainable tensors), ``angle_deg`` (None where
    undefined), ``error_norm``, ``target_norm`` (norms of the two updates) and ``note``.
    ``problem``: why no rows were computed, else None; ``failed``: True when that is because target
    mode itself fails on the model (the exception is in ``problem``), False when there is nothing to
    check (no TP units).
    ``output_error``: e (one tensor per model output, e.g. dL/dh_L of a real loss); default random."""
    if mode not in MODES:
        raise OptionError(f"limit={mode!r}; use {choices_text(MODES)} (DTP's per-op or per-unit correction), "
                          "or None to skip the small-beta check")
    inputs = as_tuple(inputs)
    floating = [x.dtype for x in inputs if x.is_floating_point()] + [p.dtype for p in program.params.values()]
    dtype = floating[0] if floating else torch.get_default_dtype()
    beta = float(torch.finfo(dtype).eps ** (1 / 3)) if beta is None else float(beta)
    result = {"mode": mode, "beta": beta, "rows": [], "problem": None, "failed": False}
    if not program.units:
        result["problem"] = "no TP units: no value depends on a model input, so no target reaches a parameter"
        return result
    try:
        error_update, target_update = _updates(program, inputs, mode, beta, seed, output_error)
    except Exception as exc:    # reported in the report (and by limit_failures), never a crash of verify
        result["problem"] = (f"target mode ({mode!r}) cannot run on this model, so a DTP learner cannot either: "
                             f"{type(exc).__name__}: {exc}")
        result["failed"] = True
        return result
    result["rows"] = [_unit_row(program, unit, error_update, target_update) for unit in program.units]
    return result


def _updates(program, inputs, mode, beta, seed, output_error) -> tuple[dict, dict]:
    """(error-side, target-side) parameter updates: see the module docstring."""
    run = program.executable("error", mode)
    with preserved_state(program.model), torch.enable_grad():
        output, taps, boundary = run.local_forward()(*inputs)
        generator = torch.Generator().manual_seed(seed)
        errors = ([torch.randn(o.shape, dtype=o.dtype, device="cpu", generator=generator).to(o.device) for o in as_tuple(output)]
                  if output_error is None else list(as_tuple(output_error)))
        with torch.no_grad():
            error_side = run.run_feedback("error", errors, taps, returns="units")[0]
            plus = run.run_feedback(mode, [-beta * e for e in errors], taps, returns="units")[0]
            minus = run.run_feedback(mode, [beta * e for e in errors], taps, returns="units")[0]
        target_side = [None if p is None or m is None else _map(lambda a, b: (b - a) / (2 * beta), p, m)
                       for p, m in zip(plus, minus)]
        return _local_updates(program, boundary, error_side), _local_updates(program, boundary, target_side)


def _map(fn, a, b):
    if isinstance(a, (list, tuple)):
        return [None if x is None or y is None else fn(x, y) for x, y in zip(a, b)]
    return fn(a, b)


def _local_updates(program, boundary: list, signals: list) -> dict:
    """{parameter: update} from ``signals`` (one per boundary value, None where none) at the unit
    outputs: one autograd backward through the unit-local graphs of ``Executable.local_forward()``
    (each unit's inputs detached), as the DTP learner's fallback computes it."""
    roots, grads = [], []
    for node, value, signal in zip(program.boundary, boundary, signals):
        if signal is None or node.op == "placeholder":
            continue
        for v, s in zip(value if isinstance(value, (list, tuple)) else (value,),
                        signal if isinstance(signal, (list, tuple)) else (signal,)):
            if s is not None and torch.is_tensor(v) and v.requires_grad:
                roots.append(v)
                grads.append(s)
    names = [n for n, p in program.params.items() if p.requires_grad]
    if not roots:
        return {}
    found = torch.autograd.grad(roots, [program.params[n] for n in names], grads, retain_graph=True,
                                allow_unused=True)
    return {n: g for n, g in zip(names, found) if g is not None}


def _unit_row(program, unit, error_update: dict, target_update: dict) -> dict:
    names = [q for q in unit.params if program.params[q].requires_grad]
    row = {"unit": unit.index, "name": unit.name, "params": len(names), "angle_deg": None,
           "error_norm": None, "target_norm": None, "note": ""}
    if not names:
        row["note"] = "no trainable parameters"
        return row
    a = _flat(program, names, error_update)
    b = _flat(program, names, target_update)
    row["error_norm"], row["target_norm"] = float(a.norm()), float(b.norm())
    if row["error_norm"] == 0 and row["target_norm"] == 0:
        row["note"] = "both updates are zero"
    elif row["error_norm"] == 0 or row["target_norm"] == 0:
        row["note"] = f"the {'error' if row['error_norm'] == 0 else 'target'}-mode update is zero, the other is not"
    else:
        row["angle_deg"] = angle_deg(a, b)
    return row


def _flat(program, names: list, update: dict) -> torch.Tensor:
    return torch.cat([(update[n] if update.get(n) is not None else torch.zeros_like(program.params[n])).detach()
                      .reshape(-1).to(torch.float64) for n in names])


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between two non-zero vectors in degrees, 2 atan2(|a' - b'|, |a' + b'|) with unit
    vectors a', b': accurate near 0 and 180 degrees, where acos of the cosine is not."""
    a, b = a / a.norm(), b / b.norm()
    return math.degrees(2 * math.atan2(float((a - b).norm()), float((a + b).norm())))
