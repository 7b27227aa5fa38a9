"""In-step updates: an update-unlocked learner applies each unit's update with the optimizer as
soon as the update exists, so a step never holds every parameter's update at once.

    optimizer.zero_grad()
    learner.step(x, y, loss_fn, optimizer=optimizer)     # instead of learner.step(...); optimizer.step()

The default step adds every update to ``.grad`` for the caller's ``optimizer.step()``: its peak
memory includes one update per parameter (on ResNet-18 at 32x32, batch 32, that alone is 42.7 of
autograd's 52.5 MB). Here the peak is the largest unit's update plus the live activations.

Contract:

- Only learners whose executor hands each unit's update over as it is made
  (``Executor.hands_over``: DRTP and shallow learning with ``execution='unlocked'``, Mono-Forward
  ``mf``); the others need the output error (or a backward through the network) before any hidden
  update and are refused. Mono-Forward's heads are the learner's own and are stepped by its head
  optimizer at the end of the step, as without in-step updates. Data parallel, each unit's update is
  all-reduced (the ranks' mean) just before it is applied.
- Every model parameter's ``.grad`` must be None when the step starts (``optimizer.zero_grad()``),
  and every trained parameter must be in the optimizer: the optimizer is stepped once per unit with
  only that unit's parameters holding a gradient, and torch optimizers skip parameters without one.
  Per-parameter optimizers (SGD, Adam, RMSprop, ...) thus give exactly what one ``optimizer.step()``
  after the default step gives; whatever looks at all gradients together (global-norm clipping,
  LBFGS, gradient hooks on the whole model) does not, and is the caller's to avoid. The step ends
  with every ``.grad`` None.
- A failed step changes nothing. Unit k's update is applied before unit k+1 runs, so a failure in
  a later unit could not be undone without keeping what was applied. So the step runs twice: a
  checking pass makes every update, checks that it is finite and drops it, inside a transaction
  that then restores the buffers and the random state; the applying pass replays the same
  computation (same parameters up to each unit, same buffers, same random numbers) and applies
  each update. This costs about twice a step's time, for the memory. Should the applying pass still
  fail (a kernel that is not deterministic), the error names the units already applied.
"""
from __future__ import annotations

import torch

from ..errors import FBCompileError
from .finite import check_updates_finite


class UnitSink:
    """Takes each update out of the step's ``{name: update}`` as soon as it is final: checks it is
    finite and, with an optimizer, applies it and frees it. Data parallel, an update applied is the
    ranks' mean (:meth:`Learner.average`: one all-reduce per unit, after the ranks' failure flags);
    the checking pass checks each rank's own updates, and the step's agreement makes a failure on
    any rank raise on all."""

    def __init__(self, learner, optimizer: torch.optim.Optimizer | None = None):
        self.learner, self.params, self.optimizer = learner, learner.program.params, optimizer
        self.applied = []           # names applied so far in this pass

    def take(self, names, updates: dict, averaged: bool = False) -> None:
        """Take ``names`` out of ``updates`` (``averaged``: already the ranks' mean, as the updates a
        step returns are)."""
        taken = {name: updates.pop(name) for name in names if name in updates}
        taken = {name: u for name, u in taken.items() if self.params[name].requires_grad}   # as accumulate_grads
        if not taken:
            return
        if self.optimizer is not None and not averaged:
            taken = dict(zip(taken, self.learner.average(list(taken.values()))))
        check_updates_finite(taken)
        if self.optimizer is None:
            return
        names = list(taken)
        params = [self.params[name] for name in names]
        for param, update in zip(params, taken.values()):
            param.grad = update if update.stride() == param.stride() else torch.empty_like(param).copy_(update)
        del taken
        try:
            self.optimizer.step()
        finally:
            for param in params:
                param.grad = None
        self.applied += names


def applied_step(learner, inputs: tuple, targets, loss_fn, optimizer: torch.optim.Optimizer):
    """One step of ``learner`` with its updates applied by ``optimizer`` unit by unit (module
    docstring): a checking pass under a transaction that always restores, then the applying pass."""
    check_can_apply(learner, optimizer)
    with learner.transaction(always_restore=True, inputs=inputs):
        result = _pass(learner, inputs, targets, loss_fn, UnitSink(learner))
    applying = UnitSink(learner, optimizer)
    try:
        with learner.transaction():
            result = _pass(learner, inputs, targets, loss_fn, applying)
    except Exception as exc:
        if not applying.applied:
            raise
        raise FBCompileError(
            f"the applying pass of an in-step update failed after the checking pass had passed (a kernel that is not "
            f"deterministic?); the updates of {', '.join(applying.applied[:5])}"
            f"{' ...' if len(applying.applied) > 5 else ''} were already applied: {exc}") from exc
    result.details.update(executor=learner.executor.name, in_step=True)
    learner.steps += 1
    return result


def _pass(learner, inputs, targets, loss_fn, sink: UnitSink):
    """The learner's checked compute (data parallel: agreed across the ranks, the updates it returns
    averaged) with ``sink`` taking each unit's update as it is handed over, then the rest (the
    output units'); raises on a non-finite update or loss."""
    learner.sink = sink
    try:
        result, rest = learner.checked_compute(inputs, targets, loss_fn)
        sink.take(list(rest), rest, averaged=True)
    finally:
        learner.sink = None
    return result


def check_can_apply(learner, optimizer) -> None:
    """Refuse, naming the reason, what in-step updates cannot do (module docstring)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise FBCompileError(f"optimizer= must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    if not learner.executor.hands_over:
        raise FBCompileError(
            f"learner {learner.name!r} (executor {learner.executor.name!r}) cannot apply its updates inside the step: "
            "only update-unlocked execution (drtp or shallow with execution='unlocked', mf) has each unit's "
            "update before the next unit runs; call learner.step(...) and then optimizer.step() (command line: "
            "leave out --in-step-updates)")
    named = dict(learner.model.named_parameters())
    in_model = {id(p) for p in named.values()}
    with_grad = [name for name, p in named.items() if p.grad is not None]
    with_grad += [f"an optimizer parameter of shape {tuple(p.shape)}" for group in optimizer.param_groups
                  for p in group["params"] if p.grad is not None and id(p) not in in_model]
    if with_grad:
        raise FBCompileError(
            f"in-step updates (optimizer=) need every .grad to be None when the step starts (call "
            f"optimizer.zero_grad()); {with_grad[0]} has one, and the optimizer steps every parameter that has a gradient")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    updated = learner.updated_params()
    missing = [name for name, p in named.items() if name in updated and id(p) not in in_optimizer]
    if missing:
        raise FBCompileError(f"in-step updates (optimizer=): parameter {missing[0]!r} is trained by "
                             f"{learner.name!r} but not in the optimizer, so its update would be lost")
