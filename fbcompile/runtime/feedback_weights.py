"""Feedback weights: the tensors that stand in for forward weights in the feedback graph.

One tensor per feedback slot (a ``ctx.weight(...)`` of a rule, e.g. every Linear and Conv weight),
shaped like the forward weight, drawn from its own seeded generator (so separate per unit and
reproducible). Initialisations (``init``):

- ``"kaiming"``: U(-b, b), b = sqrt(6 / fan_in) (He uniform; the scale of trained forward weights).
- ``"xavier"``: U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
- ``"uniform"``: U(-scale, scale); FWDTP's reference uses scale = 1e-3.
- ``"normal"``: N(0, scale^2).
- ``"forward"``: a copy of the forward weight at creation (for learned feedback started at W).

Sign-symmetric variants of FA (``sign``), recomputed from the current forward weight W:
``"usf"`` B = sign(W); ``"frsf"`` B = |R| sign(W) with R fixed random; ``"brsf"`` B = |R_t| sign(W)
with R_t redrawn every batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import FBCompileError, OptionError

INITS = ("kaiming", "xavier", "uniform", "normal", "forward")
SIGNS = ("none", "usf", "frsf", "brsf")


def fans(shape: tuple) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def draw(shape: tuple, init: str, scale: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    fan_in, fan_out = fans(shape)
    if init == "kaiming":
        bound = math.sqrt(6.0 / fan_in)
    elif init == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
    elif init == "uniform":
        bound = scale
    elif init == "normal":
        return torch.randn(shape, generator=generator, dtype=like.dtype).mul_(scale).to(like.device)
    elif init == "forward":
        return like.detach().clone()
    else:
        raise OptionError(f"feedback_init={init!r} is unknown; use one of {', '.join(INITS)}")
    return (torch.rand(shape, generator=generator, dtype=like.dtype) * 2 - 1).mul_(bound).to(like.device)


class FeedbackWeights(nn.Module):
    """Per-slot feedback weights for a program (``trainable`` makes them nn.Parameters)."""

    def __init__(self, program, *, init: str, scale: float, seed: int, trainable: bool, sign: str = "none",
                 slots=None):
        super().__init__()
        computed = program.feedback["error"].computed_weights
        if computed:
            raise OptionError(f"feedback weights replace forward weights that are parameters, but the weight of "
                              f"node(s) {', '.join(computed)} is computed from parameters (e.g. self.w.t()); "
                              "fixed random or learned feedback cannot stand in for it. Pass the parameter to "
                              "the op directly, or use an algorithm with the forward weights (bp, dtp analytic)")
        self.program, self.sign, self.seed, self.init, self.scale = program, sign, seed, init, scale
        self.keys = [s.key for s in (slots if slots is not None else program.slots)]
        self.qualnames = {s.key: s.qualname for s in program.slots}
        self.weights = nn.ParameterList()
        # only brsf draws during steps; a generator here is state the learner's transactions restore
        self.generator = torch.Generator().manual_seed(seed) if sign == "brsf" else None
        for index, key in enumerate(self.keys):
            forward = program.params[self.qualnames[key]]
            generator = torch.Generator().manual_seed(seed * 100_003 + index)
            tensor = draw(tuple(forward.shape), init, scale, generator, forward)
            if sign in ("usf", "frsf", "brsf"):
                tensor = tensor.abs()
            self.weights.append(nn.Parameter(tensor, requires_grad=trainable))

    def mapping(self) -> dict:
        """Slot key -> tensor for :meth:`FeedbackProgram.run_feedback`."""
        if self.sign == "none":
            return dict(zip(self.keys, self.weights))
        out = {}
        for key, magnitude in zip(self.keys, self.weights):
            forward = self.program.params[self.qualnames[key]].detach()
            if self.sign == "usf":
                out[key] = torch.sign(forward)
            elif self.sign == "frsf":
                out[key] = magnitude.detach() * torch.sign(forward)
            else:
                fresh = draw(tuple(magnitude.shape), self.init, self.scale, self.generator, magnitude).abs()
                out[key] = fresh * torch.sign(forward)
        return out

    def get_extra_state(self):
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        if self.generator is not None:
            if "generator" not in state:
                raise FBCompileError("the feedback-weight state lacks the generator of sign='brsf'")
            self.generator.set_state(state["generator"])

    def of_units(self, unit_indices: set) -> list:
        """The feedback tensors of slots whose node belongs to one of ``unit_indices``."""
        unit_of = {n.name: u.index for n, u in self.program.partition.unit_of.items()}
        return [w for key, w in zip(self.keys, self.weights) if unit_of.get(key[0]) in unit_indices]
