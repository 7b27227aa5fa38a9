"""Mono-Forward learners (paper 004; Gong et al.): every unit learns from its own class head.

Each unit l with trainable parameters gets a head (:mod:`fbcompile.passes.heads`): scores
G_l = z_l M_l from its activation a_l, and the local loss L_l = loss_fn(G_l, y) (cross-entropy in
the paper) with the unit's input detached, so the parameters of unit l see only L_l:

    dW_l = dL_l/dW_l,   dM_l = dL_l/dM_l.

- ``"mf"`` (this module): dL_l/dW_l and dL_l/dM_l by local autograd, update-unlocked: the units run
  one after another during the forward; right after unit l its local gradient is taken and its
  activations are freed, so live memory is one unit's autograd graph plus the values later units
  still read, and does not grow with depth (a BP step holds every layer's saved activations).
- ``"mf-dd"`` (:mod:`.mono_dd`): the same losses, gradients by directional derivatives, no autograd.

The model's parameters receive ``.grad = dL_l/dW_l`` (the scale of the local losses' gradients) for
the user's optimizer; the heads M_l are the learner's auxiliary parameters (``parameters()``),
trained by its own optimizer (``head_optimizer``, ``head_lr``) inside ``step``. ``predict(x,
mode)`` scores with the last head (``"final"``) or the sum of all heads (``"cumulative"``).
``StepResult.loss`` is the last head's local loss; ``details["unit_losses"]`` has every unit's.

    learner = fbcompile.learner(fbcompile.compile(model, x), "mf", head_lr=1e-2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in data:
        optimizer.zero_grad(); learner.step(x, y, F.cross_entropy); optimizer.step()
    model.eval(); scores = learner.predict(x_test, mode="cumulative")

A model ending in a classifier (output (batch, classes)) keeps it as its last unit, scored by its own
output (``output_head="model"``); the paper's MF networks are the blocks alone: compile those and
pass ``classes``, and the last block's head is the final classifier. ``head_lr`` defaults to the
paper's 1e-3; 1e-2 trained faster in examples/mono_forward_results.py.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from ..errors import FBCompileError, NonFiniteError, OptionError, choices_text
from ..passes.heads import ATTACH_POINTS, HEAD_INITS, OUTPUT_HEADS, attach_heads
from ..program import as_tuple
from ..trace import info, preserved_state
from .base import Executor, Learner, StepResult
from .finite import all_finite
from .options import Option, make_optimizer, non_negative, one_of, optimizer_option, positive, positive_int
from .registry import register_algorithm
from .transaction import load_optimizer_state
from .unit_order import completed_by, execution_order

PREDICT_MODES = ("final", "cumulative")


def _classes(value) -> str | None:
    return None if value is None else positive_int(value)


HEAD_OPTIONS = {
    "classes": Option(None, _classes, "number of classes (default: the model output's last dim)"),
    "d": Option(16, positive_int, "projection size per channel for spatial heads: A_c in R^{d x HW}"),
    "attach": Option("pre_pool", one_of(*ATTACH_POINTS), "where heads read: before pooling (paper) or the unit output"),
    "head_init": Option("paper", one_of(*HEAD_INITS), "initialisation of M (paper: the reference code's)"),
    "output_head": Option("model", one_of(*OUTPUT_HEADS),
                          "'model': a unit returning the model's (batch, classes) output is scored by it directly"),
    "head_optimizer": optimizer_option("heads M (the learner's own)"),
    "head_lr": Option(1e-3, positive, "learning rate of the heads' optimizer"),
    "head_weight_decay": Option(0.0, non_negative, "weight decay of the heads' optimizer"),
}


class MonoForwardBase(Learner):
    """Heads, update-unlocked execution, prediction and state shared by "mf" and "mf-dd"."""

    OPTIONS = HEAD_OPTIONS

    def __init__(self, program, **options):
        super().__init__(program, **options)
        o = self.options
        classes = o["classes"] if o["classes"] is not None else _infer_classes(program)
        self.classes = classes
        self.heads, stages = attach_heads(program.traced, program.partition, program.unit_forwards(), program.params,
                                          classes, d=o["d"], attach=o["attach"], init=o["head_init"],
                                          output_head=o["output_head"], seed=o["seed"])
        self.stages = execution_order(program, stages, self.name)
        self.unplanned = [(q, program.params[q]) for s in self.stages if s.head is None for q in s.unit.params]
        self.head_optimizer = self._make_head_optimizer()
        self.executor = self.choose_executor()

    def _make_head_optimizer(self):
        params = list(self.heads.parameters())
        if not params:
            return None
        o = self.options
        return make_optimizer(o["head_optimizer"], params, o["head_lr"], o["head_weight_decay"])

    def parameters(self) -> list:
        return list(self.heads.parameters())

    # -- execution ------------------------------------------------------------------------------
    def compute(self, inputs: tuple, targets, loss_fn):
        """The executor's step, after :meth:`check_targets` (before any forward, so a refused step
        has changed nothing, not even BatchNorm statistics)."""
        self.check_targets(inputs, targets)
        return super().compute(inputs, targets, loss_fn)

    def check_targets(self, inputs: tuple, targets) -> None:
        """Every head scores whole samples, (N, classes) for N = the batch (dim 0 of the inputs), so
        tensor targets must be per sample: class indices (N,) or scores/one-hot (N, classes).
        Per-position targets such as a language model's (N, tokens) are refused naming the shapes."""
        if not torch.is_tensor(targets) or not inputs or not torch.is_tensor(inputs[0]) or inputs[0].dim() == 0:
            return
        batch, shape = int(inputs[0].shape[0]), tuple(targets.shape)
        if shape in ((batch,), (batch, self.classes)):
            return
        raise FBCompileError(f"Mono-Forward's heads classify whole samples: each head's scores have shape ({batch}, "
                             f"{self.classes}) (batch, classes), so the targets must have shape ({batch},) (class "
                             f"indices) or ({batch}, {self.classes}), one target per sample; got targets of shape "
                             f"{shape} for inputs of shape {tuple(inputs[0].shape)}. Per-position targets (one class "
                             "per token) are not what its heads classify: reduce the model output to (batch, "
                             "classes) with per-sample targets, or train with another learner (bp, fa, dfa, drtp, dtp)")

    def run(self, inputs: tuple, visit):
        """Update-unlocked execution over the head stages: ``visit(stage, values) -> unit outputs``
        runs each unit (values detached); values no later unit reads are dropped at once."""
        return self.program.run_units(inputs, None, stages=self.stages, execute=visit)

    def local_loss(self, head, a, targets, loss_fn):
        """L_l = loss_fn(z_l M_l, y) for the head activation ``a`` of unit l."""
        return self.scores_loss(head.scores(head.features(a)), targets, loss_fn)

    @staticmethod
    def scores_loss(scores, targets, loss_fn):
        loss = loss_fn(scores, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise FBCompileError("loss_fn must return a scalar tensor (Mono-Forward applies it to every head's "
                                 "class scores of shape (batch, classes))")
        return loss

    def trained_params(self, stage) -> list:
        return [name for name in stage.unit.params if self.program.params[name].requires_grad]

    def updated_params(self) -> set:
        """Names of the model parameters this learner updates."""
        return {name for stage in self.stages if stage.head is not None for name in self.trained_params(stage)}

    def final_updates(self) -> dict:
        """{unit index: its trained parameters whose update is complete once it has run}: a
        parameter shared by several units is complete after the last of them."""
        return completed_by((stage.unit.index, self.trained_params(stage)) for stage in self.stages
                            if stage.head is not None)

    def apply_head_grads(self, head_grads: dict) -> None:
        """One step of the heads' optimizer with {head: dL/dM} (checked finite first)."""
        if not head_grads:
            return
        if not all_finite(head_grads.values()):
            bad = [f"unit {h.index}" for h, g in head_grads.items() if not torch.isfinite(g).all()]
            raise NonFiniteError(f"non-finite head gradient at {', '.join(bad)}; nothing was changed")
        for head, grad in head_grads.items():
            head.weight.grad = grad
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)

    def result(self, output, losses: dict, **details) -> StepResult:
        last = losses[max(losses)]
        self.last["unit_losses"] = dict(losses)
        output = output.detach() if torch.is_tensor(output) else output
        return StepResult(last, output, {"unit_losses": dict(losses), **details})

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, inputs, mode: str = "final") -> torch.Tensor:
        """Class scores (batch, classes): the last head's (``"final"``) or the sum of all heads'
        (``"cumulative"``). Runs without autograd and leaves buffers (BatchNorm statistics) unchanged;
        call ``model.eval()`` first to score with running statistics."""
        if mode not in PREDICT_MODES:
            raise OptionError(f"predict mode={mode!r} must be {choices_text(PREDICT_MODES)}")
        scores = []

        def visit(stage, values):
            if stage.head is None:
                return stage.module(*values)
            *outputs, a = stage.module(*values)
            scores.append(stage.head.scores(stage.head.features(a)))
            return outputs

        with torch.no_grad(), preserved_state(self.model):
            self.run(as_tuple(inputs), visit)
        return scores[-1] if mode == "final" else torch.stack(scores).sum(0)

    def local_losses(self, inputs, targets, loss_fn) -> dict:
        """{unit index: L_l} at the current parameters (for monitoring); changes nothing."""
        inputs = as_tuple(inputs)
        self.check_targets(inputs, targets)
        losses = {}

        def visit(stage, values):
            if stage.head is None:
                return stage.module(*values)
            *outputs, a = stage.module(*values)
            losses[stage.unit.index] = float(self.local_loss(stage.head, a, targets, loss_fn))
            return outputs

        with torch.no_grad(), preserved_state(self.model):
            self.run(inputs, visit)
        return losses

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        state = {"heads": self.heads.state_dict()}
        if self.head_optimizer is not None:
            state["head_optimizer"] = self.head_optimizer.state_dict()
        return state

    def load_extra_state(self, state) -> None:
        self.heads.load_state_dict(state["heads"])
        if self.head_optimizer is not None:
            load_optimizer_state(self.head_optimizer, state["head_optimizer"])


