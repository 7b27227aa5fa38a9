"""The loss of a batch and its error e = dL/d(model output), which every learner starts from.

:func:`output_error` works for any ``loss_fn``: one autograd call on a detached copy of the output
(:func:`autograd_output_error`). For the two losses training uses most, softmax cross-entropy with
class-index targets and mean squared error, it skips the autograd engine (about a hundred
microseconds a step, several percent of a small model's step) and calls the backward kernels that
autograd's own backward of those losses runs, with the same arguments, so the loss and e are
bitwise identical to the autograd call's:

    cross-entropy:  l = log_softmax(a);  L = nll_loss(l, y; weight, ignore_index, reduction)
                    e = log_softmax_backward(nll_loss_backward(1, l, y, ...), l)
                      = (softmax(a) - onehot(y)) * w_y / (sum of w_y over non-ignored samples)  (mean)
    mse:            e = mse_loss_backward(1, a, t, reduction) = 2 (a - t) / numel  (mean)

Anything else (other losses, label smoothing, probability targets, several outputs, tensor
subclasses, an output that needs broadcasting) takes the autograd call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FBCompileError
from ..program import as_tuple

aten = torch.ops.aten
REDUCTIONS = {"mean": 1, "sum": 2}          # at::Reduction; "none" has no scalar loss


def output_error(output, targets, loss_fn) -> tuple[torch.Tensor, tuple]:
    """(loss, (dL/d output,) per model output), both detached."""
    known = _known_loss(output, targets, loss_fn)
    if known is not None:
        return known
    return autograd_output_error(output, targets, loss_fn)


def autograd_output_error(output, targets, loss_fn) -> tuple[torch.Tensor, tuple]:
    """(loss, dL/d output) for any loss, by autograd on a detached copy of the output only."""
    outs = tuple(o.detach().requires_grad_(True) for o in as_tuple(output))
    with torch.enable_grad():
        loss = scalar_loss(loss_fn, outs, targets)
        errors = torch.autograd.grad(loss, outs, allow_unused=True)
    errors = tuple(e if e is not None else torch.zeros_like(o) for e, o in zip(errors, outs))
    return loss.detach(), errors


def scalar_loss(loss_fn, outs: tuple, targets) -> torch.Tensor:
    """``loss_fn`` applied to the model outputs (one tensor, or the tuple of several), checked to be
    a scalar tensor."""
    loss = loss_fn(outs[0] if len(outs) == 1 else outs, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise FBCompileError("loss_fn must return a scalar tensor")
    return loss


def _known_loss(output, targets, loss_fn):
    """(loss, (e,)) by the loss's backward kernels, or None when ``loss_fn`` is not one of them
    with arguments they take as they are."""
    if type(output) is not torch.Tensor or type(targets) is not torch.Tensor:
        return None
    output = output.detach()
    if loss_fn is F.cross_entropy or type(loss_fn) is nn.CrossEntropyLoss:
        options = _module_options(loss_fn, label_smoothing=0.0, weight=None, ignore_index=-100)
        if options is None or options["label_smoothing"] != 0.0:
            return None
        return _cross_entropy(output, targets, options)
    if loss_fn is F.mse_loss or type(loss_fn) is nn.MSELoss:
        options = _module_options(loss_fn)
        if options is None or output.shape != targets.shape or output.dtype != targets.dtype:
            return None
        loss = aten.mse_loss(output, targets, options["reduction"])
        return loss, (aten.mse_loss_backward(torch.ones_like(loss), output, targets, options["reduction"]),)
    return None


def _module_options(loss_fn, **defaults) -> dict | None:
    """The module's settings (the functional's defaults for the function), reduction as its
    at::Reduction number; None for a reduction without a scalar loss."""
    options = {"reduction": "mean", **defaults}
    if isinstance(loss_fn, nn.Module):
        options = {name: getattr(loss_fn, name) for name in options}
    if options["reduction"] not in REDUCTIONS:
        return None
    return {**options, "reduction": REDUCTIONS[options["reduction"]]}


def _cross_entropy(logits, labels, options: dict):
    weight = options["weight"]
    if (logits.dim() != 2 or not logits.is_floating_point() or labels.dtype != torch.long or labels.dim() != 1
            or labels.shape[0] != logits.shape[0] or (weight is not None and weight.requires_grad)):
        return None
    reduction, ignore_index = options["reduction"], options["ignore_index"]
    log_probs = torch.log_softmax(logits, 1)
    loss, total_weight = aten.nll_loss_forward(log_probs, labels, weight, reduction, ignore_index)
    grad = aten.nll_loss_backward(torch.ones_like(loss), log_probs, labels, weight, reduction, ignore_index,
                                  total_weight)
    return loss, (aten._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype),)
