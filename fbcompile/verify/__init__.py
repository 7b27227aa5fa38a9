"""Numerical verification of Jacobian matching (IJML, PJML, TJML) per node and per unit.

``verify(program, inputs)`` evaluates every node's forward map F and feedback map G at the forward
operating point of ``inputs`` and reports ||J_G - J_F^T||, ||J_G - J_F^+|| and ||J_G - J_F^-1||
(Frobenius, absolute and relative to the target matrix's norm). Jacobians are dense (torch.func)
when a node's per-sample Jacobian has at most ``dense_limit`` entries, else estimated from
``probes`` random probes with their standard error. Use float64 models and inputs where exactness is
claimed: exact rules then show relative TJML around 1e-15.

Every node that error mode sends feedback through gets a row per path (see
:mod:`fbcompile.verify.evaluate`): "activation" (its inputs that depend on a model input) and
"parameter" (its parameter-path inputs: class tokens, transposed weights, embeddings on integer
ids, checked against autograd as gradients). Tuple values, slices of tuples, None elements and
integer pieces are taken apart into their floating tensors.

``limit`` (default "difference"): the small-beta limit of target propagation per unit, the angle
between DTP's update as beta -> 0 and error mode's (:mod:`fbcompile.verify.limit`); None skips it.
"""
from __future__ import annotations

import math

import torch

from ..context import RuleContext
from ..program import as_tuple
from ..trace import info
from .evaluate import ACTIVATION, batch_local, forward_values, node_paths, node_problem, unit_problem
from .jacobian import dense_metrics, randomized_metrics
from .limit import limit_angles
from .report import METRIC_OF_CONDITION, VerifyReport

DENSE_LIMIT = 1 << 25


def verify(program, inputs, *, dense_limit: int = DENSE_LIMIT, pinv_limit: int = 1 << 18, probes: int = 8,
           seed: int = 0, units: bool = True, chunk: int = 512, limit: str | None = "difference",
           limit_beta: float | None = None) -> VerifyReport:
    """Per-node (and per-unit) Jacobian matching report of ``program`` at ``inputs``, with the
    per-unit small-beta limit of ``limit`` mode ("difference", "unit_difference" or None) at
    ``limit_beta`` (default: eps^(1/3) of the dtype)."""
    inputs = as_tuple(inputs)
    program.check_model(inputs)
    with torch.no_grad():   # torch.func transforms still differentiate; nothing else records a graph
        report = _verify(program, inputs, dense_limit, pinv_limit, probes, seed, units, chunk)
        if limit is not None:
            report.limit = limit_angles(program, inputs, mode=limit, beta=limit_beta, seed=seed)
    return report


def _verify(program, inputs, dense_limit, pinv_limit, probes, seed, units, chunk) -> VerifyReport:
    values = forward_values(program, inputs)
    batch = inputs[0].shape[0] if inputs[0].dim() else None
    generator = torch.Generator().manual_seed(seed)
    options = dict(dense_limit=dense_limit, pinv_limit=pinv_limit, probes=probes, generator=generator, chunk=chunk)
    rows = []
    for node, rule in program.rules.items():
        for path in node_paths(node):
            # parameter paths: whole batch (parameters are shared by the samples), always J^T
            local = path == ACTIVATION and batch is not None and batch_local(program, node, batch)
            make = lambda sample, node=node, path=path: node_problem(program, node, values, sample, path)
            metrics = _measure(make, batch if local else None,
                               **{**options, "pinv_limit": pinv_limit if path == ACTIVATION else 0})
            rows.append(_row("node", node.name, info(node).call.spec.name, rule.name,
                             rule.kind_for(RuleContext(node)), metrics,
                             program.condition if path == ACTIVATION else "T", path))
    if units:
        for unit in program.units:
            ops = [n for n in unit.nodes if n in program.rules]
            if not unit.inputs or not unit.outputs or len(ops) < 2:
                continue    # a one-op unit is its node's row
            local = batch is not None and all(batch_local(program, n, batch) for n in ops)
            make = lambda sample, unit=unit: unit_problem(program, unit, values, sample)
            metrics = _measure(make, batch if local else None, **options)
            kinds = {program.rules[n].kind_for(RuleContext(n)) for n in ops}
            kind = "exact" if kinds == {"exact"} else ", ".join(sorted(kinds - {"exact"}))
            rows.append(_row("unit", f"unit {unit.index}", unit.name, "-", kind, metrics, program.condition,
                             ACTIVATION))
    return VerifyReport(type(program.model).__name__, program.condition, rows)


def _measure(make, batch, *, dense_limit, pinv_limit, probes, generator, chunk) -> dict:
    """Dense per-sample blocks (batch-local) or whole-batch Jacobians, randomized when too large."""
    samples = list(range(batch)) if batch is not None else [None]
    first = make(samples[0])
    if first.n_in * first.n_out > dense_limit:
        whole = make(None) if batch is not None else first
        return {**randomized_metrics(whole, probes=probes, generator=generator), "n_in": whole.n_in,
                "n_out": whole.n_out}
    total = {"tjml2": 0.0, "fnorm2": 0.0, "pjml2": 0.0, "pnorm2": 0.0, "ijml2": 0.0, "inorm2": 0.0}
    have_p = have_i = True
    for sample in samples:
        problem = first if sample == samples[0] else make(sample)
        m = dense_metrics(problem, chunk=chunk, pinv_limit=pinv_limit)
        total["tjml2"] += m["tjml2"]
        total["fnorm2"] += m["fnorm2"]
        have_p &= m["pjml"] is not None
        have_i &= m["ijml"] is not None
        if have_p:
            total["pjml2"] += m["pjml"] ** 2
            total["pnorm2"] += m["pnorm"] ** 2
        if have_i:
            total["ijml2"] += m["ijml"] ** 2
            total["inorm2"] += m["inorm"] ** 2
    method = "dense" + (f" ({len(samples)} samples)" if batch is not None else "")
    return {"method": method, "tjml2": total["tjml2"], "fnorm2": total["fnorm2"], "n_in": first.n_in,
            "n_out": first.n_out,
            "pjml": math.sqrt(total["pjml2"]) if have_p else None, "pnorm": math.sqrt(total["pnorm2"]) if have_p else None,
            "ijml": math.sqrt(total["ijml2"]) if have_i else None, "inorm": math.sqrt(total["inorm2"]) if have_i else None}


def _rel(value, norm):
    if value is None or norm is None:
        return None
    return value / norm if norm > 0 else (0.0 if value == 0 else math.inf)


def _row(level, name, op, rule, kind, m, condition, path) -> dict:
    tjml = math.sqrt(max(m["tjml2"], 0.0))
    fnorm = math.sqrt(m["fnorm2"])
    se = m.get("tjml2_se")
    row = {
        "level": level, "node": name, "path": path, "op": op, "rule": rule, "kind": kind, "method": m["method"],
        "n_in": m["n_in"], "n_out": m["n_out"],
        "tjml": tjml, "tjml_rel": _rel(tjml, fnorm),
        "tjml_se": (se / (2 * tjml) if tjml > 0 else math.sqrt(se)) if se is not None else None,
        "pjml": m["pjml"], "pjml_rel": _rel(m["pjml"], m["pnorm"]),
        "ijml": m["ijml"], "ijml_rel": _rel(m["ijml"], m["inorm"]),
    }
    row["matching"] = row[METRIC_OF_CONDITION[condition]]
    return row


__all__ = ["verify", "VerifyReport"]
