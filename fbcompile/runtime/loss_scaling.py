"""Loss scaling for float16 training: ``learner.step(x, y, loss_fn, scaler=torch.amp.GradScaler(...))``.

Under float16 autocast the errors flowing back through a network are small (a mean loss gives each
sample 1/N of it) and fall below float16's smallest numbers, where they become zero and nothing
learns. ``torch.amp.GradScaler`` multiplies the loss by a scale S: every error and update is S
times larger, ``scaler.step(optimizer)`` divides the ``.grad`` by S again before the optimizer step
(and skips the step when anything overflowed), and ``scaler.update()`` lowers S after an overflow
and raises it after a run of clean steps.

A step with ``scaler=`` computes the updates of the loss S L, so the ``.grad`` it writes are S times
the unscaled step's, as ``scaler.scale(loss).backward()`` leaves autograd's. That is exact only for
learners whose updates are linear in the loss, each a linear map of e = dL/dy: bp, fa, dfa and
shallow (``Learner.linear_in_loss``). The others are refused by name: a target h - beta e (tp, dtp
and their kin) moves non-linearly with S, sdfa keeps only sign(e), drtp and Mono-Forward's heads
learn from the labels rather than from L.

An overflow (an inf or nan in the scaled updates) is no error under loss scaling: what the
learner owns is rolled back as for a failed step, the model's parameters are not touched, and the
non-finite updates are added to ``.grad`` as autograd would add them, so that ``scaler.step`` finds
them, skips the optimizer step, and ``scaler.update()`` lowers the scale. ``StepResult.details``
records ``loss_scale`` and ``overflow``; ``StepResult.loss`` is L itself, not S L.
"""
from __future__ import annotations

from ..errors import NonFiniteError, OptionError
from .finite import check_updates_finite


class _Overflow(Exception):
    """Raised inside the step's transaction (which then rolls back) to carry the non-finite updates out."""

    def __init__(self, result, grads):
        super().__init__("overflow")
        self.result, self.grads = result, grads


def scaled_step(learner, inputs: tuple, targets, loss_fn, scaler):
    """One step of ``learner`` on the loss scaled by ``scaler`` (see the module docstring)."""
    if not learner.linear_in_loss:
        raise OptionError(f"step(..., scaler=): loss scaling multiplies every update by the scale only for "
                          f"learners whose updates are linear in the loss (bp, fa, dfa, shallow); {learner.name!r} "
                          "is not (targets, signs or labels). Train it in bfloat16, which needs no loss scaling")
    if learner.communicator is not None:
        raise OptionError("step(..., scaler=) is not supported with a process group: run float16 data parallel "
                          "without loss scaling, or in bfloat16")
    if not scaler.is_enabled():
        return learner.step(inputs, targets, loss_fn)

    def scaled_loss(output, target):
        return scaler.scale(loss_fn(output, target))      # S L, as for autograd (and the scaler set up)

    try:
        with learner.transaction(inputs=inputs):
            result, grads = learner.compute(inputs, targets, scaled_loss)
            try:
                check_updates_finite(grads)
            except NonFiniteError:
                raise _Overflow(result, grads) from None
        overflow = False
    except _Overflow as failed:
        result, grads, overflow = failed.result, failed.grads, True
    scale = float(scaler.get_scale())
    result.loss /= scale
    result.details.update(loss_scale=scale, overflow=overflow)
    return learner.finish_step(result, grads)