@register_algorithm
class MonoForward(MonoForwardBase):
    """``"mf"``: local autograd per unit, update-unlocked (see the module docstring)."""

    name = "mf"

    def choose_executor(self):
        return LOCAL_AUTOGRAD

    def local_autograd(self, inputs, targets, loss_fn):
        params, grads, head_grads, losses = self.program.params, {}, {}, {}
        final = self.final_updates()

        def visit(stage, values):
            head = stage.head
            if head is None:
                with torch.no_grad():
                    return stage.module(*values)
            names = self.trained_params(stage)
            with torch.enable_grad():
                *outputs, a = stage.module(*values)
                loss = self.local_loss(head, a, targets, loss_fn)
                wrt = [params[n] for n in names] + ([head.weight] if head.weight is not None else [])
                found = torch.autograd.grad(loss, wrt, allow_unused=True)
            for name, grad in zip(names, found):      # a parameter shared by units sums their losses' gradients
                if grad is not None:
                    grads[name] = grads[name] + grad if name in grads else grad
            self.launch_update(final.get(stage.unit.index, ()), grads)   # data parallel: overlaps the next units
            if head.weight is not None and found[-1] is not None:
                head_grads[head] = found[-1]
            losses[stage.unit.index] = float(loss.detach())
            return tuple(tree_map_only(torch.Tensor, torch.Tensor.detach, o) for o in outputs)  # (values, indices)

        output = self.run(inputs, visit)
        self.apply_head_grads(head_grads)
        return self.result(output, losses), grads


def _infer_classes(program) -> int:
    shapes = [info(program.outputs[0]).shape] if len(program.outputs) == 1 else []
    if shapes and shapes[0] is not None and len(shapes[0]) == 2:
        return int(shapes[0][1])
    if shapes and shapes[0] is not None and len(shapes[0]) > 2:
        raise OptionError(f"Mono-Forward's heads classify whole samples, and the model output has shape "
                          f"{tuple(shapes[0])}, not (batch, classes), so the number of classes is unknown. "
                          "Per-position scores (a language model's per-token logits) are not what its heads classify: "
                          "reduce the output to (batch, classes) (e.g. pool over the positions) or use another "
                          "learner (bp, fa, dfa, drtp, dtp); if the output holds features for the heads to classify "
                          "whole samples, pass classes=<int>")
    raise OptionError("Mono-Forward cannot infer the number of classes (the model does not return one (batch, "
                      "classes) tensor); pass classes=<int>")



LOCAL_AUTOGRAD = Executor("update-unlocked", MonoForward.local_autograd, hands_over=True,
                          doc="units one by one, each unit's head loss differentiated by local autograd")
