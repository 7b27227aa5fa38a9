"""Shared test helpers: compare compiled error propagation with autograd; snapshot a model and its
learner to check that a failed step changes nothing."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import NonFiniteError
from fbcompile.verify.checks import autograd_gradients, relative_error


def cpu_draw(fn, *args, generator, **kwargs):
    """``fn(*args, generator=generator, **kwargs)`` drawn on the CPU, then moved to torch's default
    device. A ``torch.Generator()`` is a CPU generator and cannot draw on CUDA; drawing on the CPU
    gives every device the numbers a CPU run draws (on the CPU: the same draw as before, bitwise)."""
    return fn(*args, generator=generator, device="cpu", **kwargs).to(torch.get_default_device())


def built_on_cpu(build):
    """``build()`` run with the CPU as torch's default device, its result (a module, a tensor or a
    tuple of them) moved to torch's default device. Module initialisation and global-RNG draws then
    come from the CPU's random stream (seeded by ``torch.manual_seed`` as on a CPU run), so a test
    whose thresholds were calibrated on a CPU run starts from the same numbers on every device."""
    with torch.device("cpu"):
        made = build()
    device = torch.get_default_device()
    if isinstance(made, tuple):
        return tuple(m.to(device) for m in made)
    return made.to(device)


def randomise_vectors(model):
    """No vector parameter at its exact default (zero biases, unit norm scales make comparisons
    vacuous or special): biases ~ N(0, 0.3), other 1-d parameters ~ N(1, 0.3). Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    return model


def grads_of(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def step_grads(learner, model, x, y, loss_fn=F.cross_entropy):
    """The model's .grad after one learner step from cleared gradients."""
    model.zero_grad(set_to_none=True)
    learner.step(x, y, loss_fn)
    return grads_of(model)


def optimizer_steps(learner, optimizer, batches, in_step: bool, loss_fn=F.cross_entropy):
    """One step per ``(x, y)`` of ``batches``: with ``in_step``, ``learner.step(..., optimizer=)``
    (updates applied inside the step); else ``learner.step`` then ``optimizer.step()``. The last
    StepResult."""
    result = None
    for x, y in batches:
        optimizer.zero_grad()
        if in_step:
            result = learner.step(x, y, loss_fn, optimizer=optimizer)
        else:
            result = learner.step(x, y, loss_fn)
            optimizer.step()
    return result


def tanh_mlp(inputs=12, width=16, depth=2, classes=5, bias=True):
    """A float64 Linear/Tanh MLP as nn.Sequential (index 2i is Linear i)."""
    layers, n = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(n, width, bias=bias), nn.Tanh()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, classes, bias=bias)).double()


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


def assert_equals_autograd_under_one_seed(model, program, x, error, seed):
    """Input and parameter gradients of ``program.propagate_error`` equal autograd's when both runs
    start from the same seed (random ops draw the same masks), float64 tolerances."""
    torch.manual_seed(seed)
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(model(leaf), [leaf, *model.parameters()], error)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ours = program.propagate_error(x, error)
    assert torch.allclose(ours, expected[0], rtol=1e-12, atol=1e-14)
    for param, grad in zip(model.parameters(), expected[1:]):
        assert torch.allclose(param.grad, grad, rtol=1e-12, atol=1e-14)


def assert_a_step_learns(model, learner, x, y, loss_fn):
    """One step of ``learner``: a finite loss, finite ``.grad`` on some parameters, and an SGD step on
    them that changes the parameters."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    result = learner.step(x, y, loss_fn)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert math.isfinite(result.loss) and grads
    assert all(torch.isfinite(g).all() for g in grads.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


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


def assert_step_writes_no_state(model, learner, inputs, targets):
    """A learner declaring ``step_writes_state = False`` (its transactions skip the state snapshot)
    leaves everything in its state_dict but the step count as it was after a step."""
    assert not learner.step_writes_state
    before = snapshot(model, learner)[3]
    learner.step(inputs, targets, F.cross_entropy)
    after = snapshot(model, learner)[3]
    assert after.pop("steps") == before.pop("steps") + 1
    assert same(before, after)


def assert_resume_is_bitwise(make, algorithm, options, steps=5, split=3):
    """Training ``steps`` steps in one go equals stopping after ``split``, rebuilding everything
    from other seeds and loading the model, learner and optimizer state dicts.
    ``make()`` returns ``(model, x, y)``, deterministic under ``torch.manual_seed(0)``."""
    def run(stop):
        torch.manual_seed(0)
        model, x, y = make()
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=2, **options)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for i in range(steps):
            if i == stop:
                state = (learner.state_dict(), optimizer.state_dict(), model.state_dict())
                torch.manual_seed(123)
                model = make()[0]
                learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=9, **options)
                optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
                model.load_state_dict(state[2])
                learner.load_state_dict(state[0])
                optimizer.load_state_dict(state[1])
            optimizer.zero_grad()
            learner.step(x, y, F.cross_entropy)
            optimizer.step()
        return [p.detach().clone() for p in [*model.parameters(), *learner.parameters()]]

    for a, b in zip(run(-1), run(split), strict=True):
        assert torch.equal(a, b)
