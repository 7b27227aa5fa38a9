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
(``traced.meta["fbcompile_input_shapes"]``, :func:`exported_input_shapes`); every
run of the program on inputs checks them first (:meth:`FeedbackProgram.check_model`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import InputKind

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


def exported_input_shapes(ep: torch.export.ExportedProgram, model_name: str) -> InputShapes:
    """The input shapes the exported program computes the model for: per tensor input, the sizes
    of dim 0 where the model's forward narrowed them (a branch on ``x.shape[0]``, a size it fixed;
    otherwise 2 or more, dim 0 being exported as ``Dim.AUTO``), and its sizes after dim 0."""
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    shapes = []
    for node in ep.graph.nodes:
        spec = specs.get(node.name)
        if node.op != "placeholder" or spec is None or spec.kind != InputKind.USER_INPUT:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.dim():
            shapes.append(None)
            continue
        size, low, high = value.shape[0], 2, None
        if isinstance(size, int) or size.node.expr.is_number:          # the model fixed it
            low = high = int(size)
        elif (bounds := ep.range_constraints.get(size.node.expr)) is not None:
            low, high = int(bounds.lower), _finite(bounds.upper)
        shapes.append(InputShape(low, high, tuple(int(s) for s in value.shape[1:])))
    return InputShapes(model_name, tuple(shapes))


def _finite(bound) -> int | None:
    """A range bound as an int, None for infinity (torch's own symbolic infinity type)."""
    try:
        return int(bound)
    except (OverflowError, TypeError, AttributeError):
        return None
