"""Shared test helpers: compare compiled error propagation with autograd; snapshot a model and its
learner to check that a failed step changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.errors import NonFiniteError
from fbcompile.verify.checks import autograd_gradients, relative_error


def grads_of(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def compare_with_autograd(model, x, *, program=None, output_error=None):
    """(input rel. error, worst parameter rel. error) of propagate_error vs autograd, float64."""
    program = program or fbcompile.compile(model, x)
    out = model(x)
    error = output_error if output_error is not None else torch.randn_like(out)
    ref_inputs, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    mine = grads_of(model)
    worst = max((relative_error(mine[n], g) for n, g in ref_params.items() if g is not None), default=0.0)
    return relative_error(ours, ref_inputs[0]), worst


def snapshot(model, learner):
    """Parameters, .grad, buffers and the learner's state, copied."""
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()},
            copy.deepcopy(learner.state_dict()))


def same(a, b) -> bool:
    """Bitwise equality of nested dicts / sequences of tensors and plain values."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def assert_failed_step_changes_nothing(model, learner, bad_inputs, targets):
    """A step on non-finite inputs raises NonFiniteError and leaves parameters, .grad, buffers,
    the learner's state and the global random generator exactly as they were."""
    before, rng = snapshot(model, learner), torch.random.get_rng_state()
    with pytest.raises(NonFiniteError):
        learner.step(bad_inputs, targets, F.cross_entropy)
    assert same(before, snapshot(model, learner)) and torch.equal(rng, torch.random.get_rng_state())
