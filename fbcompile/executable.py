"""What one learner runs: the forward with exactly the taps its feedback modes read, and those modes'
feedback modules.

A learner asks for it once, when it is constructed: ``program.executable("target", "unit_error")``.
The :class:`~fbcompile.program.FeedbackProgram` it comes from is the shared, immutable analysis (the
traced model, rules, units and the emitted feedback graphs, each emitted once and never changed);
an Executable never changes either, so one learner's modes cannot change another learner's forward,
and a feedback mode whose taps the forward did not save cannot be run: asking for a mode the
executable was not built with is an :class:`~fbcompile.errors.FBCompileError`.

Memory: the feedback modules run in the boxed calling convention (:mod:`fbcompile.passes.boxed`),
so a caller that hands its taps over (``keep_for``) lets each tap be freed right after its last
reader in the feedback graph, as autograd frees each saved tensor right after its node's backward;
the taps list from :meth:`Executable.run_forward` is the only reference a learner holds.
"""
from __future__ import annotations

import torch
from torch import fx

from .backends import CompiledFeedback
from .errors import FBCompileError
from .passes.boxed import boxed
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
        self._reads = {mode: frozenset(i for kind, i in plan if kind == "tap") for mode, plan in self._plans.items()}
        self._boxed = {}
        self._local = None

    def __repr__(self):
        return f"Executable(modes={self.modes}, {len(self.taps)} taps)"

    def run_forward(self, inputs: tuple):
        """Run the forward program: ``(model output, taps)``, the taps a list in the order of
        :attr:`taps` (a caller hands it to :meth:`run_feedback` with ``keep_for`` to free each tap
        after its last reader)."""
        output, taps = self.forward_module(*inputs)
        return output, list(taps)

    def local_forward(self) -> fx.GraphModule:
        """Forward program with each unit's inputs detached, returning ``(output, taps, boundary
        values)`` (the boundary values graph-connected), for one multi-root backward over all local
        losses."""
        if self._local is None:
            program = self.program
            self._local = build_forward(program.traced, list(self.taps), program.partition, True, program.boundary)
        return self._local

    def run_feedback(self, mode: str, output_feedback, taps, weights: dict | None = None,
                     returns: str = "all", keep_for: tuple | None = None):
        """Run the ``mode`` feedback graph on ``taps`` from this executable's forward:
        ``(boundary values, parameter gradients)``.

        ``output_feedback`` holds one tensor per model output (per unit output for the cut modes).
        ``weights`` maps slot keys ``(node name, param)`` to tensors used in place of the forward
        weight (FA, FWDTP, learned feedback); missing slots use the forward weight.
        ``returns="units"`` skips the feedback into values computed without parameters and
        ``"params"`` all boundary values: the graph is pruned, so that work is not done.

        ``keep_for=None`` leaves the caller's containers alone (the taps stay alive until the graph
        returns). A tuple of modes hands the caller's references over: ``taps`` (the list from
        :meth:`run_forward`) keeps only the taps the modes in ``keep_for`` still read (``()``: none)
        and a list ``output_feedback`` is emptied, so every tensor handed over is freed right after
        its last reader inside the graph."""
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
        if keep_for is not None:
            if not isinstance(taps, list):
                raise FBCompileError("keep_for hands the taps over: give the list from run_forward, "
                                     f"not a {type(taps).__name__}")
            self.release(taps, keep_for)
            if isinstance(output_feedback, list):
                output_feedback.clear()
        key = (mode, returns)
        if key not in self._boxed:
            module = self.program.pruned_feedback(mode, returns)
            backend = self.program.backend
            self._boxed[key] = boxed(module) if backend is None else CompiledFeedback(module, backend, mode)
        return self._boxed[key].forward(args)       # our own callable: no hooks; empties ``args``

    def release(self, taps: list, keep_for: tuple = ()) -> None:
        """Drop from ``taps`` (set to None) every tap no mode in ``keep_for`` reads."""
        unknown = [mode for mode in keep_for if mode not in self._reads]
        if unknown:
            raise FBCompileError(f"keep_for names modes {unknown} this executable was not built with ({self.modes})")
        kept = frozenset().union(*(self._reads[mode] for mode in keep_for)) if keep_for else frozenset()
        for i in range(len(taps)):
            if i not in kept:
                taps[i] = None

    def unit_gradients(self, deltas: dict, values: dict, taps, hand_over: bool = False) -> dict:
        """{parameter: local gradient} given delta_u at the unit outputs (``deltas``: node name ->
        tensor; a missing one is zero, shaped like ``values[name]``): each unit's own backward with
        its inputs held fixed, through the compiled "unit_error" graph, without autograd. Equals
        autograd on the local losses where the program is ``exact_within_units``. ``hand_over``
        empties ``deltas`` and the ``taps`` list, so each is freed after its last reader."""
        outputs = self.program.unit_outputs
        fed = [deltas[o.name] if o.name in deltas else torch.zeros_like(values[o.name]) for o in outputs]
        if hand_over:
            deltas.clear()
        with torch.no_grad():
            _, grads = self.run_feedback("unit_error", fed, taps, returns="params",
                                         keep_for=() if hand_over else None)
        return {n: g for n, g in zip(self.program.feedback["unit_error"].params, grads) if g is not None}

    def _plan(self, graph) -> list:
        """(kind, index or key) per placeholder of ``graph``: output/cut positions, tap positions in
        this executable's taps, slot keys."""
        cut_index = {o.name: i for i, o in enumerate(self.program.unit_outputs)}
        locate = {"output": lambda k: k, "cut": cut_index.get, "tap": self.tap_index.get, "slot": lambda k: k}
        return [(kind, locate[kind](key)) for kind, key in graph.inputs]
