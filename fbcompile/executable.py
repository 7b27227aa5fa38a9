"""What one learner runs: the forward with exactly the taps its feedback modes read, and those modes'
feedback modules.

A learner asks for it once, when it is constructed: ``program.executable("target", "unit_error")``.
The :class:`~fbcompile.program.FeedbackProgram` it comes from is the shared, immutable analysis (the
traced model, rules, units and the emitted feedback graphs, each emitted once and never changed);
an Executable never changes either, so one learner's modes cannot change another learner's forward,
and a feedback mode whose taps the forward did not save cannot be run: asking for a mode the
executable was not built with is an :class:`~fbcompile.errors.FBCompileError`.
"""
from __future__ import annotations

import torch
from torch import fx

from .errors import FBCompileError
from .passes.forward import build_forward


class Executable:
    def __init__(self, program, modes: tuple):
        self.program, self.modes = program, tuple(modes)
        graphs = {mode: program.feedback_graph(mode) for mode in self.modes}
        taps = []
        for graph in graphs.values():
            taps.extend(key for kind, key in graph.inputs if kind == "tap" and key not in taps)
        self.taps = tuple(taps)
        self.tap_index = {key: i for i, key in enumerate(self.taps)}
        self.forward_module = build_forward(program.traced, list(self.taps))
        self._plans = {mode: self._plan(graph) for mode, graph in graphs.items()}
        self._local = None

    def __repr__(self):
        return f"Executable(modes={self.modes}, {len(self.taps)} taps)"

    def run_forward(self, inputs: tuple):
        """Run the forward program: ``(model output, taps tuple)``."""
        return self.forward_module(*inputs)

    def local_forward(self) -> fx.GraphModule:
        """Forward program with each unit's inputs detached, returning ``(output, taps, boundary
        values)`` (the boundary values graph-connected), for one multi-root backward over all local
        losses."""
        if self._local is None:
            program = self.program
            self._local = build_forward(program.traced, list(self.taps), program.partition, True, program.boundary)
        return self._local

    def run_feedback(self, mode: str, output_feedback, taps: tuple, weights: dict | None = None,
                     returns: str = "all"):
        """Run the ``mode`` feedback graph on ``taps`` from this executable's forward:
        ``(boundary values, parameter gradients)``.

        ``output_feedback`` holds one tensor per model output (per unit output for the cut modes).
        ``weights`` maps slot keys ``(node name, param)`` to tensors used in place of the forward
        weight (FA, FWDTP, learned feedback); missing slots use the forward weight.
        ``returns="units"`` skips the feedback into values computed without parameters and
        ``"params"`` all boundary values: the graph is pruned, so that work is not done."""
        plan = self._plans.get(mode)
        if plan is None:
            raise FBCompileError(f"feedback mode {mode!r} is not among this executable's modes {self.modes}: "
                                 f"build it with program.executable(..., {mode!r}) when the learner is made")
        params, graph = self.program.params, self.program.feedback[mode]
        args = []
        for kind, key in plan:
            if kind in ("output", "cut"):
                args.append(output_feedback[key])
            elif kind == "tap":
                args.append(taps[key])
            else:
                args.append(weights[key] if weights and key in weights else params[graph.slot_params[key]])
        return self.program.pruned_feedback(mode, returns)(*args)

    def unit_gradients(self, deltas: dict, values: dict, taps: tuple) -> dict:
        """{parameter: local gradient} given delta_u at the unit outputs (``deltas``: node name ->
        tensor; a missing one is zero, shaped like ``values[name]``): each unit's own backward with
        its inputs held fixed, through the compiled "unit_error" graph, without autograd. Equals
        autograd on the local losses where the program is ``exact_within_units``."""
        outputs = self.program.unit_outputs
        fed = [deltas[o.name] if o.name in deltas else torch.zeros_like(values[o.name]) for o in outputs]
        with torch.no_grad():
            _, grads = self.run_feedback("unit_error", fed, taps, returns="params")
        return {n: g for n, g in zip(self.program.feedback["unit_error"].params, grads) if g is not None}

    def _plan(self, graph) -> list:
        """(kind, index or key) per placeholder of ``graph``: output/cut positions, tap positions in
        this executable's taps, slot keys."""
        cut_index = {o.name: i for i, o in enumerate(self.program.unit_outputs)}
        locate = {"output": lambda k: k, "cut": cut_index.get, "tap": self.tap_index.get, "slot": lambda k: k}
        return [(kind, locate[kind](key)) for kind, key in graph.inputs]
