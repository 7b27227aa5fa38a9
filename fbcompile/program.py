"""The compiled program: forward GraphModule with taps plus feedback GraphModules, and their runners."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .context import RuleContext
from .errors import FBCompileError
from .passes.feedback import FeedbackGraph, emit_feedback, family_of
from .passes.direct_graph import UnitGradients, unit_gradients
from .passes.prune import GradientSubgraph, prune_outputs
from .executable import Executable
from .autocast_guard import META as AUTOCAST_META
from .input_shapes import META as SHAPES_META
from .hook_guard import META as HOOK_META
from .structure_guard import META as STRUCTURE_META
from .attribute_guard import META as ATTRIBUTE_META
from .mode_guard import mode_guard_of
from .passes.forward import build_cut_forward, build_resume_forward, build_unit_forwards
from .trace import active_outputs, depends_on_parameters, info


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

    - ``executable(*modes)``: what a learner runs (its forward with exactly its taps, its modes'
      feedback modules); the program itself is the shared analysis and never changes them.
    - ``feedback[mode]``: a :class:`~fbcompile.passes.feedback.FeedbackGraph` per mode
      ("error", "target", "difference").
    - ``propagate_error(inputs, output_error)``: error mode with the forward weights.
    - ``explain()``, ``feedback_code``, ``units``, ``slots``.
    - ``mode_guard``: None, or the training flags a mode-dependent graph was captured with
      (:mod:`fbcompile.mode_guard`); ``hook_guard``: the model's hooks at capture
      (:mod:`fbcompile.hook_guard`); ``structure_guard``: its submodules, parameters and buffers
      (:mod:`fbcompile.structure_guard`); ``input_shapes``: None, or the input shapes a torch.export
      capture holds for (:mod:`fbcompile.input_shapes`); ``autocast_guard``: the autocast state at
      capture (:mod:`fbcompile.autocast_guard`); ``attribute_guard``: the modules' plain attributes
      (:mod:`fbcompile.attribute_guard`). :meth:`check_model` refuses to run when any of them
      changed.
    - ``rule_sets[family]``: ``{forward node: rule}`` per mode family ("error": the error and
      unit_error modes; "target": target, difference and the unit target modes), chosen with the
      family's ``variants[family]``. ``rules`` is the target family's (the Jacobian matching that
      :func:`~fbcompile.verify` reports), ``error_rules`` the error family's.
    """

    def __init__(self, model, traced, condition, variants, rules, partition, units="layer"):
        from .compiler import family_variants
        self.model, self.traced = model, traced
        self.condition, self.variants, self.grouping = condition, family_variants(variants), units
        self.rule_sets, self.partition = rules, partition
        self.rules, self.error_rules = rules["target"], rules["error"]
        self.params = dict(model.named_parameters())
        self.outputs = active_outputs(traced)
        self.inputs = [n for n in traced.graph.nodes if n.op == "placeholder"]
        self.mode_guard = mode_guard_of(traced)
        self.hook_guard = traced.meta.get(HOOK_META) if hasattr(traced, "meta") else None
        self.input_shapes = traced.meta.get(SHAPES_META) if hasattr(traced, "meta") else None
        self.structure_guard = traced.meta.get(STRUCTURE_META) if hasattr(traced, "meta") else None
        self.autocast_guard = traced.meta.get(AUTOCAST_META) if hasattr(traced, "meta") else None
        self.attribute_guard = traced.meta.get(ATTRIBUTE_META) if hasattr(traced, "meta") else None
        self.backend = None            # torch.compile backend of the feedback modules (fbcompile.backends)
        self.feedback, self.slots = {}, []
        self._derived = {}
        self.feedback_graph("error")

    def __repr__(self):
        mode = f", {self.mode_guard.summary}" if self.mode_guard is not None else ""
        return (f"FeedbackProgram({type(self.model).__name__}, condition {self.condition}, "
                f"{len(self.partition.units)} units{mode})")

    def check_model(self, inputs: tuple | None = None) -> None:
        """Raise if the model is no longer the one captured: :class:`~fbcompile.errors.TrainingModeError`
        if the captured graph depends on the training mode and the modules now have other training
        flags than at capture, an FBCompileError if hooks were added or removed since
        (:mod:`fbcompile.hook_guard`) or a submodule, parameter or buffer replaced
        (:mod:`fbcompile.structure_guard`), or if ``inputs`` have a shape the program was not
        captured for (:mod:`fbcompile.input_shapes`), or if the autocast state is not the one at
        capture (:mod:`fbcompile.autocast_guard`), or a module's plain attribute changed
        (:mod:`fbcompile.attribute_guard`). Every run of the captured forward on the model
        checks this first: :meth:`propagate_error`, and a learner when it opens
        a step's transaction (before anything changes)."""
        if self.mode_guard is not None:
            self.mode_guard.check()
        if self.hook_guard is not None:
            self.hook_guard.check()
        if self.structure_guard is not None:
            self.structure_guard.check()
        if self.input_shapes is not None and inputs is not None:
            self.input_shapes.check(inputs)
        if self.autocast_guard is not None:
            self.autocast_guard.check()
        if self.attribute_guard is not None:
            self.attribute_guard.check()

    def executable(self, *modes: str) -> Executable:
        """What a learner runs: the forward with exactly the taps the feedback graphs of ``modes``
        read, and those graphs (see :mod:`fbcompile.executable`). Built once per set of modes."""
        key = ("executable", tuple(dict.fromkeys(modes)))
        if key not in self._derived:
            self._derived[key] = Executable(self, key[1])
        return self._derived[key]

    def feedback_graph(self, mode: str) -> FeedbackGraph:
        """The feedback graph of ``mode``, emitted once on first use ("error", "target", "difference",
        "unit_difference", "unit_target", "unit_error") and never changed afterwards."""
        if mode not in self.feedback:
            self.feedback[mode] = emit_feedback(self.traced, self.rules_of(mode), self.partition, mode)
            self.slots = _slots(self.model, self.feedback)
        return self.feedback[mode]

    def recompile(self, *, condition=None, variants=None, units=None) -> "FeedbackProgram":
        """The same traced model under another condition, rule variants or unit grouping (and the
        same feedback backend)."""
        from .compiler import compile_traced
        program = compile_traced(self.model, self.traced, condition or self.condition,
                                 self.variants if variants is None else variants,
                                 self.grouping if units is None else units)
        program.backend = self.backend
        return program

    # -- introspection ---------------------------------------------------------------------------
    @property
    def units(self):
        return self.partition.units

    @property
    def feedback_code(self) -> str:
        """The generated Python of the error-mode feedback GraphModule."""
        return self.feedback["error"].module.code

    def code(self, mode: str = "error") -> str:
        """The generated Python of the ``mode`` feedback GraphModule."""
        return self.feedback_graph(mode).module.code

    def explain(self) -> str:
        from .explain import explain_table
        return explain_table(self)

    def rules_of(self, mode: str) -> dict:
        """``{forward node: rule}`` that feedback mode ``mode`` uses (its family's rule set)."""
        return self.rule_sets[family_of(mode)]

    def rule_for(self, node_name: str, mode: str = "target"):
        """The rule feedback mode ``mode`` applies at forward node ``node_name`` (None: no rule)."""
        return next((r for n, r in self.rules_of(mode).items() if n.name == node_name), None)

    # -- forward programs --------------------------------------------------------------------------
    @property
    def parameter_free_boundary(self) -> frozenset:
        """Positions in :attr:`boundary` of values computed without any parameter (the model inputs
        and, e.g., their flattening): their feedback cannot reach a parameter."""
        if "parameter_free" not in self._derived:
            self._derived["parameter_free"] = frozenset(
                i for i, n in enumerate(self.boundary) if not depends_on_parameters(n))
        return self._derived["parameter_free"]

    @property
    def boundary(self) -> list:
        """Forward nodes whose feedback the feedback graphs return: model inputs, then unit outputs."""
        return self.partition.boundary

    def cut_forward(self):
        """``(module, input keys, output keys)`` evaluating every unit on its own inputs."""
        if "cut" not in self._derived:
            self._derived["cut"] = build_cut_forward(self.traced, self.partition)
        return self._derived["cut"]

    def unit_forwards(self, tapped: bool = False) -> list:
        """Per-unit forward modules (:class:`~fbcompile.passes.forward.UnitStage`), in unit order.
        ``tapped``: each also returns the taps its unit's :meth:`unit_gradient_graph` reads (stage.taps)."""
        key = "tapped units" if tapped else "units"
        if key not in self._derived:
            self._derived[key] = (list(self.unit_gradients().stages) if tapped
                                  else build_unit_forwards(self.traced, self.partition))
        return self._derived[key]

    def run_units(self, inputs: tuple, visit, *, detach: bool = True, stages: list | None = None,
                  execute=None):
        """Update-unlocked execution: run the units one after another; after each, call
        ``visit(stage, unit_inputs, unit_outputs)`` if given (e.g. to compute and store its update at
        once), then drop every value no later unit reads, so live activations do not grow with depth.
        Unit inputs are detached when ``detach``. ``stages`` (default :meth:`unit_forwards`) may be
        stages carrying more than the unit (e.g. Mono-Forward's heads) and ``execute(stage, values)``
        replaces ``stage.module(*values)``. Returns the model output."""
        stages = self.unit_forwards() if stages is None else stages
        env = dict(zip(self.inputs, inputs))
        remaining = {}
        for stage in stages:
            for src in stage.inputs:
                remaining[src] = remaining.get(src, 0) + 1
        for node in self.outputs:
            remaining[node] = remaining.get(node, 0) + 1
        for stage in stages:
            values = [env[src] for src in stage.inputs]
            if detach:
                values = [v.detach() if torch.is_tensor(v) else v for v in values]
            outputs = stage.module(*values) if execute is None else execute(stage, values)
            env.update(zip(stage.outputs, outputs))
            if visit is not None:
                visit(stage, values, outputs)
            del values, outputs
            for src in stage.inputs:
                remaining[src] -= 1
                if remaining[src] == 0:
                    env.pop(src, None)
        result = tuple(env[n] for n in self.outputs)
        return result[0] if len(result) == 1 else result

    @property
    def unit_outputs(self) -> list:
        """Every unit's output nodes, unit by unit: the order of the cut modes' inputs."""
        if "unit_outputs" not in self._derived:
            self._derived["unit_outputs"] = [o for unit in self.partition.units for o in unit.outputs]
        return self._derived["unit_outputs"]

    def unit_gradient_graph(self, unit: int) -> GradientSubgraph:
        """The "unit_error" graph pruned to unit ``unit``'s parameter gradients, reading only that
        unit's deltas and the taps its own backward needs (:meth:`unit_gradients`)."""
        return self.unit_gradients().graph(unit)

    def unit_gradients(self) -> UnitGradients:
        """Every unit's gradient graph and tapped forward, built once from the "unit_error" graph by
        the pure :func:`~fbcompile.passes.direct_graph.unit_gradients`; the direct learners' fused
        update graphs are built from it."""
        if "unit_gradients" not in self._derived:
            self._derived["unit_gradients"] = unit_gradients(self.traced, self.partition,
                                                             self.feedback_graph("unit_error"))
        return self._derived["unit_gradients"]

    @property
    def exact_within_units(self) -> bool:
        """Whether every error map a unit's delta passes through on its way to a parameter is J_F^T:
        condition T and error-family rules (those of the "unit_error" graph) of kind "exact" or
        "linearised" (whose error map is the exact sigma'(x); only their target map is affine). Ops
        before a unit's first parametric op do not count."""
        if "exact_within_units" not in self._derived:
            exact = self.condition == "T"
            for unit in self.partition.units:
                started = False
                for node in unit.nodes:
                    call = info(node).call
                    started = started or bool(call is not None and call.params)
                    rule = self.error_rules.get(node)
                    if started and rule is not None and rule.kind_for(RuleContext(node)) not in ("exact", "linearised"):
                        exact = False
            self._derived["exact_within_units"] = exact
        return self._derived["exact_within_units"]

    def resume_forward(self, node_name: str) -> fx.GraphModule:
        """The model output as a function of (model inputs, a replacement value for ``node_name``)."""
        key = ("resume", node_name)
        if key not in self._derived:
            node = next((n for n in self.traced.graph.nodes if n.name == node_name), None)
            if node is None:
                raise FBCompileError(f"the traced model has no node {node_name!r}")
            self._derived[key] = build_resume_forward(self.traced, node)
        return self._derived[key]

    # -- feedback ---------------------------------------------------------------------------------
    def pruned_feedback(self, mode: str, returns: str) -> fx.GraphModule:
        """The ``mode`` feedback module returning only what ``returns`` asks for (dead code removed)."""
        if returns == "all":
            return self.feedback[mode].module
        key = ("pruned", mode, returns)
        if key not in self._derived:
            self._derived[key] = prune_outputs(self.feedback[mode], returns, self.parameter_free_boundary)
        return self._derived[key]

    def propagate_error(self, inputs, output_error):
        """Error mode: propagate ``output_error`` (dL/d output) through the feedback graph with the
        forward weights, accumulate parameter gradients into ``.grad`` exactly where autograd's
        backward would, and return the error at each model input (a tensor for one input)."""
        inputs, errors = as_tuple(inputs), as_tuple(output_error)
        self.check_model(inputs)
        run = self.executable("error")
        with torch.no_grad():
            output, taps = run.run_forward(inputs)
            check_output_feedback(self, output, errors)
            values, grads = run.run_feedback("error", errors, taps)
            accumulate_grads(self.params, self.feedback["error"].params, grads)
        by_node = dict(zip(self.boundary, values))
        input_errors = tuple(by_node.get(node) if by_node.get(node) is not None else torch.zeros_like(x)
                             for node, x in zip(self.inputs, inputs))
        return input_errors[0] if len(input_errors) == 1 else input_errors


