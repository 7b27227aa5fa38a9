"""The compiled program: forward GraphModule with taps plus feedback GraphModules, and their runners."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import FBCompileError
from .passes.feedback import MODES, FeedbackGraph
from .passes.forward import build_forward
from .trace import active_outputs, info


@dataclass(frozen=True)
class Slot:
    """A feedback weight: rule ``ctx.weight(param)`` at forward node ``node``."""
    node: str
    param: str
    qualname: str
    shape: tuple

    @property
    def key(self):
        return (self.node, self.param)


class FeedbackProgram:
    """A model compiled for feedback learning. Build it with :func:`fbcompile.compile`.

    - ``forward_module``: the traced model returning ``(output, taps)``.
    - ``feedback[mode]``: a :class:`~fbcompile.passes.feedback.FeedbackGraph` per mode
      ("error", "target", "difference").
    - ``propagate_error(inputs, output_error)``: error mode with the forward weights.
    - ``explain()``, ``feedback_code``, ``units``, ``slots``.
    """

    def __init__(self, model, traced, condition, variants, rules, partition, feedback: dict):
        self.model, self.traced = model, traced
        self.condition, self.variants = condition, tuple(variants)
        self.rules, self.partition, self.feedback = rules, partition, feedback
        self.taps = _union(g.inputs for g in feedback.values())
        self.forward_module = build_forward(traced, self.taps)
        self._local_forward = None
        self.slots = _slots(model, traced, feedback)
        self.params = dict(model.named_parameters())
        self.outputs = active_outputs(traced)
        self.inputs = [n for n in traced.graph.nodes if n.op == "placeholder"]
        self._plans = {mode: self._plan(graph) for mode, graph in feedback.items()}

    # -- introspection ---------------------------------------------------------------------------
    @property
    def units(self):
        return self.partition.units

    @property
    def feedback_code(self) -> str:
        """The generated Python of the error-mode feedback GraphModule."""
        return self.feedback["error"].module.code

    def code(self, mode: str = "error") -> str:
        return self.feedback[mode].module.code

    def explain(self) -> str:
        from .explain import explain_table
        return explain_table(self)

    def rule_for(self, node_name: str):
        return next((r for n, r in self.rules.items() if n.name == node_name), None)

    # -- running ---------------------------------------------------------------------------------
    def run_forward(self, inputs: tuple):
        """Run the forward program: ``(model output, taps tuple)``."""
        return self.forward_module(*inputs)

    def local_forward(self):
        """Forward program with each unit's inputs detached, returning unit-boundary values as a
        third output (graph-connected), for one multi-root backward over all local losses."""
        if self._local_forward is None:
            boundary = self.feedback["difference"].boundary
            self._local_forward = build_forward(self.traced, self.taps, self.partition, True, boundary)
        return self._local_forward

    def run_feedback(self, mode: str, output_feedback, taps: tuple, weights: dict | None = None):
        """Run the ``mode`` feedback graph: ``(boundary values, parameter gradients)``.

        ``weights`` maps slot keys ``(node name, param)`` to tensors used in place of the forward
        weight (FA, FWDTP, learned feedback); missing slots use the forward weight."""
        plan = self._plans[mode]
        args = []
        for kind, index in plan:
            if kind == "output":
                args.append(output_feedback[index])
            elif kind == "tap":
                args.append(taps[index])
            else:
                slot = self.slots[index]
                args.append(weights[slot.key] if weights and slot.key in weights else self.params[slot.qualname])
        return self.feedback[mode].module(*args)

    def _plan(self, graph: FeedbackGraph) -> list:
        tap_index = {key: i for i, key in enumerate(self.taps)}
        slot_index = {slot.key: i for i, slot in enumerate(self.slots)}
        plan = []
        for kind, key in graph.inputs:
            plan.append((kind, key if kind == "output" else (tap_index[key] if kind == "tap" else slot_index[key])))
        return plan

    def propagate_error(self, inputs, output_error):
        """Error mode: propagate ``output_error`` (dL/d output) through the feedback graph with the
        forward weights, accumulate parameter gradients into ``.grad`` exactly where autograd's
        backward would, and return the error at each model input (a tensor for one input)."""
        inputs, errors = as_tuple(inputs), as_tuple(output_error)
        with torch.no_grad():
            output, taps = self.run_forward(inputs)
            check_output_feedback(self, output, errors)
            values, grads = self.run_feedback("error", errors, taps)
            accumulate_grads(self.params, self.feedback["error"].params, grads)
        input_errors = tuple(v if v is not None else torch.zeros_like(x)
                             for v, x in zip(values[:len(self.inputs)], inputs))
        return input_errors[0] if len(input_errors) == 1 else input_errors


def as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def flat_outputs(output) -> tuple:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def check_output_feedback(program: FeedbackProgram, output, feedback: tuple) -> None:
    outs = flat_outputs(output)
    if len(feedback) != len(program.outputs):
        raise FBCompileError(f"the model returns {len(program.outputs)} tensor(s) but "
                             f"{len(feedback)} output feedback tensor(s) were given")
    for node, out, fb in zip(program.outputs, outs, feedback):
        if not isinstance(fb, torch.Tensor) or fb.shape != out.shape:
            shape = tuple(fb.shape) if isinstance(fb, torch.Tensor) else type(fb).__name__
            raise FBCompileError(f"output feedback for {node.name!r} has shape {shape}, but the output "
                                 f"has shape {tuple(out.shape)}")


def accumulate_grads(params: dict, names: list, grads) -> None:
    """Add ``grads`` into ``.grad`` of the named parameters, as autograd's backward does."""
    for name, grad in zip(names, grads):
        if grad is None:
            continue
        param = params[name]
        if param.grad is None:
            param.grad = grad.detach().clone()
        else:
            param.grad.add_(grad)


def _union(input_lists) -> list:
    keys = []
    for inputs in input_lists:
        for kind, key in inputs:
            if kind == "tap" and key not in keys:
                keys.append(key)
    return keys


def _slots(model: nn.Module, traced: fx.GraphModule, feedback: dict) -> list:
    nodes = {n.name: n for n in traced.graph.nodes}
    seen = []
    for graph in feedback.values():
        for kind, key in graph.inputs:
            if kind == "slot" and key not in [s.key for s in seen]:
                node = nodes[key[0]]
                call = info(node).call
                qualname = call.params[key[1]]
                shape = tuple(model.get_parameter(qualname).shape)
                seen.append(Slot(key[0], key[1], qualname, shape))
    return seen
