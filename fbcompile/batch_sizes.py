"""Batch sizes a captured program is valid for.

torch.fx records the model's calls as written, so a program traced at one batch size computes
the model at any other. torch.export evaluates the forward's Python at the example batch (exported
as a dynamic dim) and keeps the guards on it apart: ``if x.shape[0] > 4: h = h * 2``, compiled at
batch 2, gave a program without the branch, 50% off autograd at batch 8. The export front end
records the range of batch sizes its program holds for (``traced.meta["fbcompile_batch_sizes"]``,
:func:`fbcompile.frontends.export.batch_sizes`), and every run of the program on inputs checks it
(:meth:`FeedbackProgram.check_model`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FBCompileError

META = "fbcompile_batch_sizes"


@dataclass(frozen=True)
class BatchSizes:
    model_name: str
    low: int
    high: int | None        # None: no upper bound

    def check(self, inputs: tuple) -> None:
        """Raise unless dim 0 of every tensor input is within [low, high]."""
        for index, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or not x.dim():
                continue
            size = x.shape[0]
            if size < self.low or (self.high is not None and size > self.high):
                raise FBCompileError(
                    f"{self.model_name} was captured by torch.export for batch sizes (dim 0 of its inputs) "
                    f"{self.text}: its forward depends on the batch size beyond them (a branch on x.shape[0], "
                    f"or a size it fixed), so the program computes the model only there; input {index} has {size}. "
                    "Compile with an example batch of the size you run")

    @property
    def text(self) -> str:
        if self.high == self.low:
            return f"of exactly {self.low}"
        return f"from {self.low} to {self.high}" if self.high is not None else f"of {self.low} or more"
