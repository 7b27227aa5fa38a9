"""Finiteness checks of a step's updates: a step whose updates or loss hold an inf or nan raises
:class:`~fbcompile.errors.NonFiniteError` (naming the parameters) before anything is written."""
from __future__ import annotations

import math

import torch

from ..errors import NonFiniteError


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite, with one device sync: a sum is finite exactly
    when no term is inf or nan (up to overflow, which is then reported as non-finite too)."""
    sums = [t.sum() for t in tensors if t is not None and t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def check_finite(grads: dict, result) -> None:
    """:func:`check_updates_finite`, then the loss of ``result`` (a StepResult)."""
    check_updates_finite(grads)
    if not math.isfinite(result.loss):
        raise NonFiniteError(f"the loss is {result.loss}; nothing was changed")


def check_updates_finite(grads: dict) -> None:
    """Raise :class:`NonFiniteError` naming the parameters whose update has an inf or nan."""
    if _updates_finite(list(grads.values())):
        return
    bad = [name for name, g in grads.items() if g is not None and not torch.isfinite(g).all()]
    if not bad:             # the summing check's overflow (see all_finite), not a non-finite entry
        return
    raise NonFiniteError(f"non-finite update for {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                         "nothing was changed (lower the learning rate or beta, or check the inputs)")


def _updates_finite(updates: list) -> bool:
    """:func:`all_finite` for a step's own update tensors, exact (no overflow caveat) and about twice
    as fast: the fused inf/nan check behind ``torch.amp.GradScaler`` with an unscale factor of 1.
    That kernel writes its input in place (x * 1 == x, but the version counter moves), so it only
    gets tensors no autograd graph can have saved: fresh, non-view, not requiring grad."""
    fused, rest = {}, []
    for t in updates:
        if t is None or not t.numel():
            continue
        if t.is_floating_point() and t._base is None and not t.requires_grad:
            fused.setdefault(t.device, []).append(t)
        else:
            rest.append(t)
    for device, tensors in fused.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
        if bool(found):
            return False
    return all_finite(rest)
