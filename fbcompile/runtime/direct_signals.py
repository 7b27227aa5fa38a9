"""The output-side signals of the direct learners and the projections B_u that carry them.

A :class:`Signal` is one batch's per-sample signal s (the error e, its sign, the one-hot target y*),
dense (N, C) or, for class labels, the label indices with a scale; :class:`DirectProjections`
holds B_u for every projected unit output (stored (C, *S_u), drawn by
:func:`fbcompile.passes.direct.draw_projections`) and maps s onto the unit: delta_u = s B_u.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FBCompileError, OptionError
from ..passes.direct import DirectPlan, draw_projections, project_dense, project_labels


@dataclass
class Signal:
    """The per-sample output-side signal of one batch: ``dense`` (N, C), or one-hot ``labels`` (N,)
    times ``factor``; ``output`` is the flattened, detached model output (for DDTP-RHL)."""
    batch: int
    dense: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    factor: float = 1.0
    output: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)


class DirectProjections(nn.Module):
    """The matrices B_u (or DDTP-linear's Q_u) of a plan, stored as (C, *S_u); trainable for DDTP."""

    def __init__(self, plan: DirectPlan, *, init: str, fan: str, scale: float | None, seed: int,
                 trainable: bool = False):
        super().__init__()
        tensors = draw_projections(plan, init=init, fan=fan, scale=1.0 if scale is None else scale, seed=seed)
        self.weights = nn.ParameterList([nn.Parameter(t, requires_grad=trainable) for t in tensors])
        self.batch_axes = [p.batch_axis for p in plan.projections]

    def flat(self, index: int) -> torch.Tensor:
        weight = self.weights[index]
        return weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)

    def project(self, index: int, signal: Signal) -> torch.Tensor:
        """delta = s B_u shaped like the unit output: (N, *S_u) with the samples along its batch axis,
        or, for a value folding the batch into dim 0 (batch layout ``(0, k)``, S_u = (k, *rest)),
        reshaped to (N*k, *rest); for label signals a row selection of B_u."""
        if signal.labels is not None:
            return project_labels(signal.labels, signal.factor, self.weights[index], self.batch_axes[index])
        return project_dense(signal.dense, self.weights[index], self.batch_axes[index])


def check_projection_memory(algorithm: str, plan, limit_gb: float) -> None:
    """Refuse matrices B_u (C x S_u each) over ``limit_gb`` in all before drawing them: a model with a
    dense output (C = every pixel's class scores) would otherwise exhaust memory without a word."""
    size = sum(plan.signal_dim * p.features * p.dtype.itemsize for p in plan.projections)
    if size > limit_gb * 2 ** 30:
        features = sum(p.features for p in plan.projections)
        amount = f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.1f} MiB"
        raise OptionError(f"{algorithm}'s direct projections B_u would take {amount}: the output signal "
                          f"has C = {plan.signal_dim} values per sample, the {len(plan.projections)} projected unit "
                          f"outputs {features} values in all, and each B_u is C x S_u. Train against a smaller "
                          f"output (pooled class scores), or raise projection_memory_gb (now {limit_gb:g})")


def flat_error(errors: tuple) -> torch.Tensor:
    """The per-sample output error as one (N, C) matrix (several outputs concatenated)."""
    flat = [e.reshape(e.shape[0], -1) for e in errors]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def label_signal(targets, signal_dim: int, batch: int, factor: float, algorithm: str) -> Signal:
    """y* as a signal: class indices (N,) select rows of B; one-hot or soft targets (N, C) multiply."""
    if not torch.is_tensor(targets):
        raise FBCompileError(f"algorithm {algorithm!r} needs class labels as a tensor, got {type(targets).__name__}")
    if not targets.is_floating_point() and targets.dim() == 1 and len(targets) == batch:
        low, high = (int(v) for v in torch.aminmax(targets)) if len(targets) else (0, 0)
        if low < 0 or high >= signal_dim:
            raise FBCompileError(f"algorithm {algorithm!r}: labels must lie in [0, {signal_dim}) (the model's output "
                                 f"size), got range [{low}, {high}]")
        return Signal(batch, labels=targets, factor=factor)
    if targets.is_floating_point() and tuple(targets.shape) == (batch, signal_dim):
        return Signal(batch, dense=targets * factor)
    raise FBCompileError(f"algorithm {algorithm!r} projects the one-hot target y*: give class indices of shape "
                         f"({batch},) or one-hot targets of shape ({batch}, {signal_dim}); got "
                         f"{targets.dtype} {tuple(targets.shape)}")
