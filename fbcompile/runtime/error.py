"""Error propagation: BP and FA through the compiled feedback graph (error mode).

- ``"bp"``: e flows through the condition-T rules with the forward weights; every parameter gets
  its op's weight-gradient formula applied to the error at its output. Equals autograd (and, as
  autograd, leaves a parameter with ``requires_grad=False`` without ``.grad``).
- ``"fa"``: the same graph with a fixed random matrix B (shaped like W, seeded, separate per unit)
  in place of each forward weight in the feedback path (Lillicrap et al.), or a sign-symmetric B
  (``sign="usf"|"frsf"|"brsf"``). Forward weights still get dW = delta^T x with the propagated
  delta, so learning follows B's alignment with W.

No autograd runs (executor ``"feedback-graph"``): the forward executes under ``no_grad`` and the
feedback graph computes both the propagated errors and the weight gradients.
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteError, OptionError
from .base import Executor, Learner, StepResult
from .losses import output_error
from ..initialisation import INITS
from .feedback_weights import SIGNS, UNSLOTTED, UNSLOTTED_HELP, FeedbackWeights
from .options import Option, non_negative, one_of
from .registry import register_algorithm


def _feedback_graph(learner, inputs, targets, loss_fn):
    """One forward under no_grad keeping the taps, then the "error" feedback graph: errors and
    weight gradients from the compiled rules. The taps are handed over (``keep_for=()``), so each
    is freed right after its last reader in the graph, as autograd frees its saved tensors."""
    run = learner.executable
    with torch.no_grad():
        output, taps = run.run_forward(inputs)
    loss, errors = output_error(output, targets, loss_fn)
    with torch.no_grad():
        _, grads = run.run_feedback("error", errors, taps, learner.weights(), returns="params", keep_for=())
    names, params = learner.program.feedback["error"].params, learner.program.params
    return StepResult(float(loss), output), {n: g for n, g in zip(names, grads) if params[n].requires_grad}


FEEDBACK_GRAPH = Executor("feedback-graph", _feedback_graph, autograd=False,
                          doc="stored taps, then the compiled error feedback graph (no autograd)")


@register_algorithm
class ErrorPropagation(Learner):
    """Backpropagation through the compiled condition-T feedback graph (equals autograd)."""
    name = "bp"
    linear_in_loss = True

    def __init__(self, program, **options):
        super().__init__(program, **options)
        if program.condition != "T":
            raise OptionError(f"algorithm {self.name!r} propagates errors through transposed Jacobians and needs a "
                              f"program compiled with condition='T' (this one has {program.condition!r})")
        self.feedback = None
        self.executable = program.executable("error")
        self.executor = self.choose_executor()

    def choose_executor(self):
        return FEEDBACK_GRAPH

    def weights(self):
        return None if self.feedback is None else self.feedback.mapping()


@register_algorithm
class FeedbackAlignment(ErrorPropagation):
    """Feedback alignment: fixed random (or sign-symmetric) matrices replace W^T in the feedback path."""
    name = "fa"
    OPTIONS = {
        "feedback_init": Option("kaiming", one_of(*INITS[:-1]), "initialisation of the fixed feedback matrices"),
        "feedback_scale": Option(1.0, non_negative, "scale for feedback_init 'uniform' / 'normal'"),
        "sign": Option("none", one_of(*SIGNS), "sign-symmetric variant: usf, frsf or brsf"),
        "unslotted": Option("refuse", one_of(*UNSLOTTED), UNSLOTTED_HELP),
    }

    def __init__(self, program, **options):
        super().__init__(program, **options)
        o = self.options
        self.feedback = FeedbackWeights(program, init=o["feedback_init"], scale=o["feedback_scale"], seed=o["seed"],
                                        trainable=False, sign=o["sign"], unslotted=o["unslotted"])

    def checked_compute(self, inputs, targets, loss_fn):
        """The step, with a non-finite update explained: a normalisation after a weight (conv ->
        BatchNorm) makes BP's error independent of W's scale but not FA's, which is multiplied by
        rms(B)/rms(W) at every such pair; feedback far larger than the weights overflows."""
        try:
            return super().checked_compute(inputs, targets, loss_fn)
        except NonFiniteError as exc:
            ratios = sorted(r for r in self.feedback.scale_ratios().values() if r == r)
            if not ratios:
                raise
            median = ratios[len(ratios) // 2]
            raise NonFiniteError(f"{exc}. The fixed random feedback is {median:.1f}x the forward weights' scale "
                                 f"(median rms(B)/rms(W) over {len(ratios)} matrices); BP's error does not depend on "
                                 "that scale behind a normalisation, FA's grows by it at every such layer: "
                                 "feedback_init='forward-scale' draws B at the forward weights' scale") from exc

    def extra_state(self):
        return {"feedback": self.feedback.state_dict()}

    def load_extra_state(self, state):
        self.feedback.load_state_dict(state["feedback"])
