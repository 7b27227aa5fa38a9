"""Input shapes a torch.export program is valid for.

torch.fx records the model's calls as written, so a program traced at one input shape computes
the model at any other. torch.export evaluates the forward's Python at the example inputs, with the
batch (dim 0) a symbolic size and every other size fixed, and keeps its guards apart:

- ``if x.shape[0] > 4: h = h * 2``, compiled at batch 2, gave a program without the branch, 50%
  off autograd at batch 8;
- a text model compiled at sequence length 7 baked 7 into its position ids and masks: at length 9
  it failed inside the forward with a bare shape error (or, with a size-1 example, would broadcast).

The export front end records the batch sizes its program holds for (torch.export's range
constraints, or the one size the model fixes) and every input's other sizes
(``traced.meta["fbcompile_input_shapes"]``, :func:`fbcompile.frontends.export.input_shapes`); every
run of the program on inputs checks them first (:meth:`FeedbackProgram.check_model`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import FBCompileError

META = "fbcompile_input_shapes"


@dataclass(frozen=True)
class InputShape:
    """One tensor input: dim 0 from ``low`` to ``high`` (None: no upper bound), then ``trailing``."""
    low: int
    high: int | None
    trailing: tuple

    @property
    def dim0_text(self) -> str:
        if self.high == self.low:
            return f"of exactly {self.low}"
        return f"from {self.low} to {self.high}" if self.high is not None else f"of {self.low} or more"


@dataclass(frozen=True)
class InputShapes:
    model_name: str
    inputs: tuple       # per input: an InputShape, or None (not a tensor, or 0-d)

    def check(self, inputs: tuple) -> None:
        """Raise unless every tensor input has its captured sizes after dim 0 and a dim 0 in range."""
        for index, (x, shape) in enumerate(zip(inputs, self.inputs)):
            if shape is None or not isinstance(x, torch.Tensor) or not x.dim():
                continue
            if tuple(x.shape[1:]) != shape.trailing:
                raise FBCompileError(
                    f"{self.model_name} was captured by torch.export for input {index} of shape (batch, "
                    f"{', '.join(map(str, shape.trailing))}); this one has shape {tuple(x.shape)}. torch.export fixes "
                    "every size but the batch (a sequence length too), so the program computes the model only there: "
                    "compile with an example input of the shape you run (torch.fx, where it can trace the model, "
                    "takes any)")
            if x.shape[0] < shape.low or (shape.high is not None and x.shape[0] > shape.high):
                raise FBCompileError(
                    f"{self.model_name} was captured by torch.export for sizes of dim 0 (the batch) of input {index} "
                    f"{shape.dim0_text}: its forward depends on that size beyond them (a branch on x.shape[0], or a "
                    f"size it fixed), so the program computes the model only there; this one has {x.shape[0]}. "
                    "Compile with an example batch of the size you run")
