"""Shared test helpers: build a float64 model, compare compiled error propagation with autograd."""
from __future__ import annotations

import torch

import fbcompile
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
