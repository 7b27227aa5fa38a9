"""Feedback weights: the tensors that stand in for forward weights in the feedback graph.

One tensor per feedback slot (a ``ctx.weight(...)`` of a rule, e.g. every Linear and Conv weight),
shaped like the forward weight, drawn from its own seeded generator (so separate per unit and
reproducible), initialised as :mod:`fbcompile.initialisation` describes (FWDTP's reference uses
``"uniform"`` with scale 1e-3; ``"forward"`` starts learned feedback at W).

Sign-symmetric variants of FA (``sign``), recomputed from the current forward weight W:
``"usf"`` B = sign(W); ``"frsf"`` B = |R| sign(W) with R fixed random; ``"brsf"`` B = |R_t| sign(W)
with R_t redrawn every batch.
"""
from __future__ import annotations


import torch
from torch import nn

from ..errors import FBCompileError, OptionError
from ..initialisation import draw

SIGNS = ("none", "usf", "frsf", "brsf")
UNSLOTTED = ("refuse", "forward")        # weights without a slot: refuse the program, or their forward values
UNSLOTTED_HELP = ("weights with no feedback slot (einsum or autograd-product parameter operands, computed "
                  "weights): 'refuse' the program, or feed back through their 'forward' values")


class FeedbackWeights(nn.Module):
    """Per-slot feedback weights for a program (``trainable`` makes them nn.Parameters)."""

    def __init__(self, program, *, init: str, scale: float, seed: int, trainable: bool, sign: str = "none",
                 slots=None, unslotted: str = "refuse"):
        super().__init__()
        unslotted_nodes = program.feedback["error"].unslotted_weights
        if unslotted_nodes and unslotted == "refuse":
            raise OptionError(f"feedback weights replace forward weights that are parameters, but node(s) "
                              f"{', '.join(unslotted_nodes)} feed back through a weight with no feedback slot: one computed "
                              "from parameters (e.g. self.w.t()), or a parameter operand of einsum or of an op "
                              "differentiated by autograd (baddbmm, tensordot, ...); fixed random or learned "
                              "feedback cannot stand in for it. Pass the parameter itself to nn.Linear, F.linear, "
                              "a convolution or matmul (x @ self.w); or pass unslotted='forward' to feed back "
                              "through those weights' forward values (e.g. learned position tables read like "
                              "activations); or use an algorithm with the forward weights (bp, dtp analytic)")
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

    def scale_ratios(self) -> dict:
        """{parameter name: rms(B) / rms(W)} for every slot, B the feedback tensor in use (after
        ``sign``) and W the forward weight now (inf where W is zero). A normalisation after W
        (conv -> BatchNorm, Linear -> LayerNorm) makes BP's backward independent of W's scale but
        not FA's, so the error through each such pair is this ratio times BP's: a median well above
        1 over many pairs overflows (issue 11: He-scale feedback on MaxVit's std-0.02 weights,
        median 4.4 over 151 slots; ``init="forward-scale"`` gives 1)."""
        ratios = {}
        with torch.no_grad():
            for key, b in self.mapping().items():
                w = self.program.params[self.qualnames[key]]
                rms_w = float(w.double().pow(2).mean().sqrt()) if w.numel() else 0.0
                rms_b = float(b.double().pow(2).mean().sqrt()) if b.numel() else 0.0
                ratios[self.qualnames[key]] = rms_b / rms_w if rms_w > 0 else float("inf")
        return ratios

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