def as_tuple(value) -> tuple:
    """Model inputs or outputs as a tuple (one tensor becomes a 1-tuple)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def check_output_feedback(program: FeedbackProgram, output, feedback: tuple) -> None:
    outs = as_tuple(output)
    if len(feedback) != len(program.outputs):
        raise FBCompileError(f"the model returns {len(program.outputs)} tensor(s) but "
                             f"{len(feedback)} output feedback tensor(s) were given")
    for node, out, fb in zip(program.outputs, outs, feedback):
        if not isinstance(fb, torch.Tensor) or fb.shape != out.shape:
            shape = tuple(fb.shape) if isinstance(fb, torch.Tensor) else type(fb).__name__
            op = info(node).call.spec.name if info(node).call is not None else node.op
            raise FBCompileError(f"output feedback for node {node.name!r} (op {op!r}) has shape {shape}, but "
                                 f"the output has shape {tuple(out.shape)}")


def accumulate_grads(params: dict, names: list, grads) -> None:
    """Add ``grads`` into ``.grad`` of the named parameters, as autograd's backward does: a first
    gradient laid out like its parameter is stored as it is (callers pass tensors nothing else
    keeps, e.g. autograd.grad results), any other is copied into the parameter's layout and dtype
    (under autocast a float32 weight's gradient is computed in bfloat16 and stored in float32, as
    autograd's cast does); a frozen parameter (``requires_grad=False``) gets none."""
    for name, grad in zip(names, grads):
        param = params[name]
        if grad is None or not param.requires_grad:
            continue
        if param.grad is None:
            owned = (not grad.requires_grad and grad.stride() == param.stride() and grad.dtype == param.dtype
                     and grad.untyped_storage().data_ptr() != param.untyped_storage().data_ptr())
            param.grad = grad if owned else torch.empty_like(param).copy_(grad.detach())
        else:
            param.grad.add_(grad.detach())


def _slots(model: nn.Module, feedback: dict) -> list:
    seen = {}
    for graph in feedback.values():
        for kind, key in graph.inputs:
            if kind == "slot" and key not in seen:
                qualname = graph.slot_params[key]
                seen[key] = Slot(key[0], key[1], qualname, tuple(model.get_parameter(qualname).shape))
    return list(seen.values())
